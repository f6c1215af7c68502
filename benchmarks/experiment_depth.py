"""Experiment: does the depth channel help a 2D network on cardiac CT?

    python -m benchmarks.experiment_depth --workdir work_dirs/depth --out docs/benchmarks/depth_cardiacfat.md

Data: the Cardiac Fat CT dataset in nnU-Net raw format (``../shared/data/nnUNet_raw/
Dataset701_CardiacFatCT``; read in place, nothing is copied), per-patient K-fold cross-validation
(default 2 folds, patients shuffled with ``--seed``; written as nnU-Net's ``splits_final.json``).
Two input settings, each trained with and without the depth channel (four arms, same width,
batch size and schedule):
- ``128``: slices downscaled to 128 x 128 (the published setting; our ``2d_sts_coarse_128``
  configuration; nnU-Net's export resamples the output back to 512 x 512 for scoring);
- ``planned``: nnU-Net's planned 2d configuration (its patch, full resolution), narrowed to the
  same width (a derived configuration ``2d_w<width>`` in the plans).
Without depth: ``nnUNetTrainer_StSCoarse`` (nnU-Net's trainer plus our schedule variables); with
depth: ``nnUNetTrainer_Depth`` (the same plus the channel).
Scoring uses nnU-Net's own fold validation (every patient predicted once, by the model that did not
train on it, at the original resolution): per patient, pericardium (region {1, 2}) DSC, IoU,
precision, recall and EAT DSC, mean +- sd over patients; per-slice EAT pixel counts against the
ground truth over every slice: Pearson r, Bland-Altman bias and 95 % limits, and a Bland-Altman plot.
EAT is scored twice: as the network's label 2, and by the published definition, adipose pixels
inside the predicted pericardium, with an intensity window learned on each fold's training patients
(the images are 8-bit, not Hounsfield units; :func:`adipose_window`). Resumable (re-run the same command).
``--no_val_mirroring`` scores without nnU-Net's mirroring (``STSEG_VAL_MIRRORING=0``): at the planned
512 x 512 patch the 4 mirrored passes per slice cost more CPU time than a short training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nnunet_stseg.atomic import write_atomic, write_json_atomic
from benchmarks.reports import OVERLAP_HEAD, overlap_cells, overlap_means
from benchmarks.runner import (add_budget_arguments, add_narrow, command_line, command_parser, machine_line,
                               per_patient_split, pipeline_env, plan_command_line, plan_unless_planned, raw_dataset,
                               set_batch_size, shared_data, train_fold)
from nnunet_stseg.core.metrics import overlap

DATASET_ID = 701
SETTINGS = ("128", "planned")
ARMS = (("plain", "nnUNetTrainer_StSCoarse"), ("depth", "nnUNetTrainer_Depth"))
PUBLISHED = {"pericardium_dsc": 0.9264, "pericardium_iou": 0.8819, "eat_dsc": 0.8646, "eat_count_r": 0.886}


def _read_array(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _slice_counts(mask: np.ndarray) -> list[int]:
    return mask.reshape(mask.shape[0], -1).sum(1).tolist()


def adipose_window(images: list[np.ndarray], labels: list[np.ndarray]) -> dict:
    """The intensity window [lo, hi] that best turns the TRUE pericardium (labels 1 and 2) into
    the EAT label (2): pooled DSC of {pericardium and lo <= image <= hi} against label 2 over the
    given patients, searched over every pair of integer intensities (the dataset's images are
    uint8). Chosen on a fold's training patients, then applied to its validation predictions: the
    published definition of EAT (adipose inside the predicted pericardium), with a window learned
    from the labels because these images are not in Hounsfield units."""
    inside = np.concatenate([np.rint(im[lab > 0]).astype(np.int64) for im, lab in zip(images, labels)])
    eat = np.concatenate([np.rint(im[lab == 2]).astype(np.int64) for im, lab in zip(images, labels)])
    if inside.size == 0 or eat.size == 0:
        raise ValueError("no pericardium or no EAT (label 2) in the training patients the adipose window is "
                         "chosen on")
    low = int(inside.min())
    n = int(inside.max()) - low + 1
    if n > 4096:
        raise ValueError(f"intensities span {n} integer values inside the pericardium; the exhaustive window search "
                         f"is meant for 8-bit images (at most 4096 values)")
    cum_in = np.concatenate([[0], np.cumsum(np.bincount(inside - low, minlength=n))])
    cum_eat = np.concatenate([[0], np.cumsum(np.bincount(eat - low, minlength=n))])
    lo, hi = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # pairs of bins, hi >= lo kept
    hits = cum_eat[hi + 1] - cum_eat[lo]
    pixels = cum_in[hi + 1] - cum_in[lo] + eat.size  # >= eat.size where hi >= lo
    dice = np.where(hi >= lo, 2 * hits / np.maximum(pixels, 1), -1.0)
    best_lo, best_hi = np.unravel_index(int(np.argmax(dice)), dice.shape)
    return {"window": [int(best_lo) + low, int(best_hi) + low], "train_dice": float(dice[best_lo, best_hi])}


def apply_adipose_window(pericardium: np.ndarray, image: np.ndarray, window: list[int]) -> np.ndarray:
    """EAT by the rule: pericardium pixels whose intensity lies in the window (bounds included)."""
    values = np.rint(image)
    return pericardium & (values >= window[0]) & (values <= window[1])


def case_scores(pred: np.ndarray, gt: np.ndarray, image: np.ndarray | None = None,
                window: list[int] | None = None) -> dict:
    """Pericardium (labels 1 and 2) and EAT (label 2) overlap scores of one patient, and the
    per-slice EAT pixel counts (slice axis first). With the image and an adipose window, also EAT
    by the rule (``eat_rule``: the window inside the predicted pericardium, against label 2) and,
    as its ceiling, the same rule inside the true pericardium (``eat_rule_true_pericardium``)."""
    out = {"pericardium": overlap(pred > 0, gt > 0), "eat": overlap(pred == 2, gt == 2),
           "eat_counts": {"pred": _slice_counts(pred == 2), "gt": _slice_counts(gt == 2)}}
    if image is not None and window is not None:
        rule = apply_adipose_window(pred > 0, image, window)
        out["eat_rule"] = overlap(rule, gt == 2)
        out["eat_rule_true_pericardium"] = overlap(apply_adipose_window(gt > 0, image, window), gt == 2)
        out["eat_rule_counts"] = {"pred": _slice_counts(rule), "gt": out["eat_counts"]["gt"]}
    return out


def _count_agreement(cases: dict, counts_key: str) -> dict:
    """Per-slice pixel counts over every slice of every patient: Pearson r, Bland-Altman bias and
    95 % limits of agreement (prediction - truth)."""
    pred = np.concatenate([c[counts_key]["pred"] for c in cases.values()]).astype(float)
    gt = np.concatenate([c[counts_key]["gt"] for c in cases.values()]).astype(float)
    diff = pred - gt
    prefix = counts_key[:-len("_counts")]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = float(np.corrcoef(pred, gt)[0, 1]) if len(diff) > 1 else float("nan")
    return {f"{prefix}_count_pearson_r": r, f"{prefix}_count_bias": float(diff.mean()),
            f"{prefix}_count_loa": (float(diff.mean() - 1.96 * diff.std(ddof=1)),
                                    float(diff.mean() + 1.96 * diff.std(ddof=1)))}


def score_arm(validation_folders: list[Path], labels_folder: Path, images_folder: Path | None = None,
              windows: list[list[int]] | None = None) -> dict:
    """Scores of one arm over the validation predictions of all folds; ``windows[f]`` is fold f's
    adipose window; given windows, EAT is also scored by the rule on the images of ``images_folder``."""
    cases = {}
    for f, folder in enumerate(validation_folders):
        for p in sorted(folder.glob("*.nii.gz")):
            case = p.name[:-len(".nii.gz")]
            image = _read_array(images_folder / f"{case}_0000.nii.gz") if windows is not None else None
            cases[case] = case_scores(_read_array(p), _read_array(labels_folder / p.name), image,
                                      windows[f] if windows is not None else None)
    regions = ["pericardium", "eat"] + (["eat_rule", "eat_rule_true_pericardium"] if windows is not None else [])
    summary = {"n_patients": len(cases), "cases": cases,
               "n_slices": int(sum(len(c["eat_counts"]["gt"]) for c in cases.values()))}
    for region in regions:
        summary.update(overlap_means(region, [c[region] for c in cases.values()]))
    summary.update(_count_agreement(cases, "eat_counts"))
    if windows is not None:
        summary.update(_count_agreement(cases, "eat_rule_counts"))
    return summary


def adipose_windows(split: list[dict], images_folder: Path, labels_folder: Path) -> list[dict]:
    """Each fold's adipose window, chosen on its training patients only (ValueError when a fold's
    training patients have no EAT)."""
    return [adipose_window([_read_array(images_folder / f"{c}_0000.nii.gz") for c in fold["train"]],
                           [_read_array(labels_folder / f"{c}.nii.gz") for c in fold["train"]]) for fold in split]


def run_experiment(workdir: Path, features: int, batch_size: int, epochs: int, iters: int, folds: int, seed: int,
                   settings: tuple[str, ...] = SETTINGS, device: str = "cpu", raw: Path | None = None,
                   command: str = "", val_mirroring: bool = True) -> dict:
    workdir = Path(workdir).resolve()
    raw = Path(raw) if raw else shared_data() / "nnUNet_raw"
    ds_raw = raw_dataset(raw, DATASET_ID)
    if ds_raw is None:
        raise SystemExit(f"Cardiac Fat CT dataset (Dataset{DATASET_ID}_*) not found under {raw}; pass --raw")
    env = pipeline_env(workdir, epochs, iters)
    env["nnUNet_raw"] = str(raw)  # read in place
    env["STSEG_VAL_MIRRORING"] = "1" if val_mirroring else "0"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pp = Path(env["nnUNet_preprocessed"]) / ds_raw.name
    plans_file = pp / "nnUNetPlans.json"
    plan_unless_planned(plans_file, "2d_sts_coarse_128", plan_command_line(DATASET_ID, 128, ("2d",), features), env,
                        logs / "plan.log")
    narrow = add_narrow(plans_file, features)
    case_ids = sorted(p.name[:-len(".nii.gz")] for p in (ds_raw / "labelsTr").glob("*.nii.gz"))
    split = per_patient_split(case_ids, folds, seed)
    write_json_atomic(split, pp / "splits_final.json", indent=1)
    config_of = {"128": "2d_sts_coarse_128", "planned": narrow}
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["split"] = {"folds": folds, "seed": seed, "n_patients": len(case_ids)}
    results.setdefault("arms", {})
    try:
        results["adipose_windows"] = adipose_windows(split, ds_raw / "imagesTr", ds_raw / "labelsTr")
        windows = [w["window"] for w in results["adipose_windows"]]
        results.pop("adipose_rule_skipped", None)
    except ValueError as e:  # e.g. a fold whose training patients have no EAT: label 2 is still scored
        results["adipose_windows"], windows = None, None
        results["adipose_rule_skipped"] = str(e)
    for setting in settings:
        config = config_of[setting]
        cfg = set_batch_size(plans_file, config, batch_size)
        budget = {"features": int(cfg["architecture"]["arch_kwargs"]["features_per_stage"][0]),
                  "batch_size": int(batch_size), "patch": list(cfg["patch_size"]), "epochs": epochs, "iters": iters,
                  "device": device, "val_mirroring": bool(val_mirroring)}
        for arm, trainer in ARMS:
            key = f"{setting}/{arm}"
            model = Path(env["nnUNet_results"]) / ds_raw.name / f"{trainer}__nnUNetPlans__{config}"
            # written after every fold, so an interrupted run keeps the seconds of the folds it finished
            seconds = results.setdefault("train_s", {}).setdefault(
                key, dict(results["arms"].get(key, {}).get("train_s", {})))
            for f in range(folds):  # the arm is scored on nnU-Net's validation of each fold
                t = train_fold(ds_raw.name, config, f, trainer, device, env, logs / f"train_{setting}_{arm}_{f}.log",
                               need_validation=True)
                if t is not None:  # a resumed fold (--c, --val) adds its seconds to the earlier run's
                    seconds[str(f)] = seconds.get(str(f), 0.0) + t
                    write_json_atomic(results, results_file, indent=1)
            scores = score_arm([model / f"fold_{f}" / "validation" for f in range(folds)], ds_raw / "labelsTr",
                               ds_raw / "imagesTr", windows)
            results["arms"][key] = {"configuration": config, "trainer": trainer, "budget": budget, "command": command,
                                    "train_s": seconds, **scores}
            write_json_atomic(results, results_file, indent=1)
    return results


def _pearson_cell(arm: dict, region: str = "eat") -> str:
    """Pearson r of the per-slice EAT counts; undefined when an arm predicts no EAT at all."""
    r = arm[f"{region}_count_pearson_r"]
    if np.isfinite(r):
        return f"{r:.3f}"
    no_eat = not any(sum(c[f"{region}_counts"]["pred"]) for c in arm["cases"].values())
    return "undefined (no EAT predicted)" if no_eat else "undefined (constant counts)"


def _mean_sd(arm: dict, key: str) -> str:
    return f"{arm[key][0]:.3f} ± {arm[key][1]:.3f}"


def _setting_cells(key: str, arm: dict) -> str:
    setting, name = key.split("/")
    size = "128 x 128" if setting == "128" else f"planned 2d ({arm['configuration']})"
    return f"{size} | {'yes' if name == 'depth' else 'no'}"


def report(results: dict, cmd: str) -> str:
    split = results.get("split") or results["budget"]
    lines = ["# Depth channel on Cardiac Fat CT (2D networks on 3D scans)", "",
             "Commands (each adds its rows; the last one printed this file):  ",
             *[f"`{c}`  " for c in dict.fromkeys(r.get("command") or cmd for r in results["arms"].values())],
             f"Machine: {machine_line()}  ",
             f"{split['folds']}-fold per-patient cross-validation of {split['n_patients']} patients (split seed "
             f"{split['seed']}); every patient scored once, by the fold model that did not train on it, at 512 x 512 "
             f"(mean ± sd over patients). With and without depth share the budget of their row group (U-Net base "
             f"width, batch, epochs x iterations per fold). EAT here = label 2 as predicted by the network; the "
             f"published definition (adipose inside the predicted pericardium) is the second table.", "",
             f"| input | depth | budget | pericardium {OVERLAP_HEAD} | EAT DSC | EAT count r | "
             "EAT bias px/slice (95 % LoA) | train s (all folds) |",
             "|---" * 12 + "|"]
    for key, r in results["arms"].items():
        b = r.get("budget") or results["budget"]
        budget = (f"width {b['features']}, batch {b['batch_size']}, {b['epochs']} x {b['iters']}, "
                  f"{b.get('device', 'cpu')}" + ("" if b.get("val_mirroring", True) else ", scored without mirroring"))
        cells = overlap_cells(r, "pericardium")
        lo, hi = r["eat_count_loa"]
        lines.append(f"| {_setting_cells(key, r)} | {budget} | {cells} | {_mean_sd(r, 'eat_Dice')} | "
                     f"{_pearson_cell(r)} | {r['eat_count_bias']:.0f} ({lo:.0f}, {hi:.0f}) | "
                     f"{sum(r['train_s'].values()):.0f} |")
    lines.append(f"| 128 x 128 (published, other split) | yes | full training | {PUBLISHED['pericardium_dsc']:.3f} | "
                 f"{PUBLISHED['pericardium_iou']:.3f} | | | | {PUBLISHED['eat_dsc']:.3f} | {PUBLISHED['eat_count_r']:.3f} "
                 f"| | |")
    windows = results.get("adipose_windows")
    ruled = {k: r for k, r in results["arms"].items() if "eat_rule_Dice" in r}
    if results.get("adipose_rule_skipped"):
        lines += ["", "EAT as adipose inside the predicted pericardium: not scored "
                      f"({results['adipose_rule_skipped']})."]
    elif windows and ruled:
        lines += ["", "## EAT as adipose inside the predicted pericardium (the published definition)", "",
                  "These images are 8-bit, not Hounsfield units, so the adipose intensity window is learned: for "
                  "each fold, the window [lo, hi] whose pixels inside the TRUE pericardium best match label 2 on "
                  "the fold's training patients (pooled DSC); it is applied inside each validation patient's "
                  "predicted pericardium and scored against label 2. Windows: "
                  + "; ".join(f"fold {f} [{w['window'][0]}, {w['window'][1]}] (training DSC {w['train_dice']:.3f})"
                              for f, w in enumerate(windows))
                  + ". The last column is the rule's ceiling: the same window inside the true pericardium of the "
                  "validation patients.", "",
                  f"| input | depth | EAT {OVERLAP_HEAD} | EAT count r | "
                  "EAT bias px/slice (95 % LoA) | EAT DSC, true pericardium |",
                  "|---" * 10 + "|"]
        for key, r in ruled.items():
            lo, hi = r["eat_rule_count_loa"]
            cells = overlap_cells(r, "eat_rule")
            lines.append(f"| {_setting_cells(key, r)} | {cells} | {_pearson_cell(r, 'eat_rule')} | "
                         f"{r['eat_rule_count_bias']:.0f} ({lo:.0f}, {hi:.0f}) | "
                         f"{_mean_sd(r, 'eat_rule_true_pericardium_Dice')} |")
        lines.append(f"| 128 x 128 (published, other split) | yes | {PUBLISHED['eat_dsc']:.3f} | | | | | "
                     f"{PUBLISHED['eat_count_r']:.3f} | | |")
    return "\n".join(lines) + "\n"


def bland_altman_plot(results: dict, path: Path) -> None:
    """Per-slice EAT pixel counts: Bland-Altman (difference vs mean) for every arm; one row for
    EAT as the network's label 2 and, where scored, one for EAT by the adipose rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"].items())
    rows = [("eat", "label 2")] + ([("eat_rule", "adipose rule")] if all("eat_rule_Dice" in r for _, r in arms) else [])
    fig, axes = plt.subplots(len(rows), len(arms), figsize=(4.2 * len(arms), 3.8 * len(rows)), sharey="row",
                             squeeze=False)
    for (region, title), row in zip(rows, axes):
        for ax, (key, r) in zip(row, arms):
            pred = np.concatenate([c[f"{region}_counts"]["pred"] for c in r["cases"].values()]).astype(float)
            gt = np.concatenate([c[f"{region}_counts"]["gt"] for c in r["cases"].values()]).astype(float)
            mean, diff = (pred + gt) / 2, pred - gt
            ax.scatter(mean, diff, s=4, alpha=0.4)
            bias, (lo, hi) = r[f"{region}_count_bias"], r[f"{region}_count_loa"]
            for y, style in ((bias, "-"), (lo, "--"), (hi, "--")):
                ax.axhline(y, color="k", linestyle=style, linewidth=0.8)
            ax.set_title(f"{key}, EAT = {title}\nbias {bias:.0f} px/slice\nr {_pearson_cell(r, region)}", fontsize=10)
            ax.set(xlabel="mean of predicted and true EAT pixels per slice")
            ax.grid(alpha=0.3)
        row[0].set_ylabel("predicted - true EAT pixels per slice")
    fig.tight_layout()
    write_atomic(path, figure=fig, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = command_parser("experiment_depth", __doc__)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/depth"))
    p.add_argument("--raw", type=Path, default=None, help="nnU-Net raw folder holding Dataset701 "
                                                          "(default ../shared/data/nnUNet_raw)")
    add_budget_arguments(p, features=16, batch_size=8, epochs=10, iters=50, folds=2)
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--no_val_mirroring", action="store_true",
                   help="score with nnU-Net's validation without mirroring (STSEG_VAL_MIRRORING=0)")
    p.add_argument("--out", type=Path, default=None, help="markdown report (a Bland-Altman PNG is written beside it)")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    results = run_experiment(args.workdir, args.features, args.batch_size, args.epochs, args.iters, args.folds,
                             args.seed, tuple(args.settings), args.device, args.raw, cmd,
                             val_mirroring=not args.no_val_mirroring)
    text = report(results, cmd)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        png = args.out.with_name(args.out.stem + "_bland_altman.png")
        bland_altman_plot(results, png)
        text += f"\n![Bland-Altman of per-slice EAT pixel counts]({png.name})\n"
        write_atomic(args.out, text)


if __name__ == "__main__":
    main()
