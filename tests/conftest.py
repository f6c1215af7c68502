"""Shared fixtures: an isolated nnU-Net folder layout and two small planned datasets.

nnU-Net v2 reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` lazily (its
``paths`` module wraps ``os.environ``), so setting them in this process before the first use is
enough. The previous environment is restored when the session ends.

Dataset ids 981 (2D) and 982 (3D) are reserved for these fixtures, 985/986 for the trained
models of ``trained_models.py``; other modules use 970-999.

Scheduling (``run_tests.sh``: ``--dist loadgroup --no-loadscope-reorder``): every test is put in
an xdist group, and a group runs whole on one worker. The trained 2D models are built by the
first test of ``test_integration_cli.py`` (group ``trained_2d``), the 3D ones by the first of
``test_depth_cli.py`` (``trained_3d``): these two groups start first, one per worker, so the two
builds run at the same time. Other modules' users of a trained set form groups of their own
(``trained_2d:<module>``), which run on whichever worker is free next (the set is built by then;
the file lock of :func:`build_once` makes a worker wait only if it is not). Then the real depth
experiment, the benchmark smoke tests, the users of ``planned_2d``/``planned_3d`` (``planned``),
and one group per module for the rest (what ``--dist loadfile`` did).
"""
from __future__ import annotations

import json
import os
import shutil
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest

from stand_ins import fork_instead_of_spawn

# groups that start first, in this order (a name ending in ':' matches every group it begins)
_FIRST_GROUPS = ("trained_2d", "trained_3d", "trained_2d:", "trained_3d:", "test_experiment_depth", "test_benchmark",
                 "planned")
_HOME = {"trained_2d": "test_integration_cli", "trained_3d": "test_depth_cli"}


def _group(item: pytest.Item) -> str:
    names = set(getattr(item, "fixturenames", ()))
    module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else "other"
    for fixture, home in _HOME.items():
        if fixture in names:
            return fixture if module == home else f"{fixture}:{module}"
    if names & {"planned_2d", "planned_3d"}:
        return "planned"
    return module


def _rank(group: str) -> int:
    for i, first in enumerate(_FIRST_GROUPS):
        if group == first or (first.endswith(":") and group.startswith(first)):
            return i
    return len(_FIRST_GROUPS)


def pytest_itemcollected(item):
    """Every test gets its xdist group (see the module docstring) as it is collected, before any
    pytest_collection_modifyitems hook: xdist's worker reads the marks in its own."""
    item.add_marker(pytest.mark.xdist_group(_group(item)))


def pytest_collection_modifyitems(config, items):
    """The expensive groups first (their first test decides where a group starts)."""
    items.sort(key=lambda item: _rank(_group(item)))  # stable: the rest keeps its order


def shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (pytest's base temp of the run), or
    ``STSEG_TEST_MODELS`` when set: then the trained models are kept between runs (for the
    edit-test loop; delete the folder after changing a trainer, planner or predictor)."""
    if os.environ.get("STSEG_TEST_MODELS"):
        root = Path(os.environ["STSEG_TEST_MODELS"]).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root
    return _run_temp(tmp_path_factory)


def _run_temp(tmp_path_factory) -> Path:
    """pytest's base temp of this run, the same in every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build) -> dict:
    """``build(folder)`` (returning a JSON-able dict) runs once per test run, whichever worker asks
    first, behind a file lock; later callers get its result, or its error without building again."""
    from filelock import FileLock

    root, this_run = shared_root(tmp_path_factory), str(_run_temp(tmp_path_factory))
    folder, done, failed = root / name, root / f"{name}.json", root / f"{name}.error"
    with FileLock(str(root / f"{name}.lock")):
        if failed.is_file():
            run, _, error = failed.read_text().partition("\n")
            if run == this_run:
                raise RuntimeError(f"building {name} failed earlier in this run:\n{error}")
            failed.unlink()  # a kept folder (STSEG_TEST_MODELS): an earlier run's failure is retried
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                result = build(folder)
            except BaseException:
                failed.write_text(f"{this_run}\n{traceback.format_exc()}")
                raise
            done.write_text(json.dumps(result))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def trained_2d(tmp_path_factory):
    """2D models trained with the stock CLIs (see ``trained_models.build_2d``); read-only."""
    import trained_models as tm

    return tm.from_json(build_once(tmp_path_factory, "trained_2d", lambda f: tm.to_json(tm.build_2d(f))))


@pytest.fixture(scope="session")
def trained_3d(tmp_path_factory):
    """3D models trained with the stock CLIs (see ``trained_models.build_3d``); read-only."""
    import trained_models as tm

    return tm.from_json(build_once(tmp_path_factory, "trained_3d", lambda f: tm.to_json(tm.build_3d(f))))


@pytest.fixture(scope="session")
def planned_boxes(tmp_path_factory):
    """A 2D dataset planned with the end-to-end and L-SNet configurations (dataset 988; see
    ``stand_ins.plan_crop_guided``) for their predictors with a stand-in network."""
    from stand_ins import plan_crop_guided

    root = tmp_path_factory.mktemp("boxes")
    return root, plan_crop_guided(root, 988)


PLAN_SIZE = 32
PLAN_FEATURES = 8

_ENV_FIXED = {
    "nnUNet_compile": "f",
    "nnUNet_n_proc_DA": "0",
    "nnUNet_def_n_proc": "1",
}


@pytest.fixture(scope="session", autouse=True)
def stock_commands_forked():
    """The stock commands of this environment (``nnUNetv2_*``, ``nnunet-stseg``) run as forks of a
    server that imported torch and nnU-Net once (``forkserver.py``: 5-7 s less per command);
    ``STSEG_TEST_FORKSERVER=0`` runs them as real processes."""
    if os.environ.get("STSEG_TEST_FORKSERVER", "1") == "0":
        yield None
        return
    import tempfile

    import forkserver

    server = forkserver.install(tempfile.gettempdir())
    try:
        yield server
    finally:
        forkserver.uninstall()


@pytest.fixture(scope="session", autouse=True)
def fewer_fingerprint_samples():
    """Planning in this process draws as many foreground intensities as in the forked commands
    (``forkserver.sample_fewer_foreground_intensities``)."""
    import forkserver

    forkserver.sample_fewer_foreground_intensities()
    yield


@pytest.fixture(scope="session", autouse=True)
def worker_processes_as_asked():
    """A test that passes ``-npp``/``-nps`` >= 1 means nnU-Net's worker path; on a machine with at
    most 2 cores our predictors would predict in their own process instead (``auto``). The choice
    itself is tested with the variable set explicitly (test_integration_cli.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STSEG_PREDICT_IN_PROCESS", "0")
        yield


@pytest.fixture(scope="session")
def nnunet_dirs(tmp_path_factory):
    """raw / preprocessed / results folders of a private nnU-Net installation for this session."""
    root = tmp_path_factory.mktemp("nnunet")
    dirs = SimpleNamespace(root=root, raw=root / "raw", preprocessed=root / "preprocessed",
                           results=root / "results")
    for d in (dirs.raw, dirs.preprocessed, dirs.results):
        d.mkdir(parents=True, exist_ok=True)
    new = {"nnUNet_raw": str(dirs.raw), "nnUNet_preprocessed": str(dirs.preprocessed),
           "nnUNet_results": str(dirs.results), **_ENV_FIXED}
    with pytest.MonkeyPatch.context() as mp:  # restores the environment at session end
        for k, v in new.items():
            mp.setenv(k, v)
        yield dirs


def _plan(dirs, dataset_id: int, dim: int) -> SimpleNamespace:
    from nnunet_stseg.adapters.config import PlanOptions
    from nnunet_stseg.data.synthetic import make_synthetic_dataset
    from nnunet_stseg.planners.plan_and_preprocess import plan_and_preprocess

    raw_folder = make_synthetic_dataset(dirs.raw, dataset_id=dataset_id, dim=dim, n_train=5, n_test=1)
    with fork_instead_of_spawn():
        added = plan_and_preprocess(dataset_id, PlanOptions(input_size=PLAN_SIZE, base_features=PLAN_FEATURES),
                                    num_processes=1)
    name = raw_folder.name
    pp = Path(dirs.preprocessed) / name
    with open(pp / "nnUNetPlans.json") as f:
        plans = json.load(f)
    with open(pp / "dataset.json") as f:
        dataset_json = json.load(f)
    case_ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw_folder / "imagesTr").glob("*_0000.nii.gz"))
    return SimpleNamespace(dataset_id=dataset_id, dataset_name=name, dim=dim, size=PLAN_SIZE,
                           features=PLAN_FEATURES, raw_folder=raw_folder, preprocessed_folder=pp,
                           plans_file=pp / "nnUNetPlans.json", plans=plans, dataset_json=dataset_json,
                           added=list(added), case_ids=case_ids, dirs=dirs)


@pytest.fixture(scope="session")
def planned_2d(nnunet_dirs):
    """2D synthetic dataset 981 (5 training cases, the first one empty), planned with S=32."""
    return _plan(nnunet_dirs, 981, 2)


@pytest.fixture(scope="session")
def planned_3d(nnunet_dirs):
    """3D synthetic dataset 982 (anisotropic, 24 slices), planned with S=32 for 2d and 3d."""
    return _plan(nnunet_dirs, 982, 3)
