"""Representation + atom-wise head + scale/shift/atom references -> property, atomic parts, forces.

    y_i = scale * head(x_i) + shift + atomref[Z_i]           atomic contribution (target unit)
    Y   = sum_i y_i   (extensive)   or   mean_i y_i   (intensive)
    F_i = -dY/dR_i                                           (energy models only)
    sigma = (1/V) dY/d eps                                   stress of periodic cells

``scale``, ``shift`` and ``atomref`` are buffers fitted on the training split, so a saved
model carries them. With ``output="dipole"`` the y_i are latent charges instead, and
:class:`~atomlens.models.dipole.DipoleMoment` turns them into a dipole moment. Forces are the gradient of the one energy model, never a separate head.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from ..data.batch import Batch, Pairs
from ..nn import activation, scatter_sum
from ..nn.geometry import apply_strain, cell_volume
from ..nn.linear import Linear, linear, plain_products
from .base import hooked, representation_class
from .dipole import DipoleMoment
from .prediction import Prediction


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


class FrozenModel(NamedTuple):
    """:meth:`AtomisticModel.freeze`'s state: the representation's, and the head's first
    layer folded into the representation's last (None where there is no fold)."""

    representation: Any = None
    #: ``W1 D`` (head width, n_atom_basis) and ``W1 d + b1`` (head width)
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None


