"""Reliability of prediction with our models (issue 6): bad inputs do not take the batch down,
outputs are written atomically, an interrupted prediction resumes with nnU-Net's
``--continue_prediction`` without redoing or corrupting finished cases.

The shared tiny models (``trained_models.py``: stock nnUNetv2_train, a few CPU iterations) serve
every test; accuracy is irrelevant here.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_stseg.adapters.config import DEFAULT_E2E_TRAINER, DEFAULT_LSNET_TRAINER, DEFAULT_POLAR_TRAINER
from nnunet_stseg.adapters.inference_io import (FAILED_CASES_FILE, PARTIAL_DIR, AtomicReaderWriter, _writer_tag,
                                                remove_partial_folder)
from nnunet_stseg.commands.pipeline import find_command

from trained_models import NO_WORKERS


def test_atomic_writer_leaves_nothing_when_the_write_fails(tmp_path):
    seg = np.zeros((1, 4, 5), np.uint8)
    props = {"sitk_stuff": {"spacing": (1.0, 1.0), "origin": (0.0, 0.0), "direction": (1.0, 0.0, 0.0, 1.0)},
             "spacing": [999.0, 1.0, 1.0]}
    rw = AtomicReaderWriter("SimpleITKIO")
    target = tmp_path / "case.nii.gz"
    rw.write_seg(seg, str(target), props)
    assert target.is_file() and not any((tmp_path / PARTIAL_DIR).iterdir())
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(target))).shape == (4, 5)

    class Boom(RuntimeError):
        pass

    def failing_write(seg, fname, properties):
        Path(fname).write_bytes(b"half a file")  # what a crash mid-write leaves
        raise Boom("disk full")

    rw.inner.write_seg = failing_write
    other = tmp_path / "other.nii.gz"
    with pytest.raises(Boom):
        rw.write_seg(seg, str(other), props)
    assert not other.exists(), "a half-written file took the final name"
    assert not any((tmp_path / PARTIAL_DIR).iterdir())
    remove_partial_folder(str(tmp_path))
    assert not (tmp_path / PARTIAL_DIR).exists()


def _source_image(folder: Path, io_name: str, ending: str) -> Path:
    """A small image in the format of one of nnU-Net's reader/writers, with a non-trivial spacing."""
    arr = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 7).astype(np.uint8)
    path = folder / f"img_0000{ending}"
    if io_name == "NaturalImage2DIO":
        from PIL import Image

        Image.fromarray(arr[0]).save(path)
    elif io_name == "Tiff3DIO":
        import tifffile

        tifffile.imwrite(path, arr, photometric="minisblack")
        (folder / "img_0000.json").write_text(json.dumps({"spacing": [3.0, 0.5, 0.7]}))
    else:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.7, 0.5, 3.0))
        img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
        sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("io_name,ending", [("SimpleITKIO", ".nii.gz"), ("SimpleITKIO", ".nrrd"),
                                            ("SimpleITKIO", ".mha"), ("SimpleITKIOWithReorient", ".nii.gz"),
                                            ("NibabelIO", ".nii.gz"),
                                            ("NibabelIOWithReorient", ".nii.gz"), ("Tiff3DIO", ".tif"),
                                            ("NaturalImage2DIO", ".png")])
