"""The parts of nnU-Net we rely on beyond its documented commands, checked once when our adapters
are imported: a different nnU-Net is one clear error naming the supported range, not a crash deep
in a worker process.

What is checked: the installed nnunetv2 version, and the names and parameters of the methods we
override or call (the predictor's private helpers, the frame of
``initialize_from_trained_model_folder`` that :func:`~nnunet_stseg.adapters.nnunet_hooks.adopt_predictor`
reads, the data loader and trainer hooks our loaders use). A version outside the range whose
interface still matches is a warning (pip's pin normally prevents it); a changed interface is an
error whatever the version.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from importlib import metadata

SUPPORTED = (">=2.8.1", "<2.9")
SUPPORTED_TEXT = "nnunetv2>=2.8.1,<2.9"

# (import path of the class, method, parameter names that must appear in this order)
REQUIRED = (
    ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor", "initialize_from_trained_model_folder",
     ("model_training_output_dir", "use_folds", "checkpoint_name")),
    ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor", "manual_initialization",
     ("network", "plans_manager", "configuration_manager", "parameters", "dataset_json", "trainer_name",
      "inference_allowed_mirroring_axes")),
    ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor", "_internal_maybe_mirror_and_predict", ("x",)),
    ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor", "_manage_input_and_output_lists",
     ("list_of_lists_or_source_folder", "output_folder_or_list_of_truncated_output_files",
      "folder_with_segs_from_prev_stage", "overwrite", "part_id", "num_parts", "save_probabilities")),
    ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor", "predict_from_data_iterator",
     ("data_iterator", "save_probabilities", "num_processes_segmentation_export")),
    ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor", "predict_from_files_sequential",
     ("list_of_lists_or_source_folder", "output_folder_or_list_of_truncated_output_files", "save_probabilities",
      "overwrite", "folder_with_segs_from_prev_stage")),
    ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor", "predict_logits_from_preprocessed_data",
     ("data",)),
    ("nnunetv2.training.dataloading.data_loader.nnUNetDataLoader", "__init__",
     ("data", "batch_size", "patch_size", "final_patch_size", "label_manager", "oversample_foreground_percent",
      "sampling_probabilities", "pad_sides", "probabilistic_oversampling", "transforms")),
    ("nnunetv2.training.dataloading.data_loader.nnUNetDataLoader", "get_bbox",
     ("data_shape", "force_fg", "class_locations", "overwrite_class", "verbose")),
    ("nnunetv2.training.dataloading.data_loader.nnUNetDataLoader", "generate_train_batch", ()),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer", "build_network_architecture",
     ("plans_manager", "configuration_manager", "num_input_channels", "num_output_channels",
      "enable_deep_supervision")),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer",
     "configure_rotation_dummyDA_mirroring_and_inital_patch_size", ()),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer", "get_training_transforms",
     ("patch_size", "rotation_for_DA", "deep_supervision_scales", "mirror_axes", "do_dummy_2d_data_aug")),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer", "get_tr_and_val_datasets", ()),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer", "_get_deep_supervision_scales", ()),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer", "perform_actual_validation",
     ("save_probabilities",)),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer", "save_checkpoint", ("filename",)),
)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("+")[0].split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_supported(version: str) -> bool:
    """Whether an nnunetv2 version string lies in :data:`SUPPORTED`.

    >>> version_supported("2.8.1"), version_supported("2.8.3"), version_supported("2.9.0"), version_supported("2.7")
    (True, True, False, False)
    """
    v = _version_tuple(version)
    return (2, 8, 1) <= v < (2, 9)


def interface_problems(required=REQUIRED) -> list[str]:
    """What does not match in the installed nnU-Net: a missing class or method, or a method whose
    parameters (after ``self``/``cls``) do not start with the names we pass."""
    import importlib

    problems = []
    for path, method, params in required:
        module_name, class_name = path.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            problems.append(f"{path} is missing ({e})")
            continue
        fn = getattr(cls, method, None)
        if fn is None:
            problems.append(f"{class_name}.{method} is missing")
            continue
        names = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
        if names[:len(params)] != list(params):
            problems.append(f"{class_name}.{method} takes ({', '.join(names)}), expected ({', '.join(params)})")
    return problems


@functools.cache
def check_nnunet() -> str:
    """Check the installed nnU-Net once per process (see the module docstring); returns its
    version. Raises ``RuntimeError`` naming every mismatch and the supported range."""
    try:
        version = metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    problems = interface_problems()
    if problems:
        raise RuntimeError(f"nnunet-stseg supports {SUPPORTED_TEXT}; the installed nnunetv2 {version} differs in what "
                           f"it relies on: " + "; ".join(problems) + f". Install {SUPPORTED_TEXT}.")
    if version != "unknown" and not version_supported(version):
        warnings.warn(f"nnunet-stseg is tested with {SUPPORTED_TEXT}; nnunetv2 {version} is installed. Every "
                      f"interface it relies on is present, but results are unverified.", stacklevel=2)
    return version


__all__ = ["SUPPORTED_TEXT", "version_supported", "interface_problems", "check_nnunet"]
