"""Figures shared by the commands: parity plots."""

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
