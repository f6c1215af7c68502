"""Experiment (issue 22): recall-first proposals and a fine stage that can reject, on Kvasir-SEG 256².

    nnunet-stseg experiment-recall --workdir work_dirs/kvasir_recall --sizes 32 64 \
        --out docs/benchmarks/kvasir_recall.md

The protocol of ``experiment-kvasir`` (Kvasir-SEG resized to 256 x 256, the same seeded 80/10/10
split, width, batch size and schedule for every network, scored on the 100 test images at 256²).
For every S, one coarse model (the downscaled baseline at S) and two fine models trained on the
same split with the same budget:

- ``fine``: crops around objects only (the published method: ``negative_fraction`` 0);
- ``fine_rejects`` (the "rejecting fine" stage): the same with ``--negative_fraction`` of its crops drawn where there is no
  object (``2d_sts_fine_S_rf``, a copy of the fine configuration on the same preprocessed data).

The proposal threshold is chosen per fine model on the 100 VALIDATION images (fold 0's
validation split; never the test images): each candidate of ``--thresholds`` (plus ``none``, the
argmax components only) is predicted there and the one with the highest mean DSC is kept (ties:
the higher threshold, fewer crops). The test arms, all with the SAME coarse model (pair
comparisons):

| arm | fine model | proposals |
|---|---|---|
| baseline S | - | - (the coarse model alone) |
| cascade | fine | argmax components (the published cascade) |
| cascade + low proposals | fine | its validation-chosen threshold |
| cascade + lowest-t proposals | fine | the lowest threshold tried (most recall) |
| rejecting fine | fine_rejects | argmax components |
| recall-first | fine_rejects | its validation-chosen threshold |
| recall-first, lowest t | fine_rejects | the lowest threshold tried (the issue's design point) |
| baseline 2S | - | - (the coarse model of 2S) |

The lowest-t arms show what recall-first proposals do on the test images whatever validation
chose; they never choose a default. Why the cascade's misses stay missed: the coarse model's
probabilities on the test images are exported once (``--save_probabilities``) and the report
bins its highest foreground probability inside every missed polyp. Per arm: DSC, IoU, precision, recall (mean +- sd over images), empty predictions, images missed
(DSC < 0.1), crops per image and proposals below the coarse decision (from the
``<case>.objects.json`` files), whole ``nnUNetv2_predict`` time per image; a per-image table of
every image some arm misses. Resumable: finished trainings and arms are kept (``--repredict``
predicts every arm again). GPU users: ``--epochs 1000 --iters 250 -device cuda``.
"""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from nnunet_stseg.adapters.config import (DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER, coarse_config_name,
                                          fine_config_name)
from nnunet_stseg.atomic import write_json_atomic
from nnunet_stseg.commands.experiment_kvasir import MISSED_DICE, per_case_dice, predict_and_score, train_arm
from nnunet_stseg.commands.reports import OVERLAP_HEAD_PERCENT, overlap_cells
from nnunet_stseg.commands.runner import (add_budget_arguments, command_line, command_parser, pipeline_env,
                                          plan_command_line, plan_unless_planned, predict_command_line, publish_report,
                                          report_header, results_or_run, run, shared_data)
from nnunet_stseg.settings import PROPOSAL_THRESHOLD_ENV

ARMS = (("baseline", "baseline S"), ("cascade", "cascade"), ("cascade_low", "cascade + low proposals"),
        ("cascade_lowest", "cascade + lowest-t proposals"), ("rejecting", "rejecting fine"),
        ("recall_first", "recall-first"), ("recall_first_lowest", "recall-first, lowest t"),
        ("baseline_2s", "baseline 2S"))


def rejecting_config_name(size: int) -> str:
    return f"{fine_config_name('2d', size)}_rf"


