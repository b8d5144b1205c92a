"""The AFA method as pure, batched tensor functions (AFA.md §3–§8, §10)."""
from afa.constants import IGNORE_INDEX
from afa.ops.affinity import (
    affinity_labels_from_segmentation,
    affinity_loss,
    local_window_mask,
    local_window_neighbours,
)
from afa.ops.boxes import resample_boxes_bilinear, valid_box_mask
from afa.ops.cam import (
    CamFunction,
    cam_to_label,
    cam_to_training_label,
    combine_threshold_labels,
    multi_scale_cam,
    valid_cams,
)
from afa.ops.classes import (
    class_channel_index,
    masked_softmax,
    present_class_mask,
    threshold_class_scores,
)
from afa.ops.losses import balanced_segmentation_loss, multilabel_soft_margin_loss
from afa.ops.par import (
    DEFAULT_DILATIONS,
    neighbour_offsets,
    pixel_adaptive_refinement,
    pixel_adaptive_refinement_in_boxes,
    refine_cams_with_par,
)
from afa.ops.random_walk import (
    RandomWalkImplementation,
    propagate_cams_with_affinity,
    random_walk_transition,
)

__all__ = [
    "CamFunction",
    "DEFAULT_DILATIONS",
    "IGNORE_INDEX",
    "RandomWalkImplementation",
    "affinity_labels_from_segmentation",
    "affinity_loss",
    "balanced_segmentation_loss",
    "cam_to_label",
    "cam_to_training_label",
    "class_channel_index",
    "combine_threshold_labels",
    "local_window_mask",
    "local_window_neighbours",
    "masked_softmax",
    "multi_scale_cam",
    "multilabel_soft_margin_loss",
    "neighbour_offsets",
    "pixel_adaptive_refinement",
    "pixel_adaptive_refinement_in_boxes",
    "present_class_mask",
    "propagate_cams_with_affinity",
    "random_walk_transition",
    "refine_cams_with_par",
    "resample_boxes_bilinear",
    "threshold_class_scores",
    "valid_box_mask",
    "valid_cams",
]
