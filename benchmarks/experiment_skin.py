"""The end-to-end crop-guided network on the thesis's own data: DermIS and DermQuest, 5-fold
cross-validation in each atlas and every photo of one atlas segmented by the other's five fold
models (seed 003, section 5.2.2, Table 5.5).

    python -m benchmarks.experiment_skin --sizes 64 --out docs/benchmarks/skin_e2e.md
    python -m benchmarks.experiment_skin --sizes 64 128 --out docs/benchmarks/skin_e2e.md   # later: adds S = 128
    python -m benchmarks.experiment_skin --report_only --out docs/benchmarks/skin_e2e.md

Data: ``skin-lesions/{dermis,dermquest}`` of ``--data`` converted by :mod:`benchmarks.skin` (512 x 512,
the masks thresholded at 127; seeded folds stratified by melanoma / not melanoma; inside each fold's
training photos a seeded 1/8 validation share for the plateau rule, so nothing is chosen on the
fold's test photos). Arms per atlas, fold and S, all trained with the stock ``nnUNetv2_train`` to a
validation plateau (``STSEG_PATIENCE``: the validation loss of the fold's validation share has not
improved for ``--patience`` epochs; at most ``--epochs``) and run with the stock
``nnUNetv2_predict`` (TTA off, ``checkpoint_final.pth``: the model as the plateau rule left it):

- ``unet``: the U-Net on the photo downscaled to S x S (our coarse model, ``2d_sts_coarse_S``);
- ``cascade``: our two-stage cascade (that coarse model + the fine model on full-resolution crops);
- ``e2e``: the end-to-end model with the thesis's box rule (one box around all coarse foreground,
  widened by the cascade's crop margin where the thesis added 20 px); both modules start from
  that fold's coarse model and train jointly;
- ``e2e_coarse``: the end-to-end model's coarse module alone, as a U-Net at S (what joint training
  did to the coarse model);
- ``unet_x2``: the coarse model trained for a second schedule from its own weights (the
  compute-matched pair of ``e2e``, which also trains one more schedule from those weights);
- ``cascade_x2``: our cascade with ``unet_x2`` as its coarse stage (the same fine model).

Every comparison is paired: one coarse model per atlas, fold and S under every arm. In sample,
each photo is predicted by the fold model that did not train on it; out of sample, every photo
of the other atlas by each of the five fold models, and the metrics are averaged over them (the
thesis's protocol). Scores per photo: DSC and Jaccard (IoU); the thresholded Jaccard index
(ISIC 2018: a Jaccard below 0.65 counts as 0); failed photos (Jaccard < 0.65); ms per photo of
the out-of-sample ``nnUNetv2_predict`` calls (model loading included, amortised over the atlas;
the fastest of the fold models' calls).
Paired per-photo differences with a bootstrap 95 % interval and a two-sided sign test.

Resumable: finished trainings and predictions are kept (re-run the same command, or add sizes
or folds); an interrupted training continues with ``--c``. The default budget suits a 2-core
CPU; GPU users: ``--features 32 --epochs 1000 --iters 250 --patience 50 -device cuda``.
"""
from __future__ import annotations

import json
import shutil
from copy import deepcopy
from pathlib import Path

import numpy as np

from benchmarks.experiment_e2e import coarse_module_model
from benchmarks.kvasir_arms import FAILED_JACCARD
from benchmarks.reports import paired_difference, score_folder
from benchmarks.runner import (add_budget_arguments, command_line, command_parser, epochs_and_seconds, link_into,
                               pipeline_env, plan_command_line, plan_unless_planned, predict_command_line,
                               publish_with_examples, raw_dataset, record_command, report_header, results_or_run,
                               run_measured, shared_data, train_fold)
from nnunet_stseg.adapters.config import (DEFAULT_COARSE_TRAINER, DEFAULT_E2E_TRAINER, DEFAULT_FINE_TRAINER,
                                          coarse_config_name, e2e_config_name, fine_config_name)
from nnunet_stseg.adapters.results import model_folder
from nnunet_stseg.atomic import write_json_atomic

