"""Budgets: --minutes bounds training and final evaluation; bounded test subsets."""

import csv
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import qm9_sample
from test_training import tiny_config

from atomlens.models import build_model
from atomlens.models.inference import predict_dataset
from atomlens.training import evaluate, train
from atomlens.training.budget import BudgetStop, CosineToEnd
from atomlens.training.evaluate import bounded_subset
from atomlens.training.train import fit_statistics


@pytest.fixture(scope="module")
def data():
    return qm9_sample()


def _fake_trainer():
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    return SimpleNamespace(should_stop=False, strategy=strategy)


def test_reserve_is_eval_fraction_times_observed_cost():
    stop = BudgetStop(deadline=1e12, n_after=1000, eval_fraction=0.5, margin_s=5.0)
    assert stop.reserve() == 5.0  # nothing observed yet
    stop.recent.extend([3.0, 0.02, 0.02, 0.02])  # a first batch that compiled, then 0.02 s
    assert stop.reserve() == 5.0  # too few batches for an estimate
    stop.recent.append(0.02)
    assert stop.reserve() == pytest.approx(0.5 * 0.02 * 1000 + 5.0)


def test_reserve_uses_the_measured_validation_cost_once_timed(monkeypatch):
    """Validation batches measure what a prediction costs; the sanity check's do not count
    (they carry one-off costs). The measured cost replaces the eval_fraction guess."""
    from atomlens.training import budget as budget_module

    clock = iter([0.0, 10.0, 20.0, 20.4, 30.0, 30.2])  # batch start/end pairs
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: next(clock))
    stop = BudgetStop(deadline=1e12, n_after=1000, eval_fraction=0.5, margin_s=5.0)
    stop.recent.extend([0.02] * 5)
    batch = SimpleNamespace(n_structures=100)
    sanity = SimpleNamespace(sanity_checking=True)
    stop.on_validation_batch_start(sanity, None, batch, 0)
    stop.on_validation_batch_end(sanity, None, None, batch, 0)  # 10 s: not counted
    assert stop.reserve() == pytest.approx(0.5 * 0.02 * 1000 + 5.0)
    running = SimpleNamespace(sanity_checking=False)
    for i in range(2):  # 0.4 s, then 0.2 s for 100 structures
        stop.on_validation_batch_start(running, None, batch, i)
        stop.on_validation_batch_end(running, None, None, batch, i)
    per_structure = budget_module.EVAL_SAFETY * 0.003  # the median of 4 and 2 ms
    assert stop.reserve() == pytest.approx(per_structure * 1000 + 5.0)


def test_budget_stops_when_the_reserve_no_longer_fits():
    trainer, batch = _fake_trainer(), SimpleNamespace(n_structures=10)
    stop = BudgetStop(deadline=time.monotonic() + 100.0, n_after=1000, margin_s=0.0)
    stop.on_train_batch_start(trainer, None, batch, 0)
    stop.on_train_batch_end(trainer, None, None, batch, 0)
    assert not trainer.should_stop  # a fast batch: 1000 predictions fit in 100 s
    stop.recent.extend([1.0] * 4)  # 1 s per structure: 500 s reserve
    stop.on_train_batch_end(trainer, None, None, batch, 1)
    assert trainer.should_stop and stop.stopped


def test_a_slow_first_batch_does_not_end_training():
    """The first batch's one-off cost (compiling kernels) is not the cost of the rest: one
    slow batch with a large evaluation ahead must not stop a run that has most of its budget
    (it stopped 8-minute aspirin force training after 16 s)."""
    trainer, batch = _fake_trainer(), SimpleNamespace(n_structures=10)
    stop = BudgetStop(deadline=time.monotonic() + 480.0, n_after=5000, margin_s=5.0)
    stop.recent.append(0.5)  # 5 s for the first 10 structures: a 1250 s reserve if believed
    stop.on_train_batch_start(trainer, None, batch, 1)
    stop.on_train_batch_end(trainer, None, None, batch, 1)
    assert not trainer.should_stop
    stop.recent.extend([0.005] * 5)  # then 0.05 s per batch: the median sees that
    stop.on_train_batch_end(trainer, None, None, batch, 2)
    assert not trainer.should_stop
    late = BudgetStop(deadline=time.monotonic() + 1.0, n_after=5000, margin_s=5.0)
    late.on_train_batch_start(trainer, None, batch, 0)
    late.on_train_batch_end(trainer, None, None, batch, 0)  # the deadline is within the margin
    assert trainer.should_stop and late.stopped


def test_bounded_subset_is_random_sorted_and_bounded():
    indices = np.arange(100, 200)
    subset = bounded_subset(indices, 10, seed=1)
    assert len(subset) == 10 and np.all(np.diff(subset) > 0) and set(subset) <= set(indices)
    assert subset.max() > 150  # not the first ten (QM9's order follows molecule size)
    assert bounded_subset(indices, None) is indices and len(bounded_subset(indices, 500)) == 100
    with pytest.raises(ValueError, match="at least one"):
        bounded_subset(indices, 0)


def test_evaluation_stops_at_its_deadline(data):
    model = build_model(
        {
            "representation": "schnet",
            "head_hidden": 8,
            "target": "U0",
            "representation_kwargs": {
                "n_atom_basis": 8,
                "n_interactions": 1,
                "n_filters": 8,
                "n_rbf": 5,
                "cutoff": 5.0,
            },
        }
    )
    fit_statistics(model, data, np.arange(20))
    indices = np.arange(40)
    past = time.monotonic() - 1.0
    metrics = evaluate(model, data, indices, batch_size=10, deadline=past, progress=False)
    assert metrics["n_evaluated"] == 10  # the batch that crossed the deadline, no more
    full = evaluate(model, data, indices, batch_size=10, progress=False)
    assert full["n_evaluated"] == 40
    assert len(predict_dataset(model, data, indices, 10, deadline=past)["U0"]) == 10


