"""Experiment: learning from object sizes on the paper's own data (hippocampus slices), each phase
trained to its validation plateau (the protocol of seed 004, section 4.2, Fig. 6 and 7).

    python -m benchmarks.experiment_hippocampus --workdir work_dirs/sizes_hippocampus \\
        --out docs/benchmarks/sizes_hippocampus.md

Data: ``python -m benchmarks.hippocampus`` (48 x 32 slices, >= 1 % foreground, labels merged,
seeded 70/10/20 split BY VOLUME; its docstring says what differs from the paper). Per seed, m
training slices keep their pixel labels (a seeded draw, nested: m = 16 lies within m = 32), every
other training slice keeps only its size (``simulate_size_labels``; every training slice's size is
in ``object_sizes.json``, so phase 2 runs over the whole training set, as in the paper). The
validation slices keep their labels: the plateau rule and Fig. 6 are measured on them.

Per seed and m, all with the stock ``nnUNetv2_train -tr nnUNetTrainer_StSSizes`` on one nnU-Net
``2d`` plan shared by every m (planned once on the source dataset, same network and batch):
- (a) phase 1: pixel loss on the m slices until the validation loss has not improved for
  ``--patience`` epochs (``STSEG_PATIENCE``; at most ``--epochs_pre``); its best epoch
  (checkpoint_best.pth) is "pre-trained only" and the start of both phase-2 arms;
- (b) the paper's phase 2: the size loss alone (pixel weight 0, weight ``--paper_weight``), no
  augmentation of the size images, logistic noise, one sample, until the validation size error E
  has not improved for ``--patience_sizes`` epochs (at most ``--epochs``);
- (c) our default (``SizeParams``): pixel loss on the m slices + size loss, weight 0.1, same rule.
Both phase-2 arms continue phase 1's whole network (the size trainer loads the segmentation layers
nnU-Net's ``-pretrained_weights`` leaves random) and fine-tune at ``--phase2_lr`` (default 0.001,
nnU-Net's SGD and poly schedule); the first runs, at nnU-Net's 0.01 and with the random output
layer (m = 16, seed 0), are kept as their own arms (``paper_lr0.01``, ``ours_lr0.01``).
Test slices are predicted from each arm's checkpoint_best.pth (``nnUNetv2_predict --disable_tta``);
the arms of one (seed, m) share their phase-1 weights, so (b) - (a) and (c) - (a) are paired.
``--report_only`` rebuilds the report and plots from ``results.json``; an interrupted run
continues where it stopped (finished trainings and predictions are kept, a training in progress
continues with ``--c``). The defaults are a CPU budget; GPU users pass e.g. ``--features 32
--batch_size 64 --iters 250 --val_iters 50 -device cuda``.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks.experiment_sizes import TRAINER, epoch_seconds, score
from benchmarks.hippocampus import DATASET_ID, SOURCE_ID, convert_hippocampus
from benchmarks.runner import (add_budget_arguments, add_narrow, command_line, command_parser, find_command,
                               install_splits, pipeline_env, predict_command_line, publish_report, raw_dataset,
                               report_header, results_or_run, run, run_measured, set_batch_size, shared_data,
                               train_fold)
from nnunet_stseg.atomic import write_atomic, write_json_atomic

M_VALUES = ("16", "32", "64", "128", "256", "512", "all")
ARMS = {"pre": "(a) pre-trained only", "paper": "(b) size loss alone (paper)", "ours": "(c) pixel + size, weight 0.1"}
DEFAULT_PHASE2_LR = 1e-3
NNUNET_LR = 1e-2


def arm_key(arm: str, lr: float) -> str:
    """The results key (and configuration suffix) of a phase-2 arm at this learning rate: ``paper``
    at the default rate, ``paper_lr0.01`` at another.

    >>> arm_key("paper", 1e-3), arm_key("ours", 1e-2)
    ('paper', 'ours_lr0.01')
    """
    return arm if lr == DEFAULT_PHASE2_LR else f"{arm}_lr{lr:g}"


def arm_label(key: str) -> str:
    """'(b) size loss alone (paper)' plus the phase-2 learning rate where it is not the default."""
    arm, _, lr = key.partition("_lr")
    return ARMS[arm] + (f", phase-2 lr {lr}" + (", output layer re-initialised" if float(lr) == NNUNET_LR else "")
                        if lr else "")
PAPER_TEXT = ("about +5 % IoU from the size labels when m < 100, negligible for larger m (section 4.2; the text "
              "copy of the paper in ../shared/seeds has no readable Fig. 7, so no per-m values are quoted)")


def arm_blocks(paper_weight: float, size_weight: float, lr: float = DEFAULT_PHASE2_LR) -> dict[str, dict]:
    """The ``sts.sizes`` block of each arm's configuration, by results key (phase 2 at ``lr``)."""
    return {"pre": {"size_weight": 0.0},
            arm_key("paper", lr): {"pretrain_epochs": 0, "size_weight": paper_weight, "pixel_weight": 0.0,
                                   "mirror": False, "initial_lr": lr},
            arm_key("ours", lr): {"pretrain_epochs": 0, "size_weight": size_weight, "initial_lr": lr}}


