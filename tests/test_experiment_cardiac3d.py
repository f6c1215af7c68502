"""The 3D Cardiac experiment (issue 5, experiment 3): its arithmetic and report on hand-made
results, the linked patient subset, and a smoke run of the whole command on a generated 3D
dataset, its nnU-Net subprocesses replaced by ``fake_nnunet.FakeNNUNet`` (orchestration: arms,
folds, resume, ``--report_only``; the real commands are checked in the trained-model tests)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import benchmarks.experiment_cardiac3d as experiment
from benchmarks.experiment_cardiac3d import arm_names, arm_summary, findings, main, report
from benchmarks.runner import linked_subset

from fake_nnunet import FakeNNUNet


def _results(size: int = 64) -> dict:
    full, coarse, cascade = arm_names(size)

    def scores(dsc: float, eat: float) -> dict:
        out = {f"pericardium_{m}": (dsc, 0.01) for m in ("Dice", "IoU", "Precision", "Recall")}
        return {**out, "eat_Dice": (eat, 0.02), "n_cases": 2, "cases": {}}

    return {
        "size": size, "command": "cmd", "dataset": "Dataset701_X",
        "budget": {"features": 8, "batch_size": 2, "epochs": 1, "iters": 2, "device": "cpu", "folds": [0, 1],
                   "seed": 0},
        "patients": {"0": ["a"], "1": ["b"]}, "volume_shapes": [[36, 512, 512], [43, 512, 512]],
        "networks": {"3d_fullres_w8": {"patch_size": [24, 320, 256], "spacing": [3.0, 1.0, 1.0]},
                     "3d_sts_coarse_64": {"patch_size": [48, 64, 64], "spacing": [3.0, 8.0, 8.0]},
                     "3d_sts_fine_64": {"patch_size": [64, 64, 64], "spacing": [3.0, 1.0, 1.0]}},
        "arm_configs": {full: {"configuration": "3d_fullres_w8", "trained": ["3d_fullres_w8"]},
                        coarse: {"configuration": "3d_sts_coarse_64", "trained": ["3d_sts_coarse_64"]},
                        cascade: {"configuration": "3d_sts_fine_64",
                                  "trained": ["3d_sts_coarse_64", "3d_sts_fine_64"]}},
        "train_s": {"3d_fullres_w8/0": 100.0, "3d_fullres_w8/1": 110.0, "3d_sts_coarse_64/0": 10.0,
                    "3d_sts_coarse_64/1": 12.0, "3d_sts_fine_64/0": 20.0, "3d_sts_fine_64/1": 22.0},
        "inference": {f"{full}/0": {"seconds": 60.0, "volumes": 1, "peak_rss_mb": 3000.0},
                      f"{full}/1": {"seconds": 40.0, "volumes": 1, "peak_rss_mb": 3500.0},
                      f"{coarse}/0": {"seconds": 4.0, "volumes": 1, "peak_rss_mb": 1000.0},
                      f"{coarse}/1": {"seconds": 6.0, "volumes": 1, "peak_rss_mb": 1100.0},
                      f"{cascade}/0": {"seconds": 8.0, "volumes": 1, "peak_rss_mb": 2000.0},
                      f"{cascade}/1": {"seconds": 12.0, "volumes": 1, "peak_rss_mb": 1900.0}},
        "arms": {full: scores(0.80, 0.30), coarse: scores(0.70, 0.10), cascade: scores(0.75, 0.20)},
    }


def test_arm_summary_counts_every_network_and_fold_of_an_arm():
    r = _results()
    full, coarse, cascade = arm_names(64)
    assert arm_summary(r, full) == {"s_per_volume": 50.0, "peak_rss_mb": 3500.0, "train_s": 210.0}
    assert arm_summary(r, coarse)["train_s"] == 22.0
    cas = arm_summary(r, cascade)
    assert cas == {"s_per_volume": 10.0, "peak_rss_mb": 2000.0, "train_s": 64.0}, "cascade = coarse + fine"


def test_report_rows_and_findings():
    r = _results()
    text = report(r)
    assert ("| cascade_64 | whole volume at 3 x 8 x 8 mm (patch 48 x 64 x 64) + crops at 64 x 64 x 64 | "
            "0.750 ± 0.010 | 0.750 ± 0.010 | 0.750 ± 0.010 | 0.750 ± 0.010 | n/a | 0.200 ± 0.020 | 10.0 | 2000 | 64 |"
            in text)
    assert "| nnunet_3d_fullres | sliding window, patch 24 x 320 x 256 at 3 x 1 x 1 mm |" in text
    assert "36-43 slices of 512 x 512" in text and "2-fold per-patient cross-validation of 2 patients" in text
    (line,) = findings(r)
    assert "3d at S: pericardium DSC +5.0 points, EAT +10.0" in line
    assert "3d_fullres: pericardium DSC -5.0 points, EAT -10.0, inference 5.0 x faster" in line
    assert "peak memory 2000 vs 3500 MB, training 64 vs 210 s" in line
    del r["arms"]["nnunet_3d_fullres"]
    assert findings(r) == [] and "| nnunet_3d_fullres |" not in report(r)


def test_report_of_another_dataset_names_its_labels_and_the_self_configured_arm():
    r = _results()
    full, coarse, cascade = arm_names(64)
    r["regions"] = {"liver": [1], "spleen": [4]}
    for arm, (liver, spleen) in {full: (0.9, 0.8), coarse: (0.8, 0.5), cascade: (0.85, 0.6),
                                 "cascade_auto": (0.88, 0.75)}.items():
        r["arms"][arm] = {**{f"liver_{m}": (liver, 0.01) for m in ("Dice", "IoU", "Precision", "Recall")},
                          "spleen_Dice": (spleen, 0.05), "n_cases": 2, "cases": {}}
    r["networks"].update({"nnUNetPlansAuto/3d_sts_coarse_48": {"patch_size": [16, 48, 48], "spacing": [7.7, 4, 4],
                                                               "median_image": [36, 80, 80]},
                          "nnUNetPlansAuto/3d_sts_fine_48": {"patch_size": [48, 48, 48], "spacing": [7.7, 1.25, 1.25]}})
    r["arm_configs"]["cascade_auto"] = {"configuration": "nnUNetPlansAuto/3d_sts_fine_48",
                                        "trained": ["nnUNetPlansAuto/3d_sts_coarse_48", "nnUNetPlansAuto/3d_sts_fine_48"]}
    r["train_s"].update({"nnUNetPlansAuto/3d_sts_coarse_48/0": 30.0, "nnUNetPlansAuto/3d_sts_fine_48/0": 40.0})
    r["inference"]["cascade_auto/0"] = {"seconds": 9.0, "volumes": 1, "peak_rss_mb": 1500.0}
    r["auto_planning"] = {"chosen": {"input_size": {"value": 48, "why": "the p50 object's crop"}}, "notes": ["n1"]}
    text = report(r)
    assert "| arm | network input | liver DSC | IoU | precision | recall | empty predictions | spleen DSC |" in text
    assert ("| cascade_auto | coarse grid at 7.7 x 4 x 4 mm (sliding window, patch 16 x 48 x 48) + crops at "
            "48 x 48 x 48 | 0.880 ± 0.010 |") in text
    assert arm_summary(r, "cascade_auto")["train_s"] == 70.0
    assert "input_size = 48 (the p50 object's crop) NOTE: n1" in text and "Pericardium" not in text
    assert "HD95" not in text, "results scored before the surface distance have no HD95 table"
    r["arms"]["cascade_auto"].update({"liver_HD95": (12.5, 3.0), "spleen_HD95": (30.0, 5.5)})
    assert "| cascade_auto | 12.5 ± 3.0 | 30.0 ± 5.5 |" in report(r)
    auto_line = findings(r)[1]
    assert "vs the cascade at S = 64: liver DSC +3.0 points, spleen +15.0" in auto_line
    assert "vs 3d_fullres: liver DSC -2.0 points, spleen -5.0" in auto_line


def test_linked_subset_takes_the_first_patients(tmp_path):
    ds = tmp_path / "src" / "Dataset777_Y"
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True)
    for case in ("c", "a", "b"):
        (ds / "labelsTr" / f"{case}.nii.gz").write_bytes(b"l")
        (ds / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"i")
    (ds / "dataset.json").write_text(json.dumps({"numTraining": 3, "file_ending": ".nii.gz"}))
    sub = linked_subset(ds, tmp_path / "raw", 2)
    assert sub == tmp_path / "raw" / "Dataset777_Y"
    assert sorted(p.name for p in (sub / "labelsTr").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    assert (sub / "imagesTr" / "a_0000.nii.gz").resolve() == ds / "imagesTr" / "a_0000.nii.gz"
    assert json.loads((sub / "dataset.json").read_text())["numTraining"] == 2
    assert linked_subset(ds, tmp_path / "raw", 2) == sub, "a second call (a resumed run) is harmless"


def test_bad_dataset_folder_and_report_only_without_a_run(tmp_path):
    with pytest.raises(SystemExit, match="is not an nnU-Net raw dataset folder"):
        main(["--workdir", str(tmp_path / "w"), "--dataset", str(tmp_path)])
    with pytest.raises(SystemExit, match="--report_only needs a finished run"):
        main(["--workdir", str(tmp_path / "w"), "--report_only"])


@pytest.mark.slow  # plans a generated 3D dataset in-process
def test_experiment_smoke_on_a_generated_3d_dataset(tmp_path, monkeypatch):
    """The whole command at a toy budget: three arms trained with nnUNetv2_train (without their
    final validation), predicted with nnUNetv2_predict per fold, scored per patient against labels
    1+2 and 2; the predictions keep the input geometry; a re-run retrains nothing; --report_only
    rebuilds the same report."""
    from nnunet_stseg.data.synthetic import make_synthetic_dataset

    fake = FakeNNUNet().install(monkeypatch, experiment)

    ds = make_synthetic_dataset(tmp_path / "raw", dataset_id=993, name="Heart3D", dim=3, n_train=6, n_test=0,
                                shape=(20, 40, 40), num_classes=2, spacing=(1.0, 1.0, 2.5), empty_cases=0)
    dataset_json = json.loads((ds / "dataset.json").read_text())  # named as Cardiac Fat CT: its two regions
    (ds / "dataset.json").write_text(json.dumps({**dataset_json, "labels": {"background": 0, "pericardium": 1,
                                                                             "EAT": 2}}))
    work, out = tmp_path / "work", tmp_path / "docs" / "report.md"
    out.parent.mkdir()
    args = ["--workdir", str(work), "--dataset", str(ds), "--size", "16", "--features", "4", "--batch_size", "2",
            "--epochs", "1", "--iters", "2", "--limit", "4", "--auto", "--out", str(out)]
    main(args)
    results = json.loads((work / "results.json").read_text())
    arms = (*arm_names(16), "cascade_auto")
    assert set(results["arms"]) == set(arms) and results["patients"] and sum(map(len, results["patients"].values())) == 4
    for arm in arms:
        assert results["arms"][arm]["n_cases"] == 4 and 0 <= results["arms"][arm]["pericardium_Dice"][0] <= 1
        assert results["arms"][arm]["pericardium_HD95"][0] >= 0
        case = next(iter(sorted((work / "predictions" / arm).glob("*.nii.gz"))))
        pred, ref = sitk.ReadImage(str(case)), sitk.ReadImage(str(ds / "labelsTr" / case.name))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert np.allclose(pred.GetOrigin(), ref.GetOrigin())
    assert results["networks"]["3d_fullres_w4"]["features_per_stage"][0] == 4
    trainings = fake.of("nnUNetv2_train")  # 5 networks x 2 folds, none with its final validation
    assert len(trainings) == 10 and all(c.env.get("STSEG_SKIP_VALIDATION") == "1" for c in trainings)
    auto_coarse, auto_fine = results["arm_configs"]["cascade_auto"]["trained"]
    assert sorted({(c.args[1], c.args[2]) for c in trainings if "-p" not in c.args}) == sorted(
        (config, fold) for config in ("3d_fullres_w4", "3d_sts_coarse_16", "3d_sts_fine_16") for fold in ("0", "1"))
    assert sorted({(c.args[1], c.args[2], c.args[c.args.index("-p") + 1]) for c in trainings if "-p" in c.args}) == \
        sorted((config.split("/")[1], fold, "nnUNetPlansAuto") for config in (auto_coarse, auto_fine)
               for fold in ("0", "1"))
    assert "planning" in json.loads((work / "nnUNet_preprocessed" / ds.name / "nnUNetPlansAuto.json").read_text())[
        "configurations"][auto_fine.split("/")[1]]["sts"]
    predictions = fake.of("nnUNetv2_predict")
    assert len(predictions) == 8 and sum("-p" in c.args for c in predictions) == 2  # 4 arms x 2 folds
    text = out.read_text()
    assert all(f"| {arm} |" in text for arm in arms) and (out.parent / "report_examples.png").is_file()
    checkpoints = sorted((work / "nnUNet_results").rglob("checkpoint_final.pth"))
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    fake.calls.clear()
    main(args)  # resumable: nothing retrained, nothing predicted again
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    assert not fake.of("nnUNetv2_train") and not fake.of("nnUNetv2_predict")
    rebuilt = tmp_path / "docs" / "rebuilt.md"
    main(["--workdir", str(work), "--report_only", "--out", str(rebuilt)])
    def table_and_reading(path):
        return path.read_text().split("| arm |")[1].split("![examples]")[0]

    assert table_and_reading(rebuilt) == table_and_reading(out)
    assert "![examples](rebuilt_examples.png)" in rebuilt.read_text(), "the overlays sit beside the rebuilt report"
    assert (out.parent / "rebuilt_examples.png").is_file()


@pytest.mark.slow  # plans a generated 3D dataset in-process
def test_plateau_budget_stops_on_training_patients_never_on_the_held_out_ones(tmp_path, monkeypatch):
    """--patience: every training gets STSEG_PATIENCE; nnU-Net's validation of each fold is
    --val_patients of its training patients (the scored patients are never in a fold's train or
    val); epochs and seconds come from the checkpoints' logs and the report states the rule."""
    from nnunet_stseg.data.synthetic import make_synthetic_dataset

    fake = FakeNNUNet().install(monkeypatch, experiment)
    ds = make_synthetic_dataset(tmp_path / "raw", dataset_id=994, name="Organs3D", dim=3, n_train=6, n_test=0,
                                shape=(16, 32, 32), num_classes=2, spacing=(1.0, 1.0, 2.5), empty_cases=0)
    work, out = tmp_path / "work", tmp_path / "report.md"
    main(["--workdir", str(work), "--dataset", str(ds), "--size", "16", "--features", "4", "--batch_size", "2",
          "--epochs", "30", "--iters", "2", "--patience", "3", "--val_iters", "4", "--val_patients", "1",
          "--out", str(out)])
    results = json.loads((work / "results.json").read_text())
    trainings = fake.of("nnUNetv2_train")
    assert trainings and all(c.env["STSEG_PATIENCE"] == "3" and c.env["STSEG_VAL_ITERS"] == "4" for c in trainings)
    splits = json.loads((work / "nnUNet_preprocessed" / ds.name / "splits_final.json").read_text())
    for fold, split in enumerate(splits):
        held_out = set(results["patients"][str(fold)])
        assert len(split["val"]) == 1 and len(split["train"]) == 2
        assert not held_out & (set(split["train"]) | set(split["val"])), "a fold never sees its scored patients"
    assert set(results["epochs"].values()) == {2} and set(results["train_s"].values()) == {1.25}
    text = out.read_text()
    assert "has not improved for 3 epochs (at most 30; epochs trained, mean over folds: 3d_sts_coarse_16 2" in text
    with pytest.raises(SystemExit, match="--val_patients 3: a fold trains on only 3 patients"):
        main(["--workdir", str(tmp_path / "w2"), "--dataset", str(ds), "--patience", "3", "--val_patients", "3"])
