"""Process settings that keep PyTorch on the CPU fast, alone or on a busy machine.

``import atomlens`` changes nothing in the process. The ``atomlens`` command and the
benchmarks call :func:`configure` (notebook users may call it too, first thing)::

    import atomlens.runtime
    atomlens.runtime.configure()          # before importing torch, for the wait policy
    import atomlens, torch

It does four things:

* **Threads from the CPUs this process may use.** ``torch.get_num_threads()`` counts the
  machine's cores, but a process pinned to some cores (``taskset``, Slurm, ``docker
  --cpuset-cpus``) or held to a CPU quota (cgroup ``cpu.max``, ``docker --cpus``, Kubernetes
  limits) gets fewer; more threads than that only queue for the same cores.
  :func:`available_cpus` = min(affinity mask, ceil(quota / period)); with at most
  :data:`ONE_THREAD_UP_TO_CPUS` (2) of them one thread, which was faster than two passive
  threads on 2 CPUs, idle and busy alike (:func:`default_threads`).
* **Passive waiting.** OpenMP threads (torch's intra-op pool and Inductor's compiled kernels,
  both libgomp) spin for a while at every barrier by default (``GOMP_SPINCOUNT`` 300,000
  iterations). Alone on its cores that spinning wins a little; beside other busy processes the
  spinning threads take the CPU from the thread that holds the work, and 2-thread QM9
  training beside two busy processes fell to 19% of its idle speed (54% with
  ``OMP_WAIT_POLICY=PASSIVE``). :func:`prepare_environment` sets ``OMP_WAIT_POLICY=PASSIVE``;
  libgomp reads it once, when it is loaded with torch, so it must run before ``import
  torch`` (a value already in the environment is kept).
* **Subnormal floats flushed to zero** (:func:`flush_subnormals`): arithmetic on them runs
  50-100x slower on x86 CPUs, and SchNet's Gaussians and their gradients produce them.
* **An allocator that keeps freed memory.** glibc's malloc hands blocks of more than a few
  MB back to the kernel when they are freed and maps fresh, zeroed pages the next time:
  every training step then pays a page fault per 4 KB of every large activation (for a QM9
  batch, ~30% of the step). :func:`tune_allocator` keeps freed memory inside the process
  (``mallopt``: blocks of up to 32 MB come from the heap, and the heap is trimmed only above
  1 GB free); ``ATOMLENS_TUNE_MALLOC=0`` leaves the allocator alone. The same effect for any
  process: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``;
  :func:`configure` puts these in the environment too, so that the processes it starts
  (data-parallel training with ``ddp_spawn``, which starts fresh interpreters) get them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import signal
import sys
import warnings
from pathlib import Path

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024**2  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1024**3
TOP_PAD = 64 * 1024**2

#: OpenMP settings made before torch loads (values already in the environment win)
WAIT_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}

_tuned: bool | None = None
#: whether the wait policy reached torch's OpenMP runtime (None: not asked yet)
_wait_applied: bool | None = None


# ----------------------------------------------------------------------------- CPUs and threads
def _read_quota(folder: Path) -> float | None:
    """The CPUs one cgroup folder's own quota grants: ``math.inf`` without one, ``None``
    where the folder holds no quota file (not this hierarchy's, or not mounted)."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return math.inf if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return math.inf if quota <= 0 or period <= 0 else quota / period


def _own_cgroups(root: Path, membership: str) -> list[Path]:
    """The folders under ``root`` of this process's CPU cgroup and its ancestors, innermost
    first, from ``/proc/self/cgroup``'s text ``membership``: the v2 line ``0::/a/b`` and a v1
    line whose controllers include ``cpu`` (mounted at ``root/cpu`` or ``root/cpu,cpuacct``)."""
    folders = []
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            mounts = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            mounts = [root / "cpu", root / "cpu,cpuacct", root / controllers]
        else:
            continue
        relative = Path(path.strip().lstrip("/"))
        for mount in mounts:
            folder = mount / relative
            while True:
                folders.append(folder)
                if folder == mount:
                    break
                folder = folder.parent
    return folders


def cgroup_cpu_limit(
    root: str | os.PathLike = "/sys/fs/cgroup", membership: str | None = None
) -> float | None:
    """CPUs granted by the cgroup CPU quota (quota / period), or ``None`` without a quota.

    Reads cgroup v2 ``cpu.max`` ("max 100000" or "200000 100000") and cgroup v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none) in ``root`` (a container's
    own cgroup), in ``root/cpu`` and ``root/cpu,cpuacct``, and in this process's cgroup and
    each of its ancestors (``membership``: the text of ``/proc/self/cgroup``, read when not
    given), where a systemd ``CPUQuota=``, a batch job's or a parent slice's quota sits. The
    smallest quota found is the limit.
    """
    root = Path(root)
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    candidates = [root, root / "cpu", root / "cpu,cpuacct", *_own_cgroups(root, membership)]
    quotas = [q for q in map(_read_quota, dict.fromkeys(candidates)) if q is not None]
    limit = min(quotas, default=math.inf)
    return None if math.isinf(limit) else limit


def available_cpus(
    affinity: set[int] | None = None,
    quota: float | None = None,
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
) -> int:
    """CPUs this process may run on: min(affinity mask, ceil(cgroup quota)), at least 1.

    ``affinity`` and ``quota`` default to the process's own (``os.sched_getaffinity`` and
    :func:`cgroup_cpu_limit`); give them to ask about another setting.
    """
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except AttributeError:  # macOS, Windows: no affinity masks
            affinity = set(range(os.cpu_count() or 1))
    n = len(affinity) or (os.cpu_count() or 1)
    if quota is None:
        quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


#: with this many available CPUs or fewer, one torch thread by default. Measured on 2 CPUs
#: (docs/runtime.md): with passive waiting, the second thread's wake-up at each of a training
#: step's ~1,000 small operators costs more than it saves, alone (QM9 128/6 training 446-459
#: molecules/s against 589-629 for one thread; the demo's 2 epochs 38.7-42.9 s against
#: 25.7-30.9 s) and beside 2 busy processes (237 against 368)
ONE_THREAD_UP_TO_CPUS = 2


def default_threads(cpus: int | None = None) -> int:
    """Torch threads to use: ``ATOMLENS_THREADS`` if set; else ``OMP_NUM_THREADS`` if set (a
    job scheduler's or MPI launcher's share; its first level), at most the available CPUs;
    else 1 on machines of up to :data:`ONE_THREAD_UP_TO_CPUS` available CPUs, else
    :func:`available_cpus` (``cpus``: ask about that many instead). ``OMP_NUM_THREADS=1``
    on a node of many CPUs had been overridden with all of them."""
    value = os.environ.get("ATOMLENS_THREADS")
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"ATOMLENS_THREADS={value!r}: expected a positive integer")
        return threads
    cpus = available_cpus() if cpus is None else cpus
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) >= 1:  # (an unreadable value is OpenMP's to refuse)
        return min(int(omp), max(cpus, 1))
    return 1 if cpus <= ONE_THREAD_UP_TO_CPUS else cpus


