"""Loader workers start safely after the parent has used its thread pools (issue: suite hang)."""

import time

import cv2
import numpy as np
import pytest
import torch

from afa.data import ResumableSampler, SyntheticTrainDataset, build_loader


@pytest.mark.timeout(60)
def test_two_workers_after_parent_thread_pools_yield_quickly():
    # Touch torch's OpenMP pool and OpenCV's pool first: a forked worker inheriting them hung.
    torch.randn(256, 256) @ torch.randn(256, 256)
    cv2.resize(np.zeros((256, 256, 3), np.uint8), (512, 512))
    dataset = SyntheticTrainDataset(seed=3, length=16, crop_size=32)
    start = time.perf_counter()
    batches = list(build_loader(dataset, batch_size=4, num_workers=2, persistent_workers=False))
    elapsed = time.perf_counter() - start
    assert len(batches) == 4 and batches[0]["image"].shape == (4, 3, 32, 32)
    assert elapsed < 20, f"2 workers took {elapsed:.1f} s to deliver 4 batches"


def test_workers_deliver_the_same_batches_as_the_main_process():
    dataset = SyntheticTrainDataset(seed=3, length=8, crop_size=32)
    # the sampler hands out each sample's augmentation seed, so workers cannot change it
    inline = build_loader(dataset, batch_size=4, sampler=ResumableSampler(8, seed=1))
    workers = build_loader(dataset, batch_size=4, sampler=ResumableSampler(8, seed=1), num_workers=2)
    for a, b, _ in zip(inline, workers, range(3)):  # the sampler is endless
        assert a["name"] == b["name"] and torch.equal(a["image"], b["image"])
