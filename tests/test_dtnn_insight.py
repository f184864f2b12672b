"""DTNN chemical insight: invariances, atomic energies, local chemical potential maps, cube files,
size extensivity, rings, isomers and the ``atomlens insight`` commands (tiny data only)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ase.build import molecule

from atomlens.data.batch import Batch, Pairs
from atomlens.data.dataset import DataError, dataset_from_atoms
from atomlens.data.neighbors import molecular_pairs
from atomlens.insight import atomic_energies, extensivity, isolated_atom_energy, probe_energies
from atomlens.insight.extensivity import two_copies
from atomlens.insight.potential_map import potential_map
from atomlens.models import build_model

REP_KWARGS = {
    "dtnn": {
        "n_atom_basis": 12,
        "n_interactions": 2,
        "n_factors": 10,
        "n_rbf": 25,
        "cutoff": 5.0,
        "rbf_stop": 5.0,
        "rbf_gamma": 12.5,
    },
    "schnet": {
        "n_atom_basis": 12,
        "n_interactions": 2,
        "n_filters": 12,
        "n_rbf": 10,
        "cutoff": 5.0,
    },
}


def tiny_model(representation: str = "dtnn", seed: int = 0, dtype=torch.float64, **overrides):
    """An untrained model with non-trivial statistics (so atomref/shift/scale are exercised)."""
    torch.manual_seed(seed)
    kwargs = dict(REP_KWARGS[representation], **overrides)
    model = build_model(
        {
            "representation": representation,
            "representation_kwargs": kwargs,
            "head_hidden": 6,
            "head_activation": "tanh",
            "target": "U0",
        }
    )
    # larger weights than the default init, so interactions matter at the 1e-3 level
    with torch.no_grad():
        for p in model.representation.parameters():
            p.mul_(3.0)
    atomref = np.zeros(101)
    atomref[[1, 6, 7, 8]] = [-13.6, -1029.0, -1485.0, -2042.0]
    model.set_statistics(atomref, shift=-0.4, scale=0.8)
    return model.to(dtype).eval()


def batch_of(atoms_list, model, symmetric=True) -> Batch:
    data = dataset_from_atoms(atoms_list, targets=False)
    return data.batch(range(len(data)), model.cutoff, torch.float64)


def total_energy(model, numbers, positions, pair_i, pair_j, symmetric=False) -> torch.Tensor:
    return model.atomic_energies(numbers, positions, Pairs(pair_i, pair_j, None, symmetric))


# --------------------------------------------------------------------------- DTNN model
def random_rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@torch.no_grad()
def test_dtnn_invariant_to_rotation_translation_permutation():
    model = tiny_model("dtnn")
    atoms = molecule("CH3CH2OH")
    e0 = model.predict(atoms)["U0"][0]
    moved = atoms.copy()
    moved.positions = atoms.positions @ random_rotation(1).T + np.array([3.0, -1.0, 7.5])
    assert model.predict(moved)["U0"][0] == pytest.approx(e0, abs=1e-10)
    perm = np.random.default_rng(2).permutation(len(atoms))
    shuffled = atoms[perm]
    out = model.predict(shuffled)
    assert out["U0"][0] == pytest.approx(e0, abs=1e-10)
    # atomic energies follow their atoms
    np.testing.assert_allclose(out["atomic"], model.predict(atoms)["atomic"][perm], atol=1e-10)
    # and the model is not trivially constant: a distortion changes the energy
    bent = atoms.copy()
    bent.positions[0] += [0.2, 0.0, 0.0]
    assert abs(model.predict(bent)["U0"][0] - e0) > 1e-4


@torch.no_grad()
def test_dtnn_molecule_alone_equals_molecule_in_batch():
    model = tiny_model("dtnn")
    frames = [molecule(name) for name in ("C6H6", "CH3CH2OH", "H2O", "CH3CN")]
    together = model.predict(frames)
    for k, atoms in enumerate(frames):
        alone = model.predict(atoms)
        assert together["U0"][k] == pytest.approx(alone["U0"][0], abs=1e-10)


# --------------------------------------------------------------------------- atomic energies
@pytest.mark.parametrize("rep", ["dtnn", "schnet"])
def test_atomic_energies_sum_to_total(rep):
    model = tiny_model(rep)
    frames = [molecule("C6H6"), molecule("CH3CH2OH"), molecule("H2O"), molecule("CH4")]
    tables = atomic_energies(model, frames)
    totals = model.predict(frames)["U0"]
    assert [t.formula for t in tables] == ["C6H6", "C2H6O", "H2O", "CH4"]
    in_chunks = atomic_energies(model, frames, batch_size=3)  # a second chunk of one
    for table, chunked in zip(tables, in_chunks):
        np.testing.assert_allclose(chunked.energies, table.energies, atol=1e-12)
    for table, total in zip(tables, totals):
        assert table.energies.sum() == pytest.approx(total, abs=1e-9)
        assert table.total == pytest.approx(total, abs=1e-12)
        np.testing.assert_allclose(table.relative, table.energies - table.references)
    one = atomic_energies(model, frames[0])
    np.testing.assert_allclose(one.energies, tables[0].energies, atol=1e-12)
    # the six carbons of benzene are equivalent by symmetry
    carbons = one.energies[one.numbers == 6]
    assert np.ptp(carbons) < 1e-5  # (ASE's coordinates are symmetric to ~1e-6 Angstrom)
    assert "sum" in one.table()


def test_atomic_energy_table_rows_and_sums():
    from atomlens.insight.atomic import AtomicEnergies

    table = AtomicEnergies(
        symbols=["O", "H", "H"],
        numbers=np.array([8, 1, 1]),
        positions=np.zeros((3, 3)),
        energies=np.array([-2041.0, -13.0, -14.0]),
        references=np.array([-2040.0, -13.5, -13.5]),
        total=-2068.0,
        formula="H2O",
    )
    lines = table.table().splitlines()
    assert lines[0] == "H2O: E = -2068.000000 eV, sum of 3 atoms"
    assert lines[1].split() == ["atom", "el", "E_i", "(eV)", "E_i", "-", "atomref"]
    assert lines[2].split() == ["0", "O", "-2041.000000", "-1.000000"]
    assert lines[-1].split() == ["sum", "-2068.000000", "-1.000000"]
    assert "(kcal/mol)" in table.table(unit="kcal/mol").splitlines()[1]
    table.charges = np.array([-0.8, 0.4, 0.4])
    lines = table.table().splitlines()
    assert lines[1].split()[-2:] == ["q_i", "(e)"]
    assert lines[3].split() == ["1", "H", "-13.000000", "0.500000", "0.4000"]
    assert lines[-1].split() == ["sum", "-2068.000000", "-1.000000", "0.0000"]
    assert [row["charge"] for row in table.rows()] == [-0.8, 0.4, 0.4]


# --------------------------------------------------------------------------- potential map
@torch.no_grad()
def explicit_probe_energy(model, atoms, point, z_probe, outgoing: bool):
    """E(molecule + probe) - E(molecule) from whole-structure model evaluations.

    With ``outgoing=False`` the pairs j=probe (messages from the probe to the molecule) are
    removed from the full pair list of molecule + probe.
    """
    numbers = torch.tensor(list(atoms.get_atomic_numbers()) + [z_probe])
    positions = torch.tensor(np.vstack([atoms.get_positions(), point]), dtype=torch.float64)
    n = len(atoms)
    i, j = molecular_pairs(torch.tensor([n + 1]), positions, model.cutoff)
    if not outgoing:
        keep = j != n
        i, j = i[keep], j[keep]
    with_probe = total_energy(model, numbers, positions, i, j)
    i0, j0 = molecular_pairs(torch.tensor([n]), positions[:n], model.cutoff)
    alone = total_energy(model, numbers[:n], positions[:n], i0, j0)
    return float(with_probe.sum() - alone.sum()), with_probe, alone


@pytest.mark.parametrize("rep", ["dtnn", "schnet"])
def test_potential_equals_explicit_probe_calculation(rep):
    model = tiny_model(rep)
    atoms = molecule("CH3CH2OH")
    points = np.array([[0.3, 1.9, 0.5], [-1.5, -1.0, 1.2], [2.2, 0.1, -0.7], [0.0, 0.0, 2.5]])
    omega = probe_energies(model, atoms, points, "C")
    for point, value in zip(points, omega):
        explicit, with_probe, alone = explicit_probe_energy(model, atoms, point, 6, False)
        assert value == pytest.approx(explicit, abs=1e-9)
        # the probe leaves the molecule's atomic energies untouched
        np.testing.assert_allclose(with_probe[:-1].numpy(), alone.numpy(), atol=1e-10)
        # with the probe's outgoing messages the molecule feels it: not Omega any more
        coupled, *_ = explicit_probe_energy(model, atoms, point, 6, True)
        assert abs(coupled - value) > 1e-4


@torch.no_grad()
def test_one_pass_probe_energy_needs_no_disabled_messages_but_two_passes_do():
    """With T = 1 the probe's own atomic energy cannot depend on its outgoing messages; with
    T = 2 it does (the molecule's pass-1 coefficients then carry the probe's influence)."""
    atoms = molecule("H2O")
    point = np.array([0.4, 1.3, 0.6])
    for passes, same in ((1, True), (2, False)):
        model = tiny_model("schnet", n_interactions=passes)
        omega = probe_energies(model, atoms, point[None], "N")[0]
        _, with_probe, _ = explicit_probe_energy(model, atoms, point, 7, True)
        assert bool(abs(float(with_probe[-1]) - omega) < 1e-10) is same


def test_potential_map_chunking_references_and_far_field():
    model = tiny_model("dtnn")
    atoms = molecule("C6H6")
    pmap = potential_map(model, atoms, probe="O", plane="principal", spacing=0.5, padding=1.0)
    again = potential_map(
        model, atoms, probe="O", plane="principal", spacing=0.5, padding=1.0, chunk_size=7
    )
    np.testing.assert_allclose(pmap.values, again.values, atol=1e-10)
    assert pmap.values.shape == pmap.points.shape[:-1] and pmap.values.ndim == 2
    # benzene lies in the principal plane: every point of the map is in the plane of the atoms
    normal = np.cross(pmap.axes[0], pmap.axes[1])
    offsets = (pmap.points.reshape(-1, 3) - atoms.positions.mean(0)) @ normal
    assert np.abs(offsets).max() < 1e-8
    # variants differ by constants
    atomref = probe_energies(model, atoms, pmap.points, "O", reference="atomref")
    np.testing.assert_allclose(pmap.values - atomref, model.atomref[8].item(), atol=1e-9)
    far = np.array([[40.0, 0.0, 0.0], [0.0, -30.0, 10.0]])  # beyond the 5 Angstrom cutoff
    np.testing.assert_allclose(
        probe_energies(model, atoms, far, "O"), isolated_atom_energy(model, 8), atol=1e-10
    )
    np.testing.assert_allclose(
        probe_energies(model, atoms, far, "O", reference="isolated"), 0.0, atol=1e-10
    )
    with pytest.raises(ValueError):
        probe_energies(model, atoms, far, "O", reference="vacuum")


def test_cube_file_round_trips_through_ase(tmp_path):
    import ase.io
    from ase.io.cube import read_cube_data

    from atomlens.insight.cube import read_cube, write_cube
    from atomlens.units import HARTREE_EV

    model = tiny_model("dtnn")
    atoms = molecule("H2O")
    pmap = potential_map(model, atoms, probe="H", plane=None, spacing=0.4, padding=1.5)
    assert pmap.values.ndim == 3
    path = write_cube(tmp_path / "omega.cube", pmap)
    data, read_atoms = read_cube_data(str(path))
    # cube readers assume atomic units: the file holds hartree and says so
    np.testing.assert_allclose(data * HARTREE_EV, pmap.values, rtol=1e-5, atol=1e-6)
    assert "hartree" in path.read_text().splitlines()[0]
    np.testing.assert_allclose(read_atoms.positions, atoms.positions, atol=1e-5)
    assert list(read_atoms.numbers) == list(atoms.numbers)
    doc = read_cube(path)
    np.testing.assert_allclose(doc["data"], pmap.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(doc["origin"], pmap.origin, atol=1e-5)
    np.testing.assert_allclose(doc["spacing"], pmap.axes, atol=1e-5)
    assert len(ase.io.read(str(path))) == len(atoms)
    with pytest.raises(ValueError):
        write_cube(tmp_path / "flat.cube", potential_map(model, atoms, spacing=0.5))
    # a model in kcal/mol: the file still holds hartree (it had divided kcal/mol by 27.2)
    from atomlens.units import energy_factor

    path = write_cube(tmp_path / "kcal.cube", pmap, unit="kcal/mol")
    data, _ = read_cube_data(str(path))
    np.testing.assert_allclose(
        data * HARTREE_EV, pmap.values * energy_factor("kcal/mol"), rtol=1e-5, atol=1e-7
    )


def test_insight_refuses_models_whose_outputs_are_no_atomic_energies():
    """Atomic energies, probe energies and ring energies read a model's atomic contributions
    as energies that add up to its energy: an intensive target (a mean over atoms, QM9's
    HOMO) or another unit (polarisability) is refused (a HOMO model's table had printed a
    total its rows did not add up to)."""
    from helpers import qm9_sample

    from atomlens.insight.rings import ring_study

    atoms = molecule("H2O")
    for overrides, said in (
        ({"aggregation": "mean", "target": "homo"}, "pooled by a mean"),
        ({"unit": "bohr^3", "target": "alpha"}, r"in 'bohr\^3'"),
    ):
        model = build_model(
            {"representation": "dtnn", "representation_kwargs": REP_KWARGS["dtnn"], **overrides}
        ).double()
        with pytest.raises(ValueError, match=f"atomic energies need an energy model.*{said}"):
            atomic_energies(model, atoms)
        with pytest.raises(ValueError, match="probe energies"):
            potential_map(model, atoms, spacing=0.5)
        with pytest.raises(ValueError, match="ring energies"):
            ring_study(model, qm9_sample())


def test_potential_map_refuses_cells_and_broken_structures():
    from ase.build import bulk

    model = tiny_model("schnet")
    with pytest.raises(ValueError, match="si.xyz: a periodic cell"):
        potential_map(model, bulk("Si", "diamond", a=5.43), probe="H", source="si.xyz")
    water = molecule("H2O")
    nan = water.copy()
    nan.positions[0, 0] = np.nan
    with pytest.raises(DataError, match="w.xyz.*non-finite"):
        potential_map(model, nan, probe="H", source="w.xyz")
    stacked = water + water[1:2]  # a second H on top of the first
    with pytest.raises(DataError, match="w.xyz.*closer than"):
        potential_map(model, stacked, probe="H", source="w.xyz")


# --------------------------------------------------------------------------- extensivity
@pytest.mark.parametrize("rep", ["dtnn", "schnet"])
def test_size_extensivity_beyond_cutoff_and_not_within(rep):
    model = tiny_model(rep)
    atoms = molecule("CH3CH2OH")
    far = extensivity(model, atoms)
    assert far.cutoff == model.cutoff
    # default: one Angstrom beyond the cutoff, between the copies' closest atoms
    assert model.cutoff + 1.0 <= far.separation < model.cutoff + 1.5
    assert far.passed() and abs(far.difference) < 1e-9
    near = extensivity(model, atoms, separation=2.0)
    dimer = two_copies(atoms, 2.0)
    n = len(atoms)
    closest = min(np.linalg.norm(a - b) for a in dimer.positions[:n] for b in dimer.positions[n:])
    assert near.separation == pytest.approx(closest) and 2.0 <= closest < 3.0
    assert not near.passed() and abs(near.difference) > 1e-4
    no_cutoff = tiny_model("schnet", cutoff=None, rbf_stop=8.0)
    with pytest.raises(ValueError):
        extensivity(no_cutoff, atoms)
    assert not extensivity(no_cutoff, atoms, separation=8.0).passed()


def test_extensivity_resolves_couplings_below_the_totals_rounding():
    """Atom references of QM9's size (~10^3 eV per atom) make totals whose float32 rounding
    and a relative tolerance would hide copies coupled within the cutoff; in float64 a
    meV-sized coupling is seen and the copies beyond the cutoff still agree."""
    model = tiny_model("schnet", dtype=torch.float32)
    model.atomref.fill_(-1000.0)
    atoms = molecule("CH3CH2OH")
    far = extensivity(model, atoms)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model unchanged
    assert far.passed() and abs(far.difference) < 1e-7
    near = extensivity(model, atoms, separation=4.0)
    assert near.separation < model.cutoff
    assert 1e-6 < abs(near.difference) < 1e-6 * abs(near.pair)  # hidden by the old test
    assert not near.passed()
    with pytest.raises(ValueError, match="positive"):
        extensivity(model, atoms, separation=-3.0)


def test_extensivity_of_a_periodic_cell_is_its_supercell():
    from ase.build import bulk

    model = tiny_model("schnet")
    cell = bulk("Si", "diamond", a=5.43, cubic=True)
    cell.rattle(0.05, seed=1)
    result = extensivity(model, cell)
    assert result.separation is None and result.passed()
    e = model.double().predict([cell, cell.repeat((2, 1, 1))])["U0"]
    assert result.pair == pytest.approx(e[1], abs=1e-9) and e[1] == pytest.approx(2 * e[0])
    with pytest.raises(ValueError, match="supercell"):
        extensivity(model, cell, separation=6.0)
    # a slab periodic in b and c (open along a, little vacuum): doubled along b, not a
    slab = cell.copy()
    slab.pbc = [False, True, True]
    slab.cell[0] = [6.0, 0.0, 0.0]
    result = extensivity(model, slab)
    e = model.double().predict([slab, slab.repeat((1, 2, 1))])["U0"]
    assert result.pair == pytest.approx(e[1], abs=1e-9) and result.passed()


# --------------------------------------------------------------------------- rings
def rdkit_molecule(smiles: str, seed: int = 0, shuffle: bool = True):
    """3D structure of ``smiles`` (RDKit ETKDG + MMFF), atoms shuffled unless told otherwise."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    atoms = Atoms(
        numbers=[a.GetAtomicNum() for a in mol.GetAtoms()],
        positions=mol.GetConformer().GetPositions(),
    )
    if shuffle:
        atoms = atoms[np.random.default_rng(seed).permutation(len(atoms))]
    return atoms


