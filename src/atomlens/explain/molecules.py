"""Explain one prediction of a whole molecular model: atoms, pairs, three-body terms, walks.

>>> explanation = explain_molecule(model, atoms, method="relevant_walks")
>>> explanation.atoms.sum(), explanation.explained        # equal: the sum rule

Methods (:data:`MOLECULE_METHODS`) and what their relevances sum to:

=====================  ====================================  ==================================
method                 input / rules                         sum rule (reference)
=====================  ====================================  ==================================
gradient_x_input       pair switches m_ij at 1: dE/dm_ij     none (first-order Taylor only)
integrated_gradients   pair switches, baseline m = 0         sum_ij R_ij = E - sum_i E_iso(Z_i)
lrp_epsilon            LRP-epsilon (0.01), ratio gates        approximate (epsilon absorbs)
lrp_gamma              LRP-gamma (0.25), ratio gates          approximate (gamma changes the
                                                             bias shares)
relevant_walks         LRP-0 walks (GNN-LRP)                  exact: sum = E - sum_i (shift
                                                             + atomref[Z_i])
patternattribution     w * a, per-filter cfconv patterns      none: error measured
many_body_expansion    the model with only the pairs inside   exact: sum = E - sum_i E_iso(Z_i)
                       each atom set U switched on
=====================  ====================================  ==================================

*Pair switches*: the filter W(r_ij) of SchNet (the distance factor's cutoff of DTNN) is
multiplied by ``m_ij``, one switch per pair within the cutoff, attached by a forward
pre-hook. ``m = 0`` leaves every atom alone, so the Integrated Gradients reference is the
sum of the model's isolated-atom energies and every pair term is an interaction energy;
atom relevances are half of each atom's pair terms. Three-body terms are not defined for
these two methods (``triples`` is ``None``).

*Many-body expansion*: not an attribution of a gradient but the model's own n-body expansion,
``E(U)`` = the energy with only the pairs inside ``U`` switched on, and Moebius inversion over
single atoms (the isolated-atom energies), pairs and triples; everything beyond three bodies
is ``remainder``. One batched forward pass over all connected pairs and triples; atom
relevances are the change of each atom's energy contribution ``y_i`` from isolated to the
molecule (exact sum).

*LRP methods* propagate relevance through the head and every interaction block
(:mod:`.graph`); their reference is ``sum_i (shift + atomref[Z_i])``, their atom relevances
LRP's input relevances, and their pair and three-body terms are n-body terms of the walk
relevances (walks grouped by the atoms they visit). Walks visiting four or more atoms
(possible with three or more blocks) are reported as ``remainder``.

Explanations are computed on a float64 copy of the model, so LRP-0's conservation holds to
~1e-10 eV.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from ..data.batch import Pairs
from ..models.schnet import filter_values
from ..registry import MOLECULE_METHODS  # torch-free, for the command line
from .graph import (
    RelevanceGraph,
    connected_sets,
    fit_molecule_patterns,
    interaction_type,
    lrp_epsilon_rules,
    lrp_gamma_rules,
    n_body_terms,
    pattern_attribution_rules,
    relevance_graph,
    walk_n_body,
)
from .patterns import Patterns

SWITCH_METHODS = ("gradient_x_input", "integrated_gradients")


@dataclass
class MoleculeExplanation:
    """Relevances of one prediction, all in eV.

    ``atoms`` (n,); ``pairs`` (P, 2) with i < j and ``pair_relevance`` (P,); ``triples``
    (K, 3) and ``triple_relevance`` (K,) or ``None``; ``one_body`` (n,) (LRP methods);
    ``remainder``: relevance of walks through four or more atoms; ``walks`` (W, T + 1),
    atoms at layer 0..T, the most relevant first, with ``walk_relevance`` (W,).
    """

    method: str
    numbers: np.ndarray
    positions: np.ndarray
    energy: float
    reference: float
    reference_kind: str
    atoms: np.ndarray
    pairs: np.ndarray
    pair_relevance: np.ndarray
    triples: np.ndarray | None = None
    triple_relevance: np.ndarray | None = None
    one_body: np.ndarray | None = None
    remainder: float = 0.0
    walks: np.ndarray | None = None
    walk_relevance: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    unit: str = "eV"

    @property
    def explained(self) -> float:
        """``energy - reference``: what the relevances should sum to (eV)."""
        return self.energy - self.reference

    @property
    def conservation_error(self) -> float:
        """``sum_i R_i - (energy - reference)`` in eV (0 for an exact method)."""
        return float(self.atoms.sum()) - self.explained

    def pair_matrix(self) -> np.ndarray:
        """``R_ij`` as a symmetric (n, n) matrix (eV)."""
        n = len(self.numbers)
        matrix = np.zeros((n, n))
        i, j = self.pairs.T
        matrix[i, j] = matrix[j, i] = self.pair_relevance
        return matrix


def pair_switches(model: nn.Module, mask: Tensor):
    """Hooks multiplying each unordered pair's filter (SchNet) or cutoff (DTNN) by ``mask``.

    Returns the hook handles (call ``.remove()`` on each). ``mask`` has one entry per pair of
    the first half of the symmetric pair layout.
    """

    def hook(block, args):
        args = list(args)
        if interaction_type(block) == "schnet":
            filters = filter_values(args[1])
            args[1] = filters * mask[:, None].to(filters)
        else:
            args[2] = args[2] * mask.to(args[2])
        return tuple(args)

    return [block.register_forward_pre_hook(hook) for block in model.representation.interactions]


def _switched(model: nn.Module, batch, mask: Tensor) -> dict[str, Tensor]:
    handles = pair_switches(model, mask)
    try:
        return model(batch)
    finally:
        for handle in handles:
            handle.remove()


def switched_energy(model: nn.Module, batch, mask: Tensor) -> Tensor:
    """Energy (eV) with pair p's interaction scaled by ``mask[p]`` (0: pair switched off)."""
    return _switched(model, batch, mask)[model.target].sum()


