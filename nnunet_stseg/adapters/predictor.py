"""Segment-then-segment inference as an nnU-Net predictor.

:class:`StSPredictor` overrides only ``predict_logits_from_preprocessed_data``: it receives the
case preprocessed for the fine configuration (full-resolution grid) and returns logits on that
grid, so nnU-Net's own preprocessing workers, export (resampling to the original image, crop
re-insertion, transpose, writer), ``--save_probabilities``, ``-num_parts``/``-part_id`` and
``--continue_prediction`` all keep working unchanged.

The stock ``nnUNetv2_predict`` always builds a plain ``nnUNetPredictor``. When it loads a model
trained with one of our trainers, nnU-Net calls that trainer's ``build_network_architecture`` from
``initialize_from_trained_model_folder``; the trainer then calls :func:`adopt_predictor`, which
turns that one predictor into an :class:`StSPredictor` (fine stage of the cascade) or a
:class:`PluginPredictor` (our other models). A guarded dispatch: other trainers and other
predictors are untouched. This and every other hook into nnU-Net's internals (frames, class
swaps, the managers' interception, the excepthook) live in :mod:`nnunet_stseg.adapters.nnunet_hooks`.

:class:`PluginPredictor` swaps its configuration and plans managers for ours
(:mod:`nnunet_stseg.adapters.inference_io`): the preprocessor checks the input and, for depth models,
appends the depth channel right after nnU-Net's own preprocessing (which records the cropping box
the depth needs); segmentations are written atomically. Every nnU-Net inference path creates its
preprocessor and writer from these managers (worker processes, ``-npp 0 -nps 0``, numpy-array
inputs), so they all agree with training without re-implementing any of them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from os.path import isdir, isfile, join
from pathlib import Path

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import empty_cache
from scipy import ndimage

from nnunet_stseg import settings
from nnunet_stseg.adapters.bundle import (COMPANION_CHECKPOINT, companion_model_folder, describe_source,
                                          embedded_companions)
from nnunet_stseg.adapters.compat import check_nnunet
from nnunet_stseg.adapters.config import StSConfig, apply_plan_overrides, checked_values, grid_spacing3
from nnunet_stseg.adapters.inference_io import (ERROR_KEY, FAILED_CASES_FILE, OBJECTS_SUFFIX, CaseError,
                                                SlabwiseLabelManager, coarse_resampling_of, one_line,
                                                remove_partial_folder, report_case_error)
from nnunet_stseg.adapters.nnunet_hooks import (ManagedManagers, install_excepthook, restore_original_class,
                                                adopt_predictor, adopted_class, loading_frame)  # noqa: F401 (re-exported)
from nnunet_stseg.adapters.passes import autocast, fold_weights, n_folds, network_on
from nnunet_stseg.adapters.results import model_folder, model_folder_name, train_command
from nnunet_stseg.atomic import write_json_atomic
from nnunet_stseg.core.cascade import CascadeResult, segment_then_segment
from nnunet_stseg.core.geometry import (FoundObjects, foreground_probability, probabilities_to_logits, resample_image,
                                        upsample_probabilities)
from nnunet_stseg.core.objects import objects_report

check_nnunet()  # a different nnU-Net fails here, with the supported range, not deep inside a worker

IN_PROCESS_MAX_CORES = 2
"""On the CPU device, a machine with at most this many usable cores predicts in the command's own
process (:func:`in_process_rule`); measured on 2 cores, see docs/design.md."""


def usable_cpu_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or ``taskset``'s limit),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def in_process_rule(device_type: str, cores: int, small_networks: bool, setting: bool | None = None) -> bool:
    """Whether ``nnUNetv2_predict`` should predict in its own process (nnU-Net's sequential path)
    rather than with the worker processes ``-npp``/``-nps`` ask for. ``small_networks``: the
    model's networks run on a coarse grid or on crops (the cascade), not over the whole image at full
    resolution. ``setting`` is ``STSEG_PREDICT_IN_PROCESS`` (None: decide here).

    nnU-Net starts its workers with 'spawn': each imports torch and nnU-Net again (about 4 s of CPU
    on a 2-core machine) and every case crosses process boundaries twice. On the CPU device the
    network already uses every core, so where cores are few and the networks are small, the workers
    cost more than they overlap: on 2 cores a 100-image native Kvasir run of the cascade took
    28.3 s with -npp 3 -nps 3, 18.9 s with 1 and 1, 13.0 s in one process (62 ms per further image
    against 70 and 138; ``benchmark --prediction_modes``). A full-resolution network keeps the main
    process busy long enough for the workers to pay (nnU-Net 2d there: 1407 ms per image with
    workers, 1712 in one process), and on a GPU the workers overlap with the device: both keep
    nnU-Net's workers.

    >>> in_process_rule("cpu", 2, True), in_process_rule("cpu", 16, True), in_process_rule("cuda", 2, True)
    (True, False, False)
    >>> in_process_rule("cpu", 2, False), in_process_rule("cpu", 2, True, setting=False)
    (False, False)
    >>> in_process_rule("cuda", 16, False, setting=True)
    True
    """
    if setting is not None:
        return setting
    return small_networks and device_type == "cpu" and cores <= IN_PROCESS_MAX_CORES


class MissingModelError(FileNotFoundError):
    """A model that prediction needs is not there. Under nnU-Net's commands it is printed as one
    ``[nnunet-stseg] ERROR`` line instead of a traceback (see
    :func:`~nnunet_stseg.adapters.nnunet_hooks.install_excepthook`)."""


class BatchIncomplete(RuntimeError):
    """Some cases of a batch failed; the others were predicted and written. Under nnU-Net's
    commands its summary ends the run (exit code 1), without a traceback: each failed case was
    already reported in its own line."""


install_excepthook(MissingModelError, BatchIncomplete)  # uncaught in a command (nnUNetv2_predict...): no traceback


def missing_model_message(what: str, folder, dataset_name: str, plans_name: str, trainer: str, configuration: str,
                          fold, hint: str = "") -> str:
    """One style for every missing companion model: what is missing, where it was looked for, and
    the stock command that trains it."""
    return (f"{what} {folder}{'' if fold is None else f'/fold_{fold}'}, which does not exist. Train it with: "
            f"{train_command(dataset_name, trainer, configuration, fold, plans_name)}{hint}")


def missing_coarse_message(folder, dataset_name: str, plans_name: str, sts: StSConfig, fold) -> str:
    return missing_model_message("segment-then-segment needs the coarse model", folder, dataset_name, plans_name,
                                 sts.coarse_trainer, sts.coarse_configuration, fold)


class PluginPredictor(ManagedManagers, nnUNetPredictor):
    """nnU-Net's predictor as our trainers' models get it (see the module docstring):

    - preprocessing by :class:`CheckedPreprocessor` (input checks; the depth channel when
      ``depth_channel`` is set);
    - a case that fails (unreadable, truncated, wrong channels, NaN/Inf) is reported in one line
      naming its files and skipped; the rest of the batch is predicted; at the end the failures are
      written to ``nnunet_stseg_failed_cases.json`` in the output folder and the call raises
      :class:`BatchIncomplete` (a non-zero exit for the command);
    - segmentations written atomically (:class:`AtomicReaderWriter`)."""

    depth_channel: bool = False
    applied_overrides: dict | None = None  # plan key -> {"plans": value, "used": value}
    last_objects: dict | None = None  # the objects report of the last case (also written as <case>.objects.json)
    # networks on a coarse grid or on crops only (see in_process_rule); a plain model's network runs
    # over the whole image at full resolution
    small_networks: bool = False
    # the per-run override keys (STSEG_OVERRIDES) this model uses; None: every key of its plan blocks
    run_keys: tuple[str, ...] | None = None
    model_name = "model"

    def _log(self, msg: str) -> None:
        print(f"[nnunet-stseg] {msg}", flush=True)

    def _record_overrides(self, changed: dict) -> None:
        """Log plan values replaced by environment variables and keep them for the record that
        is written next to the predictions (:data:`nnunet_stseg.settings.OVERRIDES_FILE`)."""
        if not changed:
            return
        self.applied_overrides = {**(self.applied_overrides or {}), **changed}
        print("[nnunet-stseg] plan values overridden by the environment: "
              + ", ".join(f"{k} {v['plans']} -> {v['used']}" for k, v in changed.items()), flush=True)

    def _with_run_overrides(self, sts: StSConfig, centre=None):
        """``sts`` (and the centre model's ``centre``) with the environment's per-run overrides
        applied, logged and recorded (:meth:`_record_overrides`); with :attr:`run_keys` set, the
        keys outside it are named in the log as not used and not applied. Returns both."""
        overrides = settings.plan_overrides()
        if self.run_keys is not None:
            overrides = checked_values(overrides, "plan overrides", per_run=True)
            unused = sorted(k for k in overrides if k not in self.run_keys)
            if unused:
                self._log(f"plan overrides the {self.model_name} does not use (ignored): " + ", ".join(unused))
            overrides = {k: v for k, v in overrides.items() if k not in unused}
        sts, centre, changed = apply_plan_overrides(sts, centre, overrides)
        self._record_overrides(changed)
        return sts, centre

    def _write_overrides_record(self, folders) -> None:
        """Next to the predictions: which plan values the environment replaced in this run. A run
        that predicted cases without any override removes an earlier run's record, so a stale record
        never describes newer predictions; a resumed run with nothing left to predict leaves it."""
        predicted = getattr(self, "sts", None) is not None  # the model's configuration was read for a case
        for folder in folders:
            path = os.path.join(folder, settings.OVERRIDES_FILE)
            if self.applied_overrides:
                write_json_atomic({"plan_overrides": self.applied_overrides,
                                   "variables": {s.name: os.environ.get(s.name) for s in settings.SETTINGS.values()
                                                 if s.plan_key and os.environ.get(s.name)}}, path)
            elif predicted and os.path.isfile(path):
                os.remove(path)

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """Loading another model starts from the predictor the user made: our state is dropped and
        the instance gets its own class back (nnU-Net's, or the user's subclass) before nnU-Net
        loads; a model of ours adopts it again while it loads, any other model runs as it would
        have without us."""
        original = restore_original_class(self)
        return original.initialize_from_trained_model_folder(self, model_training_output_dir, use_folds,
                                                             checkpoint_name)

    def enable_depth_channel(self, enabled: bool = True) -> None:
        """Switch the depth channel on (or off) for the configuration set now or later."""
        self.depth_channel = bool(enabled)
        if self.configuration_manager is not None:
            self.configuration_manager = self.configuration_manager

    def n_image_channels(self) -> int:
        """Channels of the image itself (the dataset's), without the depth channel."""
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality"))
        return len(names)

    # ------------------------------------------------------------------------------------------
    # a bad case does not take the batch down
    # ------------------------------------------------------------------------------------------
    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        failures: list[dict] = []
        output_folders: set[str] = set()

        def usable_cases():
            for item in data_iterator:
                if item.get("ofile"):
                    output_folders.add(os.path.dirname(os.path.abspath(item["ofile"])))
                properties = item.get("data_properties")
                if isinstance(properties, dict) and ERROR_KEY in properties:
                    report_case_error(properties[ERROR_KEY])
                    failures.append({"output": item.get("ofile"), "error": properties[ERROR_KEY]})
                    continue
                # nnU-Net predicts each item right after taking it: the objects report's case
                self.__dict__["_current_case"] = (properties, item.get("ofile"))
                # a label map only for a case exported to a file (an array returned to the caller is
                # converted with the predictor's own label manager, nnU-Net's)
                self.__dict__["_labels_only"] = (not save_probabilities and bool(item.get("ofile")), None)
                yield item

        try:
            with self.labels_only(not save_probabilities):
                result = super().predict_from_data_iterator(usable_cases(), save_probabilities,
                                                            num_processes_segmentation_export)
        finally:
            for folder in output_folders:  # every export has finished (or failed) here
                remove_partial_folder(folder)
        self._write_overrides_record(output_folders)
        self._report_failures(failures)
        return result

    # nnU-Net reads this signature (it records its arguments with inspect + locals()): keep it
    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str = None, num_parts: int = 1, part_id: int = 0):
        """nnU-Net's, or, when :func:`in_process_rule` says so (or ``-npp``/``-nps`` are both 0), the
        cases of this part (``-num_parts``/``-part_id``, ``--continue_prediction``: selected here
        as nnU-Net's worker path selects them; its own sequential path ignores the parts) predicted
        one after the other in this process. Same preprocessing, network and export either way."""
        setting, cores = settings.predict_in_process(), usable_cpu_cores()
        asked_none = num_processes_preprocessing == 0 and num_processes_segmentation_export == 0
        if not (asked_none or in_process_rule(self.device.type, cores, self.small_networks, setting)):
            return super().predict_from_files(list_of_lists_or_source_folder,
                                              output_folder_or_list_of_truncated_output_files, save_probabilities,
                                              overwrite, num_processes_preprocessing,
                                              num_processes_segmentation_export, folder_with_segs_from_prev_stage,
                                              num_parts, part_id)
        cases, outputs, _ = self._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, overwrite, part_id, num_parts, save_probabilities)
        if not cases:
            return
        why = ("-npp 0 -nps 0" if asked_none else f"{settings.IN_PROCESS_ENV}=1" if setting else
               f"CPU device, {cores} usable cores, small networks: worker processes would cost more "
               f"than they overlap; {settings.IN_PROCESS_ENV}=0 starts them")
        self._log(f"predicting {len(cases)} {settings.IN_PROCESS_LOG} ({why})")
        if outputs:
            os.makedirs(os.path.dirname(os.path.abspath(outputs[0])), exist_ok=True)
        return self.predict_from_files_sequential(cases, outputs, save_probabilities, True,
                                                  folder_with_segs_from_prev_stage)

    def predict_from_files_sequential(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        """nnU-Net's sequential path (``-npp 0 -nps 0``), one case at a time so that a failing case
        is reported and skipped like in the worker path."""
        cases, outputs, _ = self._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, overwrite, 0, 1, save_probabilities)
        outputs = outputs if outputs is not None else [None] * len(cases)
        output_folders = {os.path.dirname(os.path.abspath(o)) for o in outputs if o}
        self.configuration_manager.on_error = "raise"
        self.configuration_manager.properties_sink = []
        failures, returned = [], []
        try:
            for files, ofile in zip(cases, outputs):
                self.__dict__["_sequential_ofile"] = ofile
                try:
                    with self.labels_only(not save_probabilities and ofile is not None):
                        returned += super().predict_from_files_sequential(
                            [files], [ofile] if ofile is not None else None, save_probabilities, True,
                            folder_with_segs_from_prev_stage) or []
                except CaseError as e:
                    report_case_error(str(e))
                    failures.append({"output": ofile, "error": str(e)})
        finally:
            self.configuration_manager.on_error = "mark"
            self.configuration_manager.properties_sink = None
            self.__dict__.pop("_sequential_ofile", None)
            for folder in output_folders:
                remove_partial_folder(folder)
        self._write_overrides_record(output_folders)
        self._report_failures(failures)
        return returned

    def predict_single_npy_array(self, input_image: np.ndarray, image_properties: dict,
                                 segmentation_previous_stage: np.ndarray = None, output_file_truncated: str = None,
                                 save_or_return_probabilities: bool = False):
        """nnU-Net's; the case's properties are kept for the objects report."""
        self.configuration_manager.properties_sink = []
        self.__dict__["_sequential_ofile"] = output_file_truncated
        try:
            with self.labels_only(not save_or_return_probabilities and output_file_truncated is not None):
                return super().predict_single_npy_array(input_image, image_properties, segmentation_previous_stage,
                                                        output_file_truncated, save_or_return_probabilities)
        finally:
            self.configuration_manager.properties_sink = None
            self.__dict__.pop("_sequential_ofile", None)

    @contextlib.contextmanager
    def labels_only(self, enabled: bool = True, properties: dict | None = None):
        """Within: the cases' exports need their segmentation only (no ``--save_probabilities``), so
        a model kind that can (the cascade) hands nnU-Net's export a label map instead of full-size
        logits (:func:`~.inference_io.is_label_map`), when the export does not resample the case.
        ``properties``: the case's, for a caller that predicts a preprocessed array itself."""
        previous = self.__dict__.get("_labels_only")
        self.__dict__["_labels_only"] = (bool(enabled), properties)
        try:
            yield self
        finally:
            if previous is None:
                self.__dict__.pop("_labels_only", None)
            else:
                self.__dict__["_labels_only"] = previous

    def _label_conversion(self, shape: tuple[int, ...]):
        """The export's own conversion of fused probabilities (K, *region) to labels, when only
        the label map of this case is exported (:meth:`labels_only`), the label manager is ours and
        the export will not resample the case (its grid is the one before resampling); else None."""
        enabled, properties = self.__dict__.get("_labels_only") or (False, None)
        manager = self.plans_manager.get_label_manager(self.dataset_json) if enabled else None
        if not isinstance(manager, SlabwiseLabelManager):  # the export's label manager (nnU-Net's own plans: ours)
            return None
        if properties is None:
            case = self.__dict__.get("_current_case")
            sink = getattr(self.configuration_manager, "properties_sink", None)
            properties = case[0] if case is not None else sink[-1] if sink else None
        before = (properties or {}).get("shape_after_cropping_and_before_resampling")
        if before is None or tuple(int(v) for v in before) != tuple(shape):
            return None
        multilabel = manager.has_regions
        # on the CPU, as the export converts the logits it is handed (the same ties, the same labels)
        return lambda p: manager.convert_logits_to_segmentation(
            probabilities_to_logits(p.cpu(), multilabel, inplace=True))

    # ------------------------------------------------------------------------------------------
    # where a case's arrays live, and the out-of-memory retry on the CPU (every model kind)
    # ------------------------------------------------------------------------------------------
    @property
    def work_device(self) -> torch.device:
        """Where the full-resolution arrays of a case live (image, coarse probabilities, fused
        canvas, polar accumulators): the network's device, the CPU with ``--not_on_device``
        (``perform_everything_on_device=False``), and the CPU for a case that ran out of device
        memory. The networks always run on ``self.device``, as in nnU-Net."""
        forced = self.__dict__.get("_work_device")
        if forced is not None:
            return forced
        return self.device if self.perform_everything_on_device else torch.device("cpu")

    def _case_on_work_device(self, data: torch.Tensor) -> torch.Tensor:
        """The case on :attr:`work_device`, float32: the tensor itself on the CPU, ONE copy per case
        on a GPU (the coarse input and the crops are both cut from it; forgotten after the case)."""
        memo = self.__dict__.setdefault("_case_memo", {})
        if "case" not in memo:
            memo["case"] = torch.as_tensor(data).to(self.work_device, torch.float32)
        return memo["case"]

    def _predict_case(self, data: torch.Tensor) -> torch.Tensor:
        """One case (C, *grid) -> logits on that grid, on the CPU (each model kind's own)."""
        raise NotImplementedError

    def _predict_case_or_on_cpu(self, data: torch.Tensor) -> torch.Tensor:
        """:meth:`_predict_case`; if the case does not fit on the device (a ``RuntimeError``), it is
        predicted again with its full-resolution arrays on the CPU, as nnU-Net's sliding window
        does (the next case tries the device again). Then the case's objects report."""
        try:
            try:
                logits = self._predict_case(data)
            except RuntimeError as e:
                if self.work_device.type == "cpu":  # nowhere left to go
                    raise
                self._log(f"the case did not fit on {self.device} ({one_line(e, 160)}); predicting it again with "
                          f"its full-resolution arrays on the CPU")
                self.__dict__.pop("_case_memo", None)
                self.__dict__.pop("_case_objects", None)
                empty_cache(self.device)
                self.__dict__["_work_device"] = torch.device("cpu")
                try:
                    logits = self._predict_case(data)
                finally:
                    self.__dict__.pop("_work_device", None)
        finally:
            self.__dict__.pop("_case_memo", None)  # made per case
            release_freed_heap(int(np.prod(data.shape[1:])))  # before nnU-Net's export adds its label maps
        self._report_objects(tuple(data.shape[1:]))
        return logits

    # ------------------------------------------------------------------------------------------
    # the per-object report <case>.objects.json (every model kind)
    # ------------------------------------------------------------------------------------------
    def _sts_config(self) -> StSConfig:
        """The model's ``sts`` block (each model kind reads its own)."""
        raise NotImplementedError

    def _fine_spacing3(self) -> list[float]:
        return grid_spacing3(self.configuration_manager.spacing)

    def _keep_objects(self, found: dict, fallback: str | None) -> None:
        """Keep a case's found objects (the ``found`` of :func:`~nnunet_stseg.core.objects.objects_report`,
        on the preprocessed grid) until the case's report is written."""
        if self._sts_config().objects_report:
            self.__dict__["_case_objects"] = {**found, "fallback": fallback}

    def _report_objects(self, shape: tuple[int, ...]) -> None:
        """The objects report of the case just predicted: :attr:`last_objects`, and
        ``<case>.objects.json`` next to its output (written atomically) when it has one."""
        found = self.__dict__.pop("_case_objects", None)
        properties, ofile = self._take_case()
        if found is None:
            return
        report = objects_report(found, shape, properties, self.plans_manager.transpose_backward,
                                self._fine_spacing3())
        report = {"case": os.path.basename(ofile) if ofile else None, "model": self._model_description(), **report}
        self.last_objects = report
        if ofile:
            write_json_atomic(report, f"{ofile}{OBJECTS_SUFFIX}")

    def _model_description(self) -> str:
        source = getattr(self, "_sts_source", None)
        name = f"{self.plans_manager.dataset_name} {self.configuration_manager.configuration.get('sts', {}).get('role')}"
        return f"{name} model {source[0]}" if source else name

    def _take_case(self) -> tuple[dict | None, str | None]:
        """Properties and truncated output file of the case being predicted (None, None when the
        preprocessed array came without them, e.g. a trainer's validation)."""
        case = self.__dict__.pop("_current_case", None)
        if case is not None:
            return case
        sink = getattr(self.configuration_manager, "properties_sink", None)
        return (sink.pop() if sink else None), self.__dict__.get("_sequential_ofile")

    def _report_failures(self, failures: list[dict]) -> None:
        folders = {os.path.dirname(os.path.abspath(f["output"])) for f in failures if f["output"]}
        for folder in folders:
            write_json_atomic({"failed_cases": [f for f in failures if f["output"] and
                                                os.path.dirname(os.path.abspath(f["output"])) == folder]},
                              os.path.join(folder, FAILED_CASES_FILE))
        if failures:
            lines = "\n".join(f"  {f['error']}" for f in failures)
            raise BatchIncomplete(f"{len(failures)} case(s) could not be predicted (all other cases were written; "
                                  f"list in {FAILED_CASES_FILE}):\n{lines}")


class StSPredictor(PluginPredictor):
    """nnU-Net predictor that runs coarse model -> boxes -> fine crops -> fusion per case."""

    coarse: nnUNetPredictor | None = None
    sts: StSConfig | None = None
    last_timings: dict | None = None
    sts_role = "fine"  # the configuration role this predictor runs
    small_networks = True
    # where the cascade finds its objects: "coarse" (the coarse model's grid, since 0.8) or "full" (the
    # coarse probabilities brought to the full grid first, as before 0.8: `benchmark --compare_paths`)
    objects_grid = "coarse"

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    def _sts_config(self) -> StSConfig:
        """The configuration's ``sts`` block with the environment's plan overrides applied, read
        once per loaded model (the overrides are logged and recorded in :attr:`applied_overrides`)."""
        if self.sts is None:
            sts = StSConfig.for_role(self.configuration_manager.configuration, self.sts_role,
                                     f"the {self.sts_role} model's configuration", type(self).__name__)
            self.sts, _ = self._with_run_overrides(sts)
        return self.sts

    def attach_coarse(self, folds, checkpoint_name: str = "checkpoint_final.pth",
                      coarse_folder: str | None = None) -> None:
        """Load the coarse model of the same folds: from ``coarse_folder`` if given, else see
        :meth:`_attach_companion` (``checkpoint_name`` is this model's checkpoint, which may carry
        an embedded copy)."""
        sts = self._sts_config()
        coarse, source = self._attach_companion("coarse", "segment-then-segment needs the coarse model",
                                                sts.coarse_trainer, sts.coarse_configuration, folds, checkpoint_name,
                                                coarse_folder)
        if getattr(coarse, "depth_channel", False) and not self.depth_channel:
            raise ValueError(f"the coarse model ({source}) uses a depth channel but the fine model does not; "
                             f"plan both with `nnunet-stseg plan --depth` (or neither) and retrain")
        self.coarse = coarse
        self._log(f"coarse model: {source} folds {folds}")

    def _attach_companion(self, name: str, what: str, trainer: str, configuration: str, folds, checkpoint_name: str,
                          folder: str | None = None, hint: str = "", **attributes) -> tuple[nnUNetPredictor, str]:
        """A companion model (``coarse``, ``centre``) of the same folds and where it came from, looked
        for in this order: ``folder`` if given; the copy embedded in this model's own checkpoints
        (:mod:`nnunet_stseg.adapters.bundle`: a model folder installed from a zip is complete); the
        companion's folder next to this model's folder (a model folder moved elsewhere, ``-m``);
        its folder in ``nnUNet_results``. Folders give their ``checkpoint_final.pth``."""
        if folder is None:
            source = getattr(self, "_sts_source", None)
            model_dir = source[0] if source is not None else None
            if model_dir is not None and folds is not None:
                entries = embedded_companions(model_dir, folds, checkpoint_name, name)
                if entries is not None:
                    with companion_model_folder(model_dir, entries) as tmp:
                        companion = self._load_companion(what, tmp, trainer, configuration, folds,
                                                         COMPANION_CHECKPOINT, hint, **attributes)
                    return companion, describe_source(entries)
            folder = str(model_folder(self.plans_manager.dataset_name, trainer, configuration,
                                      self.plans_manager.plans_name))
            if model_dir is not None:
                sibling = Path(model_dir).parent / model_folder_name(trainer, configuration,
                                                                     self.plans_manager.plans_name)
                if sibling.is_dir() or not isdir(folder):
                    folder = str(sibling)
        companion = self._load_companion(what, folder, trainer, configuration, folds, COMPANION_CHECKPOINT, hint,
                                         **attributes)
        return companion, folder

    def _load_companion(self, what: str, folder: str, trainer: str, configuration: str, folds, checkpoint_name: str,
                        hint: str = "", **attributes) -> nnUNetPredictor:
        """A companion model of this one (the coarse model, the centre-point model): the same folds
        and checkpoint, this predictor's inference settings, ``attributes`` set before it loads.
        A missing folder or fold is one error naming it and the stock command that trains it."""
        folds = list(folds) if folds is not None else None
        ds, plans = self.plans_manager.dataset_name, self.plans_manager.plans_name
        if not isdir(folder):
            raise MissingModelError(missing_model_message(what, folder, ds, plans, trainer, configuration,
                                                          (folds or [None])[0], hint))
        for f in folds or []:
            if not isfile(join(folder, f"fold_{f}", checkpoint_name)):
                raise MissingModelError(missing_model_message(what, folder, ds, plans, trainer, configuration, f, hint)
                                        + f" (looked for {checkpoint_name})")
        companion = nnUNetPredictor(tile_step_size=self.tile_step_size, use_gaussian=self.use_gaussian,
                                    use_mirroring=self.use_mirroring,
                                    perform_everything_on_device=self.perform_everything_on_device,
                                    device=self.device, verbose=False, allow_tqdm=False)
        for name, value in attributes.items():
            setattr(companion, name, value)
        companion.initialize_from_trained_model_folder(folder, folds, checkpoint_name)
        return companion

    def _model_source(self) -> tuple[list, str]:
        """Folds and checkpoint name of the model nnU-Net loaded (for the companion models)."""
        source = getattr(self, "_sts_source", None)
        if source is None:
            raise RuntimeError(f"{self.__class__.__name__} has no coarse model: call attach_coarse() first")
        model_dir, folds, checkpoint_name = source
        if folds is None:
            folds = nnUNetPredictor.auto_detect_available_folds(model_dir, checkpoint_name)
        return folds, checkpoint_name

    def _ensure_coarse(self) -> None:
        if self.coarse is None:
            self.attach_coarse(*self._model_source())

    def _clock(self) -> float:
        """Wall clock after the device finished its queued work (stage timings on GPUs)."""
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------------------------------
    # the cascade
    # ------------------------------------------------------------------------------------------
    def _size_rule_grid(self) -> str:
        """``full`` or ``coarse``: the grid the size rule counts voxels on (``sts.crop.size_rule_grid``)."""
        return self._sts_config().crop.size_rule_grid

    def _rule_spacing3(self) -> list[float] | None:
        """Where the size rule is judged: None (the full-resolution grid, the paper's rule) unless
        :meth:`_size_rule_grid` is ``coarse``: then the coarse model's grid spacing (3 axes; a 2d
        configuration's slice axis from the fine grid)."""
        if getattr(self.coarse, "configuration_manager", None) is None or self._size_rule_grid() != "coarse":
            return None
        return self._grid_spacing3_of(self.coarse)

    def _grid_spacing3_of(self, model: nnUNetPredictor) -> list[float]:
        """The spacing of ``model``'s configuration on 3 axes (a 2d configuration's slice axis is
        the fine grid's: 2d models never resample across slices)."""
        sp = [float(v) for v in model.configuration_manager.spacing]
        return sp if len(sp) == 3 else [self._fine_spacing3()[0]] + sp

    def _coarse_input(self, data: torch.Tensor, model: nnUNetPredictor | None = None) -> torch.Tensor:
        """The fine-grid case on the grid of the coarse configuration (of ``model``, default the
        coarse model), made by the function its training data went through
        (``sts.coarse_resampling``): ``antialiased`` on :attr:`work_device`
        (:func:`~nnunet_stseg.core.geometry.resample_image`), ``nnunet`` by that configuration's
        nnU-Net resampling on the CPU (plans before 0.8). The depth channel (last) goes along only if
        that model uses one too. Made once per case and grid (the coarse and the centre-point model
        share it); :meth:`predict_logits_from_preprocessed_data` forgets it after the case."""
        model = model if model is not None else self.coarse
        with_depth = not (self.depth_channel and not getattr(model, "depth_channel", False))
        cm = model.configuration_manager
        resampling = coarse_resampling_of(cm.configuration) or "nnunet"
        fine_sp = np.array(self._fine_spacing3())
        coarse_sp = np.array(self._grid_spacing3_of(model))
        shape = np.array(data.shape[1:])
        new_shape = tuple(int(v) for v in np.maximum(1, np.rint(shape * fine_sp / coarse_sp)))
        key = (new_shape, resampling, with_depth)
        memo = self.__dict__.setdefault("_case_memo", {})
        if key not in memo:
            channels = slice(None) if with_depth else slice(0, self.n_image_channels())
            if new_shape == tuple(shape):
                made = data[channels]
            elif resampling == "antialiased":
                made = resample_image(self._case_on_work_device(data)[channels], new_shape)
            else:
                arr = data[channels].numpy() if isinstance(data, torch.Tensor) else np.asarray(data)[channels]
                made = torch.from_numpy(np.ascontiguousarray(cm.resampling_fn_data(arr, new_shape, fine_sp,
                                                                                   coarse_sp)))
            memo[key] = made
        return memo[key]

    @torch.inference_mode()
    # nnU-Net reads these two signatures (it records its arguments with inspect + locals()): keep them
    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str = None, num_parts: int = 1, part_id: int = 0):
        self._ensure_coarse()  # a missing companion model stops here, before any worker starts
        return super().predict_from_files(list_of_lists_or_source_folder,
                                          output_folder_or_list_of_truncated_output_files, save_probabilities,
                                          overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                                          folder_with_segs_from_prev_stage, num_parts, part_id)

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        self._ensure_coarse()
        return super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                     output_folder_or_list_of_truncated_output_files,
                                                     save_probabilities, overwrite, folder_with_segs_from_prev_stage)

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """One case (the full-resolution grid) -> logits on that grid, on the CPU (on the CPU
        again if it does not fit on the device: :meth:`_predict_case_or_on_cpu`)."""
        self.__dict__["_stage_seconds"] = {}
        started = self._clock()
        logits = self._predict_case_or_on_cpu(data)
        self._log_stage_seconds(self._clock() - started)
        return logits

    def _record_objects(self, found: FoundObjects | None, coarse_probs: torch.Tensor | None, multilabel: bool,
                        fallback: str | None = None, below: np.ndarray | None = None,
                        voxels_per_cell: float = 1.0) -> None:
        """Keep what this case's coarse stage found for the objects report (boxes on the preprocessed
        grid; ``found.labels`` and ``coarse_probs`` on the grid the components were found on, each of
        its cells ``voxels_per_cell`` preprocessed voxels); with ``below`` (N,) (recall-first
        proposals) each object says whether it was a coarse argmax component or a proposal below the
        coarse decision."""
        if not self._sts_config().objects_report:
            return
        if found is None or len(found.ids) == 0:
            empty = np.zeros((0, 3, 2), np.int64)
            record = {"tight": empty, "crop": empty, "voxels": [], "mean_probability": [],
                      "n_dropped": found.n_dropped if found is not None else 0}
        else:
            fg = foreground_probability(coarse_probs, multilabel).cpu().numpy()
            cells = np.bincount(found.labels.ravel())[found.ids]
            record = {"tight": found.tight_boxes, "crop": found.crop_boxes,
                      "voxels": np.rint(cells * voxels_per_cell).astype(np.int64),
                      "mean_probability": np.asarray(ndimage.mean(fg, found.labels, found.ids)),
                      "n_dropped": found.n_dropped}
            if below is not None:
                record["proposal"] = ["below the coarse decision" if b else "coarse argmax" for b in below]
        self._keep_objects(record, fallback)

    def _record_fine_confidence(self, confidence: np.ndarray, rejected: np.ndarray | None) -> None:
        """Add the fine stage's confidence in each object (:func:`segmented_confidence`, (N,)) and,
        with ``proposal_confirmation``, which proposals it rejected ((N,) bool) to the case's objects
        report."""
        found = self.__dict__.get("_case_objects")
        if found is not None and len(found["tight"]) == len(confidence):
            found["fine_confidence"] = confidence
            if rejected is not None:
                found["rejected"] = rejected

    def fine_batch_size(self, crop_shape) -> int:
        """Crops per fine forward pass: ``sts.crops_per_batch``; on the CPU also at most
        :data:`CPU_BATCH_VOXELS` voxels of crops (a 64^3 crop through a width-32 3D U-Net holds
        about 0.2 GiB of activations, and larger batches are not faster per crop on a CPU:
        docs/design.md), at least one crop."""
        per_batch = self._sts_config().crops_per_batch
        if self.device.type == "cpu":
            per_batch = min(per_batch, max(1, CPU_BATCH_VOXELS // max(1, int(np.prod(crop_shape)))))
        return per_batch

    def _forward_fine(self, crops: torch.Tensor) -> torch.Tensor:
        """Fine logits for (N, C, *patch) crops: batched on the network's device (under autocast on
        CUDA, as nnU-Net's sliding window), averaged over folds (:func:`~.passes.fold_weights`, as
        nnU-Net averages logits over folds) with nnU-Net's mirroring TTA of each batch; returned
        float32 on the crops' device."""
        per_batch = self.fine_batch_size(crops.shape[2:])
        net = network_on(self)
        total = None
        for _ in fold_weights(self, net):
            with autocast(self.device):
                outs = [self._internal_maybe_mirror_and_predict(crops[i:i + per_batch].to(self.device))
                        for i in range(0, len(crops), per_batch)]
            out = torch.cat(outs).float()
            total = out if total is None else total + out
        return (total / n_folds(self)).to(crops.device)

    def coarse_output(self, data: torch.Tensor) -> torch.Tensor:
        """Coarse model probabilities (K, *coarse grid) on :attr:`work_device`: the case made by the
        coarse configuration's resampling, the coarse network (its folds averaged, nnU-Net's sliding
        window), the nonlinearity. The seconds of the first two go to :attr:`stage_seconds`."""
        t0 = self._clock()
        coarse_in = self._coarse_input(data)
        t1 = self._clock()
        coarse_logits = companion_logits(self.coarse, coarse_in)
        t2 = self._clock()
        self._add_seconds(coarse_input=t1 - t0, coarse_network=t2 - t1)
        return self.label_manager.apply_inference_nonlin(coarse_logits.to(self.work_device).float())

    def coarse_probabilities(self, data: torch.Tensor) -> torch.Tensor:
        """Coarse model probabilities (K, *data.shape[1:]) on the full-resolution grid
        (:attr:`work_device`, float32): :meth:`coarse_output` linearly upsampled (the polar stage's
        origins are found there, and its fused slices replace them). Not half precision: the
        polar stage thresholds these maps and drops components below the size rule, so a
        half-precision rounding at 0.5 could move a component across the rule (0.8.4 did: 61 of
        36,864 voxels of the test suite's polar model changed, whole small components)."""
        probs = self.coarse_output(data)
        t0 = self._clock()
        probs = upsample_probabilities(probs, tuple(data.shape[1:]))
        self._add_seconds(coarse_to_full_grid=self._clock() - t0)
        return probs

    # ------------------------------------------------------------------------------------------
    # stage timings (one line per case at debug level; the benchmark reads them)
    # ------------------------------------------------------------------------------------------
    @property
    def stage_seconds(self) -> dict[str, float]:
        """Seconds of each stage of the case being predicted (reset per case)."""
        return self.__dict__.setdefault("_stage_seconds", {})

    def _add_seconds(self, **seconds: float) -> None:
        for k, v in seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + float(v)

    def _log_stage_seconds(self, total: float) -> None:
        """The case's timing line (``STSEG_LOG_LEVEL=debug`` or ``nnUNetv2_predict --verbose``):
        every stage's seconds, the networks' share, and the rest."""
        if not (settings.debug_log() or getattr(self, "verbose", False)):
            return
        stages = self.stage_seconds
        network = sum(v for k, v in stages.items() if k.endswith("network"))
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in stages.items())
        self._log(f"DEBUG stage seconds: {parts}; total {total:.3f} (networks {network:.3f}, "
                  f"other {max(0.0, total - network):.3f})")

    def _predict_case(self, data: torch.Tensor) -> torch.Tensor:
        """One case through the cascade: the coarse model (nnU-Net's sliding window), then
        :func:`~nnunet_stseg.core.cascade.segment_then_segment` with the fine network; logs, the
        objects report and the stage seconds here. Logits on the full grid, on the CPU."""
        sts = self._sts_config()
        self._ensure_coarse()
        multilabel = self.label_manager.has_regions
        shape = tuple(data.shape[1:])
        crop = sts.crop
        t0 = self._clock()
        coarse = self.coarse_output(data)  # (K, *grid)
        if self.objects_grid == "full":
            tu = self._clock()
            coarse = upsample_probabilities(coarse, shape)
            self._add_seconds(coarse_to_full_grid=self._clock() - tu)
        tc = self._clock()
        voxels_per_cell = float(np.prod(shape)) / float(np.prod(coarse.shape[1:]))

        def found_objects(result: CascadeResult) -> None:
            self._record_objects(result.found, coarse, multilabel, result.fallback,
                                 result.below if crop.proposal_threshold else None, voxels_per_cell=voxels_per_cell)
            self._log_objects(result, sts)

        # on the CPU one fine batch at a time: a chunk's sampling grids, crops, logits and probabilities
        # (46 3D crops at S = 64: ~400 MiB) then never coexist with the network's activations
        batch = (sts.max_crops if self.device.type != "cpu" else
                 min(sts.max_crops, self.fine_batch_size(crop.patch_size)))
        result = segment_then_segment(
            coarse, self._case_on_work_device(data), self._forward_fine, crop, multilabel=multilabel,
            fine_spacing=self._fine_spacing3(), rule_spacing=self._rule_spacing3(), fallback=sts.fallback,
            max_crops=sts.max_crops, batch=batch, score=sts.objects_report,
            fine_dims=len(self.configuration_manager.patch_size), clock=self._clock, on_objects=found_objects,
            free_memory=lambda: release_freed_heap(int(np.prod(shape))), to_labels=self._label_conversion(shape))
        if result.confidence is not None:
            self._record_fine_confidence(result.confidence, result.rejected)
            if result.rejected is not None and result.rejected.any():
                self._log(f"{int(result.rejected.sum())} of {int(result.below.sum())} proposal(s) below the coarse "
                          f"decision rejected by the fine stage (mean foreground probability < "
                          f"proposal_confirmation={crop.proposal_confirmation})")
        tl = self._clock()
        if result.labels is not None:  # only the segmentation is exported: the label map in place of logits
            logits = torch.from_numpy(result.labels)[None]
        else:
            logits = probabilities_to_logits(result.probabilities, multilabel, inplace=True).cpu()
        seconds = result.seconds
        geometry_s = seconds["geometry"] + self._clock() - tl
        fine_s = seconds.get("fine_network", 0.0)
        self._add_seconds(coarse_to_full_grid=seconds["coarse_to_full_grid"], geometry=geometry_s,
                          **({"fine_network": fine_s} if result.fallback != "coarse" else {}),
                          **({"to_labels": seconds["to_labels"]} if "to_labels" in seconds else {}))
        self.last_timings = {"coarse_s": tc - t0 + seconds["coarse_decision"] + seconds["coarse_to_full_grid"],
                             "geometry_s": geometry_s, "fine_s": fine_s, "n_boxes": int(len(result.boxes)),
                             "n_dropped": result.found.n_dropped, "fallback": result.fallback}
        return logits

    def _log_objects(self, result: CascadeResult, sts: StSConfig) -> None:
        """The case's line on what the coarse stage found (before the fine passes)."""
        crop, n_dropped, below = sts.crop, result.found.n_dropped, result.below
        if result.fallback is not None:
            self._log(f"no coarse component{f' ({n_dropped} below the size threshold)' if n_dropped else ''}: "
                      f"fallback '{result.fallback}' ("
                      f"{'coarse prediction kept' if result.fallback == 'coarse' else 'fine pass on the whole image'})")
            return
        n_batches = -(-len(result.boxes) // sts.max_crops)
        self._log(f"{len(result.boxes)} object(s) cropped"
                  + (f" ({int(below.sum())} below the coarse decision, foreground probability >= "
                     f"{crop.proposal_threshold})" if below.any() else "")
                  + (f", {n_dropped} component(s) below the size rule ({crop.min_object_size} "
                     f"{crop.size_rule_grid}-grid voxels) dropped" if n_dropped else "")
                  + (f"; in {n_batches} batches of at most max_crops={sts.max_crops}" if n_batches > 1 else ""))


def companion_logits(model: nnUNetPredictor, data: torch.Tensor) -> torch.Tensor:
    """Logits of a companion model (coarse, centre-point) for its input ``data``: nnU-Net's sliding
    window. With one fold its weights are loaded once (:func:`~.passes.fold_weights`; nnU-Net's
    ``predict_logits_from_preprocessed_data`` loads them for every case) and the logits stay on the
    device (that method moves them to the host); with several folds, nnU-Net's method as it is
    (folds averaged on the host, with its thread limit)."""
    if len(getattr(model, "list_of_parameters", None) or []) != 1:
        return model.predict_logits_from_preprocessed_data(data)
    for _ in fold_weights(model):
        return model.predict_sliding_window_return_logits(data)


@functools.cache
def _glibc_trim():
    """glibc's ``malloc_trim`` (None off glibc: macOS, Windows, musl)."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


TRIM_MIN_VOXELS = 1 << 24
"""Cases below this many voxels (16.8 M: a 64 MiB float32 channel) skip :func:`release_freed_heap`:
what their stages free is small next to the trim's own cost (about 1 ms per call in a process
holding torch, three calls per case: 4 % of a 2D 1024^2 case's prediction)."""


def release_freed_heap(voxels: int | None = None) -> None:
    """Give the heap memory freed so far back to the operating system (glibc ``malloc_trim(0)``;
    nothing elsewhere), for a case of ``voxels`` voxels (None: always). The geometry makes many
    arrays of a few MiB per object (support labels, region masks, box-sized resamplings); glibc
    serves those from its heap once its dynamic mmap threshold has grown, and keeps freed heap pages
    resident, so they pile up from stage to stage (50 objects in a 1000 x 512^2 volume: about
    180 MiB more peak than 5 objects; docs/reliability.md, "Memory of large volumes"). Trimming
    between the stages keeps part of that from adding to the next stage's peak. A call walks the
    whole heap (about 1 ms with torch loaded), so cases below :data:`TRIM_MIN_VOXELS` skip it."""
    if voxels is not None and voxels < TRIM_MIN_VOXELS:
        return
    trim = _glibc_trim()
    if trim is not None:
        trim(0)


CPU_BATCH_VOXELS = 64 ** 3
"""Voxels of crops in one fine forward pass on the CPU (:meth:`StSPredictor.fine_batch_size`): one
3D crop at S = 64 (as fast per crop as larger batches on a CPU, with half the activations of two:
``python -m benchmarks.benchmark --fine_batches 1 2 4``), 64 2D crops at S = 64 (up to ``crops_per_batch``)."""

__all__ = ["StSPredictor", "PluginPredictor", "BatchIncomplete", "adopt_predictor", "adopted_class", "loading_frame",
           "companion_logits",
           "missing_model_message"]
