"""Figures shared by the commands: parity plots, atomic energies, potential maps, rings, isomers.

Figures are drawn on :class:`matplotlib.figure.Figure` objects, never through ``pyplot``: a
library imported into a notebook or another program must not switch matplotlib's backend
or keep figures open. PNG files are written by the Agg renderer whatever the backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import save_figure


def parity_plot(
    reference: np.ndarray, predicted: np.ndarray, path: str | Path, title: str = "", unit: str = ""
) -> Path:
    """Predicted against reference values, with the MAE in the legend; returns the PNG path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mae = float(np.abs(predicted - reference).mean())
    fig, ax = _subplots(figsize=(4.5, 4.5), dpi=120)
    ax.scatter(reference, predicted, s=3, alpha=0.5, label=f"MAE {mae:.4g} {unit}")
    lo, hi = (
        float(min(reference.min(), predicted.min())),
        float(max(reference.max(), predicted.max())),
    )
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"reference ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _subplots(figsize: tuple[float, float], dpi: int, **kwargs):
    """A new figure and its axes, outside pyplot (no backend switch, nothing left open)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(**kwargs)


def _draw_molecule(
    ax, numbers, positions, coords2d, depth, colors=None, cmap=None, norm=None, labels=None
):
    """Atoms (circles sized by element, back to front) and covalent bonds, projected to 2D.

    ``labels`` (strings) are written inside the atoms under their element symbols; circles
    are large enough for two short lines even for hydrogen, and the text is white on dark
    colours.
    """
    from ase.data import chemical_symbols, covalent_radii
    from ase.data.colors import jmol_colors

    from .rings import bond_graph

    numbers = np.asarray(numbers)
    for i, j in bond_graph(numbers, positions):
        ax.plot(*coords2d[[i, j]].T, color="0.3", lw=1.5, zorder=1)
    for k in np.argsort(depth):
        face = cmap(norm(colors[k])) if colors is not None else jmol_colors[numbers[k]]
        # marker diameter in points: covalent radius, but room for "H" over "-123" at least
        diameter = 900**0.5 * covalent_radii[numbers[k]]
        if labels is not None:
            diameter = max(diameter, 30.0)
        ax.scatter(
            *coords2d[k],
            s=diameter**2,
            color=face,
            edgecolors="k",
            linewidths=0.8,
            zorder=2 + k / (10 * len(numbers)),
        )
        if labels is not None:
            r, g, b = np.asarray(face[:3], dtype=float)
            text = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
            ax.annotate(
                f"{chemical_symbols[numbers[k]]}\n{labels[k]}",
                coords2d[k],
                ha="center",
                va="center",
                fontsize=6,
                color=text,
                linespacing=0.95,
                zorder=2.5 + k / (10 * len(numbers)),
            )


def principal_projection(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2D coordinates in the plane of the two largest principal axes, and the depth."""
    centred = np.asarray(positions) - np.asarray(positions).mean(0)
    if len(centred) < 3:
        return centred[:, :2], centred[:, 2]
    _, _, vt = np.linalg.svd(centred, full_matrices=True)
    return centred @ vt[:2].T, centred @ vt[2]


def centred_norm(values: np.ndarray):
    """A diverging colour norm with zero at the centre of the map (white in ``RdBu_r``).

    Symmetric, -max|v| .. +max|v|: the sign of a value reads from its hue, and equal
    magnitudes get equal colour strength on both sides (a one-sided norm would paint a
    -10 meV ripple as deep as a +500 meV peak).
    """
    from matplotlib.colors import CenteredNorm

    values = np.asarray(values, dtype=np.float64)
    span = float(np.abs(values).max()) if values.size else 0.0
    return CenteredNorm(vcenter=0.0, halfrange=span if span > 0 else 1.0)


def to_milli(values, unit: str) -> tuple[np.ndarray, str]:
    """Energies in meV when ``unit`` is eV (chemistry happens at meV), else unchanged."""
    values = np.asarray(values, dtype=np.float64)
    return (values * 1000.0, "meV") if unit == "eV" else (values, unit)