def config_suffix(key: str) -> str:
    """Configuration suffix of an arm: its key, with the rate always spelled out for phase 2 (the
    runs at nnU-Net's rate predate the default and are kept under ``_lr0.01``)."""
    return key if key == "pre" or "_lr" in key else f"{key}_lr{DEFAULT_PHASE2_LR:g}"


def plan_source(source: Path, env: dict, features: int, batch_size: int, log: Path) -> dict:
    """nnU-Net's ``2d`` plan of the fully labelled slice dataset with the experiment's width and
    batch (``<2d>_w<features>``): the one plan every m trains with."""
    plans_file = Path(env["nnUNet_preprocessed"]) / source.name / "nnUNetPlans.json"
    if not plans_file.is_file():
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # nnU-Net's planner needs >= 1
        run([find_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "2",
             "--no_pp"], plan_env, log)
    base = add_narrow(plans_file, features)
    set_batch_size(plans_file, base, batch_size)
    plans = json.loads(plans_file.read_text())
    return {"plans": plans, "base": base}


def prepare(source: Path, split: dict, pixel_cases: list[str], dataset_id: int, tag: str, source_plans: dict,
            blocks: dict[str, dict], env: dict, log: Path) -> tuple[str, dict[str, str]]:
    """The size-labelled copy of the slice dataset for one (seed, m), with the source's plan and
    one configuration per arm, preprocessed by the stock ``nnUNetv2_preprocess``."""
    from nnunet_stseg.adapters.config import SIZES_KEY, with_block
    from nnunet_stseg.adapters.size_labels import simulate_size_labels

    raw, pp_root = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    name = f"Dataset{dataset_id:03d}_HippocampusSizes{tag}"
    base = source_plans["base"]
    done = pp_root / name / ".preprocessed"
    configs = {key: f"{base}_{config_suffix(key)}" for key in blocks}
    if not done.is_file():
        shutil.rmtree(pp_root / name, ignore_errors=True)
        simulate_size_labels(source, raw, dataset_id, pixel_cases + split["val"], cases=split["train"] + split["val"],
                             name=name.split("_", 1)[1])
        plans = copy.deepcopy(source_plans["plans"])
        plans["dataset_name"] = name
        (pp_root / name).mkdir(parents=True, exist_ok=True)
        write_json_atomic(plans, pp_root / name / "nnUNetPlans.json", indent=1)
        shutil.copy(raw / name / "dataset.json", pp_root / name / "dataset.json")
        # the same images: the source's fingerprint (nnU-Net's trainer copies it into the results)
        shutil.copy(pp_root / source.name / "dataset_fingerprint.json", pp_root / name / "dataset_fingerprint.json")
        run([find_command("nnUNetv2_preprocess"), "-d", str(dataset_id), "-c", base, "-np", "2"], env, log)
        install_splits([split], pp_root / name)
        done.write_text("ok\n")
    plans_file = pp_root / name / "nnUNetPlans.json"  # the arms' configurations, added where missing
    plans = json.loads(plans_file.read_text())
    missing = {key: c for key, c in configs.items() if c not in plans["configurations"]}
    for key, c in missing.items():
        plans["configurations"][c] = with_block(copy.deepcopy(plans["configurations"][base]), SIZES_KEY, blocks[key])
    if missing:
        write_json_atomic(plans, plans_file, indent=1)
    return name, configs


