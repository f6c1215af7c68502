"""The whole segment-then-segment workflow on a small generated dataset, through the STOCK
nnU-Net commands (``nnUNetv2_train``, ``nnUNetv2_predict``), exactly as a user would type them.

    nnunet-stseg demo                       # 2D, S=32, 10x50 iterations (~3 min on 2 cores)
    nnunet-stseg demo --dim 3 --workdir /tmp/demo3d
    nnunet-stseg demo --ensemble --n_test 20   # + nnUNetv2_ensemble of the cascade with the coarse model

Every command is printed before it runs. The result is a table (coarse network alone vs the
cascade, scored on the held-out test images) and an overlay picture ``overlay.png``.
The commands are built by :mod:`nnunet_stseg.commands.pipeline`, as in the experiments and in the
tests' shared models (`tests/trained_models.py`).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_stseg.adapters.config import (DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER, coarse_config_name,
                                          fine_config_name)
from nnunet_stseg.atomic import write_atomic
from nnunet_stseg.commands.pipeline import (evaluate, find_command, pipeline_env, plan_command_line,
                                            predict_command_line, run, train_command_line)


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What the demo makes: a generated ``dim``-D dataset (``n_train`` + ``n_test`` images,
    ``seed``), planned at S = ``size`` with U-Nets of base width ``features``, every network
    trained for ``epochs`` x ``iters`` iterations on ``device``, fold 0. ``ensemble``: both arms
    also save probabilities and nnU-Net's ``nnUNetv2_ensemble`` averages them (a third arm)."""

    dim: int = 2
    size: int = 32
    features: int = 8
    epochs: int = 10
    iters: int = 50
    n_train: int = 8
    n_test: int = 3
    seed: int = 0
    device: str = "cpu"
    dataset_id: int = 990
    ensemble: bool = False


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


def run_pipeline(workdir: Path, options: DemoOptions) -> PipelineResult:
    """Generate -> ``nnunet-stseg plan`` -> stock ``nnUNetv2_train`` (coarse, then fine) -> stock
    ``nnUNetv2_predict`` for two arms (the coarse network alone, the cascade) -> nnU-Net's metrics
    on the test images. Returns what was made."""
    from nnunet_stseg.data.synthetic import make_synthetic_dataset

    o = options
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = pipeline_env(workdir, o.epochs, o.iters)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    ds_folder = make_synthetic_dataset(env["nnUNet_raw"], o.dataset_id, f"StSDemo{o.dim}D", dim=o.dim,
                                       n_train=o.n_train, n_test=o.n_test, seed=o.seed)
    dims = f"{o.dim}d"
    coarse_c, fine_c = coarse_config_name(dims, o.size), fine_config_name(dims, o.size)
    res = PipelineResult(workdir, ds_folder, env, coarse_c, fine_c)
    res.seconds["plan"] = run(plan_command_line(o.dataset_id, o.size, (dims,), o.features, processes=1), env,
                              logs / "plan.log")
    stages = (("coarse", coarse_c, DEFAULT_COARSE_TRAINER), ("fine", fine_c, DEFAULT_FINE_TRAINER))
    for stage, config, trainer in stages:
        res.seconds[f"train_{stage}"] = run(train_command_line(o.dataset_id, config, 0, trainer, o.device), env,
                                            logs / f"train_{stage}_0.log")
    dataset_json = json.loads((ds_folder / "dataset.json").read_text())
    flags = ("--disable_tta", "--save_probabilities") if o.ensemble else ("--disable_tta",)
    for arm, config, trainer in (("cascade",) + stages[1][1:], ("coarse",) + stages[0][1:]):
        out = workdir / f"predictions_{arm}"
        res.seconds[f"predict_{arm}"] = run(predict_command_line(ds_folder / "imagesTs", out, o.dataset_id, config,
                                                                 trainer, [0], o.device, *flags),
                                            env, logs / f"predict_{arm}.log")
        res.predictions[arm] = out
    if o.ensemble:  # nnU-Net's own averaging of the two arms' exported probabilities
        out = workdir / "predictions_ensemble"
        res.seconds["ensemble"] = run([find_command("nnUNetv2_ensemble"), "-i", str(res.predictions["cascade"]),
                                       str(res.predictions["coarse"]), "-o", str(out), "-np", "1"], env,
                                      logs / "ensemble.log")
        res.predictions["ensemble"] = out
    for arm, out in res.predictions.items():
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
    p = argparse.ArgumentParser(prog="nnunet-stseg demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("stseg_demo"))
    d = DemoOptions()
    p.add_argument("--dim", type=int, choices=(2, 3), default=d.dim)
    p.add_argument("-s", "--size", type=int, default=d.size, help="input size S")
    p.add_argument("--features", type=int, default=d.features, help="base U-Net width")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--iters", type=int, default=d.iters, help="iterations per epoch")
    p.add_argument("--n_train", type=int, default=d.n_train)
    p.add_argument("--n_test", type=int, default=d.n_test)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("-device", "--device", default=d.device)
    p.add_argument("--ensemble", action="store_true",
                   help="also average the two arms with nnUNetv2_ensemble (both save probabilities)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run_pipeline(args.workdir, DemoOptions(dim=args.dim, size=args.size, features=args.features,
                                                 epochs=args.epochs, iters=args.iters, n_train=args.n_train,
                                                 n_test=args.n_test, seed=args.seed, device=args.device,
                                                 ensemble=args.ensemble))
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
