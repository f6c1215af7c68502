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
