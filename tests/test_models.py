"""Physics and consistency of the SchNet and DTNN models."""

import numpy as np
import pytest
import torch
from helpers import MODELS, qm9_sample, random_model, random_rotation

from atomlens.data import PackedDataset, molecular_pairs
from atomlens.models import load_model, save_model


@pytest.fixture(scope="module")
def data():
    return qm9_sample()


@pytest.mark.parametrize("rep", MODELS)
def test_energy_invariant_to_rotation_translation_permutation(data, rep):
    model = random_model(rep)
    batch = data.batch([0, 1, 2], cutoff=model.cutoff, dtype=torch.float64)
    energy = model(batch)["energy"]

    rot = random_rotation(1)
    moved = data.subset([0, 1, 2])
    moved.positions = np.asarray(moved.positions) @ rot.numpy().T + np.array([3.0, -7.0, 11.0])
    energy_moved = model(moved.batch([0, 1, 2], model.cutoff, torch.float64))["energy"]
    torch.testing.assert_close(energy_moved, energy, rtol=0, atol=1e-9)

    # permute atoms inside the first molecule
    one = data.subset([0])
    perm = np.random.default_rng(0).permutation(len(one.numbers))
    permuted = PackedDataset(
        np.asarray(one.numbers)[perm], np.asarray(one.positions)[perm], one.offsets, units=one.units
    )
    e1 = model(one.batch([0], model.cutoff, torch.float64))["energy"]
    e2 = model(permuted.batch([0], model.cutoff, torch.float64))["energy"]
    torch.testing.assert_close(e2, e1, rtol=0, atol=1e-9)
    assert abs(float(e1[0].detach() - energy[0].detach())) < 1e-9


@pytest.mark.parametrize("rep", MODELS)
def test_molecule_alone_equals_molecule_in_batch(data, rep):
    model = random_model(rep)
    together = model(data.batch(range(10), model.cutoff, torch.float64))
    for m in (0, 4, 9):
        alone = model(data.batch([m], model.cutoff, torch.float64))
        torch.testing.assert_close(alone["energy"][0], together["energy"][m], rtol=0, atol=1e-9)


