"""A stand-in for the nnU-Net subprocesses of the experiment commands, in the style of nnU-Net's
own dummy-trainer tests: the experiment smoke tests check orchestration (which arms and folds run,
what is resumed, what the report says), not training. The real commands are checked elsewhere:
every trainer family through the stock CLIs in ``trained_models.py``, and one experiment
(``test_experiment_depth.py``) end to end for real.

- ``nnunet-stseg plan ...`` runs for real, in this process (the experiments read the plans),
  without preprocessing (no fake training reads data).
- ``nnUNetv2_train D C F -tr T`` writes what a finished training leaves: ``checkpoint_final.pth``
  (no weights; nnU-Net's ``trainer_name``, ``init_args`` configuration and fold, and the epoch
  times of two epochs in ``logging``) and a training log in
  ``nnUNet_results/<dataset>/<T>__<plans>__<C>/fold_F`` (``-p``, default nnUNetPlans).
- ``nnUNetv2_predict -i IN -o OUT ...`` (or ``nnUNetv2_predict_from_modelfolder``) writes, for every case in IN, a segmentation with the
  case's geometry (channel 0 above its mean) through nnU-Net's reader/writer for the file ending.

Every call is recorded (command and environment) in ``calls``.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Call:
    tool: str
    args: list[str]
    env: dict


def _dataset_folder(root: str, dataset: str) -> str:
    if not dataset.isdigit():
        return dataset
    matches = sorted(p.name for p in Path(root).glob(f"Dataset{int(dataset):03d}_*"))
    if not matches:
        raise FileNotFoundError(f"no dataset {dataset} under {root}")
    return matches[0]


@contextlib.contextmanager
def _environment(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class FakeNNUNet:
    """Call it like ``benchmarks.runner.run_measured``; :meth:`install` puts it in place."""

    def __init__(self):
        self.calls: list[Call] = []

    def install(self, monkeypatch, *modules) -> "FakeNNUNet":
        import multiprocessing

        import sys

        from stand_ins import fork_context, one_torch_thread

        # every module that holds the runner's function: the package's, and every benchmarks module
        # loaded (each imported the name itself), plus ``modules`` given
        loaded = [m for name, m in list(sys.modules.items())
                  if name == "nnunet_stseg.commands.pipeline" or name.startswith("benchmarks.")]
        for module in (*loaded, *modules):
            if getattr(module, "run_measured", None) is not None:
                monkeypatch.setattr(module, "run_measured", self)
        # the experiments' own scoring (nnU-Net's compute_metrics_on_folder) forks instead of
        # spawning its worker pool: see stand_ins.fork_instead_of_spawn
        monkeypatch.setattr(multiprocessing, "get_context", fork_context)
        one_torch_thread(monkeypatch)
        return self

    def of(self, tool: str) -> list[Call]:
        return [c for c in self.calls if c.tool == tool]

    def __call__(self, cmd: list[str], env: dict, log: Path | None = None, quiet: bool = False) -> tuple[float, float]:
        t0 = time.perf_counter()
        tool = Path(cmd[0]).name
        args = [str(a) for a in cmd[1:]]
        self.calls.append(Call(tool, args, dict(env)))
        if tool == "nnunet-stseg":
            from nnunet_stseg.commands.cli import main

            with _environment(env):
                main([*args, "--no_pp"])  # a fake training reads no preprocessed data
            text = "planned in-process\n"
        elif tool == "nnUNetv2_train":
            text = self._train(args, env)
        elif tool in ("nnUNetv2_predict", "nnUNetv2_predict_from_modelfolder"):
            text = self._predict(args)
        else:
            raise ValueError(f"FakeNNUNet does not know {tool}")
        if log is not None:
            Path(log).write_text(f"$ {' '.join(cmd)}\n{text}")
        return time.perf_counter() - t0 + 1e-3, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @staticmethod
    def _train(args: list[str], env: dict) -> str:
        import torch

        dataset, config, fold = args[0], args[1], args[2]
        trainer = args[args.index("-tr") + 1]
        plans = args[args.index("-p") + 1] if "-p" in args else "nnUNetPlans"
        name = _dataset_folder(env["nnUNet_preprocessed"], dataset)
        folder = Path(env["nnUNet_results"]) / name / f"{trainer}__{plans}__{config}" / f"fold_{fold}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"fake": True, "args": args, "network_weights": {}, "trainer_name": trainer,
                    "init_args": {"configuration": config, "fold": fold},
                    "logging": {"epoch_start_timestamps": [0.0, 1.0], "epoch_end_timestamps": [0.5, 1.75]}},
                   folder / "checkpoint_final.pth")
        preprocessed = Path(env["nnUNet_preprocessed"]) / name  # what nnU-Net copies into a model folder
        for src, dst in (("dataset.json", "dataset.json"), (f"{plans}.json", "plans.json")):
            if (preprocessed / src).is_file():
                shutil.copy2(preprocessed / src, folder.parent / dst)
        text = f"fake training {' '.join(args)}\n"
        (folder / "training_log_fake.txt").write_text(text)
        return text

    @staticmethod
    def _predict(args: list[str]) -> str:
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

        inp, out = Path(args[args.index("-i") + 1]), Path(args[args.index("-o") + 1])
        out.mkdir(parents=True, exist_ok=True)
        firsts = sorted(p for p in inp.iterdir() if "_0000." in p.name)
        for first in firsts:
            case, ending = first.name.split("_0000", 1)
            files = sorted(str(p) for p in inp.glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))
            rw = determine_reader_writer_from_file_ending(ending, files[0], verbose=False)()
            data, props = rw.read_images(files)
            rw.write_seg((data[0] > data[0].mean()).astype(np.uint8), str(out / f"{case}{ending}"), props)
        return f"fake prediction of {len(firsts)} case(s)\n"
