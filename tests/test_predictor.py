"""StSPredictor on real nnU-Net plans with stand-in networks whose output is known.

The coarse stage is replaced by a given probability map and the fine network by an "identity"
that returns its input (one-hot or region maps) as logits. Then the whole predictor path
(components, boxes, batched crops, fine batches, paste-back, fusion, logits for nnU-Net's export)
must reproduce the label map exactly: with crops upsampled by >= 2 (boxes <= S/2 per axis),
linear interpolation of a one-hot map and back keeps every voxel's argmax (each voxel keeps
>= (3/4)^2 > 1/2 of its own class in 2D).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import nnunet_stseg.adapters.predictor as predictor_module
import nnunet_stseg.core.cascade as cascade_module
from nnunet_stseg.adapters.config import PlanOptions, fine_config_name

from stand_ins import IdentityNet, assert_retried_on_the_cpu, fork_instead_of_spawn, nnunet_folders
from trained_models import model_folder


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A 2D and a 3D generated dataset (2 classes), planned at S=64, not preprocessed."""
    root = tmp_path_factory.mktemp("pred")
    from nnunet_stseg.data.synthetic import make_synthetic_dataset
    from nnunet_stseg.planners.plan_and_preprocess import plan_and_preprocess

    with pytest.MonkeyPatch.context() as mp:
        for k, v in nnunet_folders(root, "1").items():
            mp.setenv(k, v)
        out = {}
        for did, dim in ((975, 2), (976, 3)):
            ds = make_synthetic_dataset(root / "raw", did, f"Pred{dim}D", dim=dim, n_train=3, n_test=1,
                                        num_classes=2, objects_per_image=(2, 3), seed=dim)
            with fork_instead_of_spawn():
                plan_and_preprocess(did, PlanOptions(input_size=64, base_features=4), num_processes=1, preprocess=False)
            out[dim] = ds
        yield root, out


def _predictor(root: Path, ds: Path, config: str, labels: np.ndarray, regions: bool = False,
               fallback: str | None = None, min_object_size: float | None = None,
               coarse: torch.Tensor | None = None, proposal_threshold: float | None = None,
               proposal_confirmation: float | None = None):
    """Our predictor with the identity fine network and the coarse model replaced by an oracle:
    the one-hot ``labels`` (or the probabilities ``coarse``)."""
    import json

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.predictor import StSPredictor

    plans = json.loads((root / "pp" / ds.name / "nnUNetPlans.json").read_text())
    sts = plans["configurations"][config]["sts"]
    if fallback:
        sts["fallback"] = fallback
    if min_object_size is not None:
        sts["crop"]["min_object_size"] = min_object_size
    if proposal_threshold is not None:
        sts["crop"]["proposal_threshold"] = proposal_threshold
    if proposal_confirmation is not None:
        sts["crop"]["proposal_confirmation"] = proposal_confirmation
    dataset_json = json.loads((ds / "dataset.json").read_text())
    if regions:
        dataset_json["labels"] = {"background": 0, "any_object": [1, 2], "class_2": 2}
        dataset_json["regions_class_order"] = [1, 2]
    pm = PlansManager(plans)
    lm = pm.get_label_manager(dataset_json)
    net = IdentityNet(lm.has_regions)

    class Oracle(StSPredictor):
        def coarse_output(self, data):  # on the full grid: the coarse grid is the full grid
            return coarse.clone() if coarse is not None else coarse_probs(lm, labels)

    p = Oracle(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.manual_initialization(net, pm, pm.get_configuration(config), None, dataset_json, "nnUNetTrainer_StSFine", None)
    p.coarse = object()  # the oracle stands in for the coarse model
    return p, lm, net


def one_hot(labels: np.ndarray, k: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.stack([labels == c for c in range(k)]).astype(np.float32))


def region_maps(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([labels > 0, labels == 2]).astype(np.float32))


def coarse_probs(lm, labels):
    return region_maps(labels) if lm.has_regions else one_hot(labels)


def _label_volume(ds: Path) -> np.ndarray:
    import SimpleITK as sitk

    f = sorted((ds / "labelsTr").glob("*.nii.gz"))[-1]  # the last case has objects
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.int64)
    return arr[None] if arr.ndim == 2 else arr  # nnU-Net's (z, y, x); 2D images get z = 1


