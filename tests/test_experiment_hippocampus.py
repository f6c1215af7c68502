"""The hippocampus size experiment's report from a results file: every arm's row, the paired
differences against the pre-trained arm per seed, the epoch-time ratio and both plots (the
training runs through the stock commands in test_hippocampus.py; the real run is
docs/benchmarks/sizes_hippocampus.md)."""
from __future__ import annotations

import json

from benchmarks.experiment_hippocampus import main, paired


def _arm(iou: float, phase: int = 1, epoch_s: float = 2.0, errors=(30.0, 20.0, 25.0)) -> dict:
    return {"Dice": [iou + 8, 5.0], "IoU": [iou, 4.0], "size_error_px2": [20.0, 9.0], "n": 1218,
            "empty_predictions": 0, "epoch_s": {f"phase{phase}": epoch_s}, "train_s": 300.0, "epochs": len(errors),
            "curves": {"val_loss": [0.3, 0.2, 0.25], "val_iou": [0.5, 0.6, 0.55], "val_size_error": list(errors)}}


def test_report_pairs_each_seed_with_its_own_phase_1(tmp_path):
    results = {"command": "python -m benchmarks.experiment_hippocampus",
               "budget": {"features": 16, "batch_size": 32, "epochs_pre": 300, "epochs": 100, "iters": 50,
                          "val_iters": 20, "patience": 15, "patience_sizes": 10, "paper_weight": 1.0,
                          "size_weight": 0.1, "device": "cpu", "split_seed": 0, "seeds": [0, 1]},
               "data": {"train": 4285, "val": 600, "test": 1218, "volumes": {"train": 182, "val": 26, "test": 52}},
               "runs": {"seed0_m16": {"seed": 0, "m": 16, "pre": _arm(60), "paper": _arm(64, 2, 5.0),
                                      "ours": _arm(61, 2, 4.0), "paper_lr0.01": _arm(45, 2, 5.0)},
                        "seed1_m16": {"seed": 1, "m": 16, "pre": _arm(55), "paper": _arm(54, 2, 5.0),
                                      "ours": _arm(58, 2, 4.0)},
                        "seed0_m4285": {"seed": 0, "m": 4285, "pre": _arm(80)}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "report.md"
    main(["--workdir", str(tmp_path), "--report_only", "--out", str(out), "--curve_m", "16"])
    text = out.read_text()
    assert paired(results, "paper") == {16: [4.0, -1.0]} and paired(results, "ours") == {16: [1.0, 3.0]}
    assert "- (b) size loss alone (paper), m = 16: +4.0, -1.0 (mean +1.5)" in text
    assert "- (c) pixel + size, weight 0.1, m = 16: +1.0, +3.0 (mean +2.0)" in text
    assert "| 16 | 1 | (c) pixel + size, weight 0.1 | 58.0 ± 4.0 |" in text
    assert ("- (b) size loss alone (paper), phase-2 lr 0.01, output layer re-initialised, m = 16: -15.0" in text), \
        "another rate: its own arm"
    assert "| 4285 | 0 | (a) pre-trained only | 80.0 ± 4.0 |" in text
    assert "2.30x (range 2.00-2.50)" in text  # phase-2 epoch over the same seed's phase-1 epoch
    assert "from 182 / 26 / 52 volumes" in text and "Machine:" in text
    for name in ("report_iou.png", "report_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name})" in text