def _switch_gradient(model, batch, mask: Tensor) -> Tensor:
    mask = mask.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(switched_energy(model, batch, mask), mask)
    return grad


def _explain_switches(model, batch, method: str, n_steps: int):
    half = batch.pair_i.shape[0] // 2
    pairs = torch.stack([batch.pair_i[:half], batch.pair_j[:half]], 1)
    ones = torch.ones(half, dtype=batch.positions.dtype)
    with torch.no_grad():
        isolated = float(switched_energy(model, batch, torch.zeros_like(ones)))
    if method == "gradient_x_input":
        relevance = _switch_gradient(model, batch, ones)
    else:  # Gauss-Legendre quadrature of the path m = t * 1, t in [0, 1]
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        relevance = torch.zeros_like(ones)
        for t, w in zip((nodes + 1) / 2, weights / 2):
            relevance += float(w) * _switch_gradient(model, batch, float(t) * ones)
    atoms = torch.zeros(batch.n_atoms, dtype=ones.dtype)
    atoms.index_add_(0, pairs[:, 0], relevance / 2).index_add_(0, pairs[:, 1], relevance / 2)
    return pairs, relevance, atoms, isolated


def _replicated(batch, copies: int):
    """``copies`` copies of a one-molecule ``batch`` in one batch (symmetric pair layout)."""
    n, half = batch.n_atoms, batch.pair_i.shape[0] // 2
    shift = (torch.arange(copies) * n)[:, None]
    first_i = (batch.pair_i[:half] + shift).reshape(-1)
    first_j = (batch.pair_j[:half] + shift).reshape(-1)
    return replace(
        batch,
        numbers=batch.numbers.repeat(copies),
        positions=batch.positions.repeat(copies, 1),
        structure_index=torch.arange(copies).repeat_interleave(n),
        n_atoms_per=batch.n_atoms_per.repeat(copies),
        n_structures=copies,
        pairs=Pairs.symmetric_from_half(first_i, first_j),
        targets={},
    )


