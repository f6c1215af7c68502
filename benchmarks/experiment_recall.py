"""Experiment: recall-first proposals and a fine stage that can reject, on Kvasir-SEG 256².

    python -m benchmarks.experiment_recall --workdir work_dirs/kvasir_recall --sizes 32 64 \
        --out docs/benchmarks/kvasir_recall.md

The protocol of ``benchmarks.experiment_kvasir`` (Kvasir-SEG resized to 256 x 256, the same seeded 80/10/10
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
| cascade + confirmed proposals | fine | the threshold and ``proposal_confirmation`` chosen together |
| cascade + confirmed lowest-t proposals | fine | the lowest threshold, its best confirmation |
| rejecting fine | fine_rejects | argmax components |
| recall-first | fine_rejects | its validation-chosen threshold |
| recall-first, lowest t | fine_rejects | the lowest threshold tried (the design point) |
| baseline 2S | - | - (the coarse model of 2S) |

Confirmed proposals (0.8.6): the published fine stage sees every proposal, and one below the
coarse decision is fused only when its mean foreground probability over what it segments there
reaches ``proposal_confirmation`` (``STSEG_OVERRIDES=crop.proposal_confirmation=...``); every pair of a threshold
and a value of ``--confirmations`` is tried on the validation images. The lowest-t arms show
what recall-first proposals do on the test images whatever validation chose; they never choose
a default. Why the cascade's misses stay missed: the coarse model's
probabilities on the test images are exported once (``--save_probabilities``) and the report
bins its highest foreground probability inside every missed polyp. Per arm: DSC, IoU, precision, recall (mean +- sd over images), empty predictions, images missed
(DSC < 0.1), crops per image, proposals below the coarse decision and those the fine stage
rejected (from the ``<case>.objects.json`` files), whole ``nnUNetv2_predict`` time per image; a per-image table of
every image some arm misses. Resumable: finished trainings and arms are kept (``--repredict``
predicts every arm again). GPU users: ``--epochs 1000 --iters 250 -device cuda``.

``--native`` (the second protocol): Kvasir-SEG at native resolution, S = 64 against
nnU-Net 2d, in the work folder of ``benchmarks.experiment_kvasir --native`` (default
``work_dirs/kvasir_native``), whose networks and nnU-Net 2d scores it reuses (what is missing is
trained and scored there first, with this command's budget: 4 x 50 iterations, batch 2 by
default); the published fine stage's proposal rules are chosen on the native validation images
and its arms scored next to nnU-Net 2d (``recall_results.json``)::

    python -m benchmarks.experiment_recall --native --out docs/benchmarks/kvasir_recall_native.md
"""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np

from nnunet_stseg.adapters.config import (DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER, coarse_config_name,
                                          fine_config_name)
from nnunet_stseg.atomic import write_json_atomic
from benchmarks.kvasir_arms import (MISSED_DICE, kvasir_work_folder, per_case_dice, plan_size, predict_and_score,
                                   train_arm)
from benchmarks.reports import OVERLAP_HEAD_PERCENT, overlap_cells
from benchmarks.runner import (add_budget_arguments, command_line, command_parser, predict_command_line,
                               publish_report, report_header, results_or_run, run)
from nnunet_stseg.settings import overrides_env

ARMS = (("baseline", "baseline S"), ("cascade", "cascade"), ("cascade_low", "cascade + low proposals"),
        ("cascade_lowest", "cascade + lowest-t proposals"), ("cascade_confirmed", "cascade + confirmed proposals"),
        ("cascade_confirmed_lowest", "cascade + confirmed lowest-t proposals"), ("rejecting", "rejecting fine"),
        ("recall_first", "recall-first"), ("recall_first_lowest", "recall-first, lowest t"),
        ("baseline_2s", "baseline 2S"), ("nnunet_2d", "nnU-Net 2d"))


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


