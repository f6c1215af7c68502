"""Experiment: Cartesian nnU-Net at input size S vs the polar stage with coarse-centroid origins vs
the polar stage with heatmap origins.

    python -m benchmarks.experiment_polar --dataset cardiac --workdir work_dirs/polar_cardiac \\
        --out docs/benchmarks/polar_cardiacfat.md
    python -m benchmarks.experiment_polar --dataset kvasir --size 64 --workdir work_dirs/polar_kvasir \\
        --out docs/benchmarks/polar_kvasir.md

Three arms with the same width, batch size and schedule per network, all trained and run with the
stock nnU-Net commands:
- ``cartesian``: ``nnUNetTrainer_StSCoarse`` on ``2d_sts_coarse_S`` (the whole slice downscaled to
  S; nnU-Net's export resamples its output to the original grid);
- ``polar_coarse``: ``nnUNetTrainer_StSPolar`` on ``2d_sts_polar_S``, origins = centroids of that
  Cartesian model's components (``STSEG_OVERRIDES=polar.origin_source=coarse``);
- ``polar_coarse_max1``: the same with at most one origin per slice, the largest component's
  (``polar.max_origins=1``; for data with one object per slice, stray coarse fragments then
  give no polar view of their own);
- ``polar_heatmap``: the same polar model, origins = peaks of ``nnUNetTrainer_StSCentre`` trained on
  ``2d_sts_coarse_S`` (``polar.origin_source=heatmap``); slices with coarse foreground but no peak
  keep the Cartesian prediction;
- ``polar_heatmap_argmax``: the same, one origin per slice at the heatmap's maximum whatever its
  value (``polar.max_origins=1,centre.peak_threshold=0``, the paper's argmax rule);
- ``polar_coarse_confident`` / ``polar_heatmap_confident``: origins that must earn their place
  (``polar.min_origin_confidence``, views weighted by confidence): a coarse component's mean
  foreground probability, a heatmap peak's height (candidates from 0.1). The threshold is chosen
  per origin source on validation data, never on the images scored: Kvasir on the 100 validation
  images of the split; Cardiac Fat for the patients of fold f on the validation patients of the
  OTHER folds (each predicted by its own fold model), so no patient's score picks its threshold.

The centre-point model is trained with the loss of ``--centre_loss`` (CenterNet's focal loss by
default); plans made by an older version (no ``loss`` in ``sts.centre``) get it written in before
the centre model trains. Its validation (precision, recall, F1 of peaks >= 0.5, a peak inside a
ground-truth object detecting it, and the calibration of peak heights) is in the report per fold.

Data and scoring (always in Cartesian space against the original labels, every image counts):
- ``cardiac``: Cardiac Fat CT read in place from ``../shared/data/nnUNet_raw``; per-patient K-fold
  cross-validation (``splits_final.json``), each patient predicted by the fold model that did not
  train on it, at 512 x 512; pericardium (labels 1 + 2) DSC/IoU/precision/recall and EAT (label 2)
  DSC per patient, mean +- sd over patients;
- ``kvasir``: Kvasir-SEG resized to 256 x 256, the paper's seeded 80/10/10 split (fold 0 = train/val),
  scored on the test images; polyp DSC/IoU/precision/recall per image, mean +- sd.
Inference time = wall time of each ``nnUNetv2_predict`` call divided by its images (model loading
included). Resumable: finished trainings and predictions are
kept (re-run the same command).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from nnunet_stseg.adapters.config import (DEFAULT_CENTRE_TRAINER, DEFAULT_COARSE_TRAINER, DEFAULT_POLAR_TRAINER,
                                          coarse_config_name, polar_config_name)
from nnunet_stseg.atomic import write_json_atomic
from benchmarks.reports import OVERLAP_HEAD, example_overlays, overlap_cells, print_report, score_folder
from benchmarks.runner import (CARDIAC_FAT_ID, add_budget_arguments, command_line, command_parser, link_into,
                               pipeline_env, plan_command_line, plan_unless_planned, predict_command_line,
                               prepare_cardiac, raw_dataset, report_header, run_measured, shared_data, train_fold)
from nnunet_stseg.core.centres import detection_by_threshold
from nnunet_stseg.settings import overrides_env

ARMS = ("cartesian", "polar_coarse", "polar_coarse_max1", "polar_heatmap", "polar_heatmap_argmax",
        "polar_coarse_confident", "polar_heatmap_confident")
# confidence thresholds tried on validation data per origin source (coarse: component mean foreground
# probability, >= 0.5 for an argmax component; heatmap: peak height, candidates from HEATMAP_FLOOR)
CONFIDENCE_GRID = {"coarse": (0.0, 0.7, 0.8, 0.9), "heatmap": (0.1, 0.3, 0.5, 0.7)}
HEATMAP_FLOOR = "0.1"
# the plan overrides of an arm's prediction (STSEG_OVERRIDES); every arm starts from the plans'
# values, whatever the caller's environment holds
ORIGIN_SOURCE, MAX_ORIGINS, PEAK_THRESHOLD = "polar.origin_source", "polar.max_origins", "centre.peak_threshold"
MIN_CONFIDENCE, CONFIDENCE_WEIGHTING = "polar.min_origin_confidence", "polar.confidence_weighting"
KVASIR_ID = 720
# methods.md section 3, U-Net DSC Cartesian -> polar with model-predicted centres (other data splits)
PUBLISHED = {"cardiac": "EAT DSC 0.7544 -> 0.7840 (thesis, EAT data)",
             "kvasir": "CVC-ClinicDB polyps DSC 0.8315 -> 0.9374 (thesis; Kvasir itself not reported)"}


def _kvasir_validation_images(ds: Path, workdir: Path) -> list[tuple[int, list[Path]]]:
    """The split's validation images (fold 0), linked into one folder for nnUNetv2_predict."""
    from benchmarks.kvasir import SPLIT_FILE

    folder = link_into(workdir / "inputs" / "validation",
                       [img for case in json.loads((ds / SPLIT_FILE).read_text())["val"]
                        for img in (ds / "imagesTr").glob(f"{case}_*.png")])
    return [(0, sorted(folder.glob("*.png")))]