# ----------------------------------------------------------------------------- wait policy
def prepare_environment() -> bool:
    """Set :data:`WAIT_ENVIRONMENT` for the OpenMP runtime torch will load.

    Returns whether the policy applies to torch's OpenMP runtime, which reads the
    environment once, when torch loads: torch not imported yet at the first call, or the
    environment holding the policy already then (the user's own). Values the user put in
    the environment are kept.
    """
    global _wait_applied
    if _wait_applied is None or "torch" not in sys.modules:
        held = all(os.environ.get(key) == value for key, value in WAIT_ENVIRONMENT.items())
        _wait_applied = "torch" not in sys.modules or held
    for key, value in WAIT_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    return _wait_applied


# ----------------------------------------------------------------------------- allocator
def tune_allocator(force: bool = False) -> bool:
    """Set glibc malloc to keep freed memory (see the module doc); True if it was set."""
    global _tuned
    if _tuned is not None and not force:
        return _tuned
    _tuned = False
    if os.environ.get("ATOMLENS_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        and mallopt(_M_TOP_PAD, TOP_PAD)
    )
    return _tuned


def allocator_environment() -> dict[str, str]:
    """The same glibc settings as environment variables, for another process (benchmarks)."""
    return {
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
        "MALLOC_TOP_PAD_": str(TOP_PAD),
    }


# ----------------------------------------------------------------------------- subnormals
def flush_subnormals() -> bool:
    """Treat subnormal floats (below 1.2e-38 in float32) as zero on the CPU (FTZ/DAZ).

    Gaussians far from their centre and the gradients behind them fall into the subnormal
    range, where the CPU computes in microcode, 50-100x slower: in a SchNet training step
    12 small matrix products (128 x 501 x 20) took 2 ms each instead of 0.03, 19 ms of a
    130-190 ms QM9 step. The mode belongs to a thread and threads inherit it from the one
    that starts them: call this before torch starts its thread pool. Values below 1.2e-38
    become 0, as GPUs do in training. Returns whether the CPU supports it.
    """
    import torch

    return bool(torch.set_flush_denormal(True))


