"""How the stock nnU-Net commands find our trainers.

``nnUNetv2_train -tr NAME`` and the predictor look trainer classes up in nnunetv2's own folder,
then in the folders listed in ``nnUNet_extTrainer``. We ship one tiny shim module in
``nnunet_stseg/trainers/ext`` that re-exports the real classes from the installed package (so they
stay picklable and are the same class objects at every lookup). Users add that folder once::

    export nnUNet_extTrainer="$(nnunet-stseg env --dir)${nnUNet_extTrainer:+:$nnUNet_extTrainer}"

or ``eval "$(nnunet-stseg env)"``; our own commands call :func:`ensure_trainer_discovery`.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"


def trainer_discovery_dir() -> str:
    """The folder to list in ``nnUNet_extTrainer`` (wherever pip put it, editable or not)."""
    import nnunet_stseg.trainers.ext as ext  # light: imports no nnU-Net code

    return str(Path(ext.__file__).resolve().parent)


def with_trainer_discovery(env: dict) -> dict:
    """``env`` with our shim folder first in ``nnUNet_extTrainer`` (other entries kept, no
    duplicate); for the environment of child processes."""
    d = trainer_discovery_dir()
    current = [p for p in env.get(ENV_VAR, "").split(os.pathsep) if p and p != d]
    return {**env, ENV_VAR: os.pathsep.join([d] + current)}


def ensure_trainer_discovery() -> str:
    """Add our shim folder to ``nnUNet_extTrainer`` in this process (idempotent). nnU-Net reads
    the variable lazily, so this works as long as it runs before the trainer lookup."""
    os.environ[ENV_VAR] = with_trainer_discovery(dict(os.environ))[ENV_VAR]
    return trainer_discovery_dir()


def shell_export_line() -> str:
    """One line for ``eval`` in a shell that keeps existing entries."""
    d = trainer_discovery_dir()
    return f'export {ENV_VAR}="{d}${{{ENV_VAR}:+:${ENV_VAR}}}"'
