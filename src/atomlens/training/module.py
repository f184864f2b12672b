"""The Lightning module: losses, metrics and optimisation around an AtomisticModel.

    loss = rho * <(Y - Y^)^2>_structures + (1 - rho) * <||F_i - F^_i||^2>_atoms   (with forces)
    loss = <(Y - Y^)^2>_structures                                               (without)
         + w_sigma * <||sigma - sigma^||_F^2>_structures       (with stress, periodic cells)

With ``loss="mae"`` every square is an absolute value (per component: ||.||_1 for forces
and stress).

The averages are over the global batch: with data-parallel training each rank sums its
share and divides by the global counts, so unequal shares give the same gradient as one
process.

Values are in the model's internal units (eV, eV/Angstrom); metrics are reported in them
too and converted for display only.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from ..data.batch import Batch
from ..models.potential import AtomisticModel


class AtomisticTask(pl.LightningModule):
    def __init__(
        self,
        model: AtomisticModel,
        forces: bool = False,
        rho: float = 0.01,
        lr: float = 5e-4,
        lr_factor: float = 0.5,
        lr_patience: int = 25,
        lr_min: float = 1e-6,
        stress: bool = False,
        stress_weight: float = 100.0,
        lr_schedule: str = "plateau",
        loss: str = "mse",
        weight_decay: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.forces, self.rho = forces, rho
        self.stress, self.stress_weight = stress, stress_weight
        self.lr, self.lr_factor, self.lr_patience = lr, lr_factor, lr_patience
        self.lr_min = min(lr_min, lr)  # a rate below the default floor (fine-tuning) stays
        self.lr_schedule = lr_schedule
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, not {weight_decay}")
        self.weight_decay = weight_decay
        if loss not in ("mse", "mae"):
            raise ValueError(f"loss must be 'mse' or 'mae', not {loss!r}")
        self.error = torch.square if loss == "mse" else torch.abs
        self.target = model.target
        names = self.names = (
            [self.target] + (["forces"] if forces else []) + (["stress"] if stress else [])
        )
        self.metrics = torch.nn.ModuleDict(
            {
                f"{stage}_{name}_{kind}": (
                    MeanAbsoluteError() if kind == "mae" else MeanSquaredError(squared=False)
                )
                for stage in ("val", "test")
                for name in names
                for kind in ("mae", "rmse")
            }
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model(batch, forces=self.forces, stress=self.stress)

    def loss(
        self, batch: Batch, pred: dict[str, torch.Tensor], counts: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """The loss of the module docstring; ``counts`` = (structures, atoms) of the whole
        global batch when ``batch`` is one rank's share of it (default: ``batch`` itself),
        so that sum_ranks loss_r = the global batch's loss whatever the shares."""
        n_structures, n_atoms = counts or (batch.n_structures, batch.numbers.shape[0])
        error = self.error
        energy_error = error(pred[self.target] - batch.targets[self.target]).sum() / n_structures
        loss = energy_error
        if self.forces:
            force_error = error(pred["forces"] - batch.targets["forces"]).sum() / n_atoms
            loss = self.rho * energy_error + (1.0 - self.rho) * force_error
        if self.stress:
            stress_error = error(pred["stress"] - batch.targets["stress"]).sum() / n_structures
            loss = loss + self.stress_weight * stress_error
        return loss

    def _global_counts(self, batch: Batch) -> tuple[float, float] | None:
        """(structures, atoms) of the global batch, summed over the data-parallel ranks."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        local = torch.tensor(
            [batch.n_structures, batch.numbers.shape[0]], dtype=torch.float64, device=self.device
        )
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        return float(total[0]), float(total[1])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        pred = self(batch)
        counts = self._global_counts(batch)
        loss = self.loss(batch, pred, counts)
        shown = loss if counts is None else self.loss(batch, pred)  # this rank's own mean
        self.log("train_loss", shown.detach(), batch_size=batch.n_structures, prog_bar=True)
        if counts is not None:
            # DDP averages the ranks' gradients; the ranks' losses add up to the global
            # batch's loss, so scale by the world size: the average is then its gradient,
            # also when the global batch does not split evenly over the ranks
            loss = loss * self.trainer.world_size
        return loss

    def _evaluate(self, batch: Batch, stage: str) -> None:
        with torch.enable_grad():  # forces need the graph even in validation
            pred = self(batch)
        self.log(
            f"{stage}_loss",
            self.loss(batch, pred).detach(),
            batch_size=batch.n_structures,
            sync_dist=True,
        )
        for name in self.names:
            for kind in ("mae", "rmse"):
                metric = self.metrics[f"{stage}_{name}_{kind}"]
                metric(pred[name].detach(), batch.targets[name])
                self.log(
                    f"{stage}_{name}_{kind}",
                    metric,
                    batch_size=batch.n_structures,
                    prog_bar=(stage == "val" and kind == "mae"),
                )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # Lightning steps the plateau schedule after the epoch's last checkpoint is saved, and a
    # resume does not replay that step: the checkpoint records the validation loss it is
    # still due (the learning rate of a resumed run had lagged one reduction behind)
    PENDING_PLATEAU = "atomlens_plateau_pending"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainer = self._trainer
        if self.lr_schedule == "cosine" or trainer is None or trainer.sanity_checking:
            return
        metric = trainer.callback_metrics.get("val_loss")
        if metric is not None and trainer.training:
            checkpoint[self.PENDING_PLATEAU] = float(metric)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_plateau = checkpoint.get(self.PENDING_PLATEAU)

    def on_train_start(self) -> None:
        pending = getattr(self, "_pending_plateau", None)
        self._pending_plateau = None
        if pending is not None and self.lr_schedule != "cosine":
            schedulers = self.lr_schedulers()
            scheduler = schedulers[0] if isinstance(schedulers, list) else schedulers
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(pending)

    def configure_optimizers(self):
        # frozen parameters (fine-tuning the head only) stay out of the optimiser
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # one fused kernel over all parameters instead of ~10 operators per tensor: SchNet
        # 128/6's 59 tensors took 0.78 instead of 2.4 ms per step (one thread, CPU time)
        fused = all(p.device.type in ("cpu", "cuda") for p in trainable) or None
        if self.weight_decay > 0:  # decoupled: not Adam's L2 term, which Adam rescales
            optimizer = torch.optim.AdamW(
                trainable, lr=self.lr, weight_decay=self.weight_decay, fused=fused
            )
        else:
            optimizer = torch.optim.Adam(trainable, lr=self.lr, fused=fused)
        if self.lr_schedule == "cosine":  # set every batch by the budget.CosineToEnd callback
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=self.lr_factor, patience=self.lr_patience, min_lr=self.lr_min
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "monitor": "val_loss",
                "interval": "epoch",
                "frequency": 1,
                "strict": False,
            },
        }
