"""The depth experiment's split and scoring (the training runs are not in the tests)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_stseg.experiment_depth import case_scores, per_patient_split, score_arm


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

    from nnunet_stseg.experiment_depth import main
    from nnunet_stseg.synthetic import make_synthetic_dataset

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
    assert (out.parent / "depth_bland_altman.png").is_file()
    checkpoints = sorted((work / "nnUNet_results").rglob("checkpoint_final.pth"))
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    main(args)  # resumable: nothing retrained
    assert len(checkpoints) == 4 and [p.stat().st_mtime_ns for p in checkpoints] == mtimes


def test_report_says_why_the_eat_correlation_is_undefined():
    from nnunet_stseg.experiment_depth import report

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
