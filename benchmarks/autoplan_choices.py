"""What the self-configuring planner (``nnunet-stseg plan`` without ``-s``) chooses on the real
datasets, with the numbers behind each choice; no training.

    python -m benchmarks.autoplan_choices --workdir work_dirs/autoplan --out docs/benchmarks/autoplan_choices.md

Datasets: Cardiac Fat CT (Dataset701), hippocampus (Dataset704) and CHAOS T2 (Dataset705), read in
place (linked into the work folder's ``nnUNet_raw``), and Kvasir-SEG resized to 256 x 256
(converted with ``benchmarks.kvasir``; ``--kvasir_native`` adds the original resolution, whose
nnU-Net fingerprint reads 1000 large photos). Each is planned by the stock command (``--no_pp``:
nnU-Net's fingerprint and plans, our object fingerprint and choices) into the work folder; the
report lists per dataset and dimensionality the object fingerprint's headline figures, the
chosen S, coarse grid, coarse patch, size rule and ``max_crops``, and the planner's notes. Next to
them: what the committed reports measured for S on the same data (``REFERENCES``).
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.runner import (command_line, command_parser, find_command, pipeline_env, publish_report, raw_dataset,
                               report_header, run, shared_data)

DATASETS = {701: "Cardiac Fat CT", 704: "hippocampus (MSD Task04)", 705: "CHAOS T2 MR", 722: "Kvasir-SEG 256²",
            723: "Kvasir-SEG native"}
REFERENCES = {
    722: "committed reports at S = 32 and 64 (width 16, 30 x 50 iterations): the cascade's test DSC 67.6 % at "
         "S = 32 (kvasir_recall.md); kvasir_recall_s32_run2.md repeats S = 32; the end-to-end report "
         "(kvasir_e2e.md) uses S = 64",
    723: "kvasir_native.md: the cascade at S = 64 on the original photos, 41.6 % test DSC against nnU-Net 2d's 36.4 "
         "at its budget",
    701: "cardiac3d.md / depth_cardiacfat.md / polar_cardiacfat.md: S = 64 (3D) and S = 128 (polar, 2D) were "
         "chosen by hand",
}


def link_dataset(raw: Path, dataset_id: int) -> Path | None:
    """The shared raw dataset ``dataset_id`` linked into the work folder's ``raw`` (None if absent)."""
    source = raw_dataset(shared_data() / "nnUNet_raw", dataset_id)
    if source is None:
        return None
    target = raw / source.name
    if not target.exists():
        target.symlink_to(source.resolve(), target_is_directory=True)
    return target


def kvasir_dataset(raw: Path, dataset_id: int, size: int | None) -> Path | None:
    from benchmarks.kvasir import convert_kvasir

    existing = raw_dataset(raw, dataset_id)
    if existing is not None:
        return existing
    src = shared_data() / "kvasir-seg"
    if not src.is_dir():
        return None
    return convert_kvasir(src, raw, dataset_id, name=f"KvasirSEG{size or 'Native'}Auto", size=size, seed=0)


