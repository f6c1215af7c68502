"""Running the stock nnU-Net commands as a user would: each command printed first, its output
logged, its wall time and peak memory measured; the environment they run in (nnU-Net folders,
our trainers discoverable, a short CPU schedule); scoring with nnU-Net's metrics.

The demo and the tests' shared models use these; the experiments in the checkout's
``benchmarks/`` folder build on them (``benchmarks/runner.py``).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nnunet_stseg.adapters.discovery import with_trainer_discovery


def find_command(name: str) -> str:
    """A console script next to the running interpreter (the venv's), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"command {name} not found next to {sys.executable} or on PATH; is nnunetv2 installed?")
    return found


def pipeline_env(workdir: Path, epochs: int, iters: int, val_iters: int = 2) -> dict:
    """Environment for the stock commands: nnU-Net folders under ``workdir``, our trainers
    discoverable, CPU-friendly settings and the short schedule."""
    env = with_trainer_discovery(dict(os.environ))
    env.update({
        "nnUNet_raw": str(workdir / "nnUNet_raw"),
        "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
        "nnUNet_results": str(workdir / "nnUNet_results"),
        "nnUNet_compile": env.get("nnUNet_compile", "f"),
        "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0"),
        "nnUNet_def_n_proc": env.get("nnUNet_def_n_proc", "1"),
        "STSEG_NUM_EPOCHS": str(epochs),
        "STSEG_ITERS_PER_EPOCH": str(iters),
        "STSEG_VAL_ITERS": str(val_iters),
    })
    return env


def run_measured(cmd: list[str], env: dict, log: Path | None = None, quiet: bool = False) -> tuple[float, float]:
    """Run a command, print it first; on failure show the tail of its output. Returns the wall
    seconds and the peak RSS in MB of its largest process (from ``wait4`` on that child)."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with (open(log, "w+") if log is not None else tempfile.TemporaryFile("w+")) as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
    if not quiet:
        for line in text.splitlines():
            if "[nnunet-stseg]" in line or "Mean Validation Dice" in line:
                print("   " + line)
    return seconds, usage.ru_maxrss / 1024


def run(cmd: list[str], env: dict, log: Path | None = None, quiet: bool = False) -> float:
    """:func:`run_measured` when only the seconds matter."""
    return run_measured(cmd, env, log, quiet)[0]


def train_command_line(dataset, config: str, fold: int, trainer: str, device: str = "cpu", *flags: str) -> list[str]:
    """The stock ``nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER -device DEVICE [flags]``."""
    return [find_command("nnUNetv2_train"), str(dataset), config, str(fold), "-tr", trainer, "-device", device, *flags]


def plan_command_line(dataset, size: int, dims: tuple[str, ...], features: int, *flags: str,
                      batch_size: int | None = None, processes: int = 2) -> list[str]:
    """Our ``nnunet-stseg plan -d DATASET -s SIZE --dims ... --features F [--batch_size B] -np N [flags]``."""
    return [find_command("nnunet-stseg"), "plan", "-d", str(dataset), "-s", str(size), "--dims", *dims,
            "--features", str(features), *(["--batch_size", str(batch_size)] if batch_size else []),
            "-np", str(processes), *flags]


def predict_command_line(images, output, dataset, config: str, trainer: str, folds, device: str = "cpu",
                         *flags: str) -> list[str]:
    """The stock ``nnUNetv2_predict -i IMAGES -o OUTPUT -d DATASET -c CONFIG -tr TRAINER -f FOLDS
    -device DEVICE [flags]``."""
    return [find_command("nnUNetv2_predict"), "-i", str(images), "-o", str(output), "-d", str(dataset), "-c", config,
            "-tr", trainer, "-f", *[str(f) for f in folds], "-device", device, *flags]


def evaluate(pred_dir: Path, gt_dir: Path, dataset_json: dict, output: Path) -> dict:
    """nnU-Net's own metrics plus precision/recall; returns the foreground mean."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_stseg.core.metrics import add_precision_recall

    labels = [v for k, v in dataset_json["labels"].items() if k != "background"]
    compute_metrics_on_folder(str(gt_dir), str(pred_dir), str(output), SimpleITKIO(), dataset_json["file_ending"],
                              labels, None, num_processes=1, chill=True)
    return add_precision_recall(str(output))["foreground_mean"]


__all__ = ["find_command", "pipeline_env", "run_measured", "run", "train_command_line", "plan_command_line",
           "predict_command_line", "evaluate"]
