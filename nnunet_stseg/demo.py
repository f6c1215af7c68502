"""The whole segment-then-segment workflow on a small generated dataset, through the STOCK
nnU-Net commands (``nnUNetv2_train``, ``nnUNetv2_predict``), exactly as a user would type them.

    nnunet-stseg-demo                       # 2D, S=32, 10x50 iterations (~3 min on 2 cores)
    nnunet-stseg-demo --dim 3 --workdir /tmp/demo3d

Every command is printed before it runs. The result is a table (coarse network alone vs the
cascade, scored on the held-out test images) and an overlay picture ``overlay.png``.
The tests train their shared models with the same helpers (`tests/trained_models.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_stseg.atomic import write_atomic
from nnunet_stseg.config import (DEFAULT_CENTRE_TRAINER, DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER,
                                 DEFAULT_POLAR_TRAINER, ORIGIN_SOURCE_ENV, coarse_config_name, fine_config_name,
                                 polar_config_name)
from nnunet_stseg.env import with_trainer_discovery


@dataclass
class PipelineResult:
    workdir: Path
    dataset_folder: Path
    env: dict
    coarse_config: str
    fine_config: str
    predictions: dict = field(default_factory=dict)  # arm -> output folder
    metrics: dict = field(default_factory=dict)  # arm -> foreground_mean metrics
    seconds: dict = field(default_factory=dict)


def _bin(name: str) -> str:
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


def train_fold(dataset: str, config: str, fold: int, trainer: str, device: str, env: dict, log: Path,
               need_validation: bool = False) -> float | None:
    """Train one fold with the stock ``nnUNetv2_train`` unless it is finished, so that a re-run
    experiment resumes where it stopped: an interrupted training continues with ``--c``; with
    ``need_validation``, a finished one without its validation gets only ``--val``. Returns the
    wall seconds, or None when there was nothing to do."""
    fold_dir = Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{config}" / f"fold_{fold}"
    finished = (fold_dir / "checkpoint_final.pth").is_file()
    if finished and not (need_validation and not (fold_dir / "validation" / "summary.json").is_file()):
        return None
    extra = ["--val"] if finished else ["--c"] if (fold_dir / "checkpoint_latest.pth").is_file() else []
    return run([_bin("nnUNetv2_train"), dataset, config, str(fold), "-tr", trainer, "-device", device, *extra],
               env, log)


def evaluate(pred_dir: Path, gt_dir: Path, dataset_json: dict, output: Path) -> dict:
    """nnU-Net's own metrics plus precision/recall; returns the foreground mean."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_stseg.metrics import add_precision_recall

    labels = [v for k, v in dataset_json["labels"].items() if k != "background"]
    compute_metrics_on_folder(str(gt_dir), str(pred_dir), str(output), SimpleITKIO(), dataset_json["file_ending"],
                              labels, None, num_processes=1, chill=True)
    return add_precision_recall(str(output))["foreground_mean"]


def run_pipeline(workdir: Path, dim: int = 2, size: int = 32, features: int = 8, epochs: int = 4, iters: int = 25,
                 n_train: int = 8, n_test: int = 3, seed: int = 0, fallback: str = "coarse", device: str = "cpu",
                 folds: tuple[int, ...] = (0,), predict_flags: tuple[str, ...] = ("--disable_tta",),
                 dataset_id: int = 990, baseline: bool = True, pipeline_dim: int | None = None,
                 num_classes: int = 1, depth: bool = False, polar: bool = False, fine: bool = True,
                 centre: bool = False) -> PipelineResult:
    """Generate -> plan -> train coarse and fine (stock nnUNetv2_train) -> predict (stock
    nnUNetv2_predict) -> evaluate on the test images. ``pipeline_dim`` (default: ``dim``) picks
    the 2d or 3d pipeline; 2 on 3D data runs the 2D stages slice by slice; ``depth`` plans them with
    the depth channel; ``polar`` adds the polar stage (2d pipelines) as arm ``polar`` (origins from
    the coarse model) and, with ``centre``, the centre-point model and arm ``polar_heatmap``;
    ``fine=False`` skips the cascade's fine stage. Returns what was made."""
    from nnunet_stseg.synthetic import make_synthetic_dataset

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = pipeline_env(workdir, epochs, iters)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    name = f"StSDemo{dim}D"
    ds_folder = make_synthetic_dataset(env["nnUNet_raw"], dataset_id, name, dim=dim, n_train=n_train, n_test=n_test,
                                       seed=seed, num_classes=num_classes)
    dims = f"{pipeline_dim or dim}d"
    coarse_c, fine_c = coarse_config_name(dims, size), fine_config_name(dims, size)
    res = PipelineResult(workdir, ds_folder, env, coarse_c, fine_c)
    res.seconds["plan"] = run([_bin("nnunet-stseg"), "plan", "-d", str(dataset_id), "-s", str(size), "--dims", dims,
                               "--features", str(features), "--fallback", fallback, "-np", "1",
                               *(["--depth"] if depth else []), *(["--polar"] if polar else [])], env,
                              logs / "plan.log")
    for f in folds:
        res.seconds[f"train_coarse_{f}"] = run([_bin("nnUNetv2_train"), str(dataset_id), coarse_c, str(f), "-tr",
                                                DEFAULT_COARSE_TRAINER, "-device", device], env,
                                               logs / f"train_coarse_{f}.log")
        if fine:
            res.seconds[f"train_fine_{f}"] = run([_bin("nnUNetv2_train"), str(dataset_id), fine_c, str(f), "-tr",
                                                  DEFAULT_FINE_TRAINER, "-device", device], env,
                                                 logs / f"train_fine_{f}.log")
        if polar and centre:
            res.seconds[f"train_centre_{f}"] = run([_bin("nnUNetv2_train"), str(dataset_id), coarse_c, str(f), "-tr",
                                                    DEFAULT_CENTRE_TRAINER, "-device", device], env,
                                                   logs / f"train_centre_{f}.log")
        if polar:
            res.seconds[f"train_polar_{f}"] = run([_bin("nnUNetv2_train"), str(dataset_id), polar_config_name(size),
                                                   str(f), "-tr", DEFAULT_POLAR_TRAINER, "-device", device], env,
                                                  logs / f"train_polar_{f}.log")
    fold_args = ["-f", *[str(f) for f in folds]]
    arms = (([("cascade", fine_c, DEFAULT_FINE_TRAINER)] if fine else [])
            + ([("polar", polar_config_name(size), DEFAULT_POLAR_TRAINER)] if polar else [])
            + ([("polar_heatmap", polar_config_name(size), DEFAULT_POLAR_TRAINER)] if polar and centre else [])
            + ([("coarse", coarse_c, DEFAULT_COARSE_TRAINER)] if baseline else []))
    dataset_json = json.loads((ds_folder / "dataset.json").read_text())
    for arm, config, trainer in arms:
        out = workdir / f"predictions_{arm}"
        arm_env = {**env, ORIGIN_SOURCE_ENV: "heatmap" if arm == "polar_heatmap" else "coarse"}
        res.seconds[f"predict_{arm}"] = run([_bin("nnUNetv2_predict"), "-i", str(ds_folder / "imagesTs"), "-o",
                                             str(out), "-d", str(dataset_id), "-c", config, "-tr", trainer,
                                             *fold_args, "-device", device, *predict_flags], arm_env,
                                            logs / f"predict_{arm}.log")
        res.predictions[arm] = out
        res.metrics[arm] = evaluate(out, ds_folder / "labelsTs", dataset_json, out / "summary_test.json")
    return res


