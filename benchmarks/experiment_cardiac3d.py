"""Experiment: segment-then-segment vs nnU-Net 3d_fullres (or 2d) and nnU-Net at S on a 3D
dataset (default Cardiac Fat CT: pericardium and EAT), per-patient cross-validation, same budget;
with ``--auto`` also the self-configured cascade (``nnunet-stseg plan`` without ``-s``).

    python -m benchmarks.experiment_cardiac3d --workdir work_dirs/cardiac3d --size 64 \\
        --out docs/benchmarks/cardiac3d.md
    python -m benchmarks.experiment_cardiac3d --dataset ../shared/data/nnUNet_raw/Dataset705_CHAOST2 --auto \\
        --patience 10 --epochs 150 --iters 20 --val_iters 5 --features 16 --batch_size 8 --dim 2d \\
        --workdir work_dirs/chaos2d --out docs/benchmarks/chaos_autoplan_2d.md     # --dim 3d: 3D stages

Three arms, every network with the same U-Net base width, batch size and schedule, all trained
with the stock ``nnUNetv2_train`` and run with the stock ``nnUNetv2_predict``:
- ``nnunet_3d_fullres``: nnU-Net's planned 3d_fullres configuration (its patch and sliding window
  on the full-resolution grid) narrowed to the experiment's width (``3d_fullres_w<width>``);
- ``nnunet_3d_S``: nnU-Net 3d on the whole volume downscaled to at most S voxels per axis
  (``3d_sts_coarse_S``; nnU-Net's export resamples its output to the original grid);
- ``cascade_S``: segment-then-segment, that model as the coarse stage + the fine stage on
  full-resolution crops resampled to S^3 (``3d_sts_fine_S``);
- ``cascade_auto`` (``--auto``): the cascade as ``nnunet-stseg plan`` configures it from the
  training labels' objects (S, coarse grid and patch, size rule, max_crops), planned into the plans
  ``nnUNetPlansAuto`` beside the others, same width, batch and schedule.
``--dim 2d`` runs the same arms with 2D networks on the slices (nnU-Net ``2d`` instead of
3d_fullres). Regions: Cardiac Fat CT (the default dataset) pericardium (labels 1 + 2) and EAT
(label 2); any other dataset one region per label of its ``dataset.json``.
Data: ``../shared/data/nnUNet_raw/Dataset701_CardiacFatCT`` read in place (or ``--dataset``, any
raw 3D NIfTI dataset), patients dealt into ``--folds`` folds with ``--seed`` (``splits_final.json``),
every patient predicted by the fold model that did not train on it, at its original resolution.
Scores per patient: pericardium (labels 1 + 2) DSC, IoU, precision, recall and EAT (label 2) DSC
(another dataset: the first label in full, the others' DSC), and every region's 95th-percentile
surface distance (HD95, mm); mean +- sd over patients. Inference: wall time of each
``nnUNetv2_predict`` call (TTA off, model loading included) per volume, and its peak resident
memory. Training time per network.

The trainings skip nnU-Net's final validation (``STSEG_SKIP_VALIDATION=1``): the held-out patients
are predicted by the experiment itself, without test-time mirroring. ``--patience P`` trains every
network to a validation plateau (``STSEG_PATIENCE``: its validation loss has not improved for P
epochs; ``--epochs`` is then the cap) on ``--val_patients`` of each fold's training patients (2 by
default; nnU-Net's validation of the fold, never the held-out patients the scores come from);
without it every network trains the fixed schedule and nnU-Net's validation is the held-out fold
(nothing is chosen on it). Resumable: finished trainings
and predictions are kept (re-run the same command); ``--report_only`` rebuilds the report and
figure from ``results.json``. The default budget is sized for a 2-core CPU; GPU users pass
``--epochs 1000 --iters 250 --features 32 -device cuda``.
"""
from __future__ import annotations

import json
from pathlib import Path

from nnunet_stseg.adapters.config import (DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER, coarse_config_name,
                                          fine_config_name)
from nnunet_stseg.adapters.results import model_folder
from nnunet_stseg.atomic import write_json_atomic
from benchmarks.reports import OVERLAP_HEAD, example_overlays, overlap_cells, print_report, score_folder
from benchmarks.runner import (add_budget_arguments, add_narrow, command_line, command_parser, epochs_and_seconds,
                               find_command, pipeline_env, plan_command_line, plan_unless_planned,
                               predict_command_line, prepare_cardiac, report_header, run_measured, set_batch_size,
                               train_fold)

