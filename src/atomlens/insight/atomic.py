"""Atomic energies: the model's decomposition of a total energy into per-atom parts.

    E = sum_i E_i,     E_i = scale * head(c_i^(T)) + shift + atomref[Z_i]        (eV)

The DTNN paper (Schütt et al., Nat. Commun. 8, 13890, 2017) reads E_i as the energy of atom i
in its chemical environment; the atom references ``atomref[Z]`` are fitted per element on the
training split, so ``E_i - atomref[Z_i]`` (the *relative* atomic energy) is what distinguishes
a carbon in benzene from one in cyclohexane. A dipole model (``ModelConfig.output =
"dipole"``) given as ``charge_model`` adds its latent partial charges ``q_i`` (e) beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.potential import AtomisticModel


@dataclass
class AtomicEnergies:
    """Per-atom energies of one structure (eV), with the model's element references."""

    symbols: list[str]
    numbers: np.ndarray  # (n_atoms,)
    positions: np.ndarray  # (n_atoms, 3) Angstrom
    energies: np.ndarray  # (n_atoms,) E_i, eV
    references: np.ndarray  # (n_atoms,) atomref[Z_i], eV
    total: float  # sum_i E_i (eV)
    formula: str = ""
    charges: np.ndarray | None = None  # (n_atoms,) partial charges q_i of a dipole model, e

    @property
    def relative(self) -> np.ndarray:
        """E_i - atomref[Z_i] (eV): the part of E_i that depends on the environment."""
        return self.energies - self.references

    def rows(self) -> list[dict]:
        rows = [
            {"index": k, "symbol": s, "energy": float(e), "relative": float(r)}
            for k, (s, e, r) in enumerate(zip(self.symbols, self.energies, self.relative))
        ]
        if self.charges is not None:
            for row, charge in zip(rows, self.charges):
                row["charge"] = float(charge)
        return rows

    def table(self, unit: str = "eV") -> str:
        """A printable table: index, element, E_i, E_i - atomref[Z_i] (and q_i); sums last."""
        title = f"{self.formula}: E = {self.total:.6f} {unit}, sum of {len(self.symbols)} atoms"
        header = f"{'atom':>5} {'el':>3} {'E_i (' + unit + ')':>16} {'E_i - atomref':>15}"
        charged = self.charges is not None
        lines = [title, header + (f" {'q_i (e)':>10}" if charged else "")]
        for row in self.rows():
            lines.append(
                f"{row['index']:>5} {row['symbol']:>3} {row['energy']:>16.6f} "
                f"{row['relative']:>15.6f}" + (f" {row['charge']:>10.4f}" if charged else "")
            )
        lines.append(
            f"{'sum':>9} {float(self.energies.sum()):>16.6f} "
            f"{float(self.relative.sum()):>15.6f}"
            + (f" {float(self.charges.sum()):>10.4f}" if charged else "")
        )
        return "\n".join(lines)


def atomic_energies(
    model: AtomisticModel,
    atoms_or_list,
    batch_size: int = 100,
    charge_model: AtomisticModel | None = None,
    allow_unknown_elements: bool = False,
) -> AtomicEnergies | list[AtomicEnergies]:
    """Atomic energies E_i of one ASE ``Atoms`` (returns one table) or of a list (a list).

    The E_i sum to the model's total energy exactly (same forward pass). ``charge_model``,
    a dipole model, adds its partial charges q_i (e), which sum to the total charge.
    Elements absent from the models' training data are refused (a warning with
    ``allow_unknown_elements``).
    """
    from ..models.guards import require_extensive_energy

    if charge_model is not None and charge_model.config.output != "dipole":
        raise ValueError(
            f"the charge model predicts {charge_model.target!r}, not partial "
            "charges: give a model trained on a dipole target (QM9 mu)"
        )
    require_extensive_energy(model, "atomic energies")
    single = not isinstance(atoms_or_list, (list, tuple))
    frames = [atoms_or_list] if single else list(atoms_or_list)
    atomref = model.atomref.detach().cpu().numpy().astype(np.float64)
    results = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        out = model.predict(chunk, allow_unknown_elements=allow_unknown_elements)
        charges = (
            None
            if charge_model is None
            else charge_model.predict(chunk, allow_unknown_elements=allow_unknown_elements)[
                "charges"
            ]
        )
        offset = 0
        for k, atoms in enumerate(chunk):
            n = len(atoms)
            numbers = atoms.get_atomic_numbers()
            results.append(
                AtomicEnergies(
                    symbols=atoms.get_chemical_symbols(),
                    numbers=numbers,
                    positions=atoms.get_positions(),
                    energies=out["atomic"][offset : offset + n].astype(np.float64),
                    references=atomref[numbers],
                    total=float(out[model.target][k]),
                    formula=atoms.get_chemical_formula(),
                    charges=None if charges is None else charges[offset : offset + n],
                )
            )
            offset += n
    return results[0] if single else results