def training_curves(fold_dir: Path) -> dict:
    """Per epoch: nnU-Net's validation loss and pseudo-IoU (from its pseudo-Dice D, IoU = D / (2 - D),
    exact for its pooled counts) from the last checkpoint's log, and the validation size error E
    from ``size_training.json``."""
    import torch

    out: dict = {}
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if (fold_dir / name).is_file():
            logging = torch.load(fold_dir / name, map_location="cpu", weights_only=False)["logging"]
            out["val_loss"] = [float(v) for v in logging["val_losses"]]
            out["val_iou"] = [float(d) / (2 - float(d)) for d in logging["mean_fg_dice"]]
            break
    path = fold_dir / "size_training.json"
    records = sorted(json.loads(path.read_text()), key=lambda r: r["epoch"]) if path.is_file() else []
    out["val_size_error"] = [r.get("val_size_error_px2") for r in records]
    return out


def run_arm(name: str, config: str, env: dict, device: str, workdir: Path, key: str, arm: str, split: dict,
            pretrained: Path | None) -> tuple[dict, Path]:
    """Train one arm unless finished, predict the test slices from its best epoch, score them."""
    from nnunet_stseg.adapters.results import model_folder

    fold_dir = model_folder(name, TRAINER, config, results_root=env["nnUNet_results"]) / "fold_0"
    log = workdir / "logs" / f"{key}_{arm}"
    seconds = train_fold(name, config, 0, TRAINER, device, env, Path(f"{log}_train.log"),
                         start_flags=("-pretrained_weights", str(pretrained)) if pretrained else ())
    if seconds is not None:
        write_json_atomic({"seconds": seconds}, fold_dir / "train_seconds.json")
    out = workdir / "predictions" / f"{key}_{arm}"
    if not (out / "summary_test.json").is_file():
        run_measured(predict_command_line(split["images"], out, name, config, TRAINER, [0], device, "--disable_tta",
                                          "-chk", "checkpoint_best.pth", "-npp", "1", "-nps", "1"), env,
                     Path(f"{log}_predict.log"))
    r = score(out, split["labels"], {"labels": {"background": 0, "hippocampus": 1}, "file_ending": ".png"})
    curves = training_curves(fold_dir)
    r.update(epoch_s=epoch_seconds(fold_dir), curves=curves, epochs=len(curves.get("val_loss", [])))
    train_s = fold_dir / "train_seconds.json"
    r["train_s"] = json.loads(train_s.read_text())["seconds"] if train_s.is_file() else None
    return r, fold_dir


