"""Shared fixtures: an isolated nnU-Net folder layout and two small planned datasets.

nnU-Net v2 reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` lazily (its
``paths`` module wraps ``os.environ``), so setting them in this process before the first use is
enough. The previous environment is restored when the session ends.

Dataset ids 981 (2D) and 982 (3D) are reserved for these fixtures; other modules use 990-999.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

PLAN_SIZE = 32
PLAN_FEATURES = 8

_ENV_FIXED = {
    "nnUNet_compile": "f",
    "nnUNet_n_proc_DA": "0",
    "nnUNet_def_n_proc": "1",
}


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
    from nnunet_stseg.cli import plan_and_preprocess
    from nnunet_stseg.synthetic import make_synthetic_dataset

    raw_folder = make_synthetic_dataset(dirs.raw, dataset_id=dataset_id, dim=dim, n_train=5, n_test=1)
    added = plan_and_preprocess(dataset_id, PLAN_SIZE, base_features=PLAN_FEATURES, num_processes=1)
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