@pytest.mark.parametrize("regions", [False, True])
def test_identity_fine_model_reproduces_the_mask_2d(planned, regions):
    root, ds = planned
    labels = _label_volume(ds[2])
    assert set(np.unique(labels)) >= {0, 1} and labels.max() <= 2
    p, lm, net = _predictor(root, ds[2], fine_config_name("2d", 64), labels, regions=regions)
    data = region_maps(labels) if regions else one_hot(labels)
    logits = p.predict_logits_from_preprocessed_data(data)
    assert logits.shape == (data.shape[0], *labels.shape)
    seg = lm.convert_logits_to_segmentation(logits).numpy()
    assert np.array_equal(seg, labels)
    n_objects = p.last_timings["n_boxes"]
    assert n_objects >= 2 and net.crops_seen == n_objects and p.last_timings["fallback"] is None


def test_identity_reproduces_the_mask_2d_stage_on_3d_volume(planned):
    """The 2d pipeline on a 3D volume: per-slice components, one-slice boxes."""
    root, ds = planned
    labels = _label_volume(ds[3])
    p, lm, net = _predictor(root, ds[3], fine_config_name("2d", 64), labels, min_object_size=1)
    logits = p.predict_logits_from_preprocessed_data(one_hot(labels))
    seg = lm.convert_logits_to_segmentation(logits).numpy()
    assert np.array_equal(seg, labels)
    slices_with_objects = sum(int((labels[z] > 0).any()) for z in range(labels.shape[0]))
    assert p.last_timings["n_boxes"] >= slices_with_objects


def test_3d_stage_multiclass_keeps_objects_and_background(planned):
    """3D crops here are downsampled (boxes > S is possible), so only bounds are asserted."""
    root, ds = planned
    labels = _label_volume(ds[3])
    p, lm, net = _predictor(root, ds[3], fine_config_name("3d", 64), labels)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(one_hot(labels))).numpy()
    for c in (1, 2):
        if (labels == c).any():
            inter = ((seg == c) & (labels == c)).sum()
            dice = 2 * inter / ((seg == c).sum() + (labels == c).sum())
            assert dice > 0.95, f"class {c}: Dice {dice}"
    assert not seg[labels == 0].any() or ((seg > 0) & (labels == 0)).sum() < 0.01 * (labels == 0).sum()


def test_small_components_are_dropped_and_stay_background(planned):
    root, ds = planned
    labels = _label_volume(ds[2])
    speckled = labels.copy()
    free = np.argwhere(labels[0] == 0)
    y, x = free[len(free) // 2]
    speckled[0, y, x] = 1  # a one-pixel component in the coarse mask only
    p, lm, net = _predictor(root, ds[2], fine_config_name("2d", 64), speckled)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(one_hot(labels))).numpy()
    assert p.last_timings["n_dropped"] >= 1
    assert seg[0, y, x] == 0


@pytest.mark.parametrize("fallback", ["coarse", "whole"])
def test_no_component_fallbacks(planned, fallback, capsys):
    root, ds = planned
    labels = _label_volume(ds[2])
    empty = np.zeros_like(labels)
    p, lm, net = _predictor(root, ds[2], fine_config_name("2d", 64), empty, fallback=fallback)
    logits = p.predict_logits_from_preprocessed_data(one_hot(labels))
    assert logits.shape == (3, *labels.shape)
    assert p.last_timings["fallback"] == fallback
    assert f"fallback '{fallback}'" in capsys.readouterr().out
    if fallback == "coarse":
        assert net.calls == 0
        assert not lm.convert_logits_to_segmentation(logits).numpy().any()
    else:
        assert net.crops_seen == 1  # the whole (single-slice) image as one crop
        assert lm.convert_logits_to_segmentation(logits).numpy().any()


