"""What the experiments and benchmarks share: the stock nnU-Net commands run as a user would
(:mod:`nnunet_stseg.commands.pipeline`, re-exported here), resumable training, plans edits for
narrow networks, per-patient splits, where the real data are, and the header every report carries.

A new experiment starts here instead of copying from another one. Run from a checkout's root:
``.venv/bin/python -m benchmarks.<module> ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np

from nnunet_stseg.adapters.results import model_folder
from nnunet_stseg.atomic import write_json_atomic
from nnunet_stseg.commands.pipeline import (evaluate, find_command, pipeline_env, plan_command_line,
                                            predict_command_line, run, run_measured, train_command_line)

# the checkout (this folder is never installed), and the project's shared data next to it
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "STSEG_DATA"
_data_folder: Path | None = None  # set by --data


def shared_data() -> Path:
    """Where the experiments find the real datasets: ``--data DIR`` (every command of this folder
    takes it), else ``$STSEG_DATA``, else ``../shared/data`` next to the checkout."""
    if _data_folder is not None:
        return _data_folder
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else REPO_ROOT.parent / "shared" / "data"


class _DataFolder(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        global _data_folder
        _data_folder = Path(value).resolve()
        setattr(namespace, self.dest, _data_folder)


def raw_dataset(raw_root: Path | str, dataset_id: int) -> Path | None:
    """The folder ``Dataset<id>_*`` under ``raw_root`` (the first by name; None when there is none
    or no such root): a dataset an earlier run converted, or a shared one.

    >>> raw_dataset("/nonexistent", 704) is None
    True
    """
    raw_root = Path(raw_root)
    return next(iter(sorted(raw_root.glob(f"Dataset{int(dataset_id):03d}_*"))), None) if raw_root.is_dir() else None


def command_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.<name>`` (its docstring as the help text), with ``--data``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action=_DataFolder, default=None, metavar="DIR",
                        help=f"folder of the real datasets (default ${DATA_ENV}, else ../shared/data next to the "
                             f"checkout: {REPO_ROOT.parent / 'shared' / 'data'})")
    return parser


def add_budget_arguments(parser: argparse.ArgumentParser, *, features: int, batch_size: int | None, epochs: int | None,
                         iters: int | None, folds: int | None = None, helps: dict[str, str] | None = None) -> None:
    """The training budget every experiment takes, with its own defaults: ``--features``,
    ``--batch_size``, ``--epochs``, ``--iters`` (per network), ``--folds`` (when given), ``--seed``
    and ``-device``. ``helps`` replaces the help text of an option (by its name)."""
    helps = {"features": "U-Net base width of every network", "batch_size": "batch size of every network",
             "epochs": "epochs of every network", "iters": "training iterations per epoch",
             "folds": "per-patient cross-validation folds", **(helps or {})}
    for name, default in (("features", features), ("batch_size", batch_size), ("epochs", epochs), ("iters", iters),
                          ("folds", folds)):
        if name != "folds" or folds is not None:
            parser.add_argument(f"--{name}", type=int, default=default,
                                help=helps[name] + (f" ({default})" if default is not None and "(" not in helps[name]
                                                    else ""))
    parser.add_argument("--seed", type=int, default=0, help="split seed (0)")
    parser.add_argument("-device", "--device", default="cpu", help="device of every nnU-Net command (cpu)")


def command_line(parser: argparse.ArgumentParser, argv) -> str:
    """The command as typed, for the report (``python -m benchmarks.<name> <arguments>``)."""
    return " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)]).strip()


def plan_unless_planned(plans_file: Path, configuration: str, plan_cmd: list[str], env: dict, log: Path) -> None:
    """Run ``plan_cmd`` (an ``nnunet-stseg plan`` line) unless ``plans_file`` already holds
    ``configuration``: a re-run experiment keeps its plans and preprocessed data."""
    if Path(plans_file).is_file() and configuration in json.loads(Path(plans_file).read_text())["configurations"]:
        return
    run(plan_cmd, env, log)


def train_fold(dataset: str, config: str, fold: int, trainer: str, device: str, env: dict, log: Path,
               need_validation: bool = False, start_flags: tuple[str, ...] = (),
               plans: str = "nnUNetPlans") -> float | None:
    """Train one fold with the stock ``nnUNetv2_train`` unless it is finished, so that a re-run
    experiment resumes where it stopped: an interrupted training continues with ``--c``; with
    ``need_validation``, a finished one without its validation gets only ``--val``. ``start_flags``
    go only to a fresh start (e.g. ``-pretrained_weights FILE``); ``plans``: ``-p``. Returns the
    wall seconds, or None when there was nothing to do."""
    fold_dir = model_folder(dataset, trainer, config, plans, results_root=env["nnUNet_results"]) / f"fold_{fold}"
    finished = (fold_dir / "checkpoint_final.pth").is_file()
    if finished and not (need_validation and not (fold_dir / "validation" / "summary.json").is_file()):
        return None
    extra = ["--val"] if finished else ["--c"] if (fold_dir / "checkpoint_latest.pth").is_file() else list(start_flags)
    plans_flag = [] if plans == "nnUNetPlans" else ["-p", plans]
    return run(train_command_line(dataset, config, fold, trainer, device, *plans_flag, *extra), env, log)


def per_patient_split(case_ids: list[str], n_folds: int, seed: int) -> list[dict]:
    """nnU-Net ``splits_final.json`` content: patients shuffled with ``seed``, dealt into folds."""
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    folds = [sorted(str(c) for c in order[f::n_folds]) for f in range(n_folds)]
    return [{"train": sorted(c for g, fold in enumerate(folds) if g != f for c in fold), "val": folds[f]}
            for f in range(n_folds)]


def add_narrow(plans_file: Path, features: int, base: str = "2d") -> str:
    """Add ``<base>_w<features>`` to the plans: nnU-Net's planned configuration ``base`` (same
    patch, same preprocessed data) with a narrower U-Net. Returns its name."""
    from nnunet_stseg.planners.sts_planner import set_width

    plans = json.loads(plans_file.read_text())
    name = f"{base}_w{features}"
    if name not in plans["configurations"]:
        cfg = deepcopy(plans["configurations"][base])
        set_width(cfg, features, None)
        plans["configurations"][name] = cfg
        write_json_atomic(plans, plans_file, indent=1)
    return name


def set_batch_size(plans_file: Path, configuration: str, batch_size: int) -> dict:
    """Give a configuration the experiment's batch size; returns the configuration."""
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][configuration]
    if cfg["batch_size"] != int(batch_size):
        cfg["batch_size"] = int(batch_size)
        write_json_atomic(plans, plans_file, indent=1)
    return cfg


