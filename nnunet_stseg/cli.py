"""Command-line entry points.

``nnunet-stseg env``      print the line that lets the stock nnU-Net commands find our trainers
``nnunet-stseg plan``     fingerprint + plan + preprocess a dataset for segment-then-segment
``nnunet-stseg predict``  the stock ``nnUNetv2_predict`` (same flags) with discovery set up
``nnunet-stseg demo``     the whole pipeline on a small generated dataset, through the stock CLIs
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from nnunet_stseg.env import ensure_trainer_discovery, shell_export_line, trainer_discovery_dir


def _trainer_for(sts: dict) -> str:
    from nnunet_stseg.config import DEFAULT_FINE_TRAINER, DEFAULT_POLAR_TRAINER

    return {"coarse": sts["coarse_trainer"], "fine": DEFAULT_FINE_TRAINER, "polar": DEFAULT_POLAR_TRAINER}[sts["role"]]


def _complete_preprocessed(folder: str, identifiers: Sequence[str]) -> bool:
    return os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, f"{i}.pkl")) for i in identifiers)


def plan_and_preprocess(dataset_id: int, input_size: int, dims: Sequence[str] | None = None,
                        base_features: int | None = None, max_features: int | None = None,
                        batch_size: int | None = None, num_processes: int = 2, preprocess: bool = True,
                        verify_dataset_integrity: bool = False, crop_overrides: dict | None = None,
                        fallback: str = "coarse", gpu_memory_target: float = 8.0,
                        depth_channel: bool = False, polar: bool = False,
                        polar_overrides: dict | None = None) -> list[str]:
    """Fingerprint (reused if present), plan with :class:`nnUNetPlannerStS`, preprocess our
    configurations. Preprocessing of a fine configuration is skipped when its shared
    full-resolution data (``3d_fullres``/``2d``) is already complete. Returns the names added."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      preprocess_dataset)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_stseg.planners import nnUNetPlannerStS

    name = maybe_convert_to_dataset_name(dataset_id)
    fingerprint = os.path.join(str(nnUNet_preprocessed), name, "dataset_fingerprint.json")
    extract_fingerprint_dataset(dataset_id, num_processes=num_processes,
                                check_dataset_integrity=verify_dataset_integrity,
                                clean=not os.path.isfile(fingerprint), verbose=False)
    planner = nnUNetPlannerStS(dataset_id, input_size=input_size, dims=dims, base_features=base_features,
                               max_features=max_features, batch_size=batch_size, crop_overrides=crop_overrides,
                               fallback=fallback, depth_channel=depth_channel, polar=polar,
                               polar_overrides=polar_overrides, gpu_memory_target_in_gb=gpu_memory_target)
    plans = planner.plan_experiment()
    added = planner.sts_configurations
    if preprocess:
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
        ids = list(get_filenames_of_train_images_and_targets(planner.raw_dataset_folder, planner.dataset_json))
        todo, identifiers = [], set()
        for c in added:
            identifier = plans["configurations"][c]["data_identifier"]
            folder = os.path.join(str(nnUNet_preprocessed), name, identifier)
            if identifier in identifiers:  # the polar configuration shares the 2d fine one's data
                continue
            identifiers.add(identifier)
            if ("_sts_fine_" in c or "_sts_polar_" in c) and _complete_preprocessed(folder, ids):
                print(f"[nnunet-stseg] {c}: full-resolution data already preprocessed in {folder}, reused")
                continue
            todo.append(c)
        if todo:
            preprocess_dataset(dataset_id, planner.plans_identifier, todo, [num_processes] * len(todo))
    print("\n[nnunet-stseg] configurations added to "
          f"{os.path.join(str(nnUNet_preprocessed), name, planner.plans_identifier + '.json')}: {', '.join(added)}")
    print("[nnunet-stseg] next steps (per fold F):")
    print(f"  {shell_export_line()}")
    for c in added:
        sts = plans["configurations"][c]["sts"]
        print(f"  nnUNetv2_train {dataset_id} {c} F -tr {_trainer_for(sts)}")
    for c in added:
        sts = plans["configurations"][c]["sts"]
        if sts["role"] != "coarse":
            print(f"  nnUNetv2_predict -i IN -o OUT -d {dataset_id} -c {c} -tr {_trainer_for(sts)} -f F")
    return added