def proposal_counts(prediction: Path) -> dict:
    """Crops per image, proposals below the coarse decision per image and those of them the fine
    stage rejected (``proposal_confirmation``), from the objects reports."""
    reports = [json.loads(f.read_text()) for f in sorted(Path(prediction).glob("*.objects.json"))]
    if not reports:
        return {"crops_per_image": float("nan"), "low_proposals_per_image": float("nan"),
                "rejected_per_image": float("nan")}
    crops = [r["n_objects"] for r in reports]
    low = [sum(o.get("proposal") == "below the coarse decision" for o in r["objects"]) for r in reports]
    rejected = [sum(bool(o.get("rejected_by_fine_stage")) for o in r["objects"]) for r in reports]
    return {"crops_per_image": float(np.mean(crops)), "low_proposals_per_image": float(np.mean(low)),
            "rejected_per_image": float(np.mean(rejected))}


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


def confidences_below_decision(prediction: Path):
    """``(case, object)`` for every proposal below the coarse decision in a prediction folder's
    objects reports that carries the fine stage's confidence (``fine_mean_foreground_probability``)."""
    for f in sorted(Path(prediction).glob("*.objects.json")):
        for o in json.loads(f.read_text())["objects"]:
            if o.get("proposal") == "below the coarse decision" and "fine_mean_foreground_probability" in o:
                yield f.name[:-len(".objects.json")], o


def proposal_confidences(prediction: Path, labels: Path) -> dict:
    """The fine stage's confidence (``fine_mean_foreground_probability`` of the objects reports) in
    the proposals below the coarse decision of one arm's test predictions, split by what the
    proposal's box holds: ``on_polyp`` (at least 30 % of its pixels are polyp), ``off_polyp`` (none
    is); the counts and the 10th / 50th / 90th percentiles of each. A confirmation rule can only
    work where the two differ."""
    from skimage.io import imread

    groups: dict[str, list[float]] = {"on_polyp": [], "off_polyp": []}
    case_read, gt = None, None
    for case, o in confidences_below_decision(prediction):  # grouped by case: each label read once
        if case != case_read:
            gt, case_read = imread(str(Path(labels) / f"{case}.png")), case
            gt = (gt if gt.ndim == 2 else gt[..., 0]) > 0
        (y0, x0), (y1, x1) = o["box"]["start"][-2:], o["box"]["stop"][-2:]
        polyp = gt[max(y0, 0):y1, max(x0, 0):x1].mean() if y1 > y0 and x1 > x0 else 0.0
        if polyp >= 0.3 or polyp == 0:
            groups["on_polyp" if polyp >= 0.3 else "off_polyp"].append(o["fine_mean_foreground_probability"])
    return {k: {"n": len(v), "percentiles": np.percentile(v, [10, 50, 90]).round(3).tolist() if v else None}
            for k, v in groups.items()}


def confidence_line(row: dict) -> list[str]:
    c = row.get("proposal_confidence")
    if not c:
        return []

    def part(k: str) -> str:
        g = c[k]
        return f"{g['n']}" + (" ({} / {} / {})".format(*g["percentiles"]) if g["percentiles"] else "")
    return [f"Can the fine stage tell a true proposal from a false one? Its mean foreground probability over what "
            f"it segments in the crops of the proposals below the decision (cascade + lowest-t proposals, test "
            f"images; 10th / 50th / 90th percentile): proposals on a polyp (>= 30 % of the box) "
            f"{part('on_polyp')}, proposals off any polyp {part('off_polyp')}.", ""]


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


def confirmed_key(threshold: str, confirmation: str) -> str:
    return f"{threshold}_c{confirmation}"


def choose_confirmed(scores: dict[tuple[str, str], float]) -> tuple[str, str]:
    """The (threshold, confirmation) pair with the highest validation DSC; ties go to the higher
    threshold (fewer crops), then the lower confirmation (fewer rejections).

    >>> choose_confirmed({("0.3", "0.8"): 0.71, ("0.1", "0.8"): 0.72, ("0.1", "0.6"): 0.72})
    ('0.1', '0.6')
    """
    best = max(scores.values())
    return max((k for k, v in scores.items() if v >= best - 1e-9), key=lambda k: (float(k[0]), -float(k[1])))


