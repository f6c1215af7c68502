"""Where nnU-Net keeps a trained model: ``<results>/<dataset>/<trainer>__<plans>__<configuration>``.

One helper for every place that needs the path (companion models of a predictor, trainers,
experiments, tests). Why not nnU-Net's ``get_output_folder`` alone: it reads ``nnUNet_results``
from the environment of the process at import time, while our experiment commands drive the
stock commands in child processes with their own ``nnUNet_results``; so the root is an argument
here and defaults to nnU-Net's own value only when not given (then it IS ``get_output_folder``).
Imports no nnU-Net code unless the root is omitted.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PLANS = "nnUNetPlans"


def model_folder_name(trainer: str, configuration: str, plans: str = DEFAULT_PLANS) -> str:
    """``trainer__plans__configuration``, nnU-Net's name of a model folder.

    >>> model_folder_name("nnUNetTrainer_StSFine", "2d_sts_fine_64")
    'nnUNetTrainer_StSFine__nnUNetPlans__2d_sts_fine_64'
    """
    return f"{trainer}__{plans}__{configuration}"


def model_folder(dataset_name: str, trainer: str, configuration: str, plans: str = DEFAULT_PLANS,
                 results_root: str | os.PathLike | None = None) -> Path:
    """The model folder of ``trainer`` on ``configuration`` of ``dataset_name`` (``DatasetXXX_Name``)
    under ``results_root``, default nnU-Net's ``nnUNet_results`` of this process.

    >>> str(model_folder("Dataset990_Demo", "nnUNetTrainer_StSCoarse", "2d_sts_coarse_32", results_root="/r"))
    '/r/Dataset990_Demo/nnUNetTrainer_StSCoarse__nnUNetPlans__2d_sts_coarse_32'
    """
    if results_root is None:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        return Path(get_output_folder(dataset_name, trainer, plans, configuration))
    return Path(results_root) / dataset_name / model_folder_name(trainer, configuration, plans)


def train_command(dataset_name: str, trainer: str, configuration: str, fold, plans: str = DEFAULT_PLANS) -> str:
    """The stock command that trains that model (for error messages that say what to run)."""
    plans_flag = "" if plans == DEFAULT_PLANS else f" -p {plans}"
    fold = "FOLD" if fold is None else fold
    return f"nnUNetv2_train {dataset_name} {configuration} {fold} -tr {trainer}{plans_flag}"


__all__ = ["DEFAULT_PLANS", "model_folder_name", "model_folder", "train_command"]
