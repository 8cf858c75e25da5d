"""`vlm.datamodules`: LightningDataModules and datasets.

CoOp split files and Dassl few-shot sampling (`splits`, `fewshot`), CLIP preprocessing
(`transforms`), the few-shot / base-to-new DataModule (`fewshot_datamodule`), the offline
MNIST quickstart data (`mnist`) and hand-written prompt templates (`templates`).
"""

from vlm.datamodules.fewshot import load_or_create_fewshot, sample_fewshot, subsample_classes
from vlm.datamodules.fewshot_datamodule import FewShotDataModule
from vlm.datamodules.image_list import ImageListDataset
from vlm.datamodules.mnist import MNISTFewShotDataModule, MNISTPretrainDataModule, prepare_mnist
from vlm.datamodules.splits import Datum, read_split
from vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD, build_test_transform, build_train_transform

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Datum",
    "FewShotDataModule",
    "ImageListDataset",
    "MNISTFewShotDataModule",
    "MNISTPretrainDataModule",
    "build_test_transform",
    "build_train_transform",
    "load_or_create_fewshot",
    "prepare_mnist",
    "read_split",
    "sample_fewshot",
    "subsample_classes",
]
