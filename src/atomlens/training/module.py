"""The Lightning module: losses, metrics and optimisation around an AtomisticModel.

    loss = rho * <(Y - Y^)^2>_structures + (1 - rho) * <||F_i - F^_i||^2>_atoms   (with forces)
    loss = <(Y - Y^)^2>_structures                                               (without)

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
    def __init__(self, model: AtomisticModel, forces: bool = False, rho: float = 0.01,
                 lr: float = 5e-4, lr_factor: float = 0.5, lr_patience: int = 25,
                 lr_min: float = 1e-6):
        super().__init__()
        self.model = model
        self.forces, self.rho = forces, rho
        self.lr, self.lr_factor, self.lr_patience, self.lr_min = lr, lr_factor, lr_patience, lr_min
        self.target = model.target
        names = [self.target] + (["forces"] if forces else [])
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}_{kind}": (MeanAbsoluteError() if kind == "mae"
                                       else MeanSquaredError(squared=False))
            for stage in ("val", "test") for name in names for kind in ("mae", "rmse")})

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model(batch, forces=self.forces)

    def loss(self, batch: Batch, pred: dict[str, torch.Tensor]) -> torch.Tensor:
        energy_error = (pred[self.target] - batch.targets[self.target]).pow(2).mean()
        if not self.forces:
            return energy_error
        force_error = (pred["forces"] - batch.targets["forces"]).pow(2).sum(-1).mean()
        return self.rho * energy_error + (1.0 - self.rho) * force_error

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self(batch))
        self.log("train_loss", loss, batch_size=batch.n_structures, prog_bar=True)
        return loss

    def _evaluate(self, batch: Batch, stage: str) -> None:
        with torch.enable_grad():  # forces need the graph even in validation
            pred = self(batch)
        self.log(f"{stage}_loss", self.loss(batch, pred).detach(), batch_size=batch.n_structures,
                 sync_dist=True)
        names = [self.target] + (["forces"] if self.forces else [])
        for name in names:
            for kind in ("mae", "rmse"):
                metric = self.metrics[f"{stage}_{name}_{kind}"]
                metric(pred[name].detach(), batch.targets[name])
                self.log(f"{stage}_{name}_{kind}", metric, batch_size=batch.n_structures,
                         prog_bar=(stage == "val" and kind == "mae"))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        # frozen parameters (fine-tuning the head only) stay out of the optimiser
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=self.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=self.lr_factor, patience=self.lr_patience, min_lr=self.lr_min)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch",
                                 "frequency": 1, "strict": False}}