def results_or_run(parser: argparse.ArgumentParser, report_only: bool, results_file: Path, run_experiment,
                   cmd: str) -> dict:
    """An experiment's results: with ``report_only`` those of ``results_file`` (an error when the
    experiment has not run), else ``run_experiment()``'s, recorded with the command line that made
    them in ``results_file``."""
    from nnunet_stseg.atomic import write_json_atomic

    if report_only:
        if not results_file.is_file():
            parser.error(f"--report_only: {results_file} does not exist; run the experiment first")
        return json.loads(results_file.read_text())
    results = run_experiment()
    results["command"] = cmd
    write_json_atomic(results, results_file, indent=1)
    return results


def record_command(results: dict, cmd: str, results_file: Path, report_only: bool = False) -> str:
    """Add ``cmd`` to the results' ``commands`` (the calls that made them, in order: a later call
    may add sizes, folds or runs to an earlier one's) and save them; returns the commands joined
    with ``&&`` for the report's header. With ``report_only`` (``cmd`` only rebuilds the report)
    nothing is recorded: the commands the results hold (or the one ``command`` of older results)."""
    if report_only:
        return " && ".join(results.get("commands") or [results.get("command", cmd)])
    commands = results.setdefault("commands", [])
    if cmd not in commands:
        commands.append(cmd)
        write_json_atomic(results, results_file, indent=1)
    return " && ".join(commands)


def publish_with_examples(text: str, out: Path | None, figure, caption: str) -> None:
    """:func:`publish_report`; with ``out``, the example figure ``figure(<out stem>_examples.png)``
    (None when it cannot be drawn) is drawn beside it and the report links it under ``caption``."""
    from benchmarks.reports import examples_markdown

    if out is not None:
        text += examples_markdown(figure(out.with_name(out.stem + "_examples.png")), caption)
    publish_report(text, out)


def publish_report(text: str, out: Path | None) -> None:
    """Print a report and, with ``out``, write it there (atomically)."""
    from nnunet_stseg.atomic import write_atomic

    print(text)
    if out is not None:
        write_atomic(out, text)


def report_header(title: str, command: str) -> list[str]:
    """The first lines of every report: its title, the command that regenerates it and the
    machine it ran on (markdown, two trailing spaces = line break)."""
    return [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {machine_line()}  "]


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, no GPU used; torch {torch.__version__}, "
            f"Python {platform.python_version()}")



CARDIAC_FAT_ID = 701  # the shared Cardiac Fat CT dataset (../shared/data/nnUNet_raw/Dataset701_*)


