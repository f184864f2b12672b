"""Figure grid of explanations: one row per input, one column per method."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..fileio import save_figure


def explanation_grid(
    inputs: Tensor,
    explanations: dict[str, Tensor],
    path: str | Path,
    labels: list[str] | None = None,
    predicted: list[int] | None = None,
) -> Path:
    """Save a PNG grid: the input image, then each method's map (channels summed).

    Maps are shown in a diverging colormap scaled to their own maximum absolute value
    (red positive, blue negative), so only the spatial pattern and sign are compared; the
    colour bar under the grid gives that scale (-1: most negative, +1: most positive
    value of a map). ``labels`` (e.g. the true class) and ``predicted`` (the network's
    class) are written beside each input.

    Drawn on a :class:`matplotlib.figure.Figure` (no pyplot, no backend switch).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    n, methods = inputs.shape[0], list(explanations)
    height = 1.3 * n + 1.2  # inches: the grid, and 1.2 below it for the colour bar
    fig = Figure(figsize=(1.3 * (len(methods) + 1), height))
    axes = fig.subplots(n, len(methods) + 1, squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(inputs[row].sum(0).detach().cpu().numpy(), cmap="gray_r")
        text = [labels[row]] if labels is not None else []
        if predicted is not None:
            text.append(f"predicted {int(predicted[row])}")
        if text:
            axes[row, 0].set_ylabel("\n".join(text), fontsize=7)
        for col, method in enumerate(methods, start=1):
            image = explanations[method][row].sum(0).detach().cpu().numpy()
            scale = float(abs(image).max()) or 1.0
            axes[row, col].imshow(image / scale, cmap="bwr", vmin=-1.0, vmax=1.0)
    for col, title in enumerate(["input"] + methods):
        axes[0, col].set_title(title.replace("_", "\n"), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(rect=(0, 1.2 / height, 1, 1))
    bar_axes = fig.add_axes((0.25, 0.6 / height, 0.5, 0.15 / height))
    bar = fig.colorbar(
        ScalarMappable(Normalize(-1.0, 1.0), "bwr"), cax=bar_axes, orientation="horizontal"
    )
    bar.set_label(
        "relevance / max |relevance| of each map (red: for, blue: against the class)", fontsize=7
    )
    bar.ax.tick_params(labelsize=6)
    path = Path(path)
    save_figure(fig, path, dpi=120)
    return path