def test_coarse_fallback_removes_components_below_the_size_rule(planned):
    """Only a 2x2 speckle in the coarse mask: it is dropped by the size rule, so the 'coarse'
    fallback must not bring it back."""
    root, ds = planned
    labels = _label_volume(ds[2])
    speckle = np.zeros_like(labels)
    speckle[0, 10:12, 10:12] = 1
    p, lm, net = _predictor(root, ds[2], fine_config_name("2d", 64), speckle, fallback="coarse")
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(one_hot(labels))).numpy()
    assert p.last_timings == {**p.last_timings, "n_boxes": 0, "n_dropped": 1, "fallback": "coarse"}
    assert not seg.any()


def _with_a_faint_object(labels: np.ndarray):
    """One-hot coarse probabilities of ``labels`` in which the last object is faint (foreground
    0.35 < the argmax decision): (its mask, its class, the probabilities, the number of objects)."""
    components, n = ndimage.label(labels[0] > 0)
    assert n >= 2
    faint = components[None] == n
    cls = int(labels[faint].max())
    probs = one_hot(labels)
    probs[:, faint] = 0.0
    probs[0, faint], probs[cls, faint] = 0.65, 0.35
    return faint, cls, probs, n


def _far_from_objects(labels: np.ndarray):
    """The distance of every pixel of a 2D case from the nearest object, and the farthest pixel (y, x)."""
    far = ndimage.distance_transform_edt(np.pad(labels[0] == 0, 1, constant_values=False))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(far), far.shape)
    assert far[y, x] > 8
    return far, y, x


def test_recall_first_proposals_recover_a_faint_object_and_an_empty_proposal_stays_empty(planned, capsys,
                                                                                         monkeypatch):
    """Coarse probabilities: every object certain but one, which is faint (0.35 < the argmax
    decision); a faint false blob where the image has nothing; faint noise (0.2). With a
    recall-first threshold 0.3 in the plans (``plan --proposal_threshold 0.3``) and the identity
    fine model, the faint object is cropped and segmented, the false proposal comes back empty (the output is exactly the labels), the
    noise gives no crop, and the objects report says which proposals were below the decision;
    with STSEG_OVERRIDES=crop.proposal_threshold=none, or the plans' default (the published rule), the faint
    object is missed."""
    root, ds = planned
    labels = _label_volume(ds[2])
    faint, cls, probs, n = _with_a_faint_object(labels)
    far, y, x = _far_from_objects(labels)
    probs[0, 0, y - 4:y + 4, x - 4:x + 4], probs[1, 0, y - 4:y + 4, x - 4:x + 4] = 0.65, 0.35  # false blob
    noise = (labels[0] == 0) & (far > 2)
    noise[y - 6:y + 6, x - 6:x + 6] = False
    ys, xs = np.nonzero(noise)
    probs[0, 0, ys[0], xs[0]], probs[1, 0, ys[0], xs[0]] = 0.8, 0.2
    config = fine_config_name("2d", 64)

    p, lm, net = _predictor(root, ds[2], config, labels, coarse=probs)
    assert p._sts_config().crop.proposal_threshold is None, "the default is the published rule"
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(one_hot(labels))).numpy()
    assert not seg[faint].any() and p.last_timings["n_boxes"] == n - 1

    p, lm, net = _predictor(root, ds[2], config, labels, coarse=probs, proposal_threshold=0.3)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(one_hot(labels))).numpy()
    assert np.array_equal(seg, labels)
    assert p.last_timings["n_boxes"] == n + 1 and net.crops_seen == n + 1
    assert "2 below the coarse decision, foreground probability >= 0.3" in capsys.readouterr().out
    proposals = sorted(o["proposal"] for o in p.last_objects["objects"])
    assert proposals == ["below the coarse decision"] * 2 + ["coarse argmax"] * (n - 1)

    monkeypatch.setenv("STSEG_OVERRIDES", "crop.proposal_threshold=none")
    p, lm, net = _predictor(root, ds[2], config, labels, coarse=probs, proposal_threshold=0.3)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(one_hot(labels))).numpy()
    assert not seg[faint].any() and np.array_equal(seg[~faint], labels[~faint])
    assert p.last_timings["n_boxes"] == n - 1
    assert p.applied_overrides == {"sts.crop.proposal_threshold": {"plans": 0.3, "used": None}}
    assert all("proposal" not in o for o in p.last_objects["objects"])
    for bad, message in (("0.7", r"proposal_threshold must be in \(0, 0.5\]"),
                         ("low", "crop.proposal_threshold='low' is not float")):
        monkeypatch.setenv("STSEG_OVERRIDES", f"crop.proposal_threshold={bad}")
        with pytest.raises(ValueError, match=message):
            _predictor(root, ds[2], config, labels, coarse=probs)[0]._sts_config()


