"""Smoke runs of ``python -m benchmarks.experiment_lsnet`` (issue 20) on real Kvasir images and real
Cardiac Fat CT patients, the nnU-Net subprocesses replaced by ``fake_nnunet.FakeNNUNet``
(orchestration only: which networks train in which order and on which configuration, which arms
are predicted, the report, resume). The first-stage box IoU needs a real L-SNet checkpoint and is
stubbed here; it is computed for real by the experiment itself (docs/benchmarks/kvasir_lsnet.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.experiment_kvasir as experiment_kvasir
import benchmarks.experiment_lsnet as experiment
from benchmarks.experiment_lsnet import main

from fake_nnunet import FakeNNUNet

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KVASIR = SHARED / "kvasir-seg"
CARDIAC = SHARED / "nnUNet_raw"


def _trained(fake) -> list[tuple[str, str, str]]:
    return [(c.args[1], c.args[2], c.args[c.args.index("-tr") + 1]) for c in fake.of("nnUNetv2_train")]


@pytest.mark.slow  # converts and plans 30 real images (in-process)
@pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")
def test_lsnet_experiment_on_kvasir_smoke_and_resume(tmp_path, monkeypatch):
    fake = FakeNNUNet().install(monkeypatch, experiment, experiment_kvasir)
    monkeypatch.setattr(experiment, "lnet_box_iou", lambda model, images, labels, ending, fold=0: [0.5, 0.7])
    work, out = tmp_path / "work", tmp_path / "report.md"
    args = ["--workdir", str(work), "--src", str(KVASIR), "--sizes", "16", "--features", "4", "--epochs", "1",
            "--iters", "2", "--batch_size", "2", "--limit", "30", "--out", str(out)]
    main(args)
    assert [(c, t) for c, _, t in _trained(fake)] == [
        ("2d_sts_coarse_16", "nnUNetTrainer_StSCoarse"), ("2d_sts_fine_16", "nnUNetTrainer_StSFine"),
        ("2d_sts_lsnet_16", "nnUNetTrainer_StSLNet"), ("2d_sts_lsnet_16_g0", "nnUNetTrainer_StSLSNet"),
        ("2d_sts_lsnet_16", "nnUNetTrainer_StSLSNet")]
    configs = json.loads(next((work / "nnUNet_preprocessed").glob("Dataset720_*/nnUNetPlans.json")).read_text())[
        "configurations"]
    for name, gamma in (("2d_sts_lsnet_16", 0.1), ("2d_sts_lsnet_16_g0", 0.0)):
        block = configs[name]["sts"]["lsnet"]
        assert configs[name]["sts"]["role"] == "lsnet" and block["gamma"] == gamma
        assert block["start_configuration"] == "2d_sts_lsnet_16" and block["locator_from_coarse"] is False
        assert block["fallback"] == experiment.FALLBACK
        assert configs[name]["data_identifier"] == configs["2d_sts_fine_16"]["data_identifier"]
    predicted = [c.args[c.args.index("-c") + 1] for c in fake.of("nnUNetv2_predict")]
    assert predicted == ["2d_sts_coarse_16", "2d_sts_fine_16", "2d_sts_lsnet_16", "2d_sts_lsnet_16_g0",
                         "2d_sts_lsnet_16"]
    row = json.loads((work / "results_lsnet.json").read_text())["sizes"]["16"]
    assert row["lsnet_g01"]["box_iou"] == [0.5, 0.7] and "box_iou" in row["baseline"]
    text = out.read_text()
    for _, label in experiment.ARMS:
        assert f"| {label} |" in text
    assert "| L-SNet, gamma 0.1 |" in text and "60.00" in text  # the stubbed mIoU, in percent
    assert "First-stage parameters:" in text and "Published (seed 001" in text
    fake.calls.clear()
    main(args)  # resumed: nothing trained or predicted again
    assert not fake.of("nnUNetv2_train") and not fake.of("nnUNetv2_predict")


@pytest.mark.slow  # plans 3 real CT volumes (in-process)
@pytest.mark.skipif(not any(CARDIAC.glob("Dataset701_*")) if CARDIAC.is_dir() else True,
                    reason=f"Cardiac Fat CT not found under {CARDIAC}")
def test_lsnet_experiment_on_cardiac_fat_trains_every_fold(tmp_path, monkeypatch):
    fake = FakeNNUNet().install(monkeypatch, experiment)
    seen = []
    monkeypatch.setattr(experiment, "lnet_box_iou",
                        lambda model, images, labels, ending, fold=0: seen.append((Path(model).name, fold)) or [0.8])
    out = tmp_path / "report.md"
    main(["--dataset", "cardiac", "--workdir", str(tmp_path / "work"), "--limit", "4", "--sizes", "32", "--features",
          "4", "--epochs", "1", "--iters", "2", "--batch_size", "2", "--canvas", "64", "--out", str(out)])
    trained = _trained(fake)
    assert [(c, f) for c, f, _ in trained[:5]] == [("2d_sts_coarse_32", "0"), ("2d_sts_fine_32", "0"),
                                                   ("2d_sts_lsnet_32", "0"), ("2d_sts_lsnet_32_g0", "0"),
                                                   ("2d_sts_lsnet_32", "0")]
    assert len(trained) == 10 and {f for _, f, _ in trained[5:]} == {"1"}
    assert all(c.env.get("STSEG_SKIP_VALIDATION") == "1" for c in fake.of("nnUNetv2_train"))
    configs = json.loads(next((tmp_path / "work" / "nnUNet_preprocessed").glob("Dataset701_*/nnUNetPlans.json"))
                         .read_text())["configurations"]
    assert configs["2d_sts_lsnet_32_g0"]["sts"]["lsnet"]["canvas"] == [64, 64]
    assert configs["2d_sts_lsnet_32"]["sts"]["lsnet"]["fallback"] == "empty"  # slices without pericardium
    assert sorted(seen) == sorted((f"nnUNetTrainer_{t}__nnUNetPlans__{c}", f) for t, c in
                                  (("StSLNet", "2d_sts_lsnet_32"), ("StSLSNet", "2d_sts_lsnet_32_g0"),
                                   ("StSLSNet", "2d_sts_lsnet_32")) for f in (0, 1))
    text = out.read_text()
    assert "Cardiac Fat CT: L-SNet" in text and "| L-SNet, gamma 0 |" in text and "80.00" in text
