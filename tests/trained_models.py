"""Tiny models trained ONCE per test run with the stock nnU-Net commands, shared by every test
that needs a trained model (integration, reliability, polar, depth).

Each build is what a user types: ``nnunet-stseg plan``, ``nnUNetv2_train`` per trainer and fold,
``nnUNetv2_predict`` per arm, all as real subprocesses. That is the one true stock-CLI run of
every trainer family (cascade coarse/fine in 2D and 3D, polar, centre, depth); the tests then
read its outputs or run further commands on the trained models. Accuracy is irrelevant (1 epoch of
3 iterations): the tests check files, geometry, logs, flags and errors.

Work no test reads is skipped: the coarse trainers' final validation (``STSEG_SKIP_VALIDATION=1``)
and worker processes in predictions that only check plumbing (``-npp 0 -nps 0``); the worker path
is kept where a test looks at it (the cascade with ``--save_probabilities``, the depth channel).

Tests must not change these folders (another test may read them later in the same run): a test
that deletes, renames or retrains works on :func:`copy_results`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from nnunet_stseg.adapters.config import (DEFAULT_CENTRE_TRAINER, DEFAULT_COARSE_TRAINER, DEFAULT_E2E_TRAINER,
                                          DEFAULT_FINE_TRAINER, DEFAULT_LSNET_TRAINER, DEFAULT_POLAR_TRAINER,
                                          LNET_TRAINER, coarse_config_name, e2e_config_name, fine_config_name,
                                          lsnet_config_name, polar_config_name)
from nnunet_stseg.adapters.results import model_folder as results_model_folder
from nnunet_stseg.commands.pipeline import (evaluate, pipeline_env, plan_command_line, predict_command_line, run,
                                            train_command_line)
from nnunet_stseg.settings import overrides_env

from stand_ins import fork_instead_of_spawn

EPOCHS, ITERS, VAL_ITERS = 1, 3, 1
SIZE, FEATURES = 32, 8
DATASET_2D, DATASET_3D = 985, 986
DEPTH_TRAINER = "nnUNetTrainer_Depth"
NO_WORKERS = ("-npp", "0", "-nps", "0")
ONE_WORKER = ("-npp", "1", "-nps", "1")


def model_folder(res: SimpleNamespace, trainer: str, config: str) -> Path:
    """``nnUNet_results/<dataset>/<trainer>__nnUNetPlans__<config>`` of a built set."""
    return results_model_folder(res.dataset_folder.name, trainer, config, results_root=res.env["nnUNet_results"])


def copy_results(res: SimpleNamespace, root: Path) -> dict:
    """A private copy of the trained models (``root/results``); returns the environment that
    points the stock commands at it. Tiny networks: a few MB."""
    src = Path(res.env["nnUNet_results"]) / res.dataset_folder.name
    shutil.copytree(src, root / "results" / src.name, symlinks=True)
    return {**res.env, "nnUNet_results": str(root / "results")}


def strip_companions(folder: Path) -> None:
    """Remove the embedded companion models from a (copied!) model folder's checkpoints: the
    model as trained before 0.3, which finds its coarse model by folder only."""
    import torch

    from nnunet_stseg.adapters.bundle import COMPANIONS_KEY

    for path in folder.glob("fold_*/checkpoint_*.pth"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint.pop(COMPANIONS_KEY, None)
        torch.save(checkpoint, path)


def _train(res: SimpleNamespace, config: str, fold: int, trainer: str, validate: bool) -> None:
    env = res.env if validate else {**res.env, "STSEG_SKIP_VALIDATION": "1"}
    res.seconds[f"train_{trainer}_{config}_{fold}"] = run(
        train_command_line(res.dataset_id, config, fold, trainer), env,
        res.workdir / "logs" / f"train_{trainer}_{config}_{fold}.log")


def _predict(res: SimpleNamespace, arm: str, config: str, trainer: str, folds: tuple[int, ...], *flags: str,
             extra_env: dict | None = None) -> Path:
    out = res.workdir / f"predictions_{arm}"
    res.seconds[f"predict_{arm}"] = run(
        predict_command_line(res.dataset_folder / "imagesTs", out, res.dataset_id, config, trainer, folds, "cpu",
                             *flags),
        {**res.env, **(extra_env or {})}, res.workdir / "logs" / f"predict_{arm}.log")
    res.predictions[arm] = out
    return out


def _start(workdir: Path, dataset_id: int, dim: int, **dataset_kwargs) -> SimpleNamespace:
    from nnunet_stseg.data.synthetic import make_synthetic_dataset

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    env = pipeline_env(workdir, EPOCHS, ITERS, VAL_ITERS)
    ds = make_synthetic_dataset(env["nnUNet_raw"], dataset_id, f"Shared{dim}D", dim=dim, **dataset_kwargs)
    return SimpleNamespace(workdir=workdir, dataset_folder=ds, dataset_id=dataset_id, env=env, predictions={},
                           metrics={}, seconds={})


def _plan(res: SimpleNamespace, dims: tuple[str, ...], *flags: str) -> None:
    res.seconds["plan"] = run(plan_command_line(res.dataset_id, SIZE, dims, FEATURES, "--set", "fallback=whole", *flags,
                                                processes=1), res.env, res.workdir / "logs" / "plan.log")


def _evaluate(res: SimpleNamespace, arm: str) -> None:
    dataset_json = json.loads((res.dataset_folder / "dataset.json").read_text())
    out = res.predictions[arm]
    with fork_instead_of_spawn():
        res.metrics[arm] = evaluate(out, res.dataset_folder / "labelsTs", dataset_json, out / "summary_test.json")


def build_2d(workdir: Path) -> SimpleNamespace:
    """2D, one class, 6 training and 3 test images (the first training image empty), S = 32,
    'whole' fallback (the fine network runs even when the untrained coarse model finds nothing).
    Coarse and fine folds 0 and 1 (the fine folds validate the whole cascade); the centre-point and
    polar models fold 0; the end-to-end model fold 0 (from the coarse fold 0, with its validation);
    L-Net (S-Net: the fine fold 0) then L-SNet fold 0 (``best`` fallback: an untrained L-Net finds
    no keypoint above 0.5, and the test wants RoIs). Arms: ``cascade`` (folds 0+1, TTA,
    ``--save_probabilities``, worker processes), ``polar`` (origins from the coarse model),
    ``polar_heatmap``, ``e2e`` and ``lsnet`` (TTA, ``--save_probabilities``)."""
    res = _start(workdir, DATASET_2D, 2, n_train=6, n_test=3, seed=0)
    res.coarse_config, res.fine_config = coarse_config_name("2d", SIZE), fine_config_name("2d", SIZE)
    res.polar_config, res.e2e_config = polar_config_name(SIZE), e2e_config_name("2d", SIZE)
    res.lsnet_config = lsnet_config_name(SIZE)
    _plan(res, ("2d",), "--polar", "--e2e", "--lsnet", "--set", "lsnet.fallback=best")
    for fold in (0, 1):
        _train(res, res.coarse_config, fold, DEFAULT_COARSE_TRAINER, validate=False)
        _train(res, res.fine_config, fold, DEFAULT_FINE_TRAINER, validate=True)
    _train(res, res.coarse_config, 0, DEFAULT_CENTRE_TRAINER, validate=True)
    _train(res, res.polar_config, 0, DEFAULT_POLAR_TRAINER, validate=True)
    _train(res, res.e2e_config, 0, DEFAULT_E2E_TRAINER, validate=True)
    _train(res, res.lsnet_config, 0, LNET_TRAINER, validate=False)
    _train(res, res.lsnet_config, 0, DEFAULT_LSNET_TRAINER, validate=True)
    _predict(res, "cascade", res.fine_config, DEFAULT_FINE_TRAINER, (0, 1), "--save_probabilities", *ONE_WORKER)
    _evaluate(res, "cascade")
    for arm, origins in (("polar", "coarse"), ("polar_heatmap", "heatmap")):
        _predict(res, arm, res.polar_config, DEFAULT_POLAR_TRAINER, (0,), "--disable_tta", *NO_WORKERS,
                 extra_env=overrides_env({"polar.origin_source": origins}))
    _predict(res, "e2e", res.e2e_config, DEFAULT_E2E_TRAINER, (0,), "--save_probabilities", *NO_WORKERS)
    _predict(res, "lsnet", res.lsnet_config, DEFAULT_LSNET_TRAINER, (0,), "--save_probabilities", *NO_WORKERS)
    return res


def build_3d(workdir: Path) -> SimpleNamespace:
    """3D (anisotropic, oblique direction), two classes, 5 training and 2 test volumes, S = 32,
    'whole' fallback. The 3d cascade; the 2d cascade slice by slice WITH the depth channel
    (``plan --depth``); nnU-Net's own 2d configuration with ``nnUNetTrainer_Depth``; fold 0 each.
    Arms: ``cascade`` (3d), ``cascade_2d_depth`` (worker processes), ``coarse_2d_depth``,
    ``depth_2d`` (worker processes)."""
    res = _start(workdir, DATASET_3D, 3, n_train=5, n_test=2, seed=0, num_classes=2)
    res.coarse_config, res.fine_config = coarse_config_name("3d", SIZE), fine_config_name("3d", SIZE)
    res.coarse_config_2d, res.fine_config_2d = coarse_config_name("2d", SIZE), fine_config_name("2d", SIZE)
    _plan(res, ("2d", "3d"), "--depth")
    for coarse, fine in ((res.coarse_config, res.fine_config), (res.coarse_config_2d, res.fine_config_2d)):
        _train(res, coarse, 0, DEFAULT_COARSE_TRAINER, validate=False)
        _train(res, fine, 0, DEFAULT_FINE_TRAINER, validate=True)
    _train(res, "2d", 0, DEPTH_TRAINER, validate=True)
    _predict(res, "cascade", res.fine_config, DEFAULT_FINE_TRAINER, (0,), "--disable_tta", *NO_WORKERS)
    _evaluate(res, "cascade")
    _predict(res, "cascade_2d_depth", res.fine_config_2d, DEFAULT_FINE_TRAINER, (0,), "--disable_tta", *ONE_WORKER)
    _evaluate(res, "cascade_2d_depth")
    _predict(res, "coarse_2d_depth", res.coarse_config_2d, DEFAULT_COARSE_TRAINER, (0,), "--disable_tta",
             *NO_WORKERS)
    _predict(res, "depth_2d", "2d", DEPTH_TRAINER, (0,), "--disable_tta", *ONE_WORKER)
    return res


def to_json(res: SimpleNamespace) -> dict:
    """What another test process needs to use a finished build (the environment is rebuilt)."""
    return {k: (str(v) if isinstance(v, Path) else {a: str(p) for a, p in v.items()} if k == "predictions" else v)
            for k, v in vars(res).items() if k != "env"}


def from_json(d: dict) -> SimpleNamespace:
    res = SimpleNamespace(**d)
    res.workdir, res.dataset_folder = Path(d["workdir"]), Path(d["dataset_folder"])
    res.predictions = {a: Path(p) for a, p in d["predictions"].items()}
    res.env = pipeline_env(res.workdir, EPOCHS, ITERS, VAL_ITERS)
    return res