def _many_body_expansion(model, batch, max_order: int):
    """``({order: (sets, terms)}, atom relevances, isolated-atom energy sum)`` in eV."""
    half = batch.pair_i.shape[0] // 2
    a, b = batch.pair_i[:half], batch.pair_j[:half]
    neighbours = torch.zeros(batch.n_atoms, batch.n_atoms, dtype=torch.bool)
    neighbours[batch.pair_i, batch.pair_j] = True
    sets = [connected_sets(neighbours, k) for k in range(2, max_order + 1)]
    inside = [
        torch.zeros(len(s), batch.n_atoms, dtype=torch.bool).scatter_(1, s, True) for s in sets
    ]
    # structure 0: every pair off; 1: every pair on; then one per pair / triple
    masks = torch.cat(
        [torch.zeros(1, half), torch.ones(1, half)]
        + [(u[:, a] & u[:, b]).to(torch.float64) for u in inside]
    ).to(batch.positions)
    with torch.no_grad():
        out = _switched(model, _replicated(batch, masks.shape[0]), masks.reshape(-1))
    energies, atomic = out[model.target], out["atomic"].reshape(masks.shape[0], -1)
    isolated = atomic[0]
    terms = {1: (torch.arange(batch.n_atoms)[:, None], isolated)}
    lookup = {(i,): float(e) for i, e in enumerate(isolated)}
    offset = 2
    for k, subsets in zip(range(2, max_order + 1), sets):
        values = []
        for row, key in enumerate(map(tuple, subsets.tolist())):
            # Z(U) = E(U on) - E(all off) + sum_{i in U} E_iso(i); then Moebius over subsets
            total = float(energies[offset + row] - energies[0]) + sum(lookup[(i,)] for i in key)
            for size in range(1, k):
                total -= sum(lookup.get(sub, 0.0) for sub in itertools.combinations(key, size))
            lookup[key] = total
            values.append(total)
        terms[k] = (subsets, torch.tensor(values, dtype=torch.float64))
        offset += len(subsets)
    return terms, atomic[1] - isolated, float(isolated.sum())


def _lrp_rules(method: str, options: dict, patterns: Patterns | None):
    if method == "lrp_epsilon":
        return lrp_epsilon_rules(options.get("epsilon", 0.01))
    if method == "lrp_gamma":
        return lrp_gamma_rules(options.get("gamma", 0.25))
    if method == "relevant_walks":
        return lrp_epsilon_rules()
    if patterns is None:
        raise ValueError("patternattribution needs patterns=fit_molecule_patterns(model, batches)")
    return pattern_attribution_rules(patterns, options.get("pattern_type", "a+-"))


def _top_walks(walks: Tensor, relevance: Tensor, n_top: int) -> tuple[np.ndarray, np.ndarray]:
    order = torch.argsort(relevance.abs(), descending=True)[:n_top]
    return walks[order].numpy(), relevance[order].numpy()


def explain_graph(
    graph: RelevanceGraph, max_walks: int, max_triple_atoms: int, n_top_walks: int, walks: bool
) -> dict:
    """Atom, n-body and (with ``walks``) walk relevances of a :class:`RelevanceGraph`."""
    out = {"atoms": graph.node_relevance().numpy(), "notes": []}
    order = 3 if graph.n_atoms <= max_triple_atoms else 2
    if order < 3:
        out["notes"].append(f"three-body terms skipped: {graph.n_atoms} atoms > {max_triple_atoms}")
    n_walks = graph.n_walks() if walks else 0
    if walks and n_walks <= max_walks:
        all_walks, relevance = graph.walks()
        terms = {}
        for k in (1, 2, 3)[:order]:
            sums = walk_n_body(all_walks, relevance, k)
            sets = connected_sets(graph.neighbours, k)
            values = [sums.get(tuple(key), 0.0) for key in sets.tolist()]
            terms[k] = (sets, torch.tensor(values, dtype=torch.float64))
        out["walks"], out["walk_relevance"] = _top_walks(all_walks, relevance, n_top_walks)
    else:
        if walks:
            out["notes"].append(
                f"{n_walks} walks > max_walks={max_walks}: n-body terms from "
                "restricted sums (same values), no walk list"
            )
        terms = n_body_terms(graph, order)
    one = np.zeros(graph.n_atoms)
    one[terms[1][0][:, 0].numpy()] = terms[1][1].numpy()
    out["one_body"] = one
    out["pairs"], out["pair_relevance"] = terms[2][0].numpy(), terms[2][1].numpy()
    if order == 3:
        out["triples"], out["triple_relevance"] = terms[3][0].numpy(), terms[3][1].numpy()
    listed = sum(float(terms[k][1].sum()) for k in terms)
    out["remainder"] = float(out["atoms"].sum()) - listed
    return out


