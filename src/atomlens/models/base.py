"""The representation contract, written once, and the registry of representations.

A *representation* turns a structure into one feature vector per atom. Every model in
atomlens (SchNet, DTNN, and any model added later) is a subclass of :class:`Representation`
and meets this contract:

* **Construction**: keyword arguments only, JSON-serialisable (they are stored in the saved
  model's ``config.json``), including ``max_z``, the largest atomic number embedded.
* **Attributes**: ``n_atom_basis`` (int, the feature size F), ``cutoff`` (float, Angstrom,
  or ``None`` for a model that sees all pairs; periodic structures need a cutoff).
* **forward(numbers, positions, pairs, frozen=None) -> features**

  ============  =============================  ==========================================
  argument      shape, dtype                   meaning
  ============  =============================  ==========================================
  numbers       (n_atoms,) int64               atomic numbers Z
  positions     (n_atoms, 3) float             Angstrom; differentiable (forces, stress)
  pairs         :class:`~atomlens.data.Pairs`  directed pairs i <- j with periodic shifts;
                                               in the symmetric layout the second half is
                                               the first reversed, and pair functions of
                                               the distance may be evaluated on the first
                                               half only
  frozen        whatever :meth:`freeze`        precomputed state of a model whose weights
                returned, or None              do not change (inference, MD)
  returns       (n_atoms, n_atom_basis) float  per-atom features
  ============  =============================  ==========================================

  Distances are read with :func:`atomlens.nn.geometry.pair_vectors` (r_ij = r_j - r_i +
  shift_ij), never from positions directly, so that periodic images and strain (stress)
  work for every model. Pairs may include pairs beyond the cutoff (Verlet lists with a
  skin): the model must give them exactly zero weight (a smooth cutoff does).
* **freeze() -> object | None**: state that depends on the weights only (SchNet: its filter
  tables), computed once by callers that run a frozen model many times; ``None`` if none.
* **last_update() -> nn.Module | None** (optional): the linear layer L whose output ends
  the features, ``features = x + L(s)``, where ``forward(..., split_last=True)`` returns
  ``(x, s)``; a linear head's first layer folds into it for frozen models
  (:meth:`~atomlens.models.AtomisticModel.freeze`). None (the default): no such layer.
  ``split_modules()`` names the modules that split call skips or splits (hooks on them turn
  the fold off; default: all).

:mod:`atomlens.registry` maps a config name to its class (without importing torch, for the
command line); a new model is one file, one line there, and one test class inheriting
``tests/contract.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.batch import Pairs
from ..registry import REPRESENTATION_CLASSES, representation_names


class Representation(nn.Module):
    """Base class of atomlens representations: see the module docstring for the contract."""

    n_atom_basis: int
    cutoff: float | None

    def forward(
        self, numbers: torch.Tensor, positions: torch.Tensor, pairs: Pairs, frozen: Any = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def freeze(self) -> Any:
        """Weight-only state to pass as ``frozen`` while the weights stay fixed (default none)."""
        return None

    def last_update(self) -> nn.Module | None:
        """The linear layer that ends the features (module doc), or None (default)."""
        return None

    def split_modules(self) -> list[nn.Module]:
        """The modules whose calls ``forward(..., split_last=True)`` skips or splits: hooks
        on any of them turn a fold off (default: all of this representation's)."""
        return list(self.modules())


def hooked(*modules: nn.Module) -> bool:
    """Whether forward or backward hooks (of these modules, or global ones) are registered."""
    from torch.nn.modules import module as torch_module

    if (
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    ):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


def representation_class(name: str) -> type[Representation]:
    """The class registered as ``name`` in :mod:`atomlens.registry` (imported on demand)."""
    import importlib

    if name not in REPRESENTATION_CLASSES:
        raise ValueError(f"unknown representation {name!r}; known: {representation_names()}")
    module, cls = REPRESENTATION_CLASSES[name].split(":")
    found = getattr(importlib.import_module(module), cls)
    if not issubclass(found, Representation):
        raise TypeError(f"{REPRESENTATION_CLASSES[name]} is not a Representation")
    return found
