"""Figure grid of explanations: one row per input, one column per method."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import Tensor


def explanation_grid(
    inputs: Tensor,
    explanations: dict[str, Tensor],
    path: str | Path,
    labels: list[str] | None = None,
) -> Path:
    """Save a PNG grid: the input image, then each method's map (channels summed).

    Maps are shown in a diverging colormap scaled to their own maximum absolute value
    (red positive, blue negative), so only the spatial pattern and sign are compared.
    """
    n, methods = inputs.shape[0], list(explanations)
    fig, axes = plt.subplots(
        n, len(methods) + 1, figsize=(1.3 * (len(methods) + 1), 1.3 * n), squeeze=False
    )
    for row in range(n):
        axes[row, 0].imshow(inputs[row].sum(0).detach().cpu(), cmap="gray_r")
        if labels is not None:
            axes[row, 0].set_ylabel(labels[row], fontsize=7)
        for col, method in enumerate(methods, start=1):
            image = explanations[method][row].sum(0).detach().cpu()
            scale = float(image.abs().max()) or 1.0
            axes[row, col].imshow(image, cmap="bwr", vmin=-scale, vmax=scale)
    for col, title in enumerate(["input"] + methods):
        axes[0, col].set_title(title.replace("_", "\n"), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