def save_overlay(res: PipelineResult, path: Path) -> Path:
    """Picture of the first test case: image, ground truth and each arm's contour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    img_file = sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))[0]
    case = img_file.name[: -len("_0000.nii.gz")]
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(img_file)))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(res.dataset_folder / "labelsTs" / f"{case}.nii.gz")))
    preds = {arm: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))
             for arm, folder in res.predictions.items()}
    if img.ndim == 3:  # show the slice with the most foreground
        z = int(np.argmax((gt > 0).reshape(gt.shape[0], -1).sum(1)))
        img, gt, preds = img[z], gt[z], {k: v[z] for k, v in preds.items()}
    ys, xs = np.nonzero(gt > 0) if (gt > 0).any() else (np.array([0, img.shape[0] - 1]),
                                                         np.array([0, img.shape[1] - 1]))
    pad = 8
    zoom = (slice(max(0, ys.min() - pad), ys.max() + pad + 1), slice(max(0, xs.min() - pad), xs.max() + pad + 1))
    n = 1 + len(preds)
    fig, axes = plt.subplots(2, n, figsize=(4 * n, 7.5), gridspec_kw={"height_ratios": [1, 1]})
    for row, view in enumerate(((slice(None), slice(None)), zoom)):
        panels = [("ground truth", None)] + list(preds.items())
        for ax, (arm, p) in zip(axes[row], panels):
            ax.imshow(img[view], cmap="gray")
            ax.contour((gt > 0)[view], levels=[0.5], colors="lime", linewidths=1.0)
            if p is not None and (p[view] > 0).any():
                ax.contour((p > 0)[view], levels=[0.5], colors="red", linewidths=1.0)
            if row == 0:
                title = f"{case}: ground truth (green)" if p is None else \
                    f"{arm} (red); mean test Dice {res.metrics.get(arm, {}).get('Dice', float('nan')):.3f}"
                ax.set_title(title, fontsize=9)
            else:
                ax.set_title("zoom on the objects", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    write_atomic(path, figure=fig, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="nnunet-stseg-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("stseg_demo"))
    p.add_argument("--dim", type=int, choices=(2, 3), default=2)
    p.add_argument("-s", "--size", type=int, default=32, help="input size S")
    p.add_argument("--features", type=int, default=8, help="base U-Net width")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iters", type=int, default=50, help="iterations per epoch")
    p.add_argument("--n_train", type=int, default=8)
    p.add_argument("--n_test", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-device", "--device", default="cpu")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run_pipeline(args.workdir, args.dim, args.size, args.features, args.epochs, args.iters, args.n_train,
                       args.n_test, args.seed, device=args.device)
    overlay = save_overlay(res, res.workdir / "overlay.png")
    print(f"\nTest images ({args.n_test}), S={args.size}, width {args.features}, "
          f"{args.epochs}x{args.iters} iterations per network, device {args.device}:")
    print(f"{'arm':<10}{'Dice':>8}{'IoU':>8}{'Precision':>11}{'Recall':>8}")
    for arm, m in res.metrics.items():
        print(f"{arm:<10}{m['Dice']:>8.3f}{m['IoU']:>8.3f}{m['Precision']:>11.3f}{m['Recall']:>8.3f}")
    print(f"\npredictions: {', '.join(str(v) for v in res.predictions.values())}\noverlay: {overlay}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
