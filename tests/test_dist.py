import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from afa.engine import dist as dist_module
from afa.engine.dist import (
    DistributedContext,
    all_reduce_sum_,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
)
from afa.metrics import ConfusionMatrix, MultiLabelCounts

NUM_CLASSES = 5
NUM_BATCHES = 5  # odd: the ranks see different numbers of batches


def make_data():
    """The whole evaluation set, identical in every process."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(NUM_BATCHES):
        target = torch.randint(0, NUM_CLASSES, (2, 9, 11), generator=generator)
        target[torch.rand(target.shape, generator=generator) < 0.1] = 255
        prediction = torch.randint(0, NUM_CLASSES, target.shape, generator=generator)
        logits = torch.randn(2, NUM_CLASSES - 1, generator=generator)
        labels = (torch.rand(2, NUM_CLASSES - 1, generator=generator) < 0.4).long()
        batches.append((prediction, target, logits, labels))
    return batches


def accumulate(batches):
    matrix, counts = ConfusionMatrix(NUM_CLASSES), MultiLabelCounts(NUM_CLASSES - 1)
    for prediction, target, logits, labels in batches:
        matrix.update(prediction, target)
        counts.update(logits, labels)
    return matrix, counts


def worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    context = init_distributed(device="cpu")
    try:
        assert context == DistributedContext(rank=rank, local_rank=rank, world_size=world_size,
                                             device=torch.device("cpu"))
        assert context.is_main == (rank == 0) and dist_module.is_distributed()
        batches = make_data()
        shard_matrix, shard_counts = accumulate(batches[rank::world_size])
        shard_matrix.reduce_(all_reduce_sum_)
        shard_counts.reduce_(all_reduce_sum_)
        full_matrix, full_counts = accumulate(batches)  # one process seeing everything
        assert torch.equal(shard_matrix.matrix, full_matrix.matrix)
        assert shard_matrix.compute() == full_matrix.compute()
        reduced, full = shard_counts.compute(), full_counts.compute()
        assert reduced.pop("sample_f1") == pytest.approx(full.pop("sample_f1"))
        assert str(reduced) == str(full)  # str: NaN entries compare equal

        assert all_reduce_sum_(torch.tensor([rank + 1.0])).item() == sum(range(1, world_size + 1))
        assert broadcast_object({"run_id": f"from-{rank}"}) == {"run_id": "from-0"}
        barrier()
    finally:
        cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_reduction_matches_one_process():
    # spawn re-imports this module in the children, so they need no fork-unsafe state
    mp.spawn(worker, args=(2, free_port()), nprocs=2, join=True)


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed(device="auto")
    expected_device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert context == DistributedContext(device=expected_device)
    assert context.is_main and context.world_size == 1
    assert not dist_module.is_distributed()
    tensor = torch.tensor([2.0])
    assert all_reduce_sum_(tensor) is tensor and tensor.item() == 2.0
    assert broadcast_object("mine") == "mine"
    barrier()
    cleanup()
    assert init_distributed(device="cpu").device == torch.device("cpu")


def test_partial_torchrun_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="LOCAL_RANK, WORLD_SIZE"):
        init_distributed()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_request_without_cuda_is_an_error(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="device=cpu or auto"):
        init_distributed(device="cuda")
