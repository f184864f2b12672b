"""Process settings: thread choice from affinity and cgroup quota, wait policy, no import side effects."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atomlens import runtime
from atomlens.cli import build_parser

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "ATOMLENS_THREADS")
    }
    environment.update(PYTHONPATH=SRC, **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert runtime.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.cgroup_cpu_limit(tmp_path) == 3.0
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime.cgroup_cpu_limit(tmp_path) is None
    assert runtime.cgroup_cpu_limit(tmp_path / "absent") is None


def test_cgroup_quota_of_the_own_cgroup_and_its_ancestors(tmp_path):
    # cgroup v2 on a host: the process sits in /system.slice/job.service; the quota is its
    # slice's (systemd CPUQuota=50% on the slice), the service's own is "max"
    service = tmp_path / "system.slice" / "job.service"
    service.mkdir(parents=True)
    (service / "cpu.max").write_text("max 100000\n")
    (tmp_path / "system.slice" / "cpu.max").write_text("50000 100000\n")
    membership = "0::/system.slice/job.service\n"
    assert runtime.cgroup_cpu_limit(tmp_path, membership) == 0.5
    (service / "cpu.max").write_text("25000 100000\n")  # the smaller one holds
    assert runtime.cgroup_cpu_limit(tmp_path, membership) == 0.25
    assert runtime.cgroup_cpu_limit(tmp_path, "0::/elsewhere\n") is None
    assert runtime.available_cpus({0, 1, 2, 3}, cgroup_root=tmp_path) == 4  # not this process's
    # cgroup v1: the cpu controller's line names the job's folder under its mount
    job = tmp_path / "v1" / "cpu,cpuacct" / "slurm" / "job_7"
    job.mkdir(parents=True)
    (job / "cpu.cfs_quota_us").write_text("-1\n")
    (job / "cpu.cfs_period_us").write_text("100000\n")
    (job.parent / "cpu.cfs_quota_us").write_text("300000\n")
    (job.parent / "cpu.cfs_period_us").write_text("100000\n")
    membership = "5:memory:/slurm/job_7\n3:cpu,cpuacct:/slurm/job_7\n"
    assert runtime.cgroup_cpu_limit(tmp_path / "v1", membership) == 3.0
    assert runtime.cgroup_cpu_limit(tmp_path / "v1", "5:memory:/slurm/job_7\n") is None


def test_available_cpus_is_the_smaller_of_affinity_and_quota(tmp_path):
    assert runtime.available_cpus(affinity={0, 1, 2, 3}, cgroup_root=tmp_path) == 4
    assert runtime.available_cpus(affinity={0, 1, 2, 3}, quota=1.5) == 2  # ceil(1.5)
    assert runtime.available_cpus(affinity={5}, quota=8.0) == 1
    assert runtime.available_cpus(affinity={0, 1}, quota=0.2) == 1
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert runtime.available_cpus(affinity=set(range(16)), cgroup_root=tmp_path) == 2


def test_default_threads_honours_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("ATOMLENS_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.setenv("ATOMLENS_THREADS", "zero")
    with pytest.raises(ValueError, match="ATOMLENS_THREADS='zero'"):
        runtime.default_threads()
    monkeypatch.delenv("ATOMLENS_THREADS")
    cpus = runtime.available_cpus()
    assert runtime.default_threads() == (1 if cpus <= 2 else cpus)


def test_default_threads_one_on_small_machines(monkeypatch):
    """Up to 2 available CPUs one thread (faster there than two passive threads), else all."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("ATOMLENS_THREADS", raising=False)
    assert runtime.ONE_THREAD_UP_TO_CPUS == 2
    assert [runtime.default_threads(cpus=n) for n in (1, 2, 3, 4, 16)] == [1, 1, 3, 4, 16]


