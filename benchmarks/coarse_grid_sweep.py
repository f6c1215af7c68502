"""How coarse may the coarse grid be? The planner's constant ``AutoPlanRules.coarse_voxels`` (the
small objects, p5 extent, stay at least this many coarse voxels wide) chosen on the training labels,
with an ideal coarse model and no training.

    python -m benchmarks.coarse_grid_sweep --workdir work_dirs/autoplan --out docs/benchmarks/coarse_grid_sweep.md

For each dataset the self-configuring planner was run on (``benchmarks.autoplan_choices``, same work
folder: its plans and object fingerprints) and each dimensionality, and for each candidate constant
k: the coarse grid the planner's rule gives (``core.autoplan.coarse_grid`` with ``coarse_voxels=k``)
and, on every training label, what the cascade's box pipeline makes of an ideal coarse prediction on
that grid: the foreground union resampled to the case's coarse grid as nnU-Net resamples the coarse
model's training labels (``resample_data_or_seg_to_shape``, ``is_seg``: what a perfect coarse model
outputs), as one-hot probabilities upsampled linearly to the full grid, and
``core.geometry.find_objects`` with the plan's crop rule (margin, size rule) as at prediction. Per
object of the label (union components of the stage, specks left out as the fingerprint does): is it
inside one crop (whole), partly covered, or in none (missed). A real coarse model errs more than
this one; a grid that loses objects even here loses them for any model. The row ``S = 64`` is the
grid of ``-s 64`` (the median image at 64 voxels per axis) for comparison.

Two coarse models: the perfect one, and the same mask eroded by one coarse voxel (a model that misses
every object's outer cells: its box one cell short on every side, the error the crop margin is meant
to absorb). The decision (docs/design.md "Self-configuring cascade"): the smallest k at which, on
every dataset where k changes the grid, at least 99 % of the objects are whole in one crop
under the perfect model and at least 99.9 % of the foreground lies inside some
crop under the eroded one.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from benchmarks.autoplan_choices import DATASETS
from benchmarks.runner import command_line, command_parser, publish_report, raw_dataset, report_header

CANDIDATES = (2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0)
MODELS = ("perfect", "eroded")
WHOLE_TARGET = 0.99  # objects inside one crop, perfect coarse model
COVERED_TARGET = 0.999  # foreground voxels inside some crop, eroded coarse model


def oracle_objects(seg: np.ndarray, spacing, coarse_spacing, active, crop, erode: bool = False) -> list[dict]:
    """Every union component of one label (Z, Y, X; nnU-Net's transposed order) and what an ideal
    coarse prediction on the grid of ``coarse_spacing`` gives it: ``{"voxels", "whole", "covered"}``
    (inside one crop box; share of its voxels inside any crop box). ``erode``: the coarse mask eroded
    by one coarse voxel along the active axes, a coarse model that misses each object's outer cells
    (its box one coarse voxel short on every side, the error the rule's margin is meant to absorb).

    >>> from nnunet_stseg.core.geometry import CropParams
    >>> seg = np.zeros((1, 64, 64), np.uint8); seg[0, 10:30, 10:30] = 1; seg[0, 50:52, 50:52] = 1
    >>> crop = CropParams(patch_size=(1, 32, 32), min_object_size=1)
    >>> [(o["voxels"], o["whole"]) for o in oracle_objects(seg, [1, 1, 1], [1, 2, 2], [False, True, True], crop)]
    [(400, True), (4, True)]
    >>> [(o["voxels"], o["whole"]) for o in oracle_objects(seg, [1, 1, 1], [1, 8, 8], [False, True, True], crop)]
    [(400, True), (4, False)]
    >>> [(o["voxels"], o["covered"]) for o in oracle_objects(seg, [1, 1, 1], [1, 2, 2], [False, True, True], crop,
    ...                                                       erode=True)]  # the 2 x 2 object is one coarse cell
    [(400, 1.0), (4, 0.0)]
    """
    import torch

    from nnunet_stseg.core.geometry import component_boxes, find_objects, upsample_probabilities

    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    fg = np.asarray(seg) > 0
    full = fg.shape
    coarse_shape = tuple(max(1, int(round(n * s / c))) if a else n
                         for n, s, c, a in zip(full, spacing, coarse_spacing, active))
    new_spacing = [c if a else s for s, c, a in zip(spacing, coarse_spacing, active)]
    coarse = resample_data_or_seg_to_shape(fg[None].astype(np.int16), coarse_shape, list(spacing), new_spacing,
                                           is_seg=True, order=1, order_z=0)[0] > 0
    if erode:
        coarse = ndimage.binary_erosion(coarse, structure=_face_structure(active))
    probs = torch.from_numpy(np.stack([~coarse, coarse]).astype(np.float32))
    canvas = probs if coarse_shape == full else upsample_probabilities(probs, full)
    found = find_objects(coarse, spacing, crop, image_shape=full, probabilities=canvas)
    covered = np.zeros(full, bool)
    for box in found.crop_boxes:
        covered[tuple(slice(int(a), int(b)) for a, b in box)] = True
    labels, boxes = component_boxes(fg, active)
    voxels = np.bincount(labels.ravel(), minlength=len(boxes) + 1)[1:]
    inside = np.bincount(labels[covered], minlength=len(boxes) + 1)[1:]
    crops = found.crop_boxes
    out = []
    for box, n, k in zip(boxes, voxels, inside):
        whole = bool(len(crops)) and bool(np.any(np.all((crops[:, :, 0] <= box[None, :, 0])
                                                        & (crops[:, :, 1] >= box[None, :, 1]), axis=1)))
        out.append({"voxels": int(n), "whole": whole, "covered": float(k) / float(n)})
    return out


def _face_structure(active) -> np.ndarray:
    """Face neighbours along the active axes only (a 2D stage erodes each slice on its own)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1, 1, 1] = True
    for axis, a in enumerate(active):
        if a:
            for side in (0, 2):
                index = [1, 1, 1]
                index[axis] = side
                structure[tuple(index)] = True
    return structure


def summarise(objects: list[dict], volume_mm3: float) -> dict:
    """Shares of whole / missed objects (specks under 1 % of the median object's volume left out,
    as the fingerprint does), also over the smallest tenth; ``volume_mm3``: one voxel's volume."""
    from nnunet_stseg.core.fingerprint import objects_without_specks

    kept, specks = objects_without_specks([{**o, "class": "all", "volume_mm3": o["voxels"] * volume_mm3}
                                           for o in objects])
    if not kept:
        return {"objects": 0, "specks": specks}
    volumes = np.array([o["voxels"] for o in kept])
    small = [o for o in kept if o["voxels"] <= np.quantile(volumes, 0.1)]

    def share(group, key):
        return float(np.mean([bool(o[key]) if key == "whole" else o["covered"] == 0 for o in group]))

    return {"objects": len(kept), "specks": specks, "whole": share(kept, "whole"), "missed": share(kept, "missed"),
            "small_objects": len(small), "small_whole": share(small, "whole"), "small_missed": share(small, "missed"),
            "voxels_covered": float(np.sum([o["covered"] * o["voxels"] for o in kept]) / volumes.sum())}


def sweep_dataset(pp: Path, raw: Path, candidates=CANDIDATES) -> dict:
    """Every dimensionality the planner chose for: per candidate k (and ``-s 64``) the coarse grid and
    :func:`summarise` of the ideal coarse prediction on every training label."""
    from nnunet_stseg.adapters.config import grid_spacing3
    from nnunet_stseg.core.autoplan import AutoPlanRules, coarse_grid
    from nnunet_stseg.core.geometry import CropParams
    from nnunet_stseg.planners.sts_planner import _training_cases, _training_labels

    plans = json.loads((pp / "nnUNetPlans.json").read_text())
    fingerprint = json.loads((pp / "object_fingerprint.json").read_text())
    planner = SimpleNamespace(raw_dataset_folder=str(raw), dataset_json=json.loads((raw / "dataset.json").read_text()))
    ignore = planner.dataset_json["labels"].get("ignore")
    cases = _training_cases(planner)
    out = {}
    for name, cfg in plans["configurations"].items():
        sts = cfg.get("sts", {})
        if sts.get("role") != "fine" or "planning" not in sts:
            continue
        dim = name.split("_", 1)[0]
        active = [dim == "3d", True, True]
        base = plans["configurations"]["3d_fullres" if dim == "3d" else "2d"]
        spacing3 = grid_spacing3(base["spacing"])
        median = [float(v) for v in base["median_image_size_in_voxels"]]
        median3 = median if len(median) == 3 else [1.0] + median
        p5 = [e["p5"] for e in (fingerprint[dim] or fingerprint["2d"])["objects"]["extent_mm"]]
        crop = CropParams.from_dict(sts["crop"])  # the plan's margin and size rule
        grids = {f"k = {k:g}": coarse_grid(spacing3, median3, p5, active, AutoPlanRules(coarse_voxels=k))[:2]
                 for k in candidates}
        s64 = [sp * max(1.0, m / 64.0) if a else sp for sp, m, a in zip(spacing3, median3, active)]
        grids["S = 64"] = (s64, [int(round(m * sp / c)) for m, sp, c in zip(median3, spacing3, s64)])
        objects = {(g, e): [] for g in grids for e in MODELS}
        voxel_mm3 = float(np.prod(spacing3))
        for _, seg, spacing in _training_labels(planner, cases, plans["transpose_forward"], f"{pp.name} {dim}"):
            if ignore is not None:
                seg = np.where(seg == int(ignore), 0, seg)
            for (g, model), found in objects.items():  # every case resampled to the coarse spacing, as nnU-Net does
                found += oracle_objects(seg, spacing, grids[g][0], active, crop, erode=model == "eroded")
        out[dim] = {"spacing": spacing3, "median": median3, "p5_mm": p5, "min_object_size": crop.min_object_size,
                    "grids": {g: {"spacing": [round(v, 3) for v in sp], "median": [int(v) for v in shape],
                                  **{m: summarise(objects[(g, m)], voxel_mm3) for m in MODELS}}
                              for g, (sp, shape) in grids.items()}}
    return out


def _passes(grid: dict) -> bool:
    p, e = grid["perfect"], grid["eroded"]
    return not p.get("objects") or (p["whole"] >= WHOLE_TARGET and e["voxels_covered"] >= COVERED_TARGET)


def _informative(d: dict) -> bool:
    """False when every candidate gives the same grid (e.g. the full resolution): k cannot matter."""
    return len({tuple(v["spacing"]) for g, v in d["grids"].items() if g.startswith("k")}) > 1


def choose(results: dict) -> tuple[float | None, list[str]]:
    """The smallest candidate k whose grids pass on every dataset and dimensionality where k matters:
    ``WHOLE_TARGET`` of the objects whole in a crop under the perfect coarse model, ``COVERED_TARGET`` of the foreground inside some crop under the eroded one; and per dataset
    the smallest k that would do there (the lines of the report)."""
    ks = sorted({float(g.split("= ")[1]) for r in results.values() for d in r.values() for g in d["grids"]
                 if g.startswith("k")})
    dims = [d for r in results.values() for d in r.values() if _informative(d)]
    everywhere = [k for k in ks if all(_passes(d["grids"][f"k = {k:g}"]) for d in dims)]
    lines = []
    for ds, r in results.items():
        for dim, d in r.items():
            if not _informative(d):
                lines.append(f"{ds} {dim}: every k gives the same grid ({' x '.join(f'{v:g}' for v in d['spacing'])} "
                             "mm, the full resolution): says nothing about k")
                continue
            good = [k for k in ks if _passes(d["grids"][f"k = {k:g}"])]
            lines.append(f"{ds} {dim}: smallest k that passes: " + (f"{min(good):g}" if good else "none of the candidates"))
    return (min(everywhere) if everywhere else None), lines


def report(results: dict, command: str) -> str:
    chosen, lines = choose(results)
    out = [*report_header("How coarse may the coarse grid be: an ideal coarse model on the training labels", command),
           "No training. Per candidate constant k of the planner's rule (the p5 object extent stays k coarse voxels "
           "wide) and for `-s 64`: the coarse grid, and what the cascade's box pipeline (the plan's crop rule and size "
           "rule) makes of a coarse prediction on it, over every training label. *Perfect*: the coarse training label "
           "nnU-Net's resampling makes (what a perfect coarse model outputs); *eroded*: that mask eroded by one coarse "
           "voxel along the active axes (a model that misses every object's outer cells). Objects: union components "
           "of the stage, specks left out; whole = inside one crop, missed = in no crop; the smallest tenth by "
           "volume separately; foreground voxels inside some crop (eroded). Cost: the median coarse image in voxels.",
           "", "| dataset | dim | grid | coarse spacing mm | median coarse image | objects | whole % perfect | "
           "whole % eroded | missed % eroded | smallest tenth whole % eroded | missed % eroded | foreground covered % "
           "eroded |", "|---" * 12 + "|"]
    for ds, r in results.items():
        for dim, d in r.items():
            for g, v in d["grids"].items():
                p, e = v["perfect"], v["eroded"]
                if not p.get("objects"):
                    continue
                out.append(f"| {ds} | {dim} | {g} | {' x '.join(f'{s:g}' for s in v['spacing'])} | "
                           f"{' x '.join(map(str, v['median']))} | {p['objects']} | {100 * p['whole']:.1f} | "
                           f"{100 * e['whole']:.1f} | {100 * e['missed']:.1f} | {100 * e['small_whole']:.1f} | "
                           f"{100 * e['small_missed']:.1f} | {100 * e['voxels_covered']:.2f} |")
    out += ["", *[f"- {line}" for line in lines], "",
            f"Choice: k = {chosen:g}, the smallest candidate that passes on every dataset where k matters "
            if chosen is not None else "Choice: no candidate passes on every dataset where k matters "]
    out[-1] += (f"(at least {100 * WHOLE_TARGET:g} % of the objects whole in one crop under the perfect model, at least {100 * COVERED_TARGET:g} % of the foreground inside some crop under the "
                "eroded one).")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = command_parser("coarse_grid_sweep", __doc__)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/autoplan"),
                   help="the work folder of benchmarks.autoplan_choices (its plans and object fingerprints)")
    p.add_argument("--datasets", type=int, nargs="+", default=[701, 704, 705, 722], help="dataset ids (701 704 705 722)")
    p.add_argument("--candidates", type=float, nargs="+", default=list(CANDIDATES),
                   help=f"values of k to try ({' '.join(f'{k:g}' for k in CANDIDATES)})")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    args = p.parse_args(argv)
    results = {}
    for dataset_id in args.datasets:
        raw = raw_dataset(args.workdir / "nnUNet_raw", dataset_id)
        if raw is None or not (args.workdir / "nnUNet_preprocessed" / raw.name / "object_fingerprint.json").is_file():
            print(f"Dataset {dataset_id}: not planned in {args.workdir} (run benchmarks.autoplan_choices first); skipped")
            continue
        results[DATASETS.get(dataset_id, raw.name)] = sweep_dataset(args.workdir / "nnUNet_preprocessed" / raw.name,
                                                                    raw.resolve(), args.candidates)
    if not results:
        raise SystemExit(f"no planned dataset in {args.workdir}: run python -m benchmarks.autoplan_choices first")
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    publish_report(report(results, command_line(p, argv)), args.out)


if __name__ == "__main__":
    main()