RING_CASES = [
    ("c1ccccc1", "benzene", True, 6),
    ("c1ccncc1", "pyridine", True, 5),
    ("C1CCCCC1", "cyclohexane", False, 12),
    ("c1ccoc1", "furan", True, 4),
    ("c1cc[nH]c1", "pyrrole", True, 5),
    ("C1=CCCCC1", "cyclohexene", False, 10),
    ("c1cncnc1", "pyrimidine", True, 4),
    ("c1cnccn1", "pyrazine", True, 4),
    ("c1cnc[nH]1", "imidazole", True, 4),
    ("C1CCOC1", "oxolane", False, 8),
]


@pytest.mark.parametrize("smiles,name,aromatic,n_h", RING_CASES)
def test_find_rings_on_rdkit_geometries_with_shuffled_atoms(smiles, name, aromatic, n_h):
    from atomlens.insight.rings import bond_graph, find_rings

    atoms = rdkit_molecule(smiles)
    rings = find_rings(smiles, atoms.numbers, atoms.positions)
    assert [(r.name, r.aromatic) for r in rings] == [(name, aromatic)]
    ring = rings[0]
    # ring indices refer to the shuffled geometry: they form a bonded cycle of heavy atoms
    bonds = {frozenset(b) for b in bond_graph(atoms.numbers, atoms.positions)}
    cycle = ring.atoms + ring.atoms[:1]
    assert all(frozenset(p) in bonds for p in itertools.pairwise(cycle))
    assert (atoms.numbers[ring.atoms] > 1).all() and (atoms.numbers[ring.hydrogens] == 1).all()
    assert len(ring.hydrogens) == n_h


