"""The end-to-end crop-guided network on Kvasir-SEG at 256 x 256 (seed 003, section 5.2).

Arms per S, all scored on the same 100 test images of the seeded split with the stock
``nnUNetv2_predict`` (TTA off): the downscaled baseline (the coarse model), our two-stage cascade
(coarse + fine), and the end-to-end model with the thesis's box rule (one box around all coarse
foreground) and with the cascade's per-object boxes. Both end-to-end models start from the SAME
coarse model (the thesis's pre-training on downscaled images) and train for the same schedule as
every other network: the cascade's and the end-to-end model's budgets are both two networks'
worth (coarse + fine, or coarse pre-training + joint training). The box rule used by default is
chosen on the 100 validation images, never on the test images.

It shares the work folder of ``python -m benchmarks.experiment_recall`` (same split, plans, coarse and
fine models; whatever is missing is trained here) and keeps its own ``results_e2e.json``.

    python -m benchmarks.experiment_e2e --sizes 32 64
    python -m benchmarks.experiment_e2e --sizes 32 --runs 2 --out docs/benchmarks/kvasir_e2e.md   # a second run at 32

GPU users: ``--epochs 1000 --iters 250 -device cuda``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nnunet_stseg.adapters.config import (DEFAULT_COARSE_TRAINER, DEFAULT_E2E_TRAINER, DEFAULT_FINE_TRAINER,
                                          coarse_config_name, e2e_config_name, fine_config_name)
from nnunet_stseg.adapters.results import model_folder
from nnunet_stseg.atomic import write_json_atomic
from benchmarks.kvasir_arms import (FAILED_JACCARD, failed_segmentations, kvasir_work_folder, plan_size,
                                   plot_examples, predict_and_score, train_arm)
from benchmarks.reports import OVERLAP_HEAD_PERCENT, overlap_cells
from benchmarks.runner import (add_budget_arguments, command_line, command_parser, publish_with_examples,
                               record_command, report_header, results_or_run)

ARMS = (("baseline", "downscaled baseline (coarse model)"), ("cascade", "two-stage cascade"),
        ("e2e_all", "end-to-end, one box around all (thesis)"), ("e2e_objects", "end-to-end, a box per object"))
RULES = {"e2e_all": "all", "e2e_objects": "objects"}  # the end-to-end arms (their first run) and box rules
# the coarse module of an end-to-end model alone, as a downscaled baseline: what joint training did to it
COARSE_MODULES = {"coarse_of_e2e_all": ("e2e_all", "its coarse module alone (thesis rule, run 1)"),
                  "coarse_of_e2e_objects": ("e2e_objects", "its coarse module alone (box per object, run 1)")}
# seed 003, Table 5.5 (skin lesions, 5-fold): U-Net vs end-to-end DSC % (mean), published
PUBLISHED = {"DermIS 64": (85.51, 87.01), "DermIS 128": (86.53, 88.82), "DermQuest 64": (87.75, 87.83),
             "DermIS -> DermQuest 64": (77.11, 80.94), "DermIS -> DermQuest 128": (80.20, 79.61)}


def run_suffix(run: int) -> str:
    """Arm and configuration names of a repeated training: nothing for the first run, ``_r2``, ..."""
    return "" if run == 1 else f"_r{run}"


def e2e_variant_name(size: int, rule: str, run: int = 1) -> str:
    """``2d_sts_e2e_S`` for the thesis's rule, ``2d_sts_e2e_S_objects`` for per-object boxes;
    ``_rK`` for the K-th training run of the same configuration (K > 1)."""
    return e2e_config_name("2d", size) + ("" if rule == "all" else f"_{rule}") + run_suffix(run)


def add_e2e_variants(plans_file: Path, size: int, runs: int = 1) -> dict[str, str]:
    """The end-to-end configurations of S (one per box rule and training run, copies of the fine
    one: same data, crop parameters and coarse model). Returns arm -> configuration name."""
    from nnunet_stseg.planners.sts_planner import e2e_configuration

    plans = json.loads(plans_file.read_text())
    configs = plans["configurations"]
    names = {}
    for k in range(1, runs + 1):
        for arm, rule in RULES.items():
            name = e2e_variant_name(size, rule, k)
            configs[name] = e2e_configuration(configs[fine_config_name("2d", size)], {"box_rule": rule})
            names[arm + run_suffix(k)] = name
    write_json_atomic(plans, plans_file, indent=1)
    return names


def coarse_module_model(results_root: Path, dataset: str, size: int, e2e_config: str, fold: int = 0) -> str:
    """A coarse-configuration model folder whose network is the coarse module of the end-to-end
    model ``e2e_config`` (fold ``fold``), so that the stock ``nnUNetv2_predict`` runs it as a
    downscaled baseline (nnU-Net's resampled input, as the coarse model it started from). Returns
    the configuration name to predict with (``-tr nnUNetTrainer_StSCoarse``)."""
    import shutil

    import torch

    coarse = coarse_config_name("2d", size)
    name = f"{coarse}_of_{e2e_config}"
    src = model_folder(dataset, DEFAULT_COARSE_TRAINER, coarse, results_root=results_root)
    dst = model_folder(dataset, DEFAULT_COARSE_TRAINER, name, results_root=results_root)
    target = dst / f"fold_{fold}" / "checkpoint_final.pth"
    if target.is_file():
        return name
    (dst / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "dataset.json", dst / "dataset.json")
    plans = json.loads((src / "plans.json").read_text())
    plans["configurations"][name] = dict(plans["configurations"][coarse])
    write_json_atomic(plans, dst / "plans.json", indent=1)
    checkpoint = torch.load(src / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    e2e = torch.load(model_folder(dataset, DEFAULT_E2E_TRAINER, e2e_config, results_root=results_root) / f"fold_{fold}"
                     / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    checkpoint["network_weights"] = {k[len("coarse."):]: v for k, v in e2e.items() if k.startswith("coarse.")}
    torch.save(checkpoint, target.with_name(".tmp_checkpoint_final.pth"))
    target.with_name(".tmp_checkpoint_final.pth").replace(target)
    return name


def run_experiment(workdir: Path, sizes: list[int], features: int, epochs: int, iters: int, batch_size: int | None,
                   device: str, seed: int = 0, limit: int | None = None, src: Path | None = None,
                   dataset_id: int = 720, runs: int = 1) -> dict:
    w = kvasir_work_folder(workdir, epochs, iters, seed, limit, src, dataset_id)
    workdir, env, logs, ds, dataset_json = w.workdir, w.env, w.logs, w.ds, w.dataset_json
    n_test, val_images, val_labels, n_val = w.n_test, w.val_images, w.val_labels, w.n_val
    results_file = workdir / "results_e2e.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    plans_file = Path(env["nnUNet_preprocessed"]) / ds.name / "nnUNetPlans.json"
    results.update({"dataset_folder": str(ds), "budget": {
        "features": features, "epochs": epochs, "iters": iters, "device": device, "seed": seed, "dataset": ds.name,
        "n_test": n_test, "n_val": n_val, "batch_size": batch_size}})
    results.setdefault("sizes", {})

    def save() -> None:
        write_json_atomic(results, results_file, indent=1)

    for s in sizes:
        plan_size(w, dataset_id, s, features, batch_size)
        row = results["sizes"].setdefault(str(s), {})
        row["S"] = s
        row["runs"] = n_runs = max(runs, int(row.get("runs", 1)))  # a later call with fewer runs keeps the others
        configs = {"baseline": (coarse_config_name("2d", s), DEFAULT_COARSE_TRAINER),
                   "cascade": (fine_config_name("2d", s), DEFAULT_FINE_TRAINER),
                   **{arm: (name, DEFAULT_E2E_TRAINER)
                      for arm, name in add_e2e_variants(plans_file, s, n_runs).items()}}
        train = {}
        for arm, (config, trainer) in configs.items():  # the coarse model first: the end-to-end models start from it
            train[arm] = logs / f"train_{config}.json"
            train_arm(ds.name, config, trainer, device, env, logs / f"train_{config}.log", train[arm])
        e2e_arms = [a for a in configs if a.startswith("e2e_")]
        for arm in e2e_arms:  # the box rule is chosen on the validation images
            key = f"val_{arm}"
            if key not in row:
                config, trainer = configs[arm]
                row[key] = predict_and_score(ds, workdir / f"pred_{key}_{s}", dataset_id, config, trainer, device, env,
                                             logs / f"predict_{key}_{s}.log", dataset_json, n_val, train[arm],
                                             val_images, val_labels)
                save()
        row["chosen_rule"] = max(RULES, key=lambda a: validation_dice(row, a, n_runs))
        for arm, (e2e_arm, _) in COARSE_MODULES.items():
            configs[arm] = (coarse_module_model(Path(env["nnUNet_results"]), ds.name, s, configs[e2e_arm][0]),
                            DEFAULT_COARSE_TRAINER)
            train[arm] = Path("no training")
        for arm, (config, trainer) in configs.items():
            if arm not in row:
                out = workdir / f"pred_e2e_exp_{arm}_{s}"
                row[arm] = predict_and_score(ds, out, dataset_id, config, trainer, device, env,
                                             logs / f"predict_e2e_exp_{arm}_{s}.log", dataset_json, n_test, train[arm])
                row[arm]["failed"] = failed_segmentations(out)
                save()
        save()
    return results


def validation_dice(row: dict, arm: str, runs: int) -> float:
    """Mean validation DSC % of an end-to-end arm over its training runs."""
    return float(np.mean([row[f"val_{arm}{run_suffix(r)}"]["Dice"][0] for r in range(1, runs + 1)]))


def _train_cell(row: dict, arm: str) -> str:
    """Training seconds of the arm's networks: the coarse model, plus the fine or joint training."""
    coarse = row["baseline"]["train_s"]
    if arm in COARSE_MODULES:
        return "(the end-to-end model's)"
    return f"{coarse:.0f}" if arm == "baseline" else f"{coarse:.0f} + {row[arm]['train_s']:.0f}"


def arm_labels(runs: int) -> list[tuple[str, str]]:
    """Every arm of the report with its label (the end-to-end arms once per training run)."""
    out = []
    for arm, label in ARMS:
        out.append((arm, label + (" (run 1)" if arm in RULES and runs > 1 else "")))
        if arm in RULES:
            out += [(arm + run_suffix(r), f"{label} (run {r})") for r in range(2, runs + 1)]
    return out + [(arm, label) for arm, (_, label) in COARSE_MODULES.items()]


def report(results: dict, cmd: str) -> str:
    b = results["budget"]
    runs = max(int(row.get("runs", 1)) for row in results["sizes"].values()) if results["sizes"] else 1
    lines = [*report_header("Kvasir-SEG: the end-to-end crop-guided network", cmd),
             f"Budget per network: width {b['features']}, {b['epochs']} x {b['iters']} iterations, batch size "
             f"{b['batch_size'] or 'planned'}, device {b['device']}; split seed {b['seed']} (80/10/10), images at "
             f"256 x 256; {b['n_test']} test images, the box rule chosen on the {b['n_val']} validation images. "
             f"The end-to-end models start from the baseline's coarse model (the thesis's pre-training) and train "
             f"for one more schedule, like the cascade's fine stage: every arm but the baseline costs two networks' "
             f"training. At this budget the same arm varies by 2-4 DSC points between runs; the end-to-end models "
             f"and the cascade share one coarse model per S (a paired comparison), and each end-to-end model was "
             + ("trained once." if runs == 1 else f"trained up to {runs} times from it (runs listed separately).")
             + " The last rows score the end-to-end models' coarse modules alone, as downscaled baselines (what the "
             "joint training did to the coarse model they started from).", ""]
    for s, row in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        runs = int(row.get("runs", 1))
        val = {RULES[a]: " / ".join(f"{row[k]['Dice'][0]:.2f}" for r in range(1, runs + 1)
                                    if (k := f"val_{a}{run_suffix(r)}") in row) for a in RULES}
        lines += [f"## S = {s}", "",
                  "Validation DSC % per box rule (per run): " + ", ".join(f"{rule}: {d}" for rule, d in val.items())
                  + (f"; chosen (mean over runs): {RULES[row['chosen_rule']]}." if "chosen_rule" in row else "."),
                  "",
                  f"| arm | {OVERLAP_HEAD_PERCENT} | failed (Jaccard < {FAILED_JACCARD}) | ms / image | "
                  f"training s (coarse + second network) |", "|---" * 10 + "|"]
        for arm, label in arm_labels(runs):
            if arm in row:
                r = row[arm]
                lines.append(f"| {label} | {overlap_cells(r, digits=2)} | {r.get('failed', '-')} | "
                             f"{r['ms_per_image']:.0f} | {_train_cell(row, arm)} |")
        lines.append("")
    lines += ["Published (seed 003, Table 5.5, skin lesions, 5-fold, DSC %: U-Net -> end-to-end): "
              + "; ".join(f"{k}: {u:.2f} -> {e:.2f}" for k, (u, e) in PUBLISHED.items()) + ".", ""]
    return "\n".join(lines) + "\n"


def example_figure(results: dict, path: Path) -> Path | None:
    """Overlays of every arm at the smallest S on the test images with the lowest, median and highest
    DSC of the end-to-end model with the thesis's box rule."""
    sizes = sorted(results.get("sizes", {}), key=int)
    if not sizes:
        return None
    s, row = sizes[0], results["sizes"][sizes[0]]
    predictions = {f"{arm} S = {s}": Path(row[arm]["prediction"]) for arm, _ in ARMS if arm in row}
    ranked = f"e2e_all S = {s}"
    if ranked not in predictions:
        return None
    return plot_examples(Path(results["dataset_folder"]), predictions, ranked, path)


def main(argv=None) -> None:
    p = command_parser("experiment_e2e", __doc__)
    p.add_argument("--workdir", type=Path, default=Path("work_dirs/kvasir_recall"),
                   help="work folder, shared with benchmarks.experiment_recall (work_dirs/kvasir_recall)")
    p.add_argument("--src", type=Path, default=None, help="Kvasir-SEG folder (default kvasir-seg/ in the --data folder)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="input sizes S (32 64)")
    add_budget_arguments(p, features=16, batch_size=16, epochs=30, iters=50)
    p.add_argument("--runs", type=int, default=1,
                   help="training runs of every end-to-end model, all from the same coarse model (1); a later call "
                        "with more runs adds the missing ones")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    p.add_argument("--out", type=Path, default=None, help="markdown report")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from results_e2e.json")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    results = results_or_run(p, args.report_only, args.workdir.resolve() / "results_e2e.json", lambda: run_experiment(
        args.workdir, args.sizes, args.features, args.epochs, args.iters, args.batch_size, args.device,
        seed=args.seed, limit=args.limit, src=args.src, runs=args.runs), cmd)
    commands = record_command(results, cmd, args.workdir.resolve() / "results_e2e.json", args.report_only)
    publish_with_examples(report(results, commands), args.out, lambda path: example_figure(results, path),
                          "Test images with the lowest, median and highest DSC of the end-to-end model (thesis rule) "
                          "at the smallest S")

if __name__ == "__main__":
    main()
