"""`vlm.datamodules`: LightningDataModules and datasets.

CoOp split files and Dassl few-shot sampling (`splits`, `fewshot`), CLIP preprocessing
(`transforms`), the few-shot / base-to-new DataModule (`fewshot_datamodule`), N-way K-shot
episodes (`episodic`), the offline MNIST quickstart data (`mnist`, and its quadrant task
`mnist_location`) and hand-written prompt
templates (`templates`). The dataset
registry (`dataset_specs`, `readers_*`) reads every supported dataset in its standard layout for
`DatasetDataModule`; `webdataset` trains from shards (`ShardDataModule`).
"""

# The readers register the datasets (registry name -> DatasetSpec) at import.
from vlm.datamodules import readers_coop, readers_episodic, readers_transfer  # noqa: F401
from vlm.datamodules.dataset_datamodule import DatasetDataModule
from vlm.datamodules.dataset_specs import DatasetLayoutError, DatasetSpec, available_datasets, get_dataset
from vlm.datamodules.episodic import (
    Episode,
    EpisodeSampler,
    EpisodicDataModule,
    MNISTEpisodicDataModule,
    load_or_create_episodes,
    sample_episodes,
)
from vlm.datamodules.fewshot import load_or_create_fewshot, sample_fewshot, subsample_classes
from vlm.datamodules.fewshot_datamodule import FewShotDataModule
from vlm.datamodules.image_list import ImageListDataset
from vlm.datamodules.mnist import MNISTFewShotDataModule, MNISTPretrainDataModule, prepare_mnist
from vlm.datamodules.mnist_location import MNISTLocationDataModule, prepare_mnist_location
from vlm.datamodules.splits import Datum, read_split
from vlm.datamodules.webdataset import ShardDataModule
from vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD, build_test_transform, build_train_transform

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DatasetDataModule",
    "DatasetLayoutError",
    "DatasetSpec",
    "Datum",
    "Episode",
    "EpisodeSampler",
    "EpisodicDataModule",
    "FewShotDataModule",
    "ImageListDataset",
    "MNISTEpisodicDataModule",
    "MNISTFewShotDataModule",
    "MNISTLocationDataModule",
    "MNISTPretrainDataModule",
    "ShardDataModule",
    "available_datasets",
    "build_test_transform",
    "build_train_transform",
    "get_dataset",
    "load_or_create_episodes",
    "load_or_create_fewshot",
    "prepare_mnist",
    "prepare_mnist_location",
    "read_split",
    "sample_episodes",
    "sample_fewshot",
    "subsample_classes",
]