REGIONS = {"pericardium": (1, 2), "eat": (2,)}
AUTO_PLANS = "nnUNetPlansAuto"
AUTO_ARM = "cascade_auto"


def arm_names(size: int, dim: str = "3d") -> tuple[str, str, str]:
    return ("nnunet_3d_fullres" if dim == "3d" else "nnunet_2d"), f"nnunet_{dim}_{size}", f"cascade_{size}"


def regions_of(ds: Path) -> dict[str, tuple[int, ...]]:
    """Cardiac Fat CT: pericardium (1 + 2) and EAT (2); any other dataset: one region per label."""
    dataset_json = json.loads((ds / "dataset.json").read_text())
    labels = {k: v for k, v in dataset_json["labels"].items() if k not in ("background", "ignore")}
    if ds.name.startswith("Dataset701_") or set(labels) == {"pericardium", "EAT"}:
        return REGIONS
    return {name: tuple(v) if isinstance(v, (list, tuple)) else (int(v),) for name, v in labels.items()}


def _dataset_id(ds: Path) -> int:
    return int(ds.name.split("_")[0][len("Dataset"):])


def _voxels(images: list[Path]) -> list[list[int]]:
    import SimpleITK as sitk

    return [list(sitk.ReadImage(str(p)).GetSize())[::-1] for p in images]


def _auto_configurations(configs: dict) -> tuple[str, str]:
    """(coarse, fine) configuration names of the self-configured cascade among a plans file's
    ``configurations``."""
    fine = next(name for name, cfg in configs.items() if cfg.get("sts", {}).get("role") == "fine")
    return configs[fine]["sts"]["coarse_configuration"], fine


def _network(cfg: dict) -> dict:
    return {"patch_size": list(cfg["patch_size"]), "spacing": list(cfg["spacing"]),
            "features_per_stage": list(cfg["architecture"]["arch_kwargs"]["features_per_stage"]),
            "median_image": [int(v) for v in cfg["median_image_size_in_voxels"]]}


