"""Unit conversions at the edges: the factors against CODATA relations, conversions both
ways, and force units that must be energy unit / length unit."""

import numpy as np
import pytest

from atomlens.units import (
    check_force_unit,
    convert_energy,
    energy_factor,
    force_factor,
    length_factor,
)


def test_energy_conversions_follow_codata_relations():
    assert convert_energy(1.0, "hartree") == pytest.approx(27.211386245988, rel=1e-12)
    assert convert_energy(1.0, "hartree", "kcal/mol") == pytest.approx(627.509474, rel=1e-8)
    assert convert_energy(1.0, "kcal/mol", "kJ/mol") == pytest.approx(4.184, rel=1e-9)
    assert convert_energy(1.0, "eV", "kcal/mol") == pytest.approx(23.060547830619, rel=1e-12)
    assert convert_energy(2500.0, "meV", "eV") == pytest.approx(2.5)
    values = np.array([1.0, -2.0])
    there = convert_energy(values, "eV", "hartree")
    np.testing.assert_allclose(convert_energy(there, "Ha", "eV"), values, rtol=1e-14)
    np.testing.assert_allclose(there, values / 27.211386245988, rtol=1e-12)


def test_force_factors_are_energy_over_length():
    assert force_factor("eV/Angstrom") == 1.0
    assert force_factor("kcal/mol/Ang") == pytest.approx(energy_factor("kcal/mol"))
    assert force_factor("hartree/bohr") == pytest.approx(27.211386245988 / 0.529177210903)
    assert length_factor("nm") == 10.0
    with pytest.raises(ValueError, match="must look like"):
        force_factor("eV")


@pytest.mark.parametrize(
    "force,energy,length",
    [
        ("eV/bohr", "eV", "Angstrom"),  # the length differs by 1.89
        ("kcal/mol/bohr", "kcal/mol", "Angstrom"),
        ("eV/Angstrom", "kcal/mol", "Angstrom"),  # the energy differs by 23
        ("kJ/mol/Ang", "kcal/mol", "Ang"),  # by 4.184
    ],
)
def test_a_force_unit_that_is_not_the_energy_gradient_is_refused(force, energy, length):
    with pytest.raises(ValueError, match="not energy unit / length unit"):
        check_force_unit(force, energy, length)


def test_a_matching_force_unit_gives_its_factor():
    assert check_force_unit("kcal/mol/Ang", "kcal/mol", "Angstrom") == pytest.approx(
        1.0 / 23.060547830619
    )
    assert check_force_unit("Ha/bohr", "hartree", "bohr") == pytest.approx(51.422086190832)


def test_unknown_units_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown energy unit 'kcal'; known: \['Ha', "):
        energy_factor("kcal")
    with pytest.raises(ValueError, match=r"unknown length unit 'pm'; known: \['A', "):
        length_factor("pm")
