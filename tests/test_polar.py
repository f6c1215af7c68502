"""Polar stage (issue 3): the pure geometry (round trips, origins, fusion), the training sampler,
the predictor with a stand-in network whose output is known, and the stock CLIs end to end."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from nnunet_stseg.adapters.config import PlanOptions, PolarParams, StSConfig, polar_config_name
from nnunet_stseg.core.centres import default_sigma, equivalent_radii
from nnunet_stseg.core.fusion import (fuse_polar_predictions, fuse_polar_probabilities, hysteresis_fusion,
                                      origin_component_weights, polar_fusion_weights)
from nnunet_stseg.core.polar import (angle_seam_padding, component_centroids, farthest_corner_distance, from_polar,
                                     round_trip_dice, shift_origin, to_polar, unwrap_angles, wrap_angles)
from nnunet_stseg.settings import CONFIDENCE_WEIGHTING_ENV, MAX_ORIGINS_ENV, MIN_CONFIDENCE_ENV

from stand_ins import IdentityNet, fork_instead_of_spawn, nnunet_folders


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def _ellipse(shape, centre, axes, angle=0.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    y, x = yy - centre[0], xx - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    return (u / axes[1]) ** 2 + (v / axes[0]) ** 2 <= 1


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, mask, origin", [
    ("disc", _ellipse((200, 256), (100, 128), (50, 50)), (100, 128)),
    ("ellipse", _ellipse((200, 256), (90, 140), (30, 70), 0.6), (90, 140)),
    ("off-centre", _ellipse((200, 256), (40, 210), (25, 35)), (40, 210)),
    ("touching the border", _ellipse((200, 256), (0, 100), (30, 40)), (10, 100)),
    ("origin at the image corner", _ellipse((200, 256), (0, 0), (50, 50)), (0, 0)),
])
def test_round_trip_keeps_shapes(name, mask, origin):
    assert round_trip_dice(mask, origin, (256, 256)) >= 0.99, name
    assert round_trip_dice(mask, origin, (512, 512)) >= 0.998, name
    if name != "disc":  # a centred disc is radially symmetric: few angles suffice for it
        assert round_trip_dice(mask, origin, (16, 16)) < 0.98, "too few samples must lose detail"


def test_radius_reaches_the_farthest_corner_so_no_pixel_is_lost():
    shape = (60, 90)
    for origin in [(0.0, 0.0), (59.0, 89.0), (30.0, 10.0), (-0.5, 45.0)]:
        ones = torch.ones(1, *shape)
        for mode in ("nearest", "linear"):
            polar, radius = to_polar(ones, np.array([origin]), (256, 256), mode=mode)
            back = from_polar(polar, np.array([origin]), shape, radius, mode=mode)
            assert torch.allclose(back, torch.ones_like(back)), f"pixels lost for origin {origin} ({mode})"
        corners = np.array([[-0.5, -0.5], [-0.5, 89.5], [59.5, -0.5], [59.5, 89.5]])
        assert radius[0] == pytest.approx(np.max(np.hypot(*(corners - origin).T)))
    # half the diagonal (the reference code's radius) would not reach the far corner of an off-centre origin
    assert farthest_corner_distance([[0, 0]], shape)[0] > math.hypot(*shape) / 2


def test_polar_layout_rows_are_angles_columns_are_radii():
    img = torch.zeros(1, 101, 101)
    img[0, 50, 50:] = 1.0  # a ray along +x from the centre
    polar, radius = to_polar(img, np.array([[50.0, 50.0]]), (64, 200), mode="nearest")
    row_sums = polar[0, 0].sum(dim=1)
    assert int(row_sums.argmax()) == 0, "angle 0 (row 0) points along +x"
    col = torch.nonzero(polar[0, 0, 0])[:, 0]
    assert col.min() == 0  # column 0 is the origin itself
    # rotation = cyclic shift of the angle axis
    rotated, _ = to_polar(img, np.array([[50.0, 50.0]]), (64, 200), mode="nearest", theta0=-2 * math.pi * 5 / 64)
    assert torch.equal(rotated[0, 0, 5], polar[0, 0, 0])


def test_angle_axis_is_periodic_when_mapping_back():
    """A polar map constant along angles must come back without a seam at 2 pi -> 0."""
    a, r = 16, 32
    polar = torch.linspace(0, 1, r).expand(1, 1, a, r).clone()
    back = from_polar(polar, np.array([[20.0, 20.0]]), (41, 41), radius=[30.0], mode="linear")[0, 0]
    yy, xx = np.mgrid[:41, :41]
    expected = np.clip(np.hypot(yy - 20, xx - 20) / 30.0, 0, 1)
    assert np.abs(back.numpy() - expected).max() < 1e-4


def test_seam_padding_is_a_multiple_of_the_stride_and_wraps_the_angles():
    assert angle_seam_padding(128, 0.125, 32) == 32 and angle_seam_padding(128, 0.125, 1) == 16
    assert angle_seam_padding(128, 0.0, 32) == 0 and angle_seam_padding(64, 0.1, 4) == 8
    x = np.arange(6 * 3).reshape(1, 6, 3)
    w = wrap_angles(x, 2)
    assert w.shape == (1, 10, 3) and (w[0, :2] == x[0, 4:]).all() and (w[0, -2:] == x[0, :2]).all()
    assert (unwrap_angles(w, 2) == x).all() and wrap_angles(x, 0) is x
    with pytest.raises(ValueError, match="exceeds the 6 angles"):
        wrap_angles(x, 7)


def test_wrapped_angles_give_the_network_context_across_the_seam():
    """A network with zero padding along the angles (a 3-row mean here) sees an edge at the seam
    and predicts a step there; with wrap-around context its output is seamless."""
    polar = torch.ones(2, 1, 16, 8)

    def net(t):
        return F.avg_pool2d(F.pad(t, (0, 0, 1, 1)), (3, 1), stride=1)

    assert net(polar)[..., 0, :].max() < 0.7  # the seam artefact
    pad = angle_seam_padding(16, 0.125, 4)
    assert torch.allclose(unwrap_angles(net(wrap_angles(polar, pad)), pad), polar)


def test_numpy_in_numpy_out_and_volume_slices():
    vol = np.zeros((2, 3, 40, 50), np.float32)  # (C, Z, H, W)
    vol[:, 1, 10:20, 10:20] = 1
    vol[:, 2, 25:35, 30:45] = 1
    origins = np.array([[1, 15, 15], [2, 30, 37]], float)
    polar, radius = to_polar(vol, origins, (128, 128), mode="nearest")
    assert isinstance(polar, np.ndarray) and polar.shape == (2, 2, 128, 128)
    back = from_polar(polar, origins, (40, 50), radius, mode="nearest")
    assert _dice(back[0, 0] > 0.5, vol[0, 1] > 0) > 0.97 and _dice(back[1, 1] > 0.5, vol[1, 2] > 0) > 0.97
    with pytest.raises(ValueError, match="origins"):
        to_polar(vol, origins[:, 1:], (64, 64))
    with pytest.raises(ValueError, match="outside"):
        to_polar(vol, np.array([[3, 5, 5]], float), (64, 64))


@settings(max_examples=30, deadline=None)
@given(cy=st.floats(5, 90), cx=st.floats(5, 120), ay=st.floats(6, 30), ax=st.floats(6, 30),
       angle=st.floats(0, math.pi))
def test_round_trip_of_random_ellipses(cy, cx, ay, ax, angle):
    mask = _ellipse((96, 128), (cy, cx), (ay, ax), angle)
    if mask.sum() < 50:
        return
    origin = np.argwhere(mask).mean(axis=0)
    assert round_trip_dice(mask, origin, (256, 256)) >= 0.98


def test_component_centroids_and_size_rule():
    m = np.zeros((2, 30, 30), bool)
    m[0, 2:10, 2:12] = True
    m[0, 20:22, 20:28] = True  # 2 px tall: below a 5-px rule
    m[1, 5:15, 5:15] = True
    cents, areas = component_centroids(m)
    assert cents.tolist() == [[0, 5.5, 6.5], [0, 20.5, 23.5], [1, 9.5, 9.5]] and areas.tolist() == [80, 16, 100]
    cents, _ = component_centroids(m, min_size=5)
    assert cents.tolist() == [[0, 5.5, 6.5], [1, 9.5, 9.5]]
    cents, _ = component_centroids(m[0], max_per_slice=1)
    assert cents.tolist() == [[5.5, 6.5]]
    assert component_centroids(np.zeros((4, 4), bool))[0].shape == (0, 2)


def test_centre_shift_is_bounded_and_resampled():
    rng = np.random.default_rng(0)
    origin = np.array([3.0, 50.0, 60.0])
    shifts = np.array([shift_origin(origin, (100, 200), rng) - origin for _ in range(2000)])
    moved = np.any(shifts != 0, axis=1)
    assert 0.25 < moved.mean() < 0.35, "p = 0.3"
    assert np.all(shifts[:, 0] == 0), "the slice never changes"
    assert np.abs(shifts[:, 1:]).max() <= 0.05 * 100 + 1e-9
    assert len({tuple(s) for s in shifts[moved]}) == moved.sum(), "drawn anew every time"
    edge = shift_origin(np.array([0.0, 0.0]), (10, 10), np.random.default_rng(1), probability=1.0, fraction=0.5)
    assert 0 <= edge[0] <= 9 and 0 <= edge[1] <= 9


# ----------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------

def test_weights_two_on_the_component_holding_the_origin():
    masks = np.zeros((2, 10, 20), bool)
    masks[0, 1:4, 1:4] = masks[0, 6:9, 12:18] = True
    masks[1, 6:9, 12:18] = True
    w = origin_component_weights(masks, np.array([[2, 2], [0, 0]]))
    assert np.all(w[0, 1:4, 1:4] == 2) and np.all(w[0, 6:9, 12:18] == 1)
    assert np.all(w[1, 6:9, 12:18] == 1), "origin on background: weight 1 everywhere predicted"
    assert w[0].sum() == 2 * 9 + 18 and np.all(w[:, 0, :] == 0)


def test_hysteresis_fusion_drops_a_false_positive_seen_by_one_view_only():
    """Two objects, two polar views; view 0 also predicts a spurious blob far from both origins."""
    h, w = 40, 60
    a, b = _ellipse((h, w), (10, 10), (5, 5)), _ellipse((h, w), (28, 45), (6, 6))
    spurious = _ellipse((h, w), (32, 8), (3, 3))
    views = np.stack([a | b | spurious, a | b])
    origins = np.array([[10, 10], [28, 45]])
    fused, score = fuse_polar_predictions(views, origins, low=0.0, high=0.4)
    # a: 2 + 1 = 3, b: 1 + 2 = 3, spurious: 1 -> 1/3 normalised, below t2 = 0.4
    assert score.max() == 1.0 and np.isclose(score[spurious].max(), 1 / 3)
    assert np.array_equal(fused, a | b)
    fused_low, _ = fuse_polar_predictions(views, origins, low=0.0, high=0.3)
    assert np.array_equal(fused_low, a | b | spurious), "a lower t2 keeps it"
    # a region touching a confident one is kept whole: hysteresis, not a plain threshold
    views2 = np.stack([a | b, a | b])
    views2[1] |= _ellipse((h, w), (10, 16), (3, 3))  # grows object a in view 1 only
    fused2, score2 = fuse_polar_predictions(views2, origins)
    assert fused2[10, 18] and score2[10, 18] < 0.4
    assert not fuse_polar_predictions(np.zeros((1, 5, 5), bool), [[2, 2]])[0].any()
    with pytest.raises(ValueError, match="low"):
        hysteresis_fusion(np.ones((3, 3)), 0.5, 0.4)


def test_polar_params_validation_and_round_trip_in_the_sts_block():
    p = PolarParams((64, 64), fusion_high=0.5)
    cfg = StSConfig("polar", 64, "2d_sts_coarse_64", polar=p)
    back = StSConfig.from_configuration({"sts": json.loads(json.dumps(cfg.to_dict()))})
    assert back.polar == p and back.role == "polar"
    with pytest.raises(ValueError, match="fusion_low"):
        PolarParams((64, 64), fusion_low=0.5, fusion_high=0.4)
    with pytest.raises(ValueError, match="origin_source"):
        PolarParams((64, 64), origin_source="magic")
    with pytest.raises(ValueError, match="unknown polar parameters"):
        PolarParams.from_dict({"polar_shape": [64, 64], "sd": 8})
    with pytest.raises(ValueError, match="without sts.polar"):
        StSConfig.from_configuration({"sts": {"role": "polar", "input_size": 64, "coarse_configuration": "c"}})


# ----------------------------------------------------------------------------------------------
# planner, sampler and predictor on real nnU-Net plans
# ----------------------------------------------------------------------------------------------

DATASET_ID = 983
S = 64


@pytest.fixture(scope="module")
def planned_polar(tmp_path_factory):
    """A generated 2D dataset with 2 classes, planned with --polar at S = 64 and preprocessed."""
    root = tmp_path_factory.mktemp("polar")
    from nnunet_stseg.data.synthetic import make_synthetic_dataset
    from nnunet_stseg.planners.plan_and_preprocess import plan_and_preprocess

    with pytest.MonkeyPatch.context() as mp:
        for k, v in nnunet_folders(root, "0").items():
            mp.setenv(k, v)
        ds = make_synthetic_dataset(root / "raw", DATASET_ID, "Polar2D", dim=2, n_train=4, n_test=1,
                                    num_classes=2, objects_per_image=(2, 3), seed=3)
        with fork_instead_of_spawn():
            added = plan_and_preprocess(DATASET_ID, PlanOptions(input_size=S, base_features=4, polar=True),
                                        num_processes=1)
        yield root, ds, added


def test_planner_adds_the_polar_configuration(planned_polar):
    root, ds, added = planned_polar
    assert added == ["2d_sts_coarse_64", "2d_sts_fine_64", polar_config_name(S)]
    plans = json.loads((root / "pp" / ds.name / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"][polar_config_name(S)]
    assert cfg["patch_size"] == [S, S]
    assert cfg["data_identifier"] == plans["configurations"]["2d"]["data_identifier"], "shares the 2d data"
    sts = StSConfig.from_configuration(cfg)
    assert sts.role == "polar" and sts.coarse_configuration == "2d_sts_coarse_64"
    assert sts.polar.polar_shape == (S, S) and sts.polar.fusion_high == 0.4
    # the centre heatmap's sigma comes from the training objects, measured on the coarse grid
    coarse = StSConfig.from_configuration(plans["configurations"]["2d_sts_coarse_64"])
    radii = np.concatenate([equivalent_radii(_read(f) > 0) for f in sorted((ds / "labelsTr").glob("*.nii.gz"))])
    factor = np.mean(np.array(plans["configurations"]["2d_sts_coarse_64"]["spacing"])
                     / np.array(plans["configurations"]["2d"]["spacing"]))
    assert coarse.centre.objects_measured == len(radii) > 0
    assert coarse.centre.median_object_radius == pytest.approx(np.median(radii) / factor, abs=1e-3)
    assert coarse.centre.sigma == pytest.approx(default_sigma(np.median(radii) / factor), abs=1e-3)
    assert coarse.centre.loss == "focal", "new plans train the centre model with the focal loss"


def _read(path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _trainer(root, ds, configuration):
    from nnunet_stseg.trainers.polar_trainer import nnUNetTrainer_StSPolar

    plans = json.loads((root / "pp" / ds.name / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train adds before building a trainer
    dataset_json = json.loads((ds / "dataset.json").read_text())
    return nnUNetTrainer_StSPolar(plans, configuration, 0, dataset_json, torch.device("cpu"))


def test_polar_sampler_centres_objects_and_rotates(planned_polar, monkeypatch):
    root, ds, _ = planned_polar
    for k, v in nnunet_folders(root).items():
        monkeypatch.setenv(k, v)
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_stseg.trainers.polar_trainer import PolarSampleLoader

    trainer = _trainer(root, ds, polar_config_name(S))
    rot, dummy, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror == (0,) and trainer.inference_allowed_mirroring_axes == (0,) and list(initial) == [S, S]
    transforms = trainer.get_training_transforms(np.array([S, S]), rot, None, mirror, False)
    spatial = [t for t in transforms.transforms if type(t).__name__ == "SpatialTransform"]
    assert spatial and all(t.p_rotation == 0 and t.p_scaling == 0 for t in spatial)

    folder = root / "pp" / ds.name / trainer.configuration_manager.data_identifier
    dataset = infer_dataset_class(str(folder))(str(folder))
    params = trainer.sts.polar
    plain = PolarSampleLoader(dataset, 4, (S, S), (S, S), trainer.label_manager, params, augment=False)
    keys = [k for k in dataset.identifiers if (dataset.load_case(k)[1][0] > 0).any()]
    rng = np.random.default_rng(0)
    for key in keys:
        data, seg, _, props = dataset.load_case(key)
        img, lab, z = plain.make_sample(key, data, seg, props, rng)
        assert img.shape == (data.shape[0], 1, S, S) and lab.shape == (1, 1, S, S) and lab.dtype == torch.int16
        # the origin is a component's centroid: the first radius column is inside that object for every angle
        assert torch.all(lab[0, 0, :, 0] > 0)
        # and the label maps back onto one ground-truth object
        origin = plain.sample_origin(key, seg, np.random.default_rng(1))[0]
        radius = farthest_corner_distance(origin[None, 1:], seg.shape[2:])
        back = from_polar(lab.float()[:, 0][None], origin[None, 1:], seg.shape[2:], radius, mode="nearest")[0, 0]
        assert back.sum() > 0
    # augmentation: different start angles and shifted centres across draws, same object set
    aug = PolarSampleLoader(dataset, 4, (S, S), (S, S), trainer.label_manager, params, augment=True)
    draws = [aug.sample_origin(keys[0], dataset.load_case(keys[0])[1], np.random.default_rng(i)) for i in range(50)]
    assert len({round(t, 6) for _, t in draws}) == 50
    centroids = aug.gt_origins(keys[0], dataset.load_case(keys[0])[1])
    shifted = [o for o, _ in draws if not any(np.allclose(o, c) for c in centroids)]
    assert 5 <= len(shifted) <= 30
    # an image without foreground: random origin, empty label
    empty_key = next(k for k in dataset.identifiers if not (dataset.load_case(k)[1][0] > 0).any())
    data, seg, _, props = dataset.load_case(empty_key)
    _, lab, _ = plain.make_sample(empty_key, data, seg, props, rng)
    assert not lab.any()


def _labels(ds: Path) -> np.ndarray:
    import SimpleITK as sitk

    f = sorted((ds / "labelsTr").glob("*.nii.gz"))[-1]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.int64)[None]


def _polar_predictor(root, ds, labels, coarse_labels, regions: bool, polar_shape=(256, 256)):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.polar_predictor import PolarPredictor

    plans = json.loads((root / "pp" / ds.name / "nnUNetPlans.json").read_text())
    plans["configurations"][polar_config_name(S)]["sts"]["polar"]["polar_shape"] = list(polar_shape)
    dataset_json = json.loads((ds / "dataset.json").read_text())
    if regions:
        dataset_json["labels"] = {"background": 0, "any_object": [1, 2], "class_2": 2}
        dataset_json["regions_class_order"] = [1, 2]
    pm = PlansManager(plans)
    lm = pm.get_label_manager(dataset_json)
    net = IdentityNet(lm.has_regions)

    def maps(lab):
        if lm.has_regions:
            return torch.from_numpy(np.stack([lab > 0, lab == 2]).astype(np.float32))
        return torch.from_numpy(np.stack([lab == c for c in range(3)]).astype(np.float32))

    class Oracle(PolarPredictor):
        def coarse_probabilities(self, data):
            return maps(coarse_labels)

    p = Oracle(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.manual_initialization(net, pm, pm.get_configuration(polar_config_name(S)), None, dataset_json,
                            "nnUNetTrainer_StSPolar", None)
    p.coarse = object()
    return p, lm, net, maps(labels)


@pytest.mark.parametrize("regions", [False, True])
def test_identity_polar_model_reproduces_the_labels(planned_polar, regions, capsys):
    """Image = the one-hot label map, polar network = identity: the predictor (origins, batched
    polar transforms, inverse mapping, fusion, logits) must give the labels back up to the polar
    round trip; a spurious coarse component far from every object adds a view that predicts the
    real objects off its origin only, which the fusion must not turn into a false positive."""
    root, ds, _ = planned_polar
    labels = _labels(ds)
    n_objects = len(component_centroids(labels[0] > 0)[0])
    assert n_objects >= 2
    p, lm, net, data = _polar_predictor(root, ds, labels, labels, regions)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data)).numpy()
    assert seg.shape == labels.shape
    for c in (1, 2):
        assert _dice(seg == c, labels == c) >= 0.95, f"class {c}"
    assert p.last_timings["n_origins"] == n_objects and net.calls == 1
    assert f"{n_objects} origin(s) (coarse)" in capsys.readouterr().out
    # the objects report: one object per ground-truth object, its box and its origin (the centroid)
    report = p.last_objects
    gt_labels, _ = ndimage.label(labels[0] > 0, structure=np.ones((3, 3), bool))  # labels: (1, H, W)
    gt_boxes = sorted([[0, 1], [sl[0].start, sl[0].stop], [sl[1].start, sl[1].stop]]
                      for sl in ndimage.find_objects(gt_labels))
    got = sorted([[o["box"]["start"][a], o["box"]["stop"][a]] for a in range(3)] for o in report["objects"])
    assert report["n_objects"] == n_objects and report["fallback"] is None and report["n_origins_rejected"] == 0
    assert np.abs(np.asarray(got) - np.asarray(gt_boxes)).max() <= 1, (got, gt_boxes)
    origins = sorted(tuple(o["origins"][0]["index"]) for o in report["objects"])
    assert np.allclose(origins, sorted((0.0, *c) for c in component_centroids(labels[0] > 0)[0].round(3)))

    coarse = labels.copy()
    far = ndimage.distance_transform_edt(np.pad(labels[0] == 0, 1, constant_values=False))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(far), far.shape)  # the background pixel farthest from objects and border
    assert far[y, x] > 8
    coarse[0, y - 4:y + 4, x - 4:x + 4] = 1  # a false positive of the coarse model
    p, lm, net, data = _polar_predictor(root, ds, labels, coarse, regions)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data)).numpy()
    assert p.last_timings["n_origins"] == n_objects + 1
    assert _dice(seg > 0, labels > 0) >= 0.95
    # the false positive's view predicted nothing at its origin: rejected, not an object
    assert p.last_objects["n_objects"] == n_objects and p.last_objects["n_origins_rejected"] == 1


def test_each_slice_is_fused_once_when_its_last_origin_is_in(planned_polar, monkeypatch):
    """Origins go through the polar network a batch at a time; a slice's fusion sums live only
    until its last origin is in, then the slice is fused once (no (K, Z, H, W) volume of sums): the
    same probabilities with one origin per batch (every slice's sums span batches) as with all in
    one, on two slices of several objects each."""
    import nnunet_stseg.adapters.polar_predictor as polar_module

    root, ds, _ = planned_polar
    labels = _labels(ds)
    volume = np.ascontiguousarray(np.concatenate([labels, labels[:, :, ::-1]]))  # (2, H, W)
    fused_slices = []
    fuse = polar_module.fuse_polar_slice
    monkeypatch.setattr(polar_module, "fuse_polar_slice", lambda score, *a, **k: (
        fused_slices.append(score.copy()), fuse(score, *a, **k))[1])
    outs = []
    for per_batch in (16, 1):
        p, lm, net, data = _polar_predictor(root, ds, volume, volume, regions=False)
        p._sts_config().crops_per_batch = per_batch
        outs.append(p.predict_logits_from_preprocessed_data(data))
    n_origins = p.last_timings["n_origins"]
    assert n_origins >= 4 and len(fused_slices) == 2 * 2, "each slice fused once per prediction"
    for a, b in zip(fused_slices[:2], fused_slices[2:]):
        assert np.array_equal(a, b), "a slice is fused with every origin's score in it"
    assert torch.equal(outs[0], outs[1])
    seg = lm.convert_logits_to_segmentation(outs[1]).numpy()
    for z in range(2):
        assert _dice(seg[z] > 0, volume[z] > 0) >= 0.95


def test_max_origins_override_keeps_the_largest_component(planned_polar, monkeypatch):
    """STSEG_OVERRIDES=polar.max_origins=1 (one object per slice): only the largest coarse component
    gives a polar view; a bad value is a clear error."""
    root, ds, _ = planned_polar
    labels = _labels(ds)
    cents, areas = component_centroids(labels[0] > 0)
    assert len(cents) >= 2
    monkeypatch.setenv("STSEG_OVERRIDES", "polar.max_origins=1")
    p, lm, net, data = _polar_predictor(root, ds, labels, labels, regions=False)
    p.predict_logits_from_preprocessed_data(data)
    assert p.last_timings["n_origins"] == 1
    assert np.allclose(p.origins(labels > 0)[0][0, 1:], cents[np.argmax(areas)])
    assert p.applied_overrides == {"sts.polar.max_origins": {"plans": 32, "used": 1}}
    monkeypatch.setenv("STSEG_OVERRIDES", "polar.max_origins=3")
    assert p.max_origins() == 1, "overrides are applied once, when the model's configuration is read"
    for bad, message in (("0", "max_origins must be >= 1"), ("two", "polar.max_origins='two' is not int")):
        monkeypatch.setenv("STSEG_OVERRIDES", f"polar.max_origins={bad}")
        p.sts = None  # read the configuration again, as loading a model does
        with pytest.raises(ValueError, match=message):
            p.max_origins()
    # the variable of 0.8 still works, with a deprecation warning
    monkeypatch.delenv("STSEG_OVERRIDES")
    monkeypatch.setenv(MAX_ORIGINS_ENV, "1")
    p.sts = None
    with pytest.warns(FutureWarning, match="STSEG_POLAR_MAX_ORIGINS is deprecated"):
        assert p.max_origins() == 1


def test_no_origin_keeps_the_coarse_prediction(planned_polar, capsys):
    root, ds, _ = planned_polar
    labels = _labels(ds)
    coarse = np.zeros_like(labels)
    coarse[0, 5:7, 5:20] = 1  # 2 px tall: below the 5-px rule, no origin
    p, lm, net, data = _polar_predictor(root, ds, labels, coarse, regions=False)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data)).numpy()
    assert not seg.any() and net.calls == 0
    assert p.last_timings["fallback"] == "coarse"
    assert p.last_objects["n_objects"] == 0 and p.last_objects["fallback"] == "coarse"
    assert "no origin" in capsys.readouterr().out


def test_origins_must_earn_their_place(planned_polar, monkeypatch, capsys):
    """STSEG_POLAR_MIN_CONFIDENCE: a coarse component whose mean foreground probability is below
    the threshold gives no origin (logged, recorded); when no origin of a slice is left, the slice
    keeps the coarse (Cartesian) prediction, without running the polar network."""
    root, ds, _ = planned_polar
    labels = _labels(ds)
    n_objects = len(component_centroids(labels[0] > 0)[0])
    coarse = labels.copy()
    far = ndimage.distance_transform_edt(np.pad(labels[0] == 0, 1, constant_values=False))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(far), far.shape)
    doubtful = np.zeros_like(labels, bool)
    doubtful[0, y - 4:y + 4, x - 4:x + 4] = True
    coarse[doubtful] = 1  # a false positive of the coarse model, at foreground probability 0.6

    def soft(confidence_of_objects: float):
        probs = torch.from_numpy(np.stack([coarse == c for c in range(3)]).astype(np.float32))
        objects = torch.from_numpy(coarse > 0)
        probs[0][objects], probs[1][objects], probs[2][objects] = 1 - confidence_of_objects, 0.0, 0.0
        probs[1][objects & torch.from_numpy(coarse == 1)] = confidence_of_objects
        probs[2][objects & torch.from_numpy(coarse == 2)] = confidence_of_objects
        d = torch.from_numpy(doubtful)
        probs[0][d], probs[1][d], probs[2][d] = 0.4, 0.6, 0.0
        return probs

    monkeypatch.setenv(MIN_CONFIDENCE_ENV, "0.8")
    p, lm, net, data = _polar_predictor(root, ds, labels, coarse, regions=False)
    p.coarse_probabilities = lambda d: soft(0.95)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data)).numpy()
    assert p.last_timings["n_origins"] == n_objects, "the doubtful component gave no origin"
    assert _dice(seg > 0, labels > 0) >= 0.95 and not seg[doubtful].any()
    assert "1 origin(s) below confidence 0.8 dropped" in capsys.readouterr().out
    # the objects report says so, and gives every origin's confidence
    assert p.last_objects["n_origins_below_confidence"] == 1 and p.last_objects["n_objects"] == n_objects
    assert {o["confidence"] for obj in p.last_objects["objects"] for o in obj["origins"]} == {0.95}
    assert p.applied_overrides == {"sts.polar.min_origin_confidence": {"plans": 0.0, "used": 0.8}}
    assert np.allclose(p.origins(coarse > 0, soft(0.95)[1:].sum(0).numpy())[1],
                       [0.6 if doubtful[0][int(round(cy)), int(round(cx))] else 0.95
                        for _, cy, cx in p.origins(coarse > 0)[0]], atol=1e-6)

    # nothing confident left: the slice keeps the Cartesian prediction, the polar network never runs
    p, lm, net, data = _polar_predictor(root, ds, labels, coarse, regions=False)
    p.coarse_probabilities = lambda d: soft(0.7)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data)).numpy()
    assert net.calls == 0 and p.last_timings["fallback"] == "coarse"
    assert np.array_equal(seg, coarse), "the coarse argmax, false positive included"
    assert "no origin (every origin below the confidence threshold): coarse prediction kept" in capsys.readouterr().out

    # confidence-weighted views: the same objects come back
    monkeypatch.setenv(MIN_CONFIDENCE_ENV, "0")
    monkeypatch.setenv(CONFIDENCE_WEIGHTING_ENV, "1")
    p, lm, net, data = _polar_predictor(root, ds, labels, coarse, regions=False)
    p.coarse_probabilities = lambda d: soft(0.95)
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data)).numpy()
    assert p.last_timings["n_origins"] == n_objects + 1 and _dice(seg > 0, labels > 0) >= 0.95
    monkeypatch.setenv(MIN_CONFIDENCE_ENV, "1")
    p.sts = None
    with pytest.raises(ValueError, match=f"{MIN_CONFIDENCE_ENV}='1': expected a number in"):
        p.max_origins()


def test_confidence_weights_let_a_doubtful_view_count_less():
    """Two views of one slice, each predicting an object at its own origin: counted the same,
    both objects stay; with the second view's origin at confidence 0.1 its object's score is 0.1
    of the first's, below the hysteresis threshold t2 = 0.4."""
    a, b = _ellipse((30, 40), (8, 8), (4, 4)), _ellipse((30, 40), (20, 30), (4, 4))
    views = torch.zeros((2, 2, 30, 40))
    views[0, 1], views[1, 1] = torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
    views[:, 0] = 1 - views[:, 1]
    origins = [[8, 8], [20, 30]]
    same = fuse_polar_probabilities(views, origins, multilabel=False).argmax(0).numpy() > 0
    assert np.array_equal(same, a | b)
    weighted = fuse_polar_probabilities(views, origins, multilabel=False, view_weights=[1.0, 0.1])
    assert np.array_equal(weighted.argmax(0).numpy() > 0, a)
    score, class_weights = polar_fusion_weights(views, origins, False, view_weights=[1.0, 0.1])
    assert score[1].max() == pytest.approx(0.2) and float(class_weights[1].max()) == pytest.approx(0.2)


# ----------------------------------------------------------------------------------------------
# the stock CLIs end to end
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_polar_pipeline_through_the_stock_clis(trained_2d, tmp_path, monkeypatch):
    """Coarse, centre-point and polar models trained with the stock nnUNetv2_train; the polar
    model predicted with the stock nnUNetv2_predict, origins from the coarse model and from the
    heatmap; outputs keep the input geometry; validations ran in Cartesian space (the shared
    models of ``trained_models.py``)."""
    import SimpleITK as sitk

    from nnunet_stseg.commands.cli import predict_entry

    from trained_models import NO_WORKERS, model_folder

    res = trained_2d
    assert {"polar", "polar_heatmap"} <= set(res.predictions)
    for img in sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz")):
        ref = sitk.ReadImage(str(img))
        for arm in ("polar", "polar_heatmap"):
            out = sitk.ReadImage(str(res.predictions[arm] / img.name.replace("_0000", "")))
            assert out.GetSize() == ref.GetSize() and out.GetSpacing() == ref.GetSpacing()
            assert out.GetOrigin() == ref.GetOrigin() and out.GetDirection() == ref.GetDirection()
            # what the polar stage found, next to each output: objects with their origins in the input
            report = json.loads((res.predictions[arm] / img.name.replace("_0000.nii.gz", ".objects.json"))
                                .read_text())
            assert report["n_objects"] == len(report["objects"]) and "n_origins_rejected" in report
            for obj in report["objects"]:
                assert obj["origins"] and all(a - 0.5 <= o["index"][i] <= b - 0.5 for o in obj["origins"]
                                              for i, (a, b) in enumerate(zip(obj["box"]["start"], obj["box"]["stop"])))
    fold = model_folder(res, "nnUNetTrainer_StSPolar", res.polar_config) / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert "Precision" in summary["foreground_mean"], "the whole pipeline was validated in Cartesian space"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "polar augmentation" in log and "Cascade validation complete (coarse fold model + polar stage)" in log
    # a barely trained coarse model may find nothing in a test image; then the documented fallback
    # (coarse prediction kept, logged) must be what happened, never a silent empty output
    coarse_log = (res.workdir / "logs" / "predict_polar.log").read_text()
    assert "origin(s) (coarse)" in coarse_log or "no origin (empty coarse mask" in coarse_log
    heat_log = (res.workdir / "logs" / "predict_polar_heatmap.log").read_text()
    # STSEG_OVERRIDES=polar.origin_source=heatmap replaced a plan value: logged and recorded next to the predictions;
    # =coarse is the plans' own value: nothing to record
    assert "plan values overridden by the environment: sts.polar.origin_source coarse -> heatmap" in heat_log
    record = json.loads((res.predictions["polar_heatmap"] / "nnunet_stseg_overrides.json").read_text())
    assert record == {"plan_overrides": {"sts.polar.origin_source": {"plans": "coarse", "used": "heatmap"}},
                      "variables": {"STSEG_OVERRIDES": "polar.origin_source=heatmap"}}
    assert not (res.predictions["polar"] / "nnunet_stseg_overrides.json").exists()
    assert heat_log.count("centre-point model") == 1, "the centre-point model is loaded once per run"
    assert "origin(s) (heatmap)" in heat_log or "no heatmap peak" in heat_log
    centre = json.loads((model_folder(res, "nnUNetTrainer_StSCentre", res.coarse_config) / "fold_0" / "validation"
                         / "summary_centres.json").read_text())
    assert {"precision", "recall", "f1", "median_distance_px"} <= set(centre) and centre["tp"] + centre["fn"] > 0
    assert centre["loss"] == "focal" and [row["low"] for row in centre["calibration"]] == [0.1, 0.3, 0.5, 0.7, 0.9]
    # the centre model alone is not a segmentation model: a clear error, not a garbage export
    # (nnU-Net's own predict entry point, in this process)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(k, res.env[k])
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(ValueError, match="predicts object centres") as e:
        predict_entry(["-i", str(res.dataset_folder / "imagesTs"), "-o", str(tmp_path / "centre_out"), "-d",
                       str(res.dataset_id), "-c", res.coarse_config, "-tr", "nnUNetTrainer_StSCentre", "-f", "0",
                       "-device", "cpu", *NO_WORKERS])
    assert "STSEG_OVERRIDES=polar.origin_source=heatmap" in str(e.value)
    assert not list((tmp_path / "centre_out").glob("*.nii.gz"))


def test_heatmap_origins_and_coarse_fallback_without_peaks(planned_polar, monkeypatch, capsys):
    """STSEG_OVERRIDES=polar.origin_source=heatmap: origins come from the centre model's peaks; with no peak the
    coarse prediction is kept as it is (every image counts), tiny components included."""
    root, ds, _ = planned_polar
    labels = _labels(ds)
    coarse = labels.copy()
    coarse[0, 2:4, 2:12] = 1  # a 2-px component: no origin from it either way
    monkeypatch.setenv("STSEG_OVERRIDES", "polar.origin_source=heatmap")
    p, lm, net, data = _polar_predictor(root, ds, labels, coarse, regions=False)
    p.centre = object()  # stands in for the centre model; its peaks are given below
    p.heatmap_origins = lambda data: (np.zeros((0, 3)), np.zeros(0))
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data)).numpy()
    assert np.array_equal(seg, coarse) and net.calls == 0
    assert "no origin (no heatmap peak): coarse prediction kept" in capsys.readouterr().out

    centroids = component_centroids(labels[0] > 0)[0]
    p.heatmap_origins = lambda data: (np.concatenate([np.zeros((len(centroids), 1)), centroids], axis=1),
                                      np.full(len(centroids), 0.9))
    seg = lm.convert_logits_to_segmentation(p.predict_logits_from_preprocessed_data(data)).numpy()
    assert p.last_timings["n_origins"] == len(centroids) and net.calls == 1
    assert _dice(seg > 0, labels > 0) >= 0.95 and not seg[0, 2:4, 2:12].any()
    assert "origin(s) (heatmap)" in capsys.readouterr().out
    monkeypatch.setenv("STSEG_OVERRIDES", "polar.origin_source=magic")
    p.sts = None  # the configuration is read again (as when a model is loaded): the bad value is refused
    with pytest.raises(ValueError, match="origin_source must be one of \\('coarse', 'heatmap'\\), got 'magic'"):
        p.predict_logits_from_preprocessed_data(data)