def test_the_fine_stage_confirms_or_rejects_proposals_below_the_decision(planned, capsys, monkeypatch):
    """Two proposals below the coarse decision (coarse foreground 0.35): a real object the fine
    stage (identity network) sees sharply (foreground 0.95 in its input) and a false blob it sees as
    a faint foreground (0.55, just above its own decision). Without ``proposal_confirmation`` both
    are fused, so the false blob becomes foreground; with 0.8 the blob is rejected and keeps the
    coarse probabilities (background) while the real object and every argmax object are fused as
    before; the objects report gives each object's fine confidence and which proposal was
    rejected. ``STSEG_OVERRIDES=crop.proposal_confirmation=none`` fuses every proposal again."""
    root, ds = planned
    labels = _label_volume(ds[2])
    faint, cls, probs, n = _with_a_faint_object(labels)
    far, y, x = _far_from_objects(labels)
    blob = np.zeros_like(faint)
    blob[0, y - 4:y + 4, x - 4:x + 4] = True
    probs[:, blob] = 0.0
    probs[0, blob], probs[1, blob] = 0.65, 0.35
    data = one_hot(labels)  # what the fine stage sees (the identity network returns it)
    data[:, faint] = 0.0
    data[0, faint], data[cls, faint] = 0.05, 0.95
    data[:, blob] = 0.0
    data[0, blob], data[1, blob] = 0.45, 0.55
    config = fine_config_name("2d", 64)

    def predict(confirmation=None):
        p, lm, net = _predictor(root, ds[2], config, labels, coarse=probs, proposal_threshold=0.3,
                                proposal_confirmation=confirmation)
        seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data.clone())).numpy()
        return seg, p, net

    seg, p, net = predict()
    assert (seg[faint] == cls).mean() > 0.9 and (seg[blob] == 1).mean() > 0.9, "every proposal fused"
    everything = seg

    seg, p, net = predict(0.8)
    assert net.crops_seen == n + 1, "the fine stage still sees every proposal"
    assert not seg[blob].any() and np.array_equal(seg[~blob], everything[~blob])
    assert "1 of 2 proposal(s) below the coarse decision rejected by the fine stage" in capsys.readouterr().out
    below = [o for o in p.last_objects["objects"] if o["proposal"] == "below the coarse decision"]
    assert sorted(o["rejected_by_fine_stage"] for o in below) == [False, True]
    rejected = next(o for o in below if o["rejected_by_fine_stage"])
    kept = next(o for o in below if not o["rejected_by_fine_stage"])
    assert 0.5 < rejected["fine_mean_foreground_probability"] <= 0.55 + 1e-4
    assert kept["fine_mean_foreground_probability"] > 0.8
    assert all("rejected_by_fine_stage" not in o and o["fine_mean_foreground_probability"] > 0.9
               for o in p.last_objects["objects"] if o["proposal"] == "coarse argmax")

    monkeypatch.setenv("STSEG_OVERRIDES", "crop.proposal_confirmation=none")
    seg, p, net = predict(0.8)
    assert np.array_equal(seg, everything)
    assert p.applied_overrides == {"sts.crop.proposal_confirmation": {"plans": 0.8, "used": None}}
    for bad, message in (("0.4", r"proposal_confirmation must be in \[0.5, 1\)"),
                         ("1", r"proposal_confirmation must be in \[0.5, 1\)"),
                         ("sure", "crop.proposal_confirmation='sure' is not float")):
        monkeypatch.setenv("STSEG_OVERRIDES", f"crop.proposal_confirmation={bad}")
        with pytest.raises(ValueError, match=message):
            _predictor(root, ds[2], config, labels, coarse=probs)[0]._sts_config()


