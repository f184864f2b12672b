"""Data-parallel reductions through shared memory (``atomlens.training.shared_memory``)."""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time

import numpy as np
import pytest
import torch

from atomlens.training.shared_memory import SharedMemoryReducer

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="shared memory tests on Linux")

#: (elements, dtype) of the successive all-reduces of the multi-process test: sizes that
#: change between calls, both dtypes, one call that fills the whole block
CALLS = [(5, torch.float32), (1, torch.float64), (320, torch.float32)]
CALLS += [(160, torch.float64), (7, torch.float32)] * 20 + [(320, torch.float32)]
CAPACITY = 320


def _tensor(call: int, rank: int) -> torch.Tensor:
    n, dtype = CALLS[call]
    generator = torch.Generator().manual_seed(1000 * call + rank)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)


def _broadcast_from(call: int) -> int | None:
    """Every fourth call is a broadcast, from rank 0, 1, 2 in turn; the others all-reduces."""
    return (call // 4) % 3 if call % 4 == 3 else None


def _rank(rank: int, world: int, path: str, queue) -> None:
    torch.set_num_threads(1)
    reducer = SharedMemoryReducer(path, rank, world, CAPACITY, timeout_s=60.0)
    rng = np.random.default_rng(rank)
    results = []
    for call in range(len(CALLS)):
        if rng.random() < 0.3:  # ranks arrive in any order, one sometimes far behind
            time.sleep(rng.uniform(0.0, 0.02))
        tensor = _tensor(call, rank)
        if _broadcast_from(call) is None:
            assert reducer.all_reduce_(tensor) is tensor  # in place
        else:
            assert reducer.broadcast_(tensor, _broadcast_from(call)) is tensor
        results.append(tensor.numpy().copy())
    queue.put((rank, results))


def test_ranks_get_the_same_sums_call_after_call(tmp_path):
    """Three processes all-reduce (and now and then broadcast) a sequence of float32 and
    float64 tensors of changing sizes, arriving out of step: every call gives every rank the
    sum (or the source's tensor), the same bits on every
    rank (the slots are added in rank order), and no call reads a slot that a rank ahead
    already overwrote with the next call's tensor."""
    world = 3
    path = SharedMemoryReducer.create(world, CAPACITY)
    try:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        processes = [
            context.Process(target=_rank, args=(rank, world, path, queue)) for rank in range(world)
        ]
        for process in processes:
            process.start()
        results = dict(queue.get(timeout=120) for _ in range(world))
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():  # a failed rank: the others would wait for their timeout
                process.kill()
        os.unlink(path)
    numpy_dtype = {torch.float32: np.float32, torch.float64: np.float64}
    for call, (n, dtype) in enumerate(CALLS):
        src = _broadcast_from(call)
        if src is None:
            expected = sum(_tensor(call, rank).double() for rank in range(world))
        else:
            expected = _tensor(call, src).double()
        for rank in range(world):
            assert results[rank][call].dtype == numpy_dtype[dtype]
            assert results[rank][call].shape == (n,)
            np.testing.assert_array_equal(results[rank][call], results[0][call])  # same bits
        tolerance = 1e-6 if dtype == torch.float32 else 1e-13
        np.testing.assert_allclose(
            results[0][call], expected.numpy(), rtol=tolerance, atol=tolerance
        )


def test_one_rank_reduces_to_itself_and_refuses_what_does_not_fit(tmp_path):
    path = SharedMemoryReducer.create(1, 40)
    try:
        reducer = SharedMemoryReducer(path, 0, 1, 40)
        assert reducer.capacity == 48  # whole cache lines of float32
        assert os.path.getsize(path) == SharedMemoryReducer.nbytes(1, 40) == 64 + 48 * 4
        values = torch.arange(48, dtype=torch.float32)
        torch.testing.assert_close(reducer.all_reduce_(values.clone()), values, rtol=0, atol=0)
        doubles = torch.linspace(-1, 1, 24, dtype=torch.float64)  # 24 doubles = 48 floats
        torch.testing.assert_close(reducer.all_reduce_(doubles.clone()), doubles, rtol=0, atol=0)
        torch.testing.assert_close(reducer.broadcast_(values.clone(), 0), values, rtol=0, atol=0)
        with pytest.raises(ValueError, match="no rank 1 among 1"):
            reducer.broadcast_(values, 1)
        for bad in (
            torch.zeros(49),  # more than the block holds
            torch.zeros(25, dtype=torch.float64),
            torch.zeros(4, dtype=torch.int64),  # not a float tensor
            torch.zeros(4, 4)[:, 0],  # not contiguous
        ):
            assert not reducer.fits(bad)
            with pytest.raises(ValueError, match="float32/float64 CPU tensors"):
                reducer.all_reduce_(bad)
        reducer.close()
    finally:
        os.unlink(path)


def test_a_rank_that_never_arrives_times_out_with_its_number():
    path = SharedMemoryReducer.create(2, 16)
    try:
        reducer = SharedMemoryReducer(path, 0, 2, 16, timeout_s=0.3)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] did not arrive") as caught:
            reducer.all_reduce_(torch.ones(4))
        assert 0.3 <= time.monotonic() - start < 5.0
        # Lightning tears down while the exception (and its frames' views of the block)
        # is alive: closing must not raise on top of it
        assert caught.value.__traceback__ is not None
        reducer.close()
    finally:
        os.unlink(path)