def dataset_choices(dataset: Path, env: dict, log: Path) -> dict:
    """Plan one dataset without -s (nnU-Net's fingerprint and our object fingerprint are reused when
    present) and collect the choices per dimensionality."""
    pp = Path(env["nnUNet_preprocessed"]) / dataset.name
    plans_file = pp / "nnUNetPlans.json"
    dataset_id = int(dataset.name[len("Dataset"):len("Dataset") + 3])
    run([find_command("nnunet-stseg"), "plan", "-d", str(dataset_id), "--no_pp", "-np", "2"], env, log)
    plans = json.loads(plans_file.read_text())
    fingerprint = json.loads((pp / "object_fingerprint.json").read_text())
    out = {"median_image_mm": fingerprint["median_image_mm"], "cases": len(fingerprint["cases"]), "dims": {}}
    for name, cfg in plans["configurations"].items():
        sts = cfg.get("sts", {})
        if sts.get("role") != "fine" or "planning" not in sts:
            continue
        dim = name.split("_", 1)[0]
        coarse = plans["configurations"][sts["coarse_configuration"]]
        summary = fingerprint[dim] or fingerprint["2d"]
        out["dims"][dim] = {
            "configuration": name, "spacing": cfg["spacing"], "median_image": cfg["median_image_size_in_voxels"],
            "objects": summary["objects"]["objects"], "objects_per_case_max": summary["objects"]["objects_per_case"]["max"],
            "specks": fingerprint.get(f"{dim}_specks", 0),
            "p5_mm": [e.get("p5") for e in summary["objects"]["extent_mm"]],
            "p50_mm": [e.get("p50") for e in summary["objects"]["extent_mm"]],
            "classes": {k: v["objects"] for k, v in summary.items() if k not in ("all", "objects")},
            "s": sts["input_size"], "coarse_spacing": coarse["spacing"],
            "coarse_image": coarse["median_image_size_in_voxels"], "coarse_patch": coarse["patch_size"],
            "min_object_size": sts["crop"]["min_object_size"], "max_crops": sts["max_crops"],
            "chosen": sts["planning"]["chosen"], "notes": sts["planning"]["notes"],
            "class_crops": class_crops(summary, dataset, cfg["spacing"], dim, sts)}
    return out


def class_crops(summary: dict, dataset: Path, spacing, dim: str, sts: dict) -> dict:
    """Per class: its p50 object extent (mm), the side of that object's crop on the full-resolution
    grid (the plan's crop rule) and how much the one fine configuration at S downsamples it (1 = not
    at all): how one S serves classes of very different sizes."""
    from nnunet_stseg.adapters.config import grid_spacing3
    from nnunet_stseg.core.autoplan import crop_extent_voxels

    names = {str(v if not isinstance(v, list) else v[0]): k for k, v in
             json.loads((dataset / "dataset.json").read_text())["labels"].items() if k not in ("background", "ignore")}
    active = [dim == "3d", True, True]
    out = {}
    for key, cls in summary.items():
        if key in ("all", "objects") or not cls.get("objects"):
            continue
        extent = [e["p50"] for e in cls["extent_mm"]]
        side = crop_extent_voxels(extent, grid_spacing3(spacing), active, sts["crop"]["margin_fraction"],
                                  sts["crop"]["margin_min"])
        out[names.get(key, key)] = {"objects": cls["objects"], "p50_mm": extent, "crop": round(side, 1),
                                    "downsampled": round(max(1.0, side / sts["input_size"]), 2)}
    return out


def _fmt(values, digits=1) -> str:
    """'41 x 512 x 512', '3 x 0.7 x 0.7': numbers with at most ``digits`` decimals, no trailing zeros."""
    return " x ".join("-" if v is None else f"{round(float(v), digits):g}" for v in values)


