"""Data-parallel reductions through shared memory, for ranks on one machine's CPUs.

PyTorch's CPU backend (gloo) sends every all-reduce through TCP sockets and its own
threads, which on a machine whose cores all train wait for CPU time. Ranks on one machine
can instead write their tensors into one shared block and each add up all of them (in
rank order, so every rank gets the same bits): a copy and a sum, no sockets, no threads.
On the 2 cores, QM9 training of SchNet 128/6 on two one-thread processes ran 8.0-10.0
optimizer steps per second this way against 7.4-8.1 through gloo and 6.6-7.0 in one
process, in two sittings (``docs/benchmarks.md``, "Data parallelism on the 2 cores").

:class:`SharedMemoryReducer` sums float32 or float64 tensors up to a fixed size.
:class:`SharedMemoryDDPStrategy` is Lightning's DDP strategy with the gradient all-reduce
(a DDP communication hook) and the small per-step collectives of training (the global
batch counts of the loss, the budget's stop decision, the learning rate) on it; gloo stays
for everything else (setup, barriers, metrics, Python objects). ``atomlens train
--devices N`` on the CPU uses it unless ``--strategy`` says otherwise.
"""

from __future__ import annotations

import mmap
import os
import platform
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

#: bytes between two ranks' sequence counters (one cache line each)
_LINE = 64

#: The protocol needs stores seen in program order by other cores and loads not moved
#: before an earlier load (x86-64's total store order); ARM64 and others may reorder them
#: without fences, which Python cannot place. Elsewhere the strategy uses gloo.
SUPPORTED = sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")