CONFIRMATION_PERCENTILES = (25, 50, 75, 90)
"""``--confirmations auto`` (the default): the ``proposal_confirmation`` values tried are these
percentiles of the fine stage's confidence in the proposals below the decision on the VALIDATION
images at the lowest threshold (``fine_mean_foreground_probability`` of its objects reports), so
that the rule rejects about a quarter to nine tenths of them whatever the model's calibration. A
fixed grid does not carry over: on the S = 32 validation images at 256 x 256 the proposals lie
at 0.86 / 0.89 / 0.92 (10th / 50th / 90th percentile), at native resolution (4 x 50
iterations) at 0.82 / 0.85 / 0.87."""


def auto_confirmations(prediction: Path) -> list[str]:
    """The ``proposal_confirmation`` values of :data:`CONFIRMATION_PERCENTILES` for one validation
    prediction folder (kept in [0.5, 0.999], three decimals, without repeats); ``["0.9"]`` when it
    has no proposal below the decision."""
    values = [o["fine_mean_foreground_probability"] for _, o in confidences_below_decision(prediction)]
    if not values:
        return ["0.9"]
    grid = np.clip(np.percentile(values, CONFIRMATION_PERCENTILES), 0.5, 0.999).round(3)
    return [str(float(v)) for v in dict.fromkeys(grid.tolist())]


def arm_runner(w: SimpleNamespace, device: str, dataset_id: int, save: Callable[[], None], prefix: str = ""):
    """The function that predicts and scores one arm of a row once (kept in the row under its name
    + ``tag``; a resumed run skips it): ``arm(row, name, config, trainer, threshold, train_log,
    validation=False, tag="", confirmation=None)``, on the test images or on the validation images,
    with the proposal threshold and confirmation set through ``STSEG_OVERRIDES`` (None:
    the plans' value). Outputs go to ``pred_<prefix><key>_<S>``."""
    def arm(row: dict, name: str, config: str, trainer: str, threshold: str | None, train_log: Path,
            validation: bool = False, tag: str = "", confirmation: str | None = None) -> dict:
        key = name + tag
        if key not in row or (row[key].get("threshold"), row[key].get("confirmation")) != (threshold, confirmation):
            run_env = {**w.env, **overrides_env({"crop.proposal_threshold": threshold,
                                                 "crop.proposal_confirmation": confirmation})}
            out = w.workdir / f"pred_{prefix}{key}_{row['S']}"
            images, labels, n = (w.val_images, w.val_labels, w.n_val) if validation else (None, None, w.n_test)
            r = predict_and_score(w.ds, out, dataset_id, config, trainer, device, run_env,
                                  w.logs / f"predict_{prefix}{key}_{row['S']}.log", w.dataset_json, n, train_log,
                                  images, labels)
            row[key] = {**r, **proposal_counts(out), "missed": missed(out), "threshold": threshold,
                        "confirmation": confirmation}
            save()
        return row[key]
    return arm


def choose_fine_stage_proposals(row: dict, arm, fine: str, train_log: Path, budget: dict) -> dict:
    """The published fine stage's proposal rules, chosen on the validation images: the threshold
    alone (``fine``: 'none' = argmax components only, or one of the thresholds), the threshold and
    ``proposal_confirmation`` together (``confirmed``) and the lowest threshold's best confirmation
    (``confirmed_lowest``)."""
    scores = {t: arm(row, "val_fine", fine, DEFAULT_FINE_TRAINER, t, train_log, validation=True, tag=f"_{t}")["Dice"][0]
              for t in budget["thresholds"]}
    lowest = lowest_threshold(budget)
    if budget["confirmations"] == "auto":
        row["confirmations"] = auto_confirmations(Path(row[f"val_fine_{lowest}"]["prediction"]))
    confirmed = {(t, c): arm(row, "val_fine", fine, DEFAULT_FINE_TRAINER, t, train_log, validation=True,
                             tag=f"_{confirmed_key(t, c)}", confirmation=c)["Dice"][0]
                 for t in budget["thresholds"][1:] for c in row_confirmations(row, budget)}
    return {"fine": choose_threshold(scores), "confirmed": list(choose_confirmed(confirmed)),
            "confirmed_lowest": list(choose_confirmed({k: v for k, v in confirmed.items() if k[0] == lowest}))}


def row_confirmations(row: dict, budget: dict) -> list[str]:
    """The confirmations tried for one S: the budget's list, or the row's own (``auto``)."""
    return row.get("confirmations", []) if budget.get("confirmations") == "auto" else budget.get("confirmations", [])