ATLAS_IDS = {"dermis": 750, "dermquest": 751}
ATLAS_LABELS = {"dermis": "DermIS", "dermquest": "DermQuest"}
ARMS = (("unet", "U-Net at S (our coarse model)"), ("cascade", "two-stage cascade"),
        ("e2e", "end-to-end (thesis box rule)"), ("e2e_coarse", "its coarse module alone"),
        ("unet_x2", "U-Net at S, second schedule (compute-matched)"),
        ("cascade_x2", "cascade on the second-schedule U-Net"))
PAIRS = (("e2e", "unet", "end-to-end vs U-Net"), ("e2e", "cascade", "end-to-end vs cascade"),
         ("e2e", "unet_x2", "end-to-end vs U-Net, second schedule"),
         ("cascade_x2", "unet_x2", "cascade vs U-Net, both second schedule"),
         ("e2e_coarse", "unet", "coarse module of the end-to-end model vs U-Net"))
SECOND = "_x2"  # the configurations of the second schedule
# seed 003, Table 5.5: (U-Net DSC, Th. Jacc., ours DSC, Th. Jacc.), mean and sd, in %
PUBLISHED = {
    ("dermis", "dermis", 64): ((85.51, 15.50), (70.31, 31.38), (87.01, 15.06), (74.57, 27.97)),
    ("dermis", "dermis", 128): ((86.53, 15.71), (72.21, 30.78), (88.82, 11.93), (75.84, 28.41)),
    ("dermis", "dermis", 256): ((88.09, 14.58), (73.58, 33.01), (89.88, 12.49), (77.04, 30.77)),
    ("dermquest", "dermquest", 64): ((87.75, 9.07), (71.61, 29.56), (87.83, 8.97), (73.96, 25.84)),
    ("dermquest", "dermquest", 128): ((88.83, 10.19), (76.59, 25.76), (89.45, 10.09), (77.93, 25.00)),
    ("dermquest", "dermquest", 256): ((89.61, 11.20), (77.34, 27.73), (90.10, 11.22), (78.99, 26.18)),
    ("dermis", "dermquest", 64): ((77.11, 13.58), (43.40, 34.37), (80.94, 12.85), (54.56, 31.45)),
    ("dermis", "dermquest", 128): ((80.20, 12.92), (50.81, 33.87), (79.61, 14.15), (52.46, 32.36)),
    ("dermis", "dermquest", 256): ((78.67, 15.32), (51.10, 33.30), (80.07, 14.55), (55.18, 31.51)),
    ("dermquest", "dermis", 64): ((78.94, 18.81), (54.98, 34.36), (81.85, 17.24), (60.87, 32.66)),
    ("dermquest", "dermis", 128): ((78.31, 19.36), (51.57, 37.63), (81.51, 18.23), (60.10, 35.86)),
    ("dermquest", "dermis", 256): ((81.10, 19.54), (60.81, 35.41), (81.97, 19.46), (63.12, 34.89)),
}


def thresholded_jaccard(iou: np.ndarray) -> np.ndarray:
    """ISIC 2018's thresholded Jaccard index per photo: the Jaccard index, or 0 below 0.65.

    >>> thresholded_jaccard(np.array([0.9, 0.65, 0.64])).tolist()
    [0.9, 0.65, 0.0]
    """
    iou = np.asarray(iou, dtype=float)
    return np.where(iou < FAILED_JACCARD, 0.0, iou)


def second_schedule_configurations(plans_file: Path, size: int) -> tuple[str, str]:
    """Add ``2d_sts_coarse_S_x2`` (the coarse configuration again: same data and network, trained
    from the coarse model's weights for one more schedule) and ``2d_sts_fine_S_x2`` (the fine one
    with that coarse companion) to the plans, unless they are there. Returns their names."""
    plans = json.loads(plans_file.read_text())
    configs = plans["configurations"]
    coarse, fine = coarse_config_name("2d", size), fine_config_name("2d", size)
    names = coarse + SECOND, fine + SECOND
    if not all(n in configs for n in names):
        configs[names[0]] = deepcopy(configs[coarse])
        configs[names[1]] = deepcopy(configs[fine])
        configs[names[1]]["sts"]["coarse_configuration"] = names[0]
        write_json_atomic(plans, plans_file, indent=1)
    return names


