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
def _schnet_filter(model, d):
    """W(r) of the first block from the paper's equations: Gaussians, filter network, cutoff."""
    rep, block = model.representation, model.representation.interactions[0]
    e = torch.exp(-rep.rbf.gamma * (d - rep.rbf.centres) ** 2)
    return block.filter_network(e) * 0.5 * (math.cos(math.pi * d / rep.cutoff) + 1)


def _signal_direction(x, u):
    """Per-feature a = cov(x, u) / var(u) (least-squares signal direction), from the moments."""
    xc, uc = x - x.mean(0), u - u.mean(0)
    return (xc * uc).sum(0) / (uc * uc).sum(0)


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
            w = _schnet_filter(model, d)
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
    torch.testing.assert_close(statistics.pattern(), _signal_direction(x, u))
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


def test_cli_writes_figure_and_tables(tmp_path, capsys):
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
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    # each method's E - ref names its reference (methods differ: shift + atomrefs, or the
    # energy of the atoms alone), on the console as in the figure and the JSON
    lines = [line for line in captured.out.splitlines() if "E - ref" in line]
    assert len(lines) == 2 and all("(ref: " in line for line in lines)
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
    # saved patterns belong to the model they were fitted for: another model's, a file that
    # is not safetensors and patterns without the model's layers are refused in one line
    other = save_model(random_model("schnet", seed=1).float(), tmp_path / "other")
    use = ["explain", "molecule", str(other), str(tmp_path / "ethanol.xyz"), "--method"]
    use += ["patternattribution", "--out", str(tmp_path / "o2"), "--patterns"]
    capsys.readouterr()
    assert main([*use, str(tmp_path / "out" / "patterns.safetensors")]) == 2
    assert "fitted for another model" in capsys.readouterr().err
    assert main([*use, str(tmp_path / "ethanol.xyz")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    from atomlens.explain.patterns import Patterns

    Patterns({"elsewhere": {"a": torch.zeros(2, 2)}}).save(tmp_path / "unbound.safetensors")
    assert main([*use, str(tmp_path / "unbound.safetensors")]) == 2
    assert "no pattern fitted for layer" in capsys.readouterr().err
    # patterns fitted on two identical frames (one distinct structure): said so
    ase.io.write(tmp_path / "same.xyz", [ETHANOL, ETHANOL])
    capsys.readouterr()
    args = ["explain", "molecule", str(tmp_path / "model"), str(tmp_path / "ethanol.xyz")]
    args += ["--method", "patternattribution", "--fit-data", str(tmp_path / "same.xyz")]
    assert main([*args, "--out", str(tmp_path / "degenerate")]) == 0
    assert "same.xyz holds 1 distinct structure(s)" in capsys.readouterr().err


FIT_MOLECULES = [ETHANOL, molecule("CH4"), molecule("H2O"), molecule("CH3OH")]


def _ordered_pairs(atoms, cutoff):
    """(receiver b, sender a, distance) of every ordered pair within the cutoff."""
    positions = atoms.positions
    return [
        (b, a, float(np.linalg.norm(positions[b] - positions[a])))
        for b in range(len(atoms))
        for a in range(len(atoms))
        if a != b and np.linalg.norm(positions[b] - positions[a]) < cutoff
    ]


@torch.no_grad()
def _cfconv_pattern(model):
    """Per-filter a_f = cov(x_f, u_f) / var(u_f) over every ordered pair of the fit molecules,
    x = in2f(x0_sender), u = W(r) * x, written from the definition (numpy moments)."""
    rep, block = model.representation, model.representation.interactions[0]
    xs, us = [], []
    for atoms in FIT_MOLECULES:
        y = block.in2f(rep.embedding.weight[torch.as_tensor(atoms.numbers)])
        for _, a, d in _ordered_pairs(atoms, rep.cutoff):
            xs.append(y[a].numpy())
            us.append((_schnet_filter(model, d) * y[a]).numpy())
    return _signal_direction(np.array(xs), np.array(us))


@torch.no_grad()
@pytest.mark.parametrize("pattern_type", ["a", "a+-"])
def test_molecular_patternattribution_equals_its_closed_form(pattern_type):
    """One linear SchNet block: PatternAttribution seeds each atom's head with its output y_b,
    back-projects through every layer with W * A (A: a_+ where the layer's output is > 0, a_-
    elsewhere, for "a+-"), through cfconv with W(r_ab) * a_cf, and R_a sums the arriving
    signal over features (inputs are not multiplied in). Written here from that definition."""
    model = _linear_one_block_model()
    patterns = fit_molecule_patterns(model, [model.batch_from_atoms(FIT_MOLECULES)])
    np.testing.assert_allclose(
        patterns["representation.interactions.0.cfconv"]["a"].numpy(),
        _cfconv_pattern(model),
        rtol=1e-9,
    )
    rep, block = model.representation, model.representation.interactions[0]

    def back(name, module, x, g):
        """g_x = (W * A)^T g_z for one row x of layer ``name``."""
        z = module(x)
        if pattern_type == "a":
            a = patterns[name]["a"]
        else:
            positive = (z > 0)[:, None]
            a = torch.where(positive, patterns[name]["a_plus"], patterns[name]["a_minus"])
        return (module.weight * a).T @ g

    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    n = len(atoms)
    x0 = rep.embedding.weight[torch.as_tensor(atoms.numbers)]
    y_in = block.in2f(x0)
    pairs = _ordered_pairs(atoms, rep.cutoff)
    m = x0.new_zeros(n, y_in.shape[1])
    for b, a, d in pairs:
        m[b] += _schnet_filter(model, d) * y_in[a]
    h = block.f2out[0](m)
    x1 = x0 + block.f2out[2](h)
    head_hidden = model.head[0](x1)
    y = model.head[2](head_hidden)[:, 0]
    g_x1 = []
    for b in range(n):
        seed = model.scale * y[b : b + 1]
        g_hidden = back("head.2", model.head[2], head_hidden[b], seed)
        g_x1.append(back("head.0", model.head[0], x1[b], g_hidden))
    prefix = "representation.interactions.0."
    g_m = [
        back(
            prefix + "f2out.0",
            block.f2out[0],
            m[b],
            back(prefix + "f2out.2", block.f2out[2], h[b], g_x1[b]),
        )
        for b in range(n)
    ]
    a_cf = patterns[prefix + "cfconv"]["a"]
    relevance = torch.stack([g.sum() for g in g_x1])  # residual path
    for b, a, d in pairs:
        g_y = _schnet_filter(model, d) * a_cf * g_m[b]
        relevance[a] += back(prefix + "in2f", block.in2f, x0[a], g_y).sum()

    e = explain_molecule(
        model, atoms, "patternattribution", patterns=patterns, pattern_type=pattern_type
    )
    np.testing.assert_allclose(e.atoms, relevance.numpy(), rtol=1e-9, atol=1e-12)
    assert e.explained == pytest.approx(float(model.scale * y.sum()), abs=1e-12)
    # every walk starts at an atom: the walk relevances sum to the atoms'
    assert e.pair_relevance.sum() + e.one_body.sum() + e.remainder == pytest.approx(
        e.atoms.sum(), abs=1e-9
    )


@torch.no_grad()
def test_molecule_patterns_cover_the_relevance_path_in_the_models_dtype():
    """Exactly the relevance layers and one product pattern per block; the DTNN factor
    product's per-factor pattern from its definition; float32 models get float32 patterns."""
    from atomlens.explain.graph import relevance_layers

    model = random_model("dtnn")
    captured = []
    hooks = [
        block.register_forward_pre_hook(lambda m, args: captured.append((m, args)))
        for block in model.representation.interactions
    ]
    batch = model.batch_from_atoms(FIT_MOLECULES)
    patterns = fit_molecule_patterns(model, [batch])
    for hook in hooks:
        hook.remove()
    names = [f"representation.interactions.{t}.product" for t in range(2)]
    assert set(patterns) == set(relevance_layers(model)) | set(names)
    for name, (block, (c, rbf, _, pairs)) in zip(names, captured):
        x = block.coefficient_to_factor(c)[pairs.j].numpy()
        u = block.distance_to_factor(rbf).repeat(2, 1).numpy() * x
        np.testing.assert_allclose(patterns[name]["a"].numpy(), _signal_direction(x, u), rtol=1e-9)
    single = random_model("schnet").float()
    patterns = fit_molecule_patterns(single, [single.batch_from_atoms(FIT_MOLECULES)])
    assert {p.dtype for layer in patterns.values() for p in layer.values()} == {torch.float32}


def test_product_pattern_thresholds_are_relative():
    """Features whose u barely varies (relative to the most varying one) get pattern 0, at any
    overall scale; constant features too."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(500, 3, generator=generator, dtype=torch.float64)
    for scale in (1e3, 1e-9):
        u = x * torch.tensor([1.0, 1e-8, 0.0], dtype=torch.float64) * scale
        statistics = _ProductStatistics(3)
        statistics.update(x, u)
        pattern = statistics.pattern()
        assert pattern[0] == pytest.approx(1 / scale, rel=1e-9)
        assert pattern[1] == 0 and pattern[2] == 0


def test_gamma_rules_wire_gamma_into_every_layer():
    """lrp_gamma(g) gives the linear layers Gamma(g) too (not only the filters): equal to a
    rule set built by hand; and DTNN's W^fc bias (a per-pair source) keeps LRP-0 exact."""
    from atomlens.explain.graph import MoleculeRules

    model = three_block_schnet()
    batch = model.batch_from_atoms(ETHANOL)
    rules = lrp_gamma_rules(0.3, 1e-6)
    by_hand = MoleculeRules(
        "by hand", lambda name, m: Gamma(0.3, 1e-6), lrp_gamma_rules(0.3, 1e-6).pairwise
    )
    torch.testing.assert_close(
        relevance_graph(model, batch, rules).node_relevance(),
        relevance_graph(model, batch, by_hand).node_relevance(),
    )
    assert rules.name == "lrp_gamma(0.3)" and lrp_epsilon_rules(0.5).name == "lrp_epsilon(0.5)"
    dtnn = random_model("dtnn")
    for block in dtnn.representation.interactions:
        layer = block.factor_to_coefficient
        layer.bias = nn.Parameter(torch.randn(layer.out_features, dtype=torch.float64))
    e = explain_molecule(dtnn, ETHANOL, "relevant_walks")
    assert abs(e.conservation_error) < 1e-9


def test_walks_in_small_chunks_and_with_an_isolated_last_atom(monkeypatch):
    """Chunked gathers give the same walks and subset sums; an atom without neighbours (the
    last one) has only its own residual walk."""
    from atomlens.explain import graph as graph_module

    model = three_block_schnet()
    atoms = ETHANOL + Atoms("H", positions=[[30.0, 0.0, 0.0]])
    batch = model.batch_from_atoms(atoms)
    graph = relevance_graph(model, batch, lrp_epsilon_rules())
    walks, relevance = graph.walks()
    sets = n_body_terms(graph, 3)
    monkeypatch.setattr(graph_module, "CHUNK_ENTRIES", 1.0)
    chunked_walks, chunked = graph.walks()
    torch.testing.assert_close(chunked_walks, walks)
    torch.testing.assert_close(chunked, relevance, rtol=0, atol=1e-12)
    for order, (subsets, values) in n_body_terms(graph, 3).items():
        torch.testing.assert_close(subsets, sets[order][0])
        torch.testing.assert_close(values, sets[order][1], rtol=0, atol=1e-12)
    pairs_only = n_body_terms(graph, 2)  # molecules beyond max_triple_atoms: no triples
    assert sorted(pairs_only) == [1, 2]
    for order in (1, 2):
        torch.testing.assert_close(pairs_only[order][1], sets[order][1], rtol=0, atol=1e-12)
    # LRP-0 conserves: the graph's own record of what it explains is the relevances' sum
    assert graph.explained == pytest.approx(float(graph.node_relevance().sum()), abs=1e-9)
    last = len(atoms) - 1
    assert (walks[:, 0] == last).sum() == 1 and bool((walks[walks[:, 0] == last] == last).all())
    assert float(relevance.sum()) == pytest.approx(float(graph.node_relevance().sum()), abs=1e-10)


def test_patternattribution_names_the_missing_pattern():
    from atomlens.explain.graph import pattern_attribution_rules

    model = random_model("schnet")
    patterns = fit_molecule_patterns(model, [model.batch_from_atoms(FIT_MOLECULES)])
    rules = pattern_attribution_rules(patterns)
    assert rules.name == "patternattribution"
    layer = dict(patterns)
    del layer["head.0"]
    with pytest.raises(KeyError, match="no pattern fitted for layer 'head.0'"):
        pattern_attribution_rules(layer).linear("head.0", model.head[0])
    with pytest.raises(KeyError, match="no pattern fitted for 'x.cfconv'"):
        rules.pairwise("x.cfconv", None, None, None, 0)


def test_gradient_x_input_is_the_switch_gradient_and_the_pair_matrix_holds_the_pairs():
    """gradient_x_input: R_p = 1 * dE/ds_p at all switches on (s = 1), on a nonlinear model
    where it differs from IG; the pair matrix is symmetric with the pair terms off the
    diagonal."""
    model = three_block_schnet()
    batch = model.batch_from_atoms(ETHANOL)
    half = batch.pair_i.shape[0] // 2
    switches = torch.ones(half, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(switched_energy(model, batch, switches), switches)
    e = explain_molecule(model, ETHANOL, "gradient_x_input")
    np.testing.assert_allclose(e.pairs, torch.stack([batch.pair_i[:half], batch.pair_j[:half]], 1))
    np.testing.assert_allclose(e.pair_relevance, gradient.numpy(), rtol=1e-9, atol=1e-12)
    ig = explain_molecule(model, ETHANOL, "integrated_gradients", n_steps=8)
    assert np.abs(ig.pair_relevance - e.pair_relevance).max() > 1e-4
    matrix = e.pair_matrix()
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(matrix[e.pairs[:, 0], e.pairs[:, 1]], e.pair_relevance)
    assert np.count_nonzero(matrix) == 2 * np.count_nonzero(e.pair_relevance)


def test_many_body_expansion_of_a_chain_with_a_pair_beyond_the_cutoff():
    """Three atoms in a row, the outer two beyond the cutoff: the expansion to three bodies is
    complete (no remainder) and its three-body term is the inclusion-exclusion of the model's
    energies of the sub-molecules, with E(outer pair) = E(atom) + E(atom)."""
    model = random_model("schnet")  # 5 Angstrom cutoff
    chain = Atoms("HCH", positions=[[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    e = explain_molecule(model, chain, "many_body_expansion")

    def energy(indices):
        return float(model.predict(chain[list(indices)])["energy"][0])

    one = [energy([i]) for i in range(3)]
    pair = {p: energy(p) - one[p[0]] - one[p[1]] for p in [(0, 1), (1, 2), (0, 2)]}
    assert abs(pair[(0, 2)]) < 1e-12
    three = energy([0, 1, 2]) - sum(pair.values()) - sum(one)
    assert e.triple_relevance.tolist() == pytest.approx([three], abs=1e-9)
    assert abs(e.remainder) < 1e-9


def test_explain_molecule_options_limits_and_the_callers_model():
    """epsilon and gamma reach the rules (default 0.01 and 0.25); beyond max_triple_atoms the
    three-body terms are skipped with a note; the listed walks are the most relevant by
    magnitude, in order; the caller's float32 model is left as it was."""
    model = three_block_schnet()
    batch = model.batch_from_atoms(ETHANOL)
    for method, rules, option in (
        ("lrp_epsilon", lrp_epsilon_rules, "epsilon"),
        ("lrp_gamma", lrp_gamma_rules, "gamma"),
    ):
        default = 0.01 if option == "epsilon" else 0.25
        for value in (None, 0.2):
            options = {} if value is None else {option: value}
            e = explain_molecule(model, ETHANOL, method, **options)
            graph = relevance_graph(model, batch, rules(default if value is None else value))
            np.testing.assert_allclose(e.atoms, graph.node_relevance().numpy(), atol=1e-12)
    full = explain_molecule(model, ETHANOL, "relevant_walks", n_top_walks=5)
    assert full.triples is not None and not full.notes
    magnitudes = np.abs(full.walk_relevance)
    assert len(magnitudes) == 5 and np.all(np.diff(magnitudes) <= 0)
    graph = relevance_graph(model, batch, lrp_epsilon_rules())
    assert magnitudes[0] == pytest.approx(float(graph.walks()[1].abs().max()), abs=1e-12)
    for limit in (len(ETHANOL) - 1, len(ETHANOL)):
        for method in ("relevant_walks", "many_body_expansion"):
            e = explain_molecule(model, ETHANOL, method, max_triple_atoms=limit)
            skipped = limit < len(ETHANOL)
            assert (e.triples is None) == skipped and (e.triple_relevance is None) == skipped
    single = random_model("schnet").float()
    explain_molecule(single, ETHANOL, "relevant_walks")
    assert next(single.parameters()).dtype == torch.float32