def ensure_centre_loss(plans_file: Path, configuration: str, loss: str) -> None:
    """Write ``loss`` into the plans' ``sts.centre`` of ``configuration`` if it has none (plans
    made before 0.7; read as ``mse`` otherwise). A block with a different loss is an error: its
    centre model may already be trained with it."""
    plans = json.loads(plans_file.read_text())
    centre = plans["configurations"][configuration]["sts"]["centre"]
    if centre.get("loss") == loss:
        return
    if "loss" in centre:
        raise SystemExit(f"{plans_file}: {configuration} plans the centre model with the {centre['loss']} loss, "
                         f"not {loss}; use another --workdir")
    centre["loss"] = loss
    write_json_atomic(plans, plans_file, indent=1)


def _prepare_kvasir(workdir: Path, env: dict, seed: int, limit: int | None = None
                    ) -> tuple[Path, list[tuple[int, list[Path]]]]:
    from benchmarks.kvasir import convert_kvasir, kvasir_ids

    src = shared_data() / "kvasir-seg"
    if not (src / "images").is_dir():
        raise SystemExit(f"Kvasir-SEG not found at {src}")
    raw = Path(env["nnUNet_raw"])
    ids = kvasir_ids(src)[:limit] if limit else None
    ds = raw_dataset(raw, KVASIR_ID) or convert_kvasir(src, raw, KVASIR_ID, size=256, seed=seed, ids=ids)
    return ds, [(0, sorted((ds / "imagesTs").glob("*.png")))]


