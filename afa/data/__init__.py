"""The data layer: datasets for VOC, COCO, custom folders and a synthetic benchmark.

Train datasets return ``{"name", "image" (3,S,S), "labels" (C,), "valid_box" (4,)}``,
eval datasets ``{"name", "image" (3,H,W), "mask" (H,W), "labels" (C,)}``; every dataset
has ``num_classes`` (C, foreground), ``class_names`` (background first) and ``prepare()``
(writes what it needs, e.g. the synthetic cache; a no-op otherwise). A layout is an index
function given to a generic dataset: ``CropTrainDataset(voc_index(root, "train_aug"))``,
``FullImageEvalDataset(coco_index(root, "val", with_masks=True))``,
``FullImageEvalDataset(SyntheticIndex(root, "val"))``; hydra builds the same with a
nested ``_target_`` (``conf/dataset/*.yaml``).
"""
from afa.data.check import CheckReport, check_dataset
from afa.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, IGNORE_INDEX, VOC_CLASSES, voc_palette
from afa.data.coco_masks import build_coco_split, rasterize_annotations
from afa.data.datasets import (
    PSA_COLOR_JITTER,
    AffinityCropDataset,
    CropTrainDataset,
    FullImageEvalDataset,
    IndexedImageDataset,
    labels_to_multi_hot,
)
from afa.data.layouts import ImageIndex, PendingIndex, coco_index, custom_index, load_labels_file, voc_index
from afa.data.readers import DatasetError, image_size, read_image, read_mask, validate_mask
from afa.data.loaders import build_loader, worker_context
from afa.data.samplers import ResumableSampler, SameSizeBatchSampler
from afa.data.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticIndex,
    SyntheticSpec,
    SyntheticTrainDataset,
    generate_image,
    generate_split_image,
    prepare_synthetic,
)
from afa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugmentation, normalize_to_tensor

__all__ = [
    "COCO_CATEGORY_IDS", "COCO_CLASSES", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "PSA_COLOR_JITTER",
    "SYNTHETIC_CLASSES", "VOC_CLASSES", "AffinityCropDataset", "CheckReport", "CropTrainDataset", "DatasetError",
    "FullImageEvalDataset", "ImageIndex", "IndexedImageDataset", "PendingIndex", "ResumableSampler",
    "SameSizeBatchSampler", "SyntheticIndex", "SyntheticSpec", "SyntheticTrainDataset",
    "TrainAugmentation", "build_coco_split", "check_dataset", "coco_index", "custom_index", "generate_image",
    "generate_split_image", "image_size", "labels_to_multi_hot", "load_labels_file", "build_loader", "worker_context",
    "normalize_to_tensor", "prepare_synthetic", "rasterize_annotations", "read_image",
    "read_mask", "validate_mask", "voc_index", "voc_palette",
]