def test_recall_first_proposals_on_a_coarser_grid_reach_a_faint_object(planned, capsys):
    """The same faint object (0.35 < the argmax decision) with the coarse output on a grid 2 x
    coarser than the full one, as a real coarse model gives it: the proposal's box is read off the
    upsampled probabilities at the proposal threshold, not at the decision (where it has no voxel:
    0.8.2 dropped every such proposal there, silently), so the faint object is cropped and
    segmented; the decided objects' crops are the same as without proposals."""
    root, ds = planned
    labels = _label_volume(ds[2])
    faint, cls, probs, n = _with_a_faint_object(labels)
    coarse = torch.nn.functional.avg_pool2d(probs, 2)  # (K, 1, Y / 2, X / 2): cells of 2 x 2 pixels
    assert coarse.shape[-1] * 2 == labels.shape[-1]
    config = fine_config_name("2d", 64)

    p, lm, net = _predictor(root, ds[2], config, labels, coarse=coarse)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(one_hot(labels))).numpy()
    published = sorted(str(o["crop_box"]) for o in p.last_objects["objects"])
    assert not seg[faint].any() and p.last_timings["n_boxes"] == n - 1

    p, lm, net = _predictor(root, ds[2], config, labels, coarse=coarse, proposal_threshold=0.3)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(one_hot(labels))).numpy()
    assert p.last_timings["n_boxes"] == n and net.crops_seen == n
    assert "1 below the coarse decision, foreground probability >= 0.3" in capsys.readouterr().out
    assert (seg[faint] == cls).mean() > 0.9, "the faint object is segmented by the fine stage"
    objects = p.last_objects["objects"]
    assert sorted(str(o["crop_box"]) for o in objects if o["proposal"] == "coarse argmax") == published


def test_more_objects_than_max_crops_are_all_segmented_in_batches(planned, capsys, monkeypatch):
    """Hundreds of coarse components (metastases, or a speckled coarse mask): every one is cropped
    and segmented, max_crops at a time (a bound on memory, not on the result: 0.1 dropped all but
    the largest), with the same fused result as one batch (on the CPU a chunk is also at most one
    fine batch: lifted here to get a single chunk); the log says how many batches."""
    root, ds = planned
    labels = _label_volume(ds[2])
    speckle = np.zeros_like(labels)
    speckle[0, ::7, ::7] = 1  # a grid of isolated pixels...
    speckle = np.maximum(speckle, np.roll(speckle, 1, axis=1))
    speckle = np.maximum(speckle, np.roll(speckle, 1, axis=2))  # ...grown to 2x2
    p, lm, net = _predictor(root, ds[2], fine_config_name("2d", 64), speckle, min_object_size=1)
    n_specks = int(speckle[0, ::7, ::7].sum())
    p._sts_config().max_crops = p._sts_config().crops_per_batch = 10000
    with monkeypatch.context() as m:
        m.setattr(predictor_module, "CPU_BATCH_VOXELS", 10 ** 9)
        one_batch = p.predict_logits_from_preprocessed_data(one_hot(speckle))
    p._sts_config().max_crops, p._sts_config().crops_per_batch = 10, 16
    batched = p.predict_logits_from_preprocessed_data(one_hot(speckle))
    cut = []  # on the CPU the crops are cut one fine batch at a time, whatever max_crops allows
    crop_and_resample = cascade_module.crop_and_resample
    monkeypatch.setattr(cascade_module, "crop_and_resample", lambda image, boxes, *a, **k: (
        cut.append(len(boxes)), crop_and_resample(image, boxes, *a, **k))[1])
    p._sts_config().max_crops, p._sts_config().crops_per_batch = 10000, 16
    assert torch.allclose(p.predict_logits_from_preprocessed_data(one_hot(speckle)), one_batch, atol=1e-5)
    assert sum(cut) == n_specks and max(cut) == 16
    out = capsys.readouterr().out
    assert p.last_timings["n_boxes"] == n_specks > 100 and net.crops_seen == 3 * n_specks
    assert f"in {-(-n_specks // 10)} batches of at most max_crops=10" in out
    assert torch.allclose(batched, one_batch, atol=1e-5)
    assert np.array_equal(lm.convert_logits_to_segmentation(batched).numpy() > 0, speckle > 0), "no speck lost"


