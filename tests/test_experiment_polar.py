"""The polar experiment's scoring and report, and a smoke run on 30 real Kvasir images (skipped
when the data is absent), its nnU-Net subprocesses replaced by ``fake_nnunet.FakeNNUNet``
(orchestration: networks, arms and their origin settings, resume, ``--redo_predictions``; the real
commands are checked in the trained-model tests)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import benchmarks.experiment_polar as experiment
from benchmarks.experiment_polar import ARMS, choose_thresholds, main, origin_counts, report
from benchmarks.reports import example_overlays, score_folder
from nnunet_stseg.core.metrics import overlap
from nnunet_stseg.settings import OVERRIDES_ENV

from fake_nnunet import FakeNNUNet

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"


def test_overlap_on_a_known_example():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    pred = np.zeros_like(gt)
    pred[:2, :3] = True
    o = overlap(pred, gt)
    assert o["Dice"] == pytest.approx(0.8) and o["IoU"] == pytest.approx(4 / 6)
    assert o["Precision"] == pytest.approx(4 / 6) and o["Recall"] == 1.0
    assert overlap(np.zeros_like(gt), np.zeros_like(gt))["Dice"] == 1.0, "empty vs empty is perfect"
    assert np.isnan(overlap(np.zeros_like(gt), gt)["Precision"])


def test_origin_counts_from_the_predictor_log(tmp_path):
    log = tmp_path / "predict.log"
    log.write_text("[nnunet-stseg] 5 origin(s) (coarse) in 4 slice(s)\n"
                   "[nnunet-stseg] 3 origin(s) (heatmap) in 3 slice(s); 2 slice(s) with coarse foreground but no "
                   "heatmap peak keep the coarse prediction\n"
                   "[nnunet-stseg] no origin (no heatmap peak): coarse prediction kept\n")
    assert origin_counts([log, tmp_path / "missing.log"]) == {"origins": 8, "slices_with_origin": 7,
                                                              "kept_coarse": 2, "no_origin_cases": 1}


def test_thresholds_are_chosen_on_cases_that_are_not_scored():
    """Kvasir: one threshold from the validation images; cross-validation: fold f's threshold from
    the other folds' patients only; ties go to the lower threshold."""
    sweep = {"0.0": {"a": 0.5, "b": 0.5, "c": 0.9}, "0.7": {"a": 0.9, "b": 0.5, "c": 0.1}}
    assert choose_thresholds(sweep, {0: ["a", "b", "c"]}, [0], same_cases=True) == {0: "0.0"}
    assert choose_thresholds(sweep, {0: ["a"], 1: ["b"], 2: ["c"]}, [0, 1, 2], same_cases=False) == \
        {0: "0.0", 1: "0.0", 2: "0.7"}
    assert choose_thresholds({"0.5": {"a": 0.4}, "0.7": {"a": 0.4}}, {0: ["a"]}, [0], True) == {0: "0.5"}
    with pytest.raises(SystemExit, match="at least 2 folds"):
        choose_thresholds(sweep, {0: ["a"]}, [0], same_cases=False)


