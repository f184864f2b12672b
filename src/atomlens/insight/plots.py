"""Figures shared by the commands: parity plots, atomic energies, potential maps, rings, isomers."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def parity_plot(reference: np.ndarray, predicted: np.ndarray, path: str | Path,
                title: str = "", unit: str = "") -> Path:
    """Predicted against reference values, with the MAE in the legend; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mae = float(np.abs(predicted - reference).mean())
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.scatter(reference, predicted, s=3, alpha=0.5, label=f"MAE {mae:.4g} {unit}")
    lo, hi = float(min(reference.min(), predicted.min())), float(max(reference.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"reference ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_molecule(ax, numbers, positions, coords2d, depth, colors=None, cmap=None, norm=None,
                   labels=None):
    """Atoms (circles sized by element, back to front) and covalent bonds, projected to 2D."""
    from ase.data import covalent_radii
    from ase.data.colors import jmol_colors

    from .rings import bond_graph

    numbers = np.asarray(numbers)
    for i, j in bond_graph(numbers, positions):
        ax.plot(*coords2d[[i, j]].T, color="0.3", lw=1.5, zorder=1)
    for k in np.argsort(depth):
        face = cmap(norm(colors[k])) if colors is not None else jmol_colors[numbers[k]]
        ax.scatter(*coords2d[k], s=900 * covalent_radii[numbers[k]] ** 2, color=face,
                   edgecolors="k", linewidths=0.8, zorder=2)
        if labels is not None:
            ax.annotate(f"{labels[k]:.2f}", coords2d[k], ha="center", va="center", fontsize=6,
                        zorder=3)


def principal_projection(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2D coordinates in the plane of the two largest principal axes, and the depth."""
    centred = np.asarray(positions) - np.asarray(positions).mean(0)
    if len(centred) < 3:
        return centred[:, :2], centred[:, 2]
    _, _, vt = np.linalg.svd(centred, full_matrices=True)
    return centred @ vt[:2].T, centred @ vt[2]


def atomic_energy_plot(numbers, positions, values, path: str | Path, title: str = "",
                       unit: str = "eV", label: str = "E_i - atomref[Z_i]") -> Path:
    """The molecule projected on its principal plane, atoms coloured by ``values``."""
    from matplotlib.colors import Normalize

    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    coords, depth = principal_projection(positions)
    values = np.asarray(values, dtype=np.float64)
    cmap = plt.get_cmap("coolwarm")
    norm = Normalize(values.min(), values.max() if np.ptp(values) > 0 else values.min() + 1e-9)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    _draw_molecule(ax, numbers, positions, coords, depth, values, cmap, norm, values)
    ax.set_aspect("equal")
    ax.margins(0.15)
    ax.axis("off")
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label=f"{label} ({unit})", shrink=0.8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def potential_map_plot(potential, path: str | Path, title: str = "", unit: str = "eV",
                       clip: tuple[float, float] = (2.0, 98.0)) -> Path:
    """Contour plot of a 2D :class:`~atomlens.insight.potential_map.PotentialMap`, atoms drawn.

    Colours are clipped to the ``clip`` percentiles: Omega diverges close to the nuclei.
    """
    plt = _pyplot()
    if potential.values.ndim != 2:
        raise ValueError("potential_map_plot needs a map on a plane")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    u = potential.axes[0] / np.linalg.norm(potential.axes[0])
    v = potential.axes[1] / np.linalg.norm(potential.axes[1])
    rel = potential.points - potential.origin
    s, t = rel @ u, rel @ v
    lo, hi = np.percentile(potential.values, clip)
    levels = np.linspace(lo, hi, 25) if hi > lo else 25
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    cs = ax.contourf(s, t, np.clip(potential.values, lo, hi), levels=levels, cmap="viridis",
                     extend="both")
    ax.contour(s, t, np.clip(potential.values, lo, hi), levels=levels[::3]
               if hasattr(levels, "__len__") else 8, colors="k", linewidths=0.3)
    atoms = potential.atoms
    if atoms is not None:
        arel = atoms.get_positions() - potential.origin
        w = np.cross(u, v)
        _draw_molecule(ax, atoms.get_atomic_numbers(), atoms.get_positions(),
                       np.column_stack([arel @ u, arel @ v]), arel @ w)
    ax.set_aspect("equal")
    ax.set_xlabel("Angstrom")
    ax.set_ylabel("Angstrom")
    fig.colorbar(cs, ax=ax, label=f"Omega_{potential.probe}(r) ({unit}; "
                                  f"reference: {potential.reference})")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ring_ranking_plot(analysis, path: str | Path, title: str = "", max_types: int = 60,
                      unit: str = "eV") -> Path:
    """Mean ring energy per ring atom by ring type (most stable on top), with spreads."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranking = analysis.ranking[:max_types]
    fig, ax = plt.subplots(figsize=(7, 0.2 * len(ranking) + 1.5), dpi=110)
    y = np.arange(len(ranking))[::-1]
    colors = ["tab:red" if r["aromatic"] else "tab:blue" for r in ranking]
    ax.barh(y, [r["per_atom"] for r in ranking], xerr=[r["per_atom_sd"] for r in ranking],
            color=colors, alpha=0.8, error_kw={"lw": 0.8})
    ax.set_yticks(y, [f"{r['name']} (n={r['count']})" for r in ranking], fontsize=6)
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_xlabel(f"mean ring energy per ring atom, sum(E_i - atomref[Z_i]) / size ({unit})")
    ax.set_title(title or "ring types by stability (red: aromatic)", fontsize=9)
    lo = min(r["per_atom"] - r["per_atom_sd"] for r in ranking)
    hi = max(r["per_atom"] + r["per_atom_sd"] for r in ranking)
    ax.set_xlim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_ylim(-0.7, len(ranking) - 0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def isomer_plot(analysis, path: str | Path, title: str = "", unit: str = "eV") -> Path:
    """Predicted against reference energies of isomers, relative to the most stable one."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ref, pred = analysis.relative_reference, analysis.relative_predicted
    fig, ax = plt.subplots(figsize=(4.8, 4.5), dpi=120)
    ax.scatter(ref, pred, s=3, alpha=0.4,
               label=f"{len(ref)} isomers\nSpearman {analysis.spearman:.3f}\n"
                     f"MAE(rel.) {analysis.relative_mae * 1000:.0f} meV\n"
                     f"MAE(centred) {analysis.centred_mae * 1000:.0f} meV")
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"reference E - E_min ({unit})")
    ax.set_ylabel(f"predicted E - E_min ({unit})")
    ax.set_title(title or f"isomers of {analysis.formula}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