def _plan_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("-d", "--dataset", type=int, nargs="+", required=True, help="dataset id(s)")
    parser.add_argument("-s", "--input_size", type=int, default=64, help="S: network input size per axis (64)")
    parser.add_argument("--dims", nargs="+", choices=("2d", "3d"), default=None,
                        help="pipelines to add (default: 2d, plus 3d for 3D datasets)")
    parser.add_argument("--features", type=int, default=None,
                        help="base feature count of the U-Nets (nnU-Net default 32; e.g. 8 for CPU)")
    parser.add_argument("--max_features", type=int, default=None, help="cap on features per stage")
    parser.add_argument("--batch_size", type=int, default=None, help="override the planned batch size")
    parser.add_argument("--margin_fraction", type=float, default=None, help="crop context per side (0.125)")
    parser.add_argument("--margin_min", type=float, default=None, help="minimum context in voxels (4)")
    parser.add_argument("--min_object_size", type=float, default=None, help="drop smaller components (5)")
    parser.add_argument("--jitter_image_fraction", type=float, default=None, help="training jitter (0.0625)")
    parser.add_argument("--jitter_box_fraction", type=float, default=None, help="training jitter cap (0.25)")
    parser.add_argument("--fallback", choices=("coarse", "whole"), default="coarse",
                        help="cases without any coarse component: keep the coarse prediction or run the fine "
                             "network on the whole image")
    parser.add_argument("--depth", action="store_true",
                        help="2d pipelines get the depth channel (normalised slice depth; 3D datasets only)")
    parser.add_argument("--polar", action="store_true",
                        help="also add the 2d polar configuration 2d_sts_polar_S (origins from the coarse model)")
    parser.add_argument("--fusion_high", type=float, default=None,
                        help="polar multi-object fusion: hysteresis high threshold t2 (0.4)")
    parser.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    parser.add_argument("--verify_dataset_integrity", action="store_true")
    parser.add_argument("-gpu_memory_target", type=float, default=8.0, help="as nnUNetv2_plan_experiment")
    return parser


def _run_plan(args: argparse.Namespace) -> None:
    ensure_trainer_discovery()
    crop = {k: getattr(args, k) for k in ("margin_fraction", "margin_min", "min_object_size",
                                          "jitter_image_fraction", "jitter_box_fraction")
            if getattr(args, k) is not None}
    for d in args.dataset:
        plan_and_preprocess(d, args.input_size, args.dims, args.features, args.max_features, args.batch_size,
                            args.num_processes, not args.no_pp, args.verify_dataset_integrity, crop, args.fallback,
                            args.gpu_memory_target, args.depth, args.polar,
                            {"fusion_high": args.fusion_high} if args.fusion_high is not None else None)


def plan_entry(argv: Sequence[str] | None = None) -> None:
    """``nnunet-stseg-plan``: plan and preprocess for segment-then-segment."""
    _run_plan(_plan_parser(argparse.ArgumentParser(prog="nnunet-stseg-plan",
                                                   description=plan_and_preprocess.__doc__)).parse_args(argv))


def predict_entry(argv: Sequence[str] | None = None) -> None:
    """``nnunet-stseg-predict``: nnU-Net's own ``nnUNetv2_predict`` (its parser, its flags) with
    our trainers discoverable, so it runs the cascade for models trained with our fine trainer."""
    ensure_trainer_discovery()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    predict_entry_point()


def demo_entry(argv: Sequence[str] | None = None) -> None:
    """``nnunet-stseg-demo``: the whole pipeline on a generated dataset."""
    from nnunet_stseg.demo import main as demo_main

    demo_main(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        return predict_entry(argv[1:])
    if argv and argv[0] == "demo":
        return demo_entry(argv[1:])
    parser = argparse.ArgumentParser(prog="nnunet-stseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print the shell line that makes nnU-Net find our trainers")
    env.add_argument("--dir", action="store_true", help="print only the folder")
    _plan_parser(sub.add_parser("plan", help="plan and preprocess a dataset for segment-then-segment"))
    sub.add_parser("predict", help="nnUNetv2_predict with our trainers discoverable (same flags)")
    sub.add_parser("demo", help="run the pipeline on a small generated dataset")
    args = parser.parse_args(argv)
    if args.command == "env":
        print(trainer_discovery_dir() if args.dir else shell_export_line())
    elif args.command == "plan":
        _run_plan(args)


if __name__ == "__main__":
    main()