def test_find_rings_rejects_geometry_that_does_not_match_smiles():
    from atomlens.insight.rings import find_rings

    ethanol = rdkit_molecule("CCO")
    assert find_rings("CCO", ethanol.numbers, ethanol.positions) == []
    assert find_rings("COC", ethanol.numbers, ethanol.positions) is None  # same formula
    assert find_rings("c1ccccc1", ethanol.numbers, ethanol.positions) is None


def ring_dataset(tmp_path=None):
    """Tiny packed data set with SMILES and a U0 target, shuffled atom orders."""
    from atomlens.data.dataset import PackedDataset

    smiles = ["c1ccccc1", "C1CCCCC1", "c1ccncc1", "CCO", "COC", "Cc1ccccc1", "OC1CCCCC1", "C1CCOC1"]
    frames = [rdkit_molecule(s, seed=k) for k, s in enumerate(smiles)]
    data = PackedDataset.from_structures(
        [(a.numbers, a.positions) for a in frames],
        targets={"U0": [-100.0 * len(a) + 0.1 * k for k, a in enumerate(frames)]},
        units={"U0": "eV"},
        extras={"smiles": np.array(smiles), "index": np.arange(len(smiles))},
    )
    if tmp_path is not None:
        data.save(tmp_path / "rings_data")
    return data