def _connect_rank(rank: int, world: int, init: str, queue) -> None:
    import torch.distributed as dist

    from atomlens.training.shared_memory import connect

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    reducer = connect(100)
    total = reducer.all_reduce_(torch.full((100,), float(rank + 1)))
    queue.put((rank, float(total[0]), float(total[-1])))
    reducer.close()
    dist.destroy_process_group()


def test_connect_maps_one_block_for_the_process_group_and_removes_its_name(tmp_path):
    """``connect`` (gloo) gives every rank the same block; once all have mapped it, its file
    name is gone, so a killed run leaves nothing behind in /dev/shm."""
    world = 2
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [
        context.Process(target=_connect_rank, args=(rank, world, init, queue))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    results = {r: rest for r, *rest in (queue.get(timeout=120) for _ in range(world))}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for rank in range(world):
        assert results[rank] == [3.0, 3.0]  # 1 + 2
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not [n for n in after - before if n.startswith("atomlens-reduce")]


def test_several_cpu_processes_default_to_shared_memory_reductions(monkeypatch):
    from lightning.pytorch.strategies import StrategyRegistry

    from atomlens.training import TrainConfig, shared_memory
    from atomlens.training.shared_memory import SharedMemoryDDPStrategy
    from atomlens.training.train import resolved_strategy

    def config(**kw):
        return TrainConfig.from_dict({"target": "U0", **kw})

    assert resolved_strategy(config(devices=2, device="cpu")) == "ddp_spawn_shm"
    assert resolved_strategy(config(devices=1, device="cpu")) == "auto"
    assert resolved_strategy(config(devices=2, device="cpu", strategy="ddp")) == "ddp"
    assert resolved_strategy(config(devices=2, device="cpu", num_nodes=2)) == "auto"
    assert resolved_strategy(config(devices=2, device="gpu")) == "auto"
    monkeypatch.setattr(shared_memory, "SUPPORTED", False)  # e.g. ARM64: no fences from Python
    assert resolved_strategy(config(devices=2, device="cpu")) == "auto"
    for name, start in (("ddp_spawn_shm", "spawn"), ("ddp_shm", "popen")):
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, SharedMemoryDDPStrategy)
        assert strategy._start_method == start
        assert strategy._ddp_kwargs["broadcast_buffers"] is False


def _in_two_threads(function):
    """``function(rank, reducer)`` run by two threads, ranks 0 and 1 of one shared block."""
    import threading

    path = SharedMemoryReducer.create(2, 64)
    results, errors = {}, []
    try:
        reducers = [SharedMemoryReducer(path, rank, 2, 64, timeout_s=30.0) for rank in (0, 1)]

        def run(rank):
            try:
                results[rank] = function(rank, reducers[rank])
            except Exception as error:  # noqa: BLE001 (reported below)
                errors.append(error)

        threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        os.unlink(path)
    assert not errors, errors
    return results