def run_experiment(workdir: Path, m_values: list[str], seeds: list[int], split_seed: int, features: int,
                   batch_size: int, epochs_pre: int, epochs: int, iters: int, val_iters: int, patience: int,
                   patience_sizes: int, paper_weight: float, size_weight: float, device: str,
                   src: Path | None, phase2_lr: float = DEFAULT_PHASE2_LR, command: str = "") -> dict:
    workdir = Path(workdir).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    # checkpoint_latest every 5 epochs: an interrupted run loses little (the held-out slices are predicted below)
    common = {"STSEG_SKIP_VALIDATION": "1", "STSEG_SAVE_EVERY": "5"}
    env_pre = {**pipeline_env(workdir, epochs_pre, iters, val_iters), "STSEG_PATIENCE": str(patience), **common}
    env_sizes = {**pipeline_env(workdir, epochs, iters, val_iters), "STSEG_PATIENCE": str(patience_sizes), **common}
    raw = Path(env_pre["nnUNet_raw"])
    raw.mkdir(parents=True, exist_ok=True)
    src = src or raw_dataset(shared_data() / "nnUNet_raw", SOURCE_ID)
    if src is None:
        raise SystemExit(f"Dataset{SOURCE_ID}_Hippocampus not found under {shared_data() / 'nnUNet_raw'}; pass --src")
    source = convert_hippocampus(src, raw, DATASET_ID, seed=split_seed)
    split = json.loads((source / "stseg_split.json").read_text())
    split.update(images=source / "imagesTs", labels=source / "labelsTs")
    source_plans = plan_source(source, env_pre, features, batch_size, workdir / "logs" / "plan.log")
    blocks = arm_blocks(paper_weight, size_weight, phase2_lr)
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update(budget={"features": features, "batch_size": batch_size, "epochs_pre": epochs_pre, "epochs": epochs,
                           "iters": iters, "val_iters": val_iters, "patience": patience,
                           "patience_sizes": patience_sizes, "paper_weight": paper_weight, "size_weight": size_weight,
                           "phase2_lr": DEFAULT_PHASE2_LR, "device": device, "split_seed": split_seed,
                           "seeds": sorted(set(results.get("budget", {}).get("seeds", [])) | set(seeds)),
                           "m_values": list(m_values)},
                   command=command or results.get("command", ""),
                   data={"train": len(split["train"]), "val": len(split["val"]), "test": len(split["test"]),
                         "volumes": {k: len(v) for k, v in split["volumes"].items()}})
    results.setdefault("runs", {})
    draws = {seed: np.random.default_rng(1000 + seed).permutation(sorted(split["train"])).tolist() for seed in seeds}
    for m in m_values:  # every seed of a small m first: the paper's claim is about m < 100
        for seed in seeds:
            draw = draws[seed]
            key = f"seed{seed}_m{m}"
            pixel_cases = sorted(draw if m == "all" else draw[:int(m)])
            dataset_id = DATASET_ID + 1 + seed * len(M_VALUES) + M_VALUES.index(m)
            name, configs = prepare(source, split, pixel_cases, dataset_id, f"S{seed}M{m}", source_plans, blocks,
                                    env_pre, workdir / "logs" / f"{key}_prepare.log")
            row = results["runs"].get(key, {})
            row.update(seed=seed, m=len(pixel_cases), dataset=name)
            row["pre"], pre_dir = run_arm(name, configs["pre"], env_pre, device, workdir, key, "pre", split, None)
            for arm in (arm_key("paper", phase2_lr), arm_key("ours", phase2_lr)):
                row[arm], _ = run_arm(name, configs[arm], env_sizes, device, workdir, key, arm, split,
                                      pre_dir / "checkpoint_best.pth")
            results["runs"][key] = row
            write_json_atomic(results, results_file, indent=1)
    return results


# ------------------------------------------------------------------ report
def _by_m(results: dict, arm: str) -> dict[int, dict[int, float]]:
    """{m: {seed: test IoU %}} of one arm."""
    out: dict = {}
    for row in results["runs"].values():
        if arm in row:
            out.setdefault(row["m"], {})[row["seed"]] = row[arm]["IoU"][0]
    return out


def paired(results: dict, arm: str) -> dict[int, list[float]]:
    """{m: [test IoU points of ``arm`` minus pre-trained only, per seed]}."""
    out: dict = {}
    for row in results["runs"].values():
        if arm in row and "pre" in row:
            out.setdefault(row["m"], []).append(row[arm]["IoU"][0] - row["pre"]["IoU"][0])
    return out


def arm_keys(results: dict) -> list[str]:
    """The arms the results hold: pre-trained only, the phase-2 arms at the default rate, then any at
    another rate (e.g. nnU-Net's 0.01)."""
    present = {k for row in results["runs"].values() for k in row if k.split("_lr")[0] in ARMS}
    return sorted(present, key=lambda k: (list(ARMS).index(k.split("_lr")[0]) if "_lr" not in k else 10, k))


def phase2_keys(results: dict) -> list[str]:
    return [k for k in arm_keys(results) if k != "pre"]