def test_score_folder_regions_and_report(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    gt = np.zeros((2, 6, 6), np.uint8)
    gt[:, 1:4, 1:4] = 1
    gt[:, 2, 2] = 2
    pred = gt.copy()
    pred[:, 2, 2] = 1  # EAT missed, pericardium (1 + 2) perfect
    for case in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(gt), str(gt_dir / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(pred), str(pred_dir / f"{case}.nii.gz"))
    r = score_folder(pred_dir, gt_dir, ".nii.gz", {"pericardium": (1, 2), "eat": (2,)})
    assert r["n_cases"] == 2 and r["pericardium_Dice"] == (1.0, 0.0) and r["eat_Dice"] == (0.0, 0.0)
    assert r["pericardium_empty_predictions"] == 0 and r["eat_empty_predictions"] == 2  # EAT predicted nowhere
    results = {"dataset": "cardiac", "size": 128, "command": "cmd", "arms": {arm: r for arm in ARMS},
               "budget": {"features": 16, "batch_size": 8, "epochs": 1, "iters": 2, "device": "cpu", "folds": [0],
                          "seed": 0},
               "inference_s": {f"{arm}/0": {"seconds": 10.0, "images": 2, "slices": 4} for arm in ARMS},
               "train_s": {"cartesian/0": 5.0, "centre/0": 6.0, "polar/0": 7.0}}
    results["origins"] = {"polar_coarse": {"origins": 6, "slices_with_origin": 4, "kept_coarse": 0,
                                           "no_origin_cases": 0}}
    results["centre_validation"] = {"0": {"precision": float("nan"), "recall": 0.0, "f1": 0.0,
                                          "median_distance_px": float("nan"), "sigma_px": 2.3},
                                    "1": {"precision": 0.5, "recall": 1.0, "f1": 0.667, "median_distance_px": 1.0,
                                          "sigma_px": 2.3, "loss": "focal", "tp": 2, "fn": 2,
                                          "calibration": [{"low": 0.1, "high": 0.5, "peaks": 4, "hit_fraction": 0.25},
                                                          {"low": 0.5, "high": 1.0, "peaks": 0, "hit_fraction": None}]}}
    results["confidence"] = {"coarse": {"grid": [0.0, 0.7], "chosen": {"0": "0.7"},
                                        "tuning_dice": {"0.0": 0.5, "0.7": 0.625}}}
    text = report(results)
    assert "fold 1: focal loss, precision 0.50, recall 1.00, F1 0.67" in text
    assert "| [0.1, 0.5) | 4 | 0.25 | 0.25 / 0.25 / 0.25 |" in text and "| [0.5, 1.0] | 0 | - | nan / 0.00 / 0.00 |" in text
    assert "4 objects" in text
    assert "coarse: 0.0 -> 0.500, 0.7 -> 0.625, chosen fold 0: 0.7" in text
    assert "polar_coarse 6 in 4 slices (1.50 per slice)" in text
    assert "fold 0: mse loss, precision nan, recall 0.00, F1 0.00, sigma 2.3 px" in text
    assert "| polar_heatmap | 1.000 ± 0.000 | 1.000 ± 0.000 | 1.000 ± 0.000 | 1.000 ± 0.000 | 0 | 0.000 ± 0.000 " \
        "| +0.000 (0 / 0) | 5.00 | 2500 |" in text
    assert "| cartesian | 1.000 ± 0.000 |" in text and "| 0.000 ± 0.000 | - | 5.00 | 2500 |" in text
    assert "cartesian 5, centre 6, polar 7" in text and "Published" in text and "examples" not in text

    # example overlays: images next to the predictions of every arm, the report links the picture
    images = tmp_path / "inputs"
    images.mkdir()
    for arm in ARMS:
        (tmp_path / "predictions" / arm).mkdir(parents=True)
        for case in ("a", "b"):
            (tmp_path / "predictions" / arm / f"{case}.nii.gz").symlink_to(pred_dir / f"{case}.nii.gz")
    for case in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=gt.shape)),
                        str(images / f"{case}_0000.nii.gz"))
    results["files"] = {"gt_dir": str(gt_dir), "file_ending": ".nii.gz", "image_dirs": [str(images)]}
    figure = example_overlays(results, tmp_path, tmp_path / "docs" / "report_examples.png", arms=ARMS)
    assert figure.read_bytes()[:4] == b"\x89PNG" and not list(figure.parent.glob(".tmp_*"))
    assert "![examples](report_examples.png)" in report(results, figure.name)
    assert example_overlays({**results, "files": None}, tmp_path, tmp_path / "none.png", arms=ARMS) is None


