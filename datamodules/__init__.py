from datamodules.datamodule import DiffusionDataModule, EmptyDatasetError

__all__ = ["DiffusionDataModule", "EmptyDatasetError"]
