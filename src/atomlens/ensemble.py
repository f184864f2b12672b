"""Ensembles of trained models: the mean prediction and the spread between the members.

    E = (1/K) sum_k E_k                  sigma_E = sqrt((1/K) sum_k (E_k - E)^2)
    F_i = (1/K) sum_k F_k,i              sigma_F,i = componentwise, the same formula

The spread (population standard deviation over the K members, eV and eV/Angstrom) is an
uncertainty of the prediction: where the members disagree, the structure is unlike the
training data. :class:`EnsembleCalculator` is an ASE calculator (usable in MD, which logs
the spread); :func:`predict_ensemble` serves lists of structures (``atomlens predict``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

MANIFEST = "ensemble.json"  # written by atomlens.training.ensemble


def is_ensemble_folder(path) -> bool:
    """Whether ``path`` is an ensemble folder (it holds ``ensemble.json``)."""
    return (Path(path) / MANIFEST).is_file()


def ensemble_members(paths) -> list[Path]:
    """Model folders named by ``paths``: each a model folder, a training output folder, or
    an ensemble folder (with ``ensemble.json``, as ``atomlens train --ensemble`` writes)."""
    from .models.io import model_folder

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    members = []
    for path in map(Path, paths):
        manifest = path / MANIFEST
        if manifest.is_file():
            try:
                names = json.loads(manifest.read_text())["members"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{manifest}: damaged ensemble manifest ({err})") from err
            members.extend(model_folder(path / name) for name in names)
        else:
            members.append(model_folder(path))
    seen: dict[Path, Path] = {}
    for member in members:  # one model twice would count double and shrink the spread
        first = seen.setdefault(member.resolve(), member)
        if first is not member:
            raise ValueError(f"{member}: the same model is given twice as a member")
    return members


def check_members(models) -> None:
    """Refuse an ensemble whose members predict different things (target or unit), or that
    holds one model twice (the same config and weights, in whatever precision or device):
    it would count double and shrink the spread."""
    kinds = {(m.target, m.config.unit) for m in models}
    if len(kinds) > 1:
        raise ValueError(f"ensemble members predict different things: {sorted(kinds)}")
    for b, later in enumerate(models):
        for a, earlier in enumerate(models[:b]):
            if _same_model(earlier, later):
                raise ValueError(
                    f"ensemble members {a} and {b} are the same model: one model is given "
                    f"twice as a member"
                )


def _same_model(first, second) -> bool:
    """Same config, and weights equal to float32 rounding (a float64 model and its float32
    copy are one model; two trainings differ far more)."""
    import torch

    if first is second:
        return True
    if first.config.to_dict() != second.config.to_dict():
        return False
    ours, theirs = first.state_dict(), second.state_dict()
    as_double = lambda t: t.detach().cpu().double()
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape
        and torch.allclose(as_double(ours[k]), as_double(theirs[k]), rtol=1e-6, atol=1e-6)
        for k in ours
    )


def load_ensemble(paths, device: str = "cpu", dtype=None) -> list:
    """The :class:`~atomlens.models.AtomisticModel` of every member (see :func:`ensemble_members`
    and :func:`check_members`)."""
    from .models.io import load_model

    models = [load_model(p, device=device, dtype=dtype) for p in ensemble_members(paths)]
    check_members(models)
    return models


def mean_and_spread(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population standard deviation over the members (axis 0), float64."""
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    return stacked.mean(0), stacked.std(0)


def predict_ensemble(
    models: list,
    atoms,
    forces: bool = False,
    allow_unknown_elements: bool = False,
    stress: bool = False,
) -> dict[str, np.ndarray]:
    """Mean and spread of the members' predictions for one ``Atoms`` or a list.

    Keys: the target (n_structures,) and ``<target>_std``; ``atomic`` (n_atoms,) and
    ``atomic_std``; with ``forces`` also ``forces`` (n_atoms, 3) and ``forces_std``; with
    ``stress`` also ``stress`` (n_structures, 3, 3) and ``stress_std``. Units as
    :meth:`~atomlens.models.AtomisticModel.predict` (eV, eV/Angstrom, eV/Angstrom^3 for
    energy models).
    """
    predictions = [
        model.predict(
            atoms, forces=forces, stress=stress, allow_unknown_elements=allow_unknown_elements
        )
        for model in models
    ]
    target = models[0].target
    out = {}
    extra = (["forces"] if forces else []) + (["stress"] if stress else [])
    for key in [target, "atomic", *extra]:
        out[key], out[f"{key}_std"] = mean_and_spread([p[key] for p in predictions])
    return out


class EnsembleCalculator(AseCalculator):
    """ASE calculator averaging K atomlens energy models, with their spread as uncertainty.

    Args:
        models: models, or paths of model / training output / ensemble folders; they must
            predict the same thing, and none may be given twice (:func:`check_members`).
        device, dtype, compile, allow_unknown_elements: as for :class:`atomlens.Calculator`,
            for every member.

    ``results``: ``energy``, ``free_energy``, ``forces``, ``energies`` (means of the
    members, eV and eV/Angstrom), ``energy_std`` (eV), ``forces_std`` (n_atoms, 3,
    eV/Angstrom), ``energies_std`` (n_atoms, eV), and ``max_force_std`` (eV/Angstrom): the
    largest per-atom spread sqrt(sum_c sigma_F,ic^2), one number to watch in MD.
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "forces",
        "energies",
        "stress",
        "energy_std",
        "forces_std",
        "energies_std",
        "stress_std",
        "max_force_std",
    ]

    def __init__(
        self,
        models,
        device: str = "cpu",
        dtype=None,
        compile: bool | str = "auto",
        allow_unknown_elements: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        from .calculator import Calculator
        from .models.io import parse_dtype

        dtype = parse_dtype(dtype)  # refused before any model loads
        if isinstance(models, (str, os.PathLike)) or not isinstance(models, (list, tuple)):
            models = [models]
        paths = [m for m in models if isinstance(m, (str, os.PathLike))]
        if paths:
            models = [m for m in models if not isinstance(m, (str, os.PathLike))]
            models += ensemble_members(paths)
        if len(models) < 2:
            raise ValueError(f"an ensemble needs at least two models, got {len(models)}")
        self.members = [
            Calculator(
                m,
                device=device,
                dtype=dtype,
                compile=compile,
                allow_unknown_elements=allow_unknown_elements,
            )
            for m in models
        ]
        check_members([member.model for member in self.members])
        # one "compiling ..." notice for the ensemble, not one per member
        self.members[0].compile_notice = f"; {len(models)} models"
        for member in self.members[1:]:
            member.compile_notice = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        forces = (
            "forces" in properties or "forces_std" in properties or ("max_force_std" in properties)
        )
        stress = "stress" in properties or "stress_std" in properties
        wanted = (
            ["energy", "energies"] + (["forces"] if forces else []) + (["stress"] if stress else [])
        )
        for member in self.members:
            member.calculate(self.atoms, wanted, system_changes)
        results = {}
        for key in wanted:
            results[key], results[f"{key}_std"] = mean_and_spread(
                [member.results[key] for member in self.members]
            )
        results["energy"] = float(results["energy"])
        results["energy_std"] = float(results["energy_std"])
        results["free_energy"] = results["energy"]
        if forces:
            results["max_force_std"] = float(np.sqrt((results["forces_std"] ** 2).sum(1)).max())
        self.results = results
