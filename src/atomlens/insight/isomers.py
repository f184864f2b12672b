"""Constitutional isomers: does the model rank the isomers of one formula like the reference?

For the isomers m of one formula (QM9 has 6,095 of C7H10O2), with m0 the isomer of lowest
reference energy:

    dE_ref(m)  = E_ref(m)  - E_ref(m0)          dE_pred(m) = E_pred(m) - E_pred(m0)      (eV)

reported: the Spearman rank correlation of E_pred with E_ref, the MAE of the relative energies
dE_pred - dE_ref, and the MAE of the energies themselves. The relative MAE carries the error of
the one molecule m0 into every term; the *centred* MAE, mean |err - mean(err)| with
err = E_pred - E_ref, is the error of relative energies free of any one reference molecule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase.data import chemical_symbols


def hill_formula(counts: dict[str, int]) -> str:
    """C and H first, then the other elements alphabetically (C7H10O2)."""
    order = (["C", "H"] if "C" in counts else []) + sorted(
        e for e in counts if e not in (("C", "H") if "C" in counts else ())
    )
    return "".join(f"{e}{counts[e] if counts[e] > 1 else ''}" for e in order if counts.get(e))


def parse_formula(formula: str) -> str:
    """A formula in Hill order, whatever order it was written in (``O2C7H10`` -> C7H10O2)."""
    from ase.formula import Formula

    try:
        counts = Formula(formula).count()
    except Exception as err:  # ASE raises ValueError for most, other types for some inputs
        raise ValueError(f"not a chemical formula: {formula!r}") from err
    unknown = [e for e in counts if e not in chemical_symbols[1:]]
    if unknown or not counts:
        raise ValueError(f"not a chemical formula: {formula!r} (unknown elements {unknown})")
    return hill_formula(counts)


def formulas(data) -> np.ndarray:
    """Hill formula of every structure of a packed data set (vectorised element counting)."""
    numbers = np.asarray(data.numbers).astype(np.int64)
    counts_per = data.n_atoms_per
    molecule = np.repeat(np.arange(len(data)), counts_per)
    elements = np.unique(numbers)
    table = np.zeros((len(data), len(elements)), dtype=np.int64)
    np.add.at(table, (molecule, np.searchsorted(elements, numbers)), 1)
    symbols = [chemical_symbols[z] for z in elements]
    keys, inverse = np.unique(table, axis=0, return_inverse=True)
    names = np.array([hill_formula(dict(zip(symbols, row.tolist()))) for row in keys])
    return names[np.asarray(inverse).reshape(-1)]


def isomer_indices(data, formula: str) -> np.ndarray:
    """Indices of the structures with ``formula`` (any element order)."""
    return np.nonzero(formulas(data) == parse_formula(formula))[0]


@dataclass
class IsomerAnalysis:
    formula: str
    indices: np.ndarray  # data set indices of the isomers
    reference: np.ndarray  # E_ref (eV)
    predicted: np.ndarray  # E_pred (eV)
    spearman: float
    relative_mae: float  # MAE of dE_pred - dE_ref (eV)
    mae: float  # MAE of E_pred - E_ref (eV)
    centred_mae: float  # mean |err - mean(err)| (eV)

    @property
    def lowest(self) -> int:
        return int(np.argmin(self.reference))

    @property
    def relative_reference(self) -> np.ndarray:
        return self.reference - self.reference[self.lowest]

    @property
    def relative_predicted(self) -> np.ndarray:
        return self.predicted - self.predicted[self.lowest]

    def summary(self) -> dict:
        return {
            "formula": self.formula,
            "n_isomers": len(self.indices),
            "spearman": self.spearman,
            "relative_mae_eV": self.relative_mae,
            "mae_eV": self.mae,
            "centred_mae_eV": self.centred_mae,
            "lowest_index": int(self.indices[self.lowest]),
            "predicted_lowest_index": int(self.indices[int(np.argmin(self.predicted))]),
        }


def analyse_isomers(
    reference: np.ndarray,
    predicted: np.ndarray,
    indices: np.ndarray | None = None,
    formula: str = "",
) -> IsomerAnalysis:
    """Rank correlation and relative-energy errors of predicted against reference energies."""
    from scipy.stats import spearmanr

    reference = np.asarray(reference, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if reference.shape != predicted.shape or reference.ndim != 1:
        raise ValueError("reference and predicted must be 1D arrays of equal length")
    if len(reference) < 2:
        raise ValueError(
            f"{len(reference)} isomer(s) of {formula or 'this formula'}: "
            "a ranking needs at least two"
        )
    lowest = int(np.argmin(reference))
    rel_ref = reference - reference[lowest]
    rel_pred = predicted - predicted[lowest]
    rho = float(spearmanr(reference, predicted).statistic)
    indices = np.arange(len(reference)) if indices is None else np.asarray(indices)
    err = predicted - reference
    return IsomerAnalysis(
        formula,
        indices,
        reference,
        predicted,
        rho,
        float(np.abs(rel_pred - rel_ref).mean()),
        float(np.abs(err).mean()),
        float(np.abs(err - err.mean()).mean()),
    )


def isomer_analysis(
    model, data, formula: str = "C7H10O2", indices: np.ndarray | None = None, batch_size: int = 100
) -> IsomerAnalysis:
    """Predict all isomers of ``formula`` in ``data`` (optionally only those in ``indices``)."""
    from ..models.inference import predict_dataset

    formula = parse_formula(formula)
    found = isomer_indices(data, formula)
    if indices is not None:
        found = np.intersect1d(found, np.asarray(indices))
    if len(found) == 0:
        raise ValueError(f"no structure with formula {formula} in the data set")
    target = model.target
    if target not in data.targets:
        held = data.model_targets
        raise ValueError(
            f"the model predicts {target!r}, which the data set does not hold (it has "
            f"{', '.join(held) or 'no reference values'}): compare isomers with a model "
            f"trained on one of its targets"
        )
    predicted = predict_dataset(model, data, found, batch_size)[target]
    reference = np.asarray(data.targets[target])[found]
    return analyse_isomers(reference, predicted, found, formula)