def lowest_threshold(budget: dict) -> str:
    return min(budget["thresholds"][1:], key=float)


def cascade_arms(row: dict, arm, fine: str, train_log: Path, chosen: dict, budget: dict) -> None:
    """The test arms of the published fine stage: argmax proposals, the validation-chosen
    threshold, the lowest threshold (the design point, whatever validation chose: reported,
    never used to choose a default), and both with confirmed proposals."""
    arm(row, "cascade", fine, DEFAULT_FINE_TRAINER, "none", train_log)
    arm(row, "cascade_low", fine, DEFAULT_FINE_TRAINER, chosen["fine"], train_log)
    arm(row, "cascade_lowest", fine, DEFAULT_FINE_TRAINER, lowest_threshold(budget), train_log)
    for name, (t, c) in (("cascade_confirmed", chosen["confirmed"]),
                         ("cascade_confirmed_lowest", chosen["confirmed_lowest"])):
        arm(row, name, fine, DEFAULT_FINE_TRAINER, t, train_log, confirmation=c)


def proposal_budget(thresholds, confirmations) -> dict:
    """The proposal rules of a run: thresholds ('none' first) and confirmations ('auto' or a list)."""
    return {"thresholds": ["none", *[str(t) for t in thresholds]],
            "confirmations": "auto" if confirmations == "auto" else [str(c) for c in confirmations]}


def run_experiment(workdir: Path, sizes: list[int], features: int, epochs: int, iters: int, batch_size: int | None,
                   device: str, thresholds: list[float], negative_fraction: float, seed: int = 0,
                   limit: int | None = None, src: Path | None = None, repredict: bool = False,
                   dataset_id: int = 720, confirmations: Sequence[float] | str = "auto") -> dict:
    w = kvasir_work_folder(workdir, epochs, iters, seed, limit, src, dataset_id)
    workdir, env, logs, ds = w.workdir, w.env, w.logs, w.ds
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() and not repredict else {}
    plans_file = Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json"
    results.update({"dataset_folder": str(ds), "budget": {
        "features": features, "epochs": epochs, "iters": iters, "device": device, "seed": seed, "dataset": ds.name,
        "n_test": w.n_test, "n_val": w.n_val, "batch_size": batch_size, "negative_fraction": negative_fraction,
        **proposal_budget(thresholds, confirmations)}})
    results.setdefault("sizes", {})
    b = results["budget"]
    arm = arm_runner(w, device, dataset_id, lambda: write_json_atomic(results, results_file, indent=1))

    for s in sizes:
        for size in (s, 2 * s):
            plan_size(w, dataset_id, size, features, batch_size)
        fine, rejecting = add_fine_variants(plans_file, s, negative_fraction)
        row = results["sizes"].setdefault(str(s), {})
        row["S"] = s
        coarse, coarse_2s = coarse_config_name("2d", s), coarse_config_name("2d", 2 * s)
        train = {}
        for config, trainer in ((coarse, DEFAULT_COARSE_TRAINER), (fine, DEFAULT_FINE_TRAINER),
                                (rejecting, DEFAULT_FINE_TRAINER), (coarse_2s, DEFAULT_COARSE_TRAINER)):
            train[config] = logs / f"train_{config}.json"
            train_arm(ds.name, config, trainer, device, env, logs / f"train_{config}.log", train[config])
        # proposal rules of each fine model, chosen on the validation images
        chosen = choose_fine_stage_proposals(row, arm, fine, train[fine], b)
        chosen["rejecting"] = choose_threshold({t: arm(row, "val_rejecting", rejecting, DEFAULT_FINE_TRAINER, t,
                                                       train[rejecting], validation=True, tag=f"_{t}")["Dice"][0]
                                                for t in b["thresholds"]})
        row["chosen_threshold"] = chosen
        row["negative_room"] = negative_room(plans_file.parent, rejecting)
        arm(row, "baseline", coarse, DEFAULT_COARSE_TRAINER, None, train[coarse])
        cascade_arms(row, arm, fine, train[fine], chosen, b)
        arm(row, "rejecting", rejecting, DEFAULT_FINE_TRAINER, "none", train[rejecting])
        arm(row, "recall_first", rejecting, DEFAULT_FINE_TRAINER, chosen["rejecting"], train[rejecting])
        arm(row, "recall_first_lowest", rejecting, DEFAULT_FINE_TRAINER, lowest_threshold(b), train[rejecting])
        arm(row, "baseline_2s", coarse_2s, DEFAULT_COARSE_TRAINER, None, train[coarse_2s])
        if "proposal_confidence" not in row:
            row["proposal_confidence"] = proposal_confidences(Path(row["cascade_lowest"]["prediction"]),
                                                              ds / "labelsTs")
        if "coarse_peaks" not in row:  # the coarse model's probabilities on the test images, for miss_causes
            probabilities = workdir / f"coarse_probabilities_{s}"
            run(predict_command_line(ds / "imagesTs", probabilities, dataset_id, coarse, DEFAULT_COARSE_TRAINER, [0],
                                     device, "--disable_tta", "--save_probabilities"), env,
                logs / f"predict_coarse_probabilities_{s}.log")
            row["coarse_peaks"] = coarse_peaks_in_objects(probabilities, ds / "labelsTs")
        write_json_atomic(results, results_file, indent=1)
    return results


