"""The export's slab-by-slab label manager: the label maps and probabilities nnU-Net's own
``LabelManager`` gives, without its whole-volume int64 argmax."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_stseg.adapters import inference_io
from nnunet_stseg.adapters.inference_io import PluginPlansManager, SlabwiseLabelManager
from nnunet_stseg.adapters.predictor import _glibc_trim

LABELS = {"background": 0, "a": 1, "b": 2}
REGIONS = ({"background": 0, "whole": [1, 2], "core": 2}, [1, 2])


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of a few slices, so that every conversion below crosses many slab borders."""
    monkeypatch.setattr(inference_io, "SLAB_VOXELS", 3 * 7 * 5 * 2)


def _logits(shape, k=3, seed=0, ties=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (k, *shape), generator=g).float() if ties else torch.randn((k, *shape), generator=g)
    return x.half()


@pytest.mark.parametrize("as_numpy", [False, True])
@pytest.mark.parametrize("labels", [LABELS, REGIONS], ids=["labels", "regions"])
def test_same_label_map_and_probabilities_as_nnunets(small_slabs, as_numpy, labels):
    label_dict, order = labels if isinstance(labels, tuple) else (labels, None)
    ours, theirs = SlabwiseLabelManager(label_dict, order), LabelManager(label_dict, order)
    # integer logits: many ties, decided as nnU-Net decides them
    logits = _logits((11, 7, 5), k=theirs.num_segmentation_heads)
    given = logits.numpy() if as_numpy else logits
    seg, ref = ours.convert_logits_to_segmentation(given), theirs.convert_logits_to_segmentation(given)
    assert np.asarray(seg).dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(seg), np.asarray(ref))
    probs, ref_probs = ours.apply_inference_nonlin(given), theirs.apply_inference_nonlin(given)
    assert probs.dtype == torch.float32 and probs.shape == ref_probs.shape
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(ours.convert_probabilities_to_segmentation(probs)),
                                  np.asarray(theirs.convert_probabilities_to_segmentation(ref_probs)))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_first_largest_logit_wins_ties_and_nan_as_in_numpy(small_slabs, k):
    """The comparison path gives ``np.argmax``'s label map: ties go to the first class, and a slab
    with NaN goes to nnU-Net's own argmax (which counts NaN as the largest)."""
    labels = {"background": 0, **{f"c{i}": i for i in range(1, k)}}
    logits = _logits((9, 7, 5), k=k, seed=k)  # integers in [-2, 2]: ties everywhere
    logits[k - 1, 4, 3, 2] = float("nan")
    seg = SlabwiseLabelManager(labels, None).convert_logits_to_segmentation(logits.numpy())
    np.testing.assert_array_equal(seg, logits.numpy().argmax(0))
    assert seg[4, 3, 2] == k - 1


def test_more_than_254_labels_are_uint16(small_slabs):
    label_dict = {"background": 0, **{f"l{i}": i for i in range(1, 300)}}
    logits = _logits((4, 3, 2), k=300, ties=False)
    seg = SlabwiseLabelManager(label_dict, None).convert_logits_to_segmentation(logits)
    assert seg.dtype == np.uint16
    np.testing.assert_array_equal(seg, logits.float().argmax(0).numpy())


def test_no_whole_volume_int64_argmax(monkeypatch):
    """nnU-Net's conversion allocates 8 bytes per voxel on the host (its int64 argmax), ours one
    (the uint8 label map) plus a slab."""
    monkeypatch.setattr(inference_io, "SLAB_VOXELS", 2 * 4 * 64 * 64)  # 4 slices of the 64 below
    logits = _logits((64, 64, 64), k=2, ties=False).numpy()
    voxels = logits[0].size

    def traced_peak(manager):
        tracemalloc.start()
        manager.convert_logits_to_segmentation(logits)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    two = {"background": 0, "a": 1}
    assert traced_peak(LabelManager(two, None)) >= 8 * voxels
    assert traced_peak(SlabwiseLabelManager(two, None)) <= voxels + 8 * inference_io.SLAB_VOXELS


