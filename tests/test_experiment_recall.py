"""Smoke run of ``python -m benchmarks.experiment_recall`` (issue 22) on 30 real Kvasir images, the nnU-Net
subprocesses replaced by ``fake_nnunet.FakeNNUNet`` (orchestration only: which networks are
trained with which plans, which thresholds are tried on the VALIDATION images, which arm predicts
with which model and proposal rule, what is resumed, what the report says)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.experiment_kvasir as experiment_kvasir
import benchmarks.experiment_recall as experiment
from benchmarks.experiment_recall import main

from fake_nnunet import FakeNNUNet

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"
pytestmark = pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")


def _given(call) -> dict[str, str]:
    """The plan overrides a fake nnU-Net call was given (``STSEG_OVERRIDES``)."""
    raw = call.env.get("STSEG_OVERRIDES", "")
    return dict(item.split("=", 1) for item in raw.split(",")) if raw else {}


@pytest.mark.slow  # converts and plans 30 real images (in-process)
def test_recall_experiment_smoke_and_resume(tmp_path, monkeypatch):
    fake = FakeNNUNet().install(monkeypatch, experiment, experiment_kvasir)
    work, out = tmp_path / "work", tmp_path / "report.md"
    args = ["--workdir", str(work), "--src", str(KVASIR), "--sizes", "16", "--features", "4", "--epochs", "1",
            "--iters", "2", "--batch_size", "2", "--thresholds", "0.3", "0.1", "--limit", "30", "--out", str(out)]
    main(args)
    # networks: coarse at S and 2S, the published fine stage and the rejecting one, each once
    trained = sorted((c.args[1], c.args[c.args.index("-tr") + 1]) for c in fake.of("nnUNetv2_train"))
    assert trained == [("2d_sts_coarse_16", "nnUNetTrainer_StSCoarse"), ("2d_sts_coarse_32", "nnUNetTrainer_StSCoarse"),
                       ("2d_sts_fine_16", "nnUNetTrainer_StSFine"), ("2d_sts_fine_16_rf", "nnUNetTrainer_StSFine")]
    plans = json.loads(next((work / "nnUNet_preprocessed").glob("Dataset720_*/nnUNetPlans.json")).read_text())
    crops = {c: plans["configurations"][c]["sts"]["crop"] for c in ("2d_sts_fine_16", "2d_sts_fine_16_rf")}
    assert (crops["2d_sts_fine_16"]["proposal_threshold"], crops["2d_sts_fine_16"]["negative_fraction"]) == (None, 0)
    assert crops["2d_sts_fine_16_rf"]["negative_fraction"] == 0.25
    assert plans["configurations"]["2d_sts_fine_16_rf"]["data_identifier"] == \
        plans["configurations"]["2d_sts_fine_16"]["data_identifier"], "the variant reuses the preprocessed data"
    # thresholds are tried on the validation images only, for both fine models; then 6 test arms
    predictions = [(Path(c.args[c.args.index("-i") + 1]).name, c.args[c.args.index("-c") + 1],
                    _given(c).get("crop.proposal_threshold")) for c in fake.of("nnUNetv2_predict")
                   if "--save_probabilities" not in c.args and "crop.proposal_confirmation" not in _given(c)]
    confirmed = [(Path(c.args[c.args.index("-i") + 1]).name, c.args[c.args.index("-c") + 1],
                  _given(c)["crop.proposal_threshold"], _given(c)["crop.proposal_confirmation"])
                 for c in fake.of("nnUNetv2_predict") if "crop.proposal_confirmation" in _given(c)]
    # plus one export of the coarse model's probabilities on the test images (why misses stay missed)
    exports = [c for c in fake.of("nnUNetv2_predict") if "--save_probabilities" in c.args]
    assert [(Path(c.args[c.args.index("-i") + 1]).name, c.args[c.args.index("-c") + 1]) for c in exports] == \
        [("imagesTs", "2d_sts_coarse_16")]
    validation = sorted((c, t) for i, c, t in predictions if i == "val_images")
    assert validation == sorted((c, t) for c in ("2d_sts_fine_16", "2d_sts_fine_16_rf") for t in ("none", "0.3", "0.1"))
    split = json.loads(next((work / "nnUNet_raw").glob("Dataset720_*/stseg_split.json")).read_text())
    assert sorted(p.name for p in (work / "val_images").iterdir()) == sorted(f"{c}_0000.png" for c in split["val"])
    test = [(c, t) for i, c, t in predictions if i == "imagesTs"]
    results = json.loads((work / "results.json").read_text())
    row = results["sizes"]["16"]
    chosen = row["chosen_threshold"]
    assert {chosen["fine"], chosen["rejecting"]} <= {"none", "0.3", "0.1"}
    # confirmed proposals: the published fine stage, every threshold x confirmation on the validation
    # images, then the chosen pair and the lowest threshold's best confirmation on the test images
    assert sorted(v[1:] for v in confirmed if v[0] == "val_images") == sorted(
        ("2d_sts_fine_16", t, "0.9") for t in ("0.3", "0.1"))
    assert row["confirmations"] == ["0.9"], "auto: the stand-in's predictions have no proposal below the decision"
    assert [v[1:] for v in confirmed if v[0] == "imagesTs"] == [
        ("2d_sts_fine_16", *chosen["confirmed"]), ("2d_sts_fine_16", "0.1", chosen["confirmed_lowest"][1])]
    assert test == [("2d_sts_coarse_16", None), ("2d_sts_fine_16", "none"), ("2d_sts_fine_16", chosen["fine"]),
                    ("2d_sts_fine_16", "0.1"), ("2d_sts_fine_16_rf", "none"),
                    ("2d_sts_fine_16_rf", chosen["rejecting"]), ("2d_sts_fine_16_rf", "0.1"), ("2d_sts_coarse_32", None)]
    for name, _ in experiment.ARMS[:-1]:  # all but nnU-Net 2d (--native)
        assert row[name]["n"] == 3 and 0 <= row[name]["missed"] <= 3
    text = out.read_text()
    for label in ("| baseline 16 |", "| cascade |", "| cascade + low proposals |", "| rejecting fine |",
                  "| recall-first |", "| baseline 32 |", "| cascade + lowest-t proposals | 0.1 |",
                  "| recall-first, lowest t | 0.1 | - |", "| cascade + confirmed lowest-t proposals | 0.1 | 0.",
                  "| threshold | none | 0.9 |", "The goal per recall-first arm (DSC >= baseline 32's",
                  "| cascade + confirmed proposals | "):
        assert label in text
    assert "Validation DSC % per proposal threshold" in text and "chosen: fine" in text
    # resumed: nothing trained or predicted again; the report is the same
    fake.calls.clear()
    main(args)
    assert not fake.of("nnUNetv2_train") and not fake.of("nnUNetv2_predict")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line for line in out.read_text().splitlines() if line.startswith("| ")] == table
    again = tmp_path / "again.md"
    main(["--workdir", str(work), "--report_only", "--out", str(again)])
    assert f"Command: `python -m benchmarks.experiment_recall {' '.join(args)}`" in again.read_text()


@pytest.mark.slow  # converts and plans 30 real images at native resolution (in-process)
def test_native_recall_experiment_reuses_the_native_networks(tmp_path, monkeypatch):
    """``--native``: the networks of ``experiment-kvasir --native`` (trained by it when missing, in
    the same work folder), the proposal rules chosen on the native validation images, the cascade
    arms and nnU-Net 2d's scores from that experiment in one table; a second run trains and predicts
    nothing."""
    fake = FakeNNUNet().install(monkeypatch, experiment, experiment_kvasir)
    work, out = tmp_path / "native", tmp_path / "native.md"
    args = ["--native", "--workdir", str(work), "--src", str(KVASIR), "--sizes", "32", "--features", "4", "--epochs",
            "1", "--iters", "3", "--thresholds", "0.3", "--confirmations", "0.8", "--limit", "30", "--out", str(out)]
    main(args)
    trained = sorted(c.args[1] for c in fake.of("nnUNetv2_train"))
    assert trained == ["2d_sts_coarse_32", "2d_sts_fine_32", "2d_w4"], "the native experiment's networks, no others"
    native = json.loads((work / "results.json").read_text())
    assert native["budget"]["batch_size"] == 2 and set(native["arms"]) == {"nnunet_2d", "cascade_32"}
    results = json.loads((work / "recall_results.json").read_text())
    row = results["sizes"]["32"]
    assert {name for name, _ in experiment.ARMS} & set(row) == {
        "baseline", "cascade", "cascade_low", "cascade_lowest", "cascade_confirmed", "cascade_confirmed_lowest",
        "nnunet_2d"}
    assert row["nnunet_2d"]["Dice"] == native["arms"]["nnunet_2d"]["Dice"]
    split = json.loads(next((work / "nnUNet_raw").glob("Dataset721_*/stseg_split.json")).read_text())
    assert sorted(p.name for p in (work / "val_images").iterdir()) == sorted(f"{c}_0000.png" for c in split["val"])
    validation = sorted((_given(c).get("crop.proposal_threshold"), _given(c).get("crop.proposal_confirmation", "-"))
                        for c in fake.of("nnUNetv2_predict")
                        if Path(c.args[c.args.index("-i") + 1]).name == "val_images")
    assert validation == [("0.3", "-"), ("0.3", "0.8"), ("none", "-")]
    assert (work / "pred_cascade_32").is_dir() and (work / "pred_recall_cascade_32").is_dir(), \
        "the native experiment's own prediction folders are left alone"
    text = out.read_text()
    for label in ("| nnU-Net 2d | - | - |", "| cascade + confirmed lowest-t proposals | 0.3 | 0.8 |", "| baseline 32 |",
                  "Kvasir-SEG at native resolution", "Validation DSC % per proposal threshold (fine): none",
                  "(DSC >= nnU-Net 2d's"):
        assert label in text, label
    fake.calls.clear()
    main(args)
    assert not fake.of("nnUNetv2_train") and not fake.of("nnUNetv2_predict")
    assert out.read_text().splitlines()[3:] == text.splitlines()[3:]


def test_the_goal_table_checks_dsc_misses_and_precision():
    """A recall-first arm meets the goal only with DSC >= the baseline at 2S, misses at most
    half the cascade's and precision not below the cascade's; each failed check is named."""
    def arm(dice, missed, precision, ms):
        return {"Dice": [dice, 1.0], "missed": missed, "Precision": [precision, 1.0], "ms_per_image": ms}

    row = {"cascade": arm(73.0, 6, 82.0, 240), "baseline_2s": arm(76.0, 3, 81.0, 250),
           "cascade_confirmed": arm(76.5, 3, 82.0, 262), "cascade_lowest": arm(72.0, 3, 79.0, 252),
           "recall_first": arm(77.0, 4, 85.0, 250)}
    lines = experiment.goal_table(row, "64")
    assert "DSC >= baseline 128's 76.00; misses <= half the cascade's 6" in lines[0]
    table = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    assert table["cascade + confirmed proposals"].endswith("| +0.50 | 3 | +0.00 | +22 | yes |")
    assert table["cascade + lowest-t proposals"].endswith("| no (DSC, precision) |")
    assert table["recall-first"].endswith("| no (misses) |")
    assert experiment.goal_table({"cascade": row["cascade"]}, "64") == []


def test_proposal_confidences_split_proposals_by_what_their_box_holds(tmp_path):
    """Proposals below the decision on a polyp (>= 30 % of the box) and off any polyp (none of it)
    are counted apart with their fine confidence; argmax objects and boxes partly on a polyp are
    left out."""
    import numpy as np
    from skimage.io import imsave

    gt = np.zeros((32, 32), np.uint8)
    gt[4:12, 4:12] = 1
    imsave(str(tmp_path / "case.png"), gt, check_contrast=False)

    def obj(start, stop, proposal, confidence):
        return {"box": {"start": [0, *start], "stop": [1, *stop]}, "proposal": proposal,
                "fine_mean_foreground_probability": confidence}

    low = "below the coarse decision"
    objects = [obj((4, 4), (12, 12), low, 0.95), obj((20, 20), (28, 28), low, 0.85), obj((24, 0), (30, 6), low, 0.87),
               obj((10, 10), (22, 22), low, 0.5), obj((4, 4), (12, 12), "coarse argmax", 0.99)]
    (tmp_path / "case.objects.json").write_text(json.dumps({"objects": objects}))
    c = experiment.proposal_confidences(tmp_path, tmp_path)
    assert c["on_polyp"] == {"n": 1, "percentiles": [0.95, 0.95, 0.95]}
    assert c["off_polyp"]["n"] == 2 and c["off_polyp"]["percentiles"][1] == 0.86
    line = experiment.confidence_line({"proposal_confidence": c})[0]
    assert "on a polyp (>= 30 % of the box) 1 (0.95 / 0.95 / 0.95), proposals off any polyp 2 (" in line


def test_auto_confirmations_are_percentiles_of_the_validation_proposals(tmp_path):
    """``--confirmations auto``: the 25th/50th/75th/90th percentiles of the fine stage's confidence in
    the proposals below the decision (argmax objects left out), kept in [0.5, 0.999]; 0.9 alone
    when there is no such proposal."""
    low, argmax = "below the coarse decision", "coarse argmax"
    objects = [{"proposal": low, "fine_mean_foreground_probability": v} for v in (0.80, 0.84, 0.88, 0.92, 1.0)]
    objects.append({"proposal": argmax, "fine_mean_foreground_probability": 0.1})
    (tmp_path / "a.objects.json").write_text(json.dumps({"objects": objects}))
    assert experiment.auto_confirmations(tmp_path) == ["0.84", "0.88", "0.92", "0.968"]
    (tmp_path / "a.objects.json").write_text(json.dumps({"objects": objects[-1:]}))
    assert experiment.auto_confirmations(tmp_path) == ["0.9"]