def test_ring_study_predicts_the_molecules_with_rings_and_ranks_them():
    from atomlens.insight.rings import ring_analysis, ring_study

    data = ring_dataset()
    model = tiny_model("dtnn")
    study = ring_study(model, data, sizes=(5, 6), max_molecules=None, min_count=1)
    with_rings = np.array([0, 1, 2, 5, 6, 7])  # CCO and COC have none
    assert study.n_molecules == len(with_rings) and study.n_unmatched == 0
    # the same analysis from atomic energies predicted one molecule at a time
    atomic = np.concatenate([model.predict(data.atoms(int(m)))["atomic"] for m in with_rings])
    atomref = model.atomref.detach().numpy().astype(np.float64)
    expected = ring_analysis(data, with_rings, atomic, atomref, (5, 6), 1)
    assert [r["name"] for r in study.records] == [r["name"] for r in expected.records]
    np.testing.assert_allclose(
        [r["ring_h"] for r in study.records], [r["ring_h"] for r in expected.records], atol=1e-9
    )
    assert ring_study(model, data, max_molecules=2, min_count=1).n_molecules == 2
    # a random draw of distinct molecules, the same for the same seed
    drawn = [ring_study(model, data, max_molecules=4, min_count=1, seed=s) for s in (5, 5)]
    chosen = [sorted({r["molecule"] for r in d.records}) for d in drawn]
    assert len(chosen[0]) == 4 and chosen[0] == chosen[1]
    assert set(chosen[0]) <= set(with_rings.tolist())
    # a geometry that does not match its SMILES is counted and left out
    mismatched = data.subset(np.arange(len(data)))
    mismatched.extras["smiles"] = np.array(mismatched.extras["smiles"], dtype=object)
    mismatched.extras["smiles"][0] = "C=C1C=CC=C1"  # fulvene: C6H6 as benzene, other bonds
    mismatched.extras["smiles"][5] = "c1ccncc1"  # pyridine's SMILES for toluene's atoms
    other = ring_study(model, mismatched, sizes=(5, 6), max_molecules=None, min_count=1)
    assert other.n_unmatched == 2 and other.n_molecules == len(with_rings)
    assert {0, 5}.isdisjoint({r["molecule"] for r in other.records})
    # min_count: only ring types seen at least that often are ranked
    counts = {}
    for r in study.records:
        counts[r["name"]] = counts.get(r["name"], 0) + 1
    common = ring_study(model, data, sizes=(5, 6), max_molecules=None, min_count=2)
    assert {t["name"] for t in common.ranking} == {n for n, c in counts.items() if c >= 2}
    assert {t["name"] for t in study.ranking} == set(counts)
    subset = ring_study(model, data, indices=np.array([0, 3, 4]), min_count=1)
    assert subset.n_molecules == 1 and {r["molecule"] for r in subset.records} == {0}
    with pytest.raises(ValueError, match="ring of size 3"):
        ring_study(model, data, sizes=(3,))
    no_smiles = data.subset(np.arange(len(data)))
    no_smiles.extras.pop("smiles")
    with pytest.raises(ValueError, match="mine.db: the data set has no SMILES"):
        ring_study(model, no_smiles, source="mine.db")