def run_experiment(workdir: Path, size: int, features: int, batch_size: int, epochs: int, iters: int, folds: int,
                   seed: int, device: str = "cpu", command: str = "", dataset: Path | None = None,
                   limit: int | None = None, dim: str = "3d", auto: bool = False, patience: int | None = None,
                   val_iters: int = 2, val_patients: int = 2) -> dict:
    workdir = Path(workdir).resolve()
    env = pipeline_env(workdir, epochs, iters, val_iters)
    env.update({"nnUNet_n_proc_DA": "1", "STSEG_SKIP_VALIDATION": "1"})
    if patience:
        env.update({"STSEG_PATIENCE": str(patience), "STSEG_SAVE_EVERY": "5"})  # a kill loses <= 5 epochs
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ds, evals = prepare_cardiac(workdir, env, folds, seed, dataset, limit, val_patients if patience else 0)
    did = _dataset_id(ds)
    regions = regions_of(ds)
    coarse_c, fine_c = coarse_config_name(dim, size), fine_config_name(dim, size)
    pp = Path(env["nnUNet_preprocessed"]) / ds.name
    plans_file = pp / "nnUNetPlans.json"
    plan_unless_planned(plans_file, fine_c, plan_command_line(did, size, (dim,), features, batch_size=batch_size), env,
                        logs / "plan.log")
    fullres_c = add_narrow(plans_file, features, base="3d_fullres" if dim == "3d" else "2d")
    networks = {c: _network(set_batch_size(plans_file, c, batch_size)) for c in (fullres_c, coarse_c, fine_c)}
    plans_of = {c: "nnUNetPlans" for c in networks}
    if auto:
        auto_file = pp / f"{AUTO_PLANS}.json"
        if not auto_file.is_file():
            run_measured([find_command("nnunet-stseg"), "plan", "-d", str(did), "--dims", dim, "--features",
                          str(features), "--batch_size", str(batch_size), "-overwrite_plans_name", AUTO_PLANS, "-np",
                          "2"], env, logs / "plan_auto.log")
        auto_configs = json.loads(auto_file.read_text())["configurations"]
        auto_coarse, auto_fine = _auto_configurations(auto_configs)
        planning = auto_configs[auto_fine]["sts"]["planning"]
        for c in (auto_coarse, auto_fine):
            networks[f"{AUTO_PLANS}/{c}"] = _network(auto_configs[c])
            plans_of[f"{AUTO_PLANS}/{c}"] = AUTO_PLANS
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update({"size": size, "dim": dim, "command": command, "dataset": ds.name,
                    "regions": {k: list(v) for k, v in regions.items()},
                    "budget": {"features": features, "batch_size": batch_size, "epochs": epochs, "iters": iters,
                               "device": device, "folds": [f for f, _ in evals], "seed": seed,
                               **({"patience": patience, "val_iters": val_iters, "val_patients": val_patients}
                                  if patience else {})},
                    "networks": networks,
                    "patients": {str(f): [p.name[:-len("_0000.nii.gz")] for p in images] for f, images in evals},
                    "volume_shapes": _voxels([p for _, images in evals for p in images])})
    if auto:
        results["auto_planning"] = planning
    train_s, trained_epochs = results.setdefault("train_s", {}), results.setdefault("epochs", {})
    # cheap networks first: an interrupted run has the cascade and its baseline for every fold early
    order = [(coarse_c, DEFAULT_COARSE_TRAINER), (fine_c, DEFAULT_FINE_TRAINER)]
    if auto:
        order += [(f"{AUTO_PLANS}/{auto_coarse}", DEFAULT_COARSE_TRAINER), (f"{AUTO_PLANS}/{auto_fine}",
                                                                              DEFAULT_FINE_TRAINER)]
    order.append((fullres_c, DEFAULT_COARSE_TRAINER))
    for key, trainer in order:
        config = key.split("/")[-1]
        for f, _ in evals:
            train_fold(ds.name, config, f, trainer, device, env, logs / f"train_{key.replace('/', '_')}_{f}.log",
                       plans=plans_of[key])
            if f"{key}/{f}" not in trained_epochs:  # epochs x the median epoch: pauses and restarts do not count
                final = model_folder(ds.name, trainer, config, plans_of[key],
                                     results_root=env["nnUNet_results"]) / f"fold_{f}" / "checkpoint_final.pth"
                trained_epochs[f"{key}/{f}"], train_s[f"{key}/{f}"] = epochs_and_seconds(final)
                write_json_atomic(results, results_file, indent=1)
    fullres_arm, coarse_arm, cascade_arm = arm_names(size, dim)
    arm_runs = {fullres_arm: (fullres_c, DEFAULT_COARSE_TRAINER, [fullres_c]),
                coarse_arm: (coarse_c, DEFAULT_COARSE_TRAINER, [coarse_c]),
                cascade_arm: (fine_c, DEFAULT_FINE_TRAINER, [coarse_c, fine_c])}
    if auto:
        arm_runs[AUTO_ARM] = (f"{AUTO_PLANS}/{auto_fine}", DEFAULT_FINE_TRAINER,
                              [f"{AUTO_PLANS}/{auto_coarse}", f"{AUTO_PLANS}/{auto_fine}"])
    results["arm_configs"] = {arm: {"configuration": c, "trainer": t, "trained": nets}
                              for arm, (c, t, nets) in arm_runs.items()}
    infer = results.setdefault("inference", {})
    gt_dir = ds / "labelsTr"
    for arm, (key, trainer, _) in arm_runs.items():
        out = workdir / "predictions" / arm
        plans_flag = [] if plans_of[key] == "nnUNetPlans" else ["-p", plans_of[key]]
        for f, images in evals:
            infer_key = f"{arm}/{f}"
            cases = [p.name[:-len("_0000.nii.gz")] for p in images]
            if infer_key in infer and all((out / f"{c}.nii.gz").is_file() for c in cases):
                continue
            seconds, rss = run_measured(predict_command_line(images[0].parent, out, did, key.split("/")[-1], trainer,
                                                              [f], device, "--disable_tta", "-npp", "1", "-nps", "1",
                                                              *plans_flag), env, logs / f"predict_{arm}_{f}.log")
            infer[infer_key] = {"seconds": seconds, "volumes": len(images), "peak_rss_mb": rss}
            write_json_atomic(results, results_file, indent=1)
        results.setdefault("arms", {})[arm] = score_folder(out, gt_dir, ".nii.gz", regions, surface=True)
        write_json_atomic(results, results_file, indent=1)
    results["files"] = {"gt_dir": str(gt_dir), "file_ending": ".nii.gz",
                        "image_dirs": sorted({str(p.parent) for _, images in evals for p in images})}
    write_json_atomic(results, results_file, indent=1)
    return results