@pytest.mark.filterwarnings("ignore:<tifffile.TiffWriter.write> data with shape:DeprecationWarning")  # nnU-Net's writer
def test_every_nnunet_writer_round_trips_through_the_atomic_writer(tmp_path, io_name, ending):
    """The atomic writer must leave exactly what nnU-Net's own writer leaves, side files included
    (Tiff3DIO writes the spacing into <stem>.json beside the image), and read back the same."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    inner = recursive_find_reader_writer_by_name(io_name)()
    src = tmp_path / "src"
    src.mkdir()
    image, props = inner.read_images([str(_source_image(src, io_name, ending))])
    seg = (image[0] > 2).astype(np.uint8)[None]
    direct, atomic = tmp_path / "direct", tmp_path / "atomic"
    direct.mkdir(), atomic.mkdir()
    inner.write_seg(seg[0], str(direct / f"case{ending}"), props)
    AtomicReaderWriter(io_name).write_seg(seg[0], str(atomic / f"case{ending}"), props)
    remove_partial_folder(str(atomic))
    assert sorted(p.name for p in atomic.iterdir()) == sorted(p.name for p in direct.iterdir())
    expected, expected_props = inner.read_seg(str(direct / f"case{ending}"))
    got, got_props = inner.read_seg(str(atomic / f"case{ending}"))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got_props["spacing"], expected_props["spacing"])
    np.testing.assert_allclose(got_props["spacing"], props["spacing"])


def test_atomic_writers_of_parallel_workers_do_not_pull_the_folder_away(tmp_path):
    """Export workers write concurrently: one finishing must not remove the temporary folder
    another one is about to write into (a race seen with nnU-Net's export pool on PNG output)."""
    seg = np.zeros((1, 4, 5), np.uint8)
    props = {"sitk_stuff": {"spacing": (1.0, 1.0), "origin": (0.0, 0.0), "direction": (1.0, 0.0, 0.0, 1.0)},
             "spacing": [999.0, 1.0, 1.0]}
    first, second = AtomicReaderWriter("SimpleITKIO"), AtomicReaderWriter("SimpleITKIO")
    inner_write = first.inner.write_seg

    def write_after_the_other_worker_finished(seg, fname, properties):
        # worker 1 has made the folder; worker 2 writes a whole case before worker 1 opens its file
        second.write_seg(seg, str(tmp_path / "b.nii.gz"), properties)
        inner_write(seg, fname, properties)

    first.inner.write_seg = write_after_the_other_worker_finished
    first.write_seg(seg, str(tmp_path / "a.nii.gz"), props)
    assert (tmp_path / "a.nii.gz").is_file() and (tmp_path / "b.nii.gz").is_file()


def test_leftovers_of_killed_writers_are_removed_and_live_writers_kept(tmp_path):
    """A writer killed mid-write leaves its temporary behind; the end of a later run removes it
    (the failure CI met: the folder stayed after a resumed run). A live writer's temporary (e.g.
    another -part writing into the same folder) and another host's are kept, and so the folder."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = tmp_path / PARTIAL_DIR
    partial.mkdir()
    tag = _writer_tag()
    killed = partial / f"{tag}{dead.pid}_case_003.nii.gz"
    live = partial / f"{tag}{os.getpid()}_case_004.nii.gz"
    elsewhere = partial / f"other-host_{dead.pid}_case_005.nii.gz"
    killed_staging = partial / f"{tag}{dead.pid}_x1y2z3"  # a staging folder (the writer of 0.2)
    killed_staging.mkdir()
    for f in (killed, live, elsewhere, killed_staging / "case_006.tif", killed_staging / "case_006.json"):
        f.write_bytes(b"half a file")
    remove_partial_folder(str(tmp_path))
    assert not killed.exists() and not killed_staging.exists() and live.exists() and elsewhere.exists()
    live.unlink()
    elsewhere.unlink()
    killed.write_bytes(b"half a file")
    remove_partial_folder(str(tmp_path))
    assert not partial.exists()


def test_checked_preprocessor_refuses_non_finite_and_wrong_channels(planned_2d):
    """Readers other than ITK's NIfTI reader (and numpy inputs) hand NaN/Inf over as they are."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.inference_io import CaseError, CheckedPreprocessor

    pm = PlansManager(planned_2d.plans)
    cm = pm.get_configuration("2d")
    pre = CheckedPreprocessor(verbose=False)
    good = np.ones((1, 1, 16, 16), np.float32)
    props = {"spacing": [999.0, 1.0, 1.0]}
    data, _, _ = pre.run_case_npy(good.copy(), None, dict(props), pm, cm, planned_2d.dataset_json)
    assert data.shape[0] == 1
    bad = good.copy()
    bad[0, 0, 2, 3], bad[0, 0, 5, 5] = np.nan, np.inf
    with pytest.raises(CaseError, match="2 NaN/Inf voxel"):
        pre.run_case_npy(bad, None, dict(props), pm, cm, planned_2d.dataset_json)
    with pytest.raises(CaseError, match="has 2 channel"):
        pre.run_case_npy(np.ones((2, 1, 16, 16), np.float32), None, dict(props), pm, cm, planned_2d.dataset_json)


def test_truncated_nifti_is_detected(tmp_path):
    from nnunet_stseg.adapters.inference_io import CaseError, check_file_complete

    arr = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    for name in ("a.nii.gz", "a.nii"):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / name))
        check_file_complete(str(tmp_path / name))
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(CaseError, match="truncated"):
            check_file_complete(str(cut))
    # what the check protects against: ITK reads the truncated file without complaint
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cut_a.nii"))).shape == arr.shape


