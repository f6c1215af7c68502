"""``python -m benchmarks.benchmark --prediction_modes``: what ``nnUNetv2_predict`` costs for one trained
model when it predicts in its own process and when it uses nnU-Net's worker processes::

    python -m benchmarks.benchmark --prediction_modes -m MODEL_FOLDER -i IMAGES [--limit N] [-f 0]

The stock ``nnUNetv2_predict_from_modelfolder`` runs (TTA off, CPU) with
``STSEG_PREDICT_IN_PROCESS=1``, then ``=0`` with nnU-Net's default ``-npp 3 -nps 3`` and with
``-npp 1 -nps 1``; each over the images and once on the first image alone (mostly the command's
start-up). The table gives the wall seconds, the seconds per further image, the peak RSS of the
command's own process and whether the label maps equal the in-process ones. It is the
measurement behind our predictors' choice (``in_process_rule``, docs/design.md).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from nnunet_stseg import settings
from nnunet_stseg.adapters.discovery import with_trainer_discovery
from benchmarks.runner import find_command, link_into, report_header, run_measured

MODES = (("in process", "1", ()), ("workers, -npp 3 -nps 3", "0", ()),
         ("workers, -npp 1 -nps 1", "0", ("-npp", "1", "-nps", "1")))


def _label_maps(folder: Path, ending: str) -> dict[str, np.ndarray]:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    files = sorted(folder.glob(f"*{ending}"))
    if not files:
        return {}
    io = determine_reader_writer_from_file_ending(ending, str(files[0]), allow_nonmatching_filename=True,
                                                  verbose=False)()
    return {f.name: io.read_seg(str(f))[0] for f in files}


def prediction_modes(args, cmd: str) -> str:
    ending = json.loads((Path(args.model) / "dataset.json").read_text())["file_ending"]
    images = sorted(Path(args.images).glob(f"*_0000{ending}"))[:args.limit]
    if not images:
        raise SystemExit(f"no images *_0000{ending} in {args.images}")
    env = with_trainer_discovery({**os.environ, "nnUNet_compile": os.environ.get("nnUNet_compile", "f")})
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="stseg_modes_") as tmp:
        tmp = Path(tmp)
        all_in, one_in = link_into(tmp / "in_all", images), link_into(tmp / "in_one", images[:1])
        for name, setting, flags in MODES:
            out = tmp / f"out_{setting}_{len(flags)}"
            base = [find_command("nnUNetv2_predict_from_modelfolder"), "-m", str(args.model), "-f",
                    *map(str, args.folds), "-device", args.device, "--disable_tta", *flags]
            mode_env = {**env, settings.IN_PROCESS_ENV: setting}
            seconds, peak = run_measured([*base, "-i", str(all_in), "-o", str(out)], mode_env,
                                         tmp / f"{out.name}.log", quiet=True)
            one, _ = run_measured([*base, "-i", str(one_in), "-o", str(tmp / f"one_{out.name}")], mode_env,
                                  tmp / f"one_{out.name}.log", quiet=True)
            maps = _label_maps(out, ending)
            if reference is None:
                reference = maps
            same = sum(1 for k, v in maps.items() if k in reference and np.array_equal(v, reference[k]))
            rows.append((name, seconds, one, 1000 * (seconds - one) / max(1, len(images) - 1), peak,
                         f"{same} of {len(images)}"))
    lines = [*report_header("nnUNetv2_predict in its own process and with nnU-Net's worker processes", cmd),
             f"Model: `{Path(args.model).name}` folds {' '.join(map(str, args.folds))}, {len(images)} images from "
             f"`{args.images}`, TTA off, device {args.device}. 'one image s' = the same command on the first "
             "image alone (mostly its start-up); 'ms / further image' = (all - one) / (images - 1); peak RSS of "
             "the command's own process (workers not included).", "",
             "| mode | s, all images | one image s | ms / further image | peak RSS MB "
             "| label maps equal to in process |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s:.1f} | {o:.1f} | {m:.0f} | {p:.0f} | {same} |" for n, s, o, m, p, same in rows]
    return "\n".join(lines) + "\n"
