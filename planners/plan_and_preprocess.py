"""``nnunet-stseg plan`` as a Python function: fingerprint, plan with our planner, preprocess."""
from __future__ import annotations

import os
from typing import Sequence

from nnunet_stseg.adapters.config import LNET_TRAINER, PlanOptions, trainer_for_role
from nnunet_stseg.adapters.discovery import shell_export_line


def _complete_preprocessed(folder: str, identifiers: Sequence[str]) -> bool:
    return os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, f"{i}.pkl")) for i in identifiers)


def plan_and_preprocess(dataset_id: int, options: PlanOptions, *, num_processes: int = 2, preprocess: bool = True,
                        verify_dataset_integrity: bool = False, gpu_memory_target: float | None = None,
                        planner_name: str = "ExperimentPlanner", plans_name: str | None = None) -> list[str]:
    """Fingerprint (reused if present), plan with nnU-Net's planner ``planner_name`` (``-pl``;
    its plans identifier, e.g. ``nnUNetResEncUNetMPlans``, and network class) plus our
    configurations (:func:`~nnunet_stseg.planners.sts_planner.sts_planner_class`) and ``options``
    into the planner's plans file, or ``plans_name`` (nnU-Net's ``-overwrite_plans_name``: two plans
    of one dataset side by side, e.g. with and without ``-s``),
    preprocess our configurations (the coarse ones by our
    :class:`~nnunet_stseg.adapters.inference_io.CheckedPreprocessor`, whose resampling is the
    predictor's: ``nnUNetv2_preprocess`` would resample them with nnU-Net's own function).
    Preprocessing of a fine (or polar) configuration is skipped when
    its shared full-resolution data (``3d_fullres``/``2d``) is already complete. With
    ``num_processes`` 1 nnU-Net's pools are one thread of this process (no spawned worker that
    imports torch again). Prints the stock commands that train and predict them. Returns the
    names added."""
    from nnunet_stseg.adapters.nnunet_hooks import pools_in_this_process

    with pools_in_this_process(num_processes):
        added, plans_identifier, plans = _plan_and_preprocess(
            dataset_id, options, num_processes, preprocess, verify_dataset_integrity, gpu_memory_target, planner_name,
            plans_name)
    _print_next_steps(dataset_id, added, plans_identifier, plans)
    return added


def _plan_and_preprocess(dataset_id: int, options: PlanOptions, num_processes: int, preprocess: bool,
                         verify_dataset_integrity: bool, gpu_memory_target: float | None, planner_name: str,
                         plans_name: str | None) -> tuple[list[str], str, dict]:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_stseg.adapters.inference_io import CheckedPreprocessor
    from nnunet_stseg.planners.sts_planner import sts_planner_class

    name = maybe_convert_to_dataset_name(dataset_id)
    fingerprint = os.path.join(str(nnUNet_preprocessed), name, "dataset_fingerprint.json")
    extract_fingerprint_dataset(dataset_id, num_processes=num_processes,
                                check_dataset_integrity=verify_dataset_integrity,
                                clean=not os.path.isfile(fingerprint), verbose=False)
    planner_class = sts_planner_class(planner_name)
    kwargs = {} if gpu_memory_target is None else {"gpu_memory_target_in_gb": gpu_memory_target}
    if plans_name is not None:
        kwargs["plans_name"] = plans_name
    planner = planner_class(dataset_id, options=options, **kwargs)  # None: the planner's own values
    plans = planner.plan_experiment()
    added = planner.sts_configurations
    if preprocess:
        ids = list(get_filenames_of_train_images_and_targets(planner.raw_dataset_folder, planner.dataset_json))
        todo, identifiers = [], set()
        for c in added:
            identifier = plans["configurations"][c]["data_identifier"]
            folder = os.path.join(str(nnUNet_preprocessed), name, identifier)
            if identifier in identifiers:  # the polar configuration shares the 2d fine one's data
                continue
            identifiers.add(identifier)
            if plans["configurations"][c]["sts"]["role"] != "coarse" and _complete_preprocessed(folder, ids):
                print(f"[nnunet-stseg] {c}: full-resolution data already preprocessed in {folder}, reused")
                continue
            todo.append(c)
        coarse = [c for c in todo if plans["configurations"][c]["sts"]["role"] == "coarse"]
        others = [c for c in todo if c not in coarse]
        if todo:  # nnU-Net's preprocessing (with an empty list it still copies the ground truth it validates on)
            preprocess_dataset(dataset_id, planner.plans_identifier, others, [num_processes] * len(others))
        for c in coarse:  # our preprocessor: the coarse grid made by the function the predictor uses
            print(f"Configuration: {c} (coarse images: sts.coarse_resampling = "
                  f"{plans['configurations'][c]['sts'].get('coarse_resampling', 'nnunet')})...")
            CheckedPreprocessor(verbose=False).run(dataset_id, c, planner.plans_identifier, num_processes)
    print("\n[nnunet-stseg] configurations added to "
          f"{os.path.join(str(nnUNet_preprocessed), name, planner.plans_identifier + '.json')}: {', '.join(added)}")
    return added, planner.plans_identifier, plans


def _print_next_steps(dataset_id: int, added: list[str], plans_identifier: str, plans: dict) -> None:
    """The stock commands that train and predict the configurations ``added``."""
    print("[nnunet-stseg] next steps (per fold F):")
    print(f"  {shell_export_line()}")
    plans_flag = "" if plans_identifier == "nnUNetPlans" else f" -p {plans_identifier}"
    for c in added:
        if plans["configurations"][c]["sts"]["role"] == "lsnet":  # L-Net (with the fine model as S-Net) first
            print(f"  nnUNetv2_train {dataset_id} {c} F -tr {LNET_TRAINER}{plans_flag}")
        print(f"  nnUNetv2_train {dataset_id} {c} F -tr {trainer_for_role(plans['configurations'][c]['sts'])}"
              f"{plans_flag}")
    for c in added:
        sts = plans["configurations"][c]["sts"]
        if sts["role"] != "coarse":
            print(f"  nnUNetv2_predict -i IN -o OUT -d {dataset_id} -c {c} -tr {trainer_for_role(sts)}{plans_flag} "
                  f"-f F")


__all__ = ["plan_and_preprocess"]