def add_fine_variants(plans_file: Path, size: int, negative_fraction: float) -> tuple[str, str]:
    """The plans' fine configuration of S set to the published crops (no negatives, argmax
    proposals) and its copy ``2d_sts_fine_S_rf`` with ``negative_fraction`` (same preprocessed
    data). Returns both names."""
    plans = json.loads(plans_file.read_text())
    configs = plans["configurations"]
    fine, rejecting = fine_config_name("2d", size), rejecting_config_name(size)
    configs[fine]["sts"]["crop"].update(proposal_threshold=None, negative_fraction=0.0)
    configs[rejecting] = deepcopy(configs[fine])
    configs[rejecting]["sts"]["crop"]["negative_fraction"] = float(negative_fraction)
    write_json_atomic(plans, plans_file, indent=1)
    return fine, rejecting


def validation_folders(ds: Path, workdir: Path) -> tuple[Path, Path]:
    """Folders of links to fold 0's validation images and labels (the converter's split)."""
    from nnunet_stseg.data.kvasir import SPLIT_FILE

    split = json.loads((ds / SPLIT_FILE).read_text())
    images, labels = workdir / "val_images", workdir / "val_labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for case in split["val"]:
        for src, dst in ((ds / "imagesTr" / f"{case}_0000.png", images / f"{case}_0000.png"),
                         (ds / "labelsTr" / f"{case}.png", labels / f"{case}.png")):
            if not dst.exists():
                dst.symlink_to(src)
    return images, labels


def kvasir_work_folder(workdir: Path, epochs: int, iters: int, seed: int = 0, limit: int | None = None,
                       src: Path | None = None, dataset_id: int = 720) -> SimpleNamespace:
    """The work folder the Kvasir-SEG 256 x 256 experiments share (recall-first, end-to-end): the
    stock commands' environment and logs, the dataset converted once with the seeded split, links
    to its validation images. Fields: ``workdir, env, logs, ds, dataset_json, n_test, val_images,
    val_labels, n_val``."""
    from nnunet_stseg.data.kvasir import convert_kvasir, kvasir_ids

    workdir = Path(workdir).resolve()
    env = pipeline_env(workdir, epochs, iters)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    raw = Path(env["nnUNet_raw"])
    existing = sorted(raw.glob(f"Dataset{dataset_id:03d}_*")) if raw.is_dir() else []
    src = Path(src) if src else shared_data() / "kvasir-seg"
    ds = existing[0] if existing else convert_kvasir(src, raw, dataset_id, size=256, seed=seed,
                                                     ids=kvasir_ids(src)[:limit] if limit else None)
    val_images, val_labels = validation_folders(ds, workdir)
    return SimpleNamespace(workdir=workdir, env=env, logs=logs, ds=ds,
                           dataset_json=json.loads((ds / "dataset.json").read_text()),
                           n_test=len(list((ds / "imagesTs").glob("*.png"))), val_images=val_images,
                           val_labels=val_labels, n_val=len(list(val_images.glob("*.png"))))


def proposal_counts(prediction: Path) -> dict:
    """Crops per image and proposals below the coarse decision per image, from the objects reports."""
    reports = [json.loads(f.read_text()) for f in sorted(Path(prediction).glob("*.objects.json"))]
    if not reports:
        return {"crops_per_image": float("nan"), "low_proposals_per_image": float("nan")}
    crops = [r["n_objects"] for r in reports]
    low = [sum(o.get("proposal") == "below the coarse decision" for o in r["objects"]) for r in reports]
    return {"crops_per_image": float(np.mean(crops)), "low_proposals_per_image": float(np.mean(low))}


def missed(prediction: Path) -> int:
    return int(sum(d < MISSED_DICE for d in per_case_dice(Path(prediction) / "summary_test.json").values()))


