"""``nnunet-stseg sizes``: check a size-labelled dataset, import sizes from a CSV, or simulate
size labels on a fully labelled dataset (the convention: :mod:`nnunet_stseg.adapters.size_labels`).

    nnunet-stseg sizes check -d 731                       # refuse inconsistent input, name the case
    nnunet-stseg sizes import -d 731 --csv sizes.csv      # case_id,size_mm rows -> size-only cases
    nnunet-stseg sizes simulate --source DIR -d 732 --pixel_labels 32 --seed 0   # weak labels from full ones
    nnunet-stseg sizes configure -d 731 -c 2d --pretrain_epochs 500 --size_weight 1   # the trainer's sts.sizes
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from nnunet_stseg.adapters import size_labels
from nnunet_stseg.adapters.size_labels import (SizeLabelError, case_ids, check_size_dataset, import_sizes,
                                               simulate_size_labels)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="nnunet-stseg sizes", description=__doc__ + "\n" + size_labels.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    for action, text in (("check", "check a size-labelled raw dataset"),
                         ("import", "add size-only cases from a CSV (case_id,size_mm)")):
        q = sub.add_parser(action, help=text)
        q.add_argument("-d", "--dataset", required=True, help="dataset id or name in nnUNet_raw, or a folder")
        if action == "import":
            q.add_argument("--csv", required=True, type=Path)
    q = sub.add_parser("simulate", help="a size-labelled copy of a fully labelled dataset (pixel labels kept on m)")
    q.add_argument("--source", required=True, help="fully labelled raw dataset (id, name or folder)")
    q.add_argument("-d", "--dataset_id", type=int, required=True, help="id of the new dataset")
    q.add_argument("--pixel_labels", type=int, required=True, help="m: cases that keep their pixel labels")
    q.add_argument("--seed", type=int, default=0, help="draws the m cases (0)")
    q.add_argument("--object_labels", type=int, nargs="+", default=None,
                   help="source label values that form the object (default: every foreground label)")
    q = sub.add_parser("configure", help="set the sts.sizes block (nnUNetTrainer_StSSizes) of a planned configuration")
    q.add_argument("-d", "--dataset", required=True, help="dataset id or name (planned: nnUNet_preprocessed)")
    q.add_argument("-c", "--configuration", default="2d", help="configuration (2d)")
    q.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (nnUNetPlans)")
    for name, kind, text in (("pretrain_epochs", int, "phase 1 epochs (default: half the schedule)"),
                             ("size_weight", float, "weight of the size loss (0.1; 0 = pixel labels only)"),
                             ("pixel_weight", float, "pixel loss weight in phase 2 (1; 0 = the paper's phase 2)"),
                             ("samples", int, "Bernoulli samples per image (1)"),
                             ("size_batch_size", int, "size-only images per step (default: the batch size)"),
                             ("initial_lr", float, "initial learning rate (default nnU-Net's 0.01; a phase 2 from "
                                                   "phase-1 weights fine-tunes better at 0.001)")):
        q.add_argument(f"--{name}", type=kind, default=None, help=text)
    q.add_argument("--no_mirror", action="store_true", help="no random flips of the size-only images")
    args = p.parse_args(argv)
    try:
        if args.action == "configure":
            print(configure(args))
            return
        if args.action == "simulate":
            src = _dataset_folder(args.source)
            ids = case_ids(src, json.loads((src / "dataset.json").read_text()))
            if not 1 <= args.pixel_labels <= len(ids):
                p.error(f"--pixel_labels must be in 1..{len(ids)}")
            keep = sorted(np.random.default_rng(args.seed).choice(ids, args.pixel_labels, replace=False).tolist())
            root = os.environ.get("nnUNet_raw") or str(src.parent)
            out = simulate_size_labels(src, root, args.dataset_id, keep, args.object_labels)
            print(f"{out}: {check_size_dataset(out).summary()}")
            return
        folder = _dataset_folder(args.dataset)
        report = import_sizes(folder, args.csv) if args.action == "import" else check_size_dataset(folder)
    except SizeLabelError as e:
        raise SystemExit(f"[nnunet-stseg] ERROR: {e}") from None
    for w in report.warnings:
        print(f"warning: {w}")
    print(f"{folder}: {report.summary()}: OK")


def configure(args) -> str:
    """Write the ``sts.sizes`` block into the configuration of the preprocessed plans (checked by
    :class:`~nnunet_stseg.adapters.config.SizeParams`; a legacy ``sts_sizes`` is moved there);
    returns what was written."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_stseg.adapters.config import SIZES_KEY, SizeParams, block_of, with_block
    from nnunet_stseg.atomic import write_json_atomic

    if nnUNet_preprocessed is None:
        raise SizeLabelError("nnUNet_preprocessed is not set")
    plans_file = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(args.dataset) / f"{args.plans}.json"
    if not plans_file.is_file():
        raise SizeLabelError(f"{plans_file}: not found; plan the dataset first (nnUNetv2_plan_and_preprocess)")
    plans = json.loads(plans_file.read_text())
    if args.configuration not in plans["configurations"]:
        raise SizeLabelError(f"{plans_file}: no configuration {args.configuration!r}; it has "
                             f"{sorted(plans['configurations'])}")
    cfg = plans["configurations"][args.configuration]
    block = dict(block_of(cfg, SIZES_KEY) or {})
    block.update({k: getattr(args, k) for k in ("pretrain_epochs", "size_weight", "pixel_weight", "samples",
                                                "size_batch_size", "initial_lr") if getattr(args, k) is not None})
    if args.no_mirror:
        block["mirror"] = False
    try:
        params = SizeParams.from_configuration({"sts": {SIZES_KEY: block}}, f"{plans_file}: {args.configuration}")
    except ValueError as e:
        raise SizeLabelError(str(e)) from None
    with_block(cfg, SIZES_KEY, params.to_dict())
    write_json_atomic(plans, plans_file, indent=4)
    return f"{plans_file}: {args.configuration}.sts.{SIZES_KEY} = {json.dumps(params.to_dict())}"


def _dataset_folder(spec: str) -> Path:
    """A raw dataset folder from an id, a name (in ``nnUNet_raw``) or a path."""
    if Path(spec).is_dir():
        return Path(spec)
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if nnUNet_raw is None:
        raise SizeLabelError(f"{spec}: not a folder and nnUNet_raw is not set")
    try:
        return Path(nnUNet_raw) / maybe_convert_to_dataset_name(spec)
    except RuntimeError as e:
        raise SizeLabelError(str(e)) from None


if __name__ == "__main__":
    main()