# ----------------------------------------------------------------------------------------------
# a predictor object that loads several models (issue 16): no stale state, user subclasses kept
# ----------------------------------------------------------------------------------------------

def _stock_copy_of(model: Path, root: Path) -> Path:
    """The coarse model saved as if nnU-Net's own nnUNetTrainer had trained it (same network)."""
    stock = root / model.name.replace("nnUNetTrainer_StSCoarse", "nnUNetTrainer")
    shutil.copytree(model, stock)
    checkpoint = stock / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["trainer_name"] = "nnUNetTrainer"
    torch.save(state, checkpoint)
    return stock


@pytest.mark.slow
def test_a_reused_predictor_drops_our_state_and_keeps_the_users_class(trained_2d, tmp_path, monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_stseg import trainer_discovery_dir
    from nnunet_stseg.adapters.inference_io import PluginConfigurationManager
    from nnunet_stseg.adapters.predictor import StSPredictor

    monkeypatch.setenv("nnUNet_extTrainer", trainer_discovery_dir())
    res = trained_2d
    fine = model_folder(res, "nnUNetTrainer_StSFine", res.fine_config)
    coarse = model_folder(res, "nnUNetTrainer_StSCoarse", res.coarse_config)

    class MyPredictor(nnUNetPredictor):  # a user's subclass with its own behaviour
        def predict_from_files_sequential(self, *args, **kwargs):
            self.user_calls = getattr(self, "user_calls", 0) + 1
            return super().predict_from_files_sequential(*args, **kwargs)

    p = MyPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False, verbose=False)
    p.initialize_from_trained_model_folder(str(fine), (0,))
    assert isinstance(p, StSPredictor) and isinstance(p, MyPredictor)
    p.attach_coarse([0], coarse_folder=str(coarse))
    image = sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))[0]
    out = tmp_path / "pred" / image.name.replace("_0000.nii.gz", "")
    out.parent.mkdir()
    p.predict_from_files_sequential([[str(image)]], [str(out)], False, True, None)
    assert p.user_calls == 1, "the user's override ran under ours"
    assert out.with_name(out.name + ".nii.gz").is_file() and p.last_timings is not None

    p.initialize_from_trained_model_folder(str(_stock_copy_of(coarse, tmp_path)), (0,))
    assert type(p) is MyPredictor, "a stock model runs with the user's own class"
    assert not {"coarse", "sts", "last_timings", "_sts_source"} & set(vars(p))
    assert not isinstance(p.configuration_manager, PluginConfigurationManager)
    p.initialize_from_trained_model_folder(str(fine), (0,))
    assert isinstance(p, StSPredictor) and p.coarse is None, "our model again: adopted afresh"


def test_adopting_a_class_that_cannot_be_combined_is_one_clear_error():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_stseg.adapters.predictor import PluginPredictor, StSPredictor, adopted_class

    class Sealed(nnUNetPredictor):  # a user class that refuses subclasses
        def __init_subclass__(cls, **kwargs):
            raise TypeError("Sealed may not be subclassed")

    assert adopted_class(StSPredictor, nnUNetPredictor) is StSPredictor
    assert adopted_class(PluginPredictor, StSPredictor) is PluginPredictor, "one of ours is replaced"
    with pytest.raises(TypeError, match="cannot be combined with the predictor class .*Sealed .*may not be"):
        adopted_class(StSPredictor, Sealed)


def test_managers_assigned_before_adoption_are_wrapped(planned):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.inference_io import PluginConfigurationManager, PluginPlansManager
    from nnunet_stseg.adapters.predictor import PluginPredictor

    root, datasets = planned
    plans = PlansManager(str(root / "pp" / datasets[2].name / "nnUNetPlans.json"))
    p = nnUNetPredictor(device=torch.device("cpu"))
    p.plans_manager, p.configuration_manager = plans, plans.get_configuration("2d")  # nnU-Net's own order
    p.__class__ = PluginPredictor
    assert isinstance(p.configuration_manager, PluginConfigurationManager)
    assert isinstance(p.plans_manager, PluginPlansManager)