def cascade_on_coarse(results_root: Path, dataset: str, plans_file: Path, fine: str, fine_x2: str, coarse_x2: str,
                      fold: int) -> Path:
    """A fine model folder ``fine_x2`` holding fold ``fold`` of the trained ``fine`` model with
    ``coarse_x2`` embedded as its coarse companion (what ``nnunet-stseg bundle`` embeds), so that
    the stock ``nnUNetv2_predict -c fine_x2`` runs the same fine model on the other coarse model."""
    import torch

    from nnunet_stseg.adapters.bundle import embed_companions

    src = model_folder(dataset, DEFAULT_FINE_TRAINER, fine, results_root=results_root)
    dst = model_folder(dataset, DEFAULT_FINE_TRAINER, fine_x2, results_root=results_root)
    target = dst / f"fold_{fold}" / "checkpoint_final.pth"
    if target.is_file():
        return dst
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "dataset.json", dst / "dataset.json")
    shutil.copy2(plans_file, dst / "plans.json")
    checkpoint = torch.load(src / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["init_args"]["configuration"] = fine_x2
    tmp = target.with_name(".tmp_checkpoint_final.pth")
    torch.save(checkpoint, tmp)
    embed_companions(tmp, {"coarse": model_folder(dataset, DEFAULT_COARSE_TRAINER, coarse_x2,
                                                  results_root=results_root)}, fold)
    tmp.replace(target)
    return dst


def prepare_atlases(workdir: Path, env: dict, resolution: int, folds: int, seed: int,
                    limit: int | None) -> dict[str, Path]:
    """Both atlases converted into the work folder's ``nnUNet_raw`` (once; a rerun keeps them)."""
    from benchmarks.skin import convert_atlas

    raw = Path(env["nnUNet_raw"])
    out = {}
    for atlas, dataset_id in ATLAS_IDS.items():
        out[atlas] = raw_dataset(raw, dataset_id) or convert_atlas(
            shared_data() / "skin-lesions" / atlas, raw, dataset_id, size=resolution, folds=folds, seed=seed,
            limit=limit)
    return out


def folds_of(ds: Path) -> list[dict]:
    from benchmarks.skin import SPLIT_FILE

    return json.loads((ds / SPLIT_FILE).read_text())["folds"]


def _arm_models(size: int) -> dict[str, tuple[str, str]]:
    """arm -> (configuration, trainer) to predict with (``e2e_coarse`` is made per fold)."""
    coarse, fine = coarse_config_name("2d", size), fine_config_name("2d", size)
    return {"unet": (coarse, DEFAULT_COARSE_TRAINER), "cascade": (fine, DEFAULT_FINE_TRAINER),
            "e2e": (e2e_config_name("2d", size), DEFAULT_E2E_TRAINER),
            "unet_x2": (coarse + SECOND, DEFAULT_COARSE_TRAINER), "cascade_x2": (fine + SECOND, DEFAULT_FINE_TRAINER)}


def train_fold_models(ds: Path, size: int, fold: int, device: str, env: dict, logs: Path, row: dict, save) -> None:
    """The four trainings of one fold (coarse first: the others start from it or use it), each
    resumed where it stopped; their epochs and seconds (:func:`epochs_and_seconds`) go to
    ``row['epochs']`` and ``row['train_s']``."""
    results_root = Path(env["nnUNet_results"])
    coarse, fine, e2e = coarse_config_name("2d", size), fine_config_name("2d", size), e2e_config_name("2d", size)
    start = model_folder(ds.name, DEFAULT_COARSE_TRAINER, coarse, results_root=results_root) / f"fold_{fold}"
    for key, config, trainer, flags in (
            ("coarse", coarse, DEFAULT_COARSE_TRAINER, ()), ("fine", fine, DEFAULT_FINE_TRAINER, ()),
            ("e2e", e2e, DEFAULT_E2E_TRAINER, ()),
            ("coarse_x2", coarse + SECOND, DEFAULT_COARSE_TRAINER,
             ("-pretrained_weights", str(start / "checkpoint_final.pth")))):
        train_fold(ds.name, config, fold, trainer, device, env, logs / f"train_{ds.name}_{config}_{fold}.log",
                   start_flags=flags)
        if str(fold) not in row.get("epochs", {}).get(key, {}):
            final = model_folder(ds.name, trainer, config, results_root=results_root) / f"fold_{fold}" / "checkpoint_final.pth"
            epochs, seconds = epochs_and_seconds(final)
            row.setdefault("epochs", {}).setdefault(key, {})[str(fold)] = epochs
            row.setdefault("train_s", {}).setdefault(key, {})[str(fold)] = seconds
            save()


def predict_scored(images: Path, labels: Path, out: Path, dataset_id: int, config: str, trainer: str, fold: int,
                   device: str, env: dict, log: Path) -> dict:
    """One stock ``nnUNetv2_predict`` call (TTA off) and the per-photo DSC and Jaccard of its output."""
    seconds, peak = run_measured(predict_command_line(images, out, dataset_id, config, trainer, [fold], device,
                                                       "--disable_tta"), env, log)
    scores = score_folder(out, labels, ".png", {"lesion": (1,)})
    n = scores["n_cases"]
    if n != len(list(images.glob("*.png"))):
        raise RuntimeError(f"{out}: {n} predictions for {len(list(images.glob('*.png')))} photos ({log})")
    return {"cases": {c: {m: v["lesion"][m] for m in ("Dice", "IoU")} for c, v in scores["cases"].items()},
            "seconds": seconds, "n": n, "peak_rss_mb": peak}


def run_experiment(workdir: Path, sizes: list[int], features: int, epochs: int, iters: int, val_iters: int,
                   patience: int, batch_size: int, device: str, folds: int = 5, run_folds: list[int] | None = None,
                   seed: int = 0, resolution: int = 512, limit: int | None = None,
                   atlases: tuple[str, ...] = ("dermis", "dermquest"), command: str | None = None) -> dict:
    """Every training, prediction and score still missing; ``command`` (the call) is recorded
    in the results from the start, so a report rebuilt while the run goes on names it."""
    from benchmarks.skin import install_folds

    workdir = Path(workdir).resolve()
    env = {**pipeline_env(workdir, epochs, iters, val_iters), "STSEG_PATIENCE": str(patience),
           "STSEG_SKIP_VALIDATION": "1", "STSEG_SAVE_EVERY": "5"}  # an interrupted training loses <= 5 epochs
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results_file = workdir / "results_skin.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    datasets = prepare_atlases(workdir, env, resolution, folds, seed, limit)
    results.update({"datasets": {a: str(p) for a, p in datasets.items()}, "budget": {
        "features": features, "epochs": epochs, "iters": iters, "val_iters": val_iters, "patience": patience,
        "batch_size": batch_size, "device": device, "folds": folds, "seed": seed, "resolution": resolution,
        "limit": limit}})
    results.setdefault("runs", {})
    if command:
        record_command(results, command, results_file)
    results_root = Path(env["nnUNet_results"])

    def save() -> None:
        write_json_atomic(results, results_file, indent=1)

    for size in sizes:
        for atlas in atlases:
            ds, dataset_id = datasets[atlas], ATLAS_IDS[atlas]
            plans_file = Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json"
            plan_unless_planned(plans_file, e2e_config_name("2d", size),
                                plan_command_line(dataset_id, size, ("2d",), features, "--e2e",
                                                  batch_size=batch_size, processes=1),
                                env, logs / f"plan_{ds.name}_{size}.log")
            install_folds(ds, plans_file.parent)
            _, fine_x2 = second_schedule_configurations(plans_file, size)
            row = results["runs"].setdefault(f"{atlas} {size}", {"atlas": atlas, "S": size})
            models = _arm_models(size)
            fold_list = folds_of(ds)
            for fold in (run_folds if run_folds is not None else range(len(fold_list))):
                train_fold_models(ds, size, fold, device, env, logs, row, save)
                cascade_on_coarse(results_root, ds.name, plans_file, fine_config_name("2d", size), fine_x2,
                                  coarse_config_name("2d", size) + SECOND, fold)
                arm_models = {**models, "e2e_coarse": (coarse_module_model(results_root, ds.name, size,
                                                                           models["e2e"][0], fold),
                                                       DEFAULT_COARSE_TRAINER)}
                test_images = link_into(workdir / "inputs" / ds.name / f"fold_{fold}",
                                        [ds / "imagesTr" / f"{c}_0000.png" for c in fold_list[fold]["test"]])
                targets = {"in": (test_images, ds / "labelsTr")}
                for other in atlases:
                    if other != atlas:
                        targets[other] = (datasets[other] / "imagesTr", datasets[other] / "labelsTr")
                for target, (images, labels) in targets.items():
                    for arm, (config, trainer) in arm_models.items():
                        cell = row.setdefault(target, {}).setdefault(arm, {})
                        if str(fold) in cell:
                            continue
                        name = f"{ds.name}_{size}_{target}_{arm}_fold{fold}"
                        cell[str(fold)] = predict_scored(images, labels, workdir / "predictions" / name, dataset_id,
                                                         config, trainer, fold, device, env,
                                                         logs / f"predict_{name}.log")
                        save()
    save()
    return results


def arm_scores(cell: dict) -> dict | None:
    """Pooled scores of one arm in one setting (``{fold: prediction}``): DSC, Jaccard and
    thresholded Jaccard of every prediction (arrays over the (fold, photo) pairs), failed photos per
    model, the per-photo means over the models that predicted each photo (for the paired
    comparisons) and ms per photo."""
    if not cell:
        return None
    per_photo: dict[str, list[tuple[float, float]]] = {}  # photo -> (DSC, Jaccard) of each model
    for _, pred in sorted(cell.items()):
        for case, m in sorted(pred["cases"].items()):
            per_photo.setdefault(case, []).append((m["Dice"], m["IoU"]))
    dice, iou = (np.array([v[i] for vs in per_photo.values() for v in vs]) for i in (0, 1))
    n_folds = len(cell)
    return {"dice": dice, "iou": iou, "th_jaccard": thresholded_jaccard(iou), "folds": n_folds,
            "failed_per_model": float((iou < FAILED_JACCARD).sum()) / n_folds,
            "photo_dice": {c: float(np.mean([v[0] for v in vs])) for c, vs in per_photo.items()},
            "photo_th_jaccard": {c: float(np.mean(thresholded_jaccard([v[1] for v in vs]))) for c, vs in per_photo.items()},
            # the fastest fold model's call (as timeit): a call slowed by what shared the machine says nothing
            "ms": 1000 * min(p["seconds"] / p["n"] for p in cell.values())}


def _pm(values: np.ndarray) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def _training(row: dict) -> str:
    """Per network: mean epochs and minutes over the folds trained."""
    t, e = row.get("train_s", {}), row.get("epochs", {})
    return ", ".join(f"{k} {np.mean(list(e[k].values())):.0f} epochs / {np.mean(list(v.values())) / 60:.1f} min"
                     for k, v in t.items() if v and k in e) or "-"


def report(results: dict, cmd: str) -> str:
    b = results["budget"]
    lines = [*report_header("DermIS and DermQuest: the end-to-end crop-guided network (thesis Table 5.5)", cmd),
             f"Budget per network: width {b['features']}, batch {b['batch_size']}, epochs of {b['iters']} iterations "
             f"until the validation loss has not improved for {b['patience']} epochs (at most {b['epochs']}; "
             f"{b['val_iters']} validation batches per epoch), device {b['device']}; photos at {b['resolution']} x "
             f"{b['resolution']}, {b['folds']}-fold CV (seed {b['seed']}, stratified by melanoma), the plateau rule on "
             f"1/8 of each fold's training photos, never on its test photos"
             + (f"; only the first {b['limit']} photos per class (smoke run)" if b.get("limit") else "") + ".",
             "In sample: every photo predicted by the fold model that did not see it. Out of sample (A -> B): "
             "every photo of B predicted by each of A's fold models, metrics averaged over them (the thesis's "
             "protocol). DSC and thresholded Jaccard (Jaccard < 0.65 counts 0) in %, mean ± sd over predictions; "
             "failed = photos with Jaccard < 0.65 per model; ms / photo: the out-of-sample `nnUNetv2_predict` "
             "call's wall time over its photos, the fastest of the fold models' calls (model loading included; the U-Net "
             "and coarse-module arms run nnU-Net's own predictor with its worker processes, the cascade and "
             "end-to-end arms ours in one process on this 2-core machine, docs/design.md: whole commands, not "
             "networks, are compared). Thesis: seed 003, Table 5.5 (Adam 1e-4, plateau LR cuts, best model by "
             "validation loss, its own U-Net; photos 300-550 px resized to 1024 x 1024).", ""]
    done = {key: min((len(c) for t in row if t == "in" or t in ATLAS_IDS for c in row[t].values()), default=0)
            for key, row in results.get("runs", {}).items()}
    if any(n < b["folds"] for n in done.values()):
        lines += ["**Partial results** (the run goes on): " + ", ".join(
            f"{ATLAS_LABELS[results['runs'][k]['atlas']]} at S = {results['runs'][k]['S']}: {n} of {b['folds']} folds"
            for k, n in sorted(done.items())) + ". A table of fewer folds is not yet the experiment's answer.", ""]
    for key, row in sorted(results.get("runs", {}).items(), key=lambda kv: (kv[1]["S"], kv[1]["atlas"])):
        atlas, size = row["atlas"], row["S"]
        lines += [f"## Trained on {ATLAS_LABELS[atlas]}, S = {size}", "",
                  f"Training per network until the plateau rule stopped it (mean over folds; minutes = epochs x "
                  f"the median epoch, from nnU-Net's log): {_training(row)}.", ""]
        for target in [t for t in row if t == "in" or t in ATLAS_IDS]:
            other = atlas if target == "in" else target
            setting = ATLAS_LABELS[atlas] + ("" if target == "in" else f" -> {ATLAS_LABELS[other]}")
            scores = {arm: arm_scores(row[target].get(arm, {})) for arm, _ in ARMS}
            scores = {arm: s for arm, s in scores.items() if s is not None}
            if not scores:
                continue
            lines += [f"### {setting} ({'in sample' if target == 'in' else 'out of sample'})", "",
                      "| arm | folds | DSC % | Th. Jacc. % | failed per model | ms / photo |", "|---" * 6 + "|"]
            for arm, label in ARMS:
                if arm in scores:
                    s = scores[arm]
                    ms = "-" if target == "in" else f"{s['ms']:.0f}"  # out of sample: loading amortised
                    lines.append(f"| {label} | {s['folds']} | {_pm(s['dice'])} | {_pm(s['th_jaccard'])} | "
                                 f"{s['failed_per_model']:.1f} | {ms} |")
            published = PUBLISHED.get((atlas, other, size))
            if published:
                (ud, us), (uj, ujs), (od, ods), (oj, ojs) = published
                lines.append(f"| thesis U-Net | 5 | {ud:.1f} ± {us:.1f} | {uj:.1f} ± {ujs:.1f} | | |")
                lines.append(f"| thesis end-to-end | 5 | {od:.1f} ± {ods:.1f} | {oj:.1f} ± {ojs:.1f} | | |")
            pair_lines = []
            for a, c, label in PAIRS:
                if a in scores and c in scores:
                    photos = sorted(set(scores[a]["photo_dice"]) & set(scores[c]["photo_dice"]))
                    for metric in ("dice", "th_jaccard"):
                        x = np.array([scores[a][f"photo_{metric}"][p] for p in photos])
                        y = np.array([scores[c][f"photo_{metric}"][p] for p in photos])
                        d = paired_difference(x, y)
                        pair_lines.append(f"| {label} | {'DSC' if metric == 'dice' else 'Th. Jacc.'} | {len(photos)} | "
                                          f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] | "
                                          f"{d['better']} / {d['worse']} | {d['sign_p']:.3f} |")
            if pair_lines:
                lines += ["", "Paired per-photo differences (points; per photo the mean over the models that "
                              "predicted it), bootstrap 95 % interval, photos better / worse, two-sided sign test:", "",
                          "| pair | metric | photos | mean difference [95 % CI] | better / worse | sign test p |",
                          "|---" * 6 + "|", *pair_lines]
            lines.append("")
    return "\n".join(lines) + "\n"


