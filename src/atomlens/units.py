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
EV_A3_GPA = 160.21766208  # 1 eV/Angstrom^3 in GPa (stress)
#: 1 e*Angstrom in debye (= 1 / (DEBYE_EAU * BOHR_ANGSTROM) = 4.80320...)
E_ANGSTROM_DEBYE = 1.0 / (DEBYE_EAU * BOHR_ANGSTROM)

#: energy units -> factor to eV
ENERGY = {
    "eV": 1.0,
    "meV": 1e-3,
    "hartree": HARTREE_EV,
    "Ha": HARTREE_EV,
    "kcal/mol": KCAL_MOL_EV,
    "kJ/mol": KJ_MOL_EV,
}
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


def resolve_unit(
    kind: str, stored: str | None, given: str | None, default: str | None = None
) -> str | None:
    """The unit of a file's ``kind`` (``"energy"`` or ``"length"``) values: the one the file
    states (``stored``) or the one the caller declares (``given``); if both are there they
    must agree; if neither is, ``default`` (never a guess: ``None`` unless a format defines
    the unit). Raises ValueError for unknown or disagreeing units."""
    factor = energy_factor if kind == "energy" else length_factor
    for unit in (stored, given, default):
        if unit is not None:
            factor(unit)
    if stored is not None and given is not None and factor(stored) != factor(given):
        raise ValueError(f"the file says its {kind} unit is {stored!r} but {given!r} was declared")
    return stored or given or default


def check_force_unit(force_unit: str, energy_unit: str, length_unit: str) -> float:
    """The factor of ``force_unit`` to eV/Angstrom, which must equal energy unit / length
    unit (forces are the negative gradient of the energy); ValueError otherwise."""
    factor = force_factor(force_unit)
    expected = energy_factor(energy_unit) / length_factor(length_unit)
    if abs(factor / expected - 1.0) > 1e-9:
        raise ValueError(
            f"force unit {force_unit!r} is not energy unit / length unit "
            f"({energy_unit}/{length_unit}); the forces would not be the gradient "
            f"of the energies"
        )
    return factor
