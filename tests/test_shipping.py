"""A trained cascade ships and runs like any nnU-Net model (issue 18), on the shared tiny models.

nnU-Net's own commands move it: ``nnUNetv2_export_model_to_zip`` of the fine (or polar) model
alone, ``nnUNetv2_install_pretrained_model_from_zip`` into an EMPTY results folder, then
``nnUNetv2_predict_from_modelfolder`` and the Python API; the outputs must equal the predictions
made on the training machine. The companion models travel inside the fine checkpoints
(:mod:`nnunet_stseg.adapters.bundle`). Also: what the cascade found (``<case>.objects.json``),
``nnunet-stseg bundle`` for models without embedded companions, and the one-line error when a
companion is nowhere.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_stseg.adapters.bundle import COMPANIONS_KEY
from nnunet_stseg.adapters.discovery import ENV_VAR, with_trainer_discovery
from nnunet_stseg.adapters.config import (DEFAULT_CENTRE_TRAINER, DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER,
                                          DEFAULT_POLAR_TRAINER)
from nnunet_stseg.commands.pipeline import find_command
from nnunet_stseg.settings import overrides_env

from stand_ins import fork_instead_of_spawn
from trained_models import copy_results, model_folder, strip_companions

pytestmark = pytest.mark.slow


def _run(cmd: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    program, *rest = cmd
    proc = subprocess.run([find_command(program), *rest], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
    return proc


def _install(res, tmp_path: Path, config: str, trainer: str, folds: tuple[str, ...]) -> tuple[Path, dict]:
    """Export one model with nnU-Net's command, install it into an empty results folder; returns
    the installed model folder and the environment whose nnUNet_results is that folder."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    zip_file = tmp_path / "model.zip"
    _run(["nnUNetv2_export_model_to_zip", "-d", str(res.dataset_id), "-c", config, "-tr", trainer, "-f", *folds,
          "-o", str(zip_file)], res.env)
    env = {**res.env, "nnUNet_results": str(tmp_path / "empty_results")}
    _run(["nnUNetv2_install_pretrained_model_from_zip", str(zip_file)], env)
    installed = model_folder(SimpleEnv(res, env), trainer, config)
    assert sorted(p.name for p in installed.parent.iterdir()) == [installed.name], "only the one model installed"
    return installed, env


class SimpleEnv:
    """``res`` with another environment (model_folder reads the results root from it)."""

    def __init__(self, res, env):
        self.dataset_folder, self.env = res.dataset_folder, env


def _same_segmentations(a: Path, b: Path, ending: str = ".nii.gz") -> None:
    files = sorted(a.glob(f"*{ending}"))
    assert files and [f.name for f in files] == sorted(f.name for f in b.glob(f"*{ending}"))
    for f in files:
        x, y = sitk.ReadImage(str(f)), sitk.ReadImage(str(b / f.name))
        assert np.array_equal(sitk.GetArrayFromImage(x), sitk.GetArrayFromImage(y)), f.name
        assert (x.GetSpacing(), x.GetOrigin(), x.GetDirection()) == (y.GetSpacing(), y.GetOrigin(), y.GetDirection())


def test_fine_and_polar_checkpoints_carry_their_companions(trained_2d):
    """The end of training embedded the same fold of the coarse model (and, for the polar stage,
    of the centre-point model, trained before it here) into the final and best checkpoints."""
    res = trained_2d
    for config, trainer, companions in ((res.fine_config, DEFAULT_FINE_TRAINER, {"coarse": DEFAULT_COARSE_TRAINER}),
                                        (res.polar_config, DEFAULT_POLAR_TRAINER,
                                         {"coarse": DEFAULT_COARSE_TRAINER, "centre": DEFAULT_CENTRE_TRAINER})):
        folder = model_folder(res, trainer, config)
        for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
            stored = torch.load(folder / "fold_0" / name, map_location="cpu", weights_only=False)[COMPANIONS_KEY]
            assert sorted(stored) == sorted(companions)
            for companion, companion_trainer in companions.items():
                original = torch.load(model_folder(res, companion_trainer, res.coarse_config) / "fold_0" /
                                      "checkpoint_final.pth", map_location="cpu", weights_only=False)
                assert stored[companion]["trainer_name"] == companion_trainer
                assert stored[companion]["source"]["fold"] == "0"
                for k, v in original["network_weights"].items():
                    assert torch.equal(stored[companion]["network_weights"][k], v), (companion, k)
    log = next((model_folder(res, DEFAULT_FINE_TRAINER, res.fine_config) / "fold_1").glob("training_log_*.txt"))
    assert "coarse model fold 1" in log.read_text() and "embedded in this fold's checkpoints" in log.read_text()