def arm_summary(results: dict, arm: str) -> dict:
    """Inference seconds per volume, peak RSS (MB, largest fold) and training seconds (all folds,
    every network the arm needs) of one arm."""
    runs = [v for k, v in results.get("inference", {}).items() if k.startswith(arm + "/")]
    trained = results["arm_configs"][arm]["trained"]
    train = sum(v for k, v in results.get("train_s", {}).items() if k.rsplit("/", 1)[0] in trained)
    return {"s_per_volume": sum(r["seconds"] for r in runs) / max(1, sum(r["volumes"] for r in runs)),
            "peak_rss_mb": max((r["peak_rss_mb"] for r in runs), default=float("nan")), "train_s": train}


def _arms(results: dict) -> tuple[str, ...]:
    return (*arm_names(results["size"], results.get("dim", "3d")), AUTO_ARM)


def _mm(values) -> str:
    return " x ".join(f"{s:g}" for s in values)


def _input_line(results: dict, arm: str) -> str:
    nets = results["networks"]
    cfg = results["arm_configs"][arm]
    if arm == _arms(results)[0]:
        n = nets[cfg["configuration"]]
        return f"sliding window, patch {' x '.join(map(str, n['patch_size']))} at {_mm(n['spacing'])} mm"
    coarse = nets[cfg["trained"][0]]
    sliding = any(p < m for p, m in zip(coarse["patch_size"], coarse.get("median_image", coarse["patch_size"])))
    line = (f"{'coarse grid' if sliding else 'whole volume'} at {_mm(coarse['spacing'])} mm "
            f"({'sliding window, ' if sliding else ''}patch {' x '.join(map(str, coarse['patch_size']))})")
    if len(cfg["trained"]) > 1:
        fine = nets[cfg["trained"][1]]
        line += f" + crops at {' x '.join(map(str, fine['patch_size']))}"
    return line


def _epochs_trained(results: dict) -> str:
    """Mean epochs over the folds per trained network, e.g. ``'2d_sts_coarse_64 41, 2d_w16 77'``."""
    per_network: dict[str, list[int]] = {}
    for key, epochs in results.get("epochs", {}).items():
        per_network.setdefault(key.rsplit("/", 1)[0], []).append(epochs)
    return ", ".join(f"{k} {sum(v) / len(v):.0f}" for k, v in per_network.items())


def _regions(results: dict) -> dict[str, list[int]]:
    return results.get("regions") or {k: list(v) for k, v in REGIONS.items()}


def _display(region: str) -> str:
    return "EAT" if region == "eat" else region