class SharedMemoryReducer:
    """Sum-all-reduce of float32 or float64 tensors among the ``world`` ranks of one machine.

    Every rank makes one with the same ``path`` and ``capacity`` (float32 elements; float64
    tensors of half as many). The file must exist: :meth:`create` makes it, and
    :func:`connect` removes its name once every rank has mapped it. A call is
    collective: every rank calls :meth:`all_reduce_` the same number of times, in the same
    order, with tensors of the same size. Per call each rank copies its tensor into its
    slot, marks its counter, waits for the others' marks, and sums the slots in rank order.
    Before a rank overwrites its slot in the next call it waits until every rank has read
    the previous call's slots (a second mark). Each counter has one writer, an aligned
    8-byte store seen whole; x86-64 keeps a rank's stores (slot, then mark) and loads (mark,
    then slots) in program order for the other cores, which this relies on: Linux on
    x86-64 only (:data:`SUPPORTED`).
    """

    def __init__(self, path: str, rank: int, world: int, capacity: int, timeout_s: float = 1800.0):
        capacity = self.rounded(capacity)
        self.rank, self.world, self.capacity = rank, world, capacity
        self.timeout_s = timeout_s
        size = self.nbytes(world, capacity)
        with open(path, "r+b") as handle:
            self._map = mmap.mmap(handle.fileno(), size)
        buffer = np.frombuffer(self._map, dtype=np.uint8)
        self._marks = buffer[: world * _LINE].view(np.int64)[:: _LINE // 8]
        # (world, 4 capacity) bytes: float32 tensors of up to ``capacity`` elements, or
        # float64 ones of half as many
        self._slots = torch.from_numpy(buffer[world * _LINE :].reshape(world, 4 * capacity))
        self._calls = 0

    @staticmethod
    def rounded(capacity: int) -> int:
        """Capacities are whole cache lines of float32 (so slots are aligned, and hold
        float64 too)."""
        return -(-max(int(capacity), 1) // 16) * 16

    @classmethod
    def nbytes(cls, world: int, capacity: int) -> int:
        return world * _LINE + world * cls.rounded(capacity) * 4

    @classmethod
    def create(cls, world: int, capacity: int) -> str:
        """A zeroed shared file of the right size (in /dev/shm where there is one): its path.

        Its memory is reserved now (``posix_fallocate``): a sparse file on a full tmpfs (a
        container's 64 MB /dev/shm) would kill the first rank that writes with SIGBUS."""
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        handle, path = tempfile.mkstemp(prefix="atomlens-reduce-", dir=folder)
        size = cls.nbytes(world, capacity)
        try:
            os.posix_fallocate(handle, 0, size)
        except OSError as error:
            os.close(handle)
            os.unlink(path)
            raise OSError(
                f"no room for a {size / 2**20:.1f} MB shared-memory block in "
                f"{folder or tempfile.gettempdir()} ({error.strerror}); free or enlarge it "
                "(docker run --shm-size), or train with --strategy ddp_spawn (gloo)"
            ) from error
        os.close(handle)
        return path

    def _wait(self, mark: int) -> None:
        spins, start = 0, None
        while int(self._marks.min()) < mark:
            spins += 1
            if spins < 200:
                os.sched_yield()
                continue
            # a rank far behind (a slow batch): stop taking the CPU from it
            time.sleep(50e-6)
            if start is None:
                start = time.monotonic()
            elif time.monotonic() - start > self.timeout_s:
                late = [r for r in range(self.world) if int(self._marks[r]) < mark]
                raise TimeoutError(
                    f"shared-memory all-reduce: rank(s) {late} did not arrive within "
                    f"{self.timeout_s:.0f} s (stopped or killed?)"
                )

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether :meth:`all_reduce_` takes ``tensor``."""
        return (
            tensor.dtype in (torch.float32, torch.float64)
            and tensor.device.type == "cpu"
            and tensor.is_contiguous()
            and tensor.numel() * tensor.element_size() <= 4 * self.capacity
        )

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` (float32 or float64, contiguous, CPU) by its sum over the ranks."""
        return self._exchange(tensor, None)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Replace ``tensor`` by rank ``src``'s (a collective call like :meth:`all_reduce_`;
        the same protocol, each rank copying ``src``'s slot: every bit, -0.0 included)."""
        if not 0 <= src < self.world:
            raise ValueError(f"no rank {src} among {self.world}")
        return self._exchange(tensor, src)

    def _exchange(self, tensor: torch.Tensor, src: int | None) -> torch.Tensor:
        if not self.fits(tensor):
            raise ValueError(
                f"shared-memory all-reduce takes contiguous float32/float64 CPU tensors of up "
                f"to {4 * self.capacity} bytes, not {tensor.dtype} {tuple(tensor.shape)} on "
                f"{tensor.device}"
            )
        n = tensor.numel()
        slots = self._slots.view(tensor.dtype)[:, :n]
        call = self._calls = self._calls + 1
        self._wait(2 * call - 2)  # every rank has read the previous call's slots
        slots[self.rank].copy_(tensor.view(-1))
        self._marks[self.rank] = 2 * call - 1
        self._wait(2 * call - 1)  # every rank's slot holds this call's tensor
        if src is None:
            torch.sum(slots, dim=0, out=tensor.view(-1))  # rank order: the same bits everywhere
        else:
            tensor.view(-1).copy_(slots[src])
        self._marks[self.rank] = 2 * call
        return tensor

    def close(self) -> None:
        self._slots = self._marks = None
        try:
            self._map.close()
        except BufferError:  # a view still alive (an exception's traceback): unmapped when freed
            pass


def connect(capacity: int, group=None, timeout_s: float = 1800.0) -> SharedMemoryReducer:
    """A reducer for the ranks of the initialised process group (collective, via gloo).

    The ranks must share one machine's memory (one node): with ranks on several nodes the
    file would not be shared, so that is refused; so is a machine outside :data:`SUPPORTED`."""
    if not SUPPORTED:
        raise RuntimeError(
            f"shared-memory reductions need Linux on x86-64, not {sys.platform} on "
            f"{platform.machine()}"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    box = [
        (SharedMemoryReducer.create(world, capacity), socket.gethostname()) if rank == 0 else None
    ]
    dist.broadcast_object_list(box, src=0, group=group)
    path, host = box[0]
    try:
        everywhere = [None] * world
        here = host == socket.gethostname() and os.path.exists(path)
        dist.all_gather_object(everywhere, here, group=group)
        if not all(everywhere):
            raise RuntimeError(
                "shared-memory reductions need every rank on one machine; use the ddp strategy"
            )
        reducer = SharedMemoryReducer(path, rank, world, capacity, timeout_s)
        dist.barrier(group)  # every rank has mapped it: the name can go
    finally:
        if rank == 0 and os.path.exists(path):
            os.unlink(path)
    return reducer


def gradient_hook(reducer: SharedMemoryReducer, bucket):
    """DDP communication hook: the bucket's gradients averaged over the ranks, as a done
    ``torch.futures.Future`` (no return annotation: DDP checks it, and this module's
    annotations are strings). Buckets the block does not take (half precision) go through
    DDP's default all-reduce instead; every rank has the same buckets, so all take one path."""
    tensor = bucket.buffer()
    if not reducer.fits(tensor):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(None, bucket)
    reducer.all_reduce_(tensor).div_(reducer.world)
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(tensor)
    return future


class SharedMemoryDDPStrategy(DDPStrategy):
    """Lightning's DDP for processes on one machine's CPUs, reducing through shared memory.

    The gradient all-reduce (a DDP communication hook, which Lightning itself registers on
    GPUs only), :meth:`reduce` of float32/float64 tensors (logged values with
    ``sync_dist``), :meth:`broadcast` of numbers and :meth:`reduce_boolean_decision` (the
    budget's stop, checkpoint and early-stopping decisions) go through one
    :class:`SharedMemoryReducer`; the rest (setup, barriers, torchmetrics' states, Python
    objects) through the process group (gloo). DDP broadcasts no module buffers, neither at
    the start nor every step: atomlens models keep their statistics in buffers, computed
    the same on every rank before the processes start and fixed during training
    (``broadcast_buffers=True`` restores DDP's default). Outside Linux on x86-64
    (:data:`SUPPORTED`) it warns and is plain DDP with gloo. Registered as the strategy
    names ``ddp_spawn_shm`` and ``ddp_shm``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("broadcast_buffers", False)
        super().__init__(*args, **kwargs)
        self._reducer: SharedMemoryReducer | None = None

    def configure_ddp(self) -> None:
        if self.root_device.type != "cpu":
            raise RuntimeError(
                "the shared-memory DDP strategy reduces CPU tensors; use ddp on a GPU"
            )
        if not SUPPORTED:
            warnings.warn(
                "shared-memory reductions need Linux on x86-64: reducing through gloo",
                stacklevel=2,
            )
            super().configure_ddp()
            return
        timeout = self._timeout.total_seconds() if isinstance(self._timeout, timedelta) else 1800.0
        self._reducer = connect(block_capacity(self.model.parameters()), timeout_s=timeout)
        super().configure_ddp()
        self.model.register_comm_hook(self._reducer, gradient_hook)

    def _shared(self, tensor, group) -> bool:
        return (
            self._reducer is not None
            and group is None
            and isinstance(tensor, torch.Tensor)
            and self._reducer.fits(tensor)
        )

    def reduce(self, tensor, group=None, reduce_op="mean"):
        op = str(reduce_op).lower().split(".")[-1]
        if not self._shared(tensor, group) or op not in ("sum", "mean", "avg"):
            return super().reduce(tensor, group, reduce_op)
        result = self._reducer.all_reduce_(tensor.detach().clone())
        return result / self.world_size if op in ("mean", "avg") else result

    def broadcast(self, obj, src: int = 0):
        """``src``'s ``obj``. Every rank makes one shared-memory broadcast of ``src``'s
        [kind, value]: a float (every bit), an int of at most 2^53, or kind 0, anything else,
        which then goes through gloo on every rank. What the other ranks pass does not
        matter, as in Lightning's broadcast."""
        if self._reducer is None:
            return super().broadcast(obj, src)
        message = torch.zeros(2, dtype=torch.float64)
        if self.global_rank == src:
            if isinstance(obj, float):
                message[0], message[1] = 1.0, obj
            elif isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) <= 2**53:
                message[0], message[1] = 2.0, float(obj)
            else:
                message[0] = 0.0
        kind, value = self._reducer.broadcast_(message, src).tolist()
        if kind == 1.0:
            return value
        if kind == 2.0:
            return int(value)
        return super().broadcast(obj, src)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self._reducer is None:
            return super().reduce_boolean_decision(decision, all)
        votes = self._reducer.all_reduce_(
            torch.tensor([float(bool(decision))], dtype=torch.float64)
        )
        return bool(votes.item() == self.world_size) if all else bool(votes.item() > 0)

    def teardown(self) -> None:
        super().teardown()
        if self._reducer is not None:
            self._reducer.close()
            self._reducer = None

    @classmethod
    def register_strategies(cls, registry) -> None:
        for name, start_method in (("ddp_spawn_shm", "spawn"), ("ddp_shm", "popen")):
            registry.register(
                name,
                cls,
                description=f"DDP on one machine's CPUs, reductions in shared memory ('{start_method}')",
                start_method=start_method,
            )


def block_capacity(parameters) -> int:
    """float32 elements of a block that holds every trainable parameter's gradient (DDP's
    largest possible bucket) in the parameters' own precision; 16 at least."""
    nbytes = sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)
    return max(-(-nbytes // 4), 16)


def register() -> None:
    """Make ``ddp_spawn_shm`` and ``ddp_shm`` Lightning strategy names (idempotent)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "ddp_spawn_shm" not in StrategyRegistry:
        SharedMemoryDDPStrategy.register_strategies(StrategyRegistry)
