"""Explanations of whole molecular models: sum rules, an analytic model, symmetry, walks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from helpers import random_model
from torch import nn

from atomlens.explain.graph import (
    Gamma,
    _ProductStatistics,
    fit_molecule_patterns,
    lrp_epsilon_rules,
    lrp_gamma_rules,
    n_body_terms,
    relevance_graph,
    walk_n_body,
)
from atomlens.explain.molecules import MOLECULE_METHODS, explain_molecule, switched_energy

ETHANOL = molecule("CH3CH2OH")


def three_block_schnet():
    return random_model(
        "schnet",
        representation_kwargs={
            "n_atom_basis": 8,
            "n_interactions": 3,
            "n_filters": 8,
            "n_rbf": 8,
            "cutoff": 3.0,
        },
    )


@pytest.mark.parametrize("representation", ["schnet", "dtnn"])
def test_sum_rules(representation):
    model = random_model(representation)
    energy = float(model.predict(ETHANOL)["energy"][0])
    for method in ("relevant_walks", "lrp_gamma"):
        e = explain_molecule(model, ETHANOL, method)
        assert e.energy == pytest.approx(energy, abs=1e-9)
        # LRP-0 and sign-aware LRP-gamma (with the bias shares) conserve exactly
        assert abs(e.conservation_error) < 1e-9
        assert e.reference == pytest.approx(
            float((model.shift + model.atomref[torch.as_tensor(ETHANOL.numbers)]).sum())
        )
        n_body = e.one_body.sum() + e.pair_relevance.sum() + e.triple_relevance.sum()
        assert n_body + e.remainder == pytest.approx(e.atoms.sum(), abs=1e-9)
    # two blocks: walks visit at most three atoms, so 1 + 2 + 3-body terms are complete
    assert abs(e.remainder) < 1e-9
    ig = explain_molecule(model, ETHANOL, "integrated_gradients", n_steps=24)
    isolated = sum(float(model.predict(Atoms([a]))["energy"][0]) for a in ETHANOL)
    assert ig.reference == pytest.approx(isolated, abs=1e-9)  # all pairs off = atoms alone
    assert ig.pair_relevance.sum() == pytest.approx(energy - isolated, abs=1e-6)
    assert abs(ig.conservation_error) < 1e-6
    mbe = explain_molecule(model, ETHANOL, "many_body_expansion")
    assert mbe.reference == pytest.approx(isolated, abs=1e-9)
    np.testing.assert_allclose(mbe.one_body.sum(), isolated, atol=1e-9)
    n_body = mbe.one_body.sum() + mbe.pair_relevance.sum() + mbe.triple_relevance.sum()
    assert n_body + mbe.remainder == pytest.approx(energy, abs=1e-9)
    assert abs(mbe.conservation_error) < 1e-9
    lrp = explain_molecule(model, ETHANOL, "lrp_epsilon", epsilon=0.05)
    assert abs(lrp.conservation_error) > 1e-6  # epsilon absorbs relevance: not conservative


def _linear_one_block_model():
    """One interaction, no activations (identity): the energy is analytic in the embeddings."""
    model = random_model(
        "schnet",
        seed=3,
        representation_kwargs={
            "n_atom_basis": 6,
            "n_interactions": 1,
            "n_filters": 5,
            "n_rbf": 7,
            "cutoff": 4.0,
            "filter_spacing": None,
        },
    )
    model.head[1] = nn.Identity()
    model.representation.interactions[0].f2out[1] = nn.Identity()
    return model


@torch.no_grad()
def _analytic_terms(model, atoms):
    """Independent evaluation: E = c_i + sum_{i<j} P_ij with the block and head as matrices."""
    rep, block = model.representation, model.representation.interactions[0]
    x0 = rep.embedding.weight[torch.as_tensor(atoms.numbers)]
    u = (model.head[2].weight @ model.head[0].weight)[0] * model.scale  # linear head
    c = (model.head[2].weight @ model.head[0].bias + model.head[2].bias)[0] * model.scale
    out1, out2 = block.f2out[0], block.f2out[2]
    a, b_in = out2.weight @ out1.weight, block.in2f.weight
    bias = out2.weight @ out1.bias + out2.bias
    positions = torch.as_tensor(atoms.positions)
    n = len(atoms)
    one = torch.stack([u @ (x0[i] + bias) + c for i in range(n)])
    pairs = {}
    for i in range(n):
        for j in range(i + 1, n):
            d = float((positions[i] - positions[j]).norm())
            if d >= rep.cutoff:
                continue
            e = torch.exp(-rep.rbf.gamma * (d - rep.rbf.centres) ** 2)
            w = block.filter_network(e) * 0.5 * (math.cos(math.pi * d / rep.cutoff) + 1)
            pairs[(i, j)] = float(u @ a @ (w * (b_in @ x0[j]) + w * (b_in @ x0[i])))
    return one.detach().numpy(), pairs


def test_exact_recovery_on_an_analytic_model():
    model = _linear_one_block_model()
    atoms = molecule("CH3OH")
    one, pairs = _analytic_terms(model, atoms)
    reference = float((model.shift + model.atomref[torch.as_tensor(atoms.numbers)]).sum())
    energy = float(model.predict(atoms)["energy"][0])
    assert one.sum() + sum(pairs.values()) == pytest.approx(energy - reference, abs=1e-9)
    expected = np.array(
        [
            pairs[tuple(p)]
            for p in [(i, j) for i in range(len(atoms)) for j in range(i + 1, len(atoms))]
        ]
    )
    walks = explain_molecule(model, atoms, "relevant_walks")
    np.testing.assert_allclose(walks.one_body, one, atol=1e-10)
    np.testing.assert_allclose(
        [pairs[tuple(p)] for p in walks.pairs.tolist()], walks.pair_relevance, atol=1e-10
    )
    assert np.abs(walks.triple_relevance).max() < 1e-10  # one block: no three-body walks
    # the energy is linear in the pair switches: gradient x input, IG and the model's
    # many-body expansion give the pair terms
    for method in ("gradient_x_input", "integrated_gradients", "many_body_expansion"):
        e = explain_molecule(model, atoms, method, n_steps=4)
        np.testing.assert_allclose(e.pair_relevance, expected, atol=1e-10)


@pytest.mark.parametrize("method", MOLECULE_METHODS)
def test_permutation_equivariance(method):
    model = random_model("schnet")
    patterns = None
    if method == "patternattribution":
        patterns = fit_molecule_patterns(
            model, [model.batch_from_atoms([ETHANOL, molecule("CH4")])]
        )
    order = np.random.default_rng(0).permutation(len(ETHANOL))
    permuted = ETHANOL[order]
    a = explain_molecule(model, ETHANOL, method, patterns=patterns, n_steps=8)
    b = explain_molecule(model, permuted, method, patterns=patterns, n_steps=8)
    np.testing.assert_allclose(b.atoms, a.atoms[order], atol=1e-9)
    np.testing.assert_allclose(b.pair_matrix(), a.pair_matrix()[np.ix_(order, order)], atol=1e-9)
    if a.triples is not None:
        inverse = np.argsort(order)
        mapped = {tuple(sorted(inverse[t])): r for t, r in zip(a.triples, a.triple_relevance)}
        for t, r in zip(b.triples.tolist(), b.triple_relevance):
            assert r == pytest.approx(mapped[tuple(t)], abs=1e-9)


@pytest.mark.parametrize("representation", ["schnet", "dtnn"])
def test_walk_sums_agree_with_n_body_marginals(representation):
    model = three_block_schnet() if representation == "schnet" else random_model("dtnn")
    batch = model.batch_from_atoms(ETHANOL)
    graph = relevance_graph(model, batch, lrp_epsilon_rules())
    walks, relevance = graph.walks()
    assert len(walks) == graph.n_walks()
    assert float(relevance.sum()) == pytest.approx(float(graph.node_relevance().sum()), abs=1e-10)
    # every walk is a chain of residual steps and messages between neighbours
    steps = torch.stack([walks[:, :-1], walks[:, 1:]], -1).reshape(-1, 2)
    allowed = graph.neighbours | torch.eye(graph.n_atoms, dtype=torch.bool)
    assert bool(allowed[steps[:, 0], steps[:, 1]].all())
    terms = n_body_terms(graph, 3)
    for order in (2, 3):
        sums = walk_n_body(walks, relevance, order)
        for key, value in zip(terms[order][0].tolist(), terms[order][1].tolist()):
            assert sums.get(tuple(key), 0.0) == pytest.approx(value, abs=1e-10)
        assert set(sums) <= {tuple(k) for k in terms[order][0].tolist()}
    # the walk relevances counted at their start atom are LRP's input relevances
    start = torch.zeros(graph.n_atoms, dtype=relevance.dtype).index_add_(0, walks[:, 0], relevance)
    torch.testing.assert_close(start, graph.node_relevance(), atol=1e-10, rtol=0)


def test_walk_limit_falls_back_to_marginals():
    model = three_block_schnet()
    full = explain_molecule(model, ETHANOL, "relevant_walks")
    limited = explain_molecule(model, ETHANOL, "relevant_walks", max_walks=10)
    assert full.walks is not None and limited.walks is None
    assert "max_walks" in limited.notes[0]
    np.testing.assert_allclose(limited.pair_relevance, full.pair_relevance, atol=1e-10)
    assert abs(full.remainder) > 0  # three blocks: walks through four atoms exist


def test_gamma_rule_matches_its_definition():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    z = layer(x)
    relevance_out = torch.randn(5, 3, dtype=torch.float64)
    gamma = 0.3
    g = Gamma(gamma).backward(layer, x, z, relevance_out / z)  # gradient form: g_z = R / z
    expected = torch.zeros_like(x)
    for r in range(5):
        for j in range(3):
            contributions = x[r] * layer.weight[j]
            same = (contributions > 0) if z[r, j] > 0 else (contributions < 0)
            b = layer.bias[j]
            b_same = b if (b > 0) == bool(z[r, j] > 0) else 0.0
            denominator = z[r, j] + gamma * ((contributions * same).sum() + b_same)
            expected[r] += (
                (contributions + gamma * contributions * same) / denominator * relevance_out[r, j]
            )
    torch.testing.assert_close(x * g, expected)


def test_pairwise_rules_match_their_definitions():
    """cfconv rules: R_p = c_p x_p g_r must be the epsilon / gamma share of receiver r's R_r."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(7, 2, generator=generator, dtype=torch.float64)
    inputs = torch.randn(7, 2, generator=generator, dtype=torch.float64)
    receivers = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    relevance = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    u = weights * inputs
    z = torch.zeros(3, 2, dtype=torch.float64).index_add_(0, receivers, u)
    epsilon, gamma = 0.3, 0.4
    c = lrp_epsilon_rules(epsilon).pairwise("cfconv", weights, inputs, receivers, 3)
    expected = u * (relevance / (z + epsilon * torch.sign(z)))[receivers]
    torch.testing.assert_close(inputs * c * (relevance / z)[receivers], expected)
    c = lrp_gamma_rules(gamma).pairwise("cfconv", weights, inputs, receivers, 3)
    for p in range(7):
        r = int(receivers[p])
        members = receivers == r
        same = torch.sign(u[members]) == torch.sign(z[r])
        share = u[p] + gamma * u[p] * (torch.sign(u[p]) == torch.sign(z[r]))
        share = share / (z[r] + gamma * (u[members] * same).sum(0)) * relevance[r]
        torch.testing.assert_close(inputs[p] * c[p] * relevance[r] / z[r], share)


