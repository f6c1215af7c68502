"""End to end through the STOCK nnU-Net commands on tiny generated datasets (CPU, minutes).

plan (nnunet-stseg plan) -> nnUNetv2_train coarse + fine -> nnUNetv2_predict (the shared models
of ``trained_models.py``, trained once per run), then check the outputs' files and geometry
against the inputs, the fold validation summaries (whole-cascade Dice, precision, recall),
nnU-Net's prediction flags and the errors for missing pieces. Accuracy is not asserted: a few CPU
iterations do not make a model.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_stseg.commands.pipeline import find_command

from trained_models import NO_WORKERS, ONE_WORKER, copy_results, model_folder, strip_companions

pytestmark = pytest.mark.slow


def _geometry(img: sitk.Image) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _predict(res, out: Path, *extra: str, config=None, trainer="nnUNetTrainer_StSFine", folds=("0",),
             command="nnUNetv2_predict", check=True, env=None, cores=None) -> subprocess.CompletedProcess:
    program, *subcommand = command.split()
    cmd = [find_command(program), *subcommand,
           *_predict_args(res, out, *extra, config=config, trainer=trainer, folds=folds)]
    limit = (lambda: os.sched_setaffinity(0, cores)) if cores else None  # noqa: E731
    proc = subprocess.run(cmd, env=env or res.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=limit)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
    return proc


def _predict_args(res, out: Path, *extra: str, config=None, trainer="nnUNetTrainer_StSFine",
                  folds=("0",)) -> list[str]:
    return ["-i", str(res.dataset_folder / "imagesTs"), "-o", str(out), "-d", str(res.dataset_id), "-c",
            config or res.fine_config, "-tr", trainer, "-f", *folds, "-device", "cpu", *extra]


def _assert_outputs_match_inputs(res, out: Path, labels: set[int]) -> None:
    inputs = sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))
    assert inputs
    for f in inputs:
        case = f.name[: -len("_0000.nii.gz")]
        pred_file = out / f"{case}.nii.gz"
        assert pred_file.is_file(), f"missing prediction {pred_file}"
        img, pred = sitk.ReadImage(str(f)), sitk.ReadImage(str(pred_file))
        assert _geometry(pred) == _geometry(img), f"{pred_file}: geometry differs from its input"
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= labels


@pytest.fixture(scope="module")
def pipeline_2d(trained_2d):
    """The shared 2D models: cascade predicted with folds 0+1, TTA, --save_probabilities, workers."""
    return trained_2d


def test_2d_outputs_geometry_and_probabilities(pipeline_2d):
    res = pipeline_2d
    _assert_probabilities_give_the_segmentations(res, res.predictions["cascade"])


def _assert_probabilities_give_the_segmentations(res, out: Path) -> None:
    """``--save_probabilities`` outputs: per case 2 x 1 x image probabilities summing to 1 whose
    argmax is the exported segmentation (with the inputs' geometry), and the properties pickle."""
    _assert_outputs_match_inputs(res, out, {0, 1})
    for f in sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz")):
        case = f.name[: -len("_0000.nii.gz")]
        probs = np.load(out / f"{case}.npz")["probabilities"]
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        assert probs.shape == (2, 1, *img.shape)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
        assert np.array_equal(np.argmax(probs, 0)[0], seg)
        with open(out / f"{case}.pkl", "rb") as fh:
            assert isinstance(pickle.load(fh), dict)


def test_end_to_end_model_through_the_stock_clis(pipeline_2d):
    """Issue 19: ``nnUNetv2_train ... -tr nnUNetTrainer_StSEndToEnd`` started from the coarse fold
    model, validated the whole model at full resolution; ``nnUNetv2_predict`` wrote segmentations
    with the inputs' geometry and probabilities whose argmax they are; one model folder, no
    companion."""
    import json

    res = pipeline_2d
    _assert_probabilities_give_the_segmentations(res, res.predictions["e2e"])
    fold_dir = model_folder(res, "nnUNetTrainer_StSEndToEnd", res.e2e_config) / "fold_0"
    log = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
    assert "both modules initialised from the coarse model" in log and "End-to-end validation complete" in log
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert {"Dice", "Precision", "Recall"} <= set(summary["foreground_mean"]) and summary["metric_per_case"]
    import torch
    weights = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert any(k.startswith("coarse.") for k in weights) and any(k.startswith("fine.") for k in weights)
    predict_log = (res.workdir / "logs" / "predict_e2e.log").read_text()
    assert "end-to-end model:" in predict_log and "coarse model:" not in predict_log  # one model, no companion


def test_lsnet_through_the_stock_clis(pipeline_2d):
    """Issue 20: ``nnUNetv2_train -tr nnUNetTrainer_StSLNet`` (L-Net; S-Net = the fine fold model,
    untouched) then ``-tr nnUNetTrainer_StSLSNet`` (joint, from that model, validated at full
    resolution); ``nnUNetv2_predict`` wrote segmentations with the inputs' geometry and
    probabilities whose argmax they are, from one checkpoint."""
    import json

    import torch

    res = pipeline_2d
    _assert_probabilities_give_the_segmentations(res, res.predictions["lsnet"])
    lnet_dir = model_folder(res, "nnUNetTrainer_StSLNet", res.lsnet_config) / "fold_0"
    lsnet_dir = model_folder(res, "nnUNetTrainer_StSLSNet", res.lsnet_config) / "fold_0"
    log = "".join(p.read_text() for p in lnet_dir.glob("training_log_*.txt"))
    assert "L-Net's encoder-decoder initialised from the coarse model" in log and "S-Net is the cascade's fine" in log
    assert "trains L-Net only (S-Net frozen)" in log

    def load(fold_dir):
        return torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]

    fine = load(model_folder(res, "nnUNetTrainer_StSFine", res.fine_config) / "fold_0")
    lnet = load(lnet_dir)
    assert all(torch.equal(lnet[f"segmenter.{k}"], v) for k, v in fine.items())  # the frozen S-Net
    log = "".join(p.read_text() for p in lsnet_dir.glob("training_log_*.txt"))
    assert "L-SNet initialised from the L-Net model" in log and "L-SNet validation complete" in log
    summary = json.loads((lsnet_dir / "validation" / "summary.json").read_text())
    assert {"Dice", "Precision", "Recall"} <= set(summary["foreground_mean"]) and summary["metric_per_case"]
    lsnet = load(lsnet_dir)
    assert any(not torch.equal(lsnet[k], v) for k, v in lnet.items() if k.startswith("segmenter."))  # trained jointly
    assert "L-SNet:" in (res.workdir / "logs" / "predict_lsnet.log").read_text()


