"""Splits (reproducible, disjoint, saved) and statistics (atom references, scale/shift)."""

import argparse

import numpy as np
import pytest

from atomlens.data import DataError, PackedDataset
from atomlens.data.splits import load_split, random_split, save_split
from atomlens.data.statistics import composition, fit_atomrefs, residual_stats


def test_random_split_reproducible_and_disjoint():
    a = random_split(100, 60, 20, seed=3)
    b = random_split(100, 60, 20, seed=3)
    c = random_split(100, 60, 20, seed=4)
    assert {k: len(v) for k, v in a.items()} == {"train": 60, "val": 20, "test": 20}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["train"], c["train"])
    everything = np.concatenate(list(a.values()))
    assert len(np.unique(everything)) == 100


def test_split_size_one_point_zero_is_ambiguous_and_the_command_line_keeps_counts():
    """1.0 was taken as one structure (a user meaning "all of it" trained on one); it is
    refused. On the command line "1" is a count and "0.8" a fraction."""
    from atomlens.cli.train import count_or_fraction
    from atomlens.data import DataError

    with pytest.raises(DataError, match="ambiguous: write 1 for one structure"):
        random_split(100, 1.0, 10)
    assert len(random_split(100, 1, 10)["train"]) == 1
    assert len(random_split(100, 10.0, 10)["train"]) == 10  # 1e1 in YAML: a count
    assert count_or_fraction("1") == 1 and isinstance(count_or_fraction("1"), int)
    assert count_or_fraction("0.8") == 0.8 and count_or_fraction("1e4") == 10000.0
    with pytest.raises(argparse.ArgumentTypeError, match="neither a count nor a fraction"):
        count_or_fraction("all")


def test_random_split_fractions_and_explicit_test():
    split = random_split(1000, 0.8, 0.1, 50, seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [800, 100, 50]
    assert len(np.intersect1d(split["train"], split["test"])) == 0


@pytest.mark.parametrize("sizes", [(80, 30, None), (50, 30, 30), (1.5, 10, None), (-1, 2, None)])
def test_random_split_rejects_impossible_sizes(sizes):
    with pytest.raises(DataError):
        random_split(100, *sizes)


def test_split_save_load_roundtrip(tmp_path):
    split = random_split(50, 30, 10, seed=1)
    path = save_split(tmp_path / "split.npz", split)
    back = load_split(path, n=50)
    assert sorted(back) == ["test", "train", "val"]
    for k in split:
        np.testing.assert_array_equal(split[k], back[k])
    with pytest.raises(DataError, match="out of range"):
        load_split(path, n=10)
    (tmp_path / "bad.npz").write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="bad.npz"):
        load_split(tmp_path / "bad.npz")


def _synthetic(n=200, seed=0, noise=0.0):
    """Random molecules of H, C, N, O with E = sum of known per-element energies."""
    rng = np.random.default_rng(seed)
    refs = {1: -13.6, 6: -1029.5, 7: -1485.3, 8: -2042.6}
    structures, energies, gaps = [], [], []
    for _ in range(n):
        k = int(rng.integers(2, 9))
        z = rng.choice(list(refs), size=k)
        r = np.arange(k)[:, None] * np.array([1.3, 0.0, 0.0]) + rng.normal(0, 0.05, (k, 3))
        structures.append((z, r))
        energies.append(sum(refs[int(a)] for a in z) + noise * rng.normal())
        gaps.append(rng.normal(5.0, 0.5))
    data = PackedDataset.from_structures(
        structures, {"energy": energies, "gap": gaps}, {"energy": "eV", "gap": "eV"}
    )
    return data, refs


def test_fit_atomrefs_recovers_known_energies():
    data, refs = _synthetic()
    idx = np.arange(150)
    atomrefs = fit_atomrefs(data, idx, "energy", max_z=10)
    assert atomrefs.shape == (11,)
    for z, e in refs.items():
        assert atomrefs[z] == pytest.approx(e, abs=1e-8)
    assert np.count_nonzero(atomrefs) == 4
    mean, std = residual_stats(data, idx, "energy", atomrefs)
    assert abs(mean) < 1e-9 and std < 1e-9


def test_composition_counts_and_residual_stats():
    data, _ = _synthetic(n=20, noise=0.1, seed=1)
    counts = composition(data, np.arange(20), max_z=8)
    np.testing.assert_array_equal(counts.sum(1), data.n_atoms_per)
    atomrefs = fit_atomrefs(data, np.arange(20), "energy", max_z=8)
    mean, std = residual_stats(data, np.arange(20), "energy", atomrefs, per_atom=True)
    expected = (np.asarray(data.targets["energy"]) - counts @ atomrefs) / data.n_atoms_per
    assert mean == pytest.approx(expected.mean()) and std == pytest.approx(expected.std())
    # intensive target: plain mean and std, no references
    mean, std = residual_stats(data, np.arange(10), "gap", None, per_atom=False)
    gaps = np.asarray(data.targets["gap"][:10])
    assert mean == pytest.approx(gaps.mean()) and std == pytest.approx(gaps.std())


