"""L-SNet on Kvasir-SEG at 256 x 256 (seed 001).

Arms per S, all scored on the same 100 test images of the seeded split with the stock
``nnUNetv2_predict`` (TTA off), same width and schedule for every network:

- ``baseline``: nnU-Net 2d at S (the coarse model: the whole image downscaled to S);
- ``cascade``: our cascade (the coarse model's segmentation as first stage, hard crops, fine model);
- ``lnet_cascade``: the cascade with L-Net as first stage: ``nnUNetTrainer_StSLNet`` trains L-Net
  from scratch (``locator_from_coarse`` off: the coarse model's budget), its S-Net is the cascade's
  fine model unchanged, RoIs resampled from the full-resolution image;
- ``lsnet_g0`` / ``lsnet_g01``: L-SNet trained jointly for one more schedule from that model with
  gamma 0 and 0.1 (paired: same start, same schedule).

Besides the segmentation scores, the first stage's boxes against the ground-truth boxes (the
paper's mIoU: per object, the best IoU of any box, averaged; the coarse model's boxes are its
components' bounding boxes, L-Net's its keypoints' regressed boxes without the margin) and the
parameters each first stage has.

It shares the work folder of ``python -m benchmarks.experiment_recall`` (same split, plans, coarse and
fine models; whatever is missing is trained here) and keeps its own ``results_lsnet.json``.

    python -m benchmarks.experiment_lsnet --sizes 64 --out docs/benchmarks/kvasir_lsnet.md
    python -m benchmarks.experiment_lsnet --dataset cardiac --sizes 64 --batch_size 8 --epochs 15 \\
        --out docs/benchmarks/lsnet_cardiacfat.md

GPU users: ``--epochs 1000 --iters 250 -device cuda``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nnunet_stseg.adapters.config import (DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER, DEFAULT_LSNET_TRAINER,
                                          LNET_TRAINER, coarse_config_name, fine_config_name, lsnet_config_name)
from nnunet_stseg.adapters.results import model_folder
from nnunet_stseg.atomic import write_json_atomic
from benchmarks.kvasir_arms import (failed_segmentations, kvasir_work_folder, plan_size, plot_examples,
                                   predict_and_score, train_arm)
from benchmarks.reports import OVERLAP_HEAD, OVERLAP_HEAD_PERCENT, overlap_cells
from benchmarks.runner import (add_budget_arguments, command_line, command_parser, plan_command_line,
                               plan_unless_planned, publish_report, publish_with_examples, report_header,
                               results_or_run)

ARMS = (("baseline", "nnU-Net 2d at S (downscaled whole image)"),
        ("cascade", "cascade, coarse segmentation as first stage"),
        ("lnet_cascade", "cascade, L-Net as first stage (fine model unchanged)"),
        ("lsnet_g0", "L-SNet, gamma 0"), ("lsnet_g01", "L-SNet, gamma 0.1"))
GAMMAS = {"lsnet_g0": 0.0, "lsnet_g01": 0.1}
# every Kvasir training image holds a polyp: an image without keypoint above 0.5 gets one RoI at its
# strongest peak (the plans' default, the paper's rule, would leave it empty)
FALLBACK = "best"
# seed 001, Tables 3 and 4 (NIH Pancreas-CT axial slices, U-Net backbones), published
PUBLISHED = ("Published (seed 001, NIH Pancreas-CT axial slices, U-Net): U-Net 86.56 DSC; coarse-to-fine U-Net "
             "87.41 DSC with U-Net boxes at 83.83 mIoU (14.33 M parameters); with L-Net as first stage 87.86 DSC, "
             "boxes 86.58 mIoU (14.50 M); L-SNet gamma 0 / 0.01 / 0.1 / 1: 87.86 / 88.05 / 88.20 / 87.21 DSC, "
             "validation mIoU 86.58 / 84.88 / 84.98 / 84.68.")


def lsnet_variant_name(size: int, arm: str) -> str:
    """``2d_sts_lsnet_S`` (L-Net, then gamma 0.1) and ``2d_sts_lsnet_S_g0`` (gamma 0)."""
    return lsnet_config_name(size) + ("_g0" if arm == "lsnet_g0" else "")


def add_lsnet_variants(plans_file: Path, size: int) -> dict[str, tuple[str, str]]:
    """The L-SNet configurations of S (copies of the fine one; L-Net from scratch; the gamma-0
    variant starts from the same L-Net model). Returns arm -> (configuration, trainer)."""
    from nnunet_stseg.planners.sts_planner import lsnet_configuration

    plans = json.loads(plans_file.read_text())
    configs = plans["configurations"]
    base = lsnet_config_name(size)
    for arm, gamma in GAMMAS.items():
        name = lsnet_variant_name(size, arm)
        configs[name] = lsnet_configuration(configs[fine_config_name("2d", size)], {
            "gamma": gamma, "locator_from_coarse": False, "start_configuration": base, "fallback": FALLBACK})
    write_json_atomic(plans, plans_file, indent=1)
    return {"lnet_cascade": (base, LNET_TRAINER),
            **{arm: (lsnet_variant_name(size, arm), DEFAULT_LSNET_TRAINER) for arm in GAMMAS}}


def _slice_boxes(mask: np.ndarray) -> list[np.ndarray]:
    """Object boxes (n, 2, 2) of each 2D slice of a mask (a 2D image is one slice)."""
    from nnunet_stseg.core.lsnet import object_boxes

    mask = np.asarray(mask) > 0
    return [object_boxes(m) for m in (mask.reshape(-1, *mask.shape[-2:]))]


def coarse_box_iou(prediction: Path, labels: Path, file_ending: str) -> list[float]:
    """Per ground-truth object (per slice), the best IoU of the bounding boxes of a downscaled
    model's predicted components (its segmentation at full resolution, as the cascade reads it)."""
    from benchmarks.reports import read_image
    from nnunet_stseg.core.lsnet import best_box_iou

    ious = []
    for f in sorted(Path(prediction).glob(f"*{file_ending}")):
        predicted = _slice_boxes(read_image(f))
        truth = _slice_boxes(read_image(Path(labels) / f.name))
        for p, t in zip(predicted, truth):
            ious += best_box_iou(p, t).tolist()
    return ious


