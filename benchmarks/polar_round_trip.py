"""How much a polar resolution P loses on real masks: Cartesian -> polar (P x P) -> Cartesian.

For every object (one 8-connected component of a real mask, alone in a full-size image) the
polar image is taken around the object's centroid (:func:`nnunet_stseg.core.polar.component_centroids`)
with ``polar_shape = (P, P)`` and radius = distance to the farthest image corner, nearest
neighbour both ways (:func:`nnunet_stseg.core.polar.round_trip_dice`); the Dice of the mapped-back mask
against the original is the round-trip Dice. This is the best the polar stage can do at that
resolution: a perfect polar prediction still loses this much.

Data (read in place): Cardiac Fat CT pericardium masks (``label > 0``, slice by slice) and
Kvasir-SEG polyp masks at their original resolution (threshold 127)::

    python -m benchmarks.polar_round_trip                     # everything, writes docs/benchmarks/polar_round_trip.md
    python -m benchmarks.polar_round_trip --limit_kvasir 100 --sizes 64 256
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage

from nnunet_stseg.atomic import write_atomic
from benchmarks.runner import REPO_ROOT, machine_line, shared_data
from nnunet_stseg.core.polar import component_centroids, round_trip_dice

PROG = "python -m benchmarks.polar_round_trip"
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks" / "polar_round_trip.md"
CARDIAC_DIR = Path("nnUNet_raw") / "Dataset701_CardiacFatCT" / "labelsTr"
KVASIR_DIR = Path("kvasir-seg") / "masks"
TARGET = 0.99
DATASETS = {"cardiac": "Cardiac Fat CT (pericardium, label > 0; each slice separately)",
            "kvasir": "Kvasir-SEG (polyp masks, original resolution, threshold 127)"}
_EIGHT = np.ones((3, 3), bool)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def cardiac_files(data: Path, limit: int | None = None) -> list[Path]:
    """The first ``limit`` (sorted) Cardiac Fat CT label volumes under ``data``; [] if absent."""
    files = sorted((data / CARDIAC_DIR).glob("*.nii.gz"))
    return files[:limit] if limit is not None else files


def kvasir_files(data: Path, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Kvasir-SEG mask files under ``data``: all (sorted), or a seeded random subset of ``limit``."""
    files = sorted((data / KVASIR_DIR).glob("*.jpg"))
    if limit is not None and limit < len(files):
        pick = np.random.default_rng(seed).choice(len(files), size=limit, replace=False)
        files = [files[i] for i in sorted(pick)]
    return files