def test_2d_fold_validation_reports_cascade_metrics(pipeline_2d):
    res = pipeline_2d
    import json

    for fold in (0, 1):
        fold_dir = model_folder(res, "nnUNetTrainer_StSFine", res.fine_config) / f"fold_{fold}"
        summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
        for key in ("Dice", "IoU", "Precision", "Recall"):
            assert key in summary["foreground_mean"]
        assert summary["metric_per_case"], "no validation case was scored"
        log = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
        assert "Cascade validation complete" in log and "cascade validation" in log
    m = res.metrics["cascade"]
    assert {"Dice", "Precision", "Recall"} <= set(m)


def test_own_predict_command_matches_stock_bit_for_bit(pipeline_2d, tmp_path):
    """Also: two runs on the same inputs give identical outputs, and inputs are never modified."""
    import hashlib

    res = pipeline_2d
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                      for p in (res.dataset_folder / "imagesTs").iterdir()}
    inputs_before = digest()
    a, b = tmp_path / "stock", tmp_path / "own"
    _predict(res, a, "--disable_tta", "-npp", "0", "-nps", "0", folds=("0", "1"))
    _predict(res, b, "--disable_tta", "-npp", "0", "-nps", "0", folds=("0", "1"), command="nnunet-stseg predict")
    for f in sorted(a.glob("*.nii.gz")):
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(b / f.name)))
        assert np.array_equal(x, y), f"{f.name}: our command and nnUNetv2_predict disagree"
    assert digest() == inputs_before