def negative_room(preprocessed: Path, configuration: str, n_cases: int = 200, seed: int = 0) -> dict | None:
    """How often the rejecting fine stage's loader finds room for a negative crop: for the first
    ``n_cases`` training cases with objects, one draw each (with nnU-Net's 2D rotation margin,
    the initial patch of ``get_patch_size``), counted as in training, and how large the negatives
    are (side over the case's smallest object crop side: below 0.75 the loader had to shrink them).
    Cases where none fits get an object crop instead, so the effective negative rate is
    ``negative_fraction x fits``. None when the configuration's data is not preprocessed."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.config import StSConfig
    from nnunet_stseg.core.geometry import square_and_pad
    from nnunet_stseg.trainers.sts_trainers import StSCropDataLoader

    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"].get(configuration)
    if cfg is None or not (preprocessed / cfg["data_identifier"]).is_dir():
        return None  # not preprocessed (a smoke run)
    dataset = infer_dataset_class(str(preprocessed / cfg["data_identifier"]))(str(preprocessed / cfg["data_identifier"]))
    labels = PlansManager(plans).get_label_manager(json.loads((preprocessed / "dataset.json").read_text()))
    sts = StSConfig.from_configuration(cfg)
    patch = [int(v) for v in cfg["patch_size"]]
    rotation = (-np.pi, np.pi)  # nnU-Net's 2D rotation for square patches
    initial = [int(v) for v in get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))]
    loader = StSCropDataLoader(dataset, 1, (1, *initial), (1, *patch), labels, sts.crop, [1.0, 1.0, 1.0])
    rng = np.random.default_rng(seed)
    tried = fits = 0
    ratios = []
    for key in list(dataset.identifiers):
        if tried == n_cases:
            break
        data, seg, _, _ = dataset.load_case(key)
        if loader.foreground(seg).any():
            tried += 1
            box = loader.sample_negative(key, tuple(data.shape[1:]), seg, rng)
            if box is not None:
                fits += 1
                _, sizes = square_and_pad(loader._gt_boxes(key, seg), loader.spacing3, sts.crop)
                active = sts.crop.active
                ratios.append(float((box[0, :, 1] - box[0, :, 0])[active].max() / sizes[:, active].max(axis=1).min()))
    ratios = np.asarray(ratios)
    return {"cases": tried, "fits": fits, "initial_patch": initial,
            "shrunk": int((ratios < 0.75).sum()), "median_side_ratio": float(np.median(ratios)) if fits else None}


PEAK_BINS = (0.3, 0.1)  # the report's bins of the coarse model's peak probability inside a missed polyp


def coarse_peaks_in_objects(probabilities: Path, labels: Path) -> dict[str, float]:
    """Per test image: the coarse model's highest foreground probability (1 - background) inside the
    ground-truth object, from its ``--save_probabilities`` export (original resolution). A missed
    image whose peak is below a proposal threshold cannot be recovered by that threshold."""
    from skimage.io import imread

    peaks = {}
    for npz in sorted(Path(probabilities).glob("*.npz")):
        case = npz.name[:-len(".npz")]
        fg = 1.0 - np.load(npz)["probabilities"][0]
        gt = imread(str(Path(labels) / f"{case}.png")).reshape(fg.shape) > 0
        peaks[f"{case}.png"] = float(fg[gt].max()) if gt.any() else float("nan")
    return peaks


def miss_causes(row: dict) -> list[str]:
    """Why the cascade's misses stay missed: for the images the published cascade misses, the
    coarse model's peak probability inside the polyp, binned at the proposal thresholds."""
    peaks = row.get("coarse_peaks")
    if not peaks or "cascade" not in row:
        return []
    dice = per_case_dice(Path(row["cascade"]["prediction"]) / "summary_test.json")
    missed_peaks = np.array([peaks[c] for c, d in dice.items() if d < MISSED_DICE and c in peaks])
    high, low = PEAK_BINS
    return [f"Why misses stay missed: of the {len(missed_peaks)} test images the cascade misses, the coarse "
            f"model's highest foreground probability inside the polyp is >= {high} in "
            f"{int((missed_peaks >= high).sum())}, in [{low}, {high}) in "
            f"{int(((missed_peaks >= low) & (missed_peaks < high)).sum())} and below {low} in "
            f"{int((missed_peaks < low).sum())} (median {np.median(missed_peaks) if len(missed_peaks) else float('nan'):.3f}); "
            f"a proposal threshold t can only reach the first groups, and a reached polyp still needs the "
            f"fine stage to segment it.", ""]