def run_experiment(dataset: str, workdir: Path, size: int, features: int, batch_size: int, epochs: int, iters: int,
                   folds: int, seed: int, device: str = "cpu", command: str = "", limit: int | None = None,
                   redo_predictions: bool = False, centre_loss: str = "focal") -> dict:
    workdir = Path(workdir).resolve()
    env = pipeline_env(workdir, epochs, iters)
    env["nnUNet_n_proc_DA"] = os.environ.get("nnUNet_n_proc_DA", "1")
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if dataset == "cardiac":
        ds, evals = prepare_cardiac(workdir, env, folds, seed)
        did, gt_dir, regions = CARDIAC_FAT_ID, ds / "labelsTr", {"pericardium": (1, 2), "eat": (2,)}
    else:
        ds, evals = _prepare_kvasir(workdir, env, seed, limit)
        did, gt_dir, regions = KVASIR_ID, ds / "labelsTs", {"polyp": (1,)}
    file_ending = json.loads((ds / "dataset.json").read_text())["file_ending"]
    coarse_c, polar_c = coarse_config_name("2d", size), polar_config_name(size)
    pp = Path(env["nnUNet_preprocessed"]) / ds.name
    plans_file = pp / "nnUNetPlans.json"
    plan_unless_planned(plans_file, polar_c,
                        plan_command_line(did, size, ("2d",), features, "--polar", batch_size=batch_size), env,
                        logs / "plan.log")
    ensure_centre_loss(plans_file, coarse_c, centre_loss)
    if dataset == "kvasir":
        from benchmarks.kvasir import install_split

        install_split(ds, pp)
    # where confidence thresholds are chosen: Kvasir's validation images; Cardiac: the other folds
    tuning = _kvasir_validation_images(ds, workdir) if dataset == "kvasir" else evals
    tuning_gt = ds / "labelsTr"
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update({"dataset": dataset, "size": size, "command": command,
                    "budget": {"features": features, "batch_size": batch_size, "epochs": epochs, "iters": iters,
                               "device": device, "folds": [f for f, _ in evals], "seed": seed,
                               "centre_loss": centre_loss}})
    train_s = results.setdefault("train_s", {})
    networks = (("cartesian", coarse_c, DEFAULT_COARSE_TRAINER), ("centre", coarse_c, DEFAULT_CENTRE_TRAINER),
                ("polar", polar_c, DEFAULT_POLAR_TRAINER))
    for f, _ in evals:
        for name, config, trainer in networks:
            seconds = train_fold(ds.name, config, f, trainer, device, env, logs / f"train_{name}_{f}.log")
            if seconds is not None:
                train_s[f"{name}/{f}"] = train_s.get(f"{name}/{f}", 0.0) + seconds  # a resumed fold adds
                write_json_atomic(results, results_file, indent=1)
    centre_model = Path(env["nnUNet_results"]) / ds.name / f"{DEFAULT_CENTRE_TRAINER}__nnUNetPlans__{coarse_c}"
    results["centre_validation"] = {}
    for f, _ in evals:
        summary = centre_model / f"fold_{f}" / "validation" / "summary_centres.json"
        if summary.is_file():
            v = json.loads(summary.read_text())
            results["centre_validation"][str(f)] = {k: v.get(k) for k in ("precision", "recall", "f1",
                                                                          "median_distance_px", "sigma_px", "loss",
                                                                          "calibration", "tp", "fn")}
    # arm: configuration, trainer, plan overrides of the prediction
    arm_runs = {"cartesian": (coarse_c, DEFAULT_COARSE_TRAINER, {ORIGIN_SOURCE: "coarse"}),
                "polar_coarse": (polar_c, DEFAULT_POLAR_TRAINER, {ORIGIN_SOURCE: "coarse"}),
                "polar_coarse_max1": (polar_c, DEFAULT_POLAR_TRAINER, {ORIGIN_SOURCE: "coarse",
                                                                       MAX_ORIGINS: "1"}),
                "polar_heatmap": (polar_c, DEFAULT_POLAR_TRAINER, {ORIGIN_SOURCE: "heatmap"}),
                "polar_heatmap_argmax": (polar_c, DEFAULT_POLAR_TRAINER, {ORIGIN_SOURCE: "heatmap",
                                                                          MAX_ORIGINS: "1", PEAK_THRESHOLD: "0"})}
    if redo_predictions:  # e.g. after a predictor change: the trained models are kept
        shutil.rmtree(workdir / "predictions", ignore_errors=True)
        for key in ("inference_s", "arms", "origins", "confidence"):
            results.pop(key, None)
    infer = results.setdefault("inference_s", {})

    def predict(arm: str, out: Path, runs: list[tuple[int, list[Path]]], config: str, trainer: str, arm_env: dict,
                timed: bool = True) -> None:
        for f, images in runs:
            key = f"{arm}/{f}"
            cases = {p.name[:-len("_0000" + file_ending)] for p in images}
            if all((out / f"{c}{file_ending}").is_file() for c in cases) and (key in infer or not timed):
                continue
            seconds, _ = run_measured(predict_command_line(images[0].parent, out, did, config, trainer, [f], device,
                                                            "--disable_tta", "-npp", "1", "-nps", "1"),
                                      {**env, **overrides_env(arm_env)}, logs / f"predict_{arm}_{f}.log")
            if timed:
                infer[key] = {"seconds": seconds, "images": len(images),
                              "slices": _count_slices(images) if dataset == "cardiac" else len(images)}
                write_json_atomic(results, results_file, indent=1)

    for arm, (config, trainer, arm_env) in arm_runs.items():
        out = workdir / "predictions" / arm
        predict(arm, out, evals, config, trainer, arm_env)
        if arm != "cartesian":
            results.setdefault("origins", {})[arm] = origin_counts(
                [logs / f"predict_{arm}_{f}.log" for f, _ in evals])
        results.setdefault("arms", {})[arm] = score_folder(out, gt_dir, file_ending, regions)
        write_json_atomic(results, results_file, indent=1)

    # confident origins: the threshold of each origin source chosen on data that is not scored
    first_region = next(iter(regions))
    confidence = results.setdefault("confidence", {})
    for source, grid in CONFIDENCE_GRID.items():
        arm = f"polar_{source}_confident"
        sweep = {}
        for t in grid:
            arm_env = {ORIGIN_SOURCE: source, MIN_CONFIDENCE: str(t), CONFIDENCE_WEIGHTING: "1",
                       **({PEAK_THRESHOLD: HEATMAP_FLOOR} if source == "heatmap" else {})}
            out = workdir / "predictions" / "tuning" / f"{source}_{t}"
            predict(f"tuning_{source}_{t}", out, tuning, polar_c, DEFAULT_POLAR_TRAINER, arm_env, timed=False)
            cases = score_folder(out, tuning_gt, file_ending, regions)["cases"]
            sweep[str(t)] = {case: c[first_region]["Dice"] for case, c in cases.items()}
        chosen = choose_thresholds(sweep, {f: [p.name[:-len("_0000" + file_ending)] for p in images]
                                           for f, images in tuning}, [f for f, _ in evals], dataset == "kvasir")
        confidence[source] = {"grid": list(grid), "chosen": {str(f): t for f, t in chosen.items()},
                              "tuning_dice": {t: float(np.mean(list(d.values()))) for t, d in sweep.items()}}
        out = workdir / "predictions" / arm
        if dataset == "kvasir":  # the test images, at the threshold chosen on the validation images
            t = chosen[0]
            predict(arm, out, evals, polar_c, DEFAULT_POLAR_TRAINER,
                    {ORIGIN_SOURCE: source, MIN_CONFIDENCE: t, CONFIDENCE_WEIGHTING: "1",
                     **({PEAK_THRESHOLD: HEATMAP_FLOOR} if source == "heatmap" else {})})
            results.setdefault("origins", {})[arm] = origin_counts([logs / f"predict_{arm}_{f}.log" for f, _ in evals])
        else:  # each fold's patients, predicted by their fold model at the threshold the other folds chose
            out.mkdir(parents=True, exist_ok=True)
            for f, images in evals:
                for img in images:
                    name = img.name.replace("_0000" + file_ending, file_ending)
                    shutil.copyfile(workdir / "predictions" / "tuning" / f"{source}_{chosen[f]}" / name, out / name)
            results.setdefault("origins", {})[arm] = origin_counts(
                [logs / f"predict_tuning_{source}_{chosen[f]}_{f}.log" for f, _ in evals])
        results.setdefault("arms", {})[arm] = score_folder(out, gt_dir, file_ending, regions)
        write_json_atomic(results, results_file, indent=1)
    results["files"] = {"gt_dir": str(gt_dir), "file_ending": file_ending,
                        "image_dirs": sorted({str(p.parent) for _, images in evals for p in images})}
    return results