def test_validation_without_mirroring_reaches_the_coarse_model(planned, tmp_path, monkeypatch):
    """STSEG_VAL_MIRRORING=0 takes the trainer's mirroring axes away for its final validation; the
    coarse model that the cascade validation loads must not mirror either (it did)."""
    from types import SimpleNamespace

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnunet_stseg.adapters.predictor as predictor_module
    from nnunet_stseg.adapters.predictor import StSPredictor
    from nnunet_stseg.trainers.validation import validation_predictor

    root, datasets = planned
    ds = datasets[2]
    plans = PlansManager(str(root / "pp" / ds.name / "nnUNetPlans.json"))
    made = []

    class RecordingPredictor:  # stands in for the coarse model's nnUNetPredictor
        def __init__(self, **kwargs):
            made.append(kwargs)

        def initialize_from_trained_model_folder(self, *args):
            pass

    monkeypatch.setattr(predictor_module, "nnUNetPredictor", RecordingPredictor)
    (tmp_path / "coarse" / "fold_0").mkdir(parents=True)
    (tmp_path / "coarse" / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    for axes, mirroring in ((None, False), ((0, 1), True)):
        trainer = SimpleNamespace(network=torch.nn.Identity(), device=torch.device("cpu"), plans_manager=plans,
                                  configuration_manager=plans.get_configuration(fine_config_name("2d", 64)),
                                  dataset_json=json.loads((ds / "dataset.json").read_text()),
                                  inference_allowed_mirroring_axes=axes, set_deep_supervision_enabled=lambda on: None)
        p = validation_predictor(trainer, StSPredictor)
        p.attach_coarse([0], coarse_folder=str(tmp_path / "coarse"))
        assert p.use_mirroring is mirroring and made[-1]["use_mirroring"] is mirroring


def test_out_of_device_memory_predicts_the_case_again_on_the_cpu(planned, capsys, monkeypatch):
    """nnU-Net's contract: a case that does not fit on the device is predicted again with its
    full-resolution arrays on the CPU (not a crash); --not_on_device puts them there from the start;
    any other error is not swallowed. The accelerator is simulated (no GPU here): its device name
    only decides where the arrays go, which the predictor reports through ``work_device``."""
    root, ds = planned
    labels = _label_volume(ds[2])
    p, lm, net = _predictor(root, ds[2], fine_config_name("2d", 64), labels)
    assert_retried_on_the_cpu(monkeypatch, capsys, p, one_hot(labels))

    def broken_case(self, x):
        raise ValueError("not a memory problem")

    p._predict_case = broken_case.__get__(p)
    with pytest.raises(ValueError, match="not a memory problem"):
        p.predict_logits_from_preprocessed_data(one_hot(labels))


def test_one_folds_weights_are_loaded_once_and_every_fold_per_batch(planned):
    """One fold: its weights go into the network once, not per batch or per case (the polar stage
    forwards batch by batch); several folds: each fold's weights for every batch, as they must."""
    root, ds = planned
    labels = _label_volume(ds[2])
    p, lm, net = _predictor(root, ds[2], fine_config_name("2d", 64), labels)
    loads = []
    net.load_state_dict = lambda state, *args, **kwargs: loads.append(state)
    one_fold = {"fold": 0}
    p.list_of_parameters = [one_fold]
    first = p.predict_logits_from_preprocessed_data(one_hot(labels))
    p.predict_logits_from_preprocessed_data(one_hot(labels))
    assert loads == [one_fold]
    p.list_of_parameters = [{"fold": 0}, {"fold": 1}]
    both = p.predict_logits_from_preprocessed_data(one_hot(labels))
    assert [s["fold"] for s in loads[1:]] == [0, 1]
    assert torch.equal(first, both)  # the identity stand-in: every fold gives the same