NATIVE_RESULTS = "recall_results.json"


def run_native(workdir: Path, size: int, features: int, epochs: int, iters: int, batch_size: int, device: str,
               thresholds: list[float], confirmations: Sequence[float] | str, seed: int = 0, limit: int | None = None,
               src: Path | None = None, repredict: bool = False, dataset_id: int = 721) -> dict:
    """``--native``: the cascade at S with its proposal rules against nnU-Net 2d on Kvasir-SEG at
    native resolution, in the work folder of ``benchmarks.experiment_kvasir --native`` (its networks and its
    nnU-Net 2d scores are reused; what is missing is trained and scored by that experiment first,
    with this budget). Rules chosen on the native validation images as at 256 x 256; the rejecting
    fine stage is not run here. Results in ``recall_results.json``."""
    from benchmarks.experiment_kvasir import run_native_experiment

    workdir = Path(workdir).resolve()
    native_file = workdir / "results.json"
    native = json.loads(native_file.read_text()) if native_file.is_file() else {}
    if not {f"cascade_{size}", "nnunet_2d"} <= set(native.get("arms", {})):
        native = run_native_experiment(workdir, [size], features, epochs, iters, batch_size, device, dataset_id, seed,
                                       limit, src)
    nb = native["budget"]
    w = kvasir_work_folder(workdir, nb["epochs"], nb["iters"], seed, limit, src, dataset_id, size=None)
    results_file = workdir / NATIVE_RESULTS
    results = json.loads(results_file.read_text()) if results_file.is_file() and not repredict else {}
    results.update({"dataset_folder": str(w.ds), "native": True, "budget": {
        **{k: nb[k] for k in ("features", "epochs", "iters", "device", "seed", "dataset", "batch_size")},
        "n_test": w.n_test, "n_val": w.n_val, **proposal_budget(thresholds, confirmations)}})
    row = results.setdefault("sizes", {}).setdefault(str(size), {})
    row["S"] = size
    arm = arm_runner(w, device, dataset_id, lambda: write_json_atomic(results, results_file, indent=1), "recall_")
    coarse, fine = coarse_config_name("2d", size), fine_config_name("2d", size)
    train = {c: w.logs / f"train_{c}.json" for c in (coarse, fine)}
    row["chosen_threshold"] = choose_fine_stage_proposals(row, arm, fine, train[fine], results["budget"])
    arm(row, "baseline", coarse, DEFAULT_COARSE_TRAINER, None, train[coarse])
    cascade_arms(row, arm, fine, train[fine], row["chosen_threshold"], results["budget"])
    if "proposal_confidence" not in row:
        row["proposal_confidence"] = proposal_confidences(Path(row["cascade_lowest"]["prediction"]), w.ds / "labelsTs")
    base = native["arms"]["nnunet_2d"]  # scored by benchmarks.experiment_kvasir --native on the same test images
    row["nnunet_2d"] = {**base, "missed": missed(Path(base["prediction"])), "threshold": None, "confirmation": None,
                        "crops_per_image": float("nan"), "low_proposals_per_image": float("nan"),
                        "rejected_per_image": float("nan")}
    write_json_atomic(results, results_file, indent=1)
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


