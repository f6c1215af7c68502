"""Depth channel: pure functions, values after nnU-Net's transposition and cropping, the data
loaders (after nnU-Net's transforms), the network's input channels, and the errors.

The fixture dataset stores its slice axis LAST in numpy order (SimpleITK spacing x = 3 mm, the
coarsest), so nnU-Net transposes it first, and has empty slabs at both ends of that axis, so
nnU-Net's crop to the non-zero region removes slices: the preprocessed slice index is neither the
file's axis nor its index. Every slice's intensity is its original index + 1, which lets a test
read back which original slice a sample came from. Case 1 holds the same image stored in the
opposite slice order (direction -1 along the slice axis): depth is in patient coordinates, so its
slices must get the same depths as case 0's for the same anatomy.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_stseg.core.depth import (SINGLE_SLICE_DEPTH, append_depth_channel, check_depth_applicable,
                                     depths_from_properties, slice_depths, slice_order_reversed)

from stand_ins import fork_instead_of_spawn

N_SLICES, EMPTY_BEFORE, EMPTY_AFTER = 14, 2, 3  # slice axis = numpy axis 2
DEPTH_DATASET_ID = 977


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def test_slice_depths_whole_scan_and_cropped():
    np.testing.assert_allclose(slice_depths(5, (5, 10, 10), [[0, 5], [0, 10], [0, 10]]), [0, .25, .5, .75, 1])
    # 3 slices kept of 9 (cropped 4:7): their positions in the whole scan, not 0..1 of the crop
    np.testing.assert_allclose(slice_depths(3, (9, 4, 4), [[4, 7], [0, 4], [0, 4]]), [4 / 8, 5 / 8, 6 / 8])


def test_slice_depths_resampled_axis_maps_slice_centres():
    # 4 cropped slices resampled to 2: centres of slice pairs (0,1) and (2,3) of a 4-slice scan
    np.testing.assert_allclose(slice_depths(2, (4,), [[0, 4]]), [0.5 / 3, 2.5 / 3])


def test_slice_depths_single_slice_and_inconsistent_geometry():
    assert slice_depths(1, (1, 8, 8), [[0, 1], [0, 8], [0, 8]]).tolist() == [SINGLE_SLICE_DEPTH]
    with pytest.raises(ValueError, match="inconsistent slice geometry"):
        slice_depths(3, (4,), [[2, 6]])
    with pytest.raises(KeyError, match="bbox_used_for_cropping"):
        depths_from_properties(3, {"shape_before_cropping": (3, 4, 4)}, slice_axis=0)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_append_depth_channel_per_slice_and_scalar(kind):
    image = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    depths = np.array([0.0, 0.5, 1.0])
    x = torch.from_numpy(image) if kind == "torch" else image
    out = append_depth_channel(x, depths)
    assert type(out) is type(x) and out.shape == (3, 3, 4, 5) and out.dtype == x.dtype
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:2], image)  # image channels untouched
    for z, d in enumerate(depths):
        assert np.all(out[2, z] == np.float32(d))
    one = np.asarray(append_depth_channel(x[:, 0], 0.25))  # one 2D slice (C, Y, X)
    assert one.shape == (3, 4, 5) and np.all(one[2] == np.float32(0.25))


def test_check_depth_applicable_errors():
    check_depth_applicable([64, 64], [40, 512, 512], "ok")
    with pytest.raises(ValueError, match="2D networks on 3D scans.*3D patch"):
        check_depth_applicable([32, 64, 64], [40, 512, 512], "cfg")
    with pytest.raises(ValueError, match="dataset is 2D"):
        check_depth_applicable([64, 64], [1, 512, 512], "cfg")


# ----------------------------------------------------------------------------------------------
# a transposed, cropped 3D dataset
# ----------------------------------------------------------------------------------------------
def _slice_stack(n_slices: int = N_SLICES) -> np.ndarray:
    """numpy (z, y, x) with x the slice axis; every slice's intensity = its position (from the low
    patient coordinate) + 1, with empty slabs at both ends."""
    img = np.zeros((24, 32, n_slices), np.float32)
    for x in range(EMPTY_BEFORE, n_slices - EMPTY_AFTER):
        img[:, :, x] = x + 1
    return img


def _image(arr: np.ndarray, reversed_slices: bool) -> sitk.Image:
    """``arr`` as an image with 3 mm slices along ITK x; ``reversed_slices`` stores the SAME anatomy
    with the slice order flipped (array flipped, direction -1 and origin at the other end)."""
    if reversed_slices:
        arr = arr[:, :, ::-1]
    im = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    im.SetSpacing((3.0, 0.8, 0.8))
    im.SetOrigin((10.0 + (3.0 * (arr.shape[2] - 1) if reversed_slices else 0.0), -5.0, 3.0))
    im.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1) if reversed_slices else (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return im


def _write_case(folder: Path, case: str, rng: np.random.Generator, with_label: bool,
                reversed_slices: bool = False) -> None:
    img = _slice_stack()
    lab = np.zeros(img.shape, np.uint8)
    cz, cy = rng.integers(8, 16), rng.integers(8, 24)
    lab[cz - 4:cz + 4, cy - 5:cy + 5, EMPTY_BEFORE + 1:N_SLICES - EMPTY_AFTER - 1] = 1
    for arr, path in ((img, folder / "imagesTr" / f"{case}_0000.nii.gz"), (lab, folder / "labelsTr" / f"{case}.nii.gz")):
        sitk.WriteImage(_image(arr, reversed_slices), str(path))
        if not with_label:
            break


@pytest.fixture(scope="module")
def depth_dataset(nnunet_dirs):
    from nnunet_stseg.adapters.config import PlanOptions
    from nnunet_stseg.planners.plan_and_preprocess import plan_and_preprocess

    folder = Path(nnunet_dirs.raw) / f"Dataset{DEPTH_DATASET_ID}_DepthAxis"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cases = [f"depth_{i:03d}" for i in range(5)]  # nnU-Net splits 5 folds
    for i, c in enumerate(cases):
        _write_case(folder, c, rng, True, reversed_slices=i == 1)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "object": 1}, "numTraining": len(cases),
        "file_ending": ".nii.gz", "name": "DepthAxis"}))
    with fork_instead_of_spawn():
        options = PlanOptions(input_size=32, dims=["2d"], base_features=4, depth_channel=True, polar=True)
        plan_and_preprocess(DEPTH_DATASET_ID, options, num_processes=1)
    pp = Path(nnunet_dirs.preprocessed) / folder.name
    plans = json.loads((pp / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pp / "dataset.json").read_text())
    return SimpleNamespace(folder=folder, cases=cases, plans=plans, dataset_json=dataset_json, preprocessed=pp)


def test_fixture_is_transposed_and_cropped(depth_dataset):
    assert depth_dataset.plans["transpose_forward"][0] == 2  # the file's last axis is the slice axis


def test_depth_values_after_nnunet_transposition_and_cropping(depth_dataset):
    """The preprocessor used at inference: slice i of the preprocessed case is original slice
    i + EMPTY_BEFORE of a N_SLICES-slice scan, so its depth is (i + EMPTY_BEFORE) / (N_SLICES - 1)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.inference_io import PluginConfigurationManager

    pm = PlansManager(depth_dataset.plans)
    cm = PluginConfigurationManager({**pm.get_configuration("2d").configuration, "depth_channel": True})
    pre = cm.preprocessor_class(verbose=False)
    data, _, props = pre.run_case([str(depth_dataset.folder / "imagesTr" / f"{depth_dataset.cases[0]}_0000.nii.gz")],
                                  None, pm, cm, depth_dataset.dataset_json)
    kept = N_SLICES - EMPTY_BEFORE - EMPTY_AFTER
    assert not slice_order_reversed(props, 2)
    assert data.shape[0] == 2 and data.shape[1] == kept
    expected = (np.arange(kept) + EMPTY_BEFORE) / (N_SLICES - 1)
    for i in range(kept):
        assert np.all(data[1, i] == np.float32(expected[i])), f"slice {i}"
    # the image channel is nnU-Net's normalised image, slice order preserved (intensity = index + 1)
    per_slice = data[0].reshape(kept, -1).mean(1)
    assert np.all(np.diff(per_slice) > 0)
    np.testing.assert_array_equal(data[1, :, 0, 0], expected.astype(np.float32))