def report(results: dict, examples: str | None = None) -> str:
    b, size, dim = results["budget"], results["size"], results.get("dim", "3d")
    arms = _arms(results)
    regions = list(_regions(results))
    first, others = regions[0], regions[1:]
    n_patients = sum(len(v) for v in results["patients"].values())
    shapes = results.get("volume_shapes") or []
    region_text = ("Pericardium = labels 1 + 2 (its interior including the fat), EAT = label 2 as labelled. "
                   if first == "pericardium" else
                   f"Regions: {', '.join(f'{n} = label {_mm(v)}' for n, v in _regions(results).items())}. ")
    lines = [*report_header(f"{dim.upper()} segment-then-segment vs nnU-Net {'3d_fullres' if dim == '3d' else '2d'} "
                            f"and {dim} at S = {size} ({results['dataset']})", results["command"]),
             f"Budget per network and fold: U-Net base width {b['features']}, batch {b['batch_size']}, "
             + (f"epochs of {b['iters']} iterations until the validation loss ({b['val_iters']} batches of "
                f"{b['val_patients']} of the fold's training patients, not the held-out ones) has not improved for "
                f"{b['patience']} epochs (at most {b['epochs']}; epochs trained, mean over folds: "
                f"{_epochs_trained(results)})" if b.get("patience") else f"{b['epochs']} x {b['iters']} iterations")
             + f", device {b['device']}; {len(b['folds'])}-fold per-patient "
             f"cross-validation of {n_patients} patients (split seed {b['seed']}), every patient predicted by the "
             "fold model that did not train on it, scored at its original resolution "
             + (f"({min(s[0] for s in shapes)}-{max(s[0] for s in shapes)} slices of "
                f"{shapes[0][1]} x {shapes[0][2]})" if shapes else "") + "; mean ± sd over patients.  ",
             region_text + "Inference: wall time of `nnUNetv2_predict` per volume (TTA off, one preprocessing and one "
             "export worker, model loading included) and the peak resident memory of that command (largest fold). "
             "Training: wall time of every network the arm needs, all folds (the cascade = its coarse model + its "
             "fine model; nnU-Net's final validation skipped).", "",
             f"| arm | network input | {_display(first)} {OVERLAP_HEAD} | "
             + "".join(f"{_display(o)} DSC | " for o in others) + "s / volume | peak RSS (MB) | training (s) |",
             "|---" * (10 + len(others)) + "|"]
    for arm in arms:
        r = results.get("arms", {}).get(arm)
        if r is None:
            continue
        cells = [overlap_cells(r, first)] + [f"{r[f'{o}_Dice'][0]:.3f} ± {r[f'{o}_Dice'][1]:.3f}" for o in others]
        s = arm_summary(results, arm)
        lines.append(f"| {arm} | {_input_line(results, arm)} | {' | '.join(cells)} | {s['s_per_volume']:.1f} | "
                     f"{s['peak_rss_mb']:.0f} | {s['train_s']:.0f} |")
    scored = [a for a in arms if a in results.get("arms", {}) and f"{first}_HD95" in results["arms"][a]]
    if scored:
        lines += ["", "95th-percentile symmetric surface distance (mm, mean ± sd over the patients where both the "
                  "prediction and the label hold the region; `core.metrics.hd95`):", "",
                  "| arm | " + " | ".join(f"{_display(r)} HD95 mm" for r in regions) + " |",
                  "|---" * (1 + len(regions)) + "|"]
        for arm in scored:
            r = results["arms"][arm]
            lines.append(f"| {arm} | " + " | ".join(f"{r[f'{g}_HD95'][0]:.1f} ± {r[f'{g}_HD95'][1]:.1f}"
                                                    for g in regions) + " |")
    planning = results.get("auto_planning")
    if planning:
        lines += ["", "The self-configured cascade's plan (`sts.planning`): " + "; ".join(
            f"{k} = {v['value']} ({v['why']})" for k, v in planning["chosen"].items())
            + "".join(f" NOTE: {n}" for n in planning.get("notes", []))]
    lines += ["", *findings(results)]
    if first == "pericardium":
        lines += ["", "Published: none to set beside these rows. The segment-then-segment paper is 2D only (polyps, "
                  "cells, aorta CT slices); on this dataset the depth-channel thesis reports, in 2D at 128 x 128 with "
                  "full training on its own split, pericardium DSC 0.926 and EAT DSC 0.865 (EAT = adipose pixels "
                  "inside the predicted pericardium, not label 2 as here).  ",
                  "Why this budget: one training iteration of nnU-Net's 3d_fullres network (patch 24 x 320 x 256) "
                  "takes about 9 s on this 2-core CPU at width 8, batch 2, against about 1 s for the S^3 networks; "
                  "the schedule is what lets the 3d_fullres arm finish within an hour or two. Larger budgets: "
                  "`--epochs 1000 --iters 250 --features 32 -device cuda`."]
    if examples:
        lines += ["", "Patients with the lowest, median and highest cascade DSC, the slice with the most "
                  f"{_display(first)} (ground truth green, prediction red): ![examples]({examples})"]
    return "\n".join(lines) + "\n"


