"""Pictures and tables of a :class:`~atomlens.explain.molecules.MoleculeExplanation`.

The molecule is projected onto the plane of its two largest principal axes; atoms are
discs coloured by their relevance, pairs are lines whose colour and width give R_ij, both
on diverging colour maps centred on zero (red: raises the energy, blue: lowers it).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from ase.data import chemical_symbols, covalent_radii
from matplotlib import patheffects
from matplotlib.colors import Normalize

from ..fileio import save_figure
from .molecules import MoleculeExplanation


def _label(numbers: np.ndarray, index: int) -> str:
    return f"{chemical_symbols[numbers[index]]}{index}"


def projected(positions: np.ndarray) -> np.ndarray:
    """Positions (n, 3) in Angstrom -> (n, 3) along the principal axes, largest first."""
    centred = positions - positions.mean(0)
    if len(positions) < 2:
        return centred
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return np.pad(centred @ axes.T, ((0, 0), (0, 3 - len(axes))))


def _symmetric_norm(values: np.ndarray) -> Normalize:
    limit = float(np.abs(values).max()) if len(values) else 0.0
    limit = limit if limit > 0 else 1.0
    return Normalize(-limit, limit)


def molecule_figure(
    explanation: MoleculeExplanation, path: str | Path, min_fraction: float = 0.02
) -> Path:
    """Save the molecule with atom and pair relevances as a PNG; returns the path.

    Pairs with ``|R_ij|`` below ``min_fraction`` of the largest are not drawn.
    """
    e, scale = explanation, 1000.0  # meV
    coordinates = projected(e.positions)
    xy, depth = coordinates[:, :2], coordinates[:, 2]
    cmap = plt.get_cmap("RdBu_r")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    pair_values = e.pair_relevance * scale
    pair_norm = _symmetric_norm(pair_values)
    largest = float(np.abs(pair_values).max()) if len(pair_values) else 0.0
    for (i, j), value in sorted(zip(e.pairs.tolist(), pair_values), key=lambda t: abs(t[1])):
        if largest == 0 or abs(value) < min_fraction * largest:
            continue
        ax.plot(
            *xy[[i, j]].T,
            color=cmap(pair_norm(value)),
            lw=0.5 + 7 * abs(value) / largest,
            solid_capstyle="round",
            zorder=1,
        )
    atom_values = e.atoms * scale
    atom_norm = _symmetric_norm(atom_values)
    sizes = 300 + 700 * covalent_radii[e.numbers] ** 2
    # back to front along the third principal axis, so nearer atoms cover farther ones
    for rank, index in enumerate(np.argsort(depth)):
        z = 2 + rank / len(depth)
        ax.scatter(
            *xy[index],
            s=sizes[index],
            color=cmap(atom_norm(atom_values[index])),
            edgecolors="k",
            linewidths=0.8,
            zorder=z,
        )
        ax.text(
            *xy[index],
            chemical_symbols[e.numbers[index]],
            ha="center",
            va="center",
            fontsize=9,
            zorder=z + 0.5 / len(depth),
            path_effects=[patheffects.withStroke(linewidth=2.5, foreground="w")],
        )
    fig.colorbar(
        plt.cm.ScalarMappable(atom_norm, cmap),
        ax=ax,
        fraction=0.04,
        pad=0.02,
        label="atom relevance R_i (meV)",
    )
    fig.colorbar(
        plt.cm.ScalarMappable(pair_norm, cmap),
        ax=ax,
        fraction=0.05,
        pad=0.12,
        orientation="horizontal",
        label="pair relevance R_ij (meV)",
    )
    ax.set_title(
        f"{e.method}: E = {e.energy:.3f} eV, explained E - ref = {e.explained:.3f} eV\n"
        f"(ref: {e.reference_kind}; conservation error {e.conservation_error * scale:.3g} meV)",
        fontsize=8,
    )
    ax.set_aspect("equal")
    ax.set_xlabel("principal axis 1 (Angstrom)")
    ax.set_ylabel("principal axis 2 (Angstrom)")
    path = Path(path)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def terms_table(explanation: MoleculeExplanation, n_top: int = 15) -> list[dict]:
    """The ``n_top`` largest pair, three-body and walk terms by ``|R|``, in meV."""
    if n_top < 1:  # a negative count would slice off the smallest terms instead
        raise ValueError(f"n_top must be >= 1, not {n_top}")
    e = explanation
    rows = []
    distances = np.linalg.norm(e.positions[:, None] - e.positions[None], axis=-1)
    groups = [
        ("pair", e.pairs, e.pair_relevance),
        ("three-body", e.triples, e.triple_relevance),
        ("walk", e.walks, e.walk_relevance),
    ]
    for kind, sets, values in groups:
        if sets is None or len(sets) == 0:
            continue
        for k in np.argsort(-np.abs(values))[:n_top]:
            atoms = sets[k].tolist()
            joiner = " <- " if kind == "walk" else "-"
            # walks are written from the readout atom back to the start (i <- j <- k)
            names = [_label(e.numbers, a) for a in (atoms[::-1] if kind == "walk" else atoms)]
            rows.append(
                {
                    "kind": kind,
                    "atoms": joiner.join(names),
                    "relevance_meV": round(float(values[k]) * 1000, 4),
                    "distance_Angstrom": round(float(distances[atoms[0], atoms[1]]), 3)
                    if kind == "pair"
                    else "",
                }
            )
    return rows


def write_terms(rows: list[dict], stem: str | Path) -> tuple[Path, Path]:
    """Write ``rows`` as ``stem.csv`` and ``stem.md`` (a markdown table)."""
    stem = Path(stem)
    fields = ["kind", "atoms", "relevance_meV", "distance_Angstrom"]
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| kind | atoms | relevance (meV) | distance (Angstrom) |", "|---|---|---:|---:|"]
    lines += [
        f"| {r['kind']} | {r['atoms']} | {r['relevance_meV']} | {r['distance_Angstrom']} |"
        for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".csv"), stem.with_suffix(".md")