def test_the_gradient_hook_averages_the_ranks_buckets():
    """DDP's gradient is the ranks' mean (Adam would hide a sum: its steps ignore scale)."""
    from atomlens.training.shared_memory import gradient_hook

    class Bucket:
        def __init__(self, values):
            self.values = torch.tensor(values)

        def buffer(self):
            return self.values

    results = _in_two_threads(
        lambda rank, reducer: (
            gradient_hook(reducer, Bucket([1.0, 2.0] if rank else [3.0, 6.0])).wait().tolist()
        )
    )
    assert results == {0: [2.0, 4.0], 1: [2.0, 4.0]}


def test_half_precision_buckets_take_ddps_own_all_reduce(monkeypatch):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from atomlens.training.shared_memory import block_capacity, gradient_hook

    calls = []
    monkeypatch.setattr(default_hooks, "allreduce_hook", lambda group, bucket: calls.append(bucket))

    class Bucket:
        def buffer(self):
            return torch.ones(4, dtype=torch.bfloat16)

    path = SharedMemoryReducer.create(1, 16)
    try:
        reducer = SharedMemoryReducer(path, 0, 1, 16)
        bucket = Bucket()
        gradient_hook(reducer, bucket)
        assert calls == [bucket]
        reducer.close()
    finally:
        os.unlink(path)
    # the block holds every gradient in the parameters' own precision (float64: twice)
    single = [torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(3))]
    double = [torch.nn.Parameter(torch.zeros(100, dtype=torch.float64))]
    frozen = [torch.nn.Parameter(torch.zeros(1000), requires_grad=False)]
    assert block_capacity(single + frozen) == 103
    assert block_capacity(double) == 200
    assert block_capacity(frozen) == 16


def test_the_strategy_reduces_broadcasts_and_votes_through_the_block():
    from lightning.fabric.plugins.environments import LightningEnvironment

    from atomlens.training.shared_memory import SharedMemoryDDPStrategy

    class Environment(LightningEnvironment):
        def set_global_rank(self, rank: int) -> None:
            self._global_rank = rank  # not Lightning's process-wide rank_zero_only.rank

    def steps(rank, reducer):
        strategy = SharedMemoryDDPStrategy(
            parallel_devices=[torch.device("cpu")] * 2, cluster_environment=Environment()
        )
        strategy.cluster_environment.set_world_size(2)
        strategy.cluster_environment.set_global_rank(rank)
        strategy._reducer = reducer
        assert strategy.world_size == 2 and strategy.global_rank == rank
        mine = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
        return (
            strategy.reduce(mine, reduce_op="sum").tolist(),
            strategy.reduce(mine.float(), reduce_op="mean").tolist(),
            mine.tolist(),  # reduce leaves its input alone
            strategy.broadcast(0.1 * (rank + 1), src=0),
            strategy.broadcast(7 + rank, src=1),
            strategy.broadcast(-0.0 if rank == 0 else None, src=0),  # others' objects ignored
            strategy.broadcast(0.5 if rank == 1 else 3, src=1),
            strategy.reduce_boolean_decision(rank == 0, all=False),
            strategy.reduce_boolean_decision(rank == 0, all=True),
            strategy.reduce_boolean_decision(True, all=True),
        )

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank = rank_zero_only.rank
    results = _in_two_threads(steps)
    assert rank_zero_only.rank == rank  # later tests' Lightning runs are still rank 0
    for rank in (0, 1):
        summed, mean, mine, rate, number, zero, half, any_, all_, all_true = results[rank]
        assert summed == [3.0, 10.0] and mean == [1.5, 5.0]
        assert mine == [rank + 1.0, 10.0 * rank]
        assert rate == 0.1 and number == 8 and isinstance(number, int)
        assert zero == 0.0 and math.copysign(1.0, zero) == -1.0  # the sign bit too
        assert half == 0.5 and isinstance(half, float)
        assert any_ is True and all_ is False and all_true is True