def explain_molecule(
    model: nn.Module,
    atoms,
    method: str = "relevant_walks",
    patterns: Patterns | None = None,
    n_steps: int = 32,
    max_walks: int = 200_000,
    max_triple_atoms: int = 40,
    n_top_walks: int = 50,
    **options,
) -> MoleculeExplanation:
    """Explain ``model``'s energy of ``atoms`` (ASE ``Atoms``) with ``method``.

    See the module docstring for the methods and their sum rules. ``patterns``: from
    :func:`~atomlens.explain.graph.fit_molecule_patterns` (PatternAttribution);
    ``n_steps``: quadrature nodes of Integrated Gradients; ``max_walks``: list walks only up
    to this many (``relevant_walks``; beyond, the n-body terms come from restricted sums);
    ``max_triple_atoms``: skip three-body terms for larger molecules; options ``epsilon``
    (lrp_epsilon, default 0.01) and ``gamma`` (lrp_gamma, default 0.25).
    """
    if method not in MOLECULE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {MOLECULE_METHODS}")
    if getattr(model, "config", None) is not None and model.config.aggregation != "sum":
        raise ValueError("molecular explanations need an extensive model (aggregation 'sum')")
    model = copy.deepcopy(model).double().eval()
    batch = model.batch_from_atoms(atoms)
    with torch.no_grad():
        energy = float(model(batch)[model.target].sum())
    numbers = batch.numbers.numpy()
    common = {
        "method": method,
        "numbers": numbers,
        "positions": batch.positions.numpy(),
        "energy": energy,
    }
    if method in SWITCH_METHODS:
        pairs, relevance, atom_relevance, isolated = _explain_switches(
            model, batch, method, n_steps
        )
        return MoleculeExplanation(
            **common,
            reference=isolated,
            reference_kind="sum of the model's isolated-atom energies (all pairs switched off)",
            atoms=atom_relevance.numpy(),
            pairs=pairs.numpy(),
            pair_relevance=relevance.numpy(),
        )
    if method == "many_body_expansion":
        order = 3 if batch.n_atoms <= max_triple_atoms else 2
        terms, atom_relevance, isolated = _many_body_expansion(model, batch, order)
        listed = sum(float(terms[k][1].sum()) for k in terms)
        return MoleculeExplanation(
            **common,
            reference=isolated,
            reference_kind="sum of the model's isolated-atom energies (all pairs switched off)",
            atoms=atom_relevance.numpy(),
            one_body=terms[1][1].numpy(),
            pairs=terms[2][0].numpy(),
            pair_relevance=terms[2][1].numpy(),
            triples=terms[3][0].numpy() if order == 3 else None,
            triple_relevance=terms[3][1].numpy() if order == 3 else None,
            remainder=energy - listed,
        )
    graph = relevance_graph(model, batch, _lrp_rules(method, options, patterns))
    parts = explain_graph(
        graph, max_walks, max_triple_atoms, n_top_walks, walks=method == "relevant_walks"
    )
    reference = float((model.shift + model.atomref[batch.numbers]).sum())
    return MoleculeExplanation(
        **common, reference=reference, reference_kind="sum of shift + atomref[Z_i]", **parts
    )


__all__ = [
    "MOLECULE_METHODS",
    "MoleculeExplanation",
    "explain_molecule",
    "fit_molecule_patterns",
    "switched_energy",
]