@pytest.fixture(scope="module")
def pipeline(trained_2d):
    """The shared 2D models (one class, 'whole' fallback, 3 test images)."""
    return trained_2d


def _predict(res, inp: Path, out: Path, *extra: str, trainer="nnUNetTrainer_StSFine", config=None,
             background=False):
    cmd = [find_command("nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", str(res.dataset_id), "-c",
           config or res.fine_config, "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", *extra]
    if background:  # output to a file: a full pipe would block the process
        with open(out.parent / f"{out.name}.log", "w") as log:
            return subprocess.Popen(cmd, env=res.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.run(cmd, env=res.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _bad_batch(res, folder: Path) -> dict[str, str]:
    """The generated test images plus three bad cases; returns bad case -> expected message part."""
    folder.mkdir()
    good = sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))
    for f in good:
        shutil.copy(f, folder / f.name)
    src = good[0]
    # truncated gzip (a copy interrupted half way)
    data = src.read_bytes()
    (folder / "bad_truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    # NaN intensities: ITK's NIfTI reader itself turns them into 0 (documented), so this case is predicted
    img = sitk.ReadImage(str(src), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[3, 4] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(img)
    sitk.WriteImage(nan_img, str(folder / "nan_read_as_zero_0000.nii.gz"))
    # two channels for a one-channel model
    shutil.copy(src, folder / "bad_channels_0000.nii.gz")
    shutil.copy(src, folder / "bad_channels_0001.nii.gz")
    # a 3D volume for a model trained on 2D images
    vol = sitk.GetImageFromArray(np.ones((5, 16, 16), np.float32))
    sitk.WriteImage(vol, str(folder / "bad_3d_volume_0000.nii.gz"))
    return {"bad_truncated": "truncated", "bad_channels": "has 2 channels (files _0000 to _0001), the model expects 1",
            "bad_3d_volume": "trained on 2D images"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [("-npp", "1", "-nps", "1"), ("-npp", "0", "-nps", "0")],
                         ids=["worker_processes", "sequential"])
def test_bad_inputs_are_reported_and_the_batch_goes_on(pipeline, tmp_path, mode):
    bad = _bad_batch(pipeline, tmp_path / "in")
    out = tmp_path / "out"
    proc = _predict(pipeline, tmp_path / "in", out, *mode)
    assert proc.returncode != 0, "a batch with failed cases must not exit 0"
    good = sorted([f.name.replace("_0000", "") for f in (pipeline.dataset_folder / "imagesTs").glob("*_0000.nii.gz")]
                  + ["nan_read_as_zero.nii.gz"])
    written = sorted(f.name for f in out.glob("*.nii.gz"))
    assert written == good, proc.stdout[-3000:]
    assert not (out / PARTIAL_DIR).exists(), "the temporary-write folder was left behind"
    report = json.loads((out / FAILED_CASES_FILE).read_text())["failed_cases"]
    assert sorted(Path(r["output"]).name for r in report) == sorted(bad)
    for case, part in bad.items():
        line = next(r["error"] for r in report if Path(r["output"]).name == case)
        assert f"{case}_0000.nii.gz" in line and part in line and "\n" not in line
        # printed by the main process, so never inside another line (e.g. a progress bar)
        assert any(l.startswith("[nnunet-stseg] ERROR") and case in l for l in proc.stdout.splitlines()), \
            proc.stdout[-3000:]
    assert "3 case(s) could not be predicted" in proc.stdout
    # the run ends with its summary, not with a traceback of it
    assert "Traceback" not in proc.stdout and "BatchIncomplete" not in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["polar", "e2e", "lsnet"])
def test_bad_inputs_are_reported_for_every_model_kind(pipeline, tmp_path, kind):
    """The polar, end-to-end and L-SNet predictors share the cascade's bad-case handling: the same
    batch (nnU-Net's sequential path) gives the good cases' outputs, one line per bad case naming
    its file, the failed-cases file and a non-zero exit without a traceback."""
    config, trainer = {"polar": (pipeline.polar_config, DEFAULT_POLAR_TRAINER),
                       "e2e": (pipeline.e2e_config, DEFAULT_E2E_TRAINER),
                       "lsnet": (pipeline.lsnet_config, DEFAULT_LSNET_TRAINER)}[kind]
    bad = _bad_batch(pipeline, tmp_path / "in")
    out = tmp_path / "out"
    proc = _predict(pipeline, tmp_path / "in", out, *NO_WORKERS, trainer=trainer, config=config)
    assert proc.returncode != 0, proc.stdout[-3000:]
    good = sorted([f.name.replace("_0000", "") for f in (pipeline.dataset_folder / "imagesTs").glob("*_0000.nii.gz")]
                  + ["nan_read_as_zero.nii.gz"])
    assert sorted(f.name for f in out.glob("*.nii.gz")) == good, proc.stdout[-3000:]
    report = json.loads((out / FAILED_CASES_FILE).read_text())["failed_cases"]
    for case, part in bad.items():
        line = next(r["error"] for r in report if Path(r["output"]).name == case)
        assert f"{case}_0000.nii.gz" in line and part in line and "\n" not in line
    assert "3 case(s) could not be predicted" in proc.stdout
    assert "Traceback" not in proc.stdout and not (out / PARTIAL_DIR).exists(), proc.stdout[-3000:]


def _interrupted_and_resumed(pipeline, tmp_path, trainer: str, config: str, flags: tuple[str, ...], cases: int = 12,
                             tiles: int = 4, kill_after: int = 3) -> None:
    """Kill nnUNetv2_predict (SIGKILL, the whole process group) once ``kill_after`` of ``cases``
    outputs exist, then resume with --continue_prediction: finished cases are not redone, every
    file equals the uninterrupted run's, nothing half-written is left under a final name."""
    inp = tmp_path / "in"
    inp.mkdir()
    src = sorted((pipeline.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))
    for i in range(cases):
        # the test images tiled: long enough per case for the kill to land mid-batch (with
        # workers, the export worker starts after the network has predicted every case)
        img = sitk.ReadImage(str(src[i % len(src)]))
        sitk.WriteImage(sitk.Tile([img] * tiles ** 2, (tiles, tiles)), str(inp / f"case_{i:03d}_0000.nii.gz"))
    ref = tmp_path / "ref"  # uninterrupted, in nnU-Net's sequential path (the same outputs, cheaper)
    assert _predict(pipeline, inp, ref, *NO_WORKERS, trainer=trainer, config=config).returncode == 0
    out = tmp_path / "out"
    proc = _predict(pipeline, inp, out, *flags, trainer=trainer, config=config, background=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("*.nii.gz"))) < kill_after and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {f.name: f.stat().st_mtime_ns for f in out.glob("*.nii.gz")}
    assert 0 < len(done_before) < cases, "the kill should land mid-batch"
    for name in done_before:  # every file under a final name is complete
        with gzip.open(out / name) as f:
            f.read()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(ref / name))))
    resumed = _predict(pipeline, inp, out, *flags, "--continue_prediction", trainer=trainer, config=config)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"That's {cases - len(done_before)} cases" in resumed.stdout
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    assert sorted(f.name for f in out.glob("*.nii.gz")) == sorted(f.name for f in ref.glob("*.nii.gz"))
    assert not (out / PARTIAL_DIR).exists()
    for f in ref.glob("*.nii.gz"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f.name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(f))))


