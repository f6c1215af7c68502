"""The size experiment's report: every arm's row, the paired gains, the epoch-time ratio and the
plot, from a results file (the training itself runs through the stock commands, see
test_size_labels.py; the real runs are in docs/benchmarks/sizes_*.md)."""
from __future__ import annotations

import json

from benchmarks.experiment_sizes import main, paired_gains


def _arm(iou: float, phase1: float | None = 2.0, phase2: float | None = None, val: float | None = None) -> dict:
    epoch = {k: v for k, v in (("phase1", phase1), ("phase2", phase2)) if v is not None}
    r = {"Dice": [iou + 10, 5.0], "IoU": [iou, 4.0], "size_error_px2": [40.0, 9.0], "n": 10, "epoch_s": epoch,
         "train_s": 100.0}
    if val is not None:
        r["val"] = {"IoU": [val, 3.0], "Dice": [val + 10, 3.0]}
    return r


def test_report_pairs_the_arms_and_draws_iou_against_m(tmp_path):
    results = {"data": "kvasir", "command": "python -m benchmarks.experiment_sizes --dataset kvasir",
               "budget": {"size": 64, "features": 16, "batch_size": 16, "epochs_pre": 8, "epochs": 4, "iters": 25,
                          "device": "cpu", "seed": 0, "size_weights": [1.0, 0.1], "folds": 1},
               "runs": {"fold0_m16": {"m": 16, "n_train": 800, "pre": _arm(40), "pixel": _arm(42, val=40),
                                      "sizes": _arm(45, phase1=None, phase2=4.1, val=39),
                                      "sizes_w0.1": _arm(41, phase1=None, phase2=4.2, val=41),
                                      "sizes_only": _arm(30, phase1=None, phase2=3.9)},
                        "fold0_m32": {"m": 32, "n_train": 800, "pre": _arm(50), "pixel": _arm(52, val=50),
                                      "sizes": _arm(51, phase1=None, phase2=4.0, val=48),
                                      "sizes_w0.1": _arm(53, phase1=None, phase2=4.0, val=51)},
                        "fold0_mfull": {"m": 800, "n_train": 800, "pre": _arm(60), "pixel": _arm(62)}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    summary = tmp_path / "predictions" / "fold0_m16_sizes_only" / "summary_test.json"  # counted from the summary
    summary.parent.mkdir(parents=True)
    precisions = [0.5, float("nan"), 0.9, float("nan")]
    summary.write_text(json.dumps({"metric_per_case": [{"metrics": {"1": {"Precision": p}}} for p in precisions]}))
    out = tmp_path / "report.md"
    main(["--dataset", "kvasir", "--workdir", str(tmp_path), "--report_only", "--out", str(out)])
    text = out.read_text()
    assert paired_gains(results) == {16: [3.0], 32: [-1.0]}
    assert paired_gains(results, "sizes_w0.1", "val") == {16: [1.0], 32: [1.0]}
    assert "- m = 16: +3.0 points (-1.0)" in text and "- m = 32: -1.0 points (-2.0)" in text
    # the weight is chosen on validation (0.1: +1.0 mean) although weight 1 is better on test (+1.0 vs +0.0)
    assert "Paired IoU gain of pixel + size (weight 0.1) over pixel only (same phase-1 weights, same budget), test " \
           "(validation): **chosen on validation**" in text
    assert "| 0 | 16 / 800 | size loss alone in phase 2 (paper) | 40.0 ± 5.0 | 30.0 ± 4.0 | 40 ± 9 | 2 | n/a | 3.9 | 100 |" in text
    assert "| 0 | 16 / 800 | pixel + size (weight 0.1) | 51.0 ± 5.0 | 41.0 ± 4.0 | 40 ± 9 | n/a | 41.0 | 4.2 | 100 |" in text
    assert "| 0 | 800 / 800 | pixel only (full labels) |" in text
    assert "fold0, m = 16: phase 2 with the size loss alone (the paper's, weight 1) IoU 30.0, with the pixel loss kept 45.0" in text
    assert "2.04x (range 2.00-2.10)" in text  # phase-2 epoch / phase-1 epoch of the paired pixel arm
    assert (tmp_path / "report.png").stat().st_size > 1000