def findings(results: dict) -> list[str]:
    """The comparisons the experiment is about, in words, from the numbers."""
    fullres_arm, coarse_arm, cascade_arm, auto_arm = _arms(results)
    dim = results.get("dim", "3d")
    arms = results.get("arms", {})
    if not all(a in arms for a in (fullres_arm, coarse_arm, cascade_arm)):
        return []
    regions = list(_regions(results))
    first, others = regions[0], regions[1:]
    present = [a for a in (fullres_arm, coarse_arm, cascade_arm, auto_arm) if a in arms]
    dsc = {(a, r): 100 * arms[a][f"{r}_Dice"][0] for a in present for r in regions}
    t = {a: arm_summary(results, a) for a in present}

    def diff(a: str, b: str) -> str:
        return ", ".join(f"{_display(r)}{' DSC' if r == first else ''} {dsc[(a, r)] - dsc[(b, r)]:+.1f}"
                         + (" points" if r == first else "") for r in (first, *others))

    out = [f"Reading: the cascade vs nnU-Net {dim} at S: {diff(cascade_arm, coarse_arm)}; the cascade vs "
           f"{'3d_fullres' if dim == '3d' else '2d'}: {diff(cascade_arm, fullres_arm)}, inference "
           f"{t[fullres_arm]['s_per_volume'] / max(t[cascade_arm]['s_per_volume'], 1e-9):.1f} x faster, "
           f"peak memory {t[cascade_arm]['peak_rss_mb']:.0f} vs {t[fullres_arm]['peak_rss_mb']:.0f} MB, training "
           f"{t[cascade_arm]['train_s']:.0f} vs {t[fullres_arm]['train_s']:.0f} s."]
    if auto_arm in arms:
        out.append(f"The self-configured cascade vs the cascade at S = {results['size']}: {diff(auto_arm, cascade_arm)}; "
                   f"vs {'3d_fullres' if dim == '3d' else '2d'}: {diff(auto_arm, fullres_arm)}; inference "
                   f"{t[auto_arm]['s_per_volume']:.1f} s / volume, training {t[auto_arm]['train_s']:.0f} s.")
    return out


def plot_examples(results: dict, workdir: Path, path: Path) -> Path | None:
    if list(_regions(results))[0] != "pericardium":
        return None  # the overlay helper draws the cardiac regions
    arms = arm_names(results["size"], results.get("dim", "3d"))
    return example_overlays({**results, "dataset": "cardiac"}, workdir, path, arms=arms, ranked_by=arms[2])


def main(argv=None) -> None:
    p = command_parser("experiment_cardiac3d", __doc__)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/cardiac3d"))
    p.add_argument("-s", "--size", type=int, default=64, help="S: coarse volume and fine crop size per axis (64)")
    add_budget_arguments(p, features=8, batch_size=2, epochs=8, iters=15, folds=2)
    p.add_argument("--dataset", type=Path, default=None,
                   help="raw 3D dataset folder (default ../shared/data/nnUNet_raw/Dataset701_CardiacFatCT)")
    p.add_argument("--limit", type=int, default=None, help="first N patients only (smoke runs)")
    p.add_argument("--dim", choices=("3d", "2d"), default="3d",
                   help="3D networks (against nnU-Net 3d_fullres) or 2D networks on the slices (against nnU-Net 2d)")
    p.add_argument("--auto", action="store_true",
                   help="also the self-configured cascade (nnunet-stseg plan without -s, plans nnUNetPlansAuto)")
    p.add_argument("--patience", type=int, default=None,
                   help="train every network until its validation loss has not improved for this many epochs "
                        "(--epochs is then the cap; default: the fixed schedule)")
    p.add_argument("--val_iters", type=int, default=2, help="validation batches per epoch (2)")
    p.add_argument("--val_patients", type=int, default=2,
                   help="with --patience: training patients of each fold held out as its validation (2)")
    p.add_argument("--report_only", action="store_true",
                   help="rebuild the report and figure from the work folder's results.json")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    args = p.parse_args(argv)
    if args.report_only:
        results_file = args.workdir / "results.json"
        if not results_file.is_file() or "arms" not in json.loads(results_file.read_text()):
            raise SystemExit(f"--report_only needs a finished run: {results_file} has no results")
        results = json.loads(results_file.read_text())
    else:
        cmd = command_line(p, argv)
        results = run_experiment(args.workdir, args.size, args.features, args.batch_size, args.epochs, args.iters,
                                 args.folds, args.seed, args.device, cmd, args.dataset, args.limit, args.dim,
                                 args.auto, args.patience, args.val_iters, args.val_patients)
    print_report(results, args.out, lambda png: plot_examples(results, args.workdir, png), report)


if __name__ == "__main__":
    main()