@pytest.mark.slow
def test_interrupted_prediction_resumes_without_redoing_or_corrupting(pipeline, tmp_path):
    """The kill-and-resume promise with nnU-Net's worker processes (the coarse model)."""
    _interrupted_and_resumed(pipeline, tmp_path, "nnUNetTrainer_StSCoarse", pipeline.coarse_config,
                             ("-npp", "1", "-nps", "1"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cascade", "polar", "e2e", "lsnet"])
def test_every_model_kind_resumes_an_interrupted_prediction(pipeline, tmp_path, kind):
    """The same promise for every model kind of the shared 2D set, in nnU-Net's sequential path
    (where our predictors write each case as soon as it is predicted; 6 tiled cases each)."""
    trainer, config, tiles = {"cascade": ("nnUNetTrainer_StSFine", pipeline.fine_config, 2),
                              "polar": (DEFAULT_POLAR_TRAINER, pipeline.polar_config, 2),
                              "e2e": (DEFAULT_E2E_TRAINER, pipeline.e2e_config, 4),
                              "lsnet": (DEFAULT_LSNET_TRAINER, pipeline.lsnet_config, 4)}[kind]
    _interrupted_and_resumed(pipeline, tmp_path, trainer, config, NO_WORKERS, cases=6, tiles=tiles, kill_after=2)


@pytest.fixture(scope="module")
def pipeline_3d(trained_3d):
    """The shared 3D models (two classes, 'whole' fallback); ``fine_config`` is the 3d cascade."""
    return trained_3d


def _write(arr: np.ndarray, path: Path, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def _odd_volumes(folder: Path) -> dict[str, str]:
    """Odd but valid 3D inputs; returns case -> the behaviour we expect ("predicted")."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 0.3, (24, 64, 64))
    vol[10:14, 20:30, 20:30] = 2.0
    oblique = (0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0)
    cases = {
        "one_slice": (vol[11:12], (0.9, 0.9, 2.5), None),
        "smaller_than_S": (vol[10:14, 20:28, 20:28], (0.9, 0.9, 2.5), None),
        "all_zeros": (np.zeros((24, 64, 64)), (0.9, 0.9, 2.5), None),
        "oblique": (vol, (0.9, 0.9, 2.5), oblique),
        "extreme_anisotropy": (vol[:, ::2, ::2], (0.3, 0.3, 12.0), None),
        "object_on_every_border": (np.full((24, 64, 64), 2.0), (0.9, 0.9, 2.5), None),
    }
    for name, (arr, spacing, direction) in cases.items():
        _write(arr, folder / f"{name}_0000.nii.gz", spacing, (5.0, -3.0, 7.0), direction)
    return {name: "predicted" for name in cases}


@pytest.mark.slow
def test_odd_3d_volumes_are_predicted_with_their_geometry(pipeline_3d, tmp_path):
    cases = _odd_volumes(tmp_path / "in")
    out = tmp_path / "out"
    proc = _predict(pipeline_3d, tmp_path / "in", out, "-npp", "1", "-nps", "1")
    assert proc.returncode == 0, proc.stdout[-4000:]
    for name in cases:
        img = sitk.ReadImage(str(tmp_path / "in" / f"{name}_0000.nii.gz"))
        pred = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert pred.GetSize() == img.GetSize(), name
        # NIfTI stores an oblique direction as a float32 quaternion: a write/read round trip moves it ~1e-7
        for a, b in ((pred.GetSpacing(), img.GetSpacing()), (pred.GetOrigin(), img.GetOrigin()),
                     (pred.GetDirection(), img.GetDirection())):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
    zeros = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "all_zeros.nii.gz")))
    assert zeros.min() >= 0 and zeros.max() <= 2  # a label map of the two-class model
    assert not (out / FAILED_CASES_FILE).exists()


@pytest.mark.slow
def test_bad_volumes_are_reported_for_the_depth_cascade(pipeline_3d, tmp_path):
    """The 2d cascade with the depth channel on 3D volumes keeps the promises of the bad-input
    batch: a truncated volume, two channels for a one-channel model and a 2D image are each one
    line naming the file; the good volumes are written; exit non-zero without a traceback."""
    res = pipeline_3d
    inp = tmp_path / "in"
    inp.mkdir()
    good = sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))
    for f in good:
        shutil.copy(f, inp / f.name)
    data = good[0].read_bytes()
    (inp / "bad_truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    shutil.copy(good[0], inp / "bad_channels_0000.nii.gz")
    shutil.copy(good[0], inp / "bad_channels_0001.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((32, 32), np.float32)), str(inp / "bad_flat_0000.nii.gz"))
    out = tmp_path / "out"
    proc = _predict(res, inp, out, *NO_WORKERS, config=res.fine_config_2d)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert sorted(f.name for f in out.glob("*.nii.gz")) == sorted(f.name.replace("_0000", "") for f in good)
    report = {Path(r["output"]).name: r["error"] for r in json.loads((out / FAILED_CASES_FILE).read_text())["failed_cases"]}
    expected = {"bad_truncated": "truncated", "bad_channels": "has 2 channels (files _0000 to _0001), the model expects 1",
                "bad_flat": "is a 2D image; this model was trained on 3D volumes"}
    assert sorted(report) == sorted(expected), report
    for case, part in expected.items():
        assert f"{case}_0000.nii.gz" in report[case] and part in report[case] and "\n" not in report[case], report[case]
    assert "3 case(s) could not be predicted" in proc.stdout
    assert "Traceback" not in proc.stdout and not (out / PARTIAL_DIR).exists(), proc.stdout[-3000:]


@pytest.mark.slow
def test_2d_image_given_to_a_3d_model_is_a_clear_error(pipeline_3d, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    good = sorted((pipeline_3d.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))[0]
    shutil.copy(good, inp / good.name)
    img2d = sitk.GetImageFromArray(np.ones((32, 32), np.float32))
    sitk.WriteImage(img2d, str(inp / "flat_2d_0000.nii.gz"))
    out = tmp_path / "out"
    proc = _predict(pipeline_3d, inp, out, *NO_WORKERS)  # the worker path: test_odd_3d_volumes_...
    assert proc.returncode != 0
    assert (out / good.name.replace("_0000", "")).is_file()
    report = json.loads((out / FAILED_CASES_FILE).read_text())["failed_cases"]
    assert [Path(r["output"]).name for r in report] == ["flat_2d"]
    assert "flat_2d_0000.nii.gz: is a 2D image; this model was trained on 3D volumes" in report[0]["error"]


@pytest.mark.slow
def test_interrupted_fine_training_resumes_with_c(pipeline, tmp_path):
    """Kill nnUNetv2_train (our fine trainer, its own crop loader) after its first resumable
    checkpoint, then resume with --c: training continues from the checkpoint's epoch (not from 0),
    finishes, and no temporary or truncated checkpoint is left. (Into a results folder of its own:
    the shared models stay as they are.)"""
    res = pipeline
    env = {**res.env, "STSEG_NUM_EPOCHS": "12", "STSEG_ITERS_PER_EPOCH": "2", "STSEG_VAL_ITERS": "1",
           "STSEG_SAVE_EVERY": "1", "nnUNet_results": str(tmp_path / "results")}
    cmd = [find_command("nnUNetv2_train"), str(res.dataset_id), res.fine_config, "1", "-tr", "nnUNetTrainer_StSFine",
           "-device", "cpu"]
    fold = Path(env["nnUNet_results"]) / res.dataset_folder.name / \
        f"nnUNetTrainer_StSFine__nnUNetPlans__{res.fine_config}" / "fold_1"
    with open(tmp_path / "train_interrupted.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (fold / "checkpoint_latest.pth").is_file() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # let it get into the next epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    import torch

    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    start_epoch = latest["current_epoch"]
    assert 1 <= start_epoch < 12 and not (fold / "checkpoint_final.pth").exists()
    resumed = subprocess.run(cmd + ["--c"], env={**env, "STSEG_SKIP_VALIDATION": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "final validation skipped (STSEG_SKIP_VALIDATION=1)" in resumed.stdout
    assert not (fold / "validation" / "summary.json").exists()
    logs = sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    epochs = [int(line.split("Epoch ")[1]) for line in logs[-1].read_text().splitlines()
              if ": Epoch " in line and line.split("Epoch ")[1].strip().isdigit()]
    assert epochs and epochs[0] >= start_epoch, f"resumed at epoch {epochs[:1]}, checkpoint had {start_epoch}"
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 12
    assert not list(fold.glob(".tmp_*"))


@pytest.mark.parametrize("reader,channels,message", [
    ("SimpleITKIO", 2, "has 2 channels (files _0000 to _0001), the model expects 1 (file _0000)"),
    ("NaturalImage2DIO", 3, "has 3 channels (an RGB image), the model expects 1 (a greyscale image; a PNG/JPEG/BMP "
                            "carries its colour channels in one file)")])
def test_a_wrong_channel_count_is_worded_for_the_reader(planned_2d, reader, channels, message):
    """The check runs in the preprocessor our predictors use, with the plans manager they use (whose
    reader class is a wrapper of the plans' reader): the message names channels as that reader
    stores them."""
    from nnunet_stseg.adapters.inference_io import CaseError, CheckedPreprocessor, PluginPlansManager
    from nnunet_stseg.adapters.config import fine_config_name

    plans = {**planned_2d.plans, "image_reader_writer": reader}
    pm = PluginPlansManager(plans)
    cm = pm.get_configuration(fine_config_name("2d", planned_2d.size))
    data = np.zeros((channels, 1, 16, 16), np.float32)
    properties = {"spacing": [999.0, 1.0, 1.0], "shape_before_cropping": data.shape[1:]}
    with pytest.raises(CaseError) as e:
        CheckedPreprocessor(verbose=False).run_case_npy(data, None, properties, pm, cm, planned_2d.dataset_json)
    assert str(e.value) == message