def test_first_block_takes_in2f_of_the_embedding_per_element(data, monkeypatch):
    """SchNet's first block reads ``in2f(a)[Z_i]``, one product of the embedding table: the
    atoms' ``in2f(a_Z)`` rows, zeros past them, and the same energies, forces and parameter
    gradients as the atoms' product, for more atoms than the table has rows. A hook on
    those modules turns it off (explanations' hooks see the atoms' rows); the forward pass
    uses what it returns."""
    from atomlens.models.schnet import SchNet

    model = random_model("schnet").train()
    rep = model.representation
    batch = data.batch(range(10), model.cutoff, torch.float64)
    n = batch.numbers.shape[0]
    assert n > rep.embedding.num_embeddings  # fewer atoms: the atoms' product
    one = data.batch([0], model.cutoff, torch.float64)
    assert rep.embedded_in2f(one.numbers, one.numbers.shape[0]) is None
    first = rep.embedded_in2f(batch.numbers, n + 3)
    expected = rep.interactions[0].in2f(rep.embedding(batch.numbers))
    torch.testing.assert_close(first[:n], expected, rtol=0, atol=1e-12)
    assert first.shape[0] == n + 3 and not first[n:].any()

    def results():
        model.zero_grad()
        out = model(batch, forces=True)
        (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return out["energy"].detach(), out["forces"].detach(), grads

    shortcut = results()
    seen = []
    handle = rep.interactions[0].in2f.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0])
    )
    try:
        assert rep.embedded_in2f(batch.numbers, n) is None
        hooked = results()
    finally:
        handle.remove()
    assert seen and all(rows >= n for rows in seen)  # the atoms' rows, padded in training
    torch.testing.assert_close(hooked[0], shortcut[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(hooked[1], shortcut[1], rtol=0, atol=1e-10)
    for a, b in zip(hooked[2], shortcut[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the embedding's padding row (Z = 0) gets no gradient, as through nn.Embedding
    with_padding = torch.cat([batch.numbers, batch.numbers.new_zeros(1)])
    rep.zero_grad()
    rep.embedded_in2f(with_padding, n + 1).sum().backward()
    assert rep.embedding.weight.grad[0].abs().max() == 0
    assert rep.embedding.weight.grad[batch.numbers].abs().max() > 0
    monkeypatch.setattr(
        SchNet,
        "embedded_in2f",
        lambda self, numbers, rows, per_element=None: torch.zeros_like(first[:1]).expand(rows, -1),
    )
    assert not torch.allclose(model(batch)["energy"], shortcut[0])


def test_frozen_model_folds_the_head_into_the_last_block(data):
    """``freeze()`` folds the head's first layer into SchNet's last dense layer (hidden =
    W1 x + (W1 D) s + (W1 d + b1)) and keeps the first block's per-element ``in2f``: the
    frozen model gives the same energies, atomic energies and forces as the model, in
    float64 to rounding, without calling the folded layer; hooks on those layers turn the
    fold off and see their inputs; DTNN, which ends in no linear layer, has no fold."""
    from atomlens.models.potential import FrozenModel
    from atomlens.models.schnet import FrozenSchNet

    model = random_model("schnet")
    model.set_statistics(atomref=np.linspace(-3.0, 1.0, 101), shift=0.7, scale=1.9)
    rep, head = model.representation, model.head
    last = rep.last_update()
    assert last is rep.interactions[-1].f2out[2]
    frozen = model.freeze()
    assert isinstance(frozen, FrozenModel) and isinstance(frozen.representation, FrozenSchNet)
    torch.testing.assert_close(frozen.head_weight, head[0].weight @ last.weight)
    torch.testing.assert_close(frozen.head_bias, head[0].weight @ last.bias + head[0].bias)
    torch.testing.assert_close(
        frozen.representation.first_in2f, rep.interactions[0].in2f(rep.embedding.weight)
    )
    for molecules in ([0], range(10)):  # fewer and more atoms than the embedding has rows
        batch = data.batch(molecules, model.cutoff, torch.float64)
        plain = model(batch, forces=True)
        calls = []
        original = last.forward  # the fold runs without calling it: count its calls
        last.forward = lambda x, calls=calls, original=original: calls.append(1) or original(x)
        try:
            folded = model(batch, forces=True, frozen=frozen)
        finally:
            del last.forward
        assert not calls
        for key in ("energy", "atomic", "forces"):
            torch.testing.assert_close(folded[key], plain[key], rtol=1e-12, atol=1e-10)
    seen = []
    handle = head[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        hooked = model(batch, forces=True, frozen=frozen)
    finally:
        handle.remove()
    assert seen == [(batch.numbers.shape[0], rep.n_atom_basis)]  # the features, unfolded
    torch.testing.assert_close(hooked["forces"], plain["forces"], rtol=1e-12, atol=1e-10)
    # hooks on the last block or its layers (which the fold calls in parts, or not at all)
    # see the block's real update, and one that changes it changes the frozen model alike
    block = rep.interactions[-1]
    for module in (block, block.f2out):
        updates = []
        handle = module.register_forward_hook(lambda m, args, out, u=updates: u.append(out))
        try:
            model(batch, frozen=frozen)
            model(batch)
        finally:
            handle.remove()
        assert len(updates) == 2
        torch.testing.assert_close(updates[0], updates[1], rtol=0, atol=0)
        handle = module.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
        try:
            changed = [model(batch, frozen=frozen)["energy"], model(batch)["energy"]]
        finally:
            handle.remove()
        torch.testing.assert_close(changed[0], changed[1], rtol=0, atol=0)
        assert not torch.allclose(changed[0], plain["energy"])
    dtnn = random_model("dtnn").freeze()
    assert isinstance(dtnn, FrozenModel) and dtnn.head_weight is None


def test_float32_batch_matches_float64_within_tolerance(data):
    model = random_model("schnet")
    e64 = model(data.batch(range(5), model.cutoff, torch.float64))["energy"]
    e32 = model.float()(data.batch(range(5), model.cutoff, torch.float32))["energy"]
    torch.testing.assert_close(e32.double(), e64, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("rep", MODELS)
def test_save_load_identical_predictions(tmp_path, data, rep):
    model = random_model(rep)
    path = save_model(model, tmp_path / "m")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = load_model(path, dtype=torch.float64)
    batch = data.batch(range(6), model.cutoff, torch.float64)
    torch.testing.assert_close(loaded(batch)["energy"], model(batch)["energy"], rtol=0, atol=0)
    torch.testing.assert_close(loaded.atomref, model.atomref)


def test_load_rejects_damaged_files(tmp_path):
    model = random_model("schnet")
    path = save_model(model, tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged"):
        load_model(path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")


def test_load_checks_the_weights_against_the_saved_checksum(tmp_path, data):
    """A flipped bit keeps a safetensors file readable: the SHA-256 recorded at the save
    refuses it, and weights of another save copied in; a folder of a later layout asks for
    a newer atomlens; a folder saved before the checksum loads as it is."""
    import json

    model = random_model("schnet")
    path = save_model(model, tmp_path / "m")
    weights, config = path / "model.safetensors", path / "config.json"
    doc = json.loads(config.read_text())
    assert doc["format"] == 1 and len(doc["weights_sha256"]) == 64
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[-5] ^= 0x10  # inside the last tensor's data: still a readable file
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="damaged or replaced since the save"):
        load_model(path)
    other = save_model(random_model("schnet", seed=1), tmp_path / "other")
    weights.write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="damaged or replaced since the save"):
        load_model(path)
    weights.write_bytes(original)
    config.write_text(json.dumps({**doc, "format": 2}))
    with pytest.raises(ValueError, match="upgrade atomlens"):
        load_model(path)
    old = {k: v for k, v in doc.items() if k not in ("format", "weights_sha256")}
    config.write_text(json.dumps(old))
    batch = data.batch(range(3), model.cutoff, torch.float64)
    torch.testing.assert_close(load_model(path)(batch)["energy"], model(batch)["energy"])


def test_atomic_contributions_sum_to_total(data):
    model = random_model("schnet")
    out = model(data.batch([3, 5], model.cutoff, torch.float64))
    n0 = int(data.n_atoms_per[3])
    torch.testing.assert_close(out["atomic"][:n0].sum(), out["energy"][0])


def test_intensive_target_uses_mean_pooling(data):
    model = random_model("schnet", aggregation="mean", target="homo")
    batch = data.batch([0, 1], model.cutoff, torch.float64)
    out = model(batch)
    n0 = int(data.n_atoms_per[0])
    torch.testing.assert_close(out["homo"][0], out["atomic"][:n0].mean())


def test_pairs_symmetric_layout_and_cutoff():
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [6.0, 0, 0], [0.0, 0, 0], [0.0, 2, 0]])
    i, j = molecular_pairs(torch.tensor([3, 2]), pos, cutoff=5.5)
    half = len(i) // 2
    assert torch.equal(i[:half], j[half:]) and torch.equal(j[:half], i[half:])
    assert (i[:half] < j[:half]).all()
    pairs = {(int(a), int(b)) for a, b in zip(i, j)}
    # 0-1 (1 A) and 1-2 (5 A) within the cutoff, 0-2 (6 A) not; 3-4 in the second molecule
    assert pairs == {(0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3)}


def test_verlet_list_rebuilds_only_when_needed():
    """Pairs within cutoff + skin; rebuilt when an atom moves more than skin / 2, or when the
    cell, the periodicity or the number of atoms changes; molecules without a cell too."""
    from ase.build import bulk

    from atomlens.data.neighbors import VerletList, periodic_pairs

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    cell, pbc = atoms.cell.array, np.array([True, True, True])
    verlet = VerletList(cutoff=3.0, skin=0.8)
    assert verlet.update(atoms.positions, cell, pbc) and verlet.builds == 1
    for got, want in zip(verlet.pairs, periodic_pairs(atoms.positions, cell, pbc, 3.8)):
        np.testing.assert_array_equal(got, want)
    moved = atoms.positions.copy()
    moved[3] += [0.39, 0.0, 0.0]  # less than skin / 2
    assert not verlet.update(moved, cell, pbc) and verlet.builds == 1
    moved[3] += [0.02, 0.0, 0.0]  # now 0.41
    assert verlet.update(moved, cell, pbc) and verlet.builds == 2
    assert not verlet.update(moved, cell, pbc)
    assert verlet.update(moved, cell * 1.01, pbc)  # a new cell
    assert verlet.update(moved, cell * 1.01, np.array([True, True, False]))  # new periodicity
    assert verlet.update(moved[:-1], cell * 1.01, np.array([True, True, False]))  # fewer atoms
    molecule = VerletList(cutoff=1.5, skin=0.5)
    positions = np.array([[1.0, 1, 1], [2.2, 1.9, 1.4], [3.0, 3, 3]])  # 1.55, 2.1, 3.5 A
    assert molecule.update(positions, np.zeros((3, 3)), np.zeros(3, bool))
    i, j, shifts = molecule.pairs
    assert list(zip(i, j)) == [(0, 1)] and i.dtype == j.dtype == shifts.dtype == np.int64
    assert shifts.shape == (1, 3) and not shifts.any()
    everything = VerletList(cutoff=None)  # no cutoff: every pair
    everything.update(positions, np.zeros((3, 3)), np.zeros(3, bool))
    assert list(zip(*everything.pairs[:2])) == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="need a model with a cutoff"):
        periodic_pairs(atoms.positions, cell, pbc, None)
    with pytest.raises(ValueError, match="cell vectors span no volume"):
        periodic_pairs(atoms.positions, np.diag([5.0, 5.0, 0.0]), pbc, 3.0)
    with pytest.raises(ValueError, match="positions are needed"):
        molecular_pairs(torch.tensor([3]), None, cutoff=2.0)


def test_model_is_smooth_at_the_cutoff():
    """The cosine cutoff makes the energy continuous when a pair crosses the cutoff."""
    model = random_model("schnet")
    energies = []
    for d in (4.999, 5.001):
        data = PackedDataset.from_structures([(np.array([6, 8]), np.array([[0, 0, 0], [d, 0, 0]]))])
        batch = data.batch([0], model.cutoff, torch.float64)
        energies.append(float(model(batch)["energy"][0].detach()))
    assert abs(energies[0] - energies[1]) < 1e-6