@pytest.mark.slow  # converts and plans 30 real images (in-process, about 35 s)
@pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")
def test_experiment_smoke_on_kvasir(tmp_path, monkeypatch):
    fake = FakeNNUNet().install(monkeypatch, experiment)
    work, out = tmp_path / "work", tmp_path / "report.md"
    args = ["--dataset", "kvasir", "--workdir", str(work), "--size", "32", "--features", "4", "--batch_size", "4",
            "--epochs", "1", "--iters", "3", "--limit", "30", "--out", str(out)]
    main(args)
    results = json.loads((work / "results.json").read_text())
    assert set(results["arms"]) == set(ARMS)
    for arm in ARMS:
        assert results["arms"][arm]["n_cases"] == 3 and 0 <= results["arms"][arm]["polyp_Dice"][0] <= 1
    # each arm's origin settings reach its nnUNetv2_predict (the centre-point model loaded once per
    # heatmap run is checked on real models: test_polar.py::test_polar_pipeline_through_the_stock_clis)
    keys = ("polar.origin_source", "polar.max_origins", "centre.peak_threshold", "polar.min_origin_confidence",
            "polar.confidence_weighting")

    def given(env: dict) -> tuple:
        assert env["STSEG_POLAR_ORIGINS"] == "", "a deprecated variable of the caller must not leak in"
        pairs = dict(item.split("=") for item in env[OVERRIDES_ENV].split(","))
        return tuple(str(pairs.get(k, "")) for k in keys)

    settings = {c.args[c.args.index("-o") + 1].rsplit("/", 1)[-1]: given(c.env) for c in fake.of("nnUNetv2_predict")}
    chosen = {source: results["confidence"][source]["chosen"]["0"] for source in ("coarse", "heatmap")}
    assert settings == {"cartesian": ("coarse", "", "", "", ""), "polar_coarse": ("coarse", "", "", "", ""),
                        "polar_coarse_max1": ("coarse", "1", "", "", ""), "polar_heatmap": ("heatmap", "", "", "", ""),
                        "polar_heatmap_argmax": ("heatmap", "1", "0", "", ""),
                        **{f"coarse_{t}": ("coarse", "", "", str(t), "1") for t in (0.0, 0.7, 0.8, 0.9)},
                        **{f"heatmap_{t}": ("heatmap", "", "0.1", str(t), "1") for t in (0.1, 0.3, 0.5, 0.7)},
                        "polar_coarse_confident": ("coarse", "", "", chosen["coarse"], "1"),
                        "polar_heatmap_confident": ("heatmap", "", "0.1", chosen["heatmap"], "1")}
    # the thresholds were tried on the split's validation images (imagesTr), never on the test images
    tuning_inputs = {c.args[c.args.index("-i") + 1] for c in fake.of("nnUNetv2_predict")
                     if "/tuning/" in c.args[c.args.index("-o") + 1]}
    assert tuning_inputs == {str(work / "inputs" / "validation")}
    split = json.loads(next((work / "nnUNet_raw").glob("Dataset720_*/stseg_split.json")).read_text())
    assert sorted(p.name[:-len("_0000.png")] for p in (work / "inputs" / "validation").iterdir()) == sorted(split["val"])
    assert sorted(c.args[c.args.index("-tr") + 1] for c in fake.of("nnUNetv2_train")) == \
        ["nnUNetTrainer_StSCentre", "nnUNetTrainer_StSCoarse", "nnUNetTrainer_StSPolar"]
    text = out.read_text()
    assert all(f"| {arm} |" in text for arm in ARMS) and (tmp_path / "report_examples.png").is_file()
    checkpoints = sorted((work / "nnUNet_results").rglob("checkpoint_final.pth"))
    assert len(checkpoints) == 3
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    fake.calls.clear()
    main(args)  # resumable: nothing is retrained
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    assert not fake.of("nnUNetv2_train") and not fake.of("nnUNetv2_predict")
    predictions = sorted((work / "predictions").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in predictions}
    main(args + ["--redo_predictions"])  # predicted again with the same models
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    assert sorted((work / "predictions").rglob("*.png")) == predictions
    assert all(p.stat().st_mtime_ns != t for p, t in before.items())
    assert set(json.loads((work / "results.json").read_text())["arms"]) == set(ARMS)
