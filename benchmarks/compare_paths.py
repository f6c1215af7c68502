"""``python -m benchmarks.benchmark --compare_paths``: a trained cascade's predictions with its objects found
on the coarse model's grid (since 0.8) against the same predictions with the coarse probabilities
brought to the full grid first (before 0.8), image by image, in one process::

    python -m benchmarks.benchmark --compare_paths -m MODEL_FOLDER -i IMAGES [--labels LABELS] [-f 0]

Both paths load the same models and read the same images; the table gives how close the label maps
are (Dice of every label between the two paths), each path's seconds per stage, and, with
``--labels``, each path's Dice to the ground truth.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.runner import report_header
from nnunet_stseg.core.metrics import overlap

PATHS = ("full", "coarse")  # StSPredictor.objects_grid: before 0.8, since 0.8


def dice(a: np.ndarray, b: np.ndarray, labels) -> float:
    """Mean Dice over ``labels`` of two label maps (:func:`~nnunet_stseg.core.metrics.overlap`: 1 when
    a label is absent from both)."""
    return float(np.mean([overlap(a == c, b == c)["Dice"] for c in labels]))


def compare_paths(args, cmd: str) -> str:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_stseg.adapters.discovery import ensure_trainer_discovery

    ensure_trainer_discovery()
    device = torch.device(args.device)
    predictor = nnUNetPredictor(use_mirroring=False, device=device, verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(args.model), args.folds, "checkpoint_final.pth")
    if not hasattr(predictor, "objects_grid"):
        raise SystemExit(f"{args.model} is not a segment-then-segment fine model (its predictor has no objects grid)")
    predictor._log = lambda msg: None
    ending = predictor.dataset_json["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(str(args.images), ending)[:args.limit]
    if not cases:
        raise SystemExit(f"no images ending in {ending} in {args.images}")
    reader = predictor.plans_manager.image_reader_writer_class()
    labels = [int(v) for v in predictor.label_manager.foreground_labels]
    rows = []
    for files in cases:
        image, props = reader.read_images(files)
        row = {"case": Path(files[0]).name[:-len(f"_0000{ending}")]}
        for path in PATHS:
            predictor.objects_grid = path
            t0 = time.perf_counter()
            seg = predictor.predict_single_npy_array(image, props, None, None, False)
            row[path] = {"seconds": time.perf_counter() - t0, "stages": dict(predictor.stage_seconds), "seg": seg}
        row["dice_between"] = dice(row["full"]["seg"], row["coarse"]["seg"], labels)
        if args.labels is not None:
            gt, _ = reader.read_seg(str(Path(args.labels) / f"{row['case']}{ending}"))
            for path in PATHS:
                row[path]["dice_gt"] = dice(row[path]["seg"][None] if row[path]["seg"].ndim < gt.ndim
                                            else row[path]["seg"], gt, labels)
        for path in PATHS:
            del row[path]["seg"]
        rows.append(row)
        print(f"{row['case']}: Dice between the paths {row['dice_between']:.4f}", flush=True)
    between = np.array([r["dice_between"] for r in rows])
    stages = sorted({k for r in rows for p in PATHS for k in r[p]["stages"]})
    lines = [*report_header("Objects found on the coarse grid (0.8) vs on the full grid (before)", cmd),
             f"Model: `{args.model}` folds {args.folds}, {len(rows)} images of `{args.images}`, TTA off, device "
             f"{device}; every image predicted by both paths in one process (`StSPredictor.objects_grid`), "
             "nnU-Net's preprocessing and export included in 'seconds'.", "",
             f"Dice between the two paths' label maps: mean {between.mean():.5f}, min {between.min():.5f}; "
             f"identical label maps: {int((between == 1).sum())} of {len(rows)}; below 0.999: "
             f"{int((between < 0.999).sum())}.", "",
             "| path | seconds / image | " + " | ".join(f"{s.replace('_', ' ')} s" for s in stages)
             + (" | Dice to ground truth |" if args.labels else " |"),
             "|---" * (2 + len(stages) + (1 if args.labels else 0)) + "|"]
    for path, name in zip(PATHS, ("full grid (before 0.8)", "coarse grid (0.8)")):
        cells = [f"{np.mean([r[path]['seconds'] for r in rows]):.3f}"]
        cells += [f"{np.mean([r[path]['stages'].get(s, 0.0) for r in rows]):.3f}" for s in stages]
        if args.labels:
            cells.append(f"{np.mean([r[path]['dice_gt'] for r in rows]):.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    worst = sorted(rows, key=lambda r: r["dice_between"])[:5]
    lines += ["", "Lowest Dice between the paths: " + ", ".join(f"{r['case']} {r['dice_between']:.4f}" for r in worst)]
    return "\n".join(lines) + "\n"


__all__ = ["compare_paths", "dice"]