def choose_thresholds(sweep: dict[str, dict[str, float]], cases_by_fold: dict[int, list[str]], folds: list[int],
                      same_cases: bool) -> dict[int, str]:
    """The confidence threshold for each fold's scored cases: the one with the highest mean DSC
    (the lower threshold on a tie) over the tuning cases, ``sweep[t][case]``. ``same_cases``:
    the tuning cases are a separate set (Kvasir's validation images), one choice for every fold;
    otherwise fold f's threshold is chosen on the cases of the other folds.

    >>> sweep = {"0.5": {"a": 0.9, "b": 0.1}, "0.7": {"a": 0.8, "b": 0.6}}
    >>> choose_thresholds(sweep, {0: ["a"], 1: ["b"]}, [0, 1], same_cases=False)  # 0 picks on b, 1 on a
    {0: '0.7', 1: '0.5'}
    """
    def best(cases: list[str]) -> str:
        means = {t: float(np.mean([d[c] for c in cases])) for t, d in sweep.items()}
        return max(means, key=lambda t: (round(means[t], 6), -float(t)))

    if same_cases:
        t = best([c for cases in cases_by_fold.values() for c in cases])
        return {f: t for f in folds}
    if len(cases_by_fold) < 2:
        raise SystemExit("choosing a threshold on other folds needs at least 2 folds")
    return {f: best([c for g, cases in cases_by_fold.items() if g != f for c in cases]) for f in folds}


