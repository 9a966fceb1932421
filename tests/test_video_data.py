"""The video data path: clips probed, their frame windows drawn and decoded, bucketed with their frame count."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")

from datamodules import DiffusionDataModule  # noqa: E402
from datamodules.dataset import BucketedImageDataset  # noqa: E402
from datamodules.video import Clip, decode, probe_clip, shortfall, window  # noqa: E402

STEP = 8  # grey levels between frames: frame i is a flat grey of 8 * i, so a decoded frame names its number


def write_clip(path, frames: int, fps: int, size=(64, 48), codec: str = "mpeg4") -> None:
    """A clip whose frame i is a flat grey of level STEP * i (lossy codecs keep a flat field's level)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            image = Image.new("RGB", size, (STEP * i,) * 3)
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_numbers(frames) -> list[int]:
    return [round(float(np.asarray(f, dtype=np.float32).mean()) / STEP) for f in frames]


@pytest.mark.parametrize(("name", "codec"), [("a.mp4", "mpeg4"), ("b.webm", "libvpx-vp9"), ("c.mkv", "ffv1")])
def test_a_clip_is_probed_from_its_headers(tmp_path, name, codec):
    write_clip(tmp_path / name, frames=20, fps=10, codec=codec)
    with open(tmp_path / name, "rb") as fp:
        width, height, clip = probe_clip(fp)
    assert (width, height) == (64, 48) and clip.fps == 10 and clip.frames == 20 and clip.duration == 2.0


def test_windows_start_uniform_and_random_resample_to_the_frame_rate(tmp_path):
    write_clip(tmp_path / "a.mp4", frames=30, fps=30)
    clip = Clip(30.0, 30)
    assert window(clip, 5, 10, "start", random.Random(0)) == [0, 3, 6, 9, 12]  # 10 fps from 30
    assert window(clip, 5, None, "start", random.Random(0)) == [0, 1, 2, 3, 4]  # the clip's own rate
    assert window(clip, 5, 10, "uniform", random.Random(0)) == [0, 7, 14, 22, 29]  # over the whole clip
    draws = {tuple(window(clip, 5, 10, "random", random.Random(seed))) for seed in range(20)}
    assert len(draws) > 3 and all(w[0] <= 17 and list(w) == list(range(w[0], w[0] + 13, 3)) for w in draws)
    assert window(clip, 5, 10, "random", random.Random(7)) == window(clip, 5, 10, "random", random.Random(7))
    with open(tmp_path / "a.mp4", "rb") as fp:  # decoding takes exactly those frames, a repeat included
        assert frame_numbers(decode(fp, clip, [6, 9, 12, 12, 29], lambda f: f)) == [6, 9, 12, 12, 29]


def test_a_clip_too_short_for_its_window_says_what_it_needs():
    assert shortfall(Clip(16.0, 81), 81, None, "start") is None
    assert shortfall(Clip(24.0, 48), 81, 16, "start") == (
        "too short: 2.00 s at 24 fps; data.num_frames=81 at 16 fps needs 5.06 s"
    )
    assert shortfall(Clip(24.0, 48), 49, None, "uniform") == "too short: 48 frames, data.num_frames=49"


def _folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_clip(data / "walk.mp4", frames=24, fps=8)
    write_clip(data / "short.mp4", frames=4, fps=8)
    write_clip(data / "wide.mp4", frames=24, fps=8, size=(96, 48))
    Image.new("RGB", (64, 48), (255, 0, 0)).save(data / "still.png")
    (data / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    return data


def test_images_and_clips_mix_each_batch_one_bucket_and_frame_count(tmp_path):
    report = tmp_path / "report.json"
    dm = DiffusionDataModule(
        path=str(_folder(tmp_path)),
        resolution=32,
        resolution_type="pixel",
        bucket_step=16,
        num_frames=5,
        frame_rate=4,
        video=True,
        batch_size=1,
        report_path=str(report),
    )
    samples = {s.item.key: s for s in dm.scan()}
    assert sorted(samples) == ["still.png", "walk.mp4", "wide.mp4"]
    assert samples["walk.mp4"].group == ((48, 32), (), 5) and samples["still.png"].group == (48, 32)
    written = json.loads(report.read_text())
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in written["skipped"]}
    assert skipped["short.mp4"].startswith("too short: 0.50 s at 8 fps") and "unreadable video" in skipped["broken.mp4"]
    clip = next(u for u in written["usable"] if u["path"].endswith("walk.mp4"))["clip"]
    assert clip == {
        "fps": 8.0,
        "frames": 24,
        "duration": 3.0,
        "num_frames": 5,
        "frame_rate": 4,
        "frame_sampling": "start",
    }
    shapes = sorted(tuple(b["pixels"].shape) for b in dm.train_dataloader())
    assert shapes == [(1, 3, 5, 32, 48), (1, 3, 5, 32, 64), (1, 3, 32, 48)]
    walk = BucketedImageDataset(dm.samples, dm.sources, 0)[(dm.samples.index(samples["walk.mp4"]), 0)]["pixels"]
    levels = ((walk.mean(dim=(0, 2, 3)) + 1) * 127.5 / STEP).round().tolist()  # frames 0, 2, 4, 6, 8 at 4 fps
    assert levels == [0, 2, 4, 6, 8]
    from tuner.inspect import report as doctor

    assert "clips: 2 of 3 samples; duration min 3.00 s, median 3.00 s, max 3.00 s; fps 8; 5 frames a sample" in doctor(
        dm, 1, 1, 1
    )


def test_an_image_family_skips_clips_with_the_reason(tmp_path):
    dm = DiffusionDataModule(path=str(_folder(tmp_path)), resolution=32, bucket_step=16, num_frames=5)
    assert [s.item.key for s in dm.scan()] == ["still.png"]
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in dm.results["default"].skipped}
    assert reasons["walk.mp4"].startswith("a video clip, and this model trains on images")