def lnet_box_iou(model: Path, images: list[Path], labels: Path, file_ending: str, fold: int = 0) -> list[float]:
    """Per ground-truth object (per slice), the best IoU of the boxes L-Net (of the L-SNet model
    folder ``model``, ``fold``) regresses at its keypoints (the paper's rule, no margin, no fallback),
    against the label, both preprocessed as ``nnUNetv2_predict`` preprocesses the images."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_stseg.adapters.discovery import ensure_trainer_discovery
    from nnunet_stseg.adapters.lsnet_model import configure_lsnet
    from nnunet_stseg.core.lsnet import best_box_iou, boxes_at_keypoints, keypoints

    ensure_trainer_discovery()
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (fold,), "checkpoint_final.pth")
    net = predictor.network
    net.load_state_dict(predictor.list_of_parameters[0])
    net.eval()
    configure_lsnet(net, predictor.configuration_manager.configuration, predictor.label_manager.has_regions,
                    str(model))
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    suffix = "_0000" + file_ending
    ious = []
    for f in sorted(p for p in images if p.name.endswith(suffix)):
        case = f.name[: -len(suffix)]
        channels = sorted(f.parent.glob(f"{case}_????{file_ending}"))
        data, seg, _ = preprocessor.run_case([str(c) for c in channels], str(Path(labels) / f"{case}{file_ending}"),
                                             predictor.plans_manager, predictor.configuration_manager,
                                             predictor.dataset_json)
        with torch.no_grad():
            loc = net.locate(torch.from_numpy(np.asarray(data)).float().transpose(0, 1))  # slices as a batch
        for z, truth in enumerate(_slice_boxes(seg[0])):
            cells, _ = keypoints(torch.sigmoid(loc.heatmap[z, 0]), net.threshold)
            boxes = boxes_at_keypoints(cells, loc.distances[z], net.locator.stride, 0.0, net.locator_size,
                                       data.shape[2:]).numpy()
            ious += best_box_iou(boxes, truth).tolist()
    return ious


def images_without_keypoint(predict_log: Path) -> int:
    """Images (2D cases) whose L-Net found no keypoint above the threshold, from the predictor's log
    (one line per case that fell back)."""
    return sum("without keypoint above the threshold" in line for line in Path(predict_log).read_text().splitlines())


def parameter_counts(results_root: Path, dataset: str, size: int) -> dict:
    """Parameters of each first stage, from the checkpoints: the coarse U-Net; L-Net (the same U-Net
    architecture, whose unused last decoder stages stay in the state dict, plus the heads)."""
    import torch

    def load(trainer: str, config: str) -> dict:
        path = model_folder(dataset, trainer, config, results_root=results_root) / "fold_0" / "checkpoint_final.pth"
        return torch.load(path, map_location="cpu", weights_only=False)["network_weights"] if path.is_file() else {}

    coarse = load(DEFAULT_COARSE_TRAINER, coarse_config_name("2d", size))
    lsnet = load(LNET_TRAINER, lsnet_config_name(size))
    count = lambda sd, prefix="": int(sum(v.numel() for k, v in sd.items() if k.startswith(prefix)))  # noqa: E731
    return {"coarse": count(coarse), "lnet": count(lsnet, "locator."), "heads": count(lsnet, "locator.heads.")}


def run_experiment(workdir: Path, sizes: list[int], features: int, epochs: int, iters: int, batch_size: int | None,
                   device: str, seed: int = 0, limit: int | None = None, src: Path | None = None,
                   dataset_id: int = 720) -> dict:
    w = kvasir_work_folder(workdir, epochs, iters, seed, limit, src, dataset_id)
    workdir, env, logs, ds, dataset_json, n_test = w.workdir, w.env, w.logs, w.ds, w.dataset_json, w.n_test
    results_file = workdir / "results_lsnet.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    plans_file = Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json"
    results.update({"dataset_folder": str(ds), "budget": {
        "features": features, "epochs": epochs, "iters": iters, "device": device, "seed": seed, "dataset": ds.name,
        "n_test": n_test, "batch_size": batch_size}})
    results.setdefault("sizes", {})
    results_root = Path(env["nnUNet_results"])

    def save() -> None:
        write_json_atomic(results, results_file, indent=1)

    for s in sizes:
        plan_size(w, dataset_id, s, features, batch_size)
        row = results["sizes"].setdefault(str(s), {"S": s})
        configs = {"baseline": (coarse_config_name("2d", s), DEFAULT_COARSE_TRAINER),
                   "cascade": (fine_config_name("2d", s), DEFAULT_FINE_TRAINER), **add_lsnet_variants(plans_file, s)}
        train = {}
        for arm, (config, trainer) in configs.items():  # in order: coarse, fine, L-Net, then both L-SNets
            # the coarse and fine models are benchmarks.experiment_recall's (its file names); two trainers share an L-SNet one
            name = f"train_{config}" if arm in ("baseline", "cascade") else f"train_{trainer}_{config}"
            train[arm] = logs / f"{name}.json"
            train_arm(ds.name, config, trainer, device, env, logs / f"{name}.log", train[arm])
        for arm, (config, trainer) in configs.items():
            if arm not in row:
                out = workdir / f"pred_lsnet_exp_{arm}_{s}"
                row[arm] = predict_and_score(ds, out, dataset_id, config, trainer, device, env,
                                             logs / f"predict_lsnet_exp_{arm}_{s}.log", dataset_json, n_test,
                                             train[arm])
                row[arm]["failed"] = failed_segmentations(out)
                save()
            if train[arm].is_file():  # a later call may find the seconds of a training an earlier one did not time
                row[arm]["train_s"] = json.loads(train[arm].read_text())["seconds"]
            if arm in ("lnet_cascade", *GAMMAS):
                row[arm]["no_keypoint"] = images_without_keypoint(logs / f"predict_lsnet_exp_{arm}_{s}.log")
        labels = ds / "labelsTs"
        if "box_iou" not in row.get("baseline", {}):
            row["baseline"]["box_iou"] = coarse_box_iou(Path(row["baseline"]["prediction"]), labels, ".png")
        for arm in ("lnet_cascade", *GAMMAS):
            if "box_iou" not in row[arm]:
                config, trainer = configs[arm]
                row[arm]["box_iou"] = lnet_box_iou(model_folder(ds.name, trainer, config, results_root=results_root),
                                                   sorted((ds / "imagesTs").glob("*.png")), labels, ".png")
                save()
        row["parameters"] = parameter_counts(results_root, ds.name, s)
        save()
    return results


def run_cardiac_experiment(workdir: Path, size: int, features: int, epochs: int, iters: int, batch_size: int,
                           device: str, folds: int = 2, seed: int = 0, canvas: int = 256, command: str = "",
                           limit: int | None = None, only_folds: list[int] | None = None) -> dict:
    """The same arms on Cardiac Fat CT, 2D axial slices, per-patient ``folds``-fold cross-validation:
    every patient predicted by the fold models that did not train on it, scored per patient at 512 x 512
    (pericardium and EAT). L-Net's training canvas is ``canvas`` (whole slices resampled to it; the
    RoIs are still cut from the full-resolution slice at inference); slices without pericardium get
    no RoI (the plans' ``empty`` fallback). ``only_folds``: train and score these folds only (their
    validation patients), e.g. half of the cross-validation when time is short."""
    import os

    from benchmarks.reports import score_folder
    from benchmarks.runner import (CARDIAC_FAT_ID, pipeline_env, predict_command_line, prepare_cardiac,
                                   run_measured, train_fold)
    from nnunet_stseg.planners.sts_planner import lsnet_configuration

    workdir = Path(workdir).resolve()
    env = pipeline_env(workdir, epochs, iters)
    env["nnUNet_n_proc_DA"] = os.environ.get("nnUNet_n_proc_DA", "1")
    env["STSEG_SKIP_VALIDATION"] = "1"  # every validation patient is predicted below
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ds, evals = prepare_cardiac(workdir, env, folds, seed, limit=limit)
    evals = [(f, images) for f, images in evals if only_folds is None or f in only_folds]
    file_ending = json.loads((ds / "dataset.json").read_text())["file_ending"]
    plans_file = Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json"
    plan_unless_planned(plans_file, coarse_config_name("2d", size),
                        plan_command_line(CARDIAC_FAT_ID, size, ("2d",), features, batch_size=batch_size), env,
                        logs / "plan.log")
    plans = json.loads(plans_file.read_text())
    base = lsnet_config_name(size)
    for arm, gamma in GAMMAS.items():
        plans["configurations"][lsnet_variant_name(size, arm)] = lsnet_configuration(
            plans["configurations"][fine_config_name("2d", size)],
            {"gamma": gamma, "locator_from_coarse": False, "start_configuration": base, "canvas": [canvas, canvas]})
    write_json_atomic(plans, plans_file, indent=1)
    configs = {"baseline": (coarse_config_name("2d", size), DEFAULT_COARSE_TRAINER),
               "cascade": (fine_config_name("2d", size), DEFAULT_FINE_TRAINER),
               "lnet_cascade": (base, LNET_TRAINER),
               **{arm: (lsnet_variant_name(size, arm), DEFAULT_LSNET_TRAINER) for arm in GAMMAS}}
    results_file = workdir / "results_lsnet.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update({"data": "cardiac", "S": size, "command": command, "budget": {
        "features": features, "batch_size": batch_size, "epochs": epochs, "iters": iters, "device": device,
        "folds": [f for f, _ in evals], "seed": seed, "canvas": canvas}})
    train_s = results.setdefault("train_s", {})
    for f, _ in evals:
        for arm, (config, trainer) in configs.items():  # coarse, fine, L-Net, then both L-SNets
            seconds = train_fold(ds.name, config, f, trainer, device, env, logs / f"train_{arm}_{f}.log")
            if seconds is not None:
                train_s[f"{arm}/{f}"] = train_s.get(f"{arm}/{f}", 0.0) + seconds
                write_json_atomic(results, results_file, indent=1)
    infer, arms = results.setdefault("inference_s", {}), results.setdefault("arms", {})
    regions = {"pericardium": (1, 2), "eat": (2,)}
    for arm, (config, trainer) in configs.items():
        out = workdir / "predictions" / arm
        for f, images in evals:
            if f"{arm}/{f}" not in infer:
                seconds, _ = run_measured(predict_command_line(images[0].parent, out, CARDIAC_FAT_ID, config, trainer,
                                                                [f], device, "--disable_tta", "-npp", "1", "-nps", "1"),
                                          env, logs / f"predict_{arm}_{f}.log")
                infer[f"{arm}/{f}"] = {"seconds": seconds, "images": len(images)}
                write_json_atomic(results, results_file, indent=1)
        if arm not in arms:
            arms[arm] = score_folder(out, ds / "labelsTr", file_ending, regions)
        if "box_iou" not in arms[arm] and arm != "cascade":
            if arm == "baseline":
                arms[arm]["box_iou"] = coarse_box_iou(out, ds / "labelsTr", file_ending)
            else:
                arms[arm]["box_iou"] = [v for f, images in evals for v in lnet_box_iou(
                    model_folder(ds.name, trainer, config, results_root=env["nnUNet_results"]), images,
                    ds / "labelsTr", file_ending, fold=f)]
        write_json_atomic(results, results_file, indent=1)
    results["parameters"] = parameter_counts(Path(env["nnUNet_results"]), ds.name, size)
    results["files"] = {"gt_dir": str(ds / "labelsTr"), "file_ending": file_ending,
                        "image_dirs": sorted({str(p.parent) for _, images in evals for p in images})}
    write_json_atomic(results, results_file, indent=1)
    return results


def cardiac_report(results: dict, cmd: str) -> str:
    b, s = results["budget"], results["S"]
    arms = results.get("arms", {})
    n_patients = arms.get("baseline", {}).get("n_cases", "all")
    lines = [*report_header("Cardiac Fat CT: L-SNet (a detection first stage and RoI recalibration)", cmd),
             f"Budget per network and fold: width {b['features']}, batch {b['batch_size']}, {b['epochs']} x "
             f"{b['iters']} iterations, device {b['device']}; folds {b['folds']} of a per-patient 2-fold split (seed "
             f"{b['seed']}), S = {s}; L-Net and L-SNet train on whole slices resampled to {b['canvas']} x "
             f"{b['canvas']}. Each patient is predicted by the fold models that did not train on it (TTA off) and "
             f"scored per patient at 512 x 512 (mean ± sd over {n_patients} patients). Arms as in the Kvasir report: "
             f"L-Net "
             f"from scratch for one schedule with the cascade's fine model as its S-Net, then L-SNet for one more "
             f"schedule from it (gamma 0 and 0.1, paired). Every arm trained once. First-stage box mIoU: per "
             f"ground-truth object of every slice (8-connected component of pericardium), the best IoU of the "
             f"first stage's boxes, averaged (L-Net: keypoints above 0.5, no margin).", "",
             f"| arm | pericardium {OVERLAP_HEAD} | EAT DSC | first-stage box mIoU % | s per patient | training s "
             f"(all folds) |", "|---" * 11 + "|"]
    for arm, label in ARMS:
        if arm not in arms:
            continue
        r = arms[arm]
        source = arms.get("baseline" if arm == "cascade" else arm, {}).get("box_iou")
        inf = [v for k, v in results.get("inference_s", {}).items() if k.startswith(arm + "/")]
        sec = sum(v["seconds"] for v in inf) / max(1, sum(v["images"] for v in inf))
        t = sum(v for k, v in results.get("train_s", {}).items() if k.split("/")[0] == arm)
        miou = f"{100 * float(np.mean(source)):.2f}" if source else "-"
        eat = f"{r['eat_Dice'][0]:.3f} ± {r['eat_Dice'][1]:.3f}"
        lines.append(f"| {label} | {overlap_cells(r, 'pericardium')} | {eat} | {miou} | {sec:.2f} | {t:.0f} |")
    p = results.get("parameters")
    if p:
        lines += ["", f"First-stage parameters: coarse U-Net {p['coarse'] / 1e6:.3f} M; L-Net {p['lnet'] / 1e6:.3f} M "
                  f"(heads {p['heads'] / 1e6:.3f} M)."]
    return "\n".join(lines + ["", PUBLISHED, ""]) + "\n"


def _train_cell(row: dict, arm: str) -> str:
    """Training seconds of the arm's networks, in the order they were trained."""
    t = {a: row[a].get("train_s", float("nan")) for a in row if isinstance(row[a], dict) and a in dict(ARMS)}
    parts = {"baseline": [t["baseline"]], "cascade": [t["baseline"], t["cascade"]],
             "lnet_cascade": [t["lnet_cascade"], t["cascade"]]}
    parts.update({a: [t["lnet_cascade"], t["cascade"], t[a]] for a in GAMMAS if a in t})
    return " + ".join(f"{v:.0f}" for v in parts.get(arm, []))