def origin_counts(logs: list[Path]) -> dict:
    """Origins, images (slices) with at least one origin, and slices that kept the Cartesian
    prediction for lack of a heatmap peak, summed from the polar predictor's log lines."""
    import re

    total = {"origins": 0, "slices_with_origin": 0, "kept_coarse": 0, "no_origin_cases": 0}
    for log in logs:
        text = log.read_text() if log.is_file() else ""
        for n, z, _, kept in re.findall(r"(\d+) origin\(s\) \(\w+\) in (\d+) slice\(s\)(; (\d+) slice)?", text):
            total["origins"] += int(n)
            total["slices_with_origin"] += int(z)
            total["kept_coarse"] += int(kept or 0)
        total["no_origin_cases"] += text.count("no origin (")
    return total


def fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.2f}"


def paired_cell(cases: dict, base: dict, region: str) -> str:
    """Mean per-case DSC difference to the Cartesian arm and how many cases are better / worse (by
    more than 0.005), over the cases both arms scored."""
    common = sorted(set(cases) & set(base))
    if not common:
        return "-"
    d = np.array([cases[c][region]["Dice"] - base[c][region]["Dice"] for c in common])
    return f"{d.mean():+.3f} ({int((d > 0.005).sum())} / {int((d < -0.005).sum())})"


def _count_slices(images: list[Path]) -> int:
    import SimpleITK as sitk

    return int(sum(sitk.ReadImage(str(p)).GetSize()[2] for p in images))