def test_plugin_plans_use_it_and_export_writes_the_same_file(tmp_path, small_slabs):
    """nnU-Net's export through our plans manager writes the file its own plans manager writes."""
    plans = {"dataset_name": "Dataset001_X", "plans_name": "p", "original_median_spacing_after_transp": [1, 1, 1],
             "original_median_shape_after_transp": [9, 8, 7], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": {"data_identifier": "d", "preprocessor_name": "DefaultPreprocessor",
                                               "spacing": [1.0, 1.0, 1.0], "patch_size": [8, 8, 8],
                                               "architecture": {"network_class_name": "unused", "arch_kwargs": {},
                                                                "_kw_requires_import": []},
                                               "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                                               "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1,
                                                                                      "order_z": 0,
                                                                                      "force_separate_z": None}}},
             "foreground_intensity_properties_per_channel": {}}
    dataset_json = {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": 1}
    props = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": (9, 8, 7),
             "shape_after_cropping_and_before_resampling": (9, 8, 6),
             "bbox_used_for_cropping": [[0, 9], [0, 8], [1, 7]],
             "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                            "direction": tuple(np.eye(3).ravel())}}
    ours = PluginPlansManager(plans)
    assert isinstance(ours.get_label_manager(dataset_json), SlabwiseLabelManager)
    logits = _logits((9, 8, 6)).numpy()
    written = {}
    for name, pm in (("ours", ours), ("nnunet", PlansManager(plans))):
        cm = pm.get_configuration("3d_fullres")
        export_prediction_from_logits(logits.copy(), props, cm, pm, dataset_json, str(tmp_path / name), False)
        written[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}.nii.gz")))
    np.testing.assert_array_equal(written["ours"], written["nnunet"])
    assert written["ours"][..., 0].max() == 0 and written["ours"].max() == 2  # the cropped-away border is background


@pytest.mark.parametrize("as_numpy", [False, True])
@pytest.mark.parametrize("labels", [LABELS, REGIONS], ids=["labels", "regions"])
def test_uncropped_probabilities_are_not_copied(as_numpy, labels):
    """nnU-Net allocates a second K x volume array to put the probabilities back into the
    uncropped image; for a case that was not cropped ours returns the same array (the same values),
    and a cropped case still gets nnU-Net's copy with the background around it."""
    label_dict, order = labels if isinstance(labels, tuple) else (labels, None)
    ours, theirs = SlabwiseLabelManager(label_dict, order), LabelManager(label_dict, order)
    probs = ours.apply_inference_nonlin(_logits((6, 5, 4), k=theirs.num_segmentation_heads, ties=False))
    probs = probs.numpy() if as_numpy else probs
    whole = [[0, 6], [0, 5], [0, 4]]
    kept = ours.revert_cropping_on_probabilities(probs, whole, (6, 5, 4))
    assert kept is probs
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(theirs.revert_cropping_on_probabilities(probs, whole,
                                                                                                       (6, 5, 4))))
    cropped = [[1, 7], [0, 5], [2, 6]]
    out, ref = (ours.revert_cropping_on_probabilities(probs, cropped, (8, 5, 7)),
                theirs.revert_cropping_on_probabilities(probs, cropped, (8, 5, 7)))
    assert out is not probs and tuple(out.shape) == (len(probs), 8, 5, 7)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_release_freed_heap_returns_retained_pages_to_the_system():
    """Arrays of a few MiB freed in the middle of glibc's heap stay resident until
    ``release_freed_heap`` (the pattern the geometry makes with many objects) for a case of
    ``TRIM_MIN_VOXELS`` or more; for a small case it does nothing (the trim costs about 1 ms); in
    a fresh process."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or _glibc_trim() is None:
        pytest.skip("glibc's malloc_trim only")
    code = (
        "import numpy as np\n"
        "from nnunet_stseg.adapters.predictor import release_freed_heap\n"
        "from benchmarks.benchmark import _status_mb\n"
        "def rss():\n"
        "    return int(_status_mb('VmRSS'))\n"
        "big = np.ones(30 << 20, np.uint8); del big  # glibc raises its mmap threshold past 30 MiB\n"
        "parts = [np.ones(1 << 20, np.uint8) for _ in range(200)]  # 200 MiB on the heap\n"
        "keep = parts[-1]; del parts  # the last one holds the heap's top: nothing below it is trimmed on free\n"
        "before = rss(); release_freed_heap(1024 ** 2); small = rss()  # a 2D case: not worth a trim\n"
        "release_freed_heap(64 * 512 ** 2); print(before, small, rss())  # a 3D case above TRIM_MIN_VOXELS\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, small, after = (int(v) for v in out)
    assert before - small < 20, (before, small)
    assert before - after > 150, (before, after)