def test_the_exported_cascade_predicts_alone_like_on_the_training_machine(trained_2d, tmp_path, monkeypatch):
    """Fine model zip only -> empty results folder -> nnUNetv2_predict_from_modelfolder (folds 0+1,
    TTA, --save_probabilities, workers) gives the training machine's segmentations and
    probabilities, and a <case>.objects.json per case; the Python API gives the same."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    res = trained_2d
    installed, env = _install(res, tmp_path, res.fine_config, DEFAULT_FINE_TRAINER, ("0", "1"))
    out = tmp_path / "out"
    proc = _run(["nnUNetv2_predict_from_modelfolder", "-i", str(res.dataset_folder / "imagesTs"), "-o", str(out),
                 "-m", str(installed), "-f", "0", "1", "-device", "cpu", "--save_probabilities", "-npp", "1",
                 "-nps", "1"], env)
    assert "coarse model: embedded copy of" in proc.stdout
    reference = res.predictions["cascade"]
    _same_segmentations(out, reference)
    for f in sorted(out.glob("*.npz")):
        np.testing.assert_allclose(np.load(f)["probabilities"], np.load(reference / f.name)["probabilities"],
                                   atol=1e-6)
    for f in sorted(res.dataset_folder.joinpath("imagesTs").glob("*_0000.nii.gz")):
        case = f.name[:-len("_0000.nii.gz")]
        report = json.loads((out / f"{case}.objects.json").read_text())
        assert report["case"] == case and report["world_frame"] == "LPS"
        assert report["n_objects"] == len(report["objects"])
        size = sitk.ReadImage(str(f)).GetSize()[::-1]
        for obj in report["objects"]:
            assert all(0 <= lo < hi <= n for lo, hi, n in zip(obj["box"]["start"], obj["box"]["stop"], size))
            assert 0 <= obj["mean_foreground_probability"] <= 1

    # the Python API: what `eval "$(nnunet-stseg env)"` (or nnunet_stseg.ensure_trainer_discovery()) provides
    monkeypatch.setenv(ENV_VAR, with_trainer_discovery({})[ENV_VAR])
    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(installed), (0, 1))
    with fork_instead_of_spawn():
        predictor.predict_from_files(str(res.dataset_folder / "imagesTs"), str(tmp_path / "api"),
                                     save_probabilities=False, num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
    _same_segmentations(tmp_path / "api", reference)
    first = sorted(res.dataset_folder.joinpath("imagesTs").glob("*_0000.nii.gz"))[0]
    image, props = SimpleITKIO().read_images([str(first)])
    seg = predictor.predict_single_npy_array(image, props)  # (1, H, W): nnU-Net's array of a 2D image
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / first.name.replace("_0000", ""))))
    assert np.array_equal(seg.reshape(expected.shape), expected)
    assert predictor.last_objects is not None and predictor.last_objects["case"] is None
    assert predictor.last_objects == {**json.loads((out / first.name.replace("_0000.nii.gz", ".objects.json"))
                                                   .read_text()), "case": None}


def test_the_exported_polar_model_brings_its_centre_point_model(trained_2d, tmp_path):
    """Polar model zip only, heatmap origins: the centre-point model comes from the checkpoint."""
    res = trained_2d
    installed, env = _install(res, tmp_path, res.polar_config, DEFAULT_POLAR_TRAINER, ("0",))
    out = tmp_path / "out"
    proc = _run(["nnUNetv2_predict_from_modelfolder", "-i", str(res.dataset_folder / "imagesTs"), "-o", str(out),
                 "-m", str(installed), "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                {**env, **overrides_env({"polar.origin_source": "heatmap"})})
    assert "centre-point model: embedded copy of" in proc.stdout
    _same_segmentations(out, res.predictions["polar_heatmap"])


def test_the_exported_end_to_end_model_predicts_alone(trained_2d, tmp_path):
    """The end-to-end model is one network in one checkpoint: its zip is all it needs (nothing else
    in the empty results folder), and it predicts what it predicted where it was trained."""
    res = trained_2d
    installed, env = _install(res, tmp_path, res.e2e_config, "nnUNetTrainer_StSEndToEnd", ("0",))
    out = tmp_path / "out"
    _run(["nnUNetv2_predict_from_modelfolder", "-i", str(res.dataset_folder / "imagesTs"), "-o", str(out),
          "-m", str(installed), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    _same_segmentations(out, res.predictions["e2e"])


def test_the_exported_depth_cascade_predicts_alone(trained_3d, tmp_path):
    """The 2d cascade with the depth channel on 3D volumes travels the same way."""
    res = trained_3d
    installed, env = _install(res, tmp_path, res.fine_config_2d, DEFAULT_FINE_TRAINER, ("0",))
    out = tmp_path / "out"
    _run(["nnUNetv2_predict_from_modelfolder", "-i", str(res.dataset_folder / "imagesTs"), "-o", str(out),
          "-m", str(installed), "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    _same_segmentations(out, res.predictions["cascade_2d_depth"])


def test_bundle_embeds_companions_into_older_models_and_a_missing_one_is_one_line(trained_2d, tmp_path):
    """A fine model without embedded companions (trained before 0.3): alone it fails with one
    ``[nnunet-stseg] ERROR`` line naming the missing coarse model and the command that trains it
    (no traceback); ``nnunet-stseg bundle`` on the training machine embeds the coarse model, after
    which its zip predicts alone."""
    res = trained_2d
    env = copy_results(res, tmp_path)
    fine = model_folder(SimpleEnv(res, env), DEFAULT_FINE_TRAINER, res.fine_config)
    strip_companions(fine)
    bare, bare_env = _install(SimpleRes(res, env), tmp_path / "bare", res.fine_config, DEFAULT_FINE_TRAINER, ("0",))
    proc = _run(["nnUNetv2_predict_from_modelfolder", "-i", str(res.dataset_folder / "imagesTs"), "-o",
                 str(tmp_path / "fails"), "-m", str(bare), "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1",
                 "-nps", "1"], bare_env, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("[nnunet-stseg] ERROR")]
    assert len(errors) == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "coarse model" in errors[0] and f"-tr {DEFAULT_COARSE_TRAINER}" in errors[0]

    proc = _run(["nnunet-stseg", "bundle", "-d", str(res.dataset_id), "-c", res.fine_config], env)
    assert "fold_0/checkpoint_final.pth: embedded coarse" in proc.stdout
    assert "fold_1/checkpoint_best.pth: embedded coarse" in proc.stdout
    installed, new_env = _install(SimpleRes(res, env), tmp_path / "bundled", res.fine_config, DEFAULT_FINE_TRAINER,
                                  ("0",))
    _run(["nnUNetv2_predict_from_modelfolder", "-i", str(res.dataset_folder / "imagesTs"), "-o",
          str(tmp_path / "works"), "-m", str(installed), "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1",
          "-nps", "1"], new_env)
    assert sorted(p.name for p in (tmp_path / "works").glob("*.nii.gz"))


class SimpleRes:
    """``res`` whose commands run under another environment."""

    def __init__(self, res, env):
        self.dataset_folder, self.dataset_id, self.env = res.dataset_folder, res.dataset_id, env


def test_overlay_pictures_of_a_prediction_folder(trained_2d, trained_3d, tmp_path):
    """``nnunet-stseg overlay``: one PNG per case with the found objects' boxes (and the polar
    stage's origins), an index page naming each case's object count, a contact sheet; 3D volumes
    get the slice with the largest predicted area; a prediction without its image is one clear
    error."""
    from skimage.io import imread

    from nnunet_stseg.commands.overlay import overlay_folder

    for res, arm in ((trained_2d, "cascade"), (trained_2d, "polar"), (trained_3d, "cascade")):
        out = tmp_path / f"qa_{res.dataset_id}_{arm}"
        proc = _run(["nnunet-stseg", "overlay", "-i", str(res.dataset_folder / "imagesTs"), "-p",
                     str(res.predictions[arm]), "-o", str(out), "-l", str(res.dataset_folder / "labelsTs")], res.env)
        cases = sorted(f.name[:-len("_0000.nii.gz")] for f in (res.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))
        assert f"{len(cases)} picture(s)" in proc.stdout
        assert sorted(p.stem for p in out.glob("*.png")) == sorted(cases + ["index"])
        page = (out / "index.html").read_text()
        for case in cases:
            objects = json.loads((res.predictions[arm] / f"{case}.objects.json").read_text())["n_objects"]
            assert f"<td>{case}</td><td>{objects}</td>" in page
            assert imread(str(out / f"{case}.png")).ndim == 3
    empty = tmp_path / "no_images"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="the image of prediction"):
        overlay_folder(empty, trained_2d.predictions["cascade"], tmp_path / "x", progress=False)


def test_nnunet_model_selection_and_postprocessing_work_with_the_cascade(trained_2d, tmp_path):
    """nnUNetv2_find_best_configuration scores the fine model's cross-validation (the whole
    cascade's fold validations) and writes its postprocessing; nnUNetv2_apply_postprocessing runs
    on the cascade's predictions (on a copy of the shared models: these commands write into them)."""
    res = trained_2d
    env = copy_results(res, tmp_path)
    proc = _run(["nnUNetv2_find_best_configuration", str(res.dataset_id), "-c", res.fine_config, "-tr",
                 DEFAULT_FINE_TRAINER, "-f", "0", "1", "--disable_ensembling", "-np", "1"], env)
    assert f"*Best*: {DEFAULT_FINE_TRAINER}__nnUNetPlans__{res.fine_config}" in proc.stdout
    crossval = model_folder(SimpleEnv(res, env), DEFAULT_FINE_TRAINER, res.fine_config) / "crossval_results_folds_0_1"
    _run(["nnUNetv2_apply_postprocessing", "-i", str(res.predictions["cascade"]), "-o", str(tmp_path / "pp"),
          "-pp_pkl_file", str(crossval / "postprocessing.pkl"), "-np", "1", "-plans_json",
          str(crossval / "plans.json")], env)
    assert sorted(p.name for p in (tmp_path / "pp").glob("*.nii.gz")) == \
        sorted(p.name for p in res.predictions["cascade"].glob("*.nii.gz"))
