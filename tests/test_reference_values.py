"""Reference values: energies and forces of small DTNN and SchNet models (direct and
tabulated filters) on fixed molecules, against the papers' equations written here in plain
numpy, independently of the model code. The weights are drawn with numpy and loaded into
the models; the numpy side never calls atomlens.

DTNN (Schütt et al., Nat. Commun. 2017), with atomlens's cosine cutoff f(d):

    c_i^(0) = C_{Z_i},  e_k(d) = exp(-gamma (d - mu_k)^2),  mu_k = linspace(start, stop, K)
    v_ij = tanh(W^fc ((W^cf c_j + b^f1) * (W^df e(d_ij) + b^f2))) f(d_ij)
    c_i^(t+1) = c_i^(t) + sum_{j != i} v_ij

SchNet (Schütt et al., NeurIPS 2017 / JCP 2018):

    x_i^(0) = a_{Z_i},  W(d) = (W2 ssp(W1 e(d) + b1) + b2) f(d),  ssp(z) = ln(e^z / 2 + 1 / 2)
    x_i <- x_i + W4 ssp(W3 sum_j (W_in x_j) * W(d_ij) + b3) + b4

Both: E = sum_i [scale (V2 act(V1 x_i + c1) + c2) + shift + atomref[Z_i]] (eV), F = -dE/dR
(central finite differences of the numpy energy).
"""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase.build import molecule

from atomlens.models import build_model

CUTOFF = 4.0
DTNN_KWARGS = {
    "n_atom_basis": 6,
    "n_interactions": 2,
    "n_factors": 5,
    "n_rbf": 12,
    "cutoff": CUTOFF,
    "rbf_stop": 3.5,
    "rbf_gamma": 4.0,
    "rbf_start": 0.5,
}
SCHNET_KWARGS = {
    "n_atom_basis": 6,
    "n_interactions": 2,
    "n_filters": 5,
    "n_rbf": 8,
    "cutoff": CUTOFF,
}


def _molecules():
    rng = np.random.default_rng(11)
    frames = []
    for name in ("CH3CH2OH", "C6H6", "CH3CONH2"):
        atoms = molecule(name)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)  # off symmetry
        frames.append(atoms)
    return frames


# ------------------------------------------------------------------ numpy side
def ssp(z):
    return np.logaddexp(z, 0.0) - math.log(2.0)


def cosine_cutoff(d):
    return np.where(d < CUTOFF, 0.5 * (np.cos(np.pi * d / CUTOFF) + 1.0), 0.0)


def gaussians(d, centres, gamma):
    return np.exp(-gamma * (d[..., None] - centres) ** 2)


def distances(positions):
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    neighbour = (d < CUTOFF) & ~np.eye(len(positions), dtype=bool)
    return d, neighbour


def dtnn_features(w, numbers, positions, kwargs):
    c = w["representation.embedding.weight"][numbers]
    d, neighbour = distances(positions)
    centres = np.linspace(kwargs["rbf_start"], kwargs["rbf_stop"], kwargs["n_rbf"])
    e = gaussians(d, centres, kwargs["rbf_gamma"])  # (n, n, K)
    f = cosine_cutoff(d) * neighbour
    for t in range(kwargs["n_interactions"]):
        p = f"representation.interactions.{t}."
        coefficient = (
            c @ w[p + "coefficient_to_factor.weight"].T + w[p + "coefficient_to_factor.bias"]
        )
        distance = e @ w[p + "distance_to_factor.weight"].T + w[p + "distance_to_factor.bias"]
        v = np.tanh((coefficient[None, :, :] * distance) @ w[p + "factor_to_coefficient.weight"].T)
        c = c + (v * f[..., None]).sum(1)  # v[i, j]: message to i from j
    return c


