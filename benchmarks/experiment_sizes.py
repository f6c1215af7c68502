"""Experiment: learning from object sizes with simulated weak labels, so the truth is known.

    python -m benchmarks.experiment_sizes --dataset kvasir --workdir work_dirs/sizes_kvasir \\
        --out docs/benchmarks/sizes_kvasir.md
    python -m benchmarks.experiment_sizes --dataset cardiac --workdir work_dirs/sizes_cardiac \\
        --out docs/benchmarks/sizes_cardiacfat.md

Data: Kvasir-SEG resized to S x S (default 64; the seeded 80/10/10 split of the other Kvasir
experiments: train / validation = nnU-Net fold 0 / test), or Cardiac Fat CT pericardium (labels
1 + 2) as 2D slices resized to S x S, slices where it covers at least 1 % of the slice (the
paper's rule), per-patient 2-fold cross-validation (the other fold's patients are the test set).
Within each training set m cases keep their pixel labels (seeded draw), the rest keep only their
size (``nnunet-stseg sizes simulate``: all-``ignore`` labels plus ``object_sizes.json``).

Arms, all ``nnUNetTrainer_StSSizes`` with the same width, batch size and schedule:
- phase 1: pixel loss on the m cases for ``--epochs_pre`` epochs (shared by the next two arms);
- pixel only: phase 1's weights, ``--epochs`` more epochs of pixel loss (``size_weight`` 0);
- pixel + size: phase 1's weights, ``--epochs`` epochs of pixel loss + size loss, one arm per
  ``--size_weights`` value (default 1 and 0.1); the weight is chosen on the validation images
  (Kvasir: the split's 100 validation images; Cardiac: one training patient per fold, left out of
  training), which every arm after phase 1 is also scored on;
- full labels (upper bound): the same two phases with every training case pixel-labelled;
- for the smallest m also the paper's phase 2, the size loss alone (``pixel_weight`` 0), which
  is what decides whether the pixel loss stays on in phase 2 (``--no_paper_arm`` skips it).
The two arms after phase 1 start from the same weights (``-pretrained_weights``): a paired
comparison. Scored on the test images (``nnUNetv2_predict --disable_tta``, checkpoint_final, no
selection on test data): DSC and IoU mean +- sd, the squared size error (pixels of the S grid)
and the epoch time of each phase. ``--report_only`` rebuilds the report and the plot from
``results.json``. The default budget (width 16, batch 16, 20 + 10 epochs of 25 iterations) is a
CPU budget; GPU users pass e.g. ``--epochs_pre 200 --epochs 100 --iters 250 -device cuda``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from nnunet_stseg.adapters.config import DEFAULT_SIZES_TRAINER
from nnunet_stseg.atomic import write_atomic, write_json_atomic
from benchmarks.runner import (add_budget_arguments, add_narrow, command_line, command_parser, evaluate, find_command,
                               install_splits, per_patient_split, pipeline_env, predict_command_line, raw_dataset,
                               report_header, run, run_measured, set_batch_size, shared_data, train_fold)
from nnunet_stseg.core.metrics import count_empty_predictions, mean_sd

TRAINER = DEFAULT_SIZES_TRAINER
DEFAULT_WEIGHTS = (1.0, 0.1)


def sizes_arm(weight: float) -> str:
    """Arm (and configuration suffix) of the pixel + size arm with this size weight."""
    return "sizes" if weight == 1.0 else f"sizes_w{weight:g}"
FULL_BASE_ID, KVASIR_BASE_ID, CARDIAC_BASE_ID = 740, 740, 760


# ------------------------------------------------------------------ data
def link_cases(ds: Path, cases: list[str], folder: Path) -> tuple[Path, Path]:
    """``folder/images`` and ``folder/labels`` with links to these training cases of ``ds`` (PNG)."""
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for c in cases:
        for src, dst in ((ds / "imagesTr" / f"{c}_0000.png", folder / "images" / f"{c}_0000.png"),
                         (ds / "labelsTr" / f"{c}.png", folder / "labels" / f"{c}.png")):
            if not dst.exists():
                dst.symlink_to(src)
    return folder / "images", folder / "labels"


def kvasir_source(workdir: Path, raw: Path, size: int, seed: int, src: Path | None, limit: int | None) -> tuple[
        Path, list[dict]]:
    """Kvasir-SEG at size x size with its seeded split; one 'fold': train, val, test case lists."""
    from benchmarks.kvasir import SPLIT_FILE, convert_kvasir, kvasir_ids

    ds = raw_dataset(raw, KVASIR_BASE_ID)
    if ds is None:
        src = Path(src) if src else shared_data() / "kvasir-seg"
        ds = convert_kvasir(src, raw, KVASIR_BASE_ID, name=f"KvasirSEG{size}Full", size=size, seed=seed,
                            ids=kvasir_ids(src)[:limit] if limit else None)
    split = json.loads((ds / SPLIT_FILE).read_text())
    val_images, val_labels = link_cases(ds, split["val"], workdir / "inputs" / "val_fold_0")
    return ds, [{"train": split["train"], "val": split["val"], "images": ds / "imagesTs", "labels": ds / "labelsTs",
                 "val_images": val_images, "val_labels": val_labels}]


def cardiac_slices(raw: Path, size: int, min_fraction: float = 0.01, limit: int | None = None) -> Path:
    """Cardiac Fat CT pericardium (labels 1 + 2) as 2D PNG slices resized to size x size (image
    bilinear, mask bilinear of 0/1 then >= 0.5), slices where it covers >= ``min_fraction``."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from benchmarks.runner import CARDIAC_FAT_ID
    from benchmarks.runner import save_png_atomic

    out = raw / f"Dataset{CARDIAC_BASE_ID:03d}_CardiacFatSlices{size}"
    if (out / "dataset.json").is_file():
        return out
    src = raw_dataset(shared_data() / "nnUNet_raw", CARDIAC_FAT_ID)
    if src is None:
        raise SystemExit(f"Cardiac Fat CT (Dataset{CARDIAC_FAT_ID}_*) not found under {shared_data() / 'nnUNet_raw'}")
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    patients = sorted(p.name[:-len(".nii.gz")] for p in (src / "labelsTr").glob("*.nii.gz"))[:limit]
    n = 0
    for patient in patients:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "imagesTr" / f"{patient}_0000.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "labelsTr" / f"{patient}.nii.gz"))) > 0
        for z in range(image.shape[0]):
            if label[z].mean() < min_fraction:
                continue
            pair = torch.from_numpy(np.stack([image[z], label[z]]).astype(np.float32))[None]
            small = torch.nn.functional.interpolate(pair, size=(size, size), mode="bilinear", antialias=True,
                                                    align_corners=False)[0].numpy()
            case = f"{patient}_z{z:03d}"
            save_png_atomic(np.clip(np.rint(small[0]), 0, 255).astype(np.uint8),
                             out / "imagesTr" / f"{case}_0000.png")
            save_png_atomic((small[1] >= 0.5).astype(np.uint8), out / "labelsTr" / f"{case}.png")
            n += 1
    generate_dataset_json(str(out), {0: "CTwindowed"}, {"background": 0, "pericardium": 1}, n, ".png",
                          dataset_name=out.name.split("_", 1)[1], overwrite_image_reader_writer="NaturalImage2DIO",
                          description=f"Cardiac Fat CT pericardium (labels 1+2) as 2D slices at {size}x{size}, "
                                      f"slices with >= {min_fraction:.0%} pericardium")
    return out