class AtomisticModel(nn.Module):
    """A property model of molecules and periodic structures speaking the
    :class:`~atomlens.data.Batch` structure."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        representation = representation_class(config.representation)
        if config.aggregation not in ("sum", "mean"):
            raise ValueError(f"aggregation must be 'sum' or 'mean', not {config.aggregation!r}")
        if config.output not in ("scalar", "dipole"):
            raise ValueError(f"output must be 'scalar' or 'dipole', not {config.output!r}")
        kwargs = dict(config.representation_kwargs, max_z=config.max_z)
        self.representation = representation(**kwargs)
        # the saved config names every setting the model was built with, defaults included
        # (so a later change of a default cannot change a saved model)
        built = {
            k: v
            for k, v in vars(self.representation).items()
            if k in _init_names(type(self.representation))
        }
        missing = {
            k: v
            for k, v in built.items()
            if k not in config.representation_kwargs and k != "max_z" and _json_value(v)
        }
        if missing:
            config = replace(
                config, representation_kwargs={**config.representation_kwargs, **missing}
            )
        self.config = config
        n_features = self.representation.n_atom_basis
        self.head = nn.Sequential(
            Linear(n_features, config.head_hidden),
            activation(config.head_activation),
            Linear(config.head_hidden, 1),
        )
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
            self.atomref.copy_(
                torch.as_tensor(atomref, dtype=self.atomref.dtype)[: len(self.atomref)]
            )
        self.shift.fill_(float(shift))
        self.scale.fill_(float(scale))

    def atomic_contributions(self, features: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """The head: y_i = scale * head(x_i) + shift + atomref[Z_i], shape (n_atoms,)."""
        return self._scaled(self.head(features), numbers)

    def _scaled(self, head: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """y_i from the head's outputs ``(n_atoms, 1)``."""
        return head.squeeze(-1) * self.scale + self.shift + self.atomref[numbers]

    def atomic_energies(
        self, numbers: torch.Tensor, positions: torch.Tensor, pairs: Pairs, frozen: Any = None
    ) -> torch.Tensor:
        """Per-atom contributions y_i ``(n_atoms,)`` (eV for energy models) of any atoms.

        The one entry point for everything that needs the model's per-atom output without a
        :class:`Batch` (the ASE calculator, potential maps, explanations, tests). ``frozen``
        is :meth:`freeze`'s state for repeated calls with fixed weights.
        """
        if isinstance(frozen, FrozenModel):
            # hooks on the layers the fold bypasses or splits (the last block's, the head's):
            # no fold, so they see their values
            if frozen.head_weight is not None and not hooked(
                *self.representation.split_modules(), *self.head.modules()
            ):
                hidden = self._folded_hidden(numbers, positions, pairs, frozen)
                return self._scaled(self.head[2](self.head[1](hidden)), numbers)
            frozen = frozen.representation
        features = self.representation(numbers, positions, pairs, frozen)
        return self.atomic_contributions(features, numbers)

    @torch.no_grad()
    def freeze(self) -> FrozenModel:
        """Weight-only state for repeated calls with fixed weights (MD, the calculator): the
        representation's (SchNet's filter tables) and the head's first layer folded into the
        representation's last layer where the representation ends in one
        (:meth:`~atomlens.models.base.Representation.last_update`).

        The fold: the features are ``x + L(s)`` (SchNet: the last block's last dense layer
        L = (D, d)) and the head starts with ``W1 . + b1``, so its hidden layer is
        ``W1 x + (W1 D) s + (W1 d + b1)``: two products of the head's width (64) in place of
        one of the features' (128 x 128) and one of the head's, and the same two backward
        (forces): one 128 x 128 product fewer each way, of SchNet's 35 per energy and
        forces. The same values up to float32 rounding of ``W1 D``.
        """
        state = self.representation.freeze()
        last, first = self.representation.last_update(), self.head[0]
        if (
            last is None
            or self.dipole is not None
            or len(self.head) != 3  # (Linear, activation, Linear): _folded_hidden's head
            or not isinstance(last, nn.Linear)
            or not isinstance(first, nn.Linear)
        ):
            return FrozenModel(state)
        weight = first.weight @ last.weight
        bias = first.bias if first.bias is not None else torch.zeros_like(first.weight[:, 0])
        if last.bias is not None:
            bias = bias + first.weight @ last.bias
        return FrozenModel(state, weight, bias)

    def _folded_hidden(
        self, numbers: torch.Tensor, positions: torch.Tensor, pairs: Pairs, frozen: FrozenModel
    ) -> torch.Tensor:
        """The head's hidden layer (before its activation) by the fold of :meth:`freeze`."""
        x, s = self.representation(
            numbers, positions, pairs, frozen.representation, split_last=True
        )
        first = self.head[0]
        return linear(x, first.weight, frozen.head_bias) + linear(s, frozen.head_weight)

    def forward(
        self, batch: Batch, forces: bool = False, stress: bool = False, frozen: Any = None
    ) -> dict[str, torch.Tensor]:
        """Predict ``{target: (n_structures,), "atomic": (n_atoms,)}``, plus
        ``"forces"`` ``(n_atoms, 3)`` and ``"stress"`` ``(n_structures, 3, 3)`` if asked.

        ``batch`` is a :class:`~atomlens.data.Batch`, or ASE ``Atoms`` (one or a list,
        periodic or not). Stress (eV/Angstrom^3, ASE's sign) needs periodic structures; it
        is zero for structures without periodic directions. The low-level, differentiable
        call: tensors in the model's dtype (float32 unless converted) and unit, attached to
        the autograd graph when gradients are on (as training needs). For numbers to read or
        store, use :meth:`predict`.
        """
        if not isinstance(batch, Batch):
            batch = self.batch_from_atoms(batch)
        positions, pairs = batch.positions, batch.pairs
        if (forces or stress) and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        inputs = [positions]
        if stress:
            if batch.cell is None:
                raise ValueError("stress needs structures with a cell (periodic structures)")
            strain = torch.zeros_like(batch.cell).requires_grad_(True)
            inputs.append(strain)
            positions, pairs, _ = apply_strain(
                positions, pairs, batch.cell, batch.structure_index, strain
            )
        # force training differentiates the forces again: PyTorch's products there (nn.linear)
        second_order = (forces or stress) and self.training and torch.is_grad_enabled()
        with plain_products() if second_order else contextlib.nullcontext():
            atomic = self.atomic_energies(batch.numbers, positions, pairs, frozen)
        if self.dipole is not None:
            if forces or stress:
                raise ValueError("a dipole model predicts no forces or stress")
            return self.dipole(atomic, batch, self.target)
        total = scatter_sum(atomic, batch.structure_index, batch.n_structures)
        if self.config.aggregation == "mean":
            total = total / batch.n_atoms_per.to(total.dtype)
        out = {self.target: total, "atomic": atomic}
        if forces or stress:
            grads = torch.autograd.grad(total.sum(), inputs, create_graph=self.training)
            if forces:
                out["forces"] = -grads[0]
            if stress:
                volume = cell_volume(batch.cell)
                periodic = batch.pbc.any(dim=1) if batch.pbc is not None else volume > 0
                safe = torch.where(periodic, volume, torch.ones_like(volume))
                out["stress"] = grads[-1] / safe[:, None, None] * periodic[:, None, None]
        return out

    def predict(
        self,
        atoms,
        forces: bool = False,
        stress: bool = False,
        allow_unknown_elements: bool = False,
    ) -> Prediction:
        """Predict for one ASE ``Atoms`` or a list of them: plain float64 numpy arrays.

        ``{target: (n_structures,), "atomic": (n_atoms,), "forces": (n_atoms, 3),
        "stress": (n_structures, 3, 3)}`` in the model's units, named in ``result.units``
        (eV, eV/Angstrom, eV/Angstrom^3 for energy models; a dipole model gives ``dipole``
        and ``charges`` in e); the atomic contributions sum to the target (extensive
        models). No autograd graph. Periodic ``Atoms`` keep their cell. Elements absent
        from the training data are refused (a warning with ``allow_unknown_elements``);
        non-finite outputs are an error (see :mod:`atomlens.models.guards`).
        """
        from .guards import check_elements, check_finite

        batch = self.batch_from_atoms(atoms)
        check_elements(self, batch.numbers.cpu().numpy(), allow_unknown_elements)
        if stress and batch.cell is not None:
            from ..data.dataset import DataError
            from ..data.neighbors import MIN_CELL_EXTENT

            periodic = batch.pbc.any(dim=1)
            flat = periodic & ~(cell_volume(batch.cell).abs() >= MIN_CELL_EXTENT)
            if bool(flat.any()):  # a slab or sheet without its vacuum: stress is per volume
                raise DataError(
                    f"stress of structure {int(flat.nonzero()[0])}: its cell has no volume "
                    f"(stress is per volume: give the slab's cell its vacuum)"
                )
        with torch.set_grad_enabled(forces or stress):
            out = self(batch, forces=forces, stress=stress)
        out = {k: v.detach().cpu().double().numpy() for k, v in out.items()}
        check_finite(out)
        unit = self.config.unit
        charges = "e" if self.dipole is not None else unit
        units = {
            self.target: unit,
            "atomic": charges,
            "charges": "e",
            "dipole": unit,
            "forces": f"{unit}/Angstrom",
            "stress": f"{unit}/Angstrom^3",
        }
        return Prediction(out, {k: units.get(k, "") for k in out})

    def batch_from_atoms(self, atoms) -> Batch:
        """A validated batch of ASE ``Atoms`` (cells and pbc kept) on this model's device."""
        from ..data.dataset import dataset_from_atoms

        data = dataset_from_atoms(atoms, targets=False)
        p = next(self.parameters())
        return data.batch(range(len(data)), self.cutoff, p.dtype).to(p.device)


def _init_names(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _json_value(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def build_model(config: ModelConfig | dict) -> AtomisticModel:
    """The model of ``config``, its types and ranges checked first (a hand-edited saved
    config is refused naming the value, not at its first prediction)."""
    from ..config_checks import check_model_config

    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    check_model_config(config)
    return AtomisticModel(config)
