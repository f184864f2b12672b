"""Representation + atom-wise head + scale/shift/atom references -> property, atomic parts, forces.

    y_i = scale * head(x_i) + shift + atomref[Z_i]           atomic contribution (target unit)
    Y   = sum_i y_i   (extensive)   or   mean_i y_i   (intensive)
    F_i = -dY/dR_i                                           (energy models only)

``scale``, ``shift`` and ``atomref`` are buffers fitted on the training split, so a saved
model carries them. With ``output="dipole"`` the y_i are latent charges instead, and
:class:`~atomlens.models.dipole.DipoleMoment` turns them into a dipole moment. Forces are the gradient of the one energy model, never a separate head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn

from ..data.batch import Batch
from ..nn import activation, scatter_sum
from .dipole import DipoleMoment
from .dtnn import DTNN
from .schnet import SchNet

REPRESENTATIONS = {"schnet": SchNet, "dtnn": DTNN}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored as JSON next to its weights."""

    representation: str = "schnet"
    #: keyword arguments of the representation class (SchNet or DTNN)
    representation_kwargs: dict = field(default_factory=dict)
    head_hidden: int = 32
    head_activation: str = "ssp"
    #: property predicted, and its unit (internal units: eV for energies)
    target: str = "energy"
    unit: str = "eV"
    aggregation: str = "sum"  # "sum": extensive, "mean": intensive
    #: "scalar": pooled atomic contributions; "dipole": latent charges -> |mu| (dipole.py)
    output: str = "scalar"
    max_z: int = 100

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class AtomisticModel(nn.Module):
    """A molecular property model speaking the :class:`~atomlens.data.Batch` structure."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {config.representation!r}; "
                             f"known: {sorted(REPRESENTATIONS)}")
        if config.aggregation not in ("sum", "mean"):
            raise ValueError(f"aggregation must be 'sum' or 'mean', not {config.aggregation!r}")
        if config.output not in ("scalar", "dipole"):
            raise ValueError(f"output must be 'scalar' or 'dipole', not {config.output!r}")
        kwargs = dict(config.representation_kwargs, max_z=config.max_z)
        self.representation = REPRESENTATIONS[config.representation](**kwargs)
        spacing = getattr(self.representation, "filter_spacing", None)
        if spacing is not None and "filter_spacing" not in config.representation_kwargs:
            # the saved config names the evaluation it was built with, not a default
            config = replace(config, representation_kwargs={**config.representation_kwargs,
                                                            "filter_spacing": spacing})
        self.config = config
        n_features = self.representation.n_atom_basis
        self.head = nn.Sequential(
            nn.Linear(n_features, config.head_hidden), activation(config.head_activation),
            nn.Linear(config.head_hidden, 1))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("atomref", torch.zeros(config.max_z + 1))
        self.dipole = DipoleMoment() if config.output == "dipole" else None

    @property
    def cutoff(self) -> float | None:
        return self.representation.cutoff

    @property
    def target(self) -> str:
        return self.config.target

    def set_statistics(self, atomref=None, shift: float = 0.0, scale: float = 1.0) -> None:
        """Store the per-element references and residual shift/scale fitted on training data."""
        if atomref is not None:
            self.atomref.copy_(torch.as_tensor(atomref, dtype=self.atomref.dtype)[: len(self.atomref)])
        self.shift.fill_(float(shift))
        self.scale.fill_(float(scale))

    def atomic_contributions(self, features: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """y_i = scale * head(x_i) + shift + atomref[Z_i], shape (n_atoms,)."""
        return self.head(features).squeeze(-1) * self.scale + self.shift + self.atomref[numbers]

    def forward(self, batch: Batch, forces: bool = False) -> dict[str, torch.Tensor]:
        """Predict ``{target: (n_structures,), "atomic": (n_atoms,), "forces": (n_atoms, 3)}``.

        ``batch`` is a :class:`~atomlens.data.Batch`, or ASE ``Atoms`` (one or a list).
        """
        if not isinstance(batch, Batch):
            batch = self.batch_from_atoms(batch)
        positions = batch.positions
        if forces and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        features = self.representation(batch.numbers, positions, batch.pair_i, batch.pair_j,
                                       batch.symmetric_pairs)
        atomic = self.atomic_contributions(features, batch.numbers)
        if self.dipole is not None:
            if forces:
                raise ValueError("a dipole model predicts no forces")
            return self.dipole(atomic, batch, self.target)
        total = scatter_sum(atomic, batch.structure_index, batch.n_structures)
        if self.config.aggregation == "mean":
            total = total / batch.n_atoms_per.to(total.dtype)
        out = {self.target: total, "atomic": atomic}
        if forces:
            (grad,) = torch.autograd.grad(total.sum(), positions, create_graph=self.training)
            out["forces"] = -grad
        return out


    def predict(self, atoms, forces: bool = False) -> dict:
        """Predict for one ASE ``Atoms`` or a list of them; returns numpy arrays.

        ``{target: (n_structures,), "atomic": (n_atoms,), "forces": (n_atoms, 3)}`` in the
        model's units (eV, eV/Angstrom for energy models).
        """
        batch = self.batch_from_atoms(atoms)
        with torch.set_grad_enabled(forces):
            out = self(batch, forces=forces)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def batch_from_atoms(self, atoms) -> Batch:
        """A validated batch of ASE ``Atoms`` on this model's device and dtype."""
        from ..data.dataset import dataset_from_atoms

        data = dataset_from_atoms(atoms)
        p = next(self.parameters())
        return data.batch(range(len(data)), self.cutoff, p.dtype).to(p.device)


def build_model(config: ModelConfig | dict) -> AtomisticModel:
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return AtomisticModel(config)