FIGURE_ARMS = ("unet", "cascade", "e2e", "unet_x2")


def example_figure(results: dict, path: Path) -> Path | None:
    """Out-of-sample overlays at the smallest S of the first atlas trained (fold 0's models): the
    photos of the other atlas with the lowest, median and highest DSC of the end-to-end model,
    every arm of :data:`FIGURE_ARMS` beside them."""
    from benchmarks.reports import overlay_grid, pick_cases
    from nnunet_stseg.commands.overlay import read_image

    runs = sorted(results.get("runs", {}).values(), key=lambda r: (r["S"], r["atlas"]))
    for row in runs:
        other = next((t for t in row if t in ATLAS_IDS and t != row["atlas"]), None)
        if other is None or "0" not in row[other].get("e2e", {}):
            continue
        source, target = Path(results["datasets"][row["atlas"]]), Path(results["datasets"][other])
        work = source.parents[1]  # <workdir>/nnUNet_raw/<dataset>
        folders = {arm: work / "predictions" / f"{source.name}_{row['S']}_{other}_{arm}_fold0" for arm in FIGURE_ARMS
                   if "0" in row[other].get(arm, {})}
        dice = {arm: {c: m["Dice"] for c, m in row[other][arm]["0"]["cases"].items()} for arm in folders}
        rows = []
        for case in pick_cases(dice["e2e"]):
            image = read_image(target / "imagesTr" / f"{case}_0000.png")
            gt = read_image(target / "labelsTr" / f"{case}.png") > 0
            rows.append((f"{ATLAS_LABELS[other]} {case}", image, gt,
                         {f"{arm} S = {row['S']}": (read_image(folder / f"{case}.png") > 0, f"DSC {dice[arm][case]:.3f}")
                          for arm, folder in folders.items()}))
        return overlay_grid(rows, path) if rows else None
    return None