def test_depth_is_in_patient_coordinates_for_both_storage_orders(depth_dataset):
    """Case 1 is case 0 stored head-first (slice order flipped, direction -1): the inference
    preprocessor and the training data (nnU-Net's preprocessed properties) give every anatomical
    slice the same depth in both files, and that depth counts from the low patient coordinate."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_stseg.adapters.inference_io import PluginConfigurationManager

    pm = PlansManager(depth_dataset.plans)
    cm = PluginConfigurationManager({**pm.get_configuration("2d").configuration, "depth_channel": True})
    pre = cm.preprocessor_class(verbose=False)
    folder = str(depth_dataset.preprocessed / pm.get_configuration("2d").data_identifier)
    dataset_class = infer_dataset_class(folder)
    by_anatomy = []
    for case in depth_dataset.cases[:2]:
        data, _, props = pre.run_case([str(depth_dataset.folder / "imagesTr" / f"{case}_0000.nii.gz")], None, pm, cm,
                                      depth_dataset.dataset_json)
        intensity = data[0].reshape(data.shape[1], -1).mean(1)  # z-scored, equal for equal anatomy
        order = np.argsort(intensity)
        by_anatomy.append((intensity[order], data[1, order, 0, 0]))
        assert slice_order_reversed(props, pm.transpose_forward[0]) == (case == depth_dataset.cases[1])
        # the trainer's view of the same case (nnU-Net's preprocessed properties) gives the same depths
        train_props = dataset_class(folder, [case]).load_case(case)[3]
        np.testing.assert_array_equal(depths_from_properties(data.shape[1], train_props, slice_axis=2),
                                      depths_from_properties(data.shape[1], props, slice_axis=2))
    (i0, d0), (i1, d1) = by_anatomy
    np.testing.assert_allclose(i0, i1, atol=1e-5)
    np.testing.assert_array_equal(d0, d1)
    kept = N_SLICES - EMPTY_BEFORE - EMPTY_AFTER
    np.testing.assert_array_equal(d0, ((np.arange(kept) + EMPTY_BEFORE) / (N_SLICES - 1)).astype(np.float32))


@pytest.mark.parametrize("reader", ["SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient"])
def test_every_nifti_reader_gives_depth_in_patient_order(tmp_path, reader):
    """Both storage orders through each of nnU-Net's NIfTI readers (the reorienting ones move and
    flip axes): the slice with intensity p + 1 is at position p from the low patient coordinate."""
    import nnunetv2.imageio.nibabel_reader_writer as nib_io
    import nnunetv2.imageio.simpleitk_reader_writer as sitk_io

    io = (getattr(sitk_io, reader, None) or getattr(nib_io, reader))()
    for reversed_slices in (False, True):
        path = tmp_path / f"scan_{reversed_slices}.nii.gz"
        sitk.WriteImage(_image(_slice_stack(), reversed_slices), str(path))
        data, props = io.read_images([str(path)])
        axis = [a for a in range(3) if data.shape[1 + a] == N_SLICES]
        assert len(axis) == 1
        profile = np.moveaxis(data[0], axis[0], 0).reshape(N_SLICES, -1).max(1)
        depth = np.linspace(0.0, 1.0, N_SLICES)
        if slice_order_reversed(props, axis[0]):
            depth = depth[::-1]
        filled = profile > 0
        np.testing.assert_allclose(depth[filled], (profile[filled] - 1) / (N_SLICES - 1), err_msg=f"{reversed_slices}")


def _trainer(plans: dict, configuration: str, dataset_json: dict, cls_name: str = "nnUNetTrainer_Depth"):
    from nnunet_stseg.trainers import polar_trainer, sts_trainers

    cls = getattr(sts_trainers, cls_name, None) or getattr(polar_trainer, cls_name)
    plans = {**plans, "continue_training": False}  # what nnUNetv2_train adds before building a trainer
    return cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))


def test_trainer_network_and_loaders_carry_depth_after_transforms(depth_dataset):
    trainer = _trainer(depth_dataset.plans, "2d", depth_dataset.dataset_json)
    trainer.initialize()
    first_conv = next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 2
    gen_tr, gen_val = trainer.get_dataloaders()
    ds = trainer.dataset_class(trainer.preprocessed_dataset_folder)
    depth_sets, slice_values = {}, {}
    for key in ds.identifiers:
        data, _, _, props = ds.load_case(key)
        depth_sets[key] = depths_from_properties(data.shape[1], props, slice_axis=2).astype(np.float32)
        slice_values[key] = np.asarray(data[0]).reshape(data.shape[1], -1).mean(1)

    # validation loader (no intensity augmentation): recover the sample's slice from its intensity
    batch = next(gen_val)
    assert batch["data"].shape[1] == 2
    for sample, key in zip(batch["data"].numpy(), batch["keys"]):
        d = sample[1]
        assert np.all(d == d.flat[0])
        s = int(np.argmin(np.abs(slice_values[key] - np.median(sample[0]))))
        assert d.flat[0] == depth_sets[key][s]

    # training loader: nnU-Net's spatial + intensity augmentation ran; the channel is untouched
    for _ in range(3):
        batch = next(gen_tr)
        for sample, key in zip(batch["data"].numpy(), batch["keys"]):
            d = sample[1]
            assert np.all(d == d.flat[0]), "depth channel not constant after spatial augmentation"
            assert d.flat[0] in depth_sets[key], "depth channel changed by augmentation"


def test_cascade_fine_loader_carries_depth(depth_dataset):
    trainer = _trainer(depth_dataset.plans, "2d_sts_fine_32", depth_dataset.dataset_json, "nnUNetTrainer_StSFine")
    assert trainer.uses_depth_channel(trainer.configuration_manager)  # set by plan --depth
    trainer.initialize()
    _, gen_val = trainer.get_dataloaders()
    batch = next(gen_val)
    ds = trainer.dataset_class(trainer.preprocessed_dataset_folder)
    for sample, key in zip(batch["data"].numpy(), batch["keys"]):
        data, _, _, props = ds.load_case(key)
        assert np.all(sample[1] == sample[1].flat[0])
        assert sample[1].flat[0] in depths_from_properties(data.shape[1], props, slice_axis=2).astype(np.float32)


def test_polar_stage_composes_with_the_depth_channel(depth_dataset):
    """plan --depth --polar: the polar network gets the extra channel and every polar sample
    carries the depth of the slice it was cut from, after nnU-Net's transforms."""
    trainer = _trainer(depth_dataset.plans, "2d_sts_polar_32", depth_dataset.dataset_json, "nnUNetTrainer_StSPolar")
    assert trainer.uses_depth_channel(trainer.configuration_manager)
    trainer.initialize()
    first_conv = next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 2
    gen_tr, gen_val = trainer.get_dataloaders()
    ds = trainer.dataset_class(trainer.preprocessed_dataset_folder)
    for gen in (gen_val, gen_tr):
        batch = next(gen)
        assert batch["data"].shape[1:] == (2, 32, 32)
        for sample, key in zip(batch["data"].numpy(), batch["keys"]):
            data, _, _, props = ds.load_case(key)
            assert np.all(sample[1] == sample[1].flat[0])
            assert sample[1].flat[0] in depths_from_properties(data.shape[1], props, slice_axis=2).astype(np.float32)


