"""Example overlays for the experiment reports: one row per case, the image with the ground truth
(green) and one panel per arm with its prediction (red), so a reader sees what the numbers mean."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_stseg.atomic import write_atomic


def display_image(img: np.ndarray) -> np.ndarray:
    """Greyscale scaled to the 1st-99th percentile for display; RGB (H, W, 3) uint8 unchanged."""
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        return img
    lo, hi = np.percentile(img, (1, 99))
    return np.clip((img.astype(np.float32) - lo) / max(float(hi - lo), 1e-6), 0, 1)


def pick_cases(scores: dict[str, float], n: int = 3) -> list[str]:
    """The cases with the lowest, median and highest score (``n`` spread evenly over the ranking)."""
    ranked = sorted(scores, key=lambda c: (scores[c], c))
    if not ranked:
        return []
    return list(dict.fromkeys(ranked[round(q * (len(ranked) - 1))] for q in np.linspace(0, 1, n)))


def overlay_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, str]]]],
                 path: Path, dpi: int = 90) -> Path:
    """``rows``: (title, 2D image, ground-truth mask, {arm: (predicted mask, caption)}). Written
    atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = 1 + max(len(r[3]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(3.2 * n_cols, 3.3 * len(rows)), squeeze=False)
    for ax_row, (title, img, gt, preds) in zip(axes, rows):
        shown = display_image(img)
        panels = [(title, None, "")] + [(arm, pred, caption) for arm, (pred, caption) in preds.items()]
        for ax, (name, pred, caption) in zip(ax_row, panels):
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None)
            if gt.any():
                ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.8)
            if pred is not None and pred.any():
                ax.contour(pred, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(name + (f"\n{caption}" if caption else ""), fontsize=8)
            ax.axis("off")
        for ax in ax_row[len(panels):]:
            ax.axis("off")
    fig.tight_layout()
    write_atomic(path, figure=fig, dpi=dpi)
    plt.close(fig)
    return path
