"""Experiment: segment-then-segment vs the downscaled baseline on Kvasir-SEG (the paper's protocol).

    nnunet-stseg-experiment-kvasir --workdir work_dirs/kvasir --sizes 32 48 64 128

For every input size S, two arms with the same network width and training budget:
- baseline: nnU-Net 2D on the image downscaled to S (the ``2d_sts_coarse_S`` configuration; nnU-Net's
  export resamples its output to 256 x 256 for scoring, as the paper upscales it);
- cascade: segment-then-segment at S (that baseline as coarse stage + the fine stage on crops).
Data: Kvasir-SEG resized to 256 x 256, seeded 80/10/10 split (train / validation = nnU-Net fold 0 /
test), scored on the test images at 256 x 256 with nnU-Net's metrics: DSC, IoU, precision, recall
as mean +- sd over images, inference ms per image (wall time of the whole ``nnUNetv2_predict`` call
over the test set divided by the number of images: model loading and start-up included), peak
RSS of the prediction command, training time. Published U-Net/StS numbers (seed 002, Table A1)
are printed beside ours, marked as published. Everything runs through the stock nnU-Net commands
and is resumable: finished trainings and predictions are kept (re-run the same command).

The default budget (``--epochs 20 --iters 100``, width 16) is sized for a 2-core CPU run of a few
hours; GPU users should pass nnU-Net's schedule (``--epochs 1000 --iters 250``) and ``-device cuda``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from nnunet_stseg.config import DEFAULT_COARSE_TRAINER, DEFAULT_FINE_TRAINER, coarse_config_name, fine_config_name
from nnunet_stseg.demo import _bin, evaluate, pipeline_env, run, run_measured

# seed 002 (Segment-then-segment), Table A1, polyp, U-Net backbone: size -> (DSC, IoU, Prec, Rec) mean %
PUBLISHED = {
    "baseline": {32: (72.41, 61.00, 78.23, 74.54), 48: (78.42, 67.78, 80.36, 84.43), 64: (81.76, 72.40, 83.94, 84.84),
                 96: (83.87, 75.13, 84.33, 88.92), 128: (82.86, 74.75, 83.30, 88.93)},
    "cascade": {32: (76.47, 66.77, 82.66, 77.28), 48: (81.68, 73.45, 85.01, 85.76), 64: (83.82, 75.90, 86.32, 86.72),
                96: (85.25, 77.89, 86.01, 89.90), 128: (81.36, 74.58, 82.49, 85.23)},
}
METRICS = ("Dice", "IoU", "Precision", "Recall")


def per_image_stats(summary_file: Path) -> dict:
    """Mean and sd over test images (in %) of each metric for the foreground label."""
    summary = json.loads(summary_file.read_text())
    out = {}
    for m in METRICS:
        values = np.array([next(iter(c["metrics"].values()))[m] for c in summary["metric_per_case"]], dtype=float)
        out[m] = (100 * float(np.nanmean(values)), 100 * float(np.nanstd(values)))
    out["n"] = len(summary["metric_per_case"])
    return out


def run_experiment(workdir: Path, sizes: list[int], features: int, epochs: int, iters: int, device: str = "cpu",
                   dataset_id: int = 720, seed: int = 0, limit: int | None = None, src: Path | None = None) -> dict:
    from nnunet_stseg.kvasir import convert_kvasir, install_split, kvasir_ids

    workdir = Path(workdir).resolve()
    env = pipeline_env(workdir, epochs, iters)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    src = Path(src) if src else Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"
    raw = Path(env["nnUNet_raw"])
    ds_dirs = sorted(raw.glob(f"Dataset{dataset_id:03d}_*")) if raw.is_dir() else []
    if ds_dirs:
        ds = ds_dirs[0]
    else:
        ids = kvasir_ids(src)[:limit] if limit else None
        ds = convert_kvasir(src, raw, dataset_id, size=256, seed=seed, ids=ids)
    dataset_json = json.loads((ds / "dataset.json").read_text())
    n_test = len(list((ds / "imagesTs").glob("*.png")))
    results = {"sizes": {}, "budget": {"features": features, "epochs": epochs, "iters": iters, "device": device,
                                       "seed": seed, "dataset": ds.name, "n_test": n_test}}
    for s in sizes:
        coarse_c, fine_c = coarse_config_name("2d", s), fine_config_name("2d", s)
        pp_plans = Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json"
        planned = pp_plans.is_file() and coarse_c in json.loads(pp_plans.read_text())["configurations"]
        if not planned:
            run([_bin("nnunet-stseg"), "plan", "-d", str(dataset_id), "-s", str(s), "--dims", "2d", "--features",
                 str(features), "-np", "2"], env, logs / f"plan_{s}.log")
        install_split(ds, Path(env["nnUNet_preprocessed"]) / ds.name)
        row = {}
        for arm, config, trainer in (("baseline", coarse_c, DEFAULT_COARSE_TRAINER),
                                     ("cascade", fine_c, DEFAULT_FINE_TRAINER)):
            fold_dir = Path(env["nnUNet_results"]) / ds.name / f"{trainer}__nnUNetPlans__{config}" / "fold_0"
            train_log = logs / f"train_{arm}_{s}.json"
            if not (fold_dir / "checkpoint_final.pth").is_file():
                t = run([_bin("nnUNetv2_train"), str(dataset_id), config, "0", "-tr", trainer, "-device", device],
                        env, logs / f"train_{arm}_{s}.log")
                train_log.write_text(json.dumps({"seconds": t}))
            out = workdir / f"pred_{arm}_{s}"
            seconds, peak = run_measured([_bin("nnUNetv2_predict"), "-i", str(ds / "imagesTs"), "-o", str(out),
                                          "-d", str(dataset_id), "-c", config, "-tr", trainer, "-f", "0", "-device",
                                          device, "--disable_tta"], env, logs / f"predict_{arm}_{s}.log")
            evaluate(out, ds / "labelsTs", dataset_json, out / "summary_test.json")
            row[arm] = {**per_image_stats(out / "summary_test.json"), "ms_per_image": 1000 * seconds / n_test,
                        "peak_rss_mb": peak, "train_s": json.loads(train_log.read_text())["seconds"]
                        if train_log.is_file() else float("nan")}
        results["sizes"][s] = row
        (workdir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def report(results: dict, cmd: str) -> str:
    from nnunet_stseg.benchmark import machine_line

    b = results["budget"]
    lines = ["# Kvasir-SEG: segment-then-segment vs downscaled baseline", "",
             f"Command: `{cmd}`  ", f"Machine: {machine_line()}  ",
             f"Budget per arm: width {b['features']}, {b['epochs']} x {b['iters']} iterations, device {b['device']}; "
             f"split seed {b['seed']} (80/10/10), {b['n_test']} test images scored at 256 x 256.", "",
             "| S | arm | DSC % | IoU % | precision % | recall % | ms / image | peak RSS MB | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s, row in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        for arm in ("baseline", "cascade"):
            r = row[arm]
            cells = " | ".join(f"{r[m][0]:.2f} ± {r[m][1]:.2f}" for m in METRICS)
            lines.append(f"| {s} | {arm} | {cells} | {r['ms_per_image']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['train_s']:.0f} |")
            pub = PUBLISHED[arm].get(int(s))
            if pub:
                lines.append(f"| {s} | {arm} (published) | " + " | ".join(f"{v:.2f}" for v in pub) + " | | | |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """DSC and recall versus S for both arms, ours and published (the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(s) for s in results["sizes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, idx in ((axes[0], "Dice", 0), (axes[1], "Recall", 3)):
        for arm, style in (("baseline", "s--"), ("cascade", "o-")):
            ax.plot(sizes, [results["sizes"][str(s) if str(s) in results["sizes"] else s][arm][metric][0]
                            for s in sizes], style, label=f"{arm} (ours)")
            pub = [(s, PUBLISHED[arm][s][idx]) for s in sizes if s in PUBLISHED[arm]]
            if pub:
                ax.plot(*zip(*pub), style, alpha=0.4, label=f"{arm} (published)")
        ax.set(xlabel="input size S", ylabel=f"{metric} %", title=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(".tmp_" + path.name)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> None:
    import sys

    p = argparse.ArgumentParser(prog="nnunet-stseg-experiment-kvasir", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/kvasir"))
    p.add_argument("--src", type=Path, default=None, help="Kvasir-SEG folder (default ../shared/data/kvasir-seg)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 128])
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    p.add_argument("-device", "--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="markdown report (a PNG plot is written beside it)")
    args = p.parse_args(argv)
    cmd = ("nnunet-stseg-experiment-kvasir " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    results = run_experiment(args.workdir, args.sizes, args.features, args.epochs, args.iters, args.device,
                             seed=args.seed, limit=args.limit, src=args.src)
    text = report(results, cmd)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot_path = args.out.with_suffix(".png")
        plot(results, plot_path)
        text += f"\n![DSC and recall versus S]({plot_path.name})\n"
        tmp = args.out.with_name(".tmp_" + args.out.name)
        tmp.write_text(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
