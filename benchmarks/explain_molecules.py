"""Known-answer benchmark for molecular explanations: recover the pair and three-body terms.

    nice -n 10 python benchmarks/explain_molecules.py [--n-train 1500] [--epochs 60] \
        [--minutes 6] [--n-explain 30] [--rattle 0.05] [--seed 0] [--save-model DIR | --model DIR]

A small SchNet (2 interactions, cutoff 4 Angstrom) is trained on a *synthetic* energy of
QM9 geometries (the first ``--n-train + --n-test`` molecules of ``load_qm9``, every atom
displaced by Gaussian noise of ``--rattle`` Angstrom per coordinate, so that bond lengths and
angles vary), plus ``--n-fragments`` isolated atoms, dimers and bonded trimers in the training
set only (they pin the one-body energies, which molecules alone leave free), whose
decomposition is known:

    E = sum_{i<j} V_ZiZj(r_ij) + sum_{i<j<k} A_ijk
    V(r)  = D [(1 - exp(-a (r - r0)))^2 - 1] f_c(r)          (Morse per element pair, eV)
    A_ijk = sum over the heavy-atom centres c of k3 (cos theta_c - cos theta_0)^2 f3(r_c.) f3(r_c..)

with r0 the sum of covalent radii, D = sqrt(D_Zi D_Zj), f_c the cosine cutoff at 4 Angstrom,
f3 = 1 below 1.65 Angstrom tapering to 0 at 1.95 Angstrom (bonded neighbours only),
k3 = 0.5 eV, cos theta_0 = -1/3 (angles at C, N, O, F centres; none centred on H).
Then every method explains ``--n-explain`` test molecules and we report, one JSON line per
method: the Pearson correlation of the recovered R_ij with V(r_ij) over all pairs within the
cutoff (pooled over the molecules; the mean of the per-molecule correlations; and pooled after
subtracting the mean of each pair type, element pair x bonded or not, from both, since a
model trained on near-equilibrium molecules can move a constant per bond type between its
one-body and pair terms without changing any energy), of R_ijk with A_ijk over the triples
(where the method gives them; pooled and within element triples), the mean
conservation error, and a perturbation test: pairs are switched off (their filter set to
zero, as if moved beyond the cutoff) most relevant first, and the area under the curve of the
prediction change against the fraction switched off (eV; more negative = the method found
the pairs that lower the energy) is compared with a random order and with the true terms.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from ase import Atoms
from ase.data import covalent_radii

from atomlens.data.dataset import dataset_from_atoms
from atomlens.data.sources.qm9 import load_qm9
from atomlens.explain.graph import fit_molecule_patterns
from atomlens.explain.molecules import MOLECULE_METHODS, explain_molecule, switched_energy
from atomlens.models import build_model
from atomlens.models.io import load_model, save_model

CUTOFF = 4.0
MORSE_DEPTH = {1: 0.15, 6: 0.3, 7: 0.25, 8: 0.2, 9: 0.1}  # eV
MORSE_A = 1.6  # 1/Angstrom
ANGLE_K, COS_THETA0 = 0.5, -1.0 / 3.0  # eV, tetrahedral
ELEMENTS = [1, 6, 7, 8]  # fragments: H, C, N, O


def cosine_cutoff(r: np.ndarray, cutoff: float) -> np.ndarray:
    return np.where(r < cutoff, 0.5 * (np.cos(np.pi * r / cutoff) + 1.0), 0.0)


def angle_switch(r: np.ndarray) -> np.ndarray:
    """1 below 1.65 Angstrom, cosine taper to 0 at 1.95 Angstrom."""
    t = np.clip((r - 1.65) / 0.3, 0.0, 1.0)
    return 0.5 * (np.cos(np.pi * t) + 1.0)


def true_terms(numbers: np.ndarray, positions: np.ndarray):
    """Pair terms ``{(i, j): V}`` and triple terms ``{(i, j, k): A}`` in eV (i < j < k)."""
    n = len(numbers)
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    pairs = {}
    for i in range(n):
        for j in range(i + 1, n):
            r = d[i, j]
            r0 = covalent_radii[numbers[i]] + covalent_radii[numbers[j]]
            depth = np.sqrt(MORSE_DEPTH[numbers[i]] * MORSE_DEPTH[numbers[j]])
            morse = depth * ((1 - np.exp(-MORSE_A * (r - r0))) ** 2 - 1)
            pairs[(i, j)] = float(morse * cosine_cutoff(r, CUTOFF))
    switch = angle_switch(d)
    np.fill_diagonal(switch, 0.0)
    triples = {}
    for i in range(n):
        for j in range(i + 1, n):
            for k in range(j + 1, n):
                total = 0.0
                for c, a, b in ((i, j, k), (j, i, k), (k, i, j)):
                    weight = switch[c, a] * switch[c, b]
                    if weight == 0.0 or numbers[c] == 1:
                        continue
                    u, v = positions[a] - positions[c], positions[b] - positions[c]
                    cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
                    total += ANGLE_K * (cos - COS_THETA0) ** 2 * weight
                if total != 0.0:
                    triples[(i, j, k)] = total
    return pairs, triples


def fragments(count: int, rng: np.random.Generator) -> list[Atoms]:
    """Training-only fragments: isolated atoms (energy 0), dimers at 0.75-4 Angstrom and bonded
    trimers around a heavy atom with angles of 60-180 degrees. Without them the one-body
    energies are not fixed by the data (every QM9 atom has its usual number of bonds)."""
    out = []
    for k in range(count):
        kind = k % 10
        if kind == 0:
            out.append(Atoms(numbers=[rng.choice(ELEMENTS)], positions=[[0.0, 0.0, 0.0]]))
        elif kind < 6:
            r = rng.uniform(0.75, 4.0)
            out.append(Atoms(numbers=rng.choice(ELEMENTS, 2), positions=[[0, 0, 0], [r, 0, 0]]))
        else:
            r1, r2 = rng.uniform(0.9, 1.7, 2)
            angle = np.radians(rng.uniform(60.0, 180.0))
            numbers = [rng.choice(ELEMENTS[1:]), *rng.choice(ELEMENTS, 2)]
            positions = [[0, 0, 0], [r1, 0, 0], [r2 * np.cos(angle), r2 * np.sin(angle), 0]]
            out.append(Atoms(numbers=numbers, positions=positions))
    return out


def train(data, energies, train_idx, args):
    torch.manual_seed(args.seed)
    model = build_model(
        {
            "representation": "schnet",
            "head_hidden": 16,
            "representation_kwargs": {
                "n_atom_basis": 32,
                "n_filters": 32,
                "n_interactions": 2,
                "n_rbf": 20,
                "cutoff": CUTOFF,
            },
        }
    )
    n_atoms = data.n_atoms_per[train_idx]
    per_atom = energies[train_idx] / n_atoms
    model.set_statistics(shift=float(per_atom.mean()), scale=float(per_atom.std()))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    target = torch.as_tensor(energies, dtype=torch.float32)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    for epoch in range(args.epochs):
        order = rng.permutation(train_idx)
        for chunk in np.array_split(order, max(1, len(order) // 32)):
            batch = data.batch(chunk, CUTOFF)
            loss = ((model(batch)["energy"] - target[chunk]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        if time.time() - start > 60 * args.minutes:
            break
    return model.eval(), epoch + 1


def pearson(x, y) -> float | None:
    x, y = np.asarray(x), np.asarray(y)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def pearson_within_types(x, y, types) -> float | None:
    """Pearson correlation after subtracting the mean of each type from ``x`` and ``y``: what is
    left once the (non-identifiable) constant per pair type is taken out."""
    x, y, types = np.asarray(x, dtype=float), np.asarray(y, dtype=float), np.asarray(types)
    for t in np.unique(types):
        members = types == t
        x[members] -= x[members].mean()
        y[members] -= y[members].mean()
    return pearson(x, y)


def pair_type(numbers, positions, i: int, j: int) -> str:
    """Element pair and whether it is bonded (closer than the covalent radii + 0.4 Angstrom)."""
    zi, zj = sorted((int(numbers[i]), int(numbers[j])))
    bonded = (
        np.linalg.norm(positions[i] - positions[j]) < covalent_radii[zi] + covalent_radii[zj] + 0.4
    )
    return f"{zi}-{zj}-{'bond' if bonded else 'far'}"


def perturbation_auc(model, atoms, pair_order: np.ndarray, n_points: int = 11) -> float:
    """Area under ``E(k most relevant pairs off) - E(none off)`` over the fraction k / P (eV)."""
    batch = model.batch_from_atoms(atoms)
    half = batch.pair_i.shape[0] // 2
    index = {
        (int(i), int(j)): p
        for p, (i, j) in enumerate(zip(batch.pair_i[:half], batch.pair_j[:half]))
    }
    ranks = [index[tuple(pair)] for pair in pair_order]
    fractions = np.linspace(0, 1, n_points)
    curve = []
    with torch.no_grad():
        for fraction in fractions:
            mask = torch.ones(half)
            mask[ranks[: round(fraction * half)]] = 0.0
            curve.append(float(switched_energy(model, batch, mask)))
    curve = np.asarray(curve) - curve[0]
    return float(np.trapezoid(curve, fractions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=6.0, help="training time limit")
    parser.add_argument("--n-explain", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rattle", type=float, default=0.05, help="Angstrom, per coordinate")
    parser.add_argument(
        "--n-fragments",
        type=int,
        default=600,
        help="isolated atoms, dimers and trimers added to the training set",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-model", help="save the trained model to this folder")
    parser.add_argument("--model", help="load this model folder instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n_train + args.n_test
    qm9 = load_qm9()
    rng = np.random.default_rng(args.seed + 1)
    structures = []
    for m in range(n):
        atoms = qm9.atoms(m)
        structures.append(
            Atoms(
                atoms.numbers, atoms.positions + rng.normal(0.0, args.rattle, atoms.positions.shape)
            )
        )
    extra = fragments(args.n_fragments, rng)
    data = dataset_from_atoms(structures + extra)
    terms = [true_terms(a.numbers, a.positions) for a in structures + extra]
    energies = np.array([sum(p.values()) + sum(t.values()) for p, t in terms])
    train_idx = np.concatenate([np.arange(args.n_train), np.arange(n, n + len(extra))])
    test_idx = np.arange(args.n_train, n)
    start = time.time()
    if args.model:
        model, epochs = load_model(args.model).eval(), 0
    else:
        model, epochs = train(data, energies, train_idx, args)
    if args.save_model:
        save_model(model, args.save_model)
    with torch.no_grad():
        predicted = np.concatenate(
            [
                model(data.batch(chunk, CUTOFF))["energy"].numpy()
                for chunk in np.array_split(test_idx, 4)
            ]
        )
    mae = float(np.abs(predicted - energies[test_idx]).mean())
    print(
        json.dumps(
            {
                "benchmark": "explain_molecules",
                "result": "model",
                "date": time.strftime("%Y-%m-%d"),
                "torch": torch.__version__,
                "cores": os.cpu_count(),
                "threads": args.threads,
                "load_average": round(os.getloadavg()[0], 1),
                "n_train": args.n_train,
                "epochs": epochs,
                "train_minutes_loaded_machine": round((time.time() - start) / 60, 1),
                "test_mae_meV": round(1000 * mae, 1),
                "target_std_meV": round(1000 * float(energies[test_idx].std()), 1),
            }
        ),
        flush=True,
    )
    loader = (
        data.batch(chunk, CUTOFF) for chunk in np.array_split(train_idx, len(train_idx) // 64)
    )
    patterns = fit_molecule_patterns(model, loader)
    explained = test_idx[: args.n_explain]
    rng = np.random.default_rng(args.seed)
    orders = {"random": [], "true_terms": []}
    for m in explained:
        pairs = np.array([p for p in terms[m][0] if p in _within(structures[m])])
        orders["random"].append(pairs[rng.permutation(len(pairs))])
        values = np.array([terms[m][0][tuple(p)] for p in pairs])
        orders["true_terms"].append(pairs[np.argsort(-values)])
    for method in MOLECULE_METHODS:
        pair_x, pair_y, triple_x, triple_y, errors, orders[method] = [], [], [], [], [], []
        per_molecule, types, triple_types = [], [], []
        for m in explained:
            result = explain_molecule(model, structures[m], method, patterns=patterns)
            true_pairs, true_triples = terms[m]
            true = [true_pairs[(i, j)] for i, j in result.pairs.tolist()]
            atoms = structures[m]
            types += [
                pair_type(atoms.numbers, atoms.positions, i, j) for i, j in result.pairs.tolist()
            ]
            pair_x += result.pair_relevance.tolist()
            pair_y += true
            per_molecule.append(pearson(result.pair_relevance, true))
            if result.triples is not None:
                for key, r in zip(map(tuple, result.triples.tolist()), result.triple_relevance):
                    triple_x.append(r)
                    triple_y.append(true_triples.get(key, 0.0))
                    triple_types.append("-".join(str(z) for z in sorted(atoms.numbers[list(key)])))
            errors.append(abs(result.conservation_error))
            orders[method].append(result.pairs[np.argsort(-result.pair_relevance)])
        print(
            json.dumps(
                {
                    "benchmark": "explain_molecules",
                    "result": "recovery",
                    "method": method,
                    "n_molecules": len(explained),
                    "pair_pearson": _round(pearson(pair_x, pair_y)),
                    "pair_pearson_per_molecule": _round(
                        float(np.mean([r for r in per_molecule if r is not None]))
                    ),
                    "pair_pearson_within_type": _round(pearson_within_types(pair_x, pair_y, types)),
                    "triple_pearson": _round(pearson(triple_x, triple_y)) if triple_x else None,
                    "triple_pearson_within_type": _round(
                        pearson_within_types(triple_x, triple_y, triple_types)
                    )
                    if triple_x
                    else None,
                    "conservation_mae_meV": round(1000 * float(np.mean(errors)), 4),
                    "reference": result.reference_kind,
                }
            ),
            flush=True,
        )
    for name, per_molecule in orders.items():
        aucs = [
            perturbation_auc(model, structures[m], order)
            for m, order in zip(explained, per_molecule)
        ]
        print(
            json.dumps(
                {
                    "benchmark": "explain_molecules",
                    "result": "perturbation",
                    "order": name,
                    "auc_eV": round(float(np.mean(aucs)), 4),
                }
            ),
            flush=True,
        )


def _within(atoms) -> set:
    d = atoms.get_all_distances()
    n = len(atoms)
    return {(i, j) for i in range(n) for j in range(i + 1, n) if d[i, j] < CUTOFF}


def _round(value):
    return None if value is None else round(value, 3)


if __name__ == "__main__":
    main()