def cardiac_source(workdir: Path, raw: Path, size: int, seed: int, folds: int, limit: int | None) -> tuple[
        Path, list[dict]]:
    """The slice dataset and, per fold, train / val case lists (val: the last training patient, left
    out of training: nnU-Net's per-epoch pseudo-Dice and the choice of the size weight) and the test
    slices (the fold's held-out patients)."""
    ds = cardiac_slices(raw, size, limit=limit)
    cases = sorted(p.name[:-len(".png")] for p in (ds / "labelsTr").glob("*.png"))
    patient_of = {c: c.rsplit("_z", 1)[0] for c in cases}
    out = []
    for f, split in enumerate(per_patient_split(sorted(set(patient_of.values())), folds, seed)):
        train_patients, test_patients = split["train"], split["val"]
        val_patient = train_patients[-1]
        val = [c for c in cases if patient_of[c] == val_patient]
        images, labels = link_cases(ds, [c for c in cases if patient_of[c] in test_patients],
                                    workdir / "inputs" / f"fold_{f}")
        val_images, val_labels = link_cases(ds, val, workdir / "inputs" / f"val_fold_{f}")
        out.append({"train": [c for c in cases if patient_of[c] in train_patients[:-1]], "val": val,
                    "images": images, "labels": labels, "val_images": val_images, "val_labels": val_labels,
                    "test_patients": test_patients})
    return ds, out


