"""nnunet-stseg: segment-then-segment and related methods for nnU-Net v2.

Plan with `nnunet-stseg plan`, then train and predict with nnU-Net's own commands
(nnUNetv2_train, nnUNetv2_predict) after `eval "$(nnunet-stseg env)"` once per shell.
`nnunet-stseg <command> --help` shows a command's options. The experiments and benchmarks
run from a source checkout: `python -m benchmarks.<name> --help`."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

from nnunet_stseg.adapters.discovery import ensure_trainer_discovery, shell_export_line, trainer_discovery_dir

# subcommand -> (module whose main(argv) runs it, imported only when chosen; one-line help)
DELEGATED = {
    "sizes": ("nnunet_stseg.commands.sizes", "size-labelled datasets: check, import sizes from a CSV, simulate"),
    "overlay": ("nnunet_stseg.commands.overlay", "QA pictures of a prediction folder: outlines, found objects, index"),
    "demo": ("nnunet_stseg.commands.demo", "the whole pipeline on a small generated dataset, through the stock CLIs"),
}


def _plan_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("-d", "--dataset", type=int, nargs="+", required=True, help="dataset id(s)")
    parser.add_argument("-s", "--input_size", type=int, default=None,
                        help="S: network input size per axis; with it the coarse grid is the median image at S "
                             "voxels per axis (0.9's plans). Default: S, the coarse grid, the size rule and max_crops "
                             "are chosen from the objects of the training labels, and the log says why")
    parser.add_argument("--dims", nargs="+", choices=("2d", "3d"), default=None,
                        help="pipelines to add (default: 2d, plus 3d for 3D datasets)")
    parser.add_argument("--features", type=int, default=None,
                        help="base feature count of the U-Nets (nnU-Net default 32; e.g. 8 for CPU)")
    parser.add_argument("--max_features", type=int, default=None, help="cap on features per stage")
    parser.add_argument("--batch_size", type=int, default=None, help="override the planned batch size")
    parser.add_argument("--depth", action="store_true",
                        help="2d pipelines get the depth channel (normalised slice depth; 3D datasets only)")
    parser.add_argument("--polar", action="store_true",
                        help="also add the 2d polar configuration 2d_sts_polar_S (origins from the coarse model)")
    parser.add_argument("--e2e", action="store_true",
                        help="also add the 2d end-to-end crop-guided configuration 2d_sts_e2e_S "
                             "(train with -tr nnUNetTrainer_StSEndToEnd)")
    parser.add_argument("--lsnet", action="store_true",
                        help="also add the 2d L-SNet configuration 2d_sts_lsnet_S (train -tr nnUNetTrainer_StSLNet, "
                             "then -tr nnUNetTrainer_StSLSNet)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                        help="a method parameter written into the plans' sts block, repeatable, e.g. "
                             "--set crop.margin_fraction=0.2 --set fallback=whole --set polar.fusion_high=0.3; "
                             "a wrong key lists the valid ones (docs/design.md, 'Parameters and defaults')")
    parser.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    parser.add_argument("--verify_dataset_integrity", action="store_true")
    parser.add_argument("-pl", "--planner", default="ExperimentPlanner",
                        help="nnU-Net's planner, as nnUNetv2_plan_experiment -pl (e.g. nnUNetPlannerResEncM): its plans "
                             "file and network class; train and predict with -p <its plans> (printed at the end)")
    parser.add_argument("-overwrite_plans_name", dest="plans_name", default=None,
                        help="write the plans under this name instead of the planner's (as nnU-Net's flag; train and "
                             "predict with -p NAME), e.g. to keep plans with and without -s side by side")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help="as nnUNetv2_plan_experiment (default: the planner's own, 8 GB for ExperimentPlanner)")
    for flag, key in DEPRECATED_PLAN_FLAGS.items():  # accepted, not shown: --set replaces them
        if key.endswith("=true"):
            parser.add_argument(f"--{flag}", dest=f"deprecated_{flag}", action="store_const", const="true",
                                default=None, help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{flag}", dest=f"deprecated_{flag}", default=None, help=argparse.SUPPRESS)
    return parser


DEPRECATED_PLAN_FLAGS = {
    "margin_fraction": "crop.margin_fraction", "margin_min": "crop.margin_min",
    "min_object_size": "crop.min_object_size", "size_rule_grid": "crop.size_rule_grid",
    "jitter_image_fraction": "crop.jitter_image_fraction", "jitter_box_fraction": "crop.jitter_box_fraction",
    "proposal_threshold": "crop.proposal_threshold", "proposal_confirmation": "crop.proposal_confirmation",
    "negative_fraction": "crop.negative_fraction", "fallback": "fallback", "fusion_high": "polar.fusion_high",
    "min_origin_confidence": "polar.min_origin_confidence", "confidence_weighting": "polar.confidence_weighting=true",
    "centre_loss": "centre.loss", "coarse_resampling": "coarse_resampling", "e2e_box_rule": "e2e.box_rule",
    "lsnet_gamma": "lsnet.gamma", "lsnet_fallback": "lsnet.fallback"}
"""The plan options of 0.8 that ``--set`` replaces: accepted in 0.9 with a warning, gone in 0.10."""


def plan_options_from_args(args: argparse.Namespace):
    """The :class:`~nnunet_stseg.adapters.config.PlanOptions` of ``nnunet-stseg plan``'s arguments
    (``--set`` checked against the plans' dataclasses)."""
    from nnunet_stseg.adapters.config import PlanOptions, parse_assignments, plan_option_values

    assignments = []
    for flag, key in DEPRECATED_PLAN_FLAGS.items():
        value = getattr(args, f"deprecated_{flag}", None)
        if value is not None:
            assignment = key if key.endswith("=true") else f"{key}={value}"
            print(f"[nnunet-stseg] WARNING: --{flag} is deprecated and will be removed in 0.10; use --set {assignment}",
                  file=sys.stderr)
            assignments.append(assignment)
    values = plan_option_values(parse_assignments([*assignments, *args.assignments], "--set"))
    return PlanOptions(input_size=args.input_size, dims=args.dims, base_features=args.features,
                       max_features=args.max_features, batch_size=args.batch_size, depth_channel=args.depth,
                       polar=args.polar, e2e=args.e2e, lsnet=args.lsnet, **values)


def _run_plan(args: argparse.Namespace) -> None:
    from nnunet_stseg.planners.plan_and_preprocess import plan_and_preprocess

    ensure_trainer_discovery()
    try:
        options = plan_options_from_args(args)
    except ValueError as e:  # a wrong --set key or value: the message, not a traceback
        raise SystemExit(f"nnunet-stseg plan: error: {e}") from None
    from nnunet_stseg.planners.sts_planner import PlanningError

    for d in args.dataset:
        try:
            plan_and_preprocess(d, options, num_processes=args.num_processes, preprocess=not args.no_pp,
                                verify_dataset_integrity=args.verify_dataset_integrity,
                                gpu_memory_target=args.gpu_memory_target, planner_name=args.planner,
                                plans_name=args.plans_name)
        except PlanningError as e:  # the dataset or an option does not fit: the message, not a traceback
            raise SystemExit(f"nnunet-stseg plan: error: dataset {d}: {e}") from None


def predict_entry(argv: Sequence[str] | None = None) -> None:
    """``nnunet-stseg predict``: nnU-Net's own ``nnUNetv2_predict`` (its parser, its flags) with
    our trainers discoverable, so it runs the cascade for models trained with our fine trainer."""
    ensure_trainer_discovery()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    sys.argv = ["nnunet-stseg predict", *(sys.argv[2:] if argv is None else argv)]
    predict_entry_point()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        return predict_entry(argv[1:])
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="nnunet-stseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from importlib.metadata import version

    parser.add_argument("--version", action="version", version=f"nnunet-stseg {version('nnunet-stseg')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    env = sub.add_parser("env", help="print the shell line that lets the stock nnU-Net commands find our trainers")
    env.add_argument("--dir", action="store_true", help="print only the folder")
    _plan_parser(sub.add_parser("plan", help="plan and preprocess a dataset for segment-then-segment"))
    sub.add_parser("predict", help="nnUNetv2_predict with our trainers discoverable (same flags)", add_help=False)
    bundle = sub.add_parser("bundle", help="embed the coarse (and centre-point) model into a fine or polar model "
                                           "folder's checkpoints, so that folder (or its nnU-Net zip) predicts alone")
    bundle.add_argument("-m", dest="model_folder", type=Path, default=None,
                        help="the fine or polar model folder (or give -d, -c, -tr like nnU-Net)")
    bundle.add_argument("-d", dest="dataset", default=None, help="dataset name or id")
    bundle.add_argument("-c", dest="configuration", default=None, help="the fine or polar configuration")
    bundle.add_argument("-tr", dest="trainer", default=None, help="its trainer (default: from the plans)")
    bundle.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (nnUNetPlans)")
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)
    if args.command == "env":
        print(trainer_discovery_dir() if args.dir else shell_export_line())
    elif args.command == "plan":
        _run_plan(args)
    elif args.command == "bundle":
        _run_bundle(parser, args)


def _run_bundle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from nnunet_stseg.adapters.bundle import bundle_model_folder

    folder = args.model_folder
    if folder is None:
        if args.dataset is None or args.configuration is None:
            parser.error("bundle: give -m MODEL_FOLDER, or -d DATASET -c CONFIGURATION [-tr TRAINER]")
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        from nnunet_stseg.adapters.config import DEFAULT_FINE_TRAINER, DEFAULT_POLAR_TRAINER
        from nnunet_stseg.adapters.results import model_folder

        trainer = args.trainer or (DEFAULT_POLAR_TRAINER if "_polar_" in args.configuration else DEFAULT_FINE_TRAINER)
        folder = model_folder(maybe_convert_to_dataset_name(args.dataset), trainer, args.configuration, args.plans)
    if not Path(folder).is_dir():
        parser.error(f"bundle: {folder} is not a model folder")
    try:
        lines = bundle_model_folder(folder)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"[nnunet-stseg] ERROR: {e}\n")
    print("\n".join([f"{folder}:", *lines]))


if __name__ == "__main__":
    main()