def _first_stage_cell(row: dict, arm: str) -> str:
    source = "baseline" if arm in ("baseline", "cascade") else arm
    ious = row.get(source, {}).get("box_iou")
    return f"{100 * float(np.mean(ious)):.2f}" if ious else "-"


def report(results: dict, cmd: str) -> str:
    b = results["budget"]
    lines = [*report_header("Kvasir-SEG: L-SNet (a detection first stage and RoI recalibration)", cmd),
             f"Budget per network: width {b['features']}, {b['epochs']} x {b['iters']} iterations, batch size "
             f"{b['batch_size'] or 'planned'}, device {b['device']}; split seed {b['seed']} (80/10/10), images at "
             f"256 x 256; {b['n_test']} test images, TTA off. L-Net is trained from scratch for one schedule (the "
             f"coarse model's budget); the cascade with L-Net uses the cascade's fine model unchanged, so the two "
             f"cascades differ only in their first stage. Both L-SNets start from that model and train jointly for "
             f"one more schedule (paired: same start, same schedule, only gamma differs). Every arm was trained "
             f"once; at this budget the same arm varies by 2-4 DSC points between runs. First-stage box mIoU: per "
             f"ground-truth object the best IoU of the first stage's boxes (coarse model: bounding boxes of its "
             f"predicted components; L-Net: its keypoints' regressed boxes, no margin), averaged over objects; "
             f"the L-SNet rows measure their jointly trained L-Net (the paper's rule: keypoints above 0.5 only, so an "
             f"object without one counts 0). Segmentation arms with L-Net use the '{FALLBACK}' fallback (every "
             f"training image holds a polyp): an image without keypoint gets one RoI at its strongest peak (how many "
             f"did: the last column).", ""]
    for s, row in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        p = row.get("parameters", {})
        lines += [f"## S = {s}", "",
                  f"| arm | {OVERLAP_HEAD_PERCENT} | failed (Jaccard < 0.65) | first-stage box mIoU % | ms / image | "
                  f"training s (networks in order) | images without keypoint |", "|---" * 12 + "|"]
        for arm, label in ARMS:
            if arm in row:
                r = row[arm]
                lines.append(f"| {label} | {overlap_cells(r, digits=2)} | {r.get('failed', '-')} | "
                             f"{_first_stage_cell(row, arm)} | {r['ms_per_image']:.0f} | {_train_cell(row, arm)} | "
                             f"{r.get('no_keypoint', '-')} |")
        if p:
            lines += ["", f"First-stage parameters: coarse U-Net {p['coarse'] / 1e6:.3f} M; L-Net "
                      f"{p['lnet'] / 1e6:.3f} M "
                      f"(the same U-Net, whose decoder stages below the heads' stride stay in the checkpoint but are "
                      f"not run, plus {p['heads'] / 1e6:.3f} M in the two heads)."]
        lines.append("")
    lines += [PUBLISHED, ""]
    return "\n".join(lines) + "\n"