# ----------------------------------------------------------------------------- child processes
_PR_SET_PDEATHSIG = 1


def end_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when the process that started it ends.

    For the processes ``ddp_spawn`` starts: when their parent is killed (``kill``, a batch
    scheduler's SIGTERM, an out-of-memory kill) they would otherwise train on, orphaned, or
    wait forever in a collective, holding the cores. Only in a process that
    :mod:`multiprocessing` started with "spawn" or "fork" (a command run from a shell must
    outlive the shell under ``nohup``), and only on Linux (``prctl``); returns whether it was
    set. A parent that is already gone (a race with the call) ends this process now. Under
    "forkserver" the kernel's parent is the server, not the process that asked for the
    child, so nothing is set there.
    """
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if not parent.is_alive():  # it ended before the prctl: no signal will come
        os.kill(os.getpid(), sig)
    if os.getppid() != parent.pid:  # a forkserver's child: the signal would follow the server
        libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)
        return False
    return True


#: the most torch threads :func:`configure` takes, per CPU of the machine
MAX_THREADS_PER_CPU = 4


# ----------------------------------------------------------------------------- all of it
def configure(threads: int | None = None, allocator: bool = True) -> dict:
    """Wait policy, allocator and thread count for this process (see the module doc).

    Call it before ``import torch`` for the wait policy to apply (after it, with more than
    one thread and no ``OMP_WAIT_POLICY=PASSIVE`` of the user's, a RuntimeWarning says so).
    ``threads``: torch's intra-op threads (default :func:`default_threads`). Returns what
    was set.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    cpus = os.cpu_count() or 1
    if threads is not None and threads > MAX_THREADS_PER_CPU * cpus:
        raise ValueError(  # (100,000 threads crashed OpenBLAS and libgomp: a segfault)
            f"threads {threads}: more than {MAX_THREADS_PER_CPU} per CPU of this machine's "
            f"{cpus}; threads beyond the CPUs only wait on each other"
        )
    passive = prepare_environment()
    tuned = tune_allocator() if allocator else False
    if tuned:  # the same settings for the processes this one starts
        for key, value in allocator_environment().items():
            os.environ.setdefault(key, value)
    import torch

    threads = threads or default_threads()
    if threads > 1 and not passive:
        warnings.warn(
            f"atomlens.runtime.configure() after torch was imported: its {threads} OpenMP "
            f"threads keep the active wait policy and spin on a busy machine (many times "
            f"slower there); call configure() before importing torch, or start Python with "
            f"OMP_WAIT_POLICY=PASSIVE in the environment",
            RuntimeWarning,
            stacklevel=2,
        )
    torch.set_num_threads(threads)
    flushed = flush_subnormals()
    return {
        "threads": threads,
        "flush_subnormals": flushed,
        "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "wait_policy_applied": passive,
        "allocator_tuned": tuned,
    }


# ----------------------------------------------------------------------------- dependencies' notes
#: warnings of dependencies about their own internals or defaults that atomlens sets on
#: purpose, which a user cannot act on
DEPENDENCY_WARNINGS = (
    # Lightning 2.6 constructs torch 2.13's deprecated LeafSpec on every run
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # small training sets: atomlens logs its metrics per epoch anyway
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # every --resume: the run's own checkpoint folder is meant to be there
    r"Checkpoint directory .* exists and is not empty",
    # data-parallel training: atomlens passes broadcast_buffers=False on purpose (its buffers
    # are fixed statistics; torch's own advice there is to keep it until init_sync_buffers)
    r"`broadcast_buffers` is deprecated",
)
#: loggers whose INFO lines are a dependency's own chatter (Lightning's "GPU available: ...",
#: its tips to install litlogger and litmodels, "`Trainer.fit` stopped: ..."); warnings pass
CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def ignore_dependency_warnings() -> None:
    """Filter :data:`DEPENDENCY_WARNINGS` for the rest of the process (the commands do)."""
    for message in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def quiet_loggers() -> None:
    """:data:`CHATTY_LOGGERS` at WARNING for the rest of the process (spawned ranks)."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_dependencies():
    """Inside: :data:`DEPENDENCY_WARNINGS` filtered and :data:`CHATTY_LOGGERS` at WARNING;
    both as they were afterwards. Training runs in it, so that the Python API is as quiet
    as the command."""
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        ignore_dependency_warnings()
        quiet_loggers()
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