def write_animation(path, durations_ms: list[int], size=(64, 48)) -> None:
    """An animated GIF or WebP whose frame i is a flat grey of level STEP * i, shown for ``durations_ms[i]``."""
    frames = [Image.new("RGB", size, (STEP * i,) * 3) for i in range(len(durations_ms))]
    extra = {"lossless": True} if str(path).endswith(".webp") else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations_ms, loop=0, **extra)


def test_animated_gifs_and_webps_are_clips_for_a_video_family_and_first_frames_for_the_others(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_animation(data / "even.gif", [100] * 12)  # 10 fps, 1.2 s
    write_animation(data / "uneven.webp", [100, 300, 100, 100, 100, 100])  # frame 1 on screen 0.1-0.4 s
    Image.new("RGB", (64, 48), (STEP * 3,) * 3).save(data / "still.webp")
    Image.new("RGB", (64, 48), (STEP * 3,) * 3).save(data / "still.gif")
    common = dict(path=str(data), resolution=32, resolution_type="pixel", bucket_step=16, num_frames=5, batch_size=1)
    video = DiffusionDataModule(**common, video=True, frame_rate=10)
    samples = {s.item.key: s for s in video.scan()}
    assert samples["even.gif"].clip == Clip(10.0, 12) and samples["even.gif"].num_frames == 5
    assert samples["uneven.webp"].clip.frames == 6 and samples["uneven.webp"].clip.fps == pytest.approx(6 / 0.8)
    assert samples["still.webp"].clip is None and samples["still.gif"].clip is None  # stills stay images
    assert "animation, 12 frames at 10 fps" in samples["even.gif"].note
    dataset = BucketedImageDataset(video.samples, video.sources, 0)

    def levels(key):
        pixels = dataset[(video.samples.index(samples[key]), 0)]["pixels"]
        return ((pixels.mean(dim=(0, 2, 3)) + 1) * 127.5 / STEP).round().tolist()

    assert levels("even.gif") == [0, 1, 2, 3, 4]
    # at 10 fps: 0.0 s frame 0, 0.1-0.3 s frame 1 (shown 300 ms), 0.4 s frame 2
    assert levels("uneven.webp") == [0, 1, 1, 1, 2]
    images = DiffusionDataModule(**common)  # an image family: every one of them, as its first frame
    assert all(s.clip is None for s in images.scan()) and len(images.samples) == 4


def test_random_windows_repeat_per_epoch_and_are_not_cached(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_clip(data / "walk.mp4", frames=40, fps=8)
    dm = DiffusionDataModule(
        path=str(data),
        resolution=32,
        bucket_step=16,
        num_frames=5,
        frame_sampling="random",
        video=True,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.attach_encoders(
        lambda p: torch.cat([p, p], 1),
        lambda c: {"e": torch.zeros(len(c), 2)},
        {"vae": "v", "text": "t"},
        lambda **_: None,
    )
    dataset = dm._build_dataset(0, 1)
    assert dataset.latent_keys is None  # a fresh window each use: nothing to cache
    firsts = [float(dataset[(0, epoch)]["pixels"][:, 0].mean()) for epoch in range(6)]
    assert len(set(firsts)) > 1 and firsts == [float(dataset[(0, e)]["pixels"][:, 0].mean()) for e in range(6)]


def test_the_demo_clips_are_a_mixed_folder(tmp_path):
    from datamodules.demo import write_clips

    folder = write_clips(tmp_path / "clips", count=4, frames=9)
    names = sorted(p.name for p in folder.iterdir())
    assert sum(n.endswith(".mp4") for n in names) == 4 and sum(n.endswith(".png") for n in names) == 2
    with open(folder / "a red circle moving right (0).mp4", "rb") as fp:
        assert probe_clip(fp)[2] == Clip(8.0, 9)


def test_the_frame_count_is_checked_against_the_family(make_cfg):
    from tuner.config import ConfigError
    from tuner.run import prepare

    with pytest.raises(ConfigError, match="trains on images"):
        prepare(make_cfg("data.num_frames=17"))
    # LTX-Video's positions in time are conditioned on the frame rate: the clips must come at the one it is told
    with pytest.raises(ConfigError, match="data.frame_rate=16, but model.options.frame_rate=25"):
        prepare(make_cfg("model=ltx_video", "data.num_frames=9", "data.frame_rate=16"))
    prepare(make_cfg("model=ltx_video", "data.num_frames=9", "data.frame_rate=16", "model.options.frame_rate=16"))


def test_the_objective_takes_clips():
    from models import objectives as obj

    noise = torch.zeros(2, 3, 4, 5, 6)  # (B, C, F, h, w)
    shifted = obj.offset_noise(noise, 0.5, torch.Generator().manual_seed(0))
    assert shifted.shape == noise.shape and bool((shifted == shifted[:, :, :1, :1, :1]).all())  # one per clip, channel
    four = obj.offset_noise(torch.zeros(2, 3, 5, 6), 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(four[:, :, :1, :1], shifted[:, :, 0, :1, :1])  # images draw as before
    mask = torch.zeros(2, 1, 1, 5, 6)
    mask[0, ..., :3] = 1  # half of clip 0's every frame trains; none of clip 1
    err = torch.ones(2, 3, 4, 5, 6)
    err[0, ..., 3:] = 9.0
    assert float(obj.weighted_mse(err, torch.zeros_like(err), mask=mask)) == pytest.approx(0.5)


def test_a_validation_clip_is_written_as_mp4_with_its_strip_and_logged(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks.video_out import frame_strip, log_clip, write_clip

    frames = [Image.new("RGB", (32, 24), (STEP * i,) * 3) for i in range(9)]
    path = write_clip(frames, tmp_path / "a_red_circle", fps=8)
    assert path.name == "a_red_circle.mp4"
    with open(path, "rb") as fp:
        assert probe_clip(fp) == (32, 24, Clip(8.0, 9))
    with open(path, "rb") as fp:  # the frames come back in order
        assert frame_numbers(decode(fp, Clip(8.0, 9), list(range(9)), lambda f: f)) == list(range(9))
    strip = frame_strip(frames)
    assert strip.size == (5 * 32, 24) and frame_numbers(
        [strip.crop((i * 32, 0, i * 32 + 32, 24)) for i in range(5)]
    ) == [
        0,
        2,
        4,
        6,
        8,
    ]
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    log_clip(logger, "validation/a_red_circle", path, frames, 8, 3, strip)  # a video, or its strip without moviepy
    logger.experiment.flush()
    (events,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "validation/a_red_circle" in acc.Tags()["images"] + acc.Tags()["tensors"]


def test_a_validation_clip_reaches_wandb_as_a_video(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from callbacks.video_out import frame_strip, log_clip, write_clip

    wandb.finish()  # a run an earlier test of this process left open would take this logger's media instead
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    frames = [Image.new("RGB", (32, 24), (STEP * i,) * 3) for i in range(9)]
    path = write_clip(frames, tmp_path / "clip", fps=8)
    logger = WandbLogger(project="tuner-test", save_dir=str(tmp_path), offline=True)
    log_clip(logger, "validation/clip", path, frames, 8, 1, frame_strip(frames))
    run_dir = Path(logger.experiment.dir)
    logger.experiment.finish()
    (copy,) = run_dir.rglob("media/videos/validation/clip_*.mp4")  # the run's own copy of the clip
    assert copy.read_bytes() == path.read_bytes()


def test_a_clip_takes_a_mask_clip_frame_for_frame_or_a_still_mask_on_every_frame(tmp_path):
    """Masked loss on clips: a mask clip gives the target's own window of frames (random windows included), a still
    mask holds for every frame, a mask clip shorter than its target is a recorded skip, and the loss packs a
    per-frame mask in time as the VAE packs the frames."""
    from datamodules.video import pack_frames

    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir(), masks.mkdir()
    for name in ("walk", "still_masked", "short_mask"):
        write_clip(data / f"{name}.mp4", frames=24, fps=8)
    write_clip(masks / "walk.mp4", frames=24, fps=8)  # frame i at grey STEP * i, as its target's
    Image.new("L", (64, 48), 255).save(masks / "still_masked.png")
    write_clip(masks / "short_mask.mp4", frames=6, fps=8)
    report = tmp_path / "report.json"
    dm = DiffusionDataModule(
        path=str(data), resolution=32, resolution_type="pixel", bucket_step=16, num_frames=5, video=True,
        frame_sampling="random", batch_size=1, conditioning={"mask": {"path": str(masks)}}, report_path=str(report),
    )
    samples = {s.item.key: s for s in dm.scan()}
    assert sorted(samples) == ["still_masked.mp4", "walk.mp4"]
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in json.loads(report.read_text())["skipped"]}
    assert "has 6 frames at 8 fps; its clip has 24 at 8 fps" in skipped["short_mask.mp4"]
    usable = {u["path"].rsplit("/", 1)[-1]: u for u in json.loads(report.read_text())["usable"]}
    assert usable["walk.mp4"]["companions"] == [{"kind": "mask", "path": str(masks / "walk.mp4"),
                                                 "clip": {"fps": 8.0, "frames": 24}}]

    dataset = BucketedImageDataset(dm.samples, dm.sources, 0)
    for epoch in (0, 1, 2):
        item = dataset[(dm.samples.index(samples["walk.mp4"]), epoch)]
        assert item["pixels"].shape == (3, 5, 32, 48) and item["mask"].shape == (1, 5, 32, 48)
        target = ((item["pixels"].mean(dim=(0, 2, 3)) + 1) * 127.5 / STEP).round()
        mask = (item["mask"].mean(dim=(0, 2, 3)) * 255 / STEP).round()
        assert target.tolist() == mask.tolist()  # the same source frames, wherever the window fell
    still = dataset[(dm.samples.index(samples["still_masked.mp4"]), 0)]["mask"]
    assert still.shape == (1, 5, 32, 48) and bool((still == 1).all())

    per_frame = torch.arange(9.0).view(1, 1, 9, 1, 1).expand(2, 1, 9, 4, 4)
    packed = pack_frames(per_frame, 3)  # Wan: frame 0, then frames 1-4 and 5-8
    assert packed.shape == (2, 1, 3, 4, 4) and packed[0, 0, :, 0, 0].tolist() == [0.0, 2.5, 6.5]


def test_a_wan_run_whose_mask_clips_are_all_black_learns_nothing(make_cfg, demo_dir, tmp_path):
    """The mask clips reach the loss, frame by frame: black everywhere, the loss is 0 and no gradient reaches the LoRA."""
    from safetensors.torch import load_file

    from datamodules.demo import write_clips
    from tuner.run import train

    clips = write_clips(demo_dir / "clips")
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in clips.iterdir():
        if path.suffix == ".mp4":
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                size, frames, fps = (stream.width, stream.height), stream.frames, int(stream.average_rate)
            with av.open(str(masks / path.name), "w") as container:  # as long as its clip, black
                stream = container.add_stream("mpeg4", rate=fps)
                stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
                for _ in range(frames):
                    for packet in stream.encode(av.VideoFrame.from_image(Image.new("RGB", size))):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
        elif path.suffix == ".png":
            with Image.open(path) as img:
                Image.new("L", img.size, 0).save(masks / path.name)
    cfg = make_cfg("model=wan", "model.masked_loss=true", f"data.conditioning.mask.path={masks}", "max_train_steps=2",
                   "optimizer.lr=5e-2", "callbacks.validation.enabled=false", "callbacks.ema.enabled=false")
    assert train(cfg) == 0.0
    state = load_file(Path(cfg.output_dir) / "pytorch_lora_weights.safetensors")
    assert max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k or "lora.up" in k) == 0.0


def test_clips_in_webdataset_shards_and_a_table_give_the_same_frames_as_from_a_folder(tmp_path):
    """Every source holds clips: a shard's .mp4 member (with its .txt) and a jsonl row naming an .mp4 are probed, given
    their window and decoded exactly as the same clip in a folder."""
    import webdataset as wds

    folder = tmp_path / "folder"
    folder.mkdir()
    write_clip(folder / "walk.mp4", frames=24, fps=8)
    (folder / "walk.txt").write_text("a walk")
    with wds.TarWriter(str(tmp_path / "shard-000.tar"), encoder=False) as writer:
        writer.write({"__key__": "walk", "mp4": (folder / "walk.mp4").read_bytes(), "txt": b"a walk"})
    (tmp_path / "meta.jsonl").write_text(json.dumps({"file_name": str(folder / "walk.mp4"), "text": "a walk"}) + "\n")
    frames = {}
    for name, path in (("folder", folder), ("shards", tmp_path / "shard-000.tar"), ("table", tmp_path / "meta.jsonl")):
        dm = DiffusionDataModule(path=str(path), resolution=32, resolution_type="pixel", bucket_step=16, num_frames=5,
                                 frame_rate=4, video=True, batch_size=1, caption_strategy="textfile" if name == "folder" else None)
        (sample,) = dm.scan()
        assert (sample.caption, sample.clip, sample.num_frames) == ("a walk", Clip(8.0, 24), 5), name
        frames[name] = BucketedImageDataset(dm.samples, dm.sources, 0)[(0, 0)]["pixels"]
    assert frames["folder"].shape == (3, 5, 32, 48)
    assert torch.equal(frames["folder"], frames["shards"]) and torch.equal(frames["folder"], frames["table"])