def schnet_features(w, numbers, positions, kwargs):
    x = w["representation.embedding.weight"][numbers]
    d, neighbour = distances(positions)
    n_rbf = kwargs["n_rbf"]
    centres = np.linspace(0.0, CUTOFF, n_rbf)
    gamma = 0.5 / (CUTOFF / (n_rbf - 1)) ** 2  # Gaussians one spacing wide
    e = gaussians(d, centres, gamma)
    f = cosine_cutoff(d) * neighbour
    for t in range(kwargs["n_interactions"]):
        p = f"representation.interactions.{t}."
        hidden = ssp(e @ w[p + "filter_network.0.weight"].T + w[p + "filter_network.0.bias"])
        filters = hidden @ w[p + "filter_network.2.weight"].T + w[p + "filter_network.2.bias"]
        filters = filters * f[..., None]
        y = x @ w[p + "in2f.weight"].T
        conv = (y[None, :, :] * filters).sum(1)
        v = ssp(conv @ w[p + "f2out.0.weight"].T + w[p + "f2out.0.bias"])
        x = x + v @ w[p + "f2out.2.weight"].T + w[p + "f2out.2.bias"]
    return x


def energy(w, representation, numbers, positions, kwargs, activation):
    features = (dtnn_features if representation == "dtnn" else schnet_features)(
        w, numbers, positions, kwargs
    )
    hidden = activation(features @ w["head.0.weight"].T + w["head.0.bias"])
    head = (hidden @ w["head.2.weight"].T + w["head.2.bias"])[:, 0]
    return float((w["scale"] * head + w["shift"] + w["atomref"][numbers]).sum())


def forces(w, representation, numbers, positions, kwargs, activation, h=1e-5):
    result = np.zeros_like(positions)
    for i in range(len(positions)):
        for a in range(3):
            plus, minus = positions.copy(), positions.copy()
            plus[i, a] += h
            minus[i, a] -= h
            result[i, a] = -(
                energy(w, representation, numbers, plus, kwargs, activation)
                - energy(w, representation, numbers, minus, kwargs, activation)
            ) / (2 * h)
    return result


# ------------------------------------------------------------------ the models
def numpy_weights(model, seed):
    """Every parameter and statistic drawn with numpy (scaled by 1/sqrt(fan-in), so tanh and
    ssp work in their curved range); the radial centres are left to the model."""
    rng = np.random.default_rng(seed)
    weights = {}
    for key, value in model.state_dict().items():
        if key.endswith("centres"):
            continue
        shape = tuple(value.shape)
        fan_in = shape[-1] if len(shape) == 2 and "embedding" not in key else 1
        weights[key] = rng.normal(scale=1.0 / math.sqrt(fan_in), size=shape)
    weights["scale"], weights["shift"] = np.array(0.7), np.array(-0.3)
    weights["atomref"] = rng.normal(scale=2.0, size=weights["atomref"].shape)
    return weights


def build(representation, kwargs, seed, activation="ssp", **extra):
    model = build_model(
        {
            "representation": representation,
            "head_hidden": 4,
            "max_z": 10,
            "head_activation": activation,
            "representation_kwargs": dict(kwargs, **extra),
        }
    ).double()
    weights = numpy_weights(model, seed)
    state = model.state_dict()
    state.update({k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in weights.items()})
    model.load_state_dict(state)
    return model.eval(), weights


