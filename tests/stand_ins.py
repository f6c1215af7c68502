"""Helpers shared by tests: stand-in networks whose output is known, nnU-Net folders."""
from __future__ import annotations

import multiprocessing
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

_REAL_GET_CONTEXT = multiprocessing.get_context


def fork_context(method=None):
    """Stands in for ``multiprocessing.get_context``: always the 'fork' context."""
    return _REAL_GET_CONTEXT("fork")


def one_torch_thread(monkeypatch) -> None:
    """torch on ONE thread in this process and in every child forked from it, for the rest of the
    test. A child forked from a process whose OpenMP pool once ran several threads deadlocks in
    its next parallel region with several threads (it waits for threads that do not exist in it;
    reproduced in isolation, and a CI run hung so in the benchmark test after an earlier test in
    the same worker had run nnU-Net's predict entry point, which sets torch to all cores)."""
    set_threads = torch.set_num_threads
    set_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_threads(1))


@contextmanager
def fork_instead_of_spawn():
    """nnU-Net's fingerprint extraction and preprocessing start their worker pools with 'spawn':
    each worker imports torch and nnU-Net again (seconds per pool on 2 cores). In a test process
    that plans in-process, 'fork' gives the same results without the imports (torch on one thread
    meanwhile: see :func:`one_torch_thread`)."""
    multiprocessing.get_context = fork_context
    try:
        with pytest.MonkeyPatch.context() as mp:
            one_torch_thread(mp)
            yield
    finally:
        multiprocessing.get_context = _REAL_GET_CONTEXT


def nnunet_folders(root: Path, n_proc_da: str = "0") -> dict[str, str]:
    """nnU-Net's environment for a test's own raw/preprocessed/results folders under ``root``."""
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pp"),
            "nnUNet_results": str(root / "res"), "nnUNet_n_proc_DA": n_proc_da}


class IdentityNet(torch.nn.Module):
    """Returns logits whose softmax (or sigmoid) is the input; counts its calls and inputs."""

    def __init__(self, multilabel: bool):
        super().__init__()
        self.multilabel = multilabel
        self.calls = 0
        self.crops_seen = 0

    def forward(self, x):
        self.calls += 1
        self.crops_seen += x.shape[0]
        p = x.clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p) if self.multilabel else torch.log(p)


def on_a_small_gpu(monkeypatch, predictor) -> list:
    """Simulate ``nnUNetv2_predict -device cuda`` with a case too large for the device (no GPU
    here): ``predictor.device`` reads cuda, and a case whose full-resolution arrays would be on cuda
    (``work_device``) raises CUDA's out-of-memory error; on the CPU the case is predicted with the
    networks on the host. Returns the record: each try's ``work_device`` type and every
    ``empty_cache`` call."""
    import nnunet_stseg.adapters.predictor as predictor_module

    real_case, seen = type(predictor)._predict_case, []

    def case_on_a_small_gpu(self, x):
        seen.append(self.work_device.type)
        if self.work_device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        self.device = torch.device("cpu")  # the stand-in networks run on the host
        try:
            return real_case(self, x)
        finally:
            self.device = torch.device("cuda")

    monkeypatch.setattr(predictor_module, "empty_cache", lambda device: seen.append(f"empty_cache {device}"))
    predictor.device = torch.device("cuda")  # what nnUNetv2_predict -device cuda sets; nothing is moved there here
    predictor.perform_everything_on_device = True  # nnU-Net's default on CUDA
    predictor._predict_case = case_on_a_small_gpu.__get__(predictor)
    return seen


def assert_retried_on_the_cpu(monkeypatch, capsys, predictor, data: torch.Tensor) -> None:
    """A case that does not fit on the (simulated) device is predicted again with its arrays on
    the CPU, with the same logits as a prediction on the CPU; ``--not_on_device`` puts them there
    from the start; the next case tries the device again."""
    expected = predictor.predict_logits_from_preprocessed_data(data)
    seen = on_a_small_gpu(monkeypatch, predictor)
    assert torch.equal(predictor.predict_logits_from_preprocessed_data(data), expected)
    assert seen == ["cuda", "empty_cache cuda", "cpu"]
    out = capsys.readouterr().out
    assert "the case did not fit on cuda (" in out and "CUDA out of memory" in out and "again with its full" in out
    assert predictor.work_device.type == "cuda", "the next case tries the device again"
    seen.clear()
    predictor.perform_everything_on_device = False  # --not_on_device
    assert torch.equal(predictor.predict_logits_from_preprocessed_data(data), expected)
    assert seen == ["cpu"]
    predictor.perform_everything_on_device = True