def test_ring_analysis_sums_relative_atomic_energies_and_ranks_types():
    from atomlens.insight.rings import ring_analysis

    data = ring_dataset()
    indices = np.array([0, 1, 2, 5, 6])
    atomref = np.zeros(101)
    atomref[[1, 6, 7, 8]] = [-10.0, -1000.0, -1400.0, -2000.0]
    # relative energies E_i - atomref: H -0.5, C -2, N -3 eV
    atom = data.atom_index(indices)
    numbers = np.asarray(data.numbers[atom]).astype(int)
    relative = np.where(numbers == 1, -0.5, -2.0) + np.where(numbers == 7, -1.0, 0.0)
    analysis = ring_analysis(data, indices, atomref[numbers] + relative, atomref)
    assert analysis.n_unmatched == 0 and analysis.n_molecules == 5
    by_name = {r["name"]: r for r in analysis.ranking}
    assert sorted(by_name) == ["benzene", "cyclohexane", "pyridine"]
    # benzene and toluene's ring; cyclohexane and cyclohexanol's ring
    assert by_name["benzene"]["count"] == 2 and by_name["cyclohexane"]["count"] == 2
    assert by_name["benzene"]["ring"] == pytest.approx(-12.0)
    assert by_name["benzene"]["ring_h"] == pytest.approx(-12.0 - 0.5 * (6 + 5) / 2)
    assert by_name["cyclohexane"]["ring_h"] == pytest.approx(-12.0 - 0.5 * (12 + 11) / 2)
    assert by_name["pyridine"]["ring"] == pytest.approx(-13.0)
    assert analysis.ranking[0]["name"] == "pyridine"  # the N adds -1 eV: lowest per atom
    assert analysis.ranking[0]["per_atom"] == pytest.approx(-13.0 / 6)
    assert "pyridine" in analysis.table()
    with pytest.raises(ValueError):
        ring_analysis(data, indices, relative[:-1], atomref)