def confirmation_table(row: dict, budget: dict) -> list[str]:
    """Validation DSC % of the published fine stage with confirmed proposals: a row per proposal
    threshold, a column per ``proposal_confirmation`` (empty for a run made before 0.8.6)."""
    thresholds, confirmations = budget["thresholds"][1:], row_confirmations(row, budget)
    if not any(f"val_fine_{confirmed_key(t, c)}" in row for t in thresholds for c in confirmations):
        return []
    chosen = row.get("chosen_threshold", {})
    lines = ["Validation DSC % of the cascade with confirmed proposals (rows: proposal threshold; columns: "
             "proposal_confirmation; 'none' = every proposal fused, from the line above):", "",
             "| threshold | none | " + " | ".join(confirmations) + " |", "|---" * (len(confirmations) + 2) + "|"]
    for t in thresholds:
        cells = [row.get(f"val_fine_{t}", {}).get("Dice", [float("nan")])[0]]
        cells += [row.get(f"val_fine_{confirmed_key(t, c)}", {}).get("Dice", [float("nan")])[0] for c in confirmations]
        lines.append(f"| {t} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    if chosen.get("confirmed"):
        lines += ["", f"Chosen: threshold {chosen['confirmed'][0]} with confirmation {chosen['confirmed'][1]}; at "
                  f"the lowest threshold, confirmation {chosen['confirmed_lowest'][1]}."]
    return [*lines, ""]


def validation_line(row: dict, budget: dict) -> str:
    """Validation DSC % per proposal threshold of the fine stage (and of the rejecting one where it ran)."""
    rejecting = any(f"val_rejecting_{t}" in row for t in budget["thresholds"])
    chosen = row.get("chosen_threshold", {})
    cells = [f"{t}: {row[f'val_fine_{t}']['Dice'][0]:.2f}"
             + (f" / {row[f'val_rejecting_{t}']['Dice'][0]:.2f}" if rejecting else "")
             for t in budget["thresholds"] if f"val_fine_{t}" in row and (not rejecting or f"val_rejecting_{t}" in row)]
    return (f"Validation DSC % per proposal threshold ({'fine / rejecting fine' if rejecting else 'fine'}): "
            + ", ".join(cells) + f"; chosen: fine {chosen.get('fine')}"
            + (f", rejecting fine {chosen.get('rejecting')}." if rejecting else "."))


RECALL_ARMS = ("cascade_low", "cascade_lowest", "cascade_confirmed", "cascade_confirmed_lowest", "recall_first",
               "recall_first_lowest")


def goal_table(row: dict, s: str) -> list[str]:
    """The goal for every recall-first arm: DSC at least the reference's (the baseline at
    2S; nnU-Net 2d at native resolution), the cascade's misses at least halved, precision not
    below the cascade's; and what the extra proposals cost per image against the cascade."""
    reference = "baseline_2s" if "baseline_2s" in row else "nnunet_2d"
    if reference not in row or "cascade" not in row:
        return []
    ref, cascade = row[reference], row["cascade"]
    ref_label = f"baseline {2 * int(s)}" if reference == "baseline_2s" else "nnU-Net 2d"
    labels = dict(ARMS)
    lines = [f"The goal per recall-first arm (DSC >= {ref_label}'s {ref['Dice'][0]:.2f}; misses <= half the "
             f"cascade's {cascade['missed']}; precision >= the cascade's {cascade['Precision'][0]:.2f}):", "",
             f"| arm | DSC - {ref_label} | missed | precision - cascade | extra ms / image vs cascade | goal met |",
             "|---" * 6 + "|"]
    for name in RECALL_ARMS:
        if name not in row:
            continue
        r = row[name]
        checks = (r["Dice"][0] >= ref["Dice"][0], r["missed"] <= cascade["missed"] / 2,
                  r["Precision"][0] >= cascade["Precision"][0])
        met = "yes" if all(checks) else "no (" + ", ".join(
            w for w, ok in zip(("DSC", "misses", "precision"), checks) if not ok) + ")"
        lines.append(f"| {labels[name]} | {r['Dice'][0] - ref['Dice'][0]:+.2f} | {r['missed']} | "
                     f"{r['Precision'][0] - cascade['Precision'][0]:+.2f} | "
                     f"{r['ms_per_image'] - cascade['ms_per_image']:+.0f} | {met} |")
    return [*lines, ""]


def size_section(s: str, row: dict, b: dict, title: str) -> list[str]:
    """One S of a report: the validation choices, the arms' table, why misses stay missed, the
    per-image table of the images some arm misses."""
    lines = [f"## {title}", "", validation_line(row, b), "", *confirmation_table(row, b)]
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
    lines += [f"| arm | proposals | confirmation | {OVERLAP_HEAD_PERCENT} | missed (DSC < 0.1) | crops / image | "
              f"below-decision proposals / image | rejected by the fine stage / image | ms / image |",
              "|---" * 13 + "|"]
    for name, label in ARMS:
        if name not in row:
            continue
        r = row[name]
        size = 2 * int(s) if name == "baseline_2s" else int(s)
        label = label.replace("2S", str(size)).replace("S", str(size)) if name.startswith("baseline") else label
        crops = "-" if np.isnan(r["crops_per_image"]) else f"{r['crops_per_image']:.2f}"
        low = "-" if np.isnan(r["low_proposals_per_image"]) else f"{r['low_proposals_per_image']:.2f}"
        rejected = r.get("rejected_per_image", float("nan"))
        rejected = "-" if np.isnan(rejected) or not r.get("confirmation") else f"{rejected:.2f}"
        lines.append(f"| {label} | {r['threshold'] or '-'} | {r.get('confirmation') or '-'} | "
                     f"{overlap_cells(r, digits=2)} | {r['missed']} | {crops} | {low} | {rejected} | "
                     f"{r['ms_per_image']:.0f} |")
    return lines + ["", *goal_table(row, s), *confidence_line(row), *miss_causes(row),
                    f"Test images some arm misses (DSC; bold: missed), S = {s}:", "", *detection_table(row), ""]


def confirmation_words(budget: dict) -> str:
    """How the confirmations tried were set, for a report's budget line."""
    if budget.get("confirmations") == "auto":
        *first, last = map(str, CONFIRMATION_PERCENTILES)
        return (f"the {'th, '.join(first)}th and {last}th percentile of the fine stage's confidence in the "
                "validation proposals below the decision at the lowest threshold, per S")
    return ", ".join(budget.get("confirmations", []))


def report(results: dict, cmd: str) -> str:
    b = results["budget"]
    if results.get("native"):
        lines = [*report_header("Kvasir-SEG at native resolution: recall-first proposals vs nnU-Net 2d", cmd),
                 f"Budget per network: width {b['features']}, batch {b['batch_size']}, {b['epochs']} x {b['iters']} "
                 f"iterations, device {b['device']}: the networks of `benchmarks.experiment_kvasir --native` in the same work "
                 f"folder (its cascade's coarse and fine models, its nnU-Net 2d and that arm's scores). Split seed "
                 f"{b['seed']} (80/10/10): proposal rules chosen on the {b['n_val']} validation images among "
                 f"thresholds {', '.join(b['thresholds'])} and confirmations at {confirmation_words(b)}; arms "
                 f"scored on the {b['n_test']} test images at their native resolution; ms / image = the whole "
                 "`nnUNetv2_predict --disable_tta` over the test set, each arm in its default mode (the cascade in "
                 "the command's own process, nnU-Net 2d with its worker processes). The rejecting fine stage is "
                 "not run at this resolution (at 256 x 256 it missed more polyps at both S).", ""]
        for s, row in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
            lines += size_section(s, row, b, f"Cascade at S = {s} vs nnU-Net 2d")
        return "\n".join(lines) + "\n"
    lines = [*report_header("Kvasir-SEG: recall-first proposals and a fine stage that can reject", cmd),
             f"Budget per network: width {b['features']}, {b['epochs']} x {b['iters']} iterations, batch size "
             f"{b['batch_size'] or 'planned'}, device {b['device']}; split seed {b['seed']} (80/10/10): thresholds "
             f"chosen on the {b['n_val']} validation images among {', '.join(b['thresholds'])}"
             + (f"; for the published fine stage also every threshold with each proposal_confirmation at "
                f"{confirmation_words(b)}" if b.get("confirmations") else "") +
             f"; arms scored on the {b['n_test']} test images at 256 x 256. Rejecting fine stage: negative_fraction "
             f"{b['negative_fraction']}. Every cascade arm of one S uses the same coarse model (pair comparisons, "
             f"one training run per network: at this budget the same arm varies by 2-4 DSC points between runs).", ""]
    for s, row in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        lines += size_section(s, row, b, f"S = {s}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = command_parser("experiment_recall", __doc__)
    p.add_argument("--workdir", type=Path, default=None,
                   help="work folder (work_dirs/kvasir_recall; with --native work_dirs/kvasir_native, shared with "
                        "benchmarks.experiment_kvasir --native)")
    p.add_argument("--src", type=Path, default=None, help="Kvasir-SEG folder (default kvasir-seg/ in the --data folder)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes S (32 64; 64 with --native)")
    p.add_argument("--native", action="store_true",
                   help="native resolution: the cascade of benchmarks.experiment_kvasir --native (trained there when missing) "
                        "with the proposal rules against nnU-Net 2d")
    add_budget_arguments(p, features=16, batch_size=None, epochs=None, iters=None,
                         helps={"batch_size": "batch size of every network (16; 2 with --native)",
                                "epochs": "epochs of every network (30; 4 with --native)",
                                "iters": "iterations per epoch (50)"})
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.2, 0.1],
                   help="proposal thresholds tried on the validation images besides 'none' (0.3 0.2 0.1)")
    p.add_argument("--confirmations", nargs="+", default=["auto"],
                   help="proposal_confirmation values tried on the validation images with every threshold, or "
                        "auto: percentiles of the fine stage's confidence in the validation proposals (auto)")
    p.add_argument("--negative_fraction", type=float, default=0.25,
                   help="negative crops of the rejecting fine stage (0.25)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    p.add_argument("--repredict", action="store_true", help="predict and score every arm again")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from the work folder's results")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    if args.confirmations == ["auto"]:
        args.confirmations = "auto"
    else:
        try:
            args.confirmations = [float(c) for c in args.confirmations]
        except ValueError:
            p.error(f"--confirmations: numbers in [0.5, 1) or auto, got {' '.join(args.confirmations)}")
    native = args.native
    workdir = (args.workdir or Path("work_dirs/kvasir_native" if native else "work_dirs/kvasir_recall")).resolve()
    sizes = args.sizes or ([64] if native else [32, 64])
    batch_size, epochs, iters = args.batch_size or (2 if native else 16), args.epochs or (4 if native else 30), \
        args.iters or 50
    if native and len(sizes) != 1:
        p.error("--native takes one size S (the cascade compared with nnU-Net 2d)")
    if native:
        results = results_or_run(p, args.report_only, workdir / NATIVE_RESULTS, lambda: run_native(
            workdir, sizes[0], args.features, epochs, iters, batch_size, args.device, args.thresholds,
            args.confirmations, seed=args.seed, limit=args.limit, src=args.src, repredict=args.repredict), cmd)
        publish_report(report(results, results.get("command", cmd)), args.out)
        return
    results_file = workdir / "results.json"
    results = results_or_run(p, args.report_only, results_file, lambda: run_experiment(
        workdir, sizes, args.features, epochs, iters, batch_size, args.device,
        args.thresholds, args.negative_fraction, seed=args.seed, limit=args.limit, src=args.src,
        repredict=args.repredict, confirmations=args.confirmations), cmd)
    if args.report_only:
        preprocessed = next((workdir / "nnUNet_preprocessed").glob("Dataset*"), None)
        for s, row in results["sizes"].items():  # results of a run made before this figure existed
            if "negative_room" not in row and preprocessed is not None:
                row["negative_room"] = negative_room(preprocessed, rejecting_config_name(int(s)))
                write_json_atomic(results, results_file, indent=1)
    publish_report(report(results, results.get("command", cmd)), args.out)


if __name__ == "__main__":
    main()
