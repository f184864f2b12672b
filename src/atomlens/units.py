"""The one place for unit constants and conversions.

Inside atomlens energies are in eV, distances in Angstrom and forces in eV/Angstrom.
Conversions happen only where data enter or leave (readers, writers, reports).
"""

from __future__ import annotations

HARTREE_EV = 27.211386245988
KCAL_MOL_EV = 1.0 / 23.060547830619026  # 1 kcal/mol in eV
KJ_MOL_EV = 1.0 / 96.48533212331
BOHR_ANGSTROM = 0.529177210903
DEBYE_EAU = 0.393430307  # 1 debye in e*bohr
#: 1 e*Angstrom in debye (= 1 / (DEBYE_EAU * BOHR_ANGSTROM) = 4.80320...)
E_ANGSTROM_DEBYE = 1.0 / (DEBYE_EAU * BOHR_ANGSTROM)

#: energy units -> factor to eV
ENERGY = {"eV": 1.0, "meV": 1e-3, "hartree": HARTREE_EV, "Ha": HARTREE_EV,
          "kcal/mol": KCAL_MOL_EV, "kJ/mol": KJ_MOL_EV}
#: length units -> factor to Angstrom
LENGTH = {"Angstrom": 1.0, "Ang": 1.0, "A": 1.0, "bohr": BOHR_ANGSTROM, "nm": 10.0}


def energy_factor(unit: str) -> float:
    """Factor that converts an energy in ``unit`` to eV."""
    try:
        return ENERGY[unit]
    except KeyError:
        raise ValueError(f"unknown energy unit {unit!r}; known: {sorted(ENERGY)}") from None


def length_factor(unit: str) -> float:
    """Factor that converts a length in ``unit`` to Angstrom."""
    try:
        return LENGTH[unit]
    except KeyError:
        raise ValueError(f"unknown length unit {unit!r}; known: {sorted(LENGTH)}") from None


def force_factor(unit: str) -> float:
    """Factor that converts a force given as ``"<energy>/<length>"`` to eV/Angstrom."""
    energy, _, length = unit.rpartition("/")
    if not energy:
        raise ValueError(f"force unit {unit!r} must look like 'kcal/mol/Ang' or 'eV/Angstrom'")
    return energy_factor(energy) / length_factor(length)


def convert_energy(value, from_unit: str, to_unit: str = "eV"):
    """Convert an energy (scalar or array) between units."""
    return value * (energy_factor(from_unit) / energy_factor(to_unit))