@pytest.mark.parametrize("mode", ["workers", "in_process", "auto_on_one_core"])
def test_continue_prediction_and_parts(pipeline_2d, tmp_path, mode):
    """-num_parts/-part_id and --continue_prediction with nnU-Net's worker processes (one each), in
    the command's own process (``STSEG_PREDICT_IN_PROCESS=1``: the parts are kept, which nnU-Net's
    own sequential path ignores; same label maps as the worker path), and with ``auto`` where the
    command may use one core only (in process: the CPU device with at most 2 usable cores)."""
    res = pipeline_2d
    setting = {"workers": "0", "in_process": "1", "auto_on_one_core": "auto"}[mode]
    env = {**res.env, "STSEG_PREDICT_IN_PROCESS": setting}
    cores = {min(os.sched_getaffinity(0))} if mode == "auto_on_one_core" else None
    in_process = mode != "workers"
    out = tmp_path / "parts"
    cases = sorted(f.name[: -len("_0000.nii.gz")] for f in (res.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))
    proc = _predict(res, out, "--disable_tta", *ONE_WORKER, "-num_parts", "2", "-part_id", "0", env=env, cores=cores)
    first = sorted(p.name for p in out.glob("*.nii.gz"))
    assert 0 < len(first) < len(cases), "part 0 of 2 should predict a strict subset"
    assert (f"predicting {len(first)} case(s) in this process" in proc.stdout) == in_process, proc.stdout[-2000:]
    _predict(res, out, "--disable_tta", *ONE_WORKER, "-num_parts", "2", "-part_id", "1", env=env, cores=cores)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [c + ".nii.gz" for c in cases]
    _assert_outputs_match_inputs(res, out, {0, 1})
    if mode == "in_process":
        workers = tmp_path / "workers"
        _predict(res, workers, "--disable_tta", *ONE_WORKER, env={**res.env, "STSEG_PREDICT_IN_PROCESS": "0"})
        for f in sorted(workers.glob("*.nii.gz")):
            assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(f))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(out / f.name)))), f.name

    # --continue_prediction redoes only what is missing
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    removed = out / f"{cases[0]}.nii.gz"
    removed.unlink()
    proc = _predict(res, out, "--disable_tta", *ONE_WORKER, "--continue_prediction", env=env, cores=cores)
    assert removed.is_file()
    for name, t in mtimes.items():
        if name != removed.name:
            assert (out / name).stat().st_mtime_ns == t, f"{name} was predicted again"
    assert proc.stdout.count("object(s) cropped") + proc.stdout.count("fallback") == 1


def test_a_full_resolution_model_keeps_the_workers_on_one_core(pipeline_2d, tmp_path):
    """``auto`` predicts in process only for models with small networks: the coarse model alone (a
    plain nnU-Net network over the whole image) keeps nnU-Net's workers even on one usable core."""
    res = pipeline_2d
    env = {**res.env, "STSEG_PREDICT_IN_PROCESS": "auto"}
    proc = _predict(res, tmp_path / "coarse", "--disable_tta", *ONE_WORKER, config=res.coarse_config,
                    trainer="nnUNetTrainer_StSCoarse", env=env, cores={min(os.sched_getaffinity(0))})
    assert "in this process" not in proc.stdout
    assert len(list((tmp_path / "coarse").glob("*.nii.gz"))) == len(list((res.dataset_folder / "imagesTs").iterdir()))


def test_missing_coarse_model_is_a_clear_error(pipeline_2d, tmp_path, monkeypatch):
    """A missing coarse fold (in-process, through nnU-Net's own predict entry point) and a missing
    coarse model folder (the stock CLI: non-zero exit, the message on its output), on a copy of
    the trained models whose fine checkpoints carry no embedded coarse model (trained before 0.3)."""
    from nnunet_stseg.commands.cli import predict_entry

    res = pipeline_2d
    env = copy_results(res, tmp_path)
    coarse = Path(env["nnUNet_results"]) / res.dataset_folder.name / \
        f"nnUNetTrainer_StSCoarse__nnUNetPlans__{res.coarse_config}"
    strip_companions(model_folder(SimpleNamespace(dataset_folder=res.dataset_folder, env=env), "nnUNetTrainer_StSFine",
                                  res.fine_config))
    shutil.rmtree(coarse / "fold_1")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(FileNotFoundError) as e:
        predict_entry(_predict_args(res, tmp_path / "a", "--disable_tta", *NO_WORKERS, folds=("0", "1")))
    assert "fold_1" in str(e.value) and "nnUNetv2_train" in str(e.value) and res.coarse_config in str(e.value)
    assert not list((tmp_path / "a").glob("*.nii.gz"))
    shutil.rmtree(coarse)
    proc = _predict(res, tmp_path / "b", "--disable_tta", *NO_WORKERS, check=False, env=env)
    assert proc.returncode != 0
    assert str(coarse) in proc.stdout and "-tr nnUNetTrainer_StSCoarse" in proc.stdout


@pytest.mark.parametrize("arm", ["cascade", "cascade_2d_depth"], ids=["3d_pipeline", "2d_pipeline_with_depth"])
def test_3d_data_end_to_end(trained_3d, arm):
    """3D (anisotropic, oblique direction), two-class data through the 3d pipeline and through
    the 2d pipeline slice by slice (with the depth channel). 'whole' fallback so the fine network
    runs even when the barely trained coarse model finds nothing."""
    res = trained_3d
    _assert_outputs_match_inputs(res, res.predictions[arm], {0, 1, 2})
    log = (res.workdir / "logs" / f"predict_{arm}.log").read_text()
    assert "object(s) cropped" in log or "fallback 'whole'" in log
    assert {"Dice", "Precision", "Recall"} <= set(res.metrics[arm])


