"""A model folder that is complete on its own: companion models inside the checkpoint.

A cascade predicts with two networks (the polar stage with heatmap origins: three), but nnU-Net
moves models as ONE folder per trainer: ``nnUNetv2_export_model_to_zip`` exports one ``-tr``,
``nnUNetv2_predict_from_modelfolder -m`` and ``nnUNetPredictor.initialize_from_trained_model_folder``
read one folder. So the fine (or polar) checkpoint carries its companions: under
:data:`COMPANIONS_KEY`, for each companion (``coarse``, ``centre``), the four entries nnU-Net's
predictor reads from a checkpoint (``network_weights``, ``init_args``, ``trainer_name``,
``inference_allowed_mirroring_axes``) of the SAME fold, plus where they came from. The
companions' configurations are in the same ``plans.json`` (one plans file holds all of our
configurations), which nnU-Net's export already copies. nnU-Net ignores keys it does not know, so
the checkpoint still loads everywhere (training resumes with ``--c``, nnU-Net's own tools).

Written by the fine and polar trainers at the end of training (``checkpoint_final.pth`` and
``checkpoint_best.pth``: the companion's ``checkpoint_final.pth``, the one the cascade's final
validation used), and by ``nnunet-stseg bundle`` for models trained before, or after a companion
was retrained. At prediction the embedded copy is loaded through a temporary model folder, so
nnU-Net's own loader builds the network (docs/design.md "Shipping a cascade").
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

COMPANIONS_KEY = "nnunet_stseg_companions"
COMPANION_CHECKPOINT = "checkpoint_final.pth"  # of the companion: what the cascade's validation used
_PREDICTOR_KEYS = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes")


def _load(path: Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=False)


def _save_atomic(checkpoint: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(checkpoint, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def companion_entry(companion_folder: str | os.PathLike, fold) -> dict:
    """What a fine checkpoint keeps of a companion model's fold: the entries nnU-Net's predictor
    reads, and ``source`` (folder, fold, epoch) for the log."""
    path = Path(companion_folder) / f"fold_{fold}" / COMPANION_CHECKPOINT
    checkpoint = _load(path)
    entry = {k: checkpoint.get(k) for k in _PREDICTOR_KEYS}
    entry["source"] = {"folder": str(Path(companion_folder).resolve()), "fold": str(fold),
                       "checkpoint": COMPANION_CHECKPOINT, "epoch": checkpoint.get("current_epoch")}
    return entry


def embed_companions(checkpoint_file: str | os.PathLike, companions: dict[str, str | os.PathLike], fold) -> list[str]:
    """Put fold ``fold`` of each companion (name -> model folder) into ``checkpoint_file``, replacing
    an older copy, atomically. Companions whose fold does not exist are skipped; returns the names
    embedded."""
    path = Path(checkpoint_file)
    present = {name: folder for name, folder in companions.items()
               if (Path(folder) / f"fold_{fold}" / COMPANION_CHECKPOINT).is_file()}
    if not present or not path.is_file():
        return []
    checkpoint = _load(path)
    stored = dict(checkpoint.get(COMPANIONS_KEY) or {})
    stored.update({name: companion_entry(folder, fold) for name, folder in present.items()})
    checkpoint[COMPANIONS_KEY] = stored
    _save_atomic(checkpoint, path)
    return sorted(present)


def embedded_companions(model_dir: str | os.PathLike, folds, checkpoint_name: str, name: str) -> dict | None:
    """``{fold: entry}`` of companion ``name`` from every fold's ``checkpoint_name`` of a model
    folder, or None unless every fold carries it."""
    entries = {}
    for fold in folds:
        path = Path(model_dir) / f"fold_{fold}" / checkpoint_name
        entry = (_load(path).get(COMPANIONS_KEY) or {}).get(name) if path.is_file() else None
        if entry is None:
            return None
        entries[fold] = entry
    return entries


@contextmanager
def companion_model_folder(model_dir: str | os.PathLike, entries: dict) -> Iterator[str]:
    """A temporary nnU-Net model folder holding embedded companion ``entries`` (``{fold: entry}``)
    with the model folder's ``plans.json`` and ``dataset.json``; removed on exit (the predictor
    holds the weights in memory by then)."""
    tmp = tempfile.mkdtemp(prefix="nnunet_stseg_companion_")
    try:
        for name in ("plans.json", "dataset.json"):
            shutil.copy2(Path(model_dir) / name, Path(tmp) / name)
        for fold, entry in entries.items():
            (Path(tmp) / f"fold_{fold}").mkdir()
            torch.save({k: entry[k] for k in _PREDICTOR_KEYS}, str(Path(tmp) / f"fold_{fold}" / COMPANION_CHECKPOINT))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_source(entries: dict) -> str:
    """``<folder> folds [...] (epoch E)`` of embedded entries, for the log."""
    first = next(iter(entries.values()))["source"]
    return (f"embedded copy of {first['folder']} folds {[str(f) for f in entries]} ({first['checkpoint']}, "
            f"epoch {first.get('epoch')})")


def model_configuration(model_dir: str | os.PathLike) -> tuple[str, str, list[str]]:
    """(trainer, configuration, folds) of an nnU-Net model folder, read from its first fold's
    checkpoint (nnU-Net's own record)."""
    folds = sorted(p.name[len("fold_"):] for p in Path(model_dir).glob("fold_*") if p.is_dir())
    for fold in folds:
        for name in (COMPANION_CHECKPOINT, "checkpoint_best.pth"):
            path = Path(model_dir) / f"fold_{fold}" / name
            if path.is_file():
                checkpoint = _load(path)
                return checkpoint["trainer_name"], checkpoint["init_args"]["configuration"], folds
    raise FileNotFoundError(f"{model_dir}: no fold_*/checkpoint_final.pth or checkpoint_best.pth; is this an "
                            f"nnU-Net model folder?")


def companion_folders_of(model_dir: str | os.PathLike) -> dict[str, Path]:
    """The companion models (name -> folder next to ``model_dir``) that a fine or polar model folder
    predicts with, from its plans' ``sts`` block."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.config import DEFAULT_CENTRE_TRAINER, StSConfig
    from nnunet_stseg.adapters.results import model_folder_name

    trainer, configuration, _ = model_configuration(model_dir)
    plans = PlansManager(json.loads((Path(model_dir) / "plans.json").read_text()))
    sts = StSConfig.for_role(plans.get_configuration(configuration).configuration, ("fine", "polar"),
                             f"{model_dir}: configuration '{configuration}'",
                             "bundle (the folder of the model that predicts with the others)")
    parent = Path(model_dir).parent
    out = {"coarse": parent / model_folder_name(sts.coarse_trainer, sts.coarse_configuration, plans.plans_name)}
    if sts.role == "polar":
        out["centre"] = parent / model_folder_name(DEFAULT_CENTRE_TRAINER, sts.coarse_configuration, plans.plans_name)
    return out


def bundle_model_folder(model_dir: str | os.PathLike) -> list[str]:
    """``nnunet-stseg bundle``: embed every companion found next to ``model_dir`` into each fold's
    final and best checkpoints (models trained before 0.3, or a companion retrained since); one
    line per checkpoint. The coarse model must exist; the centre model is optional."""
    companions = companion_folders_of(model_dir)
    if not companions["coarse"].is_dir():
        raise FileNotFoundError(f"the coarse model {companions['coarse']} does not exist; bundle on the machine "
                                f"that trained it (its nnUNet_results holds both folders side by side)")
    _, _, folds = model_configuration(model_dir)
    lines = []
    for fold in folds:
        for name in (COMPANION_CHECKPOINT, "checkpoint_best.pth"):
            if (Path(model_dir) / f"fold_{fold}" / name).is_file():
                done = embed_companions(Path(model_dir) / f"fold_{fold}" / name, companions, fold)
                missing = sorted(set(companions) - set(done))
                lines.append(f"fold_{fold}/{name}: embedded {', '.join(done) or 'nothing'}"
                             + (f" (not found: {', '.join(f'{m} {companions[m]}/fold_{fold}' for m in missing)})"
                                if missing else ""))
    return lines


__all__ = ["COMPANIONS_KEY", "COMPANION_CHECKPOINT", "companion_entry", "embed_companions", "embedded_companions",
           "companion_model_folder", "describe_source", "model_configuration", "companion_folders_of",
           "bundle_model_folder"]