def iter_cardiac_masks(files: Sequence[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """``("<case> z=<k>", pericardium mask (H, W))`` for every slice of every volume."""
    import SimpleITK as sitk

    for f in files:
        vol = sitk.GetArrayFromImage(sitk.ReadImage(str(f))) > 0  # (z, y, x)
        case = f.name.removesuffix(".nii.gz")
        for z in range(vol.shape[0]):
            yield f"{case} z={z}", vol[z]


def iter_kvasir_masks(files: Sequence[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """``(file stem, binary mask (H, W))`` per Kvasir-SEG mask, grayscale thresholded at 127."""
    from PIL import Image

    for f in files:
        with Image.open(f) as im:
            yield f.stem, np.asarray(im.convert("L")) > 127


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------

def split_objects(mask: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """Each 8-connected component of a binary mask (H, W), alone in a full-size mask, with its
    pixel count."""
    labels, n = ndimage.label(np.asarray(mask, bool), structure=_EIGHT)
    for lab in range(1, n + 1):
        comp = labels == lab
        yield comp, int(comp.sum())


def measure(masks_iter: Iterable, sizes: Sequence[int], min_pixels: int = 25) -> dict:
    """Round-trip Dice of every object (component) of every mask at every polar size P.

    ``masks_iter`` yields binary masks (H, W), or ``(name, mask)`` pairs. Components with fewer
    than ``min_pixels`` pixels are skipped (counted). Returns ``sizes``, ``dice`` (objects x sizes),
    ``ms`` (mean milliseconds per object per size), ``areas``, ``names`` (``"<mask> #<k>"``),
    ``n_images``, ``n_images_with_objects``, ``n_skipped`` and ``shapes`` (a Counter of (H, W))."""
    sizes = [int(p) for p in sizes]
    dice, areas, names, seconds = [], [], [], np.zeros(len(sizes))
    n_images = n_with = n_skipped = 0
    shapes: Counter = Counter()
    for i, item in enumerate(masks_iter):
        name, mask = item if isinstance(item, tuple) else (f"mask {i}", item)
        n_images += 1
        shapes[tuple(int(s) for s in np.shape(mask))] += 1
        found = False
        for k, (comp, area) in enumerate(split_objects(mask)):
            if area < min_pixels:
                n_skipped += 1
                continue
            found = True
            origin = component_centroids(comp)[0][0]
            row = []
            for j, p in enumerate(sizes):
                t = time.perf_counter()
                row.append(round_trip_dice(comp, origin, (p, p)))
                seconds[j] += time.perf_counter() - t
            dice.append(row)
            areas.append(area)
            names.append(f"{name} #{k}")
        n_with += found
    n = len(dice)
    return {"sizes": sizes, "dice": np.asarray(dice, dtype=np.float64).reshape(n, len(sizes)),
            "ms": seconds * 1000 / max(n, 1), "areas": np.asarray(areas, dtype=np.int64), "names": names,
            "n_images": n_images, "n_images_with_objects": n_with, "n_skipped": n_skipped, "shapes": shapes}


def summarise(result: dict, target: float = TARGET) -> list[dict]:
    """Per P: objects, mean, 5th percentile, min, fraction >= ``target``, ms per object."""
    rows = []
    for j, p in enumerate(result["sizes"]):
        d = result["dice"][:, j]
        empty = d.size == 0
        rows.append({"P": p, "objects": int(d.size),
                     "mean": float("nan") if empty else float(d.mean()),
                     "p5": float("nan") if empty else float(np.percentile(d, 5)),
                     "min": float("nan") if empty else float(d.min()),
                     "frac": float("nan") if empty else float((d >= target).mean()),
                     "ms": float(result["ms"][j])})
    return rows


def smallest_p(rows: Sequence[dict], key: str, target: float = TARGET) -> int | None:
    """The smallest P whose ``key`` statistic is >= ``target`` (None if none)."""
    ok = [r["P"] for r in rows if r[key] >= target]
    return min(ok) if ok else None


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def _size_info(shapes: Counter) -> str:
    """One line on the image sizes (H x W) seen."""
    if not shapes:
        return "no images"
    hs, ws = [s[0] for s in shapes], [s[1] for s in shapes]
    (h, w), c = shapes.most_common(1)[0]
    if len(shapes) == 1:
        return f"all {c} images {h}x{w} (H x W)"
    return (f"widths {min(ws)}-{max(ws)} px, heights {min(hs)}-{max(hs)} px, {len(shapes)} distinct sizes; "
            f"most common {h}x{w} (H x W, {c} images)")


def _fmt(v: float, nd: int = 4) -> str:
    return "-" if v != v else f"{v:.{nd}f}"


def dataset_section(key: str, result: dict, min_pixels: int, n_files: int) -> str:
    """The markdown section of one dataset: counts, sizes, table, thresholds, worst object."""
    rows = summarise(result)
    unit = "patients" if key == "cardiac" else "images"
    lines = [f"## {DATASETS[key]}", "",
             f"- {n_files} {unit}, {result['n_images']} {'slices' if key == 'cardiac' else 'masks'} read, "
             f"{result['n_images_with_objects']} with at least one object; {len(result['areas'])} objects measured, "
             f"{result['n_skipped']} components skipped (< {min_pixels} pixels)",
             f"- image size: {_size_info(result['shapes'])}"]
    if len(result["areas"]):
        a = result["areas"]
        lines.append(f"- object area: {a.min()}-{a.max()} pixels (median {int(np.median(a))})")
    lines += ["", f"| P | objects | mean Dice | 5th percentile | min | fraction >= {TARGET} | ms per object |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['P']} | {r['objects']} | {_fmt(r['mean'])} | {_fmt(r['p5'])} | {_fmt(r['min'])} | "
              f"{_fmt(r['frac'], 3)} | {r['ms']:.1f} |" for r in rows]
    top = max(result["sizes"])

    def _say(p):
        return f"P = {p}" if p is not None else f"not reached (P <= {top})"

    lines += ["", f"- smallest P with mean Dice >= {TARGET}: **{_say(smallest_p(rows, 'mean'))}**",
              f"- smallest P with 5th-percentile Dice >= {TARGET}: **{_say(smallest_p(rows, 'p5'))}**"]
    if len(result["areas"]):
        j = int(np.argmax(result["sizes"]))
        w = int(np.argmin(result["dice"][:, j]))
        lines.append(f"- worst object at P = {top}: {result['names'][w]} ({result['areas'][w]} pixels), "
                     f"Dice {result['dice'][w, j]:.4f}")
    return "\n".join(lines) + "\n"


def render_report(results: dict, args, cmd: str, wall_s: float, notes: Sequence[str]) -> str:
    """The whole markdown report."""
    head = ["# Polar round trip on real masks", "",
            "Each object (an 8-connected component, alone in a full-size mask) goes Cartesian -> polar "
            "(P angles x P radii, nearest) around its centroid -> Cartesian (nearest); the table gives the "
            "Dice of the result against the original. Radius = distance from the centroid to the farthest "
            "image corner, so one polar pixel covers more of a large image. This is the loss of a perfect "
            "polar prediction at that resolution.", "",
            f"- command: `{cmd}`", f"- machine: {machine_line()}",
            f"- torch threads: {args.threads}", f"- wall time: {wall_s:.1f} s",
            f"- data: `{args.data}` (read in place)",
            f"- plot: `{Path(args.plot).name}`"]
    head += [f"- note: {n}" for n in notes]
    body = [dataset_section(k, r["result"], args.min_pixels, r["n_files"]) for k, r in results.items()]
    return "\n".join(head) + "\n\n" + "\n".join(body)


def make_figure(results: dict):
    """Mean (solid) and 5th-percentile (dashed) Dice against P per dataset, log2 x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sizes: set[int] = set()
    for (key, r), color in zip(results.items(), ("tab:red", "tab:blue", "tab:green")):
        rows = summarise(r["result"])
        ps = [x["P"] for x in rows]
        sizes.update(ps)
        ax.plot(ps, [x["mean"] for x in rows], "o-", color=color, label=f"{key}: mean")
        ax.plot(ps, [x["p5"] for x in rows], "s--", color=color, label=f"{key}: 5th percentile")
    ax.axhline(TARGET, color="gray", lw=1, ls=":", label=f"Dice {TARGET}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes), [str(p) for p in sorted(sizes)])
    ax.set_xlabel("polar size P (P angles x P radii)")
    ax.set_ylabel("round-trip Dice")
    ax.set_title("Cartesian -> polar -> Cartesian (nearest), per object")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None,
                   help=f"shared data root (default: $STSEG_DATA, else {shared_data()})")
    p.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256, 512, 1024], help="polar sizes P")
    p.add_argument("--min_pixels", type=int, default=25, help="skip smaller components (default: %(default)s)")
    p.add_argument("--limit_cardiac", type=int, default=None, help="first N patients (default: all)")
    p.add_argument("--limit_kvasir", type=int, default=None, help="random N images (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Kvasir subset (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s; more threads spin against other jobs on a shared "
                        "machine and made small grid_samples 10-30x slower)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default: %(default)s)")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: polar_round_trip.png next to --out)")
    return p


def _run_dataset(key: str, args) -> tuple[dict, int] | None:
    """Measure one dataset with a progress bar; None (after a message) if its folder is missing."""
    from tqdm import tqdm

    if key == "cardiac":
        files, folder, it = cardiac_files(args.data, args.limit_cardiac), args.data / CARDIAC_DIR, iter_cardiac_masks
    else:
        files, folder = kvasir_files(args.data, args.limit_kvasir, args.seed), args.data / KVASIR_DIR
        it = iter_kvasir_masks
    if not files:
        print(f"[{PROG}] {key}: no data in {folder} (folder missing or empty), skipping it", file=sys.stderr)
        return None
    result = measure(tqdm(it(files), desc=key, unit="slice" if key == "cardiac" else "image"),
                     args.sizes, args.min_pixels)
    return result, len(files)


def _run_all(args) -> dict:
    """Every available dataset of ``args.datasets``, with torch limited to ``args.threads``
    threads (the previous count is restored)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        runs = {key: _run_dataset(key, args) for key in args.datasets}
    finally:
        torch.set_num_threads(before)
    return {k: {"result": r[0], "n_files": r[1]} for k, r in runs.items() if r is not None}


def main(argv: Sequence[str] | None = None) -> None:
    """Measure, then write the markdown report and the plot."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.data = args.data or shared_data()
    if min(args.sizes) < 2:
        raise SystemExit(f"{PROG}: error: every polar size must be >= 2, got {args.sizes}")
    args.plot = args.plot or args.out.with_name("polar_round_trip.png")
    cmd = shlex.join([*PROG.split(), *argv])
    t0 = time.perf_counter()
    results = _run_all(args)
    if not results:
        raise SystemExit(f"{PROG}: error: none of the datasets {args.datasets} found under {args.data} "
                         f"(expected {CARDIAC_DIR} and/or {KVASIR_DIR}); pass --data")
    wall = time.perf_counter() - t0
    notes = []
    if args.limit_kvasir is not None and "kvasir" in results:
        notes.append(f"Kvasir-SEG limited to a random subset of {args.limit_kvasir} images (seed {args.seed})")
    if args.limit_cardiac is not None and "cardiac" in results:
        notes.append(f"Cardiac Fat CT limited to the first {args.limit_cardiac} patients")
    notes += [f"{k}: not found under the data root, skipped" for k in args.datasets if k not in results]
    write_atomic(args.out, render_report(results, args, cmd, wall, notes))
    write_atomic(args.plot, figure=make_figure(results))
    print(f"[{PROG}] wrote {args.out} and {args.plot} ({wall:.1f} s)")


if __name__ == "__main__":
    main()