def report(results: dict, cmd: str) -> str:
    lines = [*report_header("What the self-configuring planner chooses on the real datasets", cmd),
             "No training: `nnunet-stseg plan -d D --no_pp` without `-s` on each dataset (nnU-Net's default planner "
             "and memory target). Objects: the components of the foreground union (what the cascade crops; 2D stages: "
             "per slice), specks (under 1 % of the median object's volume) left out and counted; extents: their p5 / "
             "p50 per axis (z x y x x, mm; 2D stages: the slice axis is its thickness). The constants of the "
             "rules are the defaults of `AutoPlanRules` (docs/design.md \"Self-configuring cascade\"): the coarse "
             "grid's (the p5 objects 10 coarse voxels wide) chosen on these training labels "
             "([coarse_grid_sweep.md](coarse_grid_sweep.md)), the others not yet chosen on data.", "",
             "| dataset | dim | cases | median image (voxels) | spacing mm | objects (max / case) | specks | p5 extent mm | "
             "p50 extent mm | S | coarse spacing mm | coarse image | coarse patch | min_object_size | max_crops |",
             "|---" * 15 + "|"]
    for key, r in results["datasets"].items():
        for dim, d in r["dims"].items():
            lines.append(f"| {DATASETS[int(key)]} | {dim} | {r['cases']} | {_fmt(d['median_image'], 0)} | "
                         f"{_fmt(d['spacing'], 2)} | {d['objects']} ({d['objects_per_case_max']:g}) | "
                         f"{d.get('specks', 0)} | "
                         f"{_fmt(d['p5_mm'])} | {_fmt(d['p50_mm'])} | {d['s']} | {_fmt(d['coarse_spacing'], 2)} | "
                         f"{_fmt(d['coarse_image'], 0)} | {_fmt(d['coarse_patch'], 0)} | {d['min_object_size']:g} | "
                         f"{d['max_crops']} |")
    lines += ["", "Why (the planner's own lines) and its notes:"]
    for key, r in results["datasets"].items():
        for dim, d in r["dims"].items():
            lines.append(f"- **{DATASETS[int(key)]}, {dim}**: " + "; ".join(
                f"{name} = {c['value']}: {c['why']}" for name, c in d["chosen"].items())
                + "".join(f" NOTE: {n}" for n in d["notes"]))
        if int(key) in REFERENCES:
            lines.append(f"  - measured S on this data: {REFERENCES[int(key)]}")
    several = [(key, dim, d) for key, r in results["datasets"].items() for dim, d in r["dims"].items()
               if len(d.get("class_crops", {})) > 1]
    if several:
        lines += ["", "Classes of different sizes: one fine configuration serves every class at the chosen S; a class's "
                  "typical (p50) object crop on the full-resolution grid and how much S downsamples it (1 = not at "
                  "all; the coarse grid is set by the small objects of the union, so it keeps every class):", "",
                  "| dataset | dim | S | class | objects | p50 extent mm | crop (voxels) | downsampled x |",
                  "|---" * 8 + "|"]
        for key, dim, d in several:
            for name, c in d["class_crops"].items():
                lines.append(f"| {DATASETS[int(key)]} | {dim} | {d['s']} | {name} | {c['objects']} | "
                             f"{_fmt(c['p50_mm'])} | {c['crop']:g} | {c['downsampled']:g} |")
        lines += ["", "Where the classes are parts of one object (Cardiac Fat CT: the fat inside the pericardium; the two "
                  "hippocampus parts touch) a class's components are mostly fragments of that object, cropped with it: "
                  "the union objects (the p50 extent of the first table) are what the fine stage sees. Where they are "
                  "separate organs (CHAOS) the one S keeps the small ones at full resolution and downsamples the large "
                  "ones in their crops; whether that costs the large organs accuracy is what the CHAOS runs of "
                  "`benchmarks.experiment_cardiac3d --auto` measure (per-organ DSC)."]
    missing = [DATASETS[int(k)] for k in results.get("missing", [])]
    if missing:
        lines += ["", f"Not found under the data folder (skipped): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = command_parser("autoplan_choices", __doc__)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/autoplan"), help="work folder")
    p.add_argument("--kvasir_native", action="store_true", help="also Kvasir-SEG at its original resolution")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = pipeline_env(workdir, 1, 1)
    raw = Path(env["nnUNet_raw"])
    raw.mkdir(parents=True, exist_ok=True)
    results: dict = {"datasets": {}, "missing": []}
    datasets = {701: lambda: link_dataset(raw, 701), 704: lambda: link_dataset(raw, 704),
                705: lambda: link_dataset(raw, 705), 722: lambda: kvasir_dataset(raw, 722, 256)}
    if args.kvasir_native:
        datasets[723] = lambda: kvasir_dataset(raw, 723, None)
    for dataset_id, make in datasets.items():
        dataset = make()
        if dataset is None:
            results["missing"].append(dataset_id)
            continue
        results["datasets"][str(dataset_id)] = dataset_choices(dataset, env, workdir / "logs" / f"plan_{dataset_id}.log")
    publish_report(report(results, command_line(p, argv)), args.out)


if __name__ == "__main__":
    main()
