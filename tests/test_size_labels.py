"""Size-labelled datasets: the checker's errors name the case and the problem, the CSV importer
writes size-only labels with the image's geometry, the simulator measures sizes in millimetres,
and the stock nnU-Net commands plan, train (both phases) and predict with nnUNetTrainer_StSSizes."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_stseg.adapters.size_labels import (SIZES_FILE, SizeLabelError, check_size_dataset, import_sizes,
                                               simulate_size_labels)
from nnunet_stseg.commands.pipeline import find_command
from nnunet_stseg.core.sizes import object_size
from nnunet_stseg.data.synthetic import make_synthetic_dataset


def _source(root: Path, dataset_id: int = 975, n_train: int = 8, spacing=(0.5, 0.5)) -> Path:
    return make_synthetic_dataset(root, dataset_id, name="SizeSrc", dim=2, n_train=n_train, n_test=2,
                                  shape=(40, 40), objects_per_image=(1, 1), empty_cases=0, spacing=spacing, seed=1)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture()
def weak(tmp_path) -> Path:
    src = _source(tmp_path / "raw")
    return simulate_size_labels(src, tmp_path / "raw", 976, ["SizeSrc_000", "SizeSrc_001", "SizeSrc_002"])


def test_simulated_dataset_follows_the_convention(weak):
    report = check_size_dataset(weak)
    assert report.pixel_cases == ["SizeSrc_000", "SizeSrc_001", "SizeSrc_002"]
    assert len(report.size_only_cases) == 5 and report.spacing_mm == 0.5
    dataset_json = json.loads((weak / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "object": 1, "ignore": 2}
    sizes = json.loads((weak / SIZES_FILE).read_text())
    assert sizes["unit"] == "mm" and set(sizes["sizes"]) == set(report.size_only_cases + report.pixel_cases)
    assert not report.warnings, "the pixel-labelled cases' sizes are their labels' sizes"
    case = report.size_only_cases[0]
    source_label = _read(weak.parent / "Dataset975_SizeSrc" / "labelsTr" / f"{case}.nii.gz") > 0
    assert sizes["sizes"][case] == pytest.approx(0.5 * float(object_size(torch.from_numpy(source_label)[None])[0]))
    assert (_read(weak / "labelsTr" / f"{case}.nii.gz") == 2).all()
    assert (weak / "imagesTr" / f"{case}_0000.nii.gz").is_symlink()


def _edit_sizes(folder: Path, **changes) -> None:
    content = json.loads((folder / SIZES_FILE).read_text())
    content["sizes"].update(changes)
    (folder / SIZES_FILE).write_text(json.dumps(content))


def _write_label(folder: Path, case: str, array: np.ndarray, spacing=(0.5, 0.5)) -> None:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(folder / "labelsTr" / f"{case}.nii.gz"))


def test_checker_names_the_case_and_the_problem(weak):
    size_only = check_size_dataset(weak).size_only_cases
    partly = np.full((40, 40), 2)
    partly[:5] = 0
    _write_label(weak, size_only[0], partly)
    _edit_sizes(weak, SizeSrc_999=3.0)  # no such case
    content = json.loads((weak / SIZES_FILE).read_text())
    del content["sizes"][size_only[1]]
    (weak / SIZES_FILE).write_text(json.dumps(content))
    _write_label(weak, size_only[2], np.full((40, 40), 2), spacing=(0.5, 0.7))
    _edit_sizes(weak, **{size_only[3]: 500.0})  # larger than a 40 x 40 image of 0.5 mm allows
    with pytest.raises(SizeLabelError) as err:
        check_size_dataset(weak)
    text = str(err.value)
    assert "5 problem(s)" in text
    assert f"{size_only[0]}.nii.gz: 1400 of 1600 pixels are 'ignore'" in text
    assert "case SizeSrc_999 has a size but no label file" in text
    assert f"{size_only[1]}.nii.gz: size-only case (all ignore) without a size" in text
    assert f"{size_only[2]}.nii.gz: in-plane spacing 0.7 x 0.5 mm is not square" in text
    assert f"case {size_only[3]}: size 500 mm is larger than its image allows (40 mm)" in text


@pytest.mark.parametrize("content, message", [
    ({"unit": "px", "sizes": {}}, "expected {\"unit\": \"mm\""),
    ({"unit": "mm", "sizes": {"SizeSrc_004": -1}}, "case SizeSrc_004: size -1 is not a number >= 0"),
    ({"unit": "mm", "sizes": {"SizeSrc_004": "big"}}, "case SizeSrc_004: size 'big' is not a number"),
])
def test_checker_refuses_a_broken_sizes_file(weak, content, message):
    (weak / SIZES_FILE).write_text(json.dumps(content))
    with pytest.raises(SizeLabelError, match=message.replace("(", r"\(").replace("{", r"\{")):
        check_size_dataset(weak)


def test_checker_refuses_datasets_without_ignore_or_with_several_classes(weak):
    dataset_json = json.loads((weak / "dataset.json").read_text())
    (weak / "dataset.json").write_text(json.dumps({**dataset_json, "labels": {"background": 0, "a": 1}}))
    with pytest.raises(SizeLabelError, match="no 'ignore' label"):
        check_size_dataset(weak)
    (weak / "dataset.json").write_text(json.dumps({**dataset_json, "labels": {"background": 0, "a": 1, "b": 2,
                                                                              "ignore": 3}}))
    with pytest.raises(SizeLabelError, match=r"exactly one foreground label .*\['a', 'b'\]"):
        check_size_dataset(weak)


def test_import_writes_size_only_labels_with_the_images_geometry(tmp_path):
    src = _source(tmp_path / "raw", spacing=(0.8, 0.8))
    weak = simulate_size_labels(src, tmp_path / "raw", 977, [f"SizeSrc_{i:03d}" for i in range(8)])
    new = weak / "imagesTr" / "Extra_001_0000.nii.gz"
    image = sitk.GetImageFromArray(np.zeros((40, 40), np.float32))
    image.SetSpacing((0.8, 0.8))
    image.SetOrigin((12.0, -3.0))
    sitk.WriteImage(image, str(new))
    csv = tmp_path / "sizes.csv"
    csv.write_text("case_id,size_mm\nExtra_001,9.6\n")
    report = import_sizes(weak, csv)
    assert report.size_only_cases == ["Extra_001"]
    label = sitk.ReadImage(str(weak / "labelsTr" / "Extra_001.nii.gz"))
    assert label.GetSpacing() == pytest.approx((0.8, 0.8)) and label.GetOrigin() == pytest.approx((12.0, -3.0))
    assert (sitk.GetArrayFromImage(label) == 2).all()
    sizes = json.loads((weak / SIZES_FILE).read_text())["sizes"]
    assert sizes["Extra_001"] == 9.6 and len(sizes) == 9, "merged with the simulated cases' sizes"
    assert json.loads((weak / "dataset.json").read_text())["numTraining"] == 9
    csv.write_text("case_id,size_mm\nMissing_002,3\n")
    with pytest.raises(SizeLabelError, match="case Missing_002: no image"):
        import_sizes(weak, csv)
    csv.write_text("case,size\nExtra_001,3\n")
    with pytest.raises(SizeLabelError, match="line 2: expected columns case_id,size_mm"):
        import_sizes(weak, csv)


def test_sizes_command_prints_one_error_line(weak):
    _edit_sizes(weak, SizeSrc_999=3.0)
    proc = subprocess.run([find_command("nnunet-stseg"), "sizes", "check", "-d", str(weak)], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode != 0
    assert proc.stdout.startswith("[nnunet-stseg] ERROR:") and "SizeSrc_999" in proc.stdout
    assert "Traceback" not in proc.stdout


@pytest.mark.slow
def test_stock_commands_train_both_phases_and_predict(tmp_path):
    """nnUNetv2_plan_and_preprocess -> nnUNetv2_train -tr nnUNetTrainer_StSSizes (2 epochs: one per
    phase) -> nnUNetv2_predict; outputs keep the input's geometry."""
    raw = tmp_path / "raw"
    src = _source(raw, n_train=10, spacing=(0.5, 0.5))
    weak = simulate_size_labels(src, raw, 978, ["SizeSrc_000", "SizeSrc_001", "SizeSrc_002", "SizeSrc_003"])
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pp"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_compile": "f", "nnUNet_def_n_proc": "1"}
    from nnunet_stseg.adapters.discovery import with_trainer_discovery

    env = with_trainer_discovery(env)
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # nnU-Net 2.8.1's planner needs >= 1
    subprocess.run([find_command("nnUNetv2_plan_and_preprocess"), "-d", "978", "-c", "2d", "-np", "1"], env=plan_env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    train_env = {**env, "nnUNet_n_proc_DA": "0", "STSEG_NUM_EPOCHS": "2", "STSEG_ITERS_PER_EPOCH": "2",
                 "STSEG_VAL_ITERS": "1", "STSEG_SKIP_VALIDATION": "1"}
    proc = subprocess.run([find_command("nnUNetv2_train"), "978", "2d", "0", "-tr", "nnUNetTrainer_StSSizes",
                           "-device", "cpu"], env=train_env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "size supervision:" in proc.stdout and "size-only training cases" in proc.stdout
    assert "phase 1 (pixel loss only) 1 epochs" in proc.stdout
    assert "size phase: sampled relative size loss" in proc.stdout
    fold = tmp_path / "res" / weak.name / "nnUNetTrainer_StSSizes__nnUNetPlans__2d" / "fold_0"
    log = json.loads((fold / "size_training.json").read_text())
    assert [r["phase"] for r in log] == [1, 2]
    assert log[0]["size_error_px2"] is None and log[1]["size_error_px2"] >= 0
    assert (fold / SIZES_FILE).is_file()
    out = tmp_path / "pred"
    subprocess.run([find_command("nnUNetv2_predict"), "-i", str(weak / "imagesTs"), "-o", str(out), "-d", "978",
                    "-c", "2d", "-tr", "nnUNetTrainer_StSSizes", "-f", "0", "-device", "cpu", "--disable_tta",
                    "-npp", "0", "-nps", "0"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT)
    for image in sorted((weak / "imagesTs").glob("*_0000.nii.gz")):
        pred = sitk.ReadImage(str(out / image.name.replace("_0000", "")))
        ref = sitk.ReadImage(str(image))
        assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
        assert pred.GetOrigin() == ref.GetOrigin()
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1}
    (weak / SIZES_FILE).unlink()  # the trainer says what it misses
    (tmp_path / "pp" / weak.name / SIZES_FILE).unlink(missing_ok=True)
    proc = subprocess.run([find_command("nnUNetv2_train"), "978", "2d", "1", "-tr", "nnUNetTrainer_StSSizes",
                           "-device", "cpu"], env=train_env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    assert proc.returncode != 0 and f"{SIZES_FILE} of {weak.name} not found" in proc.stdout


def test_configure_writes_a_checked_sizes_block(tmp_path, monkeypatch, capsys):
    from nnunet_stseg.commands.sizes import main

    pp = tmp_path / "pp" / "Dataset979_Sizes"
    pp.mkdir(parents=True)
    (pp / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {"patch_size": [64, 64]}}}))
    for var in ("nnUNet_raw", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pp"))
    main(["configure", "-d", "979", "--pretrain_epochs", "50", "--size_weight", "0.5", "--no_mirror",
          "--initial_lr", "0.001"])
    block = json.loads((pp / "nnUNetPlans.json").read_text())["configurations"]["2d"]["sts"]["sizes"]
    assert block == {"pretrain_epochs": 50, "size_weight": 0.5, "pixel_weight": 1.0, "samples": 1,
                     "size_batch_size": None, "mirror": False, "initial_lr": 0.001}
    main(["configure", "-d", "979", "--samples", "2"])  # later calls keep what was set
    assert json.loads((pp / "nnUNetPlans.json").read_text())["configurations"]["2d"]["sts"]["sizes"]["size_weight"] == 0.5
    with pytest.raises(SystemExit, match=r"\[nnunet-stseg\] ERROR: .*samples >= 1"):
        main(["configure", "-d", "979", "--samples", "0"])
    with pytest.raises(SystemExit, match=r"0 < initial_lr < 1"):
        main(["configure", "-d", "979", "--initial_lr", "2"])
    with pytest.raises(SystemExit, match="no configuration '3d_fullres'"):
        main(["configure", "-d", "979", "-c", "3d_fullres", "--samples", "1"])
