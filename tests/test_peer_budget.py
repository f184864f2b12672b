"""The peer benchmarks' own logic that runs without the peers: MACE's wall-clock budget on its
training loader (benchmarks/peers/mace_train.py) and the peer venv check (peer_venv.py)."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))

import mace_train  # mace itself is imported only inside main()
import peer_venv


class Clock:
    """A fake ``time.perf_counter``: the test sets ``now``."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_budgeted_loader_reserves_one_validation_and_stops(monkeypatch):
    clock = Clock(0.0)
    monkeypatch.setattr(mace_train.time, "perf_counter", clock)
    budgeted = mace_train.BudgetedLoader(list(range(100)), end=100.0)
    budgeted.train_started = 10.0
    clock.now = 30.0  # the first validation took 20 s: batches stop at 100 - 20 = 80 s
    served = []
    for batch in budgeted:
        served.append(batch)
        clock.now += 1.0
    assert budgeted.reserve == pytest.approx(20.0)
    assert served == list(range(50))  # 30 s + 50 x 1 s = 80 s
    assert (budgeted.epochs, budgeted.steps) == (1, 50)
    with pytest.raises(mace_train.BudgetSpent):  # the next epoch ends mace.tools.train
        iter(budgeted).__next__()


def test_budgeted_loader_serves_whole_epochs_within_the_budget(monkeypatch):
    clock = Clock(0.0)
    monkeypatch.setattr(mace_train.time, "perf_counter", clock)
    budgeted = mace_train.BudgetedLoader([1, 2, 3], end=100.0)
    budgeted.train_started = 0.0
    assert list(budgeted) == [1, 2, 3] and list(budgeted) == [1, 2, 3]
    assert (budgeted.reserve, budgeted.epochs, budgeted.steps) == (0.0, 2, 6)


def test_budget_spent_before_training(monkeypatch):
    clock = Clock(0.0)
    monkeypatch.setattr(mace_train.time, "perf_counter", clock)
    budgeted = mace_train.BudgetedLoader([1, 2, 3], end=60.0)
    budgeted.train_started = 10.0
    clock.now = 130.0  # setup and the first validation outlast the budget
    with pytest.raises(mace_train.BudgetSpent):
        list(budgeted)
    assert budgeted.steps == 0


def test_peer_venv_ready_checks_versions(tmp_path):
    python = Path(sys.executable)
    numpy_version = version("numpy").split("+")[0]
    assert peer_venv.ready(python, {"numpy": numpy_version})
    assert not peer_venv.ready(python, {"numpy": numpy_version + ".1"})
    assert not peer_venv.ready(tmp_path / "bin" / "python", {"numpy": numpy_version})


def test_stage_two_starts_for_the_last_fraction_of_the_training_time(monkeypatch):
    clock = Clock(0.0)
    monkeypatch.setattr(mace_train.time, "perf_counter", clock)
    started = []
    budgeted = mace_train.BudgetedLoader(
        list(range(10)), end=100.0, stage_two=started.append, stage_two_fraction=0.2
    )
    budgeted.train_started = 0.0
    for _ in range(9):
        for _batch in budgeted:
            clock.now += 1.0  # 10 s epochs from 0 s; stage two from 80 s
    # the epoch ending at 70 s is the first after which the next one reaches 80 s
    assert started == [7] and budgeted.stage_two_epoch == 7
    assert budgeted.epochs == 9