def report(results: dict, cmd: str, plot_names: tuple[str, str] | None) -> str:
    b, d = results["budget"], results["data"]
    lines = [*report_header("Learning from object sizes on hippocampus slices (the paper's data), trained to "
                            "validation plateaus", cmd),
             f"Data: {d['train']} / {d['val']} / {d['test']} training / validation / test slices of 48 x 32 from "
             f"{d['volumes']['train']} / {d['volumes']['val']} / {d['volumes']['test']} volumes (split by volume, "
             f"seed {b['split_seed']}; `python -m benchmarks.hippocampus`). Budget: nnU-Net's 2d plan with width "
             f"{b['features']}, batch {b['batch_size']} (+ as many size images per step in phase 2), epochs of "
             f"{b['iters']} iterations with {b['val_iters']} validation batches; phase 1 until the validation loss "
             f"has not improved for {b['patience']} epochs (at most {b['epochs_pre']}), phase 2 until the validation "
             f"size error E has not improved for {b['patience_sizes']} epochs (at most {b['epochs']}) from an initial "
             f"learning rate of {b.get('phase2_lr', NNUNET_LR):g} (nnU-Net's SGD and poly schedule; nnU-Net's own "
             f"{NNUNET_LR:g} where an arm says so); every arm "
             f"predicted from its best epoch (checkpoint_best.pth, `--disable_tta`); device {b['device']}; seeds "
             f"{', '.join(map(str, b['seeds']))} (each seed: its own draw of the m slices and its own phase-1 "
             f"training). IoU: mean over test slices (the paper's eq. 23 per image). E: squared size error, pixels².",
             "", "| m | seed | arm | IoU % | DSC % | E px² | empty | epochs | epoch s (phase 1 / 2) | train s |",
             "|---" * 10 + "|"]
    for key, row in sorted(results["runs"].items(), key=lambda kv: (kv[1]["m"], kv[1]["seed"])):
        for arm in arm_keys(results):
            if arm not in row:
                continue
            label, r = arm_label(arm), row[arm]
            ep = r.get("epoch_s", {})
            epoch = " / ".join(f"{ep[p]:.1f}" for p in ("phase1", "phase2") if p in ep) or "n/a"
            train_s = f"{r['train_s']:.0f}" if r.get("train_s") is not None else "n/a"
            lines.append(f"| {row['m']} | {row['seed']} | {label} | {r['IoU'][0]:.1f} ± {r['IoU'][1]:.1f} | "
                         f"{r['Dice'][0]:.1f} | {r['size_error_px2'][0]:.1f} | {r.get('empty_predictions', 'n/a')} | "
                         f"{r.get('epochs', 'n/a')} | {epoch} | {train_s} |")
    planned = len(b.get("m_values", [])) * len(b["seeds"])
    done = sum(all(k in row for k in ARMS) for row in results["runs"].values())
    if planned and done < planned:
        lines += ["", f"**Runs so far: {done} of {planned} (seed, m) pairs finished**; the command above continues "
                      "the experiment where it stopped (finished trainings and predictions are kept)."]
    lines += ["", "Paired test IoU differences against (a), same phase-1 weights, per seed (points):"]
    for arm in phase2_keys(results):
        for m, gains in sorted(paired(results, arm).items()):
            lines.append(f"- {arm_label(arm)}, m = {m}: {', '.join(f'{g:+.1f}' for g in gains)}"
                         + (f" (mean {np.mean(gains):+.1f})" if len(gains) > 1 else ""))
    ratios = [row[arm]["epoch_s"]["phase2"] / row["pre"]["epoch_s"]["phase1"] for row in results["runs"].values()
              for arm in phase2_keys(results) if arm in row and "phase2" in row[arm].get("epoch_s", {})
              and "phase1" in row["pre"].get("epoch_s", {})]
    if ratios:
        lines.append(f"- epoch time of phase 2 / a supervised epoch (same iterations; phase 2 adds a size batch): "
                     f"{np.mean(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); the paper: about 10x "
                     f"(its epochs: passes over different sets). Wall times, with whatever else shared the "
                     f"2-core machine during each run (the first phase-2 runs overlapped test runs); "
                     f"`python -m benchmarks.benchmark --size_loss` measures the step ratio alone")
    lines.append(f"- published: {PAPER_TEXT}")
    if plot_names:
        lines += ["", f"![test IoU against m]({plot_names[0]})", "",
                  f"![validation E and IoU per phase-2 epoch]({plot_names[1]})"]
    return "\n".join(lines) + "\n"


