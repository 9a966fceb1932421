"""Data: sources, scan and captions, aspect buckets, caches and the LightningDataModule.

The data module is imported on first use, so that reading the data schema (datamodules.spec) for a
config check does not import torch.
"""

__all__ = ["DiffusionDataModule", "EmptyDatasetError"]


def __getattr__(name: str):
    if name in __all__:
        from datamodules import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