def test_train_evaluates_a_bounded_test_subset(tmp_path, data):
    metrics = train(tiny_config(tmp_path, n_test=10, test_subset=7, max_epochs=1), data=data)
    assert metrics["n_test"] == 10 and metrics["n_test_evaluated"] == 7
    everything = train(
        tiny_config(
            tmp_path,
            n_test=10,
            test_subset=7,
            full_test=True,
            max_epochs=1,
            out=str(tmp_path / "full"),
        ),
        data=data,
    )
    assert everything["n_test_evaluated"] == 10


def test_minutes_bound_the_whole_run(tmp_path, data):
    budget_s = 6.0
    started = time.monotonic()
    metrics = train(
        tiny_config(tmp_path, max_epochs=10000, max_minutes=budget_s / 60, n_test=10),
        data=data,
        started=started,
    )
    elapsed = time.monotonic() - started
    assert metrics["stopped_by_budget"]
    assert elapsed < budget_s + 3.0, elapsed  # saving the model after the deadline: ~1 s
    assert metrics["n_test_evaluated"] >= 1


def test_cosine_rate_runs_from_lr_to_lr_min():
    schedule = CosineToEnd(lr=1e-3, lr_min=1e-5)
    assert schedule.rate(0.0) == pytest.approx(1e-3)
    assert schedule.rate(1.0) == pytest.approx(1e-5)
    assert schedule.rate(0.5) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert schedule.rate(0.25) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (2 + 2**0.5) / 4)


def test_cosine_progress_is_the_larger_of_steps_and_budget_time():
    trainer = SimpleNamespace(estimated_stepping_batches=100, global_step=10)
    now = time.monotonic()
    budget = BudgetStop(deadline=now + 100.0, n_after=0, margin_s=0.0)
    schedule = CosineToEnd(1e-3, 0.0, budget)
    schedule._start = now - 100.0  # half of the training time (200 s) used
    assert schedule.progress(trainer) == pytest.approx(0.5, abs=0.01)
    trainer.global_step = 80
    assert schedule.progress(trainer) == pytest.approx(0.8)
    budget.deadline = now - 1.0  # past the end: clamped
    assert schedule.progress(trainer) == 1.0
    assert CosineToEnd(1e-3, 0.0).progress(trainer) == pytest.approx(0.8)  # no budget


def test_cosine_rate_is_rank_zeros_under_data_parallel_training():
    """Each DDP rank times its own progress; all must step with rank 0's rate."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sent = []

    def broadcast(value, src=0):
        sent.append((value, src))
        return 0.123  # rank 0's value

    trainer = SimpleNamespace(
        estimated_stepping_batches=100,
        global_step=50,
        world_size=2,
        optimizers=[optimizer],
        strategy=SimpleNamespace(broadcast=broadcast),
    )
    schedule = CosineToEnd(1e-3, 0.0)
    schedule.on_train_batch_start(trainer, None, None, 0)
    assert sent == [(pytest.approx(5e-4), 0)]
    assert optimizer.param_groups[0]["lr"] == 0.123
    trainer.world_size = 1
    schedule.on_train_batch_start(trainer, None, None, 1)
    assert len(sent) == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_cosine_schedule_drives_the_optimizer(tmp_path, data):
    """Over a fixed number of epochs (3 epochs of 2 batches) the rate follows the cosine over
    the optimizer steps; the plateau schedule would keep it at lr (too few epochs for a
    plateau). The monitor logs at each epoch's start the rate of the batch before it."""
    config = tiny_config(tmp_path, lr=3e-3, lr_min=1e-5, lr_schedule="cosine", max_epochs=3)
    train(config, data=data)
    rows = [
        row
        for log in (tmp_path / "run" / "logs").glob("version_*/metrics.csv")
        for row in csv.DictReader(log.open())
        if row.get("lr-Adam")
    ]
    rates = [float(row["lr-Adam"]) for row in rows]
    schedule = CosineToEnd(3e-3, 1e-5)
    assert rates == pytest.approx([3e-3, schedule.rate(1 / 6), schedule.rate(3 / 6)])


def test_process_settings_callback_sets_threads_and_flushes_subnormals():
    """Spawned data-parallel processes would get cores // processes threads from Lightning;
    the callback gives each the configured count at setup, and flushes subnormals."""
    from atomlens.training.train import _ProcessSettings

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        supported = torch.set_flush_denormal(False)  # x86 with SSE3: FTZ/DAZ
        tiny = torch.tensor([1e-39], dtype=torch.float32)
        assert (tiny * 1.0).item() != 0.0
        _ProcessSettings(2).setup(None, None, "fit")
        assert torch.get_num_threads() == 2
        if supported:
            assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)


def test_checkpoint_epochs(tmp_path):
    from atomlens.training.train import _checkpoint_epochs

    torch.save({"epoch": 4, "global_step": 50}, tmp_path / "last.ckpt")
    assert _checkpoint_epochs(tmp_path / "last.ckpt") == 5  # epochs 0..4 done
    assert _checkpoint_epochs(tmp_path / "missing.ckpt") == 0
