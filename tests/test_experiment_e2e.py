"""Smoke run of ``python -m benchmarks.experiment_e2e`` (issue 19) on 30 real Kvasir images, the nnU-Net
subprocesses replaced by ``fake_nnunet.FakeNNUNet`` (orchestration only: the coarse model before
the end-to-end models, one configuration per box rule on the same data, the rule chosen on the
VALIDATION images, every arm scored on the test images with its failed segmentations, resume,
the report)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.experiment_e2e as experiment
import benchmarks.experiment_kvasir as experiment_kvasir
from benchmarks.experiment_e2e import main

from fake_nnunet import FakeNNUNet

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"
pytestmark = pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")


@pytest.mark.slow  # converts and plans 30 real images (in-process)
def test_e2e_experiment_smoke_and_resume(tmp_path, monkeypatch):
    fake = FakeNNUNet().install(monkeypatch, experiment, experiment_kvasir)
    work, out = tmp_path / "work", tmp_path / "report.md"
    args = ["--workdir", str(work), "--src", str(KVASIR), "--sizes", "16", "--features", "4", "--epochs", "1",
            "--iters", "2", "--batch_size", "2", "--limit", "30", "--out", str(out)]
    main(args)  # one run of each end-to-end model, then a call that adds a second run
    assert len(fake.of("nnUNetv2_train")) == 4
    main(args + ["--runs", "2"])
    trained = [(c.args[1], c.args[c.args.index("-tr") + 1]) for c in fake.of("nnUNetv2_train")]
    assert trained == [("2d_sts_coarse_16", "nnUNetTrainer_StSCoarse"), ("2d_sts_fine_16", "nnUNetTrainer_StSFine"),
                       ("2d_sts_e2e_16", "nnUNetTrainer_StSEndToEnd"),
                       ("2d_sts_e2e_16_objects", "nnUNetTrainer_StSEndToEnd"),
                       ("2d_sts_e2e_16_r2", "nnUNetTrainer_StSEndToEnd"),
                       ("2d_sts_e2e_16_objects_r2", "nnUNetTrainer_StSEndToEnd")]
    plans = json.loads(next((work / "nnUNet_preprocessed").glob("Dataset720_*/nnUNetPlans.json")).read_text())
    configs = plans["configurations"]
    for name, rule in (("2d_sts_e2e_16", "all"), ("2d_sts_e2e_16_objects", "objects"), ("2d_sts_e2e_16_r2", "all"),
                       ("2d_sts_e2e_16_objects_r2", "objects")):
        assert configs[name]["sts"]["role"] == "e2e" and configs[name]["sts"]["e2e"]["box_rule"] == rule
        assert configs[name]["data_identifier"] == configs["2d_sts_fine_16"]["data_identifier"]
    predictions = [(Path(c.args[c.args.index("-i") + 1]).name, c.args[c.args.index("-c") + 1])
                   for c in fake.of("nnUNetv2_predict")]
    e2e = ["2d_sts_e2e_16", "2d_sts_e2e_16_objects", "2d_sts_e2e_16_r2", "2d_sts_e2e_16_objects_r2"]
    coarse_modules = [f"2d_sts_coarse_16_of_{c}" for c in e2e[:2]]  # run 1's coarse modules, no training
    first, second = e2e[:2], e2e[2:]
    assert predictions == [*(("val_images", c) for c in first), ("imagesTs", "2d_sts_coarse_16"),
                           ("imagesTs", "2d_sts_fine_16"), *(("imagesTs", c) for c in first + coarse_modules),
                           *(("val_images", c) for c in second), *(("imagesTs", c) for c in second)]
    for c in coarse_modules:
        folder = work / "nnUNet_results" / "Dataset720_KvasirSEG256" / f"nnUNetTrainer_StSCoarse__nnUNetPlans__{c}"
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file() and c in json.loads(
            (folder / "plans.json").read_text())["configurations"]
    row = json.loads((work / "results_e2e.json").read_text())["sizes"]["16"]
    assert row["chosen_rule"] in experiment.RULES
    for arm, _ in experiment.arm_labels(2):
        assert row[arm]["n"] == 3 and 0 <= row[arm]["failed"] <= 3
    text = out.read_text()
    for label in ("| downscaled baseline (coarse model) |", "| two-stage cascade |",
                  "| end-to-end, one box around all (thesis) (run 1) |", "| end-to-end, a box per object (run 2) |",
                  "| its coarse module alone (thesis rule, run 1) |",
                  "Validation DSC % per box rule (per run): all:", "failed (Jaccard < 0.65)", "Published (seed 003"):
        assert label in text
    assert (tmp_path / "report_examples.png").is_file() and "![examples](report_examples.png)" in text
    assert f"Command: `python -m benchmarks.experiment_e2e {' '.join(args)} && python -m benchmarks.experiment_e2e " \
           f"{' '.join(args)} --runs 2`" in text
    # resumed (fewer runs asked: the second run is kept): nothing trained or predicted again, the same report
    fake.calls.clear()
    main(args)
    assert not fake.of("nnUNetv2_train") and not fake.of("nnUNetv2_predict")
    assert [ln for ln in out.read_text().splitlines() if ln.startswith("| ")] == \
        [ln for ln in text.splitlines() if ln.startswith("| ")]