CASES = {
    "dtnn": ("dtnn", DTNN_KWARGS, {}, "tanh", np.tanh),
    "schnet_direct": ("schnet", SCHNET_KWARGS, {"filter_spacing": None}, "ssp", ssp),
    "schnet_tabulated": ("schnet", SCHNET_KWARGS, {"filter_spacing": 0.01}, "ssp", ssp),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_energies_and_forces_equal_the_equations(case):
    representation, kwargs, extra, activation, numpy_activation = CASES[case]
    model, weights = build(representation, kwargs, seed=5, activation=activation, **extra)
    # the tables interpolate W(r) between 0.01 A nodes: ~1e-9 eV here, far below any change
    # of an equation (each moves the energy by > 1e-3 eV)
    tolerance = 1e-7 if "tabulated" in case else 1e-10
    for atoms in _molecules():
        numbers, positions = atoms.numbers, atoms.positions
        out = model.predict(atoms, forces=True)
        expected = energy(weights, representation, numbers, positions, kwargs, numpy_activation)
        assert out["energy"][0] == pytest.approx(expected, rel=0, abs=tolerance)
        expected_forces = forces(
            weights, representation, numbers, positions, kwargs, numpy_activation
        )
        assert np.abs(expected_forces).max() > 0.1
        np.testing.assert_allclose(out["forces"], expected_forces, rtol=0, atol=2e-6)
        # the general path: every directed pair on its own (probe maps use it)
        batch = model.batch_from_atoms(atoms)
        batch = replace(batch, pairs=replace(batch.pairs, symmetric=False))
        general = model(batch)["energy"].detach().numpy()
        assert general[0] == pytest.approx(expected, rel=0, abs=tolerance)


def test_default_hyperparameters_are_the_papers():
    """DTNN (Nat. Commun. 2017, Methods): B = 30, T = 3, Gaussians every 0.2 Angstrom up to
    20 Angstrom with sigma = 0.2 (gamma = 1 / (2 sigma^2) = 12.5); SchNet as SchNetPack's QM9
    recipe: 128 features and filters, 6 interactions, 20 Gaussians on 0-5 Angstrom, one
    spacing wide, cosine cutoff 5 Angstrom."""
    from atomlens.models import DTNN, SchNet

    dtnn = DTNN()
    assert (dtnn.n_atom_basis, dtnn.n_interactions, dtnn.cutoff) == (30, 3, 20.0)
    np.testing.assert_allclose(dtnn.rbf.centres.numpy(), np.arange(101) * 0.2, atol=1e-5)
    assert dtnn.rbf.gamma == pytest.approx(12.5)
    schnet = SchNet()
    assert (schnet.n_atom_basis, len(schnet.interactions), schnet.cutoff) == (128, 6, 5.0)
    np.testing.assert_allclose(schnet.rbf.centres.numpy(), np.linspace(0, 5, 20), atol=1e-6)
    assert schnet.rbf.gamma == pytest.approx(0.5 / (5 / 19) ** 2)
    assert schnet.interactions[0].filter_network[0].weight.shape == (128, 20)


def test_building_blocks():
    """The cosine cutoff, the default Gaussian width, centres laid out exactly in float64,
    and the error for an unknown activation."""
    from atomlens.nn import CosineCutoff, GaussianRBF, activation

    cutoff = CosineCutoff(5.0)(torch.tensor([0.0, 2.5, 5.0, 6.0], dtype=torch.float64))
    np.testing.assert_allclose(cutoff.numpy(), [1.0, 0.5, 0.0, 0.0], atol=1e-15)
    rbf = GaussianRBF(5, stop=3.0, start=1.0)
    assert rbf.gamma == pytest.approx(0.5 / 0.5**2)  # one spacing (0.5 Angstrom) wide
    centres = GaussianRBF(12, stop=3.5, start=0.5).double().centres.numpy()
    np.testing.assert_allclose(centres, np.linspace(0.5, 3.5, 12), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"unknown activation 'relu6'; known: \['silu', 'ssp'"):
        activation("relu6")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussians_have_no_subnormal_values(dtype):
    """Gaussians far from their centre are 0, never subnormal (slow on CPUs); the rest are
    exp(-gamma (d - mu)^2) exactly, and the derivative is -2 gamma (d - mu) e."""
    from atomlens.nn import GaussianRBF

    torch.set_flush_denormal(False)  # a training run earlier in this process turned it on
    rbf = GaussianRBF(20, stop=5.0).to(dtype)
    d = torch.linspace(0.0, 40.0 if dtype == torch.float64 else 5.0, 4001, dtype=dtype)
    e, de = rbf.value_and_derivative(d)
    tiny = torch.finfo(dtype).tiny
    assert not ((e > 0) & (e < tiny)).any() and not ((de != 0) & (de.abs() < tiny)).any()
    exact = torch.exp(-rbf.gamma * (d[:, None] - rbf.centres) ** 2)
    assert ((exact > 0) & (exact < tiny)).any()  # the grid crosses the subnormal range
    kept = exact >= tiny
    torch.testing.assert_close(e[kept], exact[kept], rtol=0, atol=0)
    assert (e[~kept] == 0).all()
    torch.testing.assert_close(rbf(d), e, rtol=0, atol=0)
    torch.testing.assert_close(de, -2.0 * rbf.gamma * (d[:, None] - rbf.centres) * e)