def test_plain_coarse_trainer_has_no_depth_unless_configured(depth_dataset):
    trainer = _trainer(depth_dataset.plans, "2d", depth_dataset.dataset_json, "nnUNetTrainer_StSCoarse")
    assert not trainer.uses_depth_channel(trainer.configuration_manager)
    trainer = _trainer(depth_dataset.plans, "2d_sts_coarse_32", depth_dataset.dataset_json,
                       "nnUNetTrainer_StSCoarse")
    assert trainer.uses_depth_channel(trainer.configuration_manager)


def test_depth_trainer_refuses_2d_datasets_and_3d_configurations(planned_2d, planned_3d):
    with pytest.raises(ValueError, match="dataset is 2D"):
        _trainer(planned_2d.plans, "2d", planned_2d.dataset_json)
    with pytest.raises(ValueError, match="2D networks on 3D scans"):
        _trainer(planned_3d.plans, "3d_fullres", planned_3d.dataset_json)


@pytest.mark.parametrize("case_index", [0, 1], ids=["feet_first", "head_first"])
def test_found_boxes_map_back_to_the_input_like_nnunets_export(depth_dataset, case_index):
    """The objects report's boxes (core.objects) on this transposed, cropped dataset: a box on the
    preprocessed grid, exported by nnU-Net's own code to the input's geometry, covers exactly the
    voxels ``boxes_to_input_index`` names; its world corners are SimpleITK's own."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.inference_io import PluginConfigurationManager
    from nnunet_stseg.core.objects import boxes_to_input_index, index_to_world, objects_report

    pm = PlansManager(depth_dataset.plans)
    cm = PluginConfigurationManager(pm.get_configuration("2d").configuration)
    case = depth_dataset.cases[case_index]
    image_file = depth_dataset.folder / "imagesTr" / f"{case}_0000.nii.gz"
    data, _, props = cm.preprocessor_class(verbose=False).run_case([str(image_file)], None, pm, cm,
                                                                    depth_dataset.dataset_json)
    box = np.array([[[1, 4], [3, 9], [5, 17]]])
    logits = torch.zeros((2, *data.shape[1:]))
    logits[1, 1:4, 3:9, 5:17] = 10.0
    lm = pm.get_label_manager(depth_dataset.dataset_json)
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, props)
    where = np.argwhere(seg > 0)
    mapped = boxes_to_input_index(box, data.shape[1:], props, pm.transpose_backward)[0]
    assert np.array_equal(np.floor(mapped[:, 0] + 1e-6), where.min(0)) and np.array_equal(
        np.ceil(mapped[:, 1] - 1e-6), where.max(0) + 1)
    image = sitk.ReadImage(str(image_file))
    first = where.min(0)
    assert np.allclose(index_to_world(first[None].astype(float), props)[0],
                       image.TransformIndexToPhysicalPoint([int(v) for v in first[::-1]]))
    found = {"tight": box, "crop": box, "voxels": np.array([3 * 6 * 12]), "mean_probability": np.array([1.0]),
             "n_dropped": 0, "fallback": None}
    obj = objects_report(found, data.shape[1:], props, pm.transpose_backward,
                         [float(v) for v in cm.spacing] if len(cm.spacing) == 3 else [3.0, *cm.spacing])["objects"][0]
    assert obj["box"]["start"] == where.min(0).tolist() and obj["box"]["stop"] == (where.max(0) + 1).tolist()
