"""The depth experiment's split and scoring (the training runs are not in the tests)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from benchmarks.experiment_depth import adipose_window, case_scores, score_arm
from benchmarks.runner import per_patient_split


def test_per_patient_split_is_a_seeded_partition():
    ids = [f"p{i:02d}" for i in range(16)]
    split = per_patient_split(ids, 2, seed=0)
    assert len(split) == 2
    vals = [set(f["val"]) for f in split]
    assert vals[0].isdisjoint(vals[1]) and vals[0] | vals[1] == set(ids) and len(vals[0]) == 8
    for f in split:
        assert set(f["train"]) == set(ids) - set(f["val"])
    assert per_patient_split(ids, 2, seed=0) == split
    assert per_patient_split(ids, 2, seed=1) != split


def test_case_scores_on_a_known_example():
    gt = np.zeros((2, 4, 4), np.uint8)
    gt[0, :2, :2] = 1
    gt[0, 0, 0] = 2  # EAT: 1 pixel on slice 0
    pred = np.zeros_like(gt)
    pred[0, :2, :3] = 1  # pericardium: 6 predicted, 4 true, 4 overlap
    pred[0, 0, 0] = pred[0, 0, 1] = 2  # EAT: 2 predicted, 1 true
    s = case_scores(pred, gt)
    assert s["pericardium"]["Dice"] == pytest.approx(2 * 4 / (6 + 4))
    assert s["pericardium"]["Precision"] == pytest.approx(4 / 6) and s["pericardium"]["Recall"] == 1.0
    assert s["eat"]["Dice"] == pytest.approx(2 * 1 / 3)
    assert s["eat_counts"] == {"pred": [2, 0], "gt": [1, 0]}


def test_adipose_window_recovers_the_band_that_makes_the_label():
    """EAT drawn as the pericardium pixels of intensity 40..60 (plus lung-dark pixels outside the
    pericardium that the rule must ignore): the window search finds exactly [40, 60]."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(3):
        image = rng.integers(0, 256, size=(4, 16, 16)).astype(np.uint8)
        label = np.zeros_like(image)
        label[:, 2:14, 2:14] = 1
        label[(label == 1) & (image >= 40) & (image <= 60)] = 2
        images.append(image)
        labels.append(label)
    w = adipose_window(images, labels)
    assert w["window"] == [40, 60] and w["train_dice"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no EAT"):
        adipose_window(images, [np.where(lab == 2, 1, lab) for lab in labels])


def test_case_scores_by_the_adipose_rule():
    gt = np.zeros((2, 4, 4), np.uint8)
    gt[0, :2, :2] = 1
    gt[0, 0, 0] = 2
    image = np.full(gt.shape, 200.0)
    image[0, 0, :2] = 50.0  # adipose-dark: the true EAT pixel and its right neighbour
    pred = np.zeros_like(gt)
    pred[0, :2, :3] = 1  # pericardium (no EAT label predicted): covers both dark pixels
    s = case_scores(pred, gt, image, [0, 100])
    assert s["eat"]["Dice"] == 0.0 and s["eat_counts"]["pred"] == [0, 0]
    assert s["eat_rule"]["Dice"] == pytest.approx(2 * 1 / 3) and s["eat_rule_counts"]["pred"] == [2, 0]
    assert s["eat_rule_true_pericardium"]["Dice"] == pytest.approx(2 * 1 / 3)  # (0,1) is inside the true one too
    assert "eat_rule" not in case_scores(pred, gt)


def test_score_arm_pearson_and_bias(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        gt = np.zeros((5, 8, 8), np.uint8)
        for z in range(5):
            gt[z].flat[: rng.integers(0, 20)] = 2
        pred = gt.copy()
        pred[:, 7, :2] = 2  # two extra EAT pixels on every slice
        sitk.WriteImage(sitk.GetImageFromArray(gt), str(gt_dir / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(pred), str(pred_dir / f"{case}.nii.gz"))
    r = score_arm([pred_dir], gt_dir)
    assert r["n_patients"] == 2 and r["n_slices"] == 10
    assert r["pericardium_empty_predictions"] == 0 and r["eat_empty_predictions"] == 0
    assert r["eat_count_bias"] == pytest.approx(2.0)
    assert r["eat_count_pearson_r"] == pytest.approx(1.0)
    assert r["eat_count_loa"][0] == pytest.approx(2.0) and r["eat_count_loa"][1] == pytest.approx(2.0)


@pytest.mark.slow
def test_experiment_smoke_on_a_generated_3d_dataset(tmp_path):
    """The whole command at a toy budget on the planned 2d configuration: with and without the
    depth channel, 2 per-patient folds trained with nnUNetv2_train and scored on nnU-Net's own
    validation (here without mirroring: the variable reaches the stock CLI's trainer); every
    patient scored once; the report and Bland-Altman PNG are written; a re-run retrains nothing."""
    import json

    from benchmarks.experiment_depth import main
    from nnunet_stseg.data.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(tmp_path / "raw", dataset_id=701, name="CardiacToy", dim=3, n_train=4, n_test=0,
                                shape=(12, 32, 32), num_classes=2, spacing=(1.0, 1.0, 3.0), empty_cases=0)
    work, out = tmp_path / "work", tmp_path / "docs" / "depth.md"
    args = ["--workdir", str(work), "--raw", str(ds.parent), "--settings", "planned", "--features", "4",
            "--batch_size", "2", "--epochs", "1", "--iters", "2", "--no_val_mirroring", "--out", str(out)]
    main(args)
    results = json.loads((work / "results.json").read_text())
    assert set(results["arms"]) == {"planned/plain", "planned/depth"}
    for arm in results["arms"].values():
        assert arm["configuration"] == "2d_w4" and arm["n_patients"] == 4
        assert arm["budget"]["val_mirroring"] is False and set(arm["train_s"]) == {"0", "1"}
        assert arm["n_slices"] == 4 * 12 and 0 <= arm["pericardium_Dice"][0] <= 1
    logs = sorted((work / "nnUNet_results").rglob("training_log_*.txt"))
    assert len(logs) == 4 and all("final validation without mirroring" in p.read_text() for p in logs)
    case = next(iter(sorted((work / "nnUNet_results").rglob("validation/*.nii.gz"))))
    pred, ref = sitk.ReadImage(str(case)), sitk.ReadImage(str(ds / "labelsTr" / case.name))
    assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
    text = out.read_text()
    assert "| planned 2d (2d_w4) | yes | width 4, batch 2, 1 x 2, cpu, scored without mirroring |" in text
    # EAT by the adipose rule: a window per fold from its training patients (label 2 objects are brighter)
    assert len(results["adipose_windows"]) == 2 and all(w["train_dice"] > 0.9 for w in results["adipose_windows"])
    assert "## EAT as adipose inside the predicted pericardium" in text
    assert all(0 <= arm["eat_rule_Dice"][0] <= 1 and arm["eat_rule_true_pericardium_Dice"][0] > 0.8
               for arm in results["arms"].values())
    assert (out.parent / "depth_bland_altman.png").is_file()
    checkpoints = sorted((work / "nnUNet_results").rglob("checkpoint_final.pth"))
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    main(args)  # resumable: nothing retrained
    assert len(checkpoints) == 4 and [p.stat().st_mtime_ns for p in checkpoints] == mtimes


def test_report_says_why_the_eat_correlation_is_undefined():
    from benchmarks.experiment_depth import report

    def arm(pred_counts, r):
        scores = {f"{reg}_{m}": (0.5, 0.1) for reg in ("pericardium", "eat") for m in ("Dice", "IoU", "Precision",
                                                                                       "Recall")}
        return {**scores, "configuration": "2d_w16", "train_s": {"0": 10.0}, "eat_count_pearson_r": r,
                "eat_count_bias": -3.0, "eat_count_loa": (-5.0, -1.0), "command": "cmd",
                "budget": {"features": 16, "batch_size": 2, "epochs": 1, "iters": 2, "val_mirroring": False},
                "cases": {"a": {"eat_counts": {"pred": pred_counts, "gt": [1, 5]}}}}

    results = {"split": {"folds": 2, "seed": 0, "n_patients": 2},
               "arms": {"planned/plain": arm([0, 0], float("nan")), "planned/depth": arm([2, 2], float("nan")),
                        "128/depth": arm([1, 4], 0.987)}}
    rows = report(results, "cmd").splitlines()
    plain, depth, small = (next(line for line in rows if line.startswith(prefix)) for prefix in
                           ("| planned 2d (2d_w16) | no |", "| planned 2d (2d_w16) | yes |", "| 128 x 128 | yes |"))
    assert "| undefined (no EAT predicted) |" in plain and "| undefined (constant counts) |" in depth
    assert "| 0.987 |" in small and "scored without mirroring" in plain


def test_report_table_of_eat_by_the_adipose_rule():
    from benchmarks.experiment_depth import report

    regions = ("pericardium", "eat", "eat_rule", "eat_rule_true_pericardium")
    arm = {**{f"{reg}_{m}": (0.25, 0.05) for reg in regions for m in ("Dice", "IoU", "Precision", "Recall")},
           "eat_rule_true_pericardium_Dice": (0.41, 0.12), "configuration": "2d_w16", "train_s": {"0": 1.0},
           "eat_count_pearson_r": 0.1, "eat_count_bias": -3.0, "eat_count_loa": (-5.0, -1.0),
           "eat_rule_count_pearson_r": 0.418, "eat_rule_count_bias": -1622.4, "eat_rule_count_loa": (-12904.0, 9661.0),
           "budget": {"features": 16, "batch_size": 2, "epochs": 1, "iters": 2}, "eat_rule_empty_predictions": 3,
           "cases": {"a": {"eat_counts": {"pred": [1, 2], "gt": [1, 5]},
                           "eat_rule_counts": {"pred": [3, 2], "gt": [1, 5]}}}}
    results = {"split": {"folds": 2, "seed": 0, "n_patients": 2}, "arms": {"planned/depth": arm},
               "adipose_windows": [{"window": [0, 168], "train_dice": 0.426}, {"window": [0, 161], "train_dice": 0.428}]}
    text = report(results, "cmd")
    assert "fold 0 [0, 168] (training DSC 0.426); fold 1 [0, 161] (training DSC 0.428)" in text
    assert ("| planned 2d (2d_w16) | yes | 0.250 ± 0.050 | 0.250 ± 0.050 | 0.250 ± 0.050 | 0.250 ± 0.050 | 3 | 0.418 | "
            "-1622 (-12904, 9661) | 0.410 ± 0.120 |") in text
    assert "| planned 2d (2d_w16) | yes | width 16, batch 2, 1 x 2, cpu | 0.250 ± 0.050 | 0.250 ± 0.050 | " \
           "0.250 ± 0.050 | 0.250 ± 0.050 | n/a | 0.250 ± 0.050 |" in text  # an old results file: no count
    skipped = report({**results, "adipose_windows": None,
                      "adipose_rule_skipped": "no pericardium or no EAT (label 2) in the training patients"}, "cmd")
    assert "## EAT as adipose" not in skipped and "not scored (no pericardium or no EAT (label 2)" in skipped