def plots(results: dict, iou_path: Path, curves_path: Path, curve_m: int) -> None:
    """Test IoU against m per arm (the paper's Fig. 7), and the validation E and pseudo-IoU per
    phase-2 epoch of the first seed at ``curve_m`` (else the smallest m run; the paper's Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = results["budget"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm, style in zip(arm_keys(results), ("o-", "s-", "^-", "s--", "^--", "x:")):
        by_m = _by_m(results, arm)
        ms = sorted(by_m)
        if ms:
            ax.plot(ms, [np.mean(list(by_m[m].values())) for m in ms], style, label=arm_label(arm))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (pixel-labelled training slices)")
    ax.set_ylabel("test IoU % (mean over seeds)")
    ax.set_title(f"hippocampus 48x32, width {b['features']}, plateau rule, {b['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(iou_path, figure=fig)
    plt.close(fig)

    rows = [r for r in results["runs"].values() if r["m"] == curve_m] or list(results["runs"].values())
    row = min(rows, key=lambda r: (r["m"], r["seed"])) if rows else None
    fig, (ax_e, ax_i) = plt.subplots(1, 2, figsize=(9, 3.4))
    if row is not None:
        for arm, style in zip(phase2_keys(results), ("s-", "^-", "s--", "^--", "x:")):
            curves = row.get(arm, {}).get("curves", {})
            e = [np.nan if v is None else v for v in curves.get("val_size_error", [])]
            ax_e.plot(range(len(e)), e, style, ms=3, label=arm_label(arm))
            ax_i.plot(range(len(curves.get("val_iou", []))), [100 * v for v in curves.get("val_iou", [])], style,
                      ms=3, label=arm_label(arm))
        pre = row.get("pre", {}).get("curves", {})
        best = int(np.nanargmin(pre["val_loss"])) if pre.get("val_loss") else None
        if best is not None and best < len(pre.get("val_size_error", [])):  # where phase 2 starts from
            ax_e.axhline(pre["val_size_error"][best], color="k", ls=":", lw=1, label="(a) at its best epoch")
            ax_i.axhline(100 * pre["val_iou"][best], color="k", ls=":", lw=1)
        fig.suptitle(f"validation during phase 2, m = {row['m']}, seed {row['seed']}", fontsize=9)
    ax_e.set_xlabel("phase-2 epoch")
    ax_e.set_ylabel("validation E (px²)")
    ax_i.set_xlabel("phase-2 epoch")
    ax_i.set_ylabel("validation pseudo-IoU %")
    ax_e.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(curves_path, figure=fig)
    plt.close(fig)


def main(argv=None) -> None:
    p = command_parser("experiment_hippocampus", __doc__)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/sizes_hippocampus"), help="work folder")
    p.add_argument("--pixel_labels", nargs="+", default=list(M_VALUES), choices=M_VALUES,
                   help="m values ('all' = every training slice) (16 ... 512 all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one phase-1 training per seed and m (0 1)")
    add_budget_arguments(p, features=16, batch_size=32, epochs=100, iters=50,
                         helps={"epochs": "most epochs of a phase-2 arm"})
    p.add_argument("--epochs_pre", type=int, default=300, help="most epochs of phase 1 (300)")
    p.add_argument("--val_iters", type=int, default=20, help="validation batches per epoch (20)")
    p.add_argument("--patience", type=int, default=15, help="phase-1 epochs without a better validation loss (15)")
    p.add_argument("--patience_sizes", type=int, default=10,
                   help="phase-2 epochs without a better validation size error E (10)")
    p.add_argument("--paper_weight", type=float, default=1.0, help="size-loss weight of arm (b) (1)")
    p.add_argument("--size_weight", type=float, default=0.1, help="size-loss weight of arm (c) (0.1)")
    p.add_argument("--phase2_lr", type=float, default=DEFAULT_PHASE2_LR,
                   help=f"initial learning rate of the phase-2 arms ({DEFAULT_PHASE2_LR:g}; nnU-Net's own {NNUNET_LR:g} "
                        f"is kept under its own arm names)")
    p.add_argument("--src", type=Path, default=None, help=f"Dataset{SOURCE_ID}_Hippocampus (default: the data folder's)")
    p.add_argument("--curve_m", type=int, default=64, help="m whose phase-2 validation curves are plotted (64)")
    p.add_argument("--out", type=Path, default=None, help="markdown report (the plots go next to it)")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from the work folder's results.json")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    workdir = args.workdir.resolve()
    results = results_or_run(p, args.report_only, workdir / "results.json", lambda: run_experiment(
        workdir, args.pixel_labels, args.seeds, args.seed, args.features, args.batch_size, args.epochs_pre,
        args.epochs, args.iters, args.val_iters, args.patience, args.patience_sizes, args.paper_weight,
        args.size_weight, args.device, args.src, args.phase2_lr, cmd), cmd)
    stem = args.out.with_suffix("") if args.out else workdir / "sizes_hippocampus"
    names = (Path(f"{stem}_iou.png"), Path(f"{stem}_curves.png"))
    plots(results, *names, curve_m=args.curve_m)
    publish_report(report(results, results.get("command", cmd), (names[0].name, names[1].name)), args.out)


if __name__ == "__main__":
    main()