class BoxStub(torch.nn.Module):
    """A crop-guided model (end-to-end or L-SNet) with known boxes: the same box ``box`` ((2, 2), [start, stop) per in-plane axis; fractional for L-SNet's RoIs),
    on every slice whose first channel reaches above 0.5, with fine output foreground (class 1)
    where it does; other slices get no box (with ``fallback``, counted in ``last_fallbacks``, as
    L-SNet counts slices without keypoint)."""

    def __init__(self, box, module_size: int = 16, classes: int = 3, fallback: str | None = None):
        super().__init__()
        self.box, self.m, self.k, self.multilabel = torch.tensor(box, dtype=torch.float64), module_size, classes, False
        self.fallback, self.last_fallbacks = fallback, 0
        self.scale = torch.nn.Parameter(torch.ones(()))  # something for a fold's weights to load into

    def forward(self, x):
        from nnunet_stseg.core.crop_guided import CropGuidedOutput

        boxes, fine, self.last_fallbacks = [], [], 0
        for b in range(x.shape[0]):
            if x[b, 0].max() <= 0.5:
                boxes.append(torch.zeros((0, 2, 2)).numpy())
                self.last_fallbacks += self.fallback is not None
                continue
            (y0, y1), (x0, x1) = self.box.round().long().tolist()
            crop = torch.nn.functional.interpolate(x[b:b + 1, :1, y0:y1, x0:x1], size=(self.m, self.m))
            logits = torch.zeros((1, self.k, self.m, self.m))
            logits[:, 1] = (crop[:, 0] - 0.5) * 20 * self.scale
            fine.append(logits)
            boxes.append(self.box.numpy()[None])
        fine = torch.cat(fine) if fine else torch.zeros((0, self.k, self.m, self.m))
        return CropGuidedOutput(torch.zeros((x.shape[0], self.k, self.m, self.m)), fine, boxes)


def plan_crop_guided(root: Path, did: int) -> Path:
    """A generated 2D dataset planned (not preprocessed) at S = 32 with the end-to-end and L-SNet
    configurations; returns the dataset's raw folder."""
    from nnunet_stseg.adapters.config import PlanOptions
    from nnunet_stseg.data.synthetic import make_synthetic_dataset
    from nnunet_stseg.planners.plan_and_preprocess import plan_and_preprocess

    with pytest.MonkeyPatch.context() as mp:
        for k, v in nnunet_folders(root, "1").items():
            mp.setenv(k, v)
        ds = make_synthetic_dataset(root / "raw", did, "BoxStub", dim=2, n_train=3, n_test=1, num_classes=2, seed=3)
        with fork_instead_of_spawn():
            plan_and_preprocess(did, PlanOptions(input_size=32, base_features=4, e2e=True, lsnet=True),
                                num_processes=1, preprocess=False)
    return ds


def crop_guided_predictor(root: Path, ds: Path, kind: str, box, folds: int = 1, objects_report: bool = True):
    """The end-to-end (``kind="e2e"``) or L-SNet (``"lsnet"``) predictor of the plans of
    :func:`plan_crop_guided` with a :class:`BoxStub` as its network, mirroring on, ``folds`` weight
    sets; and a (1, 3, 32, 32) case: slice 0 empty, a bright square on slices 1 and 2."""
    import json

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.config import e2e_config_name, lsnet_config_name
    from nnunet_stseg.adapters.crop_guided_predictor import CropGuidedPredictor
    from nnunet_stseg.adapters.lsnet_model import LSNetPredictor

    plans = json.loads((root / "pp" / ds.name / "nnUNetPlans.json").read_text())
    config = e2e_config_name("2d", 32) if kind == "e2e" else lsnet_config_name(32)
    plans["configurations"][config]["sts"]["objects_report"] = objects_report
    pm = PlansManager(plans)
    net = BoxStub(box, fallback=None if kind == "e2e" else "empty")
    cls = CropGuidedPredictor if kind == "e2e" else LSNetPredictor
    p = cls(use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
    weights = [{"scale": torch.tensor(1.0 / (f + 1))} for f in range(folds)]
    p.manual_initialization(net, pm, pm.get_configuration(config), weights,
                            json.loads((ds / "dataset.json").read_text()), "stand-in", (0, 1))
    data = torch.zeros((1, 3, 32, 32))
    data[0, 1:, 6:18, 8:22] = 1.0
    return p, net, data