# ------------------------------------------------------------------ runs
def prepare_dataset(source: Path, dataset_id: int, pixel_cases: list[str], cases: list[str], split: dict, env: dict,
                    features: int, batch_size: int, log: Path, tag: str, weights: tuple[float, ...] = (1.0,)
                    ) -> tuple[str, dict[str, str]]:
    """The size-labelled copy of ``source`` (pixel labels on ``pixel_cases``), planned and
    preprocessed by the stock command, with the three configurations of the arms. Returns the
    dataset name and {arm: configuration}."""
    from nnunet_stseg.adapters.config import SIZES_KEY, with_block
    from nnunet_stseg.adapters.size_labels import simulate_size_labels

    raw, pp_root = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    existing = raw_dataset(raw, dataset_id)
    name = existing.name if existing else None
    plans_file = pp_root / (name or "none") / "nnUNetPlans.json"
    if name is None or not plans_file.is_file():
        ds = simulate_size_labels(source, raw, dataset_id, pixel_cases, cases=cases,
                                  name=f"{source.name.split('_', 1)[1]}{tag}")
        name = ds.name
        plans_file = pp_root / name / "nnUNetPlans.json"
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # nnU-Net's planner needs >= 1
        run([find_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d", "-np", "1"], plan_env,
            log)
    install_splits([split], pp_root / name)
    base = add_narrow(plans_file, features)
    plans = json.loads(plans_file.read_text())
    blocks = {"pre": {"size_weight": 0.0}, "pixel": {"size_weight": 0.0},
              **{sizes_arm(w): {"pretrain_epochs": 0, "size_weight": w} for w in weights},
              "sizes_only": {"pretrain_epochs": 0, "size_weight": weights[0], "pixel_weight": 0.0}}
    configs = {}
    for arm, block in blocks.items():
        cname = f"{base}_{arm}"
        plans["configurations"][cname] = with_block(copy.deepcopy(plans["configurations"][base]), SIZES_KEY, block)
        configs[arm] = cname
    write_json_atomic(plans, plans_file, indent=1)
    for cname in configs.values():
        set_batch_size(plans_file, cname, batch_size)
    return name, configs


def train(name: str, config: str, env: dict, device: str, log: Path, pretrained: Path | None = None) -> Path:
    """Train fold 0 of one arm with the stock ``nnUNetv2_train`` unless finished (``--c`` after an
    interruption, :func:`~benchmarks.runner.train_fold`); returns the fold folder."""
    from nnunet_stseg.adapters.results import model_folder

    fold_dir = model_folder(name, TRAINER, config, results_root=env["nnUNet_results"]) / "fold_0"
    seconds = train_fold(name, config, 0, TRAINER, device, env, log,
                         start_flags=("-pretrained_weights", str(pretrained)) if pretrained else ())
    if seconds is not None:
        write_json_atomic({"seconds": seconds}, fold_dir / "train_seconds.json")
    return fold_dir


def score(pred: Path, labels: Path, dataset_json: dict) -> dict:
    """nnU-Net's metrics (mean +- sd over images, %; :func:`benchmarks.kvasir_arms.per_image_stats`) and
    the squared size error (pixels^2 of the S grid; mean +- sd) of a prediction folder."""
    import torch
    from PIL import Image

    from benchmarks.kvasir_arms import per_image_stats
    from nnunet_stseg.core.sizes import object_size

    summary = pred / "summary_test.json"
    evaluate(pred, labels, dataset_json, summary)
    errors = []
    for c in json.loads(summary.read_text())["metric_per_case"]:
        gt = np.asarray(Image.open(c["reference_file"])) > 0
        pr = np.asarray(Image.open(c["prediction_file"])) > 0
        sizes = object_size(torch.from_numpy(np.stack([gt, pr])))
        errors.append(float((sizes[0] - sizes[1]) ** 2))
    return {**per_image_stats(summary), "size_error_px2": mean_sd(errors)}


def count_empty(results: dict, workdir: Path) -> None:
    """Empty predictions of every arm from its ``summary_test.json`` where the work folder has it
    (``--report_only`` on results made before the count was recorded)."""
    for key, row in results["runs"].items():
        for arm, r in row.items():
            summary = workdir / "predictions" / f"{key}_{arm}" / "summary_test.json"
            if isinstance(r, dict) and "empty_predictions" not in r and summary.is_file():
                per_case = json.loads(summary.read_text())["metric_per_case"]
                r["empty_predictions"] = count_empty_predictions([c["metrics"]["1"]["Precision"] for c in per_case])


def epoch_seconds(fold_dir: Path) -> dict:
    """Median seconds of the epochs of each phase (``size_training.json``): an epoch slowed by
    another process on the machine, or spanning a pause, does not move it."""
    path = fold_dir / "size_training.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    out = {}
    for phase in (1, 2):
        secs = [r["seconds"] for r in records if r["phase"] == phase and r.get("seconds") is not None]
        if secs:
            out[f"phase{phase}"] = float(np.median(secs))
    return out


def predict_and_score(name: str, config: str, fold_dir: Path, split: dict, workdir: Path, env: dict, device: str,
                      dataset_json: dict, tag: str, validate: bool = False) -> dict:
    """Test scores of one arm (and, with ``validate``, its scores on the fold's validation images:
    what the size weight is chosen on)."""
    parts = [("test", split["images"], split["labels"], workdir / "predictions" / tag)]
    if validate:
        parts.append(("val", split["val_images"], split["val_labels"], workdir / "predictions" / f"{tag}_val"))
    scores = {}
    for part, images, labels, out in parts:
        if not (out / "summary_test.json").is_file():
            run_measured(predict_command_line(images, out, name, config, TRAINER, [0], device, "--disable_tta"), env,
                         workdir / "logs" / f"predict_{tag}_{part}.log")
        scores[part] = score(out, labels, dataset_json)
    r = scores["test"]
    if validate:
        r["val"] = scores["val"]
    r["epoch_s"] = epoch_seconds(fold_dir)
    train_s = fold_dir / "train_seconds.json"
    r["train_s"] = json.loads(train_s.read_text())["seconds"] if train_s.is_file() else None
    return r


def run_experiment(data: str, workdir: Path, size: int, pixel_labels: list[int], features: int, batch_size: int,
                   epochs_pre: int, epochs: int, iters: int, device: str = "cpu", seed: int = 0, folds: int = 2,
                   src: Path | None = None, limit: int | None = None, paper_arm: bool = True,
                   weights: tuple[float, ...] = DEFAULT_WEIGHTS) -> dict:
    workdir = Path(workdir).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env_pre, env_fine = pipeline_env(workdir, epochs_pre, iters), pipeline_env(workdir, epochs, iters)
    for env in (env_pre, env_fine):
        env["STSEG_SKIP_VALIDATION"] = "1"  # the held-out images are predicted and scored below
        env["nnUNet_n_proc_DA"] = env.get("nnUNet_n_proc_DA", "0")
    raw = Path(env_pre["nnUNet_raw"])
    raw.mkdir(parents=True, exist_ok=True)
    if data == "kvasir":
        source, splits = kvasir_source(workdir, raw, size, seed, src, limit)
        base_id = KVASIR_BASE_ID + 1
    else:
        source, splits = cardiac_source(workdir, raw, size, seed, folds, limit)
        base_id = CARDIAC_BASE_ID + 1
    dataset_json = {"labels": {"background": 0, "object": 1}, "file_ending": ".png"}
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update(data=data, budget={"size": size, "features": features, "batch_size": batch_size,
                                      "epochs_pre": epochs_pre, "epochs": epochs, "iters": iters, "device": device,
                                      "seed": seed, "size_weights": list(weights), "folds": len(splits)},
                   source=source.name)
    results.setdefault("runs", {})
    rng = np.random.default_rng(seed)
    draws = {f: rng.permutation(sorted(split["train"])).tolist() for f, split in enumerate(splits)}
    labelled_sets = [m for m in pixel_labels] + ["full"]
    for f, split in enumerate(splits):
        for i, m in enumerate(labelled_sets):
            key = f"fold{f}_m{m}"
            pixel_cases = split["train"] if m == "full" else sorted(draws[f][:m])  # nested: m=16 within m=32
            dataset_id = base_id + f * len(labelled_sets) + i
            log = workdir / "logs" / f"{key}"
            name, configs = prepare_dataset(source, dataset_id, pixel_cases + split["val"],
                                            split["train"] + split["val"], split, env_pre, features, batch_size,
                                            Path(f"{log}_plan.log"), f"Fold{f}M{m}", weights)
            pre = train(name, configs["pre"], env_pre, device, Path(f"{log}_pre.log"))
            row = {"m": len(pixel_cases), "n_train": len(split["train"]), "dataset": name}
            row["pre"] = predict_and_score(name, configs["pre"], pre, split, workdir, env_pre, device, dataset_json,
                                           f"{key}_pre")
            arms = ("pixel", *(sizes_arm(w) for w in weights))
            arms += ("sizes_only",) if m == min(pixel_labels) and paper_arm else ()
            for arm in arms if m != "full" else ("pixel",):
                fold_dir = train(name, configs[arm], env_fine, device, Path(f"{log}_{arm}.log"),
                                 pretrained=pre / "checkpoint_final.pth")
                row[arm] = predict_and_score(name, configs[arm], fold_dir, split, workdir, env_fine, device,
                                             dataset_json, f"{key}_{arm}", validate=True)
            results["runs"][key] = row
            write_json_atomic(results, results_file, indent=1)
    return results


# ------------------------------------------------------------------ report
def _cell(v, digits=1) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if v else "n/a"


def size_arms(results: dict) -> list[str]:
    """The pixel + size arms of a run, in the order of their weights."""
    weights = results["budget"].get("size_weights") or [results["budget"].get("size_weight", 1.0)]
    return [sizes_arm(float(w)) for w in weights]


def folds_run(results: dict) -> int:
    """Folds with at least one finished m (an interrupted run reports what it has)."""
    return len({key.split("_")[0] for key in results["runs"]})


def arm_weight(arm: str) -> float:
    return 1.0 if arm == "sizes" else float(arm[len("sizes_w"):])


def report(results: dict, cmd: str, plot_name: str | None) -> str:
    b = results["budget"]
    title = {"kvasir": "Kvasir-SEG", "cardiac": "Cardiac Fat CT pericardium (2D slices)"}[results["data"]]
    weights = ", ".join(f"{arm_weight(a):g}" for a in size_arms(results))
    lines = [*report_header(f"Learning from object sizes: {title} at {b['size']} x {b['size']}", cmd),
             f"Budget per arm: width {b['features']}, batch {b['batch_size']} (+ the same number of size-only images "
             f"per step in phase 2), phase 1 {b['epochs_pre']} epochs, then {b['epochs']} epochs, {b['iters']} "
             f"iterations each, device {b['device']}; size weights {weights} (relative squared size error), pixel "
             f"weight 1 in phase 2, one sample; seed {b['seed']}; {folds_run(results)} of {b['folds']} fold(s) run. Test and validation images "
             f"predicted with `nnUNetv2_predict --disable_tta` from checkpoint_final; the size weight is chosen on "
             f"the validation IoU, never on test images. Size error in pixels² of the {b['size']}² grid. Epoch s = "
             f"mean wall time of one training epoch (size_training.json): phase 1 / phase 2. Empty "
             f"predictions: test images with no foreground predicted (docs/benchmarks/README.md).", "",
             "| fold | m pixel labels / training cases | arm | DSC % | IoU % | size error px² | empty predictions | "
             "val IoU % | epoch s | train s |", "|---" * 10 + "|"]
    labels = {"pre": f"phase 1 only ({b['epochs_pre']} ep)", "pixel": "pixel only",
              **{a: f"pixel + size (weight {arm_weight(a):g})" for a in size_arms(results)},
              "sizes_only": "size loss alone in phase 2 (paper)"}
    for key, row in results["runs"].items():
        fold = key.split("_")[0][4:]
        for arm, label in labels.items():
            if arm not in row:
                continue
            r = row[arm]
            ep = r.get("epoch_s", {})
            epoch = " / ".join(f"{ep[p]:.1f}" for p in ("phase1", "phase2") if p in ep) or "n/a"
            name = f"{label} (full labels)" if "full" in key else label
            train_s = f"{r['train_s']:.0f}" if r.get("train_s") is not None else "n/a"
            val = f"{r['val']['IoU'][0]:.1f}" if "val" in r else "n/a"
            lines.append(f"| {fold} | {row['m']} / {row['n_train']} | {name} | {_cell(r['Dice'])} | {_cell(r['IoU'])} | "
                         f"{_cell(r['size_error_px2'], 0)} | {r.get('empty_predictions', 'n/a')} | {val} | {epoch} | "
                         f"{train_s} |")
    lines += ["", *findings(results)]
    if plot_name:
        lines += ["", f"![IoU against m]({plot_name})"]
    return "\n".join(lines) + "\n"


def paired_gains(results: dict, arm: str = "sizes", part: str | None = None) -> dict:
    """{m: [IoU gain of a pixel + size arm over pixel only, per fold]} in points, on the test images
    (``part`` None) or on the validation images (``part`` 'val')."""
    gains: dict = {}
    for row in results["runs"].values():
        if arm in row and (part is None or part in row[arm]):
            a, b = (row[arm], row["pixel"]) if part is None else (row[arm][part], row["pixel"][part])
            gains.setdefault(row["m"], []).append(a["IoU"][0] - b["IoU"][0])
    return gains


def chosen_arm(results: dict) -> str | None:
    """The size weight with the best mean validation IoU gain over m and folds (None without
    validation scores)."""
    means = {arm: np.mean([v for g in paired_gains(results, arm, "val").values() for v in g])
             for arm in size_arms(results) if paired_gains(results, arm, "val")}
    return max(means, key=means.get) if means else None


def findings(results: dict) -> list[str]:
    out = []
    chosen = chosen_arm(results)
    if chosen is None:
        out.append("No validation scores in this run (it predates them), so no size weight was chosen here.")
    for arm in size_arms(results):
        gains, val = paired_gains(results, arm), paired_gains(results, arm, "val")
        if not gains:
            continue
        out.append(f"Paired IoU gain of pixel + size (weight {arm_weight(arm):g}) over pixel only (same phase-1 "
                   f"weights, same budget), test (validation):" + (" **chosen on validation**" if arm == chosen else ""))
        for m, g in sorted(gains.items()):
            v = val.get(m, [])
            out.append(f"- m = {m}: {', '.join(f'{x:+.1f}' for x in g)} points"
                       + (f" ({', '.join(f'{x:+.1f}' for x in v)})" if v else "") + (" per fold" if len(g) > 1 else ""))
        all_gains = [x for g in gains.values() for x in g]
        out.append(f"- mean over m{' and folds' if folds_run(results) > 1 else ''}: "
                   f"{np.mean(all_gains):+.1f} points on test")
    for key, row in results["runs"].items():
        if "sizes_only" in row:
            first = size_arms(results)[0]
            out.append(f"- {key.split('_')[0]}, m = {row['m']}: phase 2 with the size loss alone (the paper's, weight "
                       f"{arm_weight(first):g}) IoU {row['sizes_only']['IoU'][0]:.1f}, with the pixel loss kept "
                       f"{row[first]['IoU'][0]:.1f}, pixel only {row['pixel']['IoU'][0]:.1f}; size error "
                       f"{row['sizes_only']['size_error_px2'][0]:.0f} / {row[first]['size_error_px2'][0]:.0f} / "
                       f"{row['pixel']['size_error_px2'][0]:.0f} px²")
    ratios = [row[arm]["epoch_s"]["phase2"] / row["pixel"]["epoch_s"]["phase1"]
              for row in results["runs"].values() for arm in size_arms(results)
              if arm in row and "phase2" in row[arm].get("epoch_s", {})
              and "phase1" in row["pixel"].get("epoch_s", {})]
    if ratios:
        out.append(f"- epoch time of pixel + size / pixel only (same batch of labelled images, plus the size batch): "
                   f"{np.mean(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); the paper: about 10x. These "
                   f"wall times include whatever else shared the machine during each run; `python -m benchmarks.benchmark "
                   f"--size_loss` measures the step ratio alone")
    out.append("- published (MSD hippocampus 48 x 32, other budget): about +5 IoU points for m < 100, "
               "negligible for larger m")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    by_arm: dict = {}
    full = []
    for key, row in results["runs"].items():
        if "full" in key:
            full.append(row["pixel"]["IoU"][0])
            continue
        for arm in ("pixel", *size_arms(results)):
            if arm in row:
                by_arm.setdefault(arm, {}).setdefault(row["m"], []).append(row[arm]["IoU"][0])
    styles = [("pixel", "pixel labels only", "o-")] + [
        (a, f"pixel + size labels (weight {arm_weight(a):g})", m) for a, m in zip(size_arms(results), ("s-", "^-", "v-"))]
    for arm, label, style in styles:
        ms = sorted(by_arm.get(arm, {}))
        if ms:
            ax.plot(ms, [np.mean(by_arm[arm][m]) for m in ms], style, label=label)
    if full:
        ax.axhline(np.mean(full), color="k", ls="--", label="full labels")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (pixel-labelled training images)")
    ax.set_ylabel("test IoU % (mean over folds)")
    b = results["budget"]
    ax.set_title(f"{results['data']} {b['size']}², {b['epochs_pre']}+{b['epochs']} ep x {b['iters']} it, 2-core CPU",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, figure=fig)
    plt.close(fig)


def main(argv=None) -> None:
    p = command_parser("experiment_sizes", __doc__)
    p.add_argument("--dataset", choices=("kvasir", "cardiac"), required=True)
    p.add_argument("--workdir", type=Path, default=None, help="work folder (work_dirs/sizes_<data>)")
    p.add_argument("--size", type=int, default=64, help="images resized to size x size (64)")
    p.add_argument("--pixel_labels", type=int, nargs="+", default=None,
                   help="m values (kvasir: 16 32 64 128; cardiac: 8 16 32 64)")
    add_budget_arguments(p, features=16, batch_size=16, epochs=10, iters=25, folds=2,
                         helps={"epochs": "epochs after phase 1 (both arms)", "folds": "cardiac: per-patient folds"})
    p.add_argument("--epochs_pre", type=int, default=20, help="phase-1 epochs (pixel labels only) (20)")
    p.add_argument("--src", type=Path, default=None, help="Kvasir-SEG folder (default kvasir-seg/ in the --data folder)")
    p.add_argument("--size_weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS),
                   help="size-loss weights, one pixel + size arm each, chosen on validation (1 0.1)")
    p.add_argument("--no_paper_arm", action="store_true", help="skip the size-loss-alone arm at the smallest m")
    p.add_argument("--limit", type=int, default=None, help="first N images (kvasir) or patients (cardiac): smoke runs")
    p.add_argument("--out", type=Path, default=None, help="markdown report (the plot goes next to it)")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from the work folder's results.json")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    workdir = (args.workdir or Path(f"work_dirs/sizes_{args.dataset}")).resolve()
    m_values = args.pixel_labels or ([16, 32, 64, 128] if args.dataset == "kvasir" else [8, 16, 32, 64])
    if args.report_only:
        if not (workdir / "results.json").is_file():
            p.error(f"--report_only: {workdir / 'results.json'} does not exist; run the experiment first")
        results = json.loads((workdir / "results.json").read_text())
        count_empty(results, workdir)
    else:
        results = run_experiment(args.dataset, workdir, args.size, m_values, args.features, args.batch_size,
                                 args.epochs_pre, args.epochs, args.iters, args.device, args.seed, args.folds,
                                 args.src, args.limit, not args.no_paper_arm, tuple(args.size_weights))
        results["command"] = cmd
        write_json_atomic(results, workdir / "results.json", indent=1)
    plot_path = args.out.with_suffix(".png") if args.out else workdir / "sizes_iou.png"
    plot(results, plot_path)
    text = report(results, results.get("command", cmd), plot_path.name)
    print(text)
    if args.out is not None:
        write_atomic(args.out, text)


if __name__ == "__main__":
    main()