def test_statistics_errors():
    data, _ = _synthetic(n=5)
    with pytest.raises(DataError, match="max_z"):
        fit_atomrefs(data, np.arange(5), "energy", max_z=6)
    with pytest.raises(DataError, match="empty"):
        fit_atomrefs(data, [], "energy")
    with pytest.raises(DataError, match="not in the dataset"):
        fit_atomrefs(data, np.arange(5), "U0")
    for out_of_range in ([0, 5], [-1, 2], [5]):  # each end of the range on its own
        with pytest.raises(DataError, match="out of range for a dataset of 5"):
            fit_atomrefs(data, out_of_range, "energy")
    fit_atomrefs(data, [0, 4], "energy")  # both ends inside
    with_forces = _with_forces(n=3)
    with pytest.raises(DataError, match="per atom; statistics need a per-structure"):
        fit_atomrefs(with_forces, [0, 1], "forces")
    # references must cover every element of the chosen structures: Z = 8 needs 9 entries
    with pytest.raises(DataError, match="Z=8 has no atom reference"):
        residual_stats(data, np.arange(5), "energy", np.zeros(8))
    residual_stats(data, np.arange(5), "energy", np.zeros(9))


def test_set_statistics_stores_references_and_defaults_to_no_shift_or_scale():
    """y_i = scale * head(x_i) + shift + atomref[Z_i]: set_statistics(atomref) alone leaves
    shift 0 and scale 1, so the head's output only gains the references."""
    import torch
    from test_training import TINY_MODEL

    from atomlens.models import ModelConfig, build_model

    model = build_model(ModelConfig.from_dict(TINY_MODEL))
    features = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    numbers = torch.tensor([1, 6, 8])
    bare = model.atomic_contributions(features, numbers).detach()
    model.set_statistics(atomref=np.arange(len(model.atomref), dtype=np.float64), shift=2.0)
    model.set_statistics(atomref=np.arange(len(model.atomref), dtype=np.float64))
    shifted = model.atomic_contributions(features, numbers).detach()
    assert torch.allclose(shifted - bare, numbers.to(shifted.dtype))
    model.set_statistics(shift=0.5, scale=3.0)
    scaled = model.atomic_contributions(features, numbers).detach()
    assert torch.allclose(scaled, 3.0 * bare + 0.5 + numbers.to(bare.dtype))


def _with_forces(n=12, seed=3):
    """Random molecules with random per-atom forces (eV/Angstrom) and energies."""
    rng = np.random.default_rng(seed)
    structures, energies, forces = [], [], []
    for _ in range(n):
        k = int(rng.integers(2, 6))
        z = rng.choice([1, 6, 8], size=k)
        structures.append((z, np.arange(k)[:, None] * np.array([1.2, 0.0, 0.0])))
        energies.append(float(rng.normal(-100.0 * k, 0.3)))
        forces.append(rng.normal(0.0, 0.7, (k, 3)) + 0.2)
    return PackedDataset.from_structures(
        structures,
        {"energy": energies, "forces": forces},
        {"energy": "eV", "forces": "eV/Angstrom"},
    )


def test_force_rms_over_the_atoms_and_directions_of_the_chosen_structures():
    from atomlens.data.statistics import force_rms

    data = _with_forces()
    idx = np.array([7, 2, 5])
    atoms = np.concatenate([np.arange(data.offsets[m], data.offsets[m + 1]) for m in idx])
    chosen = np.asarray(data.targets["forces"])[atoms]
    assert force_rms(data, idx) == pytest.approx(np.sqrt((chosen**2).mean()), rel=1e-12)
    assert force_rms(data, idx) != pytest.approx(
        np.sqrt((np.asarray(data.targets["forces"]) ** 2).mean()), rel=1e-6
    )  # only the chosen structures count
    with pytest.raises(DataError, match="per-atom 'forces'"):
        force_rms(_synthetic(n=4)[0], np.arange(4))
    with pytest.raises(DataError, match="per-atom 'energy'"):  # there, but per structure
        force_rms(data, idx, target="energy")


@pytest.mark.parametrize("forces", [False, True])
def test_fit_statistics_output_scale(forces):
    """sigma: the residual std per atom ("std"), the RMS force ("forces"), "auto" picks the
    latter when training on forces, a number is taken as it is; shift and references stay."""
    from test_training import TINY_MODEL

    from atomlens.data.statistics import force_rms
    from atomlens.models import ModelConfig, build_model
    from atomlens.training.train import fit_statistics

    data, idx = _with_forces(), np.arange(10)
    atomrefs = fit_atomrefs(data, idx, "energy", max_z=100)
    mean, std = residual_stats(data, idx, "energy", atomrefs)
    rms = force_rms(data, idx)
    assert rms != pytest.approx(std, rel=0.1)
    expected = {"std": std, "forces": rms, "auto": rms if forces else std, 2.5: 2.5}
    for choice, sigma in expected.items():
        model = build_model(ModelConfig.from_dict(TINY_MODEL))
        fit_statistics(model, data, idx, choice, forces=forces)
        assert float(model.scale) == pytest.approx(sigma, rel=1e-6), choice
        assert float(model.shift) == pytest.approx(mean, rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(model.atomref.numpy(), atomrefs, rtol=1e-6, atol=1e-6)
