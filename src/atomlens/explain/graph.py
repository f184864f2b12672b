"""Relevance through the interaction blocks of SchNet and DTNN (LRP and PatternAttribution).

Every backward rule used here is *linear in the arriving gradient* once the forward pass
of one molecule is fixed (LRP-epsilon, LRP-gamma, the pattern rules and the ratio gate of
the activations all are). So the relevance backward pass of a whole model is a chain of
per-atom and per-pair matrices, and we build these matrices explicitly:

    G_T[i]  = head backward at atom i                       (gradient-like vector, F)
    G_t[a]  = G_{t+1}[a] + sum_{b != a} T_t[b, a] G_{t+1}[b]        (residual + messages)
    R_a     = x^(0)_a . G_0[a]  (+ the bias sources located at atom a)

``T_t[b, a]`` is the message b <- a of block t: for SchNet the in2f rule at a, the
cfconv rule with the filter W(r_ab) as a *weight* (the filter is a function of distance
only; the message is linear in x_a), and the rules of f2out (Linear, ssp, Linear) at b;
for DTNN the W^cf rule at a, the distance factor (W^df d_ab + b^f2) as a weight, the W^fc
rule and the tanh gate of the pair, times f_cut. Residual updates ``x + v`` pass the
gradient to both terms, which is exact (``x g + v g = (x + v) g``).

Because the chain is linear, the relevance splits exactly over *walks* (a_0, ..., a_T),
consecutive atoms equal (residual) or neighbours (message): GNN-LRP's relevant walks
(Schnake et al., IEEE TPAMI 2022). Biases are relevance sources too; a bias at atom a of
block t belongs to the walk that stays on a until block t. With LRP-0 (epsilon -> 0) and
the ratio gate ``f(z)/z`` (exact because ssp(0) = tanh(0) = 0) the walk relevances sum
*exactly* to ``scale * sum_i head(x_i)``, i.e. to the energy minus the reference
``sum_i (shift + atomref[Z_i])``.

n-body terms (Bonneau et al., Nat. Commun. 2025) group the walks by the set of atoms they
visit. Writing ``Z(U)`` for the summed relevance of the walks inside an atom set ``U``
(one restricted pass, polynomial), the Moebius inversion

    R_U = sum_{V subset U} (-1)^{|U| - |V|} Z(V)

gives the one-, two- and three-body terms without listing walks; walks are listed
explicitly only while their count stays below a limit (it grows like (neighbours + 1)^T).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.schnet import filter_values
from .patterns import LayerStatistics, MissingPattern, Patterns, PatternStatistics
from .rules import Epsilon, Pattern, Ratio, Rule, stabilize

#: gathered transfer-matrix entries per chunk of walks or atom sets (160 MB in float64)
CHUNK_ENTRIES = 2e7


class Gamma(Rule):
    """LRP-gamma for ``nn.Linear``, sign-aware: contributions of the output's sign are boosted,

        R_i = sum_j (z_ij + gamma z_ij^{s_j}) / (z_j + gamma (sum_i z_ij^{s_j} + b_j^{s_j})) R_j

    with ``z_ij = x_i w_ij``, ``s_j = sign(z_j)`` and ``t^+ = max(t, 0)``, ``t^- = min(t, 0)``.
    For positive inputs and outputs this is Montavon et al.'s (2019) ``w + gamma w^+``; the
    sign-aware form keeps the denominator away from zero for signed activations (ssp, tanh).
    """

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-30) -> None:
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, not {gamma}")
        self.gamma, self.epsilon = gamma, epsilon

    def z_gamma(self, module: nn.Linear, x: Tensor) -> Tensor:
        w, b = module.weight, module.bias
        x_pos, x_neg, w_pos, w_neg = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        z = F.linear(x, w, b)
        positive = F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg)
        negative = F.linear(x_pos, w_neg) + F.linear(x_neg, w_pos)
        if b is not None:
            positive, negative = positive + b.clamp(min=0), negative + b.clamp(max=0)
        return z + self.gamma * torch.where(z > 0, positive, negative)

    def backward(self, module, x, z, grad):
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(
                f"Gamma is defined for nn.Linear, not {type(module).__name__}"
            )
        w_pos, w_neg = module.weight.clamp(min=0), module.weight.clamp(max=0)
        c = grad * z / stabilize(self.z_gamma(module, x), self.epsilon)
        c_pos, c_neg = c * (z > 0), c * (z <= 0)
        boosted = (x > 0) * (c_pos @ w_pos + c_neg @ w_neg) + (x < 0) * (
            c_pos @ w_neg + c_neg @ w_pos
        )
        return c @ module.weight + self.gamma * boosted


def bias_share(rule: Rule, module: nn.Linear, x: Tensor, z: Tensor) -> Tensor:
    """``beta`` with ``R_bias = beta * g_z`` (rows, F_out): the relevance a rule gives the bias."""
    if module.bias is None or isinstance(rule, Pattern):  # PatternAttribution: none
        return torch.zeros_like(z)
    b = module.bias
    if isinstance(rule, Gamma):
        boosted = b + rule.gamma * torch.where(z > 0, b.clamp(min=0), b.clamp(max=0))
        return boosted * z / stabilize(rule.z_gamma(module, x), rule.epsilon)
    if isinstance(rule, Epsilon):
        return b * z / stabilize(z, rule.epsilon)
    raise NotImplementedError(f"no bias share for {type(rule).__name__}")


def rule_matrices(rule: Rule, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """``B`` (rows, F_out, F_in) with ``g_x[r] = B[r]^T g_z[r]``: the rule's backward as matrices.

    Valid because every rule here is linear in ``g_z``: it is applied to the unit vectors.
    """
    rows, f_out = z.shape
    unit = torch.eye(f_out, dtype=z.dtype, device=z.device).repeat(rows, 1)
    g = rule.backward(module, x.repeat_interleave(f_out, 0), z.repeat_interleave(f_out, 0), unit)
    return g.reshape(rows, f_out, -1)


def ratio_gate(activation: nn.Module, z: Tensor) -> Tensor:
    """``f(z) / z`` (``f'(0)`` at 0): LRP's pass rule for an element-wise activation."""
    return Ratio().backward(activation, z, activation(z), torch.ones_like(z))


@dataclass
class MoleculeRules:
    """Which backward rule each part of a molecular model gets.

    ``linear(name, module)``: the rule of an ``nn.Linear``; ``pairwise(name, weights, inputs,
    receivers, n_receivers)``: coefficients ``c`` with ``g_input = c * g_output`` for an
    element-wise product with distance-dependent weights summed onto receivers (cfconv; the
    DTNN factor product, one term per receiver); ``times_input``: relevance ``x * g`` (LRP)
    or ``g`` itself (PatternAttribution); ``seed_with_output``: start from ``y`` instead of 1.
    """

    name: str
    linear: Callable[[str, nn.Module], Rule]
    pairwise: Callable[[str, Tensor, Tensor, Tensor, int], Tensor]
    times_input: bool = True
    seed_with_output: bool = False


def _receiver_sum(values: Tensor, receivers: Tensor, n: int) -> Tensor:
    return values.new_zeros((n,) + values.shape[1:]).index_add_(0, receivers, values)


def lrp_epsilon_rules(epsilon: float = 1e-30) -> MoleculeRules:
    """LRP-epsilon everywhere (``epsilon -> 0``: LRP-0, exact conservation)."""
    rule = Epsilon(epsilon)

    def pairwise(name, weights, inputs, receivers, n):
        z = _receiver_sum(weights * inputs, receivers, n)
        return weights * (z / stabilize(z, epsilon))[receivers]

    return MoleculeRules(f"lrp_epsilon({epsilon:g})", lambda name, m: rule, pairwise)


def lrp_gamma_rules(gamma: float = 0.25, epsilon: float = 1e-30) -> MoleculeRules:
    """LRP-gamma on every linear map (weights and filters): favours positive contributions."""
    rule = Gamma(gamma, epsilon)

    def pairwise(name, weights, inputs, receivers, n):
        contribution = weights * inputs
        z = _receiver_sum(contribution, receivers, n)
        same_sign = (contribution > 0) == (z > 0)[receivers]
        z_gamma = z + gamma * _receiver_sum(contribution * same_sign, receivers, n)
        boosted = weights * (1 + gamma * same_sign)
        return boosted * (z / stabilize(z_gamma, epsilon))[receivers]

    return MoleculeRules(f"lrp_gamma({gamma:g})", lambda name, m: rule, pairwise)


def pattern_attribution_rules(patterns: Patterns, pattern_type: str = "a+-") -> MoleculeRules:
    """PatternAttribution: ``w * a`` in place of ``w``; per-filter patterns for the products."""

    def linear(name, module):
        if name not in patterns:
            raise MissingPattern(f"no pattern fitted for layer {name!r}")
        return Pattern(patterns[name], True, pattern_type)

    def pairwise(name, weights, inputs, receivers, n):
        if name not in patterns:
            raise MissingPattern(f"no pattern fitted for {name!r}")
        return weights * patterns[name]["a"].to(weights)

    return MoleculeRules(
        "patternattribution", linear, pairwise, times_input=False, seed_with_output=True
    )


# ---------------------------------------------------------------------------------------
# recording the forward pass (hooks on the unchanged model)


def interaction_type(block: nn.Module) -> str:
    from ..models.dtnn import DTNNInteraction
    from ..models.schnet import SchNetInteraction

    if isinstance(block, SchNetInteraction):
        return "schnet"
    if isinstance(block, DTNNInteraction):
        return "dtnn"
    raise NotImplementedError(f"no relevance rules for interaction {type(block).__name__}")


def record_interactions(model: nn.Module, batch) -> tuple[list[tuple[nn.Module, tuple]], Tensor]:
    """Run ``model(batch)`` and return the arguments of every interaction call, in order,
    and the representation's output features ``(n_atoms, F)``."""
    if not batch.symmetric_pairs:
        raise ValueError(
            "molecular explanations need pairs in symmetric layout (batch.pairs.symmetric=True)"
        )
    if batch.pairs.shifts is not None:
        raise ValueError("molecular explanations are for molecules; the batch has periodic cells")
    calls, features = [], []
    handles = [
        block.register_forward_pre_hook(
            lambda m, args: calls.append((m, (args[0], filter_values(args[1]), *args[2:])))
        )
        for block in model.representation.interactions
    ]
    handles.append(
        model.representation.register_forward_hook(lambda m, args, out: features.append(out))
    )
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls, features[0]


# ---------------------------------------------------------------------------------------
# the relevance graph of one molecule


@dataclass
class RelevanceGraph:
    """The linearised relevance backward pass of one molecule (see the module docstring).

    ``inputs`` (n, F): x^(0) for LRP, ones for PatternAttribution; ``head`` (n, F) and
    ``head_bias`` (n,); per block t: ``transfers[t]`` (n, n, F, F) with ``T[b, a]`` mapping
    the gradient at x^(t+1)_b to x^(t)_a (zero for non-neighbours and on the diagonal),
    ``node_bias[t]`` (n, F) and ``pair_bias[t]`` (n, n, F): bias sources at b, resp. at a
    feeding the message b <- a, as functionals of the gradient at x^(t+1)_b.
    ``explained``: ``scale * sum_i head(x_i)`` in eV, what the relevances should sum to.
    """

    inputs: Tensor
    head: Tensor
    head_bias: Tensor
    transfers: list[Tensor]
    node_bias: list[Tensor]
    pair_bias: list[Tensor]
    neighbours: Tensor  # (n, n) bool, True for pairs within the cutoff
    explained: float

    @property
    def n_atoms(self) -> int:
        return self.head.shape[0]

    def node_relevance(self) -> Tensor:
        """LRP's atom relevances ``(n,)``: every walk counted at the atom where it starts."""
        g, relevance = self.head, self.head_bias.clone()
        for t in reversed(range(len(self.transfers))):
            relevance += (self.node_bias[t] * g).sum(1) + torch.einsum(
                "baf,bf->a", self.pair_bias[t], g
            )
            g = g + torch.einsum("baef,bf->ae", self.transfers[t], g)
        return relevance + (self.inputs * g).sum(1)

    def subset_sums(self, subsets: Tensor) -> Tensor:
        """``Z(U)`` (S,): relevance of all walks inside each atom set (rows of ``subsets``)."""
        out = [self.head_bias.new_zeros(0)]
        chunk = max(1, int(CHUNK_ENTRIES / (subsets.shape[1] ** 2 * self.head.shape[1] ** 2)))
        for start in range(0, subsets.shape[0], chunk):
            sub = subsets[start : start + chunk]
            c = self.inputs[sub]
            rows, cols = sub[:, :, None], sub[:, None, :]
            for t in range(len(self.transfers)):
                messages = torch.einsum("sbaef,sae->sbf", self.transfers[t][rows, cols], c)
                c = c + messages + self.node_bias[t][sub] + self.pair_bias[t][rows, cols].sum(2)
            out.append((self.head[sub] * c).sum((1, 2)) + self.head_bias[sub].sum(1))
        return torch.cat(out)

    def n_walks(self) -> int:
        """Number of walks (a_0, ..., a_T) through the T blocks."""
        step = self.neighbours.to(torch.float64) + torch.eye(self.n_atoms, dtype=torch.float64)
        count = torch.ones(self.n_atoms, dtype=torch.float64)
        for _ in self.transfers:
            count = step @ count
        return int(count.sum())

    def walks(self) -> tuple[Tensor, Tensor]:
        """All walks ``(W, T + 1)`` (atom at layer 0, ..., T) and their relevances ``(W,)``."""
        n = self.n_atoms
        walks = torch.arange(n)[:, None]
        c = self.inputs.clone()
        constant = torch.ones(n, dtype=torch.bool)
        senders, receivers = torch.nonzero(
            self.neighbours.T | torch.eye(n, dtype=torch.bool), as_tuple=True
        )
        for t in range(len(self.transfers)):
            last = walks[:, -1]
            degree = torch.bincount(senders, minlength=n)[last]
            parent = torch.repeat_interleave(torch.arange(walks.shape[0]), degree)
            # the successors of each walk's last atom, in the order of the (sender-sorted) edges
            offsets = torch.cumsum(torch.bincount(senders, minlength=n), 0) - torch.bincount(
                senders, minlength=n
            )
            local = torch.arange(parent.shape[0]) - (torch.cumsum(degree, 0) - degree)[parent]
            nxt = receivers[offsets[last[parent]] + local]
            a = last[parent]
            stay = nxt == a
            moved = torch.empty_like(c[parent])
            chunk = max(1, int(CHUNK_ENTRIES / self.head.shape[1] ** 2))  # (chunk, F, F) gathered
            for k in range(0, parent.shape[0], chunk):
                part = slice(k, k + chunk)
                moved[part] = torch.einsum(
                    "pef,pe->pf", self.transfers[t][nxt[part], a[part]], c[parent[part]]
                )
            c_new = torch.where(stay[:, None], c[parent], moved)
            source = torch.where(stay[:, None], self.node_bias[t][nxt], self.pair_bias[t][nxt, a])
            c = c_new + constant[parent, None] * source
            constant = constant[parent] & stay
            walks = torch.cat([walks[parent], nxt[:, None]], 1)
        last = walks[:, -1]
        return walks, (self.head[last] * c).sum(1) + constant * self.head_bias[last]


def connected_sets(neighbours: Tensor, order: int) -> Tensor:
    """Atom sets ``(K, order)``, ascending, that walks can visit: single atoms, pairs within the
    cutoff, triples with at least two such pairs (any other set has a zero n-body term)."""
    n = neighbours.shape[0]
    if order == 1:
        return torch.arange(n)[:, None]
    if order == 2:
        return torch.nonzero(torch.triu(neighbours, 1))
    triples = torch.tensor(list(itertools.combinations(range(n), 3)), dtype=torch.long).reshape(
        -1, 3
    )
    i, j, k = triples.T
    return triples[(neighbours[i, j].int() + neighbours[i, k].int() + neighbours[j, k].int()) >= 2]


def n_body_terms(graph: RelevanceGraph, max_order: int = 3) -> dict[int, tuple[Tensor, Tensor]]:
    """One-, two- and (``max_order`` 3) three-body terms by Moebius inversion of ``Z(U)``.

    Returns ``{order: (sets (K, order), relevances (K,))}`` over :func:`connected_sets`.
    """
    n = graph.n_atoms
    singles = connected_sets(graph.neighbours, 1)
    one = graph.subset_sums(singles)
    result = {1: (singles, one)}
    if max_order < 2:
        return result
    pairs = connected_sets(graph.neighbours, 2)
    two = graph.subset_sums(pairs) - one[pairs].sum(1)
    result[2] = (pairs, two)
    if max_order < 3:
        return result
    pair_lookup = torch.zeros(n, n, dtype=two.dtype)
    pair_lookup[pairs[:, 0], pairs[:, 1]] = two
    pair_lookup = pair_lookup + pair_lookup.T
    triples = connected_sets(graph.neighbours, 3)
    i, j, k = triples.T
    three = (
        graph.subset_sums(triples)
        - one[triples].sum(1)
        - pair_lookup[i, j]
        - pair_lookup[i, k]
        - pair_lookup[j, k]
    )
    result[3] = (triples, three)
    return result


def walk_n_body(walks: Tensor, relevance: Tensor, order: int) -> dict[tuple[int, ...], float]:
    """Sum the walk relevances by the set of atoms a walk visits, for sets of size ``order``."""
    out: dict[tuple[int, ...], float] = {}
    for walk, r in zip(walks.tolist(), relevance.tolist()):
        atoms = tuple(sorted(set(walk)))
        if len(atoms) == order:
            out[atoms] = out.get(atoms, 0.0) + r
    return out


# ---------------------------------------------------------------------------------------
# building the graph from the recorded forward pass


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _linear_backward(rules: MoleculeRules, names, module, x) -> tuple[Tensor, Tensor, Tensor]:
    """``(z, B, beta)``: output, rule matrices and bias shares of an ``nn.Linear`` on rows ``x``."""
    rule = rules.linear(names[id(module)], module)
    z = module(x)
    return z, rule_matrices(rule, module, x, z), bias_share(rule, module, x, z)


def _schnet_block(rules, names, block, x, filters, pair_i, pair_j, n):
    """Per-pair matrices, sender rule matrices and bias shares, node biases, extra pair biases
    (as functionals of the gradient at the receiver's output) of one SchNet block."""
    in2f, (out1, activation, out2) = block.in2f, block.f2out
    y, b_in, beta_in = _linear_backward(rules, names, in2f, x)
    weights = filters.repeat(2, 1)  # symmetric layout: one filter per unordered pair
    coefficients = rules.pairwise(names[id(block)] + ".cfconv", weights, y[pair_j], pair_i, n)
    m = _receiver_sum(weights * y[pair_j], pair_i, n)
    h, b1, beta1 = _linear_backward(rules, names, out1, m)
    gate = ratio_gate(activation, h)
    _, b2, beta2 = _linear_backward(rules, names, out2, activation(h))
    # g_m = B1^T (gate * (B2^T g_v)) as one (Ff, F) matrix per receiving atom
    out_matrix = torch.einsum("bky,bk,bfk->byf", b1, gate, b2)
    node_bias = beta2 + torch.einsum("bfk,bk,bk->bf", b2, gate, beta1)
    per_pair = coefficients[:, :, None] * out_matrix[pair_i]  # (P, Ff, F): g_y_a from g_b
    return per_pair, b_in[pair_j], beta_in[pair_j], node_bias, 0.0


def _dtnn_block(rules, names, block, c, rbf, f_cut, pair_i, pair_j, n):
    """The same for a DTNN block; the W^fc bias (none by default) is a per-pair source."""
    to_factor, to_coefficient = block.coefficient_to_factor, block.factor_to_coefficient
    factors, b_cf, beta_cf = _linear_backward(rules, names, to_factor, c)
    distance_factor = block.distance_to_factor(rbf).repeat(2, 1)  # a weight: depends on d only
    product = factors[pair_j] * distance_factor
    pairs = torch.arange(product.shape[0])
    coefficients = rules.pairwise(
        names[id(block)] + ".product", distance_factor, factors[pair_j], pairs, product.shape[0]
    )
    q, b_fc, beta_fc = _linear_backward(rules, names, to_coefficient, product)
    gate = ratio_gate(nn.Tanh(), q) * f_cut.repeat(2)[:, None]
    per_pair = coefficients[:, :, None] * b_fc.transpose(1, 2) * gate[:, None, :]  # (P, Fa, B)
    node_bias = torch.zeros_like(c)
    return per_pair, b_cf[pair_j], beta_cf[pair_j], node_bias, beta_fc * gate


def relevance_graph(model: nn.Module, batch, rules: MoleculeRules) -> RelevanceGraph:
    """Build the :class:`RelevanceGraph` of ``model`` on a one-molecule ``batch`` under ``rules``."""
    if batch.n_structures != 1:
        raise ValueError(f"explain one molecule at a time, not {batch.n_structures}")
    names = _module_names(model)
    n = batch.n_atoms
    with torch.no_grad():
        calls, features = record_interactions(model, batch)
        transfers, node_biases, pair_biases = [], [], []
        inputs = None
        for block, args in calls:
            pair_i, pair_j = args[-1].i, args[-1].j  # the block's Pairs
            x = args[0]
            build = _schnet_block if interaction_type(block) == "schnet" else _dtnn_block
            per_pair, sender, sender_beta, node_bias, extra = build(
                rules, names, block, *args[:-1], pair_i, pair_j, n
            )
            if inputs is None:
                inputs = x if rules.times_input else torch.ones_like(x)
            transfer = x.new_zeros(n, n, x.shape[1], x.shape[1])
            transfer[pair_i, pair_j] = torch.einsum("pye,pyf->pef", sender, per_pair)
            pair_bias = x.new_zeros(n, n, x.shape[1])
            pair_bias[pair_i, pair_j] = torch.einsum("py,pyf->pf", sender_beta, per_pair) + extra
            transfers.append(transfer)
            node_biases.append(node_bias)
            pair_biases.append(pair_bias)
        first, activation, second = model.head
        h, b1, beta1 = _linear_backward(rules, names, first, features)
        gate = ratio_gate(activation, h)
        out, b2, beta2 = _linear_backward(rules, names, second, activation(h))
        seed = model.scale * (out if rules.seed_with_output else torch.ones_like(out))
        g_hidden = gate * b2[:, 0, :] * seed
        head = torch.einsum("bkf,bk->bf", b1, g_hidden)
        head_bias = beta2[:, 0] * seed[:, 0] + (beta1 * g_hidden).sum(1)
        neighbours = torch.zeros(n, n, dtype=torch.bool)
        neighbours[batch.pair_i, batch.pair_j] = True
        explained = float((model.scale * out).sum())
    return RelevanceGraph(
        inputs, head, head_bias, transfers, node_biases, pair_biases, neighbours, explained
    )


# ---------------------------------------------------------------------------------------
# patterns of the molecular model, fitted in one streaming pass


def relevance_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers on the relevance path (not the filter networks)."""
    names = _module_names(model)
    layers = [names[id(m)] for m in model.head if isinstance(m, nn.Linear)]
    for block in model.representation.interactions:
        if interaction_type(block) == "schnet":
            parts = [block.in2f, block.f2out[0], block.f2out[2]]
        else:
            parts = [block.coefficient_to_factor, block.factor_to_coefficient]
        layers += [names[id(m)] for m in parts]
    return layers


class _ProductStatistics:
    """Per-filter pattern of ``u = w * x`` with pair-dependent ``w``: ``a_f = cov(x_f, u_f) /
    var(u_f)`` (the least-squares signal direction; ``1 / w`` when ``w`` is constant, as for
    an ordinary weight), accumulated with the streaming co-moments of :mod:`.patterns`."""

    def __init__(self, n: int) -> None:
        self.signal, self.output = LayerStatistics(n, n), LayerStatistics(n, n)

    def update(self, x: Tensor, u: Tensor) -> None:
        self.signal.update(x, u)
        self.output.update(u, u)

    def pattern(self) -> Tensor:
        covariance = torch.diagonal(self.signal.regimes["a"].comoment)
        variance = torch.diagonal(self.output.regimes["a"].comoment)
        valid = variance > 1e-12 * variance.max().clamp(min=1e-300)
        return torch.where(valid, covariance / torch.where(valid, variance, 1.0), 0.0)


def fit_molecule_patterns(model: nn.Module, batches: Iterable) -> Patterns:
    """Patterns of every layer on the relevance path, fitted in one pass over ``batches``.

    Linear layers get :mod:`.patterns`'s ``a``, ``a_+`` and ``a_-`` (rows: atoms, or pairs for
    DTNN's W^fc); each cfconv (SchNet) and factor product (DTNN) gets one pattern per filter,
    stored as ``"<block>.cfconv"`` / ``"<block>.product"`` with key ``"a"``.
    """
    names = _module_names(model)
    statistics = PatternStatistics(model, relevance_layers(model))
    products: dict[str, _ProductStatistics] = {}

    def hook(block, args):
        pair_j = args[-1].j
        if interaction_type(block) == "schnet":
            key, x = names[id(block)] + ".cfconv", block.in2f(args[0])[pair_j]
            u = filter_values(args[1]).repeat(2, 1) * x
        else:
            key, x = names[id(block)] + ".product", block.coefficient_to_factor(args[0])[pair_j]
            u = block.distance_to_factor(args[1]).repeat(2, 1) * x
        products.setdefault(key, _ProductStatistics(x.shape[1])).update(x, u)

    handles = [block.register_forward_pre_hook(hook) for block in model.representation.interactions]
    try:
        for batch in batches:
            statistics.update(batch)
    finally:
        for handle in handles:
            handle.remove()
    patterns = statistics.patterns()
    for key, product in products.items():
        dtype = next(model.parameters()).dtype
        patterns[key] = {"a": product.pattern().to(dtype)}
    return patterns