def test_peak_threshold_override_gives_the_papers_argmax_rule(planned_polar, monkeypatch):
    """A weak heatmap (peaks far below the plans' 0.5) gives no origin by default;
    STSEG_POLAR_PEAK_THRESHOLD lowers the threshold, 0 removes it, and with
    STSEG_POLAR_MAX_ORIGINS=1 each slice gets its maximum (the paper's argmax); bad values are
    clear errors."""
    from nnunet_stseg.adapters.config import CentreParams
    from nnunet_stseg.core.centres import gaussian_heatmap
    from nnunet_stseg.settings import MAX_ORIGINS_ENV, PEAK_THRESHOLD_ENV

    root, ds, _ = planned_polar
    labels = _labels(ds)
    p, _, _, data = _polar_predictor(root, ds, labels, labels, regions=False)
    shape = tuple(data.shape[2:])
    strong, weak = (shape[0] * 0.3, shape[1] * 0.3), (shape[0] * 0.7, shape[1] * 0.6)
    heat = (0.1 * gaussian_heatmap(np.array([strong]), shape, 2.0)
            + 0.06 * gaussian_heatmap(np.array([weak]), shape, 2.0))[None].expand(1, data.shape[1], *shape)

    class WeakCentre:  # same grid as the polar stage: the heatmap is read as it is
        configuration_manager = p.configuration_manager

        def predict_logits_from_preprocessed_data(self, x):
            return heat.clone()

    def set_up():  # what loading the model and its centre model does: read the plans, apply overrides
        p.sts = None
        p.centre = WeakCentre()
        p.set_centre_params(CentreParams(sigma=2.0, loss="mse"))  # the heatmap is read as it is

    set_up()
    assert len(p.heatmap_origins(data)[0]) == 0
    monkeypatch.setenv(PEAK_THRESHOLD_ENV, "0.05")
    set_up()
    assert len(p.heatmap_origins(data)[0]) == 2 * data.shape[1]
    assert p.applied_overrides["sts.centre.peak_threshold"] == {"plans": 0.5, "used": 0.05}
    monkeypatch.setenv(PEAK_THRESHOLD_ENV, "0")
    monkeypatch.setenv(MAX_ORIGINS_ENV, "1")
    set_up()
    origins, heights = p.heatmap_origins(data)
    assert len(origins) == data.shape[1]
    np.testing.assert_allclose(origins[:, 1:], np.tile(np.round(strong), (data.shape[1], 1)), atol=1)
    for bad in ("1", "-0.1", "half"):
        monkeypatch.setenv(PEAK_THRESHOLD_ENV, bad)
        with pytest.raises(ValueError, match=f"{PEAK_THRESHOLD_ENV}={bad!r}: expected a number in"):
            set_up()