def main(argv=None) -> None:
    p = command_parser("experiment_skin", __doc__)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/skin"), help="work folder (work_dirs/skin)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64], help="input sizes S (64)")
    add_budget_arguments(p, features=16, batch_size=16, epochs=100, iters=25, folds=5,
                         helps={"epochs": "most epochs of every network (the plateau rule stops it earlier)"})
    p.add_argument("--val_iters", type=int, default=4, help="validation batches per epoch (4)")
    p.add_argument("--patience", type=int, default=10,
                   help="epochs without a better validation loss before a training stops (10)")
    p.add_argument("--run_folds", type=int, nargs="+", default=None, help="run only these folds (default all)")
    p.add_argument("--atlases", nargs="+", default=["dermis", "dermquest"], choices=sorted(ATLAS_IDS),
                   help="atlases to train on (both by default; out of sample needs both converted)")
    p.add_argument("--resolution", type=int, default=512, help="photos resized to this square size (512)")
    p.add_argument("--limit", type=int, default=None, help="only the first N photos of each class (smoke runs)")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from results_skin.json")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    results_file = args.workdir.resolve() / "results_skin.json"
    results = results_or_run(p, args.report_only, results_file, lambda: run_experiment(
        args.workdir, args.sizes, args.features, args.epochs, args.iters, args.val_iters, args.patience,
        args.batch_size, args.device, folds=args.folds, run_folds=args.run_folds, seed=args.seed,
        resolution=args.resolution, limit=args.limit, atlases=tuple(args.atlases), command=cmd), cmd)
    commands = record_command(results, cmd, results_file, args.report_only)
    publish_with_examples(report(results, commands), args.out, lambda path: example_figure(results, path),
                          "Out of sample (fold 0's models, the smallest S): the photos with the lowest, median and "
                          "highest DSC of the end-to-end model")


if __name__ == "__main__":
    main()
