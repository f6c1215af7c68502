"""The self-configuring planner: the object fingerprint on arrays with known objects (tiny and
large, on the border, several classes, empty cases, 2D per-slice objects), each rule at its
boundaries, and `nnunet-stseg plan` without `-s` on generated datasets (the plans' choices and
their reasons, the cached fingerprint, given values winning, the refusal and the notes)."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_stseg.core import autoplan
from nnunet_stseg.core.autoplan import AutoPlanRules
from nnunet_stseg.core.fingerprint import object_records, summarise_objects

RULES = AutoPlanRules()


# ------------------------------------------------------------------ fingerprint
def test_object_records_measure_each_component_in_mm():
    seg = np.zeros((10, 40, 40), np.uint8)
    seg[4, 20, 20] = 1  # one voxel
    seg[0:10, 0:30, 5:15] = 2  # large, touches the border along z and y
    seg[2:4, 30:33, 5:15] = 1  # touches the large class-2 object: one object in the union
    records = object_records(seg, [3.0, 0.5, 0.5], [True, True, True], [1, 2], case="c")
    by_class = {c: sorted((r for r in records if r["class"] == c), key=lambda r: r["voxels"]) for c in ("1", "2", "all")}
    tiny, touching = by_class["1"]
    assert tiny["extent_mm"] == [3.0, 0.5, 0.5] and tiny["voxels"] == 1 and tiny["volume_mm3"] == 0.75
    assert not tiny["touches_border"] and touching["extent_voxels"] == [2, 3, 10]
    (large,) = by_class["2"]
    assert large["extent_mm"] == [30.0, 15.0, 5.0] and large["touches_border"]
    assert large["share"] == pytest.approx(3000 / 16000)
    assert [r["voxels"] for r in by_class["all"]] == [1, 3060], "touching objects of two classes: one in the union"


def test_a_2d_stage_counts_objects_per_slice_and_empty_cases_count_as_zero():
    seg = np.zeros((3, 20, 20), np.uint8)
    seg[:, 5:10, 5:10] = 1  # one 3D object, three slices
    per_slice = object_records(seg, [2.0, 1.0, 1.0], [False, True, True], [1], case="a")
    assert len([r for r in per_slice if r["class"] == "1"]) == 3
    assert all(r["extent_mm"] == [2.0, 5.0, 5.0] and r["share"] == 25 / 400 for r in per_slice)
    assert object_records(np.zeros((3, 20, 20), np.uint8), [1, 1, 1], [True] * 3, [1]) == []
    summary = summarise_objects(per_slice, ["a", "empty"])
    assert summary["1"]["objects"] == 3 and summary["1"]["objects_per_case"]["p50"] == 1.5
    assert summary["all"]["extent_mm"][1] == {"p1": 5.0, "p5": 5.0, "p50": 5.0, "p95": 5.0, "max": 5.0}
    assert summary["1"]["touching_border"] == 0.0
    with pytest.raises(ValueError, match="3 axis flags"):
        object_records(seg[0], [1, 1], [True, True], [1])


# ------------------------------------------------------------------ rules
def test_coarse_grid_keeps_small_objects_ten_voxels_wide_and_never_upsamples():
    # y, x: 20 mm / (10 x 0.5) = 4 (the image would allow 64 / 8 = 8)
    sp, shape, choice = autoplan.coarse_grid([1.0, 0.5, 0.5], [1, 64, 64], [math.nan, 20.0, 20.0],
                                             [False, True, True])
    assert choice.value == [1.0, 4.0, 4.0] and sp == [1.0, 2.0, 2.0] and shape == [1, 16, 16]
    # the image bound: at most 64 / 8 = 8 even for large objects
    _, shape, choice = autoplan.coarse_grid([1.0, 1.0, 1.0], [32, 64, 64], [400.0, 400.0, 400.0], [True] * 3)
    assert choice.value == [4.0, 8.0, 8.0] and shape == [8, 8, 8]
    # in-plane axes share the smaller objects' bound (20 mm -> 4, 30 mm -> 6: both 4), z keeps its own
    _, _, choice = autoplan.coarse_grid([2.0, 0.5, 0.5], [40, 256, 256], [40.0, 20.0, 30.0], [True] * 3)
    assert choice.value == [2.0, 4.0, 4.0]
    # the margin decides the voxels per object: a wider margin tolerates a coarser grid (0.25: 2 + 4 = 6)
    _, _, choice = autoplan.coarse_grid([1.0, 1.0, 1.0], [64, 64, 64], [48.0] * 3, [True] * 3,
                                        AutoPlanRules(coarse_voxels=autoplan.object_voxels(0.25)))
    assert choice.value == [8.0, 8.0, 8.0]
    # objects under 10 voxels: factor 1, not an upsampling
    _, _, choice = autoplan.coarse_grid([3.0, 0.7, 0.7], [40, 512, 512], [3.0, 6.0, 6.0], [True] * 3)
    assert choice.value == [1.0, 1.0, 1.0]
    assert "stays >= 10 coarse voxels" in choice.why


def test_input_size_holds_the_typical_crop_without_downsampling():
    active, spacing = [False, True, True], [1.0, 1.0, 1.0]
    # crop side = e + 2 max(0.125 e, 4): e = 48 -> 48 + 12 = 60 (<= 64); e = 52 -> 65 (> 64)
    assert autoplan.input_size([1, 48, 10], spacing, active, 0.125, 4.0).value == 64
    assert autoplan.input_size([1, 52, 10], spacing, active, 0.125, 4.0).value == 96
    capped = autoplan.input_size([1, 500, 10], spacing, active, 0.125, 4.0, largest_allowed=128)
    assert capped.value == 128 and "downsampled 4.9 x" in capped.why
    assert autoplan.input_size([1, 2, 2], spacing, active, 0.125, 4.0).value == 32, "never below the smallest"
    with pytest.raises(ValueError, match="at most 16"):
        autoplan.input_size([1, 2, 2], spacing, active, 0.125, 4.0, largest_allowed=16)


def test_size_rule_max_crops_and_the_cannot_help_line_at_their_bounds():
    assert [autoplan.size_rule(v).value for v in (1.0, 2.9, 3.0, 9.9, 10.0, 100.0)] == [1.0, 1.0, 1.0, 4.0, 5.0, 5.0]
    assert autoplan.max_crops(6.4, 64, 2, 3).value == 8 and autoplan.max_crops(6.5, 64, 2, 3).value == 9
    bound = autoplan.max_crops(10_000, 128, 3, 4)  # 2048 MB / (4 B x 4 x 128^3) = 64
    assert bound.value == 64 and "memory bound" in bound.why
    active = [False, True, True]
    assert autoplan.cascade_cannot_help([5, 100, 50], [5, 200, 100], active) is not None  # exactly 50 %
    assert autoplan.cascade_cannot_help([5, 100, 49], [5, 200, 100], active) is None
    assert autoplan.cascade_cannot_help([1, 190, 190], [100, 200, 200], [True, True, True]) is None, "z counts"


# ------------------------------------------------------------------ the planner
def _dataset(raw: Path, dataset_id: int, cases: list[np.ndarray], spacing=(0.8, 0.8, 2.0),
             labels: dict | None = None) -> Path:
    """A 3D raw dataset whose labels are ``cases`` (numpy z, y, x); images follow the labels."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    ds = raw / f"Dataset{dataset_id:03d}_AutoPlan"
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(dataset_id)
    for i, label in enumerate(cases):
        for array, path in ((rng.normal(0, 0.3, label.shape).astype(np.float32) + 2 * (label > 0),
                             ds / "imagesTr" / f"c{i:02d}_0000.nii.gz"),
                            (label.astype(np.uint8), ds / "labelsTr" / f"c{i:02d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(spacing)
            sitk.WriteImage(image, str(path))
    classes = sorted({int(v) for c in cases for v in np.unique(c) if v > 0}) or [1]
    labels = labels or {"background": 0, **{f"c{v}": v for v in classes}}
    generate_dataset_json(str(ds), {0: "MR"}, labels, len(cases),
                          ".nii.gz", dataset_name=ds.name.split("_", 1)[1])
    return ds


def _objects(shape, boxes) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for value, (z, y, x) in boxes:
        label[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value
    return label


def _plan(tmp_path: Path, dataset_id: int, *args: str) -> subprocess.CompletedProcess:
    from nnunet_stseg.commands.pipeline import find_command

    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pp"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_compile": "f"}
    return subprocess.run([find_command("nnunet-stseg"), "plan", "-d", str(dataset_id), "--no_pp", "-np", "1", *args],
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow  # the stock commands on a generated dataset
def test_plan_without_s_chooses_from_the_objects_and_says_why(tmp_path):
    shape = (24, 96, 96)  # 2 mm slices, 0.8 mm pixels
    small, large = ((6, 12), (10, 25), (10, 25)), ((4, 20), (40, 80), (40, 80))  # 15 x 15 px, 40 x 40 px
    cases = [_objects(shape, [(1, small), (2, large)]) for _ in range(4)] + [np.zeros(shape, np.uint8)]
    ds = _dataset(tmp_path / "raw", 731, cases)
    proc = _plan(tmp_path, 731, "--dims", "3d")
    assert proc.returncode == 0, proc.stdout[-3000:]
    plans = json.loads((tmp_path / "pp" / ds.name / "nnUNetPlans.json").read_text())
    fingerprint = json.loads((tmp_path / "pp" / ds.name / "object_fingerprint.json").read_text())
    assert fingerprint["3d"]["1"]["extent_mm"][1]["p5"] == pytest.approx(12.0)  # 15 px of 0.8 mm
    assert fingerprint["3d"]["all"]["objects_per_case"]["max"] == 2 and fingerprint["3d"]["2"]["objects"] == 4
    # the rules on the fingerprint: y/x 12 mm / (10 x 0.8) = 1.5; z 12 mm / (10 x 2) < 1: kept
    fine_name = next(k for k in plans["configurations"] if k.startswith("3d_sts_fine_"))
    fine = plans["configurations"][fine_name]
    coarse = plans["configurations"][fine["sts"]["coarse_configuration"]]
    assert coarse["spacing"] == pytest.approx([2.0, 1.2, 1.2])
    planning = fine["sts"]["planning"]
    assert planning["chosen"]["coarse_downsampling"]["value"] == [1.0, 1.5, 1.5]
    # typical (p50 over both classes' union objects): 15 / 40 px -> S holds the crop
    typical = fingerprint["3d"]["all"]["extent_mm"]
    expected_s = autoplan.input_size([typical[a]["p50"] for a in range(3)], [2.0, 0.8, 0.8], [True] * 3,
                                     0.125, 4.0).value
    assert fine_name == f"3d_sts_fine_{expected_s}" and planning["chosen"]["input_size"]["value"] == expected_s
    assert fine["sts"]["max_crops"] == 8 and fine["sts"]["crop"]["min_object_size"] == 5.0
    assert f"3d: input_size = {expected_s} (chosen: the p50 object's crop is" in proc.stdout
    assert "3d: coarse_downsampling = [1.0, 1.5, 1.5]" in proc.stdout
    # re-planned with two values given: the fingerprint is reused, the given values win and are recorded
    proc = _plan(tmp_path, 731, "--dims", "3d", "--set", "crop.min_object_size=2", "--set", "max_crops=3")
    assert proc.returncode == 0 and "object fingerprint reused" in proc.stdout, proc.stdout[-3000:]
    fine = json.loads((tmp_path / "pp" / ds.name / "nnUNetPlans.json").read_text())["configurations"][fine_name]
    assert fine["sts"]["crop"]["min_object_size"] == 2.0 and fine["sts"]["max_crops"] == 3
    assert fine["sts"]["planning"]["given"] == {"min_object_size": 2.0, "max_crops": 3}
    assert set(fine["sts"]["planning"]["chosen"]) == {"input_size", "coarse_downsampling"}
    assert "3d: max_crops = 3 (given)" in proc.stdout
    # with -s, into plans of another name: 0.9's plans (the median image at S voxels per axis, no
    # planning record) beside the self-configured ones, which stay as they were
    proc = _plan(tmp_path, 731, "--dims", "3d", "-s", "32", "-overwrite_plans_name", "nnUNetPlansS32")
    assert proc.returncode == 0 and "-p nnUNetPlansS32" in proc.stdout, proc.stdout[-3000:]
    plans = json.loads((tmp_path / "pp" / ds.name / "nnUNetPlansS32.json").read_text())
    assert plans["configurations"]["3d_sts_coarse_32"]["spacing"] == pytest.approx([2.0, 2.4, 2.4])
    assert "planning" not in plans["configurations"]["3d_sts_fine_32"]["sts"]
    auto = json.loads((tmp_path / "pp" / ds.name / "nnUNetPlans.json").read_text())["configurations"]
    assert auto[fine_name]["sts"]["planning"]["given"] == {"min_object_size": 2.0, "max_crops": 3}


@pytest.mark.slow  # the stock commands on a generated dataset
def test_plan_without_s_refuses_a_dataset_without_objects_and_notes_large_ones(tmp_path):
    shape = (8, 64, 64)
    ignored_only = [_objects(shape, [(2, ((0, 8), (4, 20), (4, 20)))])] * 3  # labelled, but only 'ignore'
    _dataset(tmp_path / "raw", 732, ignored_only, labels={"background": 0, "lesion": 1, "ignore": 2})
    proc = _plan(tmp_path, 732, "--dims", "2d")
    assert proc.returncode != 0 and "no foreground objects in its training labels" in proc.stdout
    assert "give -s" in proc.stdout and "Traceback" not in proc.stdout
    big = [_objects(shape, [(1, ((0, 8), (4, 60), (4, 60)))])] * 3  # 88 % of every slice
    _dataset(tmp_path / "raw", 733, big)
    proc = _plan(tmp_path, 733, "--dims", "2d")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "NOTE 2d: the median object spans 87% or more of the image on every axis" in proc.stdout
    assert "2d: input_size = 64 (chosen" in proc.stdout, "S never exceeds the 64-pixel image"


@pytest.mark.slow  # the stock commands on a generated dataset
def test_a_self_configured_3d_cascade_on_the_resenc_planner_slides_its_coarse_window(tmp_path):
    """`plan -pl nnUNetPlannerResEncM` without `-s` on small objects in a larger volume, with a small
    memory target: the configurations go into nnUNetResEncUNetMPlans.json with the residual encoder
    U-Net, the coarse grid stays fine enough for the objects and nnU-Net plans a coarse patch smaller
    than the coarse image; the stock nnUNetv2_train / nnUNetv2_predict `-p nnUNetResEncUNetMPlans` run
    the cascade (the coarse stage by nnU-Net's sliding window), the label maps keep the input geometry."""
    from nnunet_stseg.adapters.config import DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER
    from nnunet_stseg.commands.pipeline import find_command, pipeline_env, predict_command_line, run, \
        train_command_line
    from nnunet_stseg.data.synthetic import make_synthetic_dataset

    env = {**pipeline_env(tmp_path, 1, 2, 1), "STSEG_SKIP_VALIDATION": "1"}
    ds = make_synthetic_dataset(env["nnUNet_raw"], 734, "AutoSliding", dim=3, n_train=5, n_test=1, shape=(32, 112, 112),
                                objects_per_image=(2, 3), radius=(3, 5), spacing=(1.0, 1.0, 1.0), empty_cases=0, seed=2)
    run([find_command("nnunet-stseg"), "plan", "-d", "734", "--dims", "3d", "-pl", "nnUNetPlannerResEncM", "--features",
         "4", "--batch_size", "2", "-gpu_memory_target", "0.2", "-np", "1"], env, tmp_path / "plan.log")
    plans_name = "nnUNetResEncUNetMPlans"
    log = (tmp_path / "plan.log").read_text()
    assert f"-p {plans_name}" in log and "sliding window" in log, "the printed commands name the plans"
    assert not (Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json").exists()
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / ds.name / f"{plans_name}.json").read_text())
    fine_name = next(k for k in plans["configurations"] if k.startswith("3d_sts_fine_"))
    coarse_name = plans["configurations"][fine_name]["sts"]["coarse_configuration"]
    coarse = plans["configurations"][coarse_name]
    assert any(p < m for p, m in zip(coarse["patch_size"], coarse["median_image_size_in_voxels"])), \
        "the coarse image is larger than its patch: prediction slides a window over it"
    for name in (coarse_name, fine_name):
        assert plans["configurations"][name]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    for config, trainer in ((coarse_name, DEFAULT_COARSE_TRAINER), (fine_name, DEFAULT_FINE_TRAINER)):
        run(train_command_line(734, config, 0, trainer, "cpu", "-p", plans_name), env, tmp_path / f"train_{config}.log")
    out = tmp_path / "pred"
    run(predict_command_line(ds / "imagesTs", out, 734, fine_name, DEFAULT_FINE_TRAINER, [0], "cpu", "--disable_tta",
                             "-p", plans_name), env, tmp_path / "predict.log")
    assert (Path(env["nnUNet_results"]) / ds.name / f"{DEFAULT_FINE_TRAINER}__{plans_name}__{fine_name}").is_dir()
    for image in sorted((ds / "imagesTs").glob("*_0000.nii.gz")):
        pred, ref = sitk.ReadImage(str(out / image.name.replace("_0000", ""))), sitk.ReadImage(str(image))
        assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
        assert pred.GetOrigin() == ref.GetOrigin() and pred.GetDirection() == ref.GetDirection()