# --------------------------------------------------------------------------- isomers
def test_isomer_statistics_on_synthetic_energies():
    from atomlens.insight.isomers import analyse_isomers

    reference = np.array([2.0, 0.0, 1.0, 3.0]) - 400.0  # relative energies need the offset
    good = analyse_isomers(reference, reference + 5.0 + np.array([0.1, 0.0, -0.2, 0.3]))
    assert good.spearman == pytest.approx(1.0)
    assert good.lowest == 1
    np.testing.assert_allclose(good.relative_reference, [2.0, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(good.relative_predicted, [2.1, 0.0, 0.8, 3.3])
    assert good.relative_mae == pytest.approx((0.1 + 0.0 + 0.2 + 0.3) / 4)
    np.testing.assert_array_equal(good.indices, np.arange(4))
    named = analyse_isomers(reference, reference[::-1], indices=[7, 3, 9, 4], formula="C2H6O")
    assert named.summary() == {  # the keys of `atomlens insight isomers --json`
        "formula": "C2H6O",
        "n_isomers": 4,
        # ranks (3, 1, 2, 4) against (4, 2, 1, 3): 1 - 6 * 4 / (4 * 15)
        "spearman": pytest.approx(0.6),
        # relative to isomer 1: (2, 0, 1, 3) against (2, 0, -1, 1)
        "relative_mae_eV": pytest.approx(1.0),
        "mae_eV": pytest.approx(1.0),  # errors (1, 1, -1, -1)
        "centred_mae_eV": pytest.approx(1.0),
        "lowest_index": 3,
        "predicted_lowest_index": 9,
    }
    assert good.mae == pytest.approx(5.0 + (0.1 - 0.2 + 0.3) / 4)
    assert good.centred_mae == pytest.approx(
        np.mean(np.abs(np.array([0.1, 0.0, -0.2, 0.3]) - 0.05))
    )
    bad = analyse_isomers(reference, -reference)
    assert bad.spearman == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        analyse_isomers(reference[:1], reference[:1])


def test_isomer_indices_by_formula_in_any_order():
    from atomlens.insight.isomers import formulas, isomer_indices, parse_formula

    data = ring_dataset()
    assert list(formulas(data)) == [
        "C6H6",
        "C6H12",
        "C5H5N",
        "C2H6O",
        "C2H6O",
        "C7H8",
        "C6H12O",
        "C4H8O",
    ]
    np.testing.assert_array_equal(isomer_indices(data, "OC2H6"), [3, 4])
    assert parse_formula("H2O") == "H2O" and parse_formula("O2H10C7") == "C7H10O2"
    with pytest.raises(ValueError):
        parse_formula("Xx3")


# --------------------------------------------------------------------------- command line
def run_insight(argv: list[str]) -> int:
    import argparse

    from atomlens.cli import insight as cli_insight

    parser = argparse.ArgumentParser(prog="atomlens")
    cli_insight.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["insight", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from atomlens.models.io import save_model

    path = tmp_path_factory.mktemp("model") / "dtnn"
    save_model(tiny_model("dtnn", dtype=torch.float32), path)
    return path


def test_cli_atomic_energies_potential_map_extensivity(tmp_path, saved_model, capsys):
    import ase.io
    from ase.io.cube import read_cube_data

    xyz = tmp_path / "mols.xyz"
    ase.io.write(xyz, [molecule("CH3CH2OH"), molecule("C6H6")])
    assert (
        run_insight(
            ["atomic-energies", str(saved_model), str(xyz), "--out", str(tmp_path / "ae.png")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "C2H6O" in printed and "C6H6" in printed and "sum" in printed
    assert (tmp_path / "ae_0.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "ae_1.png").is_file()

    assert (
        run_insight(
            [
                "potential-map",
                str(saved_model),
                str(xyz),
                "--index",
                "1",
                "--probe",
                "H",
                "--spacing",
                "0.4",
                "--out",
                str(tmp_path / "pm.png"),
                "--cube",
                str(tmp_path / "pm.cube"),
                "--cube-spacing",
                "0.6",
                "--reference",
                "isolated",
            ]
        )
        == 0
    )
    assert (tmp_path / "pm.png").read_bytes()[:4] == b"\x89PNG"
    data, atoms = read_cube_data(str(tmp_path / "pm.cube"))
    assert data.ndim == 3 and len(atoms) == 12 and np.isfinite(data).all()
    # --reference isolated subtracts the lone probe's energy, "none" keeps the full Omega
    assert (
        run_insight(
            [
                "potential-map",
                str(saved_model),
                str(xyz),
                "--index",
                "1",
                "--probe",
                "H",
                "--spacing",
                "0.4",
                "--out",
                str(tmp_path / "pm0.png"),
                "--cube",
                str(tmp_path / "pm0.cube"),
                "--cube-spacing",
                "0.6",
                "--reference",
                "none",
                "--dtype",
                "float64",
            ]
        )
        == 0
    )
    full, _ = read_cube_data(str(tmp_path / "pm0.cube"))
    from atomlens.models import load_model

    lone = isolated_atom_energy(load_model(saved_model, dtype=torch.float64), 1)
    assert abs(lone) > 1e-3
    from atomlens.units import HARTREE_EV

    # cube files hold hartree (atomic units, as cube readers assume)
    np.testing.assert_allclose(
        (full - data) * HARTREE_EV, lone, rtol=0, atol=1e-5 * (1 + abs(lone))
    )

    assert run_insight(["extensivity", str(saved_model), str(xyz)]) == 0
    assert "size-extensive" in capsys.readouterr().out
    assert run_insight(["extensivity", str(saved_model), str(xyz), "--separation", "1.5"]) == 1


def test_cli_rings_and_isomers_on_a_tiny_data_set(tmp_path, saved_model, capsys):
    ring_dataset(tmp_path)
    data = str(tmp_path / "rings_data")
    assert (
        run_insight(
            [
                "rings",
                str(saved_model),
                "--data",
                data,
                "--min-count",
                "1",
                "--out",
                str(tmp_path / "rings.png"),
                "--json-file",
                str(tmp_path / "rings.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "benzene" in printed and "cyclohexane" in printed and "oxolane" in printed
    assert (tmp_path / "rings.png").read_bytes()[:4] == b"\x89PNG"
    import json

    doc = json.loads((tmp_path / "rings.json").read_text())
    assert doc["n_molecules"] == 6 and doc["n_unmatched"] == 0  # the molecules with 5-, 6-rings
    assert (
        run_insight(
            [
                "isomers",
                str(saved_model),
                "--data",
                data,
                "--formula",
                "C2H6O",
                "--out",
                str(tmp_path / "iso.png"),
                "--json",
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["n_isomers"] == 2 and line["formula"] == "C2H6O"
    assert (tmp_path / "iso.png").is_file()
    with pytest.raises(ValueError):
        run_insight(["isomers", str(saved_model), "--data", data, "--formula", "C9H20"])
    # a model of another target (an MD17 "energy" model) against QM9-style data: said so
    import dataclasses

    from atomlens.models.io import save_model

    other = tiny_model("dtnn", dtype=torch.float32)
    other.config = dataclasses.replace(other.config, target="energy")
    save_model(other, tmp_path / "energy_model")
    with pytest.raises(ValueError, match="predicts 'energy', which the data set does not hold"):
        run_insight(
            ["isomers", str(tmp_path / "energy_model"), "--data", data, "--formula", "C2H6O"]
        )
    with pytest.raises(FileNotFoundError):
        run_insight(["rings", str(saved_model), "--data", data, "--split", "test"])


def test_cli_insight_json_is_the_whole_standard_output_or_a_file(tmp_path, saved_model, capsys):
    """``--json``: standard output is the JSON and nothing else (figures are named on
    standard error); ``--json-file FILE``: the same JSON written there, the text on standard
    output. The same for rings, isomers and atomic energies, each with its unit; ``--json``
    stays a flag, so it may stand before the positional arguments."""
    import json

    ring_dataset(tmp_path)
    data = str(tmp_path / "rings_data")
    rings = ["rings", str(saved_model), "--data", data, "--min-count", "1"]
    rings += ["--out", str(tmp_path / "rings.png")]
    assert run_insight([*rings, "--json"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["n_molecules"] == 6 and printed["unit"] == "eV"
    assert "rings.png" in captured.err
    assert run_insight([*rings, "--json-file", str(tmp_path / "rings.json")]) == 0
    assert "benzene" in capsys.readouterr().out
    assert json.loads((tmp_path / "rings.json").read_text()) == printed

    isomers = ["isomers", str(saved_model), "--data", data, "--formula", "C2H6O"]
    isomers += ["--out", str(tmp_path / "iso.png")]
    assert run_insight([*isomers, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["n_isomers"] == 2 and summary["unit"] == "eV" and "iso.png" in captured.err
    assert run_insight([*isomers, "--json-file", str(tmp_path / "iso.json")]) == 0
    assert "isomers of C2H6O" in capsys.readouterr().out
    assert json.loads((tmp_path / "iso.json").read_text()) == summary

    xyz = tmp_path / "m.xyz"
    molecule("CH4").write(xyz)
    atomic = ["atomic-energies", str(saved_model), str(xyz), "--out", str(tmp_path / "a.png")]
    assert run_insight([*atomic, "--json"]) == 0
    captured = capsys.readouterr()
    (table,) = json.loads(captured.out)
    assert table["unit"] == "eV" and len(table["atoms"]) == 5 and "a.png" in captured.err
    flag_first = ["atomic-energies", "--json", str(saved_model), str(xyz)]
    assert run_insight(flag_first) == 0
    assert json.loads(capsys.readouterr().out)[0]["unit"] == "eV"
    with pytest.raises(ValueError, match="name one file"):
        run_insight([*atomic, "--json-file", str(tmp_path / "a.png")])


def test_has_rings_filters_smiles_by_ring_size():
    from atomlens.insight.rings import has_rings

    smiles = np.array(["CCO", "C1CC1", "c1ccccc1", "C1CCOC1", "not a smiles 1"])
    np.testing.assert_array_equal(has_rings(smiles, (5, 6)), [False, False, True, True, False])
    np.testing.assert_array_equal(has_rings(smiles, (3,)), [False, True, False, False, False])


CLASSIFIED = [
    ("c1ccnnc1", "pyridazine", True),
    ("n1ccccn1", "pyridazine", True),
    ("c1cncnc1", "pyrimidine", True),
    ("n1cccnc1", "pyrimidine", True),
    ("n1ccncc1", "pyrazine", True),
    ("c1cn[nH]c1", "pyrazole", True),
    ("[nH]1nccc1", "pyrazole", True),
    ("n1cc[nH]c1", "imidazole", True),
    ("c1cnoc1", "isoxazole", True),
    ("o1nccc1", "isoxazole", True),
    ("c1cocn1", "oxazole", True),
    ("c1ncncn1", "1,3,5-triazine", True),
    ("c1cnnnc1", "1,2,3-triazine", True),
    ("c1cnncn1", "1,2,4-triazine", True),
    ("c1nc[nH]n1", "1,2,4-triazole", True),
    ("c1c[nH]nn1", "1,2,3-triazole", True),
    ("c1nnco1", "1,3,4-oxadiazole", True),
    ("c1ncon1", "1,2,4-oxadiazole", True),
    ("c1cnon1", "1,2,5-oxadiazole", True),
    ("c1conn1", "1,2,3-oxadiazole", True),
    ("c1cscn1", "aromatic 5-ring C3NS", True),
    ("c1ccsc1", "aromatic 5-ring C4S", True),
    ("C1=CC=CCC1", "cyclohexadiene", False),
    ("C1=CCC=CC1", "cyclohexadiene", False),
    ("C1=CCCC1", "cyclopentene", False),
    ("C1=CC1", "cyclopropene", False),
    ("C1=COCCC1", "6-ring C5O (1 double bond)", False),
    ("C1=CC=CC1", "5-ring C5 (2 double bonds)", False),
    ("C1=CC=CC=CC1", "7-ring C7 (3 double bonds)", False),
    ("C1CNCCN1", "6-ring C4N2 (saturated)", False),
    ("C1CCCCCCC1", "8-ring C8 (saturated)", False),
    ("C1COCCO1", "1,4-dioxane", False),
    ("C1COCOC1", "1,3-dioxane", False),
]


@pytest.mark.parametrize("smiles,name,aromatic", CLASSIFIED)
def test_classify_ring_names_hetero_rings_by_their_atoms_and_bonds(smiles, name, aromatic):
    """Every branch of the ring names: N/N and N/O rings by how far apart the heteroatoms
    sit (in either direction round the ring), rings outside the table by their formula and
    double bonds, in any SMILES atom order."""
    from atomlens.insight.rings import classify_ring

    Chem = pytest.importorskip("rdkit.Chem")
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    (ring,) = mol.GetRingInfo().AtomRings()
    assert classify_ring(mol, ring) == (name, aromatic)
    reversed_ring = ring[:1] + tuple(reversed(ring[1:]))  # the other way round
    assert classify_ring(mol, reversed_ring) == (name, aromatic)


def test_two_copies_shift_along_x_only():
    atoms = molecule("CH3CH2OH")
    dimer = two_copies(atoms, 3.0)
    n = len(atoms)
    width = np.ptp(atoms.positions[:, 0])
    np.testing.assert_allclose(dimer.positions[:n], atoms.positions)
    np.testing.assert_allclose(dimer.positions[n:] - atoms.positions, [[width + 3.0, 0, 0]] * n)


def test_extensivity_tolerance_is_relative_to_the_energy_above_one():
    """|E(A + A') - 2 E(A)| <= tolerance * max(1, |E(A + A')|), the bound included."""
    from atomlens.insight.extensivity import ExtensivityResult

    small = ExtensivityResult(single=0.25, pair=0.5 + 2**-10, separation=6.0, cutoff=5.0)
    assert small.difference == 2**-10
    assert small.passed(tolerance=2**-10)  # on the bound
    assert not small.passed(tolerance=2**-11)
    assert not ExtensivityResult(0.25, 0.5 + 2**-9, 6.0, 5.0).passed(tolerance=2**-10)
    large = ExtensivityResult(single=-50.0, pair=-100.0 + 2**-4, separation=6.0, cutoff=5.0)
    assert large.passed(tolerance=1e-3)  # 0.0625 <= 1e-3 * 99.94
    assert not large.passed(tolerance=1e-4)


def test_match_smiles_needs_the_elements_to_match_not_only_the_bonds():
    """H-C#N and H-N#C have the same bond graph (a chain of three); only the elements tell
    them apart."""
    from atomlens.insight.rings import match_smiles

    pytest.importorskip("rdkit")
    numbers = np.array([1, 6, 7])  # H, C, N on a line
    positions = np.array([[0.0, 0.0, 0.0], [1.07, 0.0, 0.0], [2.22, 0.0, 0.0]])
    mol, mapping = match_smiles("C#N", numbers, positions)
    assert mapping is not None
    assert [mol.GetAtomWithIdx(mapping[k]).GetAtomicNum() for k in range(3)] == [1, 6, 7]
    assert match_smiles("[C-]#[NH+]", numbers, positions)[1] is None  # H on N


def test_ring_table_and_json_fields():
    from atomlens.insight.rings import RingAnalysis

    ranking = [
        {
            "name": "benzene",
            "size": 6,
            "aromatic": True,
            "count": 2,
            "per_atom": -1.5,
            "per_atom_sd": 0.25,
            "ring": -9.0,
            "ring_h": -12.5,
        },
        {
            "name": "oxolane",
            "size": 5,
            "aromatic": False,
            "count": 1,
            "per_atom": -0.5,
            "per_atom_sd": 0.0,
            "ring": -2.5,
            "ring_h": -6.0,
        },
    ]
    analysis = RingAnalysis(
        records=[{"molecule": 0}], ranking=ranking, n_molecules=3, n_unmatched=1
    )
    lines = analysis.table().splitlines()
    assert lines[0].split() == [
        "ring", "type", "n", "E_ring/atom", "sd", "E_ring", "E_ring+H", "arom",
        "(eV,", "element", "references", "removed)",
    ]  # fmt: skip
    assert lines[1].split() == ["benzene", "2", "-1.5000", "0.2500", "-9.000", "-12.500", "yes"]
    assert lines[2].split() == ["oxolane", "1", "-0.5000", "0.0000", "-2.500", "-6.000", "no"]
    assert lines[3] == "3 molecules, 1 skipped (geometry bonds do not match the SMILES)"
    assert analysis.as_dict() == {
        "ranking": ranking,
        "records": [{"molecule": 0}],
        "n_molecules": 3,
        "n_unmatched": 1,
    }


def test_insight_and_explanations_refuse_elements_the_model_never_saw(tmp_path):
    """Atomic energies, a potential map's molecule or probe, and a molecule's explanation of
    an element absent from the training data are refused (the command's flag turns that into
    a warning); the ring study leaves such molecules out."""
    from ase.io import write
    from helpers import qm9_sample, random_model

    from atomlens.cli import main
    from atomlens.data.dataset import DataError
    from atomlens.insight.rings import known_elements_only
    from atomlens.models.io import save_model

    model = random_model("schnet", seed=3)
    model.metadata = {"elements": [1, 6, 8]}  # trained on C, H, O
    pyridine, ethanol = molecule("C5H5N"), molecule("CH3CH2OH")
    with pytest.raises(DataError, match="never seen in training"):
        atomic_energies(model, pyridine)
    with pytest.warns(UserWarning, match="never seen in training"):
        atomic_energies(model, pyridine, allow_unknown_elements=True)
    assert len(atomic_energies(model, ethanol).energies) == 9
    with pytest.raises(DataError, match=r"N probe.*never seen"):
        potential_map(model, ethanol, probe="N", spacing=0.5)
    with pytest.raises(ValueError, match="not an element symbol"):
        potential_map(model, ethanol, probe="Xx", spacing=0.5)
    potential_map(model, ethanol, probe=6, spacing=0.5)  # atomic numbers are probes too

    data = qm9_sample()
    mask = known_elements_only(data, np.arange(len(data)), [1, 6, 8])
    for k in range(len(data)):
        numbers = data.numbers[data.offsets[k] : data.offsets[k + 1]]
        assert mask[k] == (set(numbers.tolist()) <= {1, 6, 8})
    assert 0 < mask.sum() < len(data)

    folder = tmp_path / "model"
    save_model(model.float(), folder, metadata=model.metadata)
    write(tmp_path / "pyridine.xyz", pyridine)
    out = tmp_path / "explained"
    args = ["explain", "molecule", str(folder), str(tmp_path / "pyridine.xyz"), "--out", str(out)]
    assert main(args) == 2
    assert not out.exists()