def report(results: dict, examples: str | None = None) -> str:
    b, dataset = results["budget"], results["dataset"]
    regions = ("pericardium", "eat") if dataset == "cardiac" else ("polyp",)
    what = ("Cardiac Fat CT, per-patient cross-validation, each patient predicted by the fold model that did not "
            "train on it, scored at 512 x 512 (mean ± sd over patients)" if dataset == "cardiac" else
            "Kvasir-SEG at 256 x 256, seeded 80/10/10 split, fold 0 trained, scored on the test images "
            "(mean ± sd over images)")
    lines = [*report_header(f"Polar stage vs Cartesian nnU-Net at S = {results['size']} ({dataset})",
                            results["command"]),
             f"Budget per network (Cartesian, centre-point, polar; each fold): U-Net base width {b['features']}, "
             f"batch {b['batch_size']}, {b['epochs']} x {b['iters']} iterations, device {b['device']}; folds "
             f"{b['folds']}, split seed {b['seed']}.  ",
             f"{what}. Every image counts: an image without origin keeps the Cartesian (coarse) prediction. "
             "Inference: wall time of `nnUNetv2_predict` (TTA off, model loading included) per image"
             + (" and per slice" if dataset == "cardiac" else "") + ".", ""]
    head = " | ".join(f"{r} DSC" if r == "eat" else f"{r} {OVERLAP_HEAD}" for r in regions)
    first = regions[0]
    lines += [f"| arm | {head} | {first} DSC vs cartesian, paired: mean difference (better / worse cases) "
              f"| s per image{' | ms per slice' if dataset == 'cardiac' else ''} |",
              "|---" * (3 + len(head.split(" | ")) + (dataset == "cardiac")) + "|"]
    base_cases = results.get("arms", {}).get("cartesian", {}).get("cases", {})
    for arm in ARMS:
        r = results.get("arms", {}).get(arm)
        if r is None:
            continue
        cells = [f"{r['eat_Dice'][0]:.3f} ± {r['eat_Dice'][1]:.3f}" if region == "eat" else overlap_cells(r, region)
                 for region in regions]
        runs = [v for k, v in results["inference_s"].items() if k.startswith(arm + "/")]
        secs = sum(v["seconds"] for v in runs)
        per_image = secs / max(1, sum(v["images"] for v in runs))
        timing = (f"{per_image:.2f}" if runs else "-") + (
            f" | {1000 * secs / max(1, sum(v['slices'] for v in runs)):.0f}" if dataset == "cardiac" and runs else
            " | -" if dataset == "cardiac" else "")
        paired = "-" if arm == "cartesian" else paired_cell(r.get("cases", {}), base_cases, first)
        lines.append(f"| {arm} | {' | '.join(cells)} | {paired} | {timing} |")
    confidence = results.get("confidence") or {}
    if confidence:
        where = ("the 100 validation images" if dataset == "kvasir" else
                 "the validation patients of the other fold(s), each by its own fold model")
        lines += ["", f"Confidence thresholds (chosen on {where}; {first} DSC there per threshold): " + "; ".join(
            f"{source}: " + ", ".join(f"{t} -> {d:.3f}" for t, d in c["tuning_dice"].items())
            + ", chosen " + ", ".join(f"fold {f}: {t}" for f, t in c["chosen"].items())
            for source, c in confidence.items()) + "."]
    origins = results.get("origins", {})
    if origins:
        lines += ["", "Origins (summed over the evaluated images): " + "; ".join(
            f"{arm} {o['origins']} in {o['slices_with_origin']} {'slices' if dataset == 'cardiac' else 'images'}"
            f" ({o['origins'] / max(1, o['slices_with_origin']):.2f} per {'slice' if dataset == 'cardiac' else 'image'}"
            + (f", {o['kept_coarse']} slices without a peak or confident origin kept the Cartesian prediction"
               if o["kept_coarse"] else "")
            + (f", {o['no_origin_cases']} cases without any origin" if o["no_origin_cases"] else "") + ")"
            for arm, o in origins.items()) + "."]
    centre = results.get("centre_validation") or {}
    if centre:
        lines += ["", "Centre-point model on its fold's validation cases (a heatmap peak >= 0.5 detects an object "
                  "when it lies inside it, the first such peak only; every other peak is a false positive): "
                  + "; ".join(f"fold {f}: {v.get('loss') or 'mse'} loss, precision {v['precision']:.2f}, recall "
                              f"{v['recall']:.2f}, F1 {v['f1']:.2f}, sigma {v['sigma_px']:.1f} px"
                              for f, v in centre.items()) + "."]
        for f, v in centre.items():
            if v.get("calibration"):
                n_objects = (v["tp"] + v["fn"]) if v.get("tp") is not None else None
                detection = detection_by_threshold(v["calibration"], n_objects) if n_objects else None
                lines += ["", f"Calibration of the centre model's peaks, fold {f} (peaks >= 0.1 by height; a "
                          "calibrated model's fraction of true centres is near the heights"
                          + (f"; precision / recall / F1 if peaks from the band's lower edge on were origins, "
                             f"{n_objects} objects" if detection else "") + "):", "",
                          "| peak height | peaks | true centres |" + (" P / R / F1 from here |" if detection else ""),
                          "|---|---|---|" + ("---|" if detection else "")]
                lines += [f"| [{row['low']:.1f}, {row['high']:.1f}{']' if row['high'] >= 1 else ')'} | "
                          f"{row['peaks']} | " + ("-" if row["hit_fraction"] is None else f"{row['hit_fraction']:.2f}")
                          + " |" + (f" {fmt(d['precision'])} / {fmt(d['recall'])} / {fmt(d['f1'])} |" if d else "")
                          for row, d in zip(v["calibration"], detection or [None] * len(v["calibration"]))]
    lines += ["", "Arms: `cartesian` = nnU-Net on the whole image downscaled to S; `polar_coarse` = polar "
              "stage, one origin per component of the Cartesian model's mask; `polar_coarse_max1` = the same, "
              "only the largest component per slice (`polar.max_origins=1`); `polar_heatmap` = origins "
              "from the centre-point heatmap model (its peaks >= the planned threshold); `polar_heatmap_argmax` = "
              "one origin per slice at the heatmap's maximum whatever its value (`polar.max_origins=1,"
              "centre.peak_threshold=0`, the paper's argmax rule); `polar_coarse_confident` / "
              "`polar_heatmap_confident` = origins whose confidence (coarse component's mean foreground "
              "probability / heatmap peak height, candidates from 0.1) reaches the threshold chosen on "
              "validation data, views weighted by confidence, a slice without a confident origin keeps the "
              "Cartesian prediction. Every polar arm uses the same Cartesian and polar models (paired "
              "comparisons: one training per network).", ""]
    train = results.get("train_s", {})
    lines += ["", "Training time (s, all folds): " + ", ".join(
        f"{name} {sum(v for k, v in train.items() if k.startswith(name + '/')):.0f}"
        for name in ("cartesian", "centre", "polar")) + ".  ",
        f"Published (other data and splits, full training): {PUBLISHED[dataset]}."]
    lines.append("Polar round-trip Dice of these masks (no network): [polar_round_trip.md](polar_round_trip.md).")
    if examples:
        lines += ["", f"Cases with the lowest, median and highest DSC of polar_coarse (ground truth green, "
                  f"prediction red): ![examples]({examples})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = command_parser("experiment_polar", __doc__)
    p.add_argument("--dataset", choices=("cardiac", "kvasir"), default="cardiac")
    p.add_argument("--workdir", type=Path, default=None, help="default work_dirs/polar_<dataset>")
    p.add_argument("-s", "--size", type=int, default=128, help="S: Cartesian input size and polar image size (128)")
    add_budget_arguments(p, features=16, batch_size=8, epochs=10, iters=50, folds=2,
                         helps={"folds": "cardiac: per-patient folds, 2 (kvasir: the paper's split)"})
    p.add_argument("--limit", type=int, default=None, help="kvasir: first N images only (smoke runs)")
    p.add_argument("--centre_loss", choices=("focal", "mse"), default="focal",
                   help="loss of the centre-point model (focal: CenterNet's; mse: before 0.7)")
    p.add_argument("--redo_predictions", action="store_true",
                   help="predict and score again with the trained models (after a change of the predictor)")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    workdir = args.workdir or Path(f"work_dirs/polar_{args.dataset}")
    results = run_experiment(args.dataset, workdir, args.size, args.features, args.batch_size, args.epochs,
                             args.iters, args.folds, args.seed, args.device, cmd, args.limit, args.redo_predictions,
                             args.centre_loss)
    print_report(results, args.out, lambda png: example_overlays(results, workdir, png, arms=ARMS), report)


if __name__ == "__main__":
    main()