def prepare_cardiac(workdir: Path, env: dict, folds: int, seed: int, dataset: Path | None = None,
                    limit: int | None = None, val_patients: int = 0) -> tuple[Path, list[tuple[int, list[Path]]]]:
    """Raw dataset read in place, per-patient split; returns the dataset and per fold the images
    of its held-out patients. ``dataset``: another raw 3D dataset folder (default: the shared
    Cardiac Fat CT); ``limit``: its first N patients only (linked under the work folder; smoke runs).
    ``val_patients``: 0 = nnU-Net's validation of fold f is its held-out patients (fixed schedules,
    nothing chosen on them); N > 0 = N of fold f's training patients (drawn with ``seed``) are
    nnU-Net's validation instead, so that a plateau rule stops on patients the scores never see."""
    if dataset is None:
        raw = shared_data() / "nnUNet_raw"
        ds = raw_dataset(raw, CARDIAC_FAT_ID)
        if ds is None:
            raise SystemExit(f"Cardiac Fat CT dataset (Dataset{CARDIAC_FAT_ID}_*) not found under {raw}")
    else:
        ds = Path(dataset).resolve()
        if not (ds / "dataset.json").is_file() or not (ds / "labelsTr").is_dir():
            raise SystemExit(f"{ds} is not an nnU-Net raw dataset folder (dataset.json and labelsTr/ expected)")
    if limit:
        ds = linked_subset(ds, Path(workdir).resolve() / "nnUNet_raw", limit)
    env["nnUNet_raw"] = str(ds.parent)
    case_ids = sorted(p.name[:-len(".nii.gz")] for p in (ds / "labelsTr").glob("*.nii.gz"))
    splits = per_patient_split(case_ids, folds, seed)
    nnunet_splits = splits
    if val_patients:
        rng = np.random.default_rng(seed)
        nnunet_splits = []
        for split in splits:
            if val_patients >= len(split["train"]):
                raise SystemExit(f"--val_patients {val_patients}: a fold trains on only {len(split['train'])} patients")
            val = sorted(str(c) for c in rng.choice(split["train"], val_patients, replace=False))
            nnunet_splits.append({"train": [c for c in split["train"] if c not in val], "val": val})
    install_splits(nnunet_splits, Path(env["nnUNet_preprocessed"]) / ds.name)
    evals = []
    for f, split in enumerate(splits):
        folder = link_into(workdir / "inputs" / f"fold_{f}",
                           [img for case in split["val"] for img in (ds / "imagesTr").glob(f"{case}_*.nii.gz")])
        evals.append((f, sorted(folder.glob("*.nii.gz"))))
    return ds, evals


def epochs_and_seconds(checkpoint_file: Path) -> tuple[int, float]:
    """Epochs of a finished training and their cost in seconds, from nnU-Net's own log in the
    checkpoint (epoch start and end times): the number of epochs times the median epoch, so that
    neither the time between the runs of a resumed training nor an epoch stretched by a pause or
    another process on the machine counts."""
    import torch

    log = torch.load(checkpoint_file, map_location="cpu", weights_only=False).get("logging") or {}
    seconds = [e - s for s, e in zip(log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", []))]
    return len(seconds), float(len(seconds) * np.median(seconds)) if seconds else 0.0


def install_splits(folds: list[dict], preprocessed_dataset_folder: Path | str) -> Path:
    """nnU-Net's ``splits_final.json`` in ``preprocessed_dataset_folder`` (made if missing): fold f
    trains on ``folds[f]["train"]`` and validates on ``folds[f]["val"]`` (other keys, such as a
    converter's test cases, are left out). Returns the file."""
    target = Path(preprocessed_dataset_folder) / "splits_final.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic([{"train": f["train"], "val": f["val"]} for f in folds], target, indent=1)
    return target


def save_png_atomic(array: np.ndarray, path: Path) -> None:
    """Write an image (H, W) or (H, W, 3) uint8 as PNG under a temporary name, then rename it: an
    interrupted conversion leaves no half-written file that looks valid. zlib level 1: the
    converters write thousands of images once and nnU-Net reads them the same (native-size Kvasir
    images on the 2-core CPU, busy: 0.11 s and 498 KiB per image, against 0.41 s and 438 KiB at
    Pillow's default level 6)."""
    from PIL import Image

    tmp = path.with_name(f".tmp_{path.name}")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def link_into(folder: Path, files) -> Path:
    """``folder`` (made if missing) with a symbolic link to each of ``files`` under its own name,
    pointing at the resolved file (a relative path stays valid); links already there are kept.
    Returns ``folder``: an input folder for ``nnUNetv2_predict`` without copying images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in map(Path, files):
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    return folder


def linked_subset(ds: Path, raw_root: Path, n: int) -> Path:
    """The first ``n`` training cases of a raw dataset as symbolic links in ``raw_root`` (same
    folder name, ``dataset.json`` with ``numTraining`` = n): a small real dataset for smoke runs."""
    target = raw_root / ds.name
    cases = sorted(p.name[:-len(".nii.gz")] for p in (ds / "labelsTr").glob("*.nii.gz"))[:n]
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for case in cases:
        for src in [ds / "labelsTr" / f"{case}.nii.gz", *sorted((ds / "imagesTr").glob(f"{case}_*.nii.gz"))]:
            link = target / src.parent.name / src.name
            if not link.exists():
                link.symlink_to(src)
    dataset_json = json.loads((ds / "dataset.json").read_text())
    write_json_atomic({**dataset_json, "numTraining": len(cases)}, target / "dataset.json", indent=1)
    return target

__all__ = ["REPO_ROOT", "shared_data", "raw_dataset", "command_parser", "add_budget_arguments", "command_line",
           "find_command", "plan_command_line", "train_command_line", "predict_command_line", "pipeline_env",
           "run_measured", "run", "train_fold", "evaluate", "per_patient_split", "add_narrow", "set_batch_size",
           "machine_line", "record_command", "CARDIAC_FAT_ID", "prepare_cardiac", "linked_subset", "link_into",
           "install_splits", "epochs_and_seconds", "save_png_atomic", "report_header"]
