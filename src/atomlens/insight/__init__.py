"""Chemical insight from trained models (DTNN paper): atomic energies, local chemical potential
maps, ring stabilities, isomer rankings, size extensivity. Figures live in :mod:`.plots`."""

from .atomic import AtomicEnergies, atomic_energies
from .extensivity import ExtensivityResult, extensivity
from .potential_map import PotentialMap, isolated_atom_energy, potential_map, probe_energies

__all__ = [
    "AtomicEnergies",
    "ExtensivityResult",
    "PotentialMap",
    "atomic_energies",
    "extensivity",
    "isolated_atom_energy",
    "potential_map",
    "probe_energies",
]
