"""What the Kvasir-SEG experiments share (the 256 x 256 ones share one work folder: the dataset
converted once with the seeded split): the work folder, training one arm, predicting and scoring
it with the stock commands, per-image statistics, failed and missed images, example overlays.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from benchmarks.runner import (evaluate, link_into, pipeline_env, plan_command_line, plan_unless_planned,
                               predict_command_line, raw_dataset, run_measured, shared_data, train_fold)
from nnunet_stseg.adapters.config import coarse_config_name
from nnunet_stseg.atomic import write_json_atomic
from nnunet_stseg.core.metrics import count_empty_predictions, mean_sd

METRICS = ("Dice", "IoU", "Precision", "Recall")
FAILED_JACCARD = 0.65  # the thesis's (ISIC 2018's) failed segmentation: Jaccard below this
MISSED_DICE = 0.1  # an image whose DSC is below this counts as missed


def validation_folders(ds: Path, workdir: Path) -> tuple[Path, Path]:
    """Folders of links to fold 0's validation images and labels (the converter's split)."""
    from benchmarks.kvasir import SPLIT_FILE

    cases = json.loads((ds / SPLIT_FILE).read_text())["val"]
    return (link_into(workdir / "val_images", [ds / "imagesTr" / f"{case}_0000.png" for case in cases]),
            link_into(workdir / "val_labels", [ds / "labelsTr" / f"{case}.png" for case in cases]))


def kvasir_work_folder(workdir: Path, epochs: int, iters: int, seed: int = 0, limit: int | None = None,
                       src: Path | None = None, dataset_id: int = 720, size: int | None = 256) -> SimpleNamespace:
    """The work folder the Kvasir-SEG 256 x 256 experiments share (recall-first, end-to-end; ``size``
    None: native resolution): the stock commands' environment and logs, the dataset converted once
    with the seeded split, links to its validation images. Fields: ``workdir, env, logs, ds,
    dataset_json, n_test, val_images, val_labels, n_val``."""
    from benchmarks.kvasir import convert_kvasir, kvasir_ids

    workdir = Path(workdir).resolve()
    env = pipeline_env(workdir, epochs, iters)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    raw = Path(env["nnUNet_raw"])
    src = Path(src) if src else shared_data() / "kvasir-seg"
    ds = raw_dataset(raw, dataset_id) or convert_kvasir(src, raw, dataset_id, size=size, seed=seed,
                                                        ids=kvasir_ids(src)[:limit] if limit else None)
    val_images, val_labels = validation_folders(ds, workdir)
    return SimpleNamespace(workdir=workdir, env=env, logs=logs, ds=ds,
                           dataset_json=json.loads((ds / "dataset.json").read_text()),
                           n_test=len(list((ds / "imagesTs").glob("*.png"))), val_images=val_images,
                           val_labels=val_labels, n_val=len(list(val_images.glob("*.png"))))


def per_image_stats(summary_file: Path) -> dict:
    """Mean and sd over test images (in %) of each metric for the foreground label (precision over
    the images with a non-empty prediction), and the number of empty predictions."""
    summary = json.loads(summary_file.read_text())
    per_case = [next(iter(c["metrics"].values())) for c in summary["metric_per_case"]]
    out = {m: tuple(100 * v for v in mean_sd([c[m] for c in per_case])) for m in METRICS}
    out["empty_predictions"] = count_empty_predictions([c["Precision"] for c in per_case])
    out["n"] = len(per_case)
    return out


def predict_and_score(ds: Path, out: Path, dataset_id: int, config: str, trainer: str, device: str, env: dict,
                      log: Path, dataset_json: dict, n_test: int, train_log: Path, images: Path | None = None,
                      labels: Path | None = None) -> dict:
    """Predict the test images (or ``images``, scored against ``labels``) with the stock
    ``nnUNetv2_predict`` (TTA off), score them with nnU-Net's metrics; timing and peak RSS of the
    whole command."""
    seconds, peak = run_measured(predict_command_line(images or ds / "imagesTs", out, dataset_id, config, trainer, [0],
                                                       device, "--disable_tta"), env, log)
    evaluate(out, labels or ds / "labelsTs", dataset_json, out / "summary_test.json")
    return {**per_image_stats(out / "summary_test.json"), "ms_per_image": 1000 * seconds / n_test,
            "peak_rss_mb": peak, "prediction": str(out),
            "train_s": json.loads(train_log.read_text())["seconds"] if train_log.is_file() else float("nan")}


def plan_size(w: SimpleNamespace, dataset_id: int, size: int, features: int, batch_size: int | None) -> Path:
    """The cascade's 2D configurations at ``size`` in the work folder ``w`` (planned unless they are:
    a re-run keeps its plans and preprocessed data), the preprocessed dataset given the converter's
    split. Returns the plans file."""
    from benchmarks.kvasir import install_split

    plans_file = Path(w.env["nnUNet_preprocessed"]) / w.ds.name / "nnUNetPlans.json"
    plan_unless_planned(plans_file, coarse_config_name("2d", size),
                        plan_command_line(dataset_id, size, ("2d",), features, batch_size=batch_size), w.env,
                        w.logs / f"plan_{size}.log")
    install_split(w.ds, plans_file.parent)
    return plans_file


def train_arm(dataset: str, config: str, trainer: str, device: str, env: dict, log: Path, train_log: Path) -> None:
    """Train fold 0 unless finished (an interrupted run resumes with ``--c``); its seconds go to
    ``train_log``."""
    t = train_fold(dataset, config, 0, trainer, device, env, log)
    if t is not None:
        write_json_atomic({"seconds": t}, train_log)


def plot_examples(ds: Path, predictions: dict[str, Path], ranked_by: str, path: Path) -> Path | None:
    """Overlays of the test images with the lowest, median and highest DSC of ``ranked_by``."""
    from skimage.io import imread

    from benchmarks.reports import overlay_grid, pick_cases

    if not all((folder / "summary_test.json").is_file() for folder in predictions.values()):
        return None
    dice = {arm: {name[:-len(".png")]: d for name, d in per_case_dice(folder / "summary_test.json").items()}
            for arm, folder in predictions.items()}
    rows = [(case, imread(str(ds / "imagesTs" / f"{case}_0000.png")), imread(str(ds / "labelsTs" / f"{case}.png")) > 0,
             {arm: (imread(str(folder / f"{case}.png")) > 0, f"DSC {dice[arm][case]:.3f}")
              for arm, folder in predictions.items()})
            for case in pick_cases(dice[ranked_by])]
    return overlay_grid(rows, path) if rows else None


def per_case_dice(summary_file: Path) -> dict[str, float]:
    """Foreground Dice of every test image, keyed by file name."""
    return {Path(c["prediction_file"]).name: next(iter(c["metrics"].values()))["Dice"]
            for c in json.loads(Path(summary_file).read_text())["metric_per_case"]}


def failed_segmentations(prediction: Path) -> int:
    """Test images whose Jaccard index (IoU) is below :data:`FAILED_JACCARD`."""
    summary = json.loads((prediction / "summary_test.json").read_text())
    return sum(next(iter(c["metrics"].values()))["IoU"] < FAILED_JACCARD for c in summary["metric_per_case"])
