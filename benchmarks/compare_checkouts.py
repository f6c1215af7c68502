"""Do two checkouts predict the same? Every trained model in a folder, predicted by each checkout.

A refactoring that must not change predictions is checked here, not argued: both
checkouts predict the same test images with every model found under ``--models`` through the stock
``nnUNetv2_predict --save_probabilities`` of their own virtual environment (``<checkout>/.venv``,
made with ``pip install -e`` when missing), and every output file is compared byte by byte.

``--models`` holds sets laid out as the test suite keeps them (``STSEG_TEST_MODELS``, see
``tests/trained_models.py``): ``<set>/nnUNet_raw``, ``<set>/nnUNet_preprocessed``,
``<set>/nnUNet_results``. A model is a results folder ``<trainer>__<plans>__<configuration>`` with
at least one ``fold_*/checkpoint_final.pth``; it predicts ``nnUNet_raw/<dataset>/imagesTs`` with
all its folds on the CPU (a polar model once more with heatmap origins: the centre-point model
cannot predict alone).

Compared: label maps, ``.npz`` probabilities (each stored array's bytes, not the zip's metadata),
``.pkl`` properties, ``.objects.json`` reports, the copied plans. Not compared:
``predict_from_raw_data_args.json`` (it records the output folder). Exit code 1 if any file
differs or exists on one side only, or a prediction failed on one side only.

    .venv/bin/python -m benchmarks.compare_checkouts --before ../wt-base --after . --models /tmp/stseg_models
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

NOT_COMPARED = {"predict_from_raw_data_args.json"}
# further predictions of a model's trainer, with these variables: the centre-point model cannot
# predict alone (it gives a heatmap), the polar model uses it with heatmap origins (the variable of
# 0.8, deprecated since 0.9 but read by both, so that checkouts of either side of 0.9 compare)
VARIANTS = {"nnUNetTrainer_StSPolar": {"heatmap": {"STSEG_POLAR_ORIGINS": "heatmap"}}}


def venv_of(checkout: Path) -> Path:
    """``<checkout>/.venv``, made (``pip install -e <checkout>``) if it is missing."""
    venv = checkout / ".venv"
    if not (venv / "bin" / "nnUNetv2_predict").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-e", str(checkout)], check=True)
    return venv


def models_in(root: Path) -> list[tuple[Path, Path, list[str]]]:
    """(set folder, model folder, folds) of every trained model under ``root``."""
    found = []
    for results in sorted(root.glob("*/nnUNet_results")):
        for model in sorted(results.glob("*/*__*__*")):
            folds = sorted(p.parent.name.removeprefix("fold_") for p in model.glob("fold_*/checkpoint_final.pth"))
            if folds:
                found.append((results.parent, model, folds))
    return found


def predict(venv: Path, set_folder: Path, model: Path, folds: list[str], out: Path, variables: dict) -> bool:
    """The stock ``nnUNetv2_predict`` of ``venv`` for one model, with ``variables`` set; its output
    in ``out.log``."""
    trainer, plans, configuration = model.name.split("__")
    discovery = subprocess.run([str(venv / "bin" / "nnunet-stseg"), "env", "--dir"], capture_output=True, text=True,
                               check=True).stdout.strip()
    env = {**os.environ, **variables, "nnUNet_compile": "f", "nnUNet_extTrainer": discovery,
           **{k: str(set_folder / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    images = set_folder / "nnUNet_raw" / model.parent.name / "imagesTs"
    cmd = [str(venv / "bin" / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", model.parent.name,
           "-c", configuration, "-tr", trainer, "-p", plans, "-f", *folds, "-device", "cpu", "--save_probabilities"]
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's files are not this run's
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "w") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode == 0


def content(path: Path):
    """What is compared of a file: its bytes; for ``.npz``, each stored array's bytes."""
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as z:
            return {name: z.read(name) for name in sorted(z.namelist())}
    return path.read_bytes()


def compare(before: Path, after: Path) -> tuple[int, list[str]]:
    """Number of files compared and the names of those that differ (or exist on one side only)."""
    names = {p.relative_to(d).as_posix() for d in (before, after) if d.is_dir() for p in d.rglob("*")
             if p.is_file() and p.name not in NOT_COMPARED}
    different = [n for n in sorted(names) if not ((before / n).is_file() and (after / n).is_file()
                                                  and content(before / n) == content(after / n))]
    return len(names), different


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_checkouts",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout (with or without .venv)")
    parser.add_argument("--after", type=Path, required=True, help="checkout (with or without .venv)")
    parser.add_argument("--models", type=Path, required=True, help="folder of model sets (STSEG_TEST_MODELS)")
    parser.add_argument("--out", type=Path, default=Path("compare_checkouts"), help="predictions go here")
    args = parser.parse_args(argv)
    venvs = {side: venv_of(getattr(args, side).resolve()) for side in ("before", "after")}
    models = models_in(args.models.resolve())
    if not models:
        parser.error(f"no trained model under {args.models}")
    rows, failed = [], False
    runs = [(s, m, f, variant, variables) for s, m, f in models
            for variant, variables in {"": {}, **VARIANTS.get(m.name.split("__")[0], {})}.items()]
    for set_folder, model, folds, variant, variables in runs:
        name = f"{set_folder.name}/{model.parent.name}/{model.name}" + (f" ({variant})" if variant else "")
        out = {side: args.out / side / set_folder.name / (model.name + (f"_{variant}" if variant else ""))
               for side in venvs}
        ok = {side: predict(venvs[side], set_folder, model, folds, out[side], variables) for side in venvs}
        if not all(ok.values()):
            rows.append((name, ",".join(folds), "-", "-", "prediction failed: " + " ".join(s for s in ok if not ok[s])))
            failed |= any(ok.values())  # failing on both sides is the same behaviour
            continue
        n, different = compare(out["before"], out["after"])
        rows.append((name, ",".join(folds), str(n - len(different)), str(len(different)), " ".join(different)))
        failed |= bool(different) or n == 0
    header = ("model", "folds", "equal", "different", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + ("  " + row[4] if row[4] else ""))
    print("DIFFERENT" if failed else "all predictions byte-identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