def choose_threshold(scores: dict[str, float]) -> str:
    """The candidate with the highest validation DSC; ties go to the higher threshold ('none' is
    the highest: fewest crops).

    >>> choose_threshold({"none": 0.70, "0.3": 0.72, "0.1": 0.72})
    '0.3'
    """
    def height(t: str) -> float:
        return 1.0 if t == "none" else float(t)

    best = max(scores.values())
    return max((t for t, v in scores.items() if v >= best - 1e-9), key=height)


def run_experiment(workdir: Path, sizes: list[int], features: int, epochs: int, iters: int, batch_size: int | None,
                   device: str, thresholds: list[float], negative_fraction: float, seed: int = 0,
                   limit: int | None = None, src: Path | None = None, repredict: bool = False,
                   dataset_id: int = 720) -> dict:
    from nnunet_stseg.data.kvasir import install_split

    w = kvasir_work_folder(workdir, epochs, iters, seed, limit, src, dataset_id)
    workdir, env, logs, ds, dataset_json = w.workdir, w.env, w.logs, w.ds, w.dataset_json
    n_test, val_images, val_labels, n_val = w.n_test, w.val_images, w.val_labels, w.n_val
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() and not repredict else {}
    plans_file = Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json"
    results.update({"dataset_folder": str(ds), "budget": {
        "features": features, "epochs": epochs, "iters": iters, "device": device, "seed": seed, "dataset": ds.name,
        "n_test": n_test, "n_val": n_val, "batch_size": batch_size, "negative_fraction": negative_fraction,
        "thresholds": ["none", *[str(t) for t in thresholds]]}})
    results.setdefault("sizes", {})

    def save() -> None:
        write_json_atomic(results, results_file, indent=1)

    def arm(row: dict, name: str, config: str, trainer: str, threshold: str | None, train_log: Path,
            images: Path | None = None, labels: Path | None = None, n: int = n_test, tag: str = "") -> dict:
        key = name + tag
        if key not in row:
            run_env = {**env, PROPOSAL_THRESHOLD_ENV: threshold} if threshold is not None else env
            out = workdir / f"pred_{key}_{row['S']}"
            r = predict_and_score(ds, out, dataset_id, config, trainer, device, run_env,
                                  logs / f"predict_{key}_{row['S']}.log", dataset_json, n, train_log, images, labels)
            row[key] = {**r, **proposal_counts(out), "missed": missed(out), "threshold": threshold}
            save()
        return row[key]

    for s in sizes:
        for size in (s, 2 * s):
            plan_unless_planned(plans_file, coarse_config_name("2d", size),
                                plan_command_line(dataset_id, size, ("2d",), features, batch_size=batch_size), env,
                                logs / f"plan_{size}.log")
        install_split(ds, plans_file.parent)
        fine, rejecting = add_fine_variants(plans_file, s, negative_fraction)
        row = results["sizes"].setdefault(str(s), {})
        row["S"] = s
        coarse, coarse_2s = coarse_config_name("2d", s), coarse_config_name("2d", 2 * s)
        train = {}
        for config, trainer in ((coarse, DEFAULT_COARSE_TRAINER), (fine, DEFAULT_FINE_TRAINER),
                                (rejecting, DEFAULT_FINE_TRAINER), (coarse_2s, DEFAULT_COARSE_TRAINER)):
            train[config] = logs / f"train_{config}.json"
            train_arm(ds.name, config, trainer, device, env, logs / f"train_{config}.log", train[config])
        # thresholds of each fine model, chosen on the validation images
        chosen = {}
        for model, config in (("fine", fine), ("rejecting", rejecting)):
            scores = {}
            for t in results["budget"]["thresholds"]:
                r = arm(row, f"val_{model}", config, DEFAULT_FINE_TRAINER, t, train[config], val_images, val_labels,
                        n_val, tag=f"_{t}")
                scores[t] = r["Dice"][0]
            chosen[model] = choose_threshold(scores)
        row["chosen_threshold"] = chosen
        row["negative_room"] = negative_room(plans_file.parent, rejecting)
        arm(row, "baseline", coarse, DEFAULT_COARSE_TRAINER, None, train[coarse])
        arm(row, "cascade", fine, DEFAULT_FINE_TRAINER, "none", train[fine])
        arm(row, "cascade_low", fine, DEFAULT_FINE_TRAINER, chosen["fine"], train[fine])
        arm(row, "rejecting", rejecting, DEFAULT_FINE_TRAINER, "none", train[rejecting])
        arm(row, "recall_first", rejecting, DEFAULT_FINE_TRAINER, chosen["rejecting"], train[rejecting])
        # the design point of the issue whatever validation chose: the lowest threshold tried (most recall);
        # reported, never used to choose a default
        lowest = str(min(thresholds))
        arm(row, "cascade_lowest", fine, DEFAULT_FINE_TRAINER, lowest, train[fine])
        arm(row, "recall_first_lowest", rejecting, DEFAULT_FINE_TRAINER, lowest, train[rejecting])
        arm(row, "baseline_2s", coarse_2s, DEFAULT_COARSE_TRAINER, None, train[coarse_2s])
        if "coarse_peaks" not in row:  # the coarse model's probabilities on the test images, for miss_causes
            probabilities = workdir / f"coarse_probabilities_{s}"
            run(predict_command_line(ds / "imagesTs", probabilities, dataset_id, coarse, DEFAULT_COARSE_TRAINER, [0],
                                     device, "--disable_tta", "--save_probabilities"), env,
                logs / f"predict_coarse_probabilities_{s}.log")
            row["coarse_peaks"] = coarse_peaks_in_objects(probabilities, ds / "labelsTs")
        save()
    return results


