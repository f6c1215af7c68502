"""What the experiment reports share: reading predictions and labels, per-region scores over a
folder, example overlays (one row per case, the image with the ground truth in green and one panel
per arm with its prediction in red, so a reader sees what the numbers mean), and writing the
report with its figure."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_stseg.atomic import write_atomic
from nnunet_stseg.commands.overlay import display_image, read_image
from nnunet_stseg.core.metrics import count_empty_predictions, mean_sd, overlap


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


def examples_markdown(examples: Path | None, caption: str) -> str:
    """The report's example-figure paragraph: ``caption``, the colour key and the picture (a name
    next to the report); nothing when no figure was made."""
    if examples is None:
        return ""
    return f"\n{caption} (ground truth green, prediction red):\n\n![examples]({examples.name})\n"


def score_folder(pred_dir: Path, gt_dir: Path, file_ending: str, regions: dict[str, tuple[int, ...]],
                 surface: bool = False) -> dict:
    """Per-case overlap of every region (name -> labels) and its mean +- sd over cases; with
    ``surface`` also the 95th-percentile surface distance in mm (``core.metrics.hd95``, the file's
    spacing; ``{region}_HD95`` over the cases where it is defined)."""
    import SimpleITK as sitk

    from nnunet_stseg.core.metrics import hd95

    cases = {}
    for f in sorted(pred_dir.glob(f"*{file_ending}")):
        pred, gt = read_image(f), read_image(gt_dir / f.name)
        spacing = sitk.ReadImage(str(gt_dir / f.name)).GetSpacing()[::-1] if surface else None
        case = {}
        for name, labels in regions.items():
            p, g = np.isin(pred, labels), np.isin(gt, labels)
            case[name] = {**overlap(p, g), **({"HD95": hd95(p, g, spacing)} if surface else {})}
        cases[f.name[:-len(file_ending)]] = case
    summary = {"n_cases": len(cases), "cases": cases}
    for name in regions:
        summary.update(overlap_means(name, [c[name] for c in cases.values()]))
        if surface:
            summary[f"{name}_HD95"] = mean_sd([c[name]["HD95"] for c in cases.values()])
    return summary


OVERLAP_METRICS = ("Dice", "IoU", "Precision", "Recall")
OVERLAP_HEAD = "DSC | IoU | precision | recall | empty predictions"
OVERLAP_HEAD_PERCENT = "DSC % | IoU % | precision % | recall % | empty predictions"


def overlap_means(prefix: str, per_case: list[dict]) -> dict:
    """``{prefix}_{metric}`` = (mean, sd) over cases of each overlap metric (precision over the cases
    with a non-empty prediction: docs/benchmarks/README.md) and ``{prefix}_empty_predictions``."""
    out = {f"{prefix}_{m}": mean_sd([c[m] for c in per_case]) for m in OVERLAP_METRICS}
    out[f"{prefix}_empty_predictions"] = count_empty_predictions([c["Precision"] for c in per_case])
    return out


def overlap_cells(scores: dict, prefix: str = "", scale: float = 1.0, digits: int = 3) -> str:
    """The five cells of :data:`OVERLAP_HEAD` from ``scores`` (keys ``{prefix}_Dice`` ... or, without a
    prefix, ``Dice`` ...); reports made before the count existed show "n/a" in its cell."""
    key = (lambda m: f"{prefix}_{m}") if prefix else (lambda m: m)
    cells = [f"{scale * scores[key(m)][0]:.{digits}f} ± {scale * scores[key(m)][1]:.{digits}f}"
             for m in OVERLAP_METRICS]
    empty = scores.get(key("empty_predictions"))
    return " | ".join(cells + ["n/a" if empty is None else str(empty)])


def example_overlays(results: dict, workdir: Path, path: Path, *, arms: tuple[str, ...], n: int = 3,
                  ranked_by: str = "polar_coarse") -> Path | None:
    """Overlays of the cases with the lowest, median and highest DSC of ``ranked_by`` (default the
    polar stage with coarse origins): image, ground truth and each arm's prediction (read from
    ``workdir/predictions/<arm>``); for CT the slice with the most pericardium."""
    arms = [a for a in arms if a in results.get("arms", {})]
    files = results.get("files")
    if not arms or not files:
        return None
    region, labels = (("pericardium", (1, 2)) if results["dataset"] == "cardiac" else ("polyp", (1,)))
    ranked_by = ranked_by if ranked_by in arms else arms[0]
    picks = pick_cases({c: v[region]["Dice"] for c, v in results["arms"][ranked_by]["cases"].items()}, n)
    if not picks:
        return None
    ending, rows = files["file_ending"], []
    for case in picks:
        image_file = next(Path(d) / f"{case}_0000{ending}" for d in files["image_dirs"]
                          if (Path(d) / f"{case}_0000{ending}").exists())
        img, gt = read_image(image_file), np.isin(read_image(Path(files["gt_dir"]) / f"{case}{ending}"), labels)
        preds = {a: np.isin(read_image(Path(workdir) / "predictions" / a / f"{case}{ending}"), labels) for a in arms}
        title = case
        if results["dataset"] == "cardiac":  # (Z, H, W): the slice with the most pericardium
            z = int(np.argmax(gt.reshape(gt.shape[0], -1).sum(1)))
            img, gt, preds, title = img[z], gt[z], {a: v[z] for a, v in preds.items()}, f"{case} slice {z}"
        rows.append((title, img, gt, {a: (p, f"{region} DSC {results['arms'][a]['cases'][case][region]['Dice']:.3f}")
                                      for a, p in preds.items()}))
    return overlay_grid(rows, path)


def paired_difference(x, y, n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of two arms on the same cases (``x - y``): the mean difference, its
    percentile bootstrap 95 % interval (cases resampled, seeded), the cases better / worse, and the
    two-sided sign test's p over the cases that differ (scipy's exact binomial test).

    >>> d = paired_difference([0.9, 0.8, 0.7, 0.95], [0.8, 0.8, 0.6, 0.9])
    >>> round(d["mean"], 4), d["better"], d["worse"], round(d["sign_p"], 3)
    (0.0625, 3, 0, 0.25)
    """
    from scipy.stats import binomtest

    diff = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if diff.size == 0:
        raise ValueError("paired_difference needs at least one case")
    means = diff[np.random.default_rng(seed).integers(0, diff.size, (n_boot, diff.size))].mean(1)
    better, worse = int((diff > 0).sum()), int((diff < 0).sum())
    return {"mean": float(diff.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "better": better, "worse": worse,
            "sign_p": float(binomtest(better, better + worse).pvalue) if better + worse else 1.0}


def print_report(results: dict, out: Path | None, plot, render) -> None:
    """Print the report ``render(results, figure name)``; with ``out``, also draw the example
    figure ``plot(<out stem>_examples.png)`` beside it and write both (atomically)."""
    figure = plot(out.with_name(out.stem + "_examples.png")) if out is not None else None
    text = render(results, figure.name if figure else None)
    print(text)
    if out is not None:
        write_atomic(out, text)