def example_figure(results: dict, path: Path) -> Path | None:
    """Overlays of every arm at the smallest S on the test images with the lowest, median and highest
    DSC of L-SNet (gamma 0.1)."""
    sizes = sorted(results.get("sizes", {}), key=int)
    if not sizes:
        return None
    s, row = sizes[0], results["sizes"][sizes[0]]
    predictions = {f"{arm} S = {s}": Path(row[arm]["prediction"]) for arm, _ in ARMS if arm in row}
    ranked = f"lsnet_g01 S = {s}"
    return plot_examples(Path(results["dataset_folder"]), predictions, ranked, path) if ranked in predictions else None


def main(argv=None) -> None:
    p = command_parser("experiment_lsnet", __doc__)
    p.add_argument("--dataset", choices=("kvasir", "cardiac"), default="kvasir",
                   help="kvasir: 256 x 256, the seeded split; cardiac: Cardiac Fat CT, per-patient 2-fold CV")
    p.add_argument("--workdir", type=Path, default=None,
                   help="work folder (kvasir: shared with benchmarks.experiment_recall, work_dirs/kvasir_recall; cardiac: "
                        "work_dirs/lsnet_cardiac)")
    p.add_argument("--canvas", type=int, default=256, help="cardiac: L-Net/L-SNet training canvas (256)")
    p.add_argument("--only_folds", type=int, nargs="+", default=None,
                   help="cardiac: train and score only these folds of the 2-fold split (default both)")
    p.add_argument("--src", type=Path, default=None, help="Kvasir-SEG folder (default kvasir-seg/ in the --data folder)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64], help="input sizes S (64)")
    add_budget_arguments(p, features=16, batch_size=16, epochs=30, iters=50)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images / patients (smoke runs)")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from results_lsnet.json")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    if args.dataset == "cardiac":
        workdir = (args.workdir or Path("work_dirs/lsnet_cardiac")).resolve()
        results = results_or_run(p, args.report_only, workdir / "results_lsnet.json", lambda: run_cardiac_experiment(
            workdir, args.sizes[0], args.features, args.epochs, args.iters, args.batch_size, args.device,
            seed=args.seed, canvas=args.canvas, command=cmd, limit=args.limit, only_folds=args.only_folds), cmd)
        publish_report(cardiac_report(results, results.get("command", cmd)), args.out)
        return
    workdir = (args.workdir or Path("work_dirs/kvasir_recall")).resolve()
    results = results_or_run(p, args.report_only, workdir / "results_lsnet.json", lambda: run_experiment(
        workdir, args.sizes, args.features, args.epochs, args.iters, args.batch_size, args.device,
        seed=args.seed, limit=args.limit, src=args.src), cmd)
    publish_with_examples(report(results, results.get("command", cmd)), args.out,
                          lambda path: example_figure(results, path),
                          "Test images with the lowest, median and highest DSC of L-SNet (gamma 0.1) at the smallest S")


if __name__ == "__main__":
    main()