def _ddp_validation_worker(rank: int, world: int, env: dict, dataset_id: str, config: str, port: int) -> None:
    """One rank: our fine trainer under torch.distributed (gloo, CPU) runs its cascade validation
    and draws crops. nnU-Net's own launcher hard-codes NCCL/CUDA, so the trainer is set up by hand
    the way run_ddp does, with DDP on CPU."""
    import json

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from nnunetv2.run.run_training import get_trainer_from_args

        trainer = get_trainer_from_args(dataset_id, config, 0, "nnUNetTrainer_StSFine", "nnUNetPlans",
                                        device=torch.device("cpu"))
        assert trainer.is_ddp and trainer.local_rank == rank
        trainer.device = torch.device("cpu")  # nnU-Net forces cuda under DDP
        trainer.is_ddp = False
        trainer.initialize()
        trainer.is_ddp = True
        trainer.network = DDP(trainer.network)
        trainer.load_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
        trainer.perform_actual_validation()

        # each rank's crop sampler draws its own crops (no state shared through rank 0)
        import numpy as np
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from nnunet_stseg.trainers.sts_trainers import StSCropDataLoader

        np.random.seed(None)  # what each spawned rank / augmentation worker starts from
        ds = infer_dataset_class(trainer.preprocessed_dataset_folder)(trainer.preprocessed_dataset_folder)
        dl = StSCropDataLoader(ds, 4, trainer.configuration_manager.patch_size,
                               trainer.configuration_manager.patch_size, trainer.label_manager, trainer.sts.crop,
                               trainer._spacing3())
        batch = dl.generate_train_batch()
        gathered = [None] * world
        dist.all_gather_object(gathered, batch["data"].numpy().tobytes())
        if rank == 0:
            with open(os.path.join(trainer.output_folder, "ddp_test.json"), "w") as f:
                json.dump({"batches_differ": gathered[0] != gathered[1]}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_cascade_validation_on_cpu_gloo(pipeline_2d, tmp_path):
    import json
    import shutil
    import socket

    import torch.multiprocessing as tmp

    res = pipeline_2d
    env = copy_results(res, tmp_path)  # the validation is redone in place
    fold_dir = Path(env["nnUNet_results"]) / res.dataset_folder.name / \
        f"nnUNetTrainer_StSFine__nnUNetPlans__{res.fine_config}" / "fold_0"
    before = json.loads((fold_dir / "validation" / "summary.json").read_text())
    shutil.rmtree(fold_dir / "validation")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_ddp_validation_worker, args=(2, env, str(res.dataset_id), res.fine_config, port), nprocs=2, join=True)
    after = json.loads((fold_dir / "validation" / "summary.json").read_text())
    cases = lambda s: sorted(c["prediction_file"].rsplit("/", 1)[-1] for c in s["metric_per_case"])
    assert cases(after) == cases(before), "the two ranks together must validate every case once"
    assert "Precision" in after["foreground_mean"]
    assert after["foreground_mean"]["Dice"] == pytest.approx(before["foreground_mean"]["Dice"], abs=1e-6)
    assert json.loads((fold_dir / "ddp_test.json").read_text())["batches_differ"]


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_label_maps_without_probabilities_equal_those_with(request, tmp_path, dims):
    """Without --save_probabilities the cascade builds the label map from its crops (no full-size
    probability canvas; its stage line shows the conversion 'to labels'): the same label maps, byte
    for byte, as with --save_probabilities (2D: folds 0+1 with TTA against the shared run with worker
    processes; 3D: two classes, anisotropic, oblique, both runs here)."""
    res = request.getfixturevalue("pipeline_2d" if dims == "2d" else "trained_3d")
    env = {**res.env, "STSEG_LOG_LEVEL": "debug"}
    if dims == "2d":
        with_probabilities, flags, folds = res.predictions["cascade"], (), ("0", "1")
    else:
        with_probabilities, flags, folds = tmp_path / "with", ("--disable_tta",), ("0",)
        proc = _predict(res, with_probabilities, *flags, "--save_probabilities", *NO_WORKERS, folds=folds, env=env)
        assert "to labels" not in proc.stdout
    labels_only = tmp_path / "labels_only"
    proc = _predict(res, labels_only, *flags, *NO_WORKERS, folds=folds, env=env)
    assert "to labels" in proc.stdout
    assert not list(labels_only.glob("*.npz"))
    files = sorted(with_probabilities.glob("*.nii.gz"))
    assert files
    for f in files:
        a, b = sitk.ReadImage(str(f)), sitk.ReadImage(str(labels_only / f.name))
        assert _geometry(a) == _geometry(b)
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), f.name
