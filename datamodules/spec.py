"""The keys a dataset has: the one source for the data schema, the data-level defaults and the
per-dataset overrides.

``DatasetKeys`` lists every key with its data-level default (``data.<key>``); ``DatasetOverrides`` is
the same keys, each optional, for one entry of ``data.datasets.<id>`` (null: the data-level value).
tuner/config/__init__.py builds the ``data`` schema on these, and the data module merges them, so a key is
declared once. Imports nothing heavy (the config checks read it before anything loads).
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class ResolutionType(Enum):
    pixel = "pixel"
    area = "area"


class CropStyle(Enum):
    center = "center"
    random = "random"
    corner = "corner"


class CropAspect(Enum):
    preserve = "preserve"  # each image's own aspect ratio (aligned to bucket_step)
    square = "square"
    closest = "closest"  # the nearest of crop_aspect_buckets


class FrameSampling(Enum):
    start = "start"  # a clip's first frames
    uniform = "uniform"  # num_frames spread evenly over the whole clip
    random = "random"  # a window at a random start each use (not latent-cached)


class CaptionStrategy(Enum):
    filename = "filename"
    textfile = "textfile"
    instanceprompt = "instanceprompt"
    column = "column"  # a metadata table's caption column


# Companion images a training image may have (paired data), by kind: ``reference`` (an edit model's input),
# ``mask`` (white = train: model.masked_loss weights the loss by it) and ``control`` (a control image).
CONDITIONING_KINDS = ("reference", "mask", "control")


@dataclass
class ConditioningKeys:
    """Where one kind of companion comes from: a folder (``path``) holding a file of the same relative path and
    stem as each training image (any image extension), or, for a table source, a ``column`` of file paths or URLs.
    Either may be a list, one companion per entry, in order: several references per target (Qwen-Image-Edit-Plus
    takes up to 3)."""

    path: Any = None  # str | list[str]
    column: Any = None  # str | list[str]


@dataclass
class Conditioning:
    reference: ConditioningKeys = field(default_factory=ConditioningKeys)
    mask: ConditioningKeys = field(default_factory=ConditioningKeys)
    control: ConditioningKeys = field(default_factory=ConditioningKeys)


@dataclass
class DatasetKeys:
    path: Optional[str] = None
    type: Optional[str] = None  # folder, s3, webdataset, table; None: inferred from path
    resolution: float = 1024
    resolution_type: ResolutionType = ResolutionType.area
    bucket_step: int = 64
    crop_style: CropStyle = CropStyle.center
    # null: the source's own: a table's caption column, webdataset's .txt/.json, else the file name
    caption_strategy: Optional[CaptionStrategy] = None
    instance_prompt: Optional[str] = None
    minimum_image_size: int = 0
    multiline_captions: bool = True  # each line of a caption file is a caption; one is drawn per use
    crop: bool = True  # false: resize to the bucket without cropping
    crop_aspect: CropAspect = CropAspect.preserve
    crop_aspect_buckets: list[float] = field(
        default_factory=lambda: [1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 0.5]
    )
    repeats: int = 0  # each image is seen 1 + repeats times an epoch
    probability: float = 1.0  # the share of (repeated) images drawn each epoch
    is_regularisation_data: bool = False  # prior preservation: its loss is weighted by model.prior_loss_weight
    # Images above maximum_image_size are brought down to target_downsample_size, then a bucket-sized
    # detail is cropped from them (both in resolution_type units: shorter edge, or area / megapixels).
    maximum_image_size: Optional[float] = None
    target_downsample_size: Optional[float] = None
    endpoint_url: Optional[str] = None  # S3-compatible stores (MinIO, R2); credentials come from the environment
    image_column: str = "file_name"  # metadata tables: the HF imagefolder convention
    caption_column: str = "text"
    conditioning: Conditioning = field(default_factory=Conditioning)  # companion images (paired data)
    mask_from_alpha: bool = False  # the loss mask is each image's alpha channel (opaque = train; none: all trains)
    # Video clips (a video family): frames a sample takes (Wan 4k+1, LTX 8k+1), at frame_rate (null: the clip's own)
    num_frames: Optional[int] = None
    frame_rate: Optional[float] = None
    frame_sampling: FrameSampling = FrameSampling.start


DATASET_KEYS = tuple(f.name for f in dataclasses.fields(DatasetKeys))
SOURCE_OPTIONS = ("endpoint_url", "image_column", "caption_column")  # handed to the source itself

# One entry of data.datasets: the same keys, each optional.
DatasetOverrides = dataclasses.make_dataclass(
    "DatasetOverrides",
    [(name, Optional[hint], field(default=None)) for name, hint in typing.get_type_hints(DatasetKeys).items()],
)


def defaults() -> dict:
    """The data-level defaults as plain values (enum names, tuples)."""
    out = {}
    for f in dataclasses.fields(DatasetKeys):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        out[f.name] = value.value if isinstance(value, Enum) else tuple(value) if isinstance(value, list) else value
    return out