def test_per_filter_pattern_is_the_signal_direction():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, generator=generator, dtype=torch.float64)
    w = 1.0 + torch.rand(2000, 3, generator=generator, dtype=torch.float64)
    u = w * x
    statistics = _ProductStatistics(3)
    statistics.update(x[:700], u[:700])
    statistics.update(x[700:], u[700:])  # streaming: same as one pass
    xc, uc = x - x.mean(0), u - u.mean(0)
    torch.testing.assert_close(statistics.pattern(), (xc * uc).sum(0) / (uc * uc).sum(0))
    constant = _ProductStatistics(3)
    constant.update(x, 2.5 * x)
    torch.testing.assert_close(constant.pattern(), torch.full((3,), 0.4, dtype=torch.float64))


def test_patternattribution_reports_its_conservation_error():
    model = random_model("dtnn")
    patterns = fit_molecule_patterns(model, [model.batch_from_atoms([ETHANOL, molecule("H2O")])])
    assert "representation.interactions.0.product" in patterns
    e = explain_molecule(model, ETHANOL, "patternattribution", patterns=patterns)
    assert np.isfinite(e.conservation_error)
    assert e.conservation_error == pytest.approx(e.atoms.sum() - e.explained)


def test_switched_energy_interpolates_between_isolated_atoms_and_molecule():
    model = random_model("schnet")
    batch = model.batch_from_atoms(ETHANOL)
    half = batch.pair_i.shape[0] // 2
    with torch.no_grad():
        full = float(switched_energy(model, batch, torch.ones(half, dtype=torch.float64)))
    assert full == pytest.approx(float(model.predict(ETHANOL)["energy"][0]))
    assert len(model.representation.interactions[0]._forward_pre_hooks) == 0  # hooks removed


