"""The hippocampus slice converter (axis, centre crop / pad, the 1 % rule, the split by volume and
its seed), the validation plateau rule, and the stock nnU-Net commands training
nnUNetTrainer_StSSizes on the converted layout until the plateau rule stops them."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from benchmarks.hippocampus import (SPLIT_FILE, centre_crop_or_pad, convert_hippocampus, split_by_volume,
                                    to_uint16, volume_slices)
from nnunet_stseg.commands.pipeline import find_command
from nnunet_stseg.core.plateau import best_epoch, plateau_reached


def _volumes(src: Path, n: int, shape=(6, 52, 35), seed: int = 0) -> None:
    """``n`` MSD-like volumes: float32 images, labels 1 / 2 on a box that grows with the slice index
    (slice 0 empty, slice 1 below the 1 % rule, later slices above it)."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (src / sub).mkdir(parents=True, exist_ok=True)
    for v in range(n):
        image = rng.normal(1000, 50, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        for z in range(1, shape[0]):
            half = 1 if z == 1 else 2 + z  # z = 1: 3 x 3 = 9 pixels < 16 (1 % of 48 x 32)
            label[z, 26 - half:26 + half + 1, 17 - half:17 + half + 1] = 1
            label[z, 26:26 + half + 1, 17 - half:17 + half + 1] = 2
        image[label > 0] += 800
        for array, path in ((image, src / "imagesTr" / f"hippocampus_{v:03d}_0000.nii.gz"),
                            (label, src / "labelsTr" / f"hippocampus_{v:03d}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def test_centre_crop_or_pad_keeps_the_centre():
    a = np.arange(50 * 35).reshape(50, 35)
    out = centre_crop_or_pad(a, (48, 32))
    assert out.shape == (48, 32) and out[0, 0] == a[1, 1] and out[-1, -1] == a[48, 32]
    padded = centre_crop_or_pad(np.ones((45, 30)), (48, 32))
    assert padded.sum() == 45 * 30 and padded[1:46, 1:31].all() and not padded[0].any() and not padded[:, 0].any()
    with pytest.raises(ValueError, match="axes"):
        centre_crop_or_pad(a, (48,))


def test_volume_slices_take_the_axis_and_apply_the_one_percent_rule_after_the_crop():
    label = np.zeros((4, 52, 35), np.uint8)
    label[1, 20:24, 10:14] = 1  # 16 pixels = 1 % of 48 x 32: kept
    label[2, 20:23, 10:15] = 2  # 15 pixels: dropped
    label[3, 0:2, 0:35] = 1  # 70 pixels, all in the two rows the centre crop cuts away: dropped
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape)
    kept = volume_slices(image, label)
    assert [i for i, _, _ in kept] == [1]
    index, slice_image, mask = kept[0]
    assert slice_image.shape == mask.shape == (48, 32) and mask.dtype == bool and mask.sum() == 16
    assert slice_image[0, 0] == image[1, 2, 1]  # rows 2..49, columns 1..32 of slice 1
    along_x = volume_slices(np.moveaxis(image, 0, 2), np.moveaxis(label, 0, 2), axis=2)
    assert [i for i, _, _ in along_x] == [1]
    with pytest.raises(ValueError, match="same shape"):
        volume_slices(image, label[:3])


def test_split_by_volume_is_seeded_disjoint_and_70_10_20():
    volumes = [f"hippocampus_{i:03d}" for i in range(50)]
    a, b, c = split_by_volume(volumes, 0), split_by_volume(list(reversed(volumes)), 0), split_by_volume(volumes, 1)
    assert a == b, "the split depends on the seed only, not on the listing order"
    assert a != c
    assert [len(a[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    assert sorted(a["train"] + a["val"] + a["test"]) == volumes


def test_to_uint16_scales_by_the_volume_maximum():
    out = to_uint16(np.array([-5.0, 0.0, 850000.0, 1.7e6]))
    assert out.dtype == np.uint16 and out.tolist() == [0, 0, 32768, 65535]


def test_converter_writes_whole_volumes_into_one_part(tmp_path):
    _volumes(tmp_path / "src", 10)
    ds = convert_hippocampus(tmp_path / "src", tmp_path / "raw", 781, seed=3)
    split = json.loads((ds / SPLIT_FILE).read_text())
    assert split["volumes"] == split_by_volume([f"hippocampus_{v:03d}" for v in range(10)], 3)
    for part, folder in (("train", "Tr"), ("val", "Tr"), ("test", "Ts")):
        volumes = {c.rsplit("_s", 1)[0] for c in split[part]}
        assert volumes == set(split["volumes"][part])
        assert sorted(c.rsplit("_s", 1)[1] for c in split[part] if c.startswith(f"{split['volumes'][part][0]}_s")) \
            == ["02", "03", "04", "05"], "slice 0 (empty) and slice 1 (9 pixels) are dropped"
        for case in split[part]:
            assert (ds / f"labels{folder}" / f"{case}.png").is_file()
    case = split["train"][0]
    image = np.asarray(Image.open(ds / "imagesTr" / f"{case}_0000.png"))
    label = np.asarray(Image.open(ds / "labelsTr" / f"{case}.png"))
    assert image.dtype == np.uint16 and image.shape == label.shape == (48, 32)
    assert set(np.unique(label).tolist()) == {0, 1}, "anterior and posterior merged"
    dataset_json = json.loads((ds / "dataset.json").read_text())
    assert dataset_json["numTraining"] == len(split["train"]) + len(split["val"])
    assert convert_hippocampus(tmp_path / "src", tmp_path / "raw", 781, seed=99) == ds, "an existing one is kept"


def test_plateau_rule_on_a_hand_made_validation_curve():
    curve = [1.0, 0.7, 0.5, 0.52, 0.49, 0.495, 0.51, 0.50, 0.6]
    assert best_epoch(curve) == 4
    assert [plateau_reached(curve[:n], 3) for n in range(1, len(curve) + 1)] == \
        [False, False, False, False, False, False, False, True, True]
    assert best_epoch(curve, min_delta=0.02) == 2  # 0.49 is not better than 0.5 by more than 0.02
    assert plateau_reached(curve[:6], 3, min_delta=0.02)
    assert best_epoch([float("nan"), 2.0, float("nan")]) == 1 and best_epoch([float("nan")]) is None
    assert plateau_reached([float("nan")] * 3, 3) and not plateau_reached([float("nan")] * 2, 3)
    with pytest.raises(ValueError, match="patience"):
        plateau_reached(curve, 0)


@pytest.mark.slow  # trains through the stock commands
def test_stock_training_on_the_converted_slices_stops_at_the_plateau(tmp_path):
    """converter -> size labels (nnunet-stseg sizes simulate) -> nnUNetv2_plan_and_preprocess ->
    nnUNetv2_train -tr nnUNetTrainer_StSSizes with STSEG_PATIENCE: the size phase watches the
    validation size error, stops `patience` epochs after its best, keeps that epoch in
    checkpoint_best.pth, and a resumed run (--c) does not train on."""
    from nnunet_stseg.adapters.config import SIZES_KEY, with_block
    from nnunet_stseg.adapters.discovery import with_trainer_discovery
    from nnunet_stseg.adapters.size_labels import simulate_size_labels

    _volumes(tmp_path / "src", 8)
    raw = tmp_path / "raw"
    ds = convert_hippocampus(tmp_path / "src", raw, 782, seed=0)
    split = json.loads((ds / SPLIT_FILE).read_text())
    weak = simulate_size_labels(ds, raw, 783, split["train"][:4] + split["val"], cases=split["train"] + split["val"])
    env = with_trainer_discovery({**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pp"),
                                  "nnUNet_results": str(tmp_path / "res"), "nnUNet_compile": "f",
                                  "nnUNet_def_n_proc": "1"})
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # nnU-Net 2.8.1's planner needs >= 1
    subprocess.run([find_command("nnUNetv2_plan_and_preprocess"), "-d", "783", "-c", "2d", "-np", "1"], env=plan_env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    pp = tmp_path / "pp" / weak.name
    (pp / "splits_final.json").write_text(json.dumps([{"train": split["train"], "val": split["val"]}]))
    plans = json.loads((pp / "nnUNetPlans.json").read_text())
    assert list(plans["configurations"]["2d"]["patch_size"]) == [48, 32], "one slice = one patch"
    plans["configurations"]["2d_size"] = with_block(dict(plans["configurations"]["2d"]), SIZES_KEY,
                                                    {"pretrain_epochs": 0, "size_weight": 0.1})
    (pp / "nnUNetPlans.json").write_text(json.dumps(plans))
    train_env = {**env, "nnUNet_n_proc_DA": "0", "STSEG_NUM_EPOCHS": "30", "STSEG_ITERS_PER_EPOCH": "2",
                 "STSEG_VAL_ITERS": "2", "STSEG_PATIENCE": "2", "STSEG_SKIP_VALIDATION": "1"}
    command = [find_command("nnUNetv2_train"), "783", "2d_size", "0", "-tr", "nnUNetTrainer_StSSizes", "-device", "cpu"]
    proc = subprocess.run(command, env=train_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    fold = tmp_path / "res" / weak.name / "nnUNetTrainer_StSSizes__nnUNetPlans__2d_size" / "fold_0"
    log = json.loads((fold / "size_training.json").read_text())
    errors = [r["val_size_error_px2"] for r in log]
    assert all(r["phase"] == 2 for r in log) and all(e is not None and e >= 0 for e in errors)
    best = best_epoch(errors)
    assert len(log) < 30 and len(log) == best + 3, f"stops 2 epochs after the best E, {errors}"
    assert "validation plateau: the validation size error E (px^2) has not improved for 2 epochs" in proc.stdout
    best_checkpoint = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert best_checkpoint["current_epoch"] == best + 1 and final["current_epoch"] == len(log)
    proc = subprocess.run(command + ["--c"], env=train_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0 and "validation plateau" in proc.stdout, proc.stdout[-3000:]
    assert len(json.loads((fold / "size_training.json").read_text())) == len(log), "no epoch after the plateau"


def test_phase_2_takes_the_segmentation_layers_that_nnunet_leaves_random(tmp_path):
    """nnU-Net's -pretrained_weights skips `.seg_layers.`; the size trainer loads them too when the
    label set (their shapes) is the same, and leaves them otherwise."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_stseg.adapters.nnunet_hooks import load_segmentation_layers, pretrained_weights_argument

    def net(classes: int) -> PlainConvUNet:
        return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv2d, 3, (1, 2, 2), 2, classes, 2, conv_bias=True,
                             norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU, deep_supervision=True)

    torch.manual_seed(0)
    trained, fresh, other = net(2), net(2), net(3)
    torch.save({"network_weights": trained.state_dict()}, tmp_path / "phase1.pth")
    keys = load_segmentation_layers(fresh, str(tmp_path / "phase1.pth"))
    assert keys and all(".seg_layers." in k for k in keys)
    assert all(torch.equal(fresh.state_dict()[k], trained.state_dict()[k]) for k in keys)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    assert load_segmentation_layers(other, str(tmp_path / "phase1.pth")) == []
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items()), "other labels: untouched"
    assert pretrained_weights_argument(["x", "-pretrained_weights=/a/b.pth"]) == "/a/b.pth"
    assert pretrained_weights_argument(["nnUNetv2_train", "1", "2d", "0"]) is None