def test_missing_centre_model_is_a_clear_error(planned_polar, tmp_path):
    root, ds, _ = planned_polar
    labels = _labels(ds)
    p, _, _, _ = _polar_predictor(root, ds, labels, labels, regions=False)
    missing = tmp_path / "nnUNetTrainer_StSCentre__nnUNetPlans__2d_sts_coarse_64"
    with pytest.raises(FileNotFoundError) as e:
        p.attach_centre([0], centre_folder=str(missing))
    text = str(e.value)
    assert str(missing) in text and "fold_0" in text
    assert "nnUNetv2_train" in text and "-tr nnUNetTrainer_StSCentre" in text and "STSEG_OVERRIDES=polar.origin_source=coarse" in text


def test_origin_size_rule_follows_the_cascades_size_rule_grid(planned_polar):
    """The polar stage's 5-voxel rule is the cascade's: on the full grid by default (5 px), on the
    coarse model's grid with ``sts.polar.size_rule_grid = coarse`` (5 coarse px = 20 full px when the
    coarse grid is 4 x coarser); a bad grid name is an error."""
    root, ds, _ = planned_polar
    labels = _labels(ds)
    p, _, _, _ = _polar_predictor(root, ds, labels, labels, regions=False)
    mask = np.zeros((1, 64, 64), bool)
    mask[0, 5:15, 5:15] = True  # 10 px wide
    mask[0, 30:34, 30:50] = True  # 4 px high
    assert p.origins(mask)[0][:, 1:].round(1).tolist() == [[9.5, 9.5]]
    fine = p._fine_spacing3()
    p.coarse = SimpleNamespace(configuration_manager=SimpleNamespace(spacing=[4 * v for v in fine[1:]]))
    p._sts_config().polar.size_rule_grid = "coarse"
    assert len(p.origins(mask)[0]) == 0
    mask[0, 40:62, 2:24] = True  # 22 px = 5.5 coarse px
    assert p.origins(mask)[0][:, 1:].round(1).tolist() == [[50.5, 12.5]]
    with pytest.raises(ValueError, match="size_rule_grid must be 'full' or 'coarse'"):
        PolarParams(polar_shape=(32, 32), size_rule_grid="mm")


def test_polar_case_that_does_not_fit_on_the_device_is_predicted_again_on_the_cpu(planned_polar, monkeypatch,
                                                                                   capsys):
    """The polar model shares the cascade's out-of-memory retry and ``--not_on_device``."""
    from stand_ins import assert_retried_on_the_cpu

    root, ds, _ = planned_polar
    labels = _labels(ds)
    p, lm, net, data = _polar_predictor(root, ds, labels, labels, False)
    assert_retried_on_the_cpu(monkeypatch, capsys, p, data)