def test_errors():
    model = random_model("schnet")
    with pytest.raises(ValueError, match="unknown method"):
        explain_molecule(model, ETHANOL, "saliency")
    with pytest.raises(ValueError, match="fit_molecule_patterns"):
        explain_molecule(model, ETHANOL, "patternattribution")
    with pytest.raises(ValueError, match="extensive"):
        explain_molecule(random_model("schnet", aggregation="mean"), ETHANOL)


def test_cli_writes_figure_and_tables(tmp_path):
    import ase.io

    from atomlens.cli import main
    from atomlens.models.io import save_model

    save_model(random_model("schnet").float(), tmp_path / "model")
    ase.io.write(tmp_path / "ethanol.xyz", ETHANOL)
    ase.io.write(tmp_path / "train.xyz", [ETHANOL, molecule("CH4"), molecule("H2O")])
    code = main(
        [
            "explain",
            "molecule",
            str(tmp_path / "model"),
            str(tmp_path / "ethanol.xyz"),
            "--method",
            "relevant_walks",
            "--method",
            "patternattribution",
            "--fit-data",
            str(tmp_path / "train.xyz"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    for name in (
        "relevant_walks.png",
        "relevant_walks_terms.csv",
        "relevant_walks_terms.md",
        "relevant_walks.json",
        "patternattribution.png",
        "patterns.safetensors",
    ):
        assert (tmp_path / "out" / name).stat().st_size > 0
    table = (tmp_path / "out" / "relevant_walks_terms.md").read_text()
    assert "| pair |" in table and "| three-body |" in table and "| walk |" in table
    # one interactive 3D view holds every method's atom relevances (meV)
    page = (tmp_path / "out" / "relevance.html").read_text()
    assert "relevant_walks (meV)" in page and "patternattribution (meV)" in page
    assert (
        main(
            [
                "explain",
                "molecule",
                str(tmp_path / "model"),
                str(tmp_path / "ethanol.xyz"),
                "--method",
                "patternattribution",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