def detection_table(row: dict) -> list[str]:
    """Per image DSC of every arm, for the images that at least one arm misses (DSC < 0.1)."""
    dice = {name: per_case_dice(Path(row[name]["prediction"]) / "summary_test.json") for name, _ in ARMS
            if name in row}
    cases = sorted(c for c in next(iter(dice.values())) if any(d.get(c, 1.0) < MISSED_DICE for d in dice.values()))
    if not cases:
        return ["No test image is missed by any arm."]
    lines = ["| image | " + " | ".join(label for name, label in ARMS if name in dice) + " |",
             "|---" * (len(dice) + 1) + "|"]
    for c in cases:
        lines.append(f"| {c[:-len('.png')]} | " + " | ".join(
            (f"**{d[c]:.2f}**" if d[c] < MISSED_DICE else f"{d[c]:.2f}") for d in dice.values()) + " |")
    return lines


def report(results: dict, cmd: str) -> str:
    b = results["budget"]
    lines = [*report_header("Kvasir-SEG: recall-first proposals and a fine stage that can reject", cmd),
             f"Budget per network: width {b['features']}, {b['epochs']} x {b['iters']} iterations, batch size "
             f"{b['batch_size'] or 'planned'}, device {b['device']}; split seed {b['seed']} (80/10/10): thresholds "
             f"chosen on the {b['n_val']} validation images among {', '.join(b['thresholds'])}, arms scored on the "
             f"{b['n_test']} test images at 256 x 256. Rejecting fine stage: negative_fraction "
             f"{b['negative_fraction']}. Every cascade arm of one S uses the same coarse model (pair comparisons, "
             f"one training run per network: at this budget the same arm varies by 2-4 DSC points between runs).", ""]
    for s, row in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        chosen = row.get("chosen_threshold", {})
        lines += [f"## S = {s}", "",
                  "Validation DSC % per proposal threshold (fine / rejecting fine): " + ", ".join(
                      f"{t}: {row[f'val_fine_{t}']['Dice'][0]:.2f} / {row[f'val_rejecting_{t}']['Dice'][0]:.2f}"
                      for t in b["thresholds"] if f"val_fine_{t}" in row and f"val_rejecting_{t}" in row)
                  + f"; chosen: fine {chosen.get('fine')}, rejecting fine {chosen.get('rejecting')}.", ""]
        room = row.get("negative_room")
        if room:
            shrunk = (f"; {room['shrunk']} of them smaller than 0.75 x the object crop (median side "
                      f"{room['median_side_ratio']:.2f} x the case's smallest object crop)"
                      if room.get("median_side_ratio") is not None else "")
            lines += [f"Room for a negative crop (one draw per image as in training, nnU-Net's rotation margin, patch "
                      f"{room['initial_patch']}): {room['fits']} of {room['cases']} training images with a polyp"
                      f"{shrunk}; in the others the sample is an object crop, so the effective negative rate is "
                      f"about {b['negative_fraction']} x {room['fits'] / max(room['cases'], 1):.2f} = "
                      f"{b['negative_fraction'] * room['fits'] / max(room['cases'], 1):.2f}.", ""]
        lines += [
                  f"| arm | proposals | {OVERLAP_HEAD_PERCENT} | missed (DSC < 0.1) | crops / image | "
                  f"below-decision proposals / image | ms / image |", "|---" * 11 + "|"]
        for name, label in ARMS:
            if name not in row:
                continue
            r = row[name]
            size = 2 * int(s) if name == "baseline_2s" else int(s)
            label = label.replace("2S", str(size)).replace("S", str(size)) if name.startswith("baseline") else label
            crops = "-" if np.isnan(r["crops_per_image"]) else f"{r['crops_per_image']:.2f}"
            low = "-" if np.isnan(r["low_proposals_per_image"]) else f"{r['low_proposals_per_image']:.2f}"
            lines.append(f"| {label} | {r['threshold'] or '-'} | {overlap_cells(r, digits=2)} | {r['missed']} | "
                         f"{crops} | {low} | {r['ms_per_image']:.0f} |")
        lines += ["", *miss_causes(row), f"Test images some arm misses (DSC; bold: missed), S = {s}:", "",
                  *detection_table(row), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = command_parser("experiment-recall", __doc__)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/kvasir_recall"))
    p.add_argument("--src", type=Path, default=None, help="Kvasir-SEG folder (default ../shared/data/kvasir-seg)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="input sizes S (32 64)")
    add_budget_arguments(p, features=16, batch_size=16, epochs=30, iters=50)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.2, 0.1],
                   help="proposal thresholds tried on the validation images besides 'none' (0.3 0.2 0.1)")
    p.add_argument("--negative_fraction", type=float, default=0.25,
                   help="negative crops of the rejecting fine stage (0.25)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    p.add_argument("--repredict", action="store_true", help="predict and score every arm again")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from the work folder's results.json")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    results_file = args.workdir.resolve() / "results.json"
    results = results_or_run(p, args.report_only, results_file, lambda: run_experiment(
        args.workdir, args.sizes, args.features, args.epochs, args.iters, args.batch_size, args.device,
        args.thresholds, args.negative_fraction, seed=args.seed, limit=args.limit, src=args.src,
        repredict=args.repredict), cmd)
    if args.report_only:
        preprocessed = next((args.workdir.resolve() / "nnUNet_preprocessed").glob("Dataset*"), None)
        for s, row in results["sizes"].items():  # results of a run made before this figure existed
            if "negative_room" not in row and preprocessed is not None:
                row["negative_room"] = negative_room(preprocessed, rejecting_config_name(int(s)))
                write_json_atomic(results, results_file, indent=1)
    publish_report(report(results, results.get("command", cmd)), args.out)

if __name__ == "__main__":
    main()
