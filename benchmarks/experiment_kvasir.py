"""Experiment: segment-then-segment vs the downscaled baseline on Kvasir-SEG (the paper's protocol).

    python -m benchmarks.experiment_kvasir --workdir work_dirs/kvasir --sizes 32 48 64 128

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
and is resumable: finished trainings are kept (re-run the same command; the test predictions and
scores are made again). ``--report_only`` rebuilds the report, plot and overlays from the work
folder's ``results.json`` without training or predicting.

Experiment 2, ``--native``: Kvasir-SEG at its original resolution (332-1920 px wide,
same seeded split), segment-then-segment at each S (default 64 and 128) vs nnU-Net's standard 2d
configuration (its planned patch and sliding window, narrowed to the same width: ``2d_w<width>``),
every network trained with the same width, batch size (``--batch_size``, default 2) and schedule;
scored at native resolution:

    python -m benchmarks.experiment_kvasir --native --sizes 64 128 --workdir work_dirs/kvasir_native \
        --out docs/benchmarks/kvasir_native.md

The default budget (``--epochs 20 --iters 100``, width 16; ``--epochs 4 --iters 50 --batch_size 2``
with ``--native``, where one iteration of nnU-Net 2d at its 640 x 640 patch takes about 8.5 s on a
2-core CPU at batch 2 and over 25 s at batch 8) is sized for a CPU run of about an hour; GPU
users should pass nnU-Net's schedule (``--epochs 1000 --iters 250``), a larger batch and
``-device cuda``.
Each report has example overlays (lowest, median and highest DSC of the cascade) beside it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nnunet_stseg import settings
from nnunet_stseg.adapters.config import (COARSE_RESAMPLINGS, DEFAULT_COARSE_RESAMPLING, DEFAULT_COARSE_TRAINER,
                                          DEFAULT_FINE_TRAINER, coarse_config_name, fine_config_name)
from nnunet_stseg.atomic import write_atomic, write_json_atomic
from benchmarks.kvasir_arms import (MISSED_DICE, per_case_dice, per_image_stats, plot_examples, predict_and_score,
                                   train_arm)
from benchmarks.reports import OVERLAP_HEAD_PERCENT, overlap_cells
from benchmarks.runner import (add_budget_arguments, add_narrow, command_line, command_parser, link_into, pipeline_env,
                               plan_command_line, plan_unless_planned, predict_command_line, raw_dataset, report_header,
                               run, run_measured, set_batch_size, shared_data)

# seed 002 (Segment-then-segment), Table A1, polyp, U-Net backbone: size -> (DSC, IoU, Prec, Rec) mean %
PUBLISHED = {
    "baseline": {32: (72.41, 61.00, 78.23, 74.54), 48: (78.42, 67.78, 80.36, 84.43), 64: (81.76, 72.40, 83.94, 84.84),
                 96: (83.87, 75.13, 84.33, 88.92), 128: (82.86, 74.75, 83.30, 88.93)},
    "cascade": {32: (76.47, 66.77, 82.66, 77.28), 48: (81.68, 73.45, 85.01, 85.76), 64: (83.82, 75.90, 86.32, 86.72),
                96: (85.25, 77.89, 86.01, 89.90), 128: (81.36, 74.58, 82.49, 85.23)},
}


def rescore(results: dict) -> None:
    """Scores of every arm again from its ``summary_test.json`` where the work folder still has it
    (``--report_only``: a report of an earlier run gets today's conventions, e.g. the count of
    empty predictions)."""
    rows = (list(results.get("arms", {}).values())
            + [r for row in results.get("sizes", {}).values() for r in row.values() if isinstance(r, dict)])
    for r in rows:
        summary = Path(r.get("prediction", "")) / "summary_test.json"
        if "prediction" in r and summary.is_file():
            r.update(per_image_stats(summary))


def run_experiment(workdir: Path, sizes: list[int], features: int, epochs: int, iters: int, device: str = "cpu",
                   dataset_id: int = 720, seed: int = 0, limit: int | None = None, src: Path | None = None,
                   batch_size: int | None = None, coarse_resampling: str = "antialiased") -> dict:
    from benchmarks.kvasir import convert_kvasir, install_split, kvasir_ids

    workdir = Path(workdir).resolve()
    env = pipeline_env(workdir, epochs, iters)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    src = Path(src) if src else shared_data() / "kvasir-seg"
    raw = Path(env["nnUNet_raw"])
    ds = raw_dataset(raw, dataset_id)
    if ds is None:
        ids = kvasir_ids(src)[:limit] if limit else None
        ds = convert_kvasir(src, raw, dataset_id, size=256, seed=seed, ids=ids)
    dataset_json = json.loads((ds / "dataset.json").read_text())
    n_test = len(list((ds / "imagesTs").glob("*.png")))
    results = {"sizes": {}, "dataset_folder": str(ds),
               "budget": {"features": features, "epochs": epochs, "iters": iters, "device": device,
                          "seed": seed, "dataset": ds.name, "n_test": n_test, "batch_size": {},
                          "coarse_resampling": coarse_resampling}}
    for s in sizes:
        coarse_c, fine_c = coarse_config_name("2d", s), fine_config_name("2d", s)
        pp_plans = Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json"
        planned = pp_plans.is_file() and coarse_c in json.loads(pp_plans.read_text())["configurations"]
        if not planned:
            run(plan_command_line(dataset_id, s, ("2d",), features, "--set", f"coarse_resampling={coarse_resampling}",
                                  batch_size=batch_size), env, logs / f"plan_{s}.log")
        install_split(ds, Path(env["nnUNet_preprocessed"]) / ds.name)
        configurations = json.loads(pp_plans.read_text())["configurations"]
        results["budget"]["batch_size"][s] = {c: configurations[c]["batch_size"] for c in (coarse_c, fine_c)}
        row = {}
        for arm, config, trainer in (("baseline", coarse_c, DEFAULT_COARSE_TRAINER),
                                     ("cascade", fine_c, DEFAULT_FINE_TRAINER)):
            train_log = logs / f"train_{arm}_{s}.json"
            train_arm(ds.name, config, trainer, device, env, logs / f"train_{arm}_{s}.log", train_log)
            row[arm] = predict_and_score(ds, workdir / f"pred_{arm}_{s}", dataset_id, config, trainer, device, env,
                                          logs / f"predict_{arm}_{s}.log", dataset_json, n_test, train_log)
        results["sizes"][s] = row
        write_json_atomic(results, workdir / "results.json", indent=1)
    return results


def run_native_experiment(workdir: Path, sizes: list[int], features: int, epochs: int, iters: int,
                          batch_size: int = 2, device: str = "cpu", dataset_id: int = 721, seed: int = 0,
                          limit: int | None = None, src: Path | None = None) -> dict:
    """Experiment 2: the cascade at each S vs nnU-Net's standard 2d configuration on
    Kvasir-SEG at native resolution, same width, batch size and schedule for every network."""
    from benchmarks.kvasir import convert_kvasir, install_split, kvasir_ids

    workdir = Path(workdir).resolve()
    env = pipeline_env(workdir, epochs, iters)
    # the test images are predicted below; nnU-Net's final validation (100 native images with
    # mirroring, sliding window) would only add time
    env["STSEG_SKIP_VALIDATION"] = "1"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    src = Path(src) if src else shared_data() / "kvasir-seg"
    raw = Path(env["nnUNet_raw"])
    ds = raw_dataset(raw, dataset_id) or convert_kvasir(src, raw, dataset_id, size=None, seed=seed,
                                                        ids=kvasir_ids(src)[:limit] if limit else None)
    dataset_json = json.loads((ds / "dataset.json").read_text())
    n_test = len(list((ds / "imagesTs").glob("*.png")))
    pp = Path(env["nnUNet_preprocessed"]) / ds.name
    plans_file = pp / "nnUNetPlans.json"
    for s in sizes:
        plan_unless_planned(plans_file, fine_config_name("2d", s),
                            plan_command_line(dataset_id, s, ("2d",), features, batch_size=batch_size), env,
                            logs / f"plan_{s}.log")
    install_split(ds, pp)
    standard = add_narrow(plans_file, features)
    arms = [("nnunet_2d", standard, standard, DEFAULT_COARSE_TRAINER)]
    for s in sizes:
        arms += [(f"coarse_{s}", coarse_config_name("2d", s), coarse_config_name("2d", s), DEFAULT_COARSE_TRAINER),
                 (f"cascade_{s}", coarse_config_name("2d", s), fine_config_name("2d", s), DEFAULT_FINE_TRAINER)]
    # every network gets this run's batch size (the plan's may come from an earlier run's --batch_size)
    configs = {config: set_batch_size(plans_file, config, batch_size) for _, _, config, _ in arms}
    results = {"arms": {}, "budget": {"features": features, "batch_size": batch_size, "epochs": epochs, "iters": iters,
                                      "device": device, "seed": seed, "dataset": ds.name, "n_test": n_test,
                                      "standard_patch": list(configs[standard]["patch_size"])}}
    # cheap networks first: an interrupted run already has every cascade; nnU-Net 2d at its planned
    # patch is by far the slowest network to train on a CPU
    for arm, coarse_config, config, trainer in arms[1:] + arms[:1]:
        train_arm(ds.name, config, trainer, device, env, logs / f"train_{config}.log",
               logs / f"train_{config}.json")
    for arm, coarse_config, config, trainer in arms:
        if arm.startswith("coarse_"):
            continue  # trained as the cascade's first stage; experiment 1 scores it as an arm of its own
        r = predict_and_score(ds, workdir / f"pred_{arm}", dataset_id, config, trainer, device, env,
                               logs / f"predict_{arm}.log", dataset_json, n_test, logs / f"train_{config}.json")
        # the same command on the first test image alone: its wall time is mostly the command's
        # start-up (imports, worker processes, loading the model), which the whole run shares out
        one = link_into(workdir / "one_image", sorted((ds / "imagesTs").glob("*.png"))[:1])
        r["one_image_s"], _ = run_measured(predict_command_line(one, workdir / f"pred_one_{arm}", dataset_id, config,
                                                                trainer, [0], device, "--disable_tta"), env,
                                           logs / f"predict_one_{arm}.log")
        r["ms_per_more_image"] = 1000 * (r["ms_per_image"] * n_test / 1000 - r["one_image_s"]) / max(1, n_test - 1)
        # the mode our predictor chose on this machine, and the same test set in the other one
        # (nnU-Net's worker processes at its default -npp/-nps, or the command's own process)
        in_process = settings.IN_PROCESS_LOG in (logs / f"predict_{arm}.log").read_text()
        other = "workers" if in_process else "in_process"
        seconds, _ = run_measured(predict_command_line(ds / "imagesTs", workdir / f"pred_{other}_{arm}", dataset_id,
                                                       config, trainer, [0], device, "--disable_tta"),
                                  {**env, settings.IN_PROCESS_ENV: "0" if in_process else "1"},
                                  logs / f"predict_{other}_{arm}.log")
        r["mode"] = "in_process" if in_process else "workers"
        r["ms_per_image_by_mode"] = {r["mode"]: r["ms_per_image"], other: 1000 * seconds / n_test}
        if arm.startswith("cascade_"):  # training time of the whole cascade = coarse + fine
            coarse_log = logs / f"train_{coarse_config}.json"
            if coarse_log.is_file():
                r["train_s"] += json.loads(coarse_log.read_text())["seconds"]
        results["arms"][arm] = r
        write_json_atomic(results, workdir / "results.json", indent=1)
    return results


def report_native(results: dict, cmd: str) -> str:
    b = results["budget"]
    mode_words = {"in_process": "in the command's own process", "workers": "with nnU-Net's worker processes"}
    modes = [f"{_native_arm_name(a)} {mode_words[r['mode']]}" for a, r in results["arms"].items() if "mode" in r]
    mode = (" How each arm predicts by default on this machine (our predictors' choice, `docs/design.md`): "
            + ", ".join(modes) + "." if modes else "")
    lines = [*report_header("Kvasir-SEG at native resolution: segment-then-segment vs nnU-Net's standard 2d", cmd),
             f"Budget per network: width {b['features']}, batch {b['batch_size']}, {b['epochs']} x {b['iters']} "
             f"iterations, device {b['device']} (the cascade trains two networks: coarse and fine); split seed "
             f"{b['seed']} (80/10/10), {b['n_test']} test images scored at their native resolution. nnU-Net 2d = "
             f"its planned configuration (patch {' x '.join(map(str, b['standard_patch']))}, sliding window) "
             f"narrowed to the same width. Test images predicted with `nnUNetv2_predict --disable_tta` (ms / "
             f"image = wall time of that command over the test set, model loading included; 'one image s' = the "
             f"same command on the first test image alone, mostly its start-up; 'ms / further image' = (whole "
             f"run - one image) / (images - 1): the cost of each image once the command runs); nnU-Net's final "
             f"validation skipped (`STSEG_SKIP_VALIDATION=1`).{mode} 'ms / image in process' and 'ms / image, "
             f"workers' = the whole test set in each mode (`{settings.IN_PROCESS_ENV}=1` / `=0`, nnU-Net's -npp 3 "
             "-nps 3); one of the two is the default run.", "",
             f"| arm | {OVERLAP_HEAD_PERCENT} | ms / image | one image s | ms / further image | ms / image in process "
             "| ms / image, workers | peak RSS MB | train s |",
             "|---" * 13 + "|"]
    for arm, r in results["arms"].items():
        cells = overlap_cells(r, digits=2)
        by_mode = r.get("ms_per_image_by_mode", {})
        lines.append(f"| {_native_arm_name(arm)} | {cells} | "
                     f"{r['ms_per_image']:.0f} | {r.get('one_image_s', float('nan')):.1f} | "
                     f"{r.get('ms_per_more_image', float('nan')):.0f} | "
                     f"{by_mode.get('in_process', float('nan')):.0f} | {by_mode.get('workers', float('nan')):.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['train_s']:.0f} |")
    return "\n".join(lines + ["", *native_findings(results)]) + "\n"


def _native_arm_name(arm: str) -> str:
    return arm.replace("_", " S = ") if arm.startswith("cascade") else "nnU-Net 2d"


def native_findings(results: dict) -> list[str]:
    """Each cascade against nnU-Net 2d in words (the question: within 2 DSC points while
    predicting faster?) and what one training iteration of nnU-Net 2d costs at this budget."""
    arms, b = results["arms"], results["budget"]
    base = arms.get("nnunet_2d")
    if base is None:
        return []
    out = []
    for arm, r in arms.items():
        if not arm.startswith("cascade_"):
            continue
        gap = r["Dice"][0] - base["Dice"][0]
        speed = base["ms_per_image"] / max(r["ms_per_image"], 1e-9)
        more = r.get("ms_per_more_image", float("nan")) / base.get("ms_per_more_image", float("nan"))
        same_mode = {m: r.get("ms_per_image_by_mode", {}).get(m, float("nan"))
                     / base.get("ms_per_image_by_mode", {}).get(m, float("nan")) for m in ("workers", "in_process")}
        verdict = ("ahead in DSC" if gap > 0 else "within 2 DSC points" if gap >= -2
                   else "more than 2 DSC points behind") + (", predicting faster" if speed > 1 else ", not faster")
        out.append(f"- Cascade at S = {arm.split('_')[1]} vs nnU-Net 2d: DSC {gap:+.2f} points, recall "
                   f"{r['Recall'][0] - base['Recall'][0]:+.2f}, inference {speed:.1f} x faster ({1 / speed:.2f} x "
                   f"its time per image; {more:.2f} x per further image; both arms with nnU-Net's workers "
                   f"{same_mode['workers']:.2f} x, both in process {same_mode['in_process']:.2f} x), "
                   f"training {r['train_s']:.0f} vs {base['train_s']:.0f} s: {verdict}.")
    iterations = b["epochs"] * b["iters"]
    out.append(f"- One training iteration of nnU-Net 2d (patch {' x '.join(map(str, b['standard_patch']))}, batch "
               f"{b['batch_size']}) took {base['train_s'] / iterations:.1f} s here (its {iterations} iterations, "
               "start-up included): that cost is what sets this budget on a 2-core CPU.")
    return out


def miss_breakdown(results: dict) -> list[str]:
    """Where the cascade gains and where it cannot: the cascade's coarse stage IS the baseline model at
    the same S, so an image the baseline misses (DSC < 0.1) gets no useful crop. Splitting the test
    images by that tells a detection limit from a refinement limit."""
    lines = ["| S | images the baseline misses (DSC < 0.1) | baseline DSC % on the rest | cascade DSC % on the rest "
             "| cascade DSC % on the missed |", "|---|---|---|---|---|"]
    for s, row in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        files = [Path(row[arm]["prediction"]) / "summary_test.json" for arm in ("baseline", "cascade")]
        if not all(f.is_file() for f in files):
            return []
        base, casc = (per_case_dice(f) for f in files)
        cases = sorted(base)
        b = np.array([base[c] for c in cases])
        c = np.array([casc[c] for c in cases])
        missed = b < MISSED_DICE
        on_missed = f"{100 * c[missed].mean():.2f}" if missed.any() else "-"
        lines.append(f"| {s} | {int(missed.sum())} of {len(cases)} | {100 * b[~missed].mean():.2f} | "
                     f"{100 * c[~missed].mean():.2f} | {on_missed} |")
    return ["", "Detection vs refinement (the cascade's coarse stage is the baseline model of the same S):", "",
            *lines]


COARSE_RESAMPLING_WORDS = {
    "antialiased": "antialiased linear interpolation in torch (`sts.coarse_resampling` antialiased, since 0.8)",
    "nnunet": "nnU-Net's resampling function of the plans (cubic spline, no antialiasing; before 0.8)"}


def report(results: dict, cmd: str) -> str:
    b = results["budget"]
    lines = [*report_header("Kvasir-SEG: segment-then-segment vs downscaled baseline", cmd),
             f"Budget per arm: width {b['features']}, {b['epochs']} x {b['iters']} iterations, device {b['device']}; "
             f"split seed {b['seed']} (80/10/10), {b['n_test']} test images scored at 256 x 256."
             + (" Batch size (baseline / fine) per S: " + ", ".join(
                 f"{s}: {' / '.join(str(v) for v in bs.values())}" for s, bs in b["batch_size"].items()) + "."
                if b.get("batch_size") else "")
             + f" Coarse images (baseline and the cascade's first stage) resampled by: "
               f"{COARSE_RESAMPLING_WORDS[b.get('coarse_resampling', 'nnunet')]}.", "",
             f"| S | arm | {OVERLAP_HEAD_PERCENT} | ms / image | peak RSS MB | train s |",
             "|---" * 10 + "|"]
    for s, row in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        for arm in ("baseline", "cascade"):
            r = row[arm]
            cells = overlap_cells(r, digits=2)
            lines.append(f"| {s} | {arm} | {cells} | {r['ms_per_image']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['train_s']:.0f} |")
            pub = PUBLISHED[arm].get(int(s))
            if pub:
                lines.append(f"| {s} | {arm} (published) | " + " | ".join(f"{v:.2f}" for v in pub) + " | | | | |")
    lines += miss_breakdown(results)
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """DSC and recall versus S for both arms, ours and published (the paper's Figure 2); the size
    keys of ``results["sizes"]`` are ints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(s) for s in results["sizes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, idx in ((axes[0], "Dice", 0), (axes[1], "Recall", 3)):
        for arm, style in (("baseline", "s--"), ("cascade", "o-")):
            ax.plot(sizes, [results["sizes"][s][arm][metric][0] for s in sizes], style, label=f"{arm} (ours)")
            pub = [(s, PUBLISHED[arm][s][idx]) for s in sizes if s in PUBLISHED[arm]]
            if pub:
                ax.plot(*zip(*pub), style, alpha=0.4, label=f"{arm} (published)")
        ax.set(xlabel="input size S", ylabel=f"{metric} %", title=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, figure=fig, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = command_parser("experiment_kvasir", __doc__)
    p.add_argument("--workdir", type=Path, default=None,
                   help="default work_dirs/kvasir (work_dirs/kvasir_native with --native)")
    p.add_argument("--src", type=Path, default=None, help="Kvasir-SEG folder (default kvasir-seg/ in the --data folder)")
    p.add_argument("--native", action="store_true",
                   help="experiment 2: native resolution, cascade at each S vs nnU-Net's standard 2d")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes S (default 32 48 64 128; "
                                                                      "64 128 with --native)")
    add_budget_arguments(p, features=16, batch_size=None, epochs=None, iters=None,
                         helps={"batch_size": "batch size of every network (default: the plan's; 2 with --native)",
                                "epochs": "epochs of every network (default 20; 4 with --native)",
                                "iters": "iterations per epoch (default 100; 50 with --native)"})
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    p.add_argument("--coarse_resampling", choices=COARSE_RESAMPLINGS, default=DEFAULT_COARSE_RESAMPLING,
                   help="256 x 256 experiment: how the coarse configurations are resampled (`nnunet-stseg plan "
                        "--coarse_resampling`; nnunet = versions before 0.8)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown report (its plot and example overlays are written beside it)")
    p.add_argument("--report_only", action="store_true",
                   help="rebuild the report from the work folder's results.json (no training, no prediction)")
    args = p.parse_args(argv)
    # nnU-Net 2d at Kvasir's planned 640 x 640 patch: about 8.5 s per iteration at batch 2 on a 2-core CPU
    args.epochs = args.epochs or (4 if args.native else 20)
    args.iters = args.iters or (50 if args.native else 100)
    cmd = command_line(p, argv)
    workdir = args.workdir or Path("work_dirs/kvasir_native" if args.native else "work_dirs/kvasir")
    results_file = Path(workdir).resolve() / "results.json"
    native = args.native
    if args.report_only:
        if not results_file.is_file():
            p.error(f"--report_only: {results_file} does not exist; run the experiment first")
        results = json.loads(results_file.read_text())
        cmd = results.get("command", cmd)
        native = "arms" in results  # the native experiment's results have arms, not sizes
        rescore(results)
    elif native:
        results = run_native_experiment(workdir, args.sizes or [64, 128], args.features, args.epochs, args.iters,
                                        args.batch_size or 2, args.device, seed=args.seed, limit=args.limit,
                                        src=args.src)
    else:
        results = run_experiment(workdir, args.sizes or [32, 48, 64, 128], args.features, args.epochs, args.iters,
                                 args.device, seed=args.seed, limit=args.limit, src=args.src,
                                 batch_size=args.batch_size, coarse_resampling=args.coarse_resampling)
    if not args.report_only:
        results["command"] = cmd
        write_json_atomic(results, results_file, indent=1)
    if native:
        text = report_native(results, cmd)
        predictions = {arm: Path(r["prediction"]) for arm, r in results["arms"].items()}
        ranked_by = next(arm for arm in results["arms"] if arm.startswith("cascade"))
        ds = next((Path(workdir).resolve() / "nnUNet_raw").glob("Dataset721_*"))
    else:
        # JSON turns the size keys into strings
        results["sizes"] = {int(s): row for s, row in results["sizes"].items()}
        text = report(results, cmd)
        sizes = sorted(results["sizes"])
        s = 64 if 64 in sizes else sizes[0]
        predictions = {f"{arm} S = {s}": Path(results["sizes"][s][arm]["prediction"]) for arm in ("baseline", "cascade")}
        ranked_by = f"cascade S = {s}"
        ds = Path(results["dataset_folder"])
    print(text)
    if args.out is not None:
        if not native:
            plot_path = args.out.with_suffix(".png")
            plot(results, plot_path)
            text += f"\n![DSC and recall versus S]({plot_path.name})\n"
        examples = plot_examples(ds, predictions, ranked_by, args.out.with_name(args.out.stem + "_examples.png"))
        if examples is not None:
            text += (f"\nTest images with the lowest, median and highest DSC of {ranked_by} (ground truth green, "
                     f"prediction red):\n\n![examples]({examples.name})\n")
        write_atomic(args.out, text)


if __name__ == "__main__":
    main()
