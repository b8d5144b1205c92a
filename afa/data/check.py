"""Validate a whole dataset: every image decodes, every mask matches, every label is known.

Runs the same per-file checks as sample loading (:mod:`afa.data.readers`) over all images
and collects the problems instead of stopping at the first, plus per-class counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from afa.data.datasets import FullImageEvalDataset
from afa.data.readers import DatasetError

_MAX_LISTED = 50


@dataclass
class CheckReport:
    """Counts and problems of one dataset.

    Attributes:
        description: which dataset was checked.
        class_names: K names, background first.
        num_images: images in the split.
        labelled_images: (K,) images whose image-level labels include each class
            (entry 0: images with no foreground label).
        mask_images: (K,) images whose mask contains each class (None without masks).
        mask_pixels: (K + 1,) pixels per class, last entry the ignore value (None without masks).
        problems: one line per problem (file and what is wrong).
        label_mask_disagreements: names whose labels differ from the classes in their mask
            (a note, not a problem: VOC's XML labels differ from its masks on 818 images).
        with_labels: False when the split was checked without image-level labels
            (``--unlabelled``): the labelled column is then shown as "-".
    """

    description: str
    class_names: tuple[str, ...]
    num_images: int
    labelled_images: np.ndarray
    mask_images: np.ndarray | None
    mask_pixels: np.ndarray | None
    problems: list[str] = field(default_factory=list)
    label_mask_disagreements: list[str] = field(default_factory=list)
    with_labels: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A human-readable summary."""
        lines = [f"dataset: {self.description}", f"images: {self.num_images}"]
        if not self.with_labels:
            lines.append("image-level labels: none (unlabelled split)")
        header = f"{'class':<16} {'labelled':>9}"
        if self.mask_images is not None:
            header += f" {'in mask':>8} {'pixels %':>9}"
        lines.append(header)
        total_pixels = max(1, int(self.mask_pixels.sum())) if self.mask_pixels is not None else 1
        percent = None if self.mask_pixels is None else 100.0 * self.mask_pixels / total_pixels
        for index, name in enumerate(self.class_names):
            labelled = "-" if index == 0 or not self.with_labels else str(int(self.labelled_images[index]))
            row = f"{index:>2} {name:<13} {labelled:>9}"
            if self.mask_images is not None:
                row += f" {int(self.mask_images[index]):>8} {percent[index]:>9.2f}"
            lines.append(row)
        if self.mask_pixels is not None:
            lines.append(f"   {'ignore (255)':<13} {'':>9} {'':>8} {percent[-1]:>9.2f}")
        if self.label_mask_disagreements:
            examples = ", ".join(self.label_mask_disagreements[:5])
            lines.append(
                f"note: labels differ from the mask's classes on {len(self.label_mask_disagreements)} "
                f"images (e.g. {examples})"
            )
        lines.append(f"problems: {len(self.problems)}")
        lines.extend(f"  - {problem}" for problem in self.problems[:_MAX_LISTED])
        if len(self.problems) > _MAX_LISTED:
            lines.append(f"  … and {len(self.problems) - _MAX_LISTED} more")
        return "\n".join(lines)


def check_dataset(dataset: FullImageEvalDataset, show_progress: bool = True) -> CheckReport:
    """Load every image (and mask) of an evaluation dataset, collecting problems.

    Args:
        dataset: its index built with ``allow_background_only=True`` so that images without
            labels are reported here instead of failing construction.
        show_progress: show a tqdm bar.
    """
    num_classes = dataset.num_classes
    labelled = np.zeros(num_classes + 1, np.int64)
    mask_images = np.zeros(num_classes + 1, np.int64) if dataset.with_masks else None
    mask_pixels = np.zeros(num_classes + 2, np.int64) if dataset.with_masks else None
    report = CheckReport(
        dataset.index.description, dataset.class_names, len(dataset), labelled, mask_images, mask_pixels,
        with_labels=dataset.with_labels,
    )
    for position in tqdm(range(len(dataset)), desc="checking", disable=not show_progress):
        name = dataset.names[position]
        classes = dataset.image_classes(position)
        if dataset.with_labels:
            labelled[list(classes) if classes else [0]] += 1
            if not classes:
                report.problems.append(f"{name}: no foreground class in the image labels")
        try:
            image_hw = dataset.load_image(position).shape[:2]
        except (FileNotFoundError, DatasetError) as error:
            report.problems.append(str(error))
            continue
        if not dataset.with_masks:
            continue
        try:
            mask = dataset.load_mask(position, image_hw)
        except (FileNotFoundError, DatasetError) as error:
            report.problems.append(str(error))
            continue
        counts = np.bincount(mask.ravel(), minlength=256)
        mask_pixels[:-1] += counts[: num_classes + 1]
        mask_pixels[-1] += counts[dataset.ignore_index]
        present = np.flatnonzero(counts[: num_classes + 1])
        mask_images[present] += 1
        if dataset.with_labels and tuple(int(c) for c in present if c > 0) != tuple(classes):
            report.label_mask_disagreements.append(name)
    return report
