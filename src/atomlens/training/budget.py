"""A wall-clock budget for the whole ``train`` command, final evaluation included.

Lightning's ``max_time`` bounds ``fit`` alone; what follows it (the final evaluation on the
test split, the energy-offset refit of force training, saving) used to run unbounded after
the budget. :class:`BudgetStop` ends training early enough to leave room for it: after every
training batch it estimates the seconds per training structure t_structure (the median over
the last 20 batches, so that the first batches' one-off compilation does not count) and stops
when

    now + reserve >= deadline,   reserve = t_predict * n_after + margin_s

where ``n_after`` counts the structures still to be predicted after training (validation
at the stop, the bounded test subset, the refit) and t_predict the seconds per predicted
structure. Once validation batches have been timed, t_predict is measured: their median
seconds per structure times :data:`EVAL_SAFETY` (validation, test and refit predict alike,
in batches of the same size). Before that it is guessed as ``eval_fraction * t_structure``,
which was 3-5x too high for force training (aspirin: 10 ms per training structure, 1.1 ms
per predicted one) and kept about 30 s of an 8-minute budget idle. The guess is used only
once :data:`MIN_OBSERVED` batches have been timed: the first batch of a run carries one-off
costs (kernel compilation: several seconds), and a median of one batch made a
force-training run stop after its first step (aspirin, 8 minutes: 16 s of training). Before
that, training stops only when the deadline itself is within the margin. The evaluation itself runs with the same
deadline (:func:`~atomlens.training.evaluate.evaluate`), so the budget holds even when the
estimate is short.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque

import lightning.pytorch as pl

#: a prediction costs about this fraction of a training step per structure (forward only,
#: or forward + one backward for forces, against forward + backward + optimizer step)
EVAL_FRACTION = 0.5
#: the measured prediction cost is multiplied by this: the test and refit structures may be
#: larger than the validation ones, and the machine may get busier
EVAL_SAFETY = 1.25
#: seconds kept for loading the best checkpoint and saving the model
MARGIN_S = 5.0
#: more seconds kept when training ran in spawned data-parallel processes (``ddp_spawn``):
#: ending them and handing their weights back took ~6 s on 2 CPU processes, before the
#: evaluation in the main process (which has not run the model yet) starts
SPAWN_MARGIN_S = 20.0
#: timed batches needed before the reserve estimate may stop training
MIN_OBSERVED = 5


class BudgetStop(pl.Callback):
    """Stop training so that ``n_after`` predictions still fit before ``deadline``.

    ``deadline``: ``time.monotonic()`` seconds. ``n_after``: structures predicted after
    training (see the module doc).
    """

    def __init__(
        self,
        deadline: float,
        n_after: int,
        eval_fraction: float = EVAL_FRACTION,
        margin_s: float = MARGIN_S,
    ):
        self.deadline, self.n_after = deadline, n_after
        self.eval_fraction, self.margin_s = eval_fraction, margin_s
        #: seconds per structure of the most recent training batches
        self.recent: deque[float] = deque(maxlen=20)
        #: seconds per structure of the most recent validation batches (sanity check excluded)
        self.recent_eval: deque[float] = deque(maxlen=20)
        self._batch_start: float | None = None
        self._eval_start: float | None = None
        self.stopped = False

    def reserve(self) -> float:
        """Seconds kept for the work after training (the module doc's formula); only the
        margin until :data:`MIN_OBSERVED` training batches have been timed."""
        if self.recent_eval:
            per_prediction = EVAL_SAFETY * statistics.median(self.recent_eval)
        elif len(self.recent) >= MIN_OBSERVED:
            per_prediction = self.eval_fraction * statistics.median(self.recent)
        else:
            return self.margin_s
        return per_prediction * self.n_after + self.margin_s

    def on_validation_batch_start(
        self, trainer, pl_module, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._eval_start = time.monotonic()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        now = time.monotonic()
        # the sanity check's batches carry the evaluation path's one-off costs
        if self._eval_start is not None and batch.n_structures and not trainer.sanity_checking:
            self.recent_eval.append((now - self._eval_start) / batch.n_structures)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if self._batch_start is not None and batch.n_structures:
            self.recent.append((now - self._batch_start) / batch.n_structures)
        # one decision for all ranks (DDP), else they would wait on each other forever
        if trainer.strategy.reduce_boolean_decision(
            now + self.reserve() >= self.deadline, all=False
        ):
            self.stopped = True
            trainer.should_stop = True

    def on_train_start(self, trainer, pl_module) -> None:
        if time.monotonic() + self.margin_s >= self.deadline:  # loading ate the budget
            self.stopped = True
            trainer.should_stop = True


class CosineToEnd(pl.Callback):
    """Cosine decay of the learning rate from ``lr`` to ``lr_min`` over the whole run.

    The run's progress p in [0, 1] is the larger of the fraction of its optimizer steps
    done (``max_epochs`` worth) and, with a budget, the fraction of its training time
    used: the time from the start of training to the moment :class:`BudgetStop` will end
    it (``deadline - reserve``, re-estimated every batch). Before every training batch

        lr(p) = lr_min + (lr - lr_min) (1 + cos(pi p)) / 2

    so the rate is highest at the start and reaches ``lr_min`` where training ends, as the
    work on budgeted training recommends (a schedule tied to the budget, not to a
    validation plateau that a short run never reaches). A resumed run restarts the
    schedule over its new budget. With data-parallel training rank 0's rate is used by all.
    """

    def __init__(self, lr: float, lr_min: float, budget: BudgetStop | None = None):
        self.lr, self.lr_min, self.budget = lr, lr_min, budget
        self._start: float | None = None

    def progress(self, trainer) -> float:
        done = []
        total = trainer.estimated_stepping_batches
        if total and math.isfinite(total):
            done.append(trainer.global_step / total)
        if self.budget is not None and self._start is not None:
            end = self.budget.deadline - self.budget.reserve()
            span = max(end - self._start, 1e-9)
            done.append((time.monotonic() - self._start) / span)
        return min(max(done, default=0.0), 1.0)

    def rate(self, progress: float) -> float:
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = self.rate(self.progress(trainer))
        if trainer.world_size > 1:
            # data-parallel ranks read their own clocks: without one shared rate their
            # optimizer steps, and so their weights, would drift apart
            lr = trainer.strategy.broadcast(lr, src=0)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