def atomic_energy_plot(
    numbers,
    positions,
    values,
    path: str | Path,
    title: str = "",
    unit: str = "eV",
    label: str = "E_i - atomref[Z_i]",
) -> Path:
    """The molecule projected on its principal plane, atoms coloured by ``values``.

    ``values`` in ``unit`` (eV energies are shown in meV); each atom carries its element
    symbol and its value (integer meV), and the diverging colour map is centred on zero.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    coords, depth = principal_projection(positions)
    values, unit = to_milli(values, unit)
    cmap = colormaps["RdBu_r"]
    norm = centred_norm(values)
    digits = 0 if unit == "meV" or np.abs(values).max() >= 10 else 2
    fig, ax = _subplots(figsize=(5.5, 4.5), dpi=120)
    _draw_molecule(
        ax,
        numbers,
        positions,
        coords,
        depth,
        values,
        cmap,
        norm,
        [f"{v:.{digits}f}" for v in values],
    )
    ax.set_aspect("equal")
    ax.margins(0.15)
    ax.axis("off")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"{label} ({unit})", shrink=0.8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def potential_map_plot(
    potential,
    path: str | Path,
    title: str = "",
    unit: str = "eV",
    clip: tuple[float, float] = (2.0, 98.0),
) -> Path:
    """Contour plot of a 2D :class:`~atomlens.insight.potential_map.PotentialMap`, atoms drawn.

    eV values are shown in meV on a diverging map centred on zero (use a referenced map,
    e.g. ``reference="isolated"``, for a meaningful zero). Colours are clipped to the
    ``clip`` percentiles: Omega diverges close to the nuclei.
    """
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    if potential.values.ndim != 2:
        raise ValueError("potential_map_plot needs a map on a plane")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    u = potential.axes[0] / np.linalg.norm(potential.axes[0])
    v = potential.axes[1] / np.linalg.norm(potential.axes[1])
    rel = potential.points - potential.origin
    s, t = rel @ u, rel @ v
    values, unit = to_milli(potential.values, unit)
    lo, hi = np.percentile(values, clip)
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    clipped = np.clip(values, lo, hi)
    if lo < 0 < hi:
        norm, cmap = centred_norm(clipped), "RdBu_r"
    else:  # one-signed (e.g. an unreferenced map): no zero to centre on
        norm, cmap = None, "viridis"
    levels = np.linspace(lo, hi, 25)
    fig, ax = _subplots(figsize=(6, 5), dpi=120)
    # values are clipped already: no extension triangles (they would take the map's end colours)
    cs = ax.contourf(s, t, clipped, levels=levels, cmap=cmap, norm=norm)
    ax.contour(s, t, clipped, levels=levels[::3], colors="k", linewidths=0.3)
    atoms = potential.atoms
    if atoms is not None:
        arel = atoms.get_positions() - potential.origin
        w = np.cross(u, v)
        _draw_molecule(
            ax,
            atoms.get_atomic_numbers(),
            atoms.get_positions(),
            np.column_stack([arel @ u, arel @ v]),
            arel @ w,
        )
    ax.set_aspect("equal")
    ax.set_xlabel("Angstrom")
    ax.set_ylabel("Angstrom")
    bar = fig.colorbar(
        cs,
        ax=ax,
        ticks=MaxNLocator(8),
        label=f"Omega_{potential.probe}(r) ({unit}; reference: "
        f"{potential.reference}; clipped to percentiles {clip[0]:g}-{clip[1]:g})",
    )
    # an offset text ("-1.036e3") would sit on the title and hide the scale
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    bar.ax.yaxis.set_major_formatter(formatter)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def ring_ranking_plot(
    analysis, path: str | Path, title: str = "", max_types: int = 60, unit: str = "eV"
) -> Path:
    """Mean ring energy per ring atom by ring type (most stable on top), with spreads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranking = analysis.ranking[:max_types]
    fig, ax = _subplots(figsize=(7, 0.2 * len(ranking) + 1.5), dpi=110)
    y = np.arange(len(ranking))[::-1]
    colors = ["tab:red" if r["aromatic"] else "tab:blue" for r in ranking]
    ax.barh(
        y,
        [r["per_atom"] for r in ranking],
        xerr=[r["per_atom_sd"] for r in ranking],
        color=colors,
        alpha=0.8,
        error_kw={"lw": 0.8},
    )
    ax.set_yticks(y, [f"{r['name']} (n={r['count']})" for r in ranking], fontsize=6)
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_xlabel(
        f"mean ring energy per ring atom, sum(E_i - atomref[Z_i]) / size ({unit})\n"
        "bars: mean over the rings of a type; error bars: one standard deviation "
        "over those rings",
        fontsize=8,
    )
    ax.set_title(title or "ring types by stability (red: aromatic)", fontsize=9)
    lo = min(r["per_atom"] - r["per_atom_sd"] for r in ranking)
    hi = max(r["per_atom"] + r["per_atom_sd"] for r in ranking)
    ax.set_xlim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_ylim(-0.7, len(ranking) - 0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def isomer_plot(analysis, path: str | Path, title: str = "", unit: str = "eV") -> Path:
    """Predicted against reference energies of isomers, relative to the most stable one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ref, pred = analysis.relative_reference, analysis.relative_predicted
    fig, ax = _subplots(figsize=(4.8, 4.5), dpi=120)
    ax.scatter(
        ref,
        pred,
        s=3,
        alpha=0.4,
        label=f"{len(ref)} isomers\nSpearman {analysis.spearman:.3f}\n"
        f"MAE(rel.) {analysis.relative_mae * 1000:.0f} meV\n"
        f"MAE(centred) {analysis.centred_mae * 1000:.0f} meV",
    )
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"reference E - E_min ({unit})")
    ax.set_ylabel(f"predicted E - E_min ({unit})")
    ax.set_title(title or f"isomers of {analysis.formula}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path
