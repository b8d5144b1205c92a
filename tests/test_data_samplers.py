"""Resumable sharded training order and same-size evaluation batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from afa.data import ResumableSampler, SameSizeBatchSampler, SyntheticTrainDataset, build_loader
from afa.data.datasets import FullImageEvalDataset
from tests.fixtures import write_voc_fixture
from afa.data.layouts import voc_index


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_same_seed_same_stream_different_seed_different_stream():
    first = take(iter(ResumableSampler(10, seed=3)), 25)
    again = take(iter(ResumableSampler(10, seed=3)), 25)
    other = take(iter(ResumableSampler(10, seed=4)), 25)
    assert first == again and first != other
    epoch0 = [index for index, _ in first[:10]]
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10))
    assert [index for index, _ in first[10:20]] != epoch0  # a new permutation per epoch
    assert len({seed for _, seed in first}) == 25  # every sample gets its own seed


def test_ranks_get_disjoint_shards_covering_the_epoch():
    shards = [take(iter(ResumableSampler(20, seed=1, rank=rank, world_size=3)), 6) for rank in range(3)]
    indices = [index for shard in shards for index, _ in shard]
    assert len(indices) == 18 and len(set(indices)) == 18  # 20 // 3 each, no overlap
    single = [index for index, _ in take(iter(ResumableSampler(20, seed=1)), 20)]
    assert set(indices) == set(single[:18])


def test_epoch_mode_stops_and_continues_with_the_next_epoch():
    sampler = ResumableSampler(7, seed=0, endless=False)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(second) == len(sampler) == 7
    assert first != second and sampler.state_dict()["epoch"] == 2


def test_state_round_trip_and_advance():
    reference = take(iter(ResumableSampler(9, seed=2)), 30)
    sampler = ResumableSampler(9, seed=2)
    iterator = iter(sampler)
    take(iterator, 13)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 4)
    restored = ResumableSampler(9, seed=2)
    restored.load_state_dict(state)
    assert take(iter(restored), 17) == reference[13:]
    skipped = ResumableSampler(9, seed=2)
    skipped.advance(20)
    assert take(iter(skipped), 10) == reference[20:]


def test_state_with_consumed_count_ignores_prefetch():
    sampler = ResumableSampler(9, seed=2)
    sampler.load_state_dict({"epoch": 1, "position": 2})
    iterator = iter(sampler)
    take(iterator, 15)  # the loader prefetched more than the loop consumed
    state = sampler.state_dict(num_consumed=10)
    assert (state["epoch"], state["position"]) == (2, 3)


def test_mismatched_state_is_refused():
    with pytest.raises(ValueError, match="seed=1 but this sampler has 2"):
        ResumableSampler(9, seed=2).load_state_dict({"epoch": 0, "position": 0, "seed": 1})
    with pytest.raises(ValueError, match="world_size"):
        ResumableSampler(9, world_size=3).load_state_dict({"epoch": 0, "position": 0, "world_size": 1})


def batches_equal(left, right):
    return left["name"] == right["name"] and torch.equal(left["image"], right["image"]) and torch.equal(
        left["valid_box"], right["valid_box"]) and torch.equal(left["labels"], right["labels"])


def test_interrupted_loader_resumes_with_identical_batches():
    dataset = SyntheticTrainDataset(seed=1, length=18, crop_size=32)
    reference_loader = DataLoader(dataset, batch_size=4, sampler=ResumableSampler(18, seed=7), num_workers=0)
    reference = take(iter(reference_loader), 9)  # crosses two epoch boundaries

    sampler = ResumableSampler(18, seed=7)
    interrupted = iter(build_loader(dataset, batch_size=4, sampler=sampler, num_workers=2, prefetch_factor=2))
    seen = take(interrupted, 4)
    state = sampler.state_dict(num_consumed=4 * 4)  # workers prefetched further than this
    del interrupted

    resumed_sampler = ResumableSampler(18, seed=7)
    resumed_sampler.load_state_dict(state)
    resumed = take(iter(build_loader(dataset, batch_size=4, sampler=resumed_sampler, num_workers=2)), 5)
    for got, want in zip(seen + resumed, reference):
        assert batches_equal(got, want)


def test_same_size_batches_group_and_shard():
    sizes = [(2, 3), (4, 5), (2, 3), (2, 3), (4, 5), (6, 6)]
    sampler = SameSizeBatchSampler(sizes, batch_size=2)
    assert list(sampler) == [[0, 2], [3], [1, 4], [5]]
    shards = [list(SameSizeBatchSampler(sizes, batch_size=2, rank=rank, world_size=2)) for rank in range(2)]
    assert shards == [[[0, 2], [1, 4]], [[3], [5]]]
    flat = sorted(index for shard in shards for batch in shard for index in batch)
    assert flat == list(range(6))


def test_eval_batches_of_same_size_images_equal_batch_one(tmp_path):
    root = write_voc_fixture(tmp_path / "a", {"s1": [1], "s2": [2], "s3": [3]}, size=(20, 30))
    write_voc_fixture(tmp_path / "a", {"t1": [4], "t2": [5]}, size=(24, 16))
    (root / "ImageSets" / "Segmentation" / "all.txt").write_text("s1\nt1\ns2\nt2\ns3\n")
    import json
    (root / "cls_labels.json").write_text(json.dumps({"s1": [1], "s2": [2], "s3": [3], "t1": [4], "t2": [5]}))
    index = voc_index(root, "all", labels_file=root / "cls_labels.json", image_ext=".png", with_masks=True)
    dataset = FullImageEvalDataset(index)
    batch_sampler = SameSizeBatchSampler(dataset, batch_size=4)
    assert list(batch_sampler) == [[0, 2, 4], [1, 3]]
    loader = DataLoader(dataset, batch_sampler=batch_sampler)
    for batch, members in zip(loader, batch_sampler):
        assert batch["image"].shape[0] == len(members)
        for row, position in enumerate(members):
            single = dataset[position]
            assert torch.equal(batch["image"][row], single["image"]) and torch.equal(batch["mask"][row], single["mask"])
    assert np.array_equal(np.array(dataset.image_sizes), [(20, 30), (24, 16), (20, 30), (24, 16), (20, 30)])