def test_default_threads_take_a_schedulers_omp_num_threads(monkeypatch):
    """OMP_NUM_THREADS (a job scheduler's or MPI launcher's share) is the default after
    ATOMLENS_THREADS, at most the available CPUs: OMP_NUM_THREADS=1 on a node of 16 CPUs
    had been overridden with 16 threads."""
    monkeypatch.delenv("ATOMLENS_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.default_threads(cpus=16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # nested levels: the first
    assert runtime.default_threads(cpus=16) == 4
    assert runtime.default_threads(cpus=2) == 2  # never more than the CPUs
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # unreadable: the usual default
    assert runtime.default_threads(cpus=16) == 16
    monkeypatch.setenv("ATOMLENS_THREADS", "3")
    assert runtime.default_threads(cpus=16) == 3


def test_threads_given_to_a_command_with_subcommands_are_kept():
    """``explain --threads 3 molecule ...``: the subcommand's own --threads option had
    overwritten the value with its default (None), in either order it is 3 now."""
    from atomlens.cli import build_parser

    parser = build_parser()
    for argv in (
        ["explain", "--threads", "3", "molecule", "m", "s", "--out", "o"],
        ["explain", "molecule", "--threads", "3", "m", "s", "--out", "o"],
    ):
        assert getattr(parser.parse_args(argv), "threads", None) == 3
    assert (
        getattr(parser.parse_args(["explain", "molecule", "m", "s", "--out", "o"]), "threads", None)
        is None
    )


def test_import_changes_no_process_setting():
    result = _python("""
        import os, sys
        import atomlens, atomlens.models, atomlens.cli
        from atomlens import runtime
        assert runtime._tuned is None, "import atomlens tuned the allocator"
        assert "OMP_WAIT_POLICY" not in os.environ, "import atomlens set the wait policy"
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_sets_the_wait_policy_before_torch_loads():
    # record the environment at the moment torch is first imported
    result = _python("""
        import os, sys
        seen = []
        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and not seen:
                    seen.append(os.environ.get("OMP_WAIT_POLICY"))
                return None
        sys.meta_path.insert(0, Watch())
        import atomlens.cli
        assert "torch" not in sys.modules, "importing the CLI loaded torch"
        code = atomlens.cli.main(["evaluate", "/nonexistent/model", "--threads", "1"])
        import torch
        from atomlens import runtime
        print(seen[0], code, torch.get_num_threads(), runtime._tuned,
              os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    """)
    assert result.returncode == 0, result.stderr
    policy, code, threads, tuned, inherited = result.stdout.split()
    assert policy == "PASSIVE" and code == "2" and threads == "1"
    assert tuned == str(sys.platform.startswith("linux"))
    # the processes it starts (ddp_spawn) inherit the allocator settings
    assert inherited == (str(runtime.MMAP_THRESHOLD) if tuned == "True" else "None")


def test_configure_keeps_a_users_wait_policy():
    result = _python(
        """
        from atomlens.runtime import configure
        settings = configure(threads=1)
        print(settings["wait_policy"], settings["wait_policy_applied"], settings["threads"])
    """,
        OMP_WAIT_POLICY="ACTIVE",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ACTIVE", "True", "1"]


@pytest.mark.parametrize(
    "command",
    [
        ["train"],
        ["evaluate", "m"],
        ["predict", "m", "f.xyz"],
        ["demo"],
        ["md", "m", "s.xyz"],
        ["sample", "--xyz", "s.xyz", "--out", "o.npz"],
        ["insight", "rings", "m"],
        ["insight", "potential-map", "m", "s.xyz"],
        ["explain", "--out", "o"],
    ],
)
def test_every_command_takes_threads(command):
    assert build_parser().parse_args([*command, "--threads", "3"]).threads == 3


def _gone(pid: int) -> bool:
    """True once ``pid`` has ended (no such process, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(sys.platform != "linux", reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_spawned_process_ends_with_its_parent(tmp_path):
    """A process started by multiprocessing (as ddp_spawn starts training processes) that
    called end_with_parent ends when its parent is killed; one that did not lives on (the
    orphans this guards against). The main process itself is left alone."""
    import signal
    import time

    assert runtime.end_with_parent() is False  # not a multiprocessing child: nothing set
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing, os, sys, time
            from atomlens import runtime

            def child(guard, path):
                set_ = runtime.end_with_parent() if guard else False
                open(path, "w").write(f"{{os.getpid()}} {{set_}}")
                time.sleep(120)

            if __name__ == "__main__":
                ctx = multiprocessing.get_context("spawn")
                for guard, name in ((True, "guarded"), (False, "unguarded")):
                    ctx.Process(target=child, args=(guard, r"{tmp_path}/" + name)).start()
                time.sleep(120)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    parent = subprocess.Popen([sys.executable, str(script)], env=env)
    files = [tmp_path / "guarded", tmp_path / "unguarded"]
    try:
        deadline = time.monotonic() + 60
        while not all(f.exists() and f.read_text() for f in files):
            assert time.monotonic() < deadline, "the children did not start"
            time.sleep(0.1)
        (guarded, was_set), (unguarded, _) = (f.read_text().split() for f in files)
        guarded, unguarded = int(guarded), int(unguarded)
        assert was_set == "True"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while not _gone(guarded):
            assert time.monotonic() < deadline, "the guarded child outlived its parent"
            time.sleep(0.1)
        time.sleep(0.5)
        assert not _gone(unguarded)  # the orphan the guard prevents
    finally:
        parent.kill()
        parent.wait()
        for f in files:
            if f.exists() and f.read_text():
                try:
                    os.kill(int(f.read_text().split()[0]), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _pdeathsig_in_child(queue):
    import ctypes
    import ctypes.util

    was_set = runtime.end_with_parent()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    sig = ctypes.c_int(-1)
    libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    queue.put((was_set, sig.value))


@pytest.mark.skipif(sys.platform != "linux", reason="prctl(PR_SET_PDEATHSIG) is Linux's")
@pytest.mark.parametrize(
    ("method", "expected"), [("spawn", True), ("fork", True), ("forkserver", False)]
)
def test_end_with_parent_by_start_method(method, expected):
    """Spawned and forked children get the signal; a forkserver's child does not (its kernel
    parent is the server, so the signal would follow the server), and is not killed."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_pdeathsig_in_child, args=(queue,))
    child.start()
    was_set, sig = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert was_set is expected
    assert sig == (signal.SIGTERM if expected else 0)


def test_spawned_training_processes_end_with_the_parent(monkeypatch):
    """The training callback asks for it in spawned processes only."""
    import signal

    from atomlens.training import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "end_with_parent", calls.append)
    train_module._ProcessSettings(None, spawned=False).setup(None, None, "fit")
    assert calls == []
    train_module._ProcessSettings(None, spawned=True).setup(None, None, "fit")
    # a kill: Lightning's own SIGTERM handler would try a collective stop with no parent
    assert calls == [signal.SIGKILL]


def test_configure_after_torch_warns_of_spinning_threads():
    """After ``import torch`` the wait policy cannot apply: with more than one thread the
    user is told (not with one thread, nor with OMP_WAIT_POLICY set before Python started,
    which then applies)."""
    code = """
        import warnings, json
        import torch
        from atomlens.runtime import configure
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            one = configure(threads=1)
            two = configure(threads=2)
        print(json.dumps([[str(w.message) for w in caught], one["wait_policy_applied"],
                          two["wait_policy_applied"]]))
    """
    import json

    done = _python(code)
    assert done.returncode == 0, done.stderr
    messages, one, two = json.loads(done.stdout.splitlines()[-1])
    assert len(messages) == 1 and "spin on a busy machine" in messages[0]
    assert one is False and two is False
    done = _python(code, OMP_WAIT_POLICY="PASSIVE")
    messages, one, two = json.loads(done.stdout.splitlines()[-1])
    assert messages == [] and one is True and two is True
