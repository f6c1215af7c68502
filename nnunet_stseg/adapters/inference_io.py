"""What our predictors change in nnU-Net's inference input and output, as drop-in nnU-Net parts.

- :class:`CheckedPreprocessor`: nnU-Net's ``DefaultPreprocessor`` with input checks (channel
  count, non-finite intensities) and, optionally, the depth channel appended after nnU-Net's
  preprocessing. A case that cannot be read or fails a check gives ONE line naming its files; in
  nnU-Net's worker processes the case is then replaced by a marker that the predictor skips, so
  the rest of the batch goes on (nnU-Net would stop the whole batch).
- :class:`AtomicReaderWriter`: the plans' image reader/writer, but segmentations are written to a
  temporary file and renamed into place, so an interrupted run never leaves a half-written file
  that looks finished (``--continue_prediction`` skips every file that exists).
- :class:`SlabwiseLabelManager`: nnU-Net's ``LabelManager``, but logits become a label map (and
  probabilities) a slab of slices at a time, straight into the export's own dtype (uint8 below 255
  labels): the same label map, without nnU-Net's int64 argmax of the whole volume (2 x the float32
  volume) or float32 copies of all K logit maps during the export.
- :class:`PluginConfigurationManager` / :class:`PluginPlansManager`: the same configuration and
  plans; they only hand nnU-Net the classes above, and a coarse configuration planned with
  ``sts.coarse_resampling = antialiased`` its resampling function (:func:`antialiased_resampling`).
  Both pickle by module path, so nnU-Net's spawned preprocessing and export workers use them too.
- The coarse configurations' TRAINING data goes through :class:`CheckedPreprocessor` as well
  (``nnunet-stseg plan``), so the coarse model is trained on images made by the same function as
  the ones it predicts; each case's properties record it (:data:`COARSE_RESAMPLING_KEY`), which the
  coarse trainer checks.
"""
from __future__ import annotations

import functools
import gzip
import os
import shutil
import socket
import tempfile
import zlib

import numpy as np
import torch
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_stseg.adapters.config import STS_KEY, StSConfig
from nnunet_stseg.core.depth import DEPTH_KEY, append_depth_channel, depths_from_properties
from nnunet_stseg.core.geometry import resample_image, slab_ranges

ERROR_KEY = "nnunet_stseg_error"
PARTIAL_DIR = ".nnunet_stseg_partial"
FAILED_CASES_FILE = "nnunet_stseg_failed_cases.json"
OBJECTS_SUFFIX = ".objects.json"  # <case>.objects.json: what the cascade found in that case
COARSE_RESAMPLING_KEY = "nnunet_stseg_coarse_resampling"  # a coarse case's properties: how it reached its grid


def antialiased_resampling(data, new_shape, current_spacing=None, new_spacing=None):
    """nnU-Net's ``resampling_fn_data`` signature around :func:`~nnunet_stseg.core.geometry.resample_image`
    (antialiased linear; a 2D configuration's slices one by one): the coarse grid of configurations
    planned with ``sts.coarse_resampling = antialiased``. The spacings are not needed: nnU-Net made
    ``new_shape`` from them. numpy (C, *spatial) in, numpy out, float32."""
    return resample_image(data, new_shape)


def coarse_resampling_of(configuration: dict) -> str | None:
    """``sts.coarse_resampling`` of a coarse configuration (:class:`StSConfig`'s default, ``nnunet``,
    when the block predates the key), None for any other configuration."""
    block = configuration.get(STS_KEY) or {}
    return block.get("coarse_resampling", StSConfig.coarse_resampling) if block.get("role") == "coarse" else None


class CaseError(ValueError):
    """One input case cannot be predicted; the message is one line naming its files."""


def one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = f"{type(error).__name__}: {text}" if not isinstance(error, CaseError) else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_file_complete(path: str) -> None:
    """Raise :class:`CaseError` if a gzip file is truncated or corrupt, or a NIfTI file holds fewer
    bytes than its header announces. ITK's NIfTI reader does not notice either: it returns the
    missing voxels as zeros. Costs one extra decompression of the file."""
    lower = str(path).lower()
    if not lower.endswith((".gz", ".nii")):
        return
    opener = gzip.open if lower.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            size = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 24), b""))
    except (EOFError, OSError, zlib.error) as e:
        raise CaseError(f"truncated or corrupt file ({one_line(e)})") from e
    if lower.endswith((".nii", ".nii.gz")):
        import nibabel

        try:
            header = nibabel.load(path).header
            expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * \
                header.get_data_dtype().itemsize
        except Exception:  # header unreadable: the image reader says why
            return
        if size < expected:
            raise CaseError(f"truncated file: {size} bytes of image data, the NIfTI header announces {expected}")


COLOUR_CHANNELS = {1: "a greyscale image", 2: "a greyscale image with alpha", 3: "an RGB image", 4: "an RGBA image"}


def channel_count_message(found: int, expected: int, reader: str) -> str:
    """Why a case has the wrong number of channels, in the words of the reader that read it
    (``reader``: the name of the plans' ``image_reader_writer``): a natural-image reader (PNG, JPEG,
    BMP) takes a colour image's channels from its one file; the volume readers take one channel
    per file (``_0000``, ``_0001``, ...).

    >>> channel_count_message(1, 3, "NaturalImage2DIO")
    'has 1 channel (a greyscale image), the model expects 3 (an RGB image; a PNG/JPEG/BMP carries ...)'
    >>> channel_count_message(2, 1, "SimpleITKIO")
    'has 2 channels (files _0000 to _0001), the model expects 1 (file _0000)'
    """
    def files(n: int) -> str:
        return "file _0000" if n == 1 else f"files _0000 to _{n - 1:04d}"

    def colours(n: int) -> str:
        return COLOUR_CHANNELS.get(n, f"{n} channels")

    plural = "s" if found != 1 else ""
    if reader == "NaturalImage2DIO":
        return (f"has {found} channel{plural} ({colours(found)}), the model expects {expected} ({colours(expected)}; "
                f"a PNG/JPEG/BMP carries its colour channels in one file)")
    return f"has {found} channel{plural} ({files(found)}), the model expects {expected} ({files(expected)})"


def report_case_error(message: str) -> None:
    """The one line a skipped case gets, printed by the main process (in order with its output)."""
    print(f"[nnunet-stseg] ERROR {message} (case skipped, the rest of the batch goes on)", flush=True)


class CheckedPreprocessor(DefaultPreprocessor):
    """nnU-Net's default preprocessing with input checks and the optional depth channel.

    ``on_error``: ``"raise"`` raises :class:`CaseError`; ``"mark"`` returns a marker case (properties
    hold ``ERROR_KEY``) that the predictor reports and skips. The worker does not print: its line
    could land in the middle of the main process's progress bar (same terminal or log file)."""

    def __init__(self, verbose: bool = True, on_error: str = "raise", depth_channel: bool = False,
                 properties_sink: list | None = None):
        super().__init__(verbose=verbose)
        self.on_error = on_error
        self.depth_channel = depth_channel
        self.properties_sink = properties_sink  # in-process paths: where each case's properties go

    def run_case(self, image_files, seg_file, plans_manager, configuration_manager, dataset_json):
        try:
            for f in image_files:
                check_file_complete(f)
            return super().run_case(image_files, seg_file, plans_manager, configuration_manager, dataset_json)
        except Exception as e:  # any failure of this one case: unreadable, truncated, failed checks
            message = f"{', '.join(os.fspath(f) for f in image_files)}: {one_line(e)}"
            if self.on_error == "raise":
                raise CaseError(message) from e
            n = len(configuration_manager.normalization_schemes) + int(self.depth_channel)
            return np.zeros((n, 1, 1, 1), np.float32), None, {ERROR_KEY: message}

    def run_case_npy(self, data, seg, properties, plans_manager, configuration_manager, dataset_json):
        # nnU-Net's readers give a 2D image a dummy first spacing of 999 x its largest in-plane spacing;
        # a 2D dataset's cases have 1 slice
        spacing = [float(v) for v in properties.get("spacing", [1.0])]
        input_is_2d = len(spacing) == 3 and spacing[0] >= 998 * max(spacing[1:])
        model_is_2d = float(plans_manager.plans.get("original_median_shape_after_transp", [2])[0]) <= 1
        if input_is_2d and not model_is_2d:
            raise CaseError("is a 2D image; this model was trained on 3D volumes (a one-slice volume must be "
                            "stored as 3D)")
        if model_is_2d and not input_is_2d:
            raise CaseError(f"is a 3D volume ({data.shape[1]} slice(s)); this model was trained on 2D images")
        expected = len(configuration_manager.normalization_schemes)
        if data.shape[0] != expected:
            raise CaseError(channel_count_message(data.shape[0], expected,
                                                  str(plans_manager.plans.get("image_reader_writer", ""))))
        finite = np.isfinite(data)
        if not finite.all():
            raise CaseError(f"contains {int(finite.size - finite.sum())} NaN/Inf voxel(s); fix or mask them first")
        del finite
        resampling = coarse_resampling_of(configuration_manager.configuration)
        if resampling is not None and not isinstance(configuration_manager, PluginConfigurationManager):
            # nnU-Net's own preprocessing run (training data): the same resampling as at prediction
            configuration_manager = PluginConfigurationManager(configuration_manager.configuration)
        data, seg, properties = super().run_case_npy(data, seg, properties, plans_manager, configuration_manager,
                                                     dataset_json)
        if resampling is not None:
            properties[COARSE_RESAMPLING_KEY] = resampling
        if self.depth_channel:
            if int(properties["shape_before_cropping"][0]) == 1:
                print("[nnunet-stseg] WARNING: this scan has a single slice; its depth channel is 0.5 (the middle)",
                      flush=True)
            depths = depths_from_properties(data.shape[1], properties, slice_axis=plans_manager.transpose_forward[0])
            data = append_depth_channel(data, depths)
        if self.properties_sink is not None:
            self.properties_sink.append(properties)
        return data, seg, properties


class PluginConfigurationManager(ConfigurationManager):
    """The same configuration; its preprocessor is :class:`CheckedPreprocessor`. ``properties_sink``
    (a list, set only while the predictor preprocesses in its own process) receives each case's
    properties, for the objects report (the worker path hands them over with the case instead)."""

    on_error = "mark"
    properties_sink: list | None = None

    @property
    def preprocessor_class(self):
        depth = bool(self.configuration.get(DEPTH_KEY, False))
        if self.preprocessor_name != "DefaultPreprocessor":
            if depth:
                raise ValueError(f"the depth channel is added on top of nnU-Net's DefaultPreprocessor; this "
                                 f"configuration uses {self.preprocessor_name!r}")
            return super().preprocessor_class
        return functools.partial(CheckedPreprocessor, on_error=self.on_error, depth_channel=depth,
                                 properties_sink=self.properties_sink)

    @property
    def resampling_fn_data(self):
        if coarse_resampling_of(self.configuration) == "antialiased":
            return antialiased_resampling
        return super().resampling_fn_data

    @property
    def resampling_fn_probabilities(self):
        """nnU-Net's, except for a label map handed over in place of logits (:func:`is_label_map`),
        which the predictor makes only when the export does not resample: passed on as it is."""
        resample = super().resampling_fn_probabilities

        def resample_or_pass(data, new_shape, *args, **kwargs):
            if not is_label_map(data):
                return resample(data, new_shape, *args, **kwargs)
            if tuple(data.shape[1:]) != tuple(int(s) for s in new_shape):
                raise RuntimeError(f"a label map of shape {tuple(data.shape[1:])} cannot be resampled to "
                                   f"{tuple(new_shape)}; predict with --save_probabilities")
            return data
        return resample_or_pass


class AtomicReaderWriter(BaseReaderWriter):
    """The plans' reader/writer (by name); ``write_seg`` writes into a private staging folder
    inside a hidden sub-folder of the output folder (same file system, the final file name), then
    moves everything the writer made there into the output folder with ``os.replace``: side files
    first (nnU-Net's TIFF writer puts the spacing into ``<stem>.json`` beside the image), the
    segmentation itself last, so a segmentation that exists always has its side files."""

    def __init__(self, inner_name: str):
        self.inner = recursive_find_reader_writer_by_name(inner_name)()

    def read_images(self, image_fnames):
        return self.inner.read_images(image_fnames)

    def read_seg(self, seg_fname):
        return self.inner.read_seg(seg_fname)

    def write_seg(self, seg, output_fname: str, properties: dict) -> None:
        folder, name = os.path.split(os.path.abspath(output_fname))
        partial_dir = os.path.join(folder, PARTIAL_DIR)
        os.makedirs(partial_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f"{_writer_tag()}{os.getpid()}_", dir=partial_dir)
        try:
            self.inner.write_seg(seg, os.path.join(staging, name), properties)
            made = sorted(os.listdir(staging), key=lambda f: f == name)  # the segmentation last
            if name not in made:
                raise RuntimeError(f"{type(self.inner).__name__}.write_seg did not write {name}")
            for f in made:
                os.replace(os.path.join(staging, f), os.path.join(folder, f))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # The folder stays: other export workers may be between makedirs and their own write.
        # The predictor removes it (when empty) once every export has finished.


def _writer_tag() -> str:
    """Prefix of a temporary name before the writer's process id: the host, so that a later run
    only ever judges the liveness of writers on its own machine (output folders can be shared)."""
    return f"{socket.gethostname().replace('_', '-')}_"


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def remove_partial_folder(output_folder: str) -> None:
    """Remove the hidden temporary-write folder of ``output_folder``, with the temporaries of
    writers on this host whose process no longer exists (a run killed mid-write; such a file is
    never a result, the case is redone by ``--continue_prediction``). Temporaries of live writers,
    e.g. another ``-part`` writing into the same folder, or of other hosts are left, and so is
    the folder then."""
    partial_dir = os.path.join(output_folder, PARTIAL_DIR)
    tag = _writer_tag()
    try:
        names = os.listdir(partial_dir)
    except OSError:
        return
    for name in names:
        pid = name[len(tag):].split("_", 1)[0] if name.startswith(tag) else ""
        if pid.isdigit() and _process_is_gone(int(pid)):
            path = os.path.join(partial_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
    try:
        os.rmdir(partial_dir)
    except OSError:
        pass


SLAB_VOXELS = 1 << 22
"""Voxels per slab (all channels together) of :class:`SlabwiseLabelManager`: 4 M voxels, 16 MiB
as float32; large enough that the per-slab overhead is nothing next to the work."""


def _first_max_labels(logits, fallback):
    """The index of the first largest of K logits (K, ...) per voxel, as ``argmax(0)`` gives it, as
    a uint8 tensor, from strict comparisons in torch: on half-precision logits on the CPU about 1/100
    of torch's ``argmax`` and 1/10 of numpy's comparisons (numpy emulates half arithmetic; 2 x 1024^2
    logits: 0.5 ms against 6 ms here). A slab holding NaN goes to ``fallback`` (argmax counts NaN as
    the largest, comparisons never do; ``torch.maximum`` carries a NaN into the running maximum)."""
    x = torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits
    if x.shape[0] > 255:
        return fallback(logits)
    if x.shape[0] == 1:
        return torch.zeros(x.shape[1:], dtype=torch.uint8)
    labels = torch.gt(x[1], x[0]).to(torch.uint8)
    best = torch.maximum(x[0], x[1])
    for k in range(2, x.shape[0]):
        labels.masked_fill_(torch.gt(x[k], best), k)
        best = torch.maximum(best, x[k])
    return fallback(logits) if torch.isnan(best).any() else labels


def is_label_map(array) -> bool:
    """Whether a case's "logits" are a label map (1, *shape) of integers: what the cascade hands
    nnU-Net's export when only the segmentation is exported (no full-size probabilities; logits are
    always floating point)."""
    dtype = getattr(array, "dtype", None)
    integer = (dtype in (torch.uint8, torch.int16, torch.int32, torch.int64) if isinstance(array, torch.Tensor)
               else dtype is not None and np.issubdtype(dtype, np.integer))
    return integer and array.ndim >= 2 and array.shape[0] == 1


class SlabwiseLabelManager(LabelManager):
    """nnU-Net's ``LabelManager`` whose conversions work a slab of slices at a time.

    nnU-Net's export turns the whole (K, *volume) logits into float32 (softmax, regions) and takes
    an int64 argmax of the whole volume before it copies the result into a uint8 array: at
    1000 x 512 x 512 that is 2 GiB of int64 on top of the logits. Here each slab goes through the
    parent's own conversion and lands in the dtype nnU-Net's export stores anyway (uint8 below 255
    labels, else uint16), so the label map is the same (ties included: it is nnU-Net's code on each
    slab) and the extra memory is one slab. With ``--save_probabilities`` the float32 probabilities
    are written slab by slab into the one array the export keeps, and an uncropped case keeps that
    array instead of a copy of it.

    >>> lm = SlabwiseLabelManager({"background": 0, "a": 1, "b": 2}, None)
    >>> logits = torch.tensor([[[0., 5.]], [[1., 0.]], [[0., 1.]]]).half()  # (K=3, 1, 2)
    >>> lm.convert_logits_to_segmentation(logits)
    tensor([[1, 0]], dtype=torch.uint8)
    """

    def _segmentation_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if len(self.foreground_labels) < 255 else np.uint16)

    def _slabwise(self, array, convert, channels_out: bool, dtype):
        """``convert`` applied to every slab of ``array`` (K, X, ...) along X, written into one output."""
        is_numpy = isinstance(array, np.ndarray)
        tensor = torch.from_numpy(array) if is_numpy else array
        shape = tuple(tensor.shape[1:])
        if len(shape) == 0:
            return convert(array)
        if channels_out:
            out = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
        else:  # labels: numpy on the host (uint16 has no torch counterpart in every torch)
            out = np.empty(shape, dtype=dtype)
        with torch.no_grad():
            for a, b in slab_ranges(shape[0], tensor.shape[0] * int(np.prod(shape[1:])), SLAB_VOXELS):
                part = convert(array[:, a:b] if is_numpy else tensor[:, a:b])
                if isinstance(part, torch.Tensor) and not channels_out:
                    part = part.cpu().numpy()
                if channels_out:
                    out[:, a:b] = part
                else:
                    out[a:b] = part
        if channels_out:
            return out.numpy() if is_numpy else out
        return out if is_numpy or out.dtype == np.uint16 else torch.from_numpy(out).to(tensor.device)

    def apply_inference_nonlin(self, logits):
        if is_label_map(logits):
            raise RuntimeError("this prediction was made as a label map only; predict with --save_probabilities "
                               "for probabilities")
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        return self._slabwise(logits, super().apply_inference_nonlin, True, torch.float32)

    def revert_cropping_on_probabilities(self, predicted_probabilities, bbox, original_shape):
        """nnU-Net's, without its copy when the case was not cropped (the bounding box is the whole
        image): the probabilities are then the uncropped array already, the values nnU-Net's copy
        would hold, and that second K x volume float32 array was the largest of the export."""
        full = tuple(int(n) for n in original_shape)
        if tuple(predicted_probabilities.shape[1:]) == full and all(
                int(lo) == 0 and int(hi) == n for (lo, hi), n in zip(bbox, full)):
            return predicted_probabilities
        return super().revert_cropping_on_probabilities(predicted_probabilities, bbox, original_shape)

    def convert_probabilities_to_segmentation(self, predicted_probabilities):
        if not isinstance(predicted_probabilities, (np.ndarray, torch.Tensor)) or predicted_probabilities.ndim < 2:
            return super().convert_probabilities_to_segmentation(predicted_probabilities)
        return self._slabwise(predicted_probabilities, super().convert_probabilities_to_segmentation, False,
                              self._segmentation_dtype())

    def convert_logits_to_segmentation(self, predicted_logits):
        if not isinstance(predicted_logits, (np.ndarray, torch.Tensor)) or predicted_logits.ndim < 2:
            return super().convert_logits_to_segmentation(predicted_logits)
        if is_label_map(predicted_logits):  # the cascade's label map: already the segmentation
            labels = predicted_logits[0]
            dtype = self._segmentation_dtype()
            if isinstance(labels, torch.Tensor):
                return labels if labels.dtype == torch.uint8 and dtype == np.uint8 else labels.cpu().numpy().astype(dtype)
            return labels.astype(dtype, copy=False)
        convert = super().convert_logits_to_segmentation
        if not self.has_regions and (isinstance(predicted_logits, np.ndarray) or predicted_logits.device.type == "cpu"):
            convert = functools.partial(_first_max_labels, fallback=convert)
        return self._slabwise(predicted_logits, convert, False, self._segmentation_dtype())


class PluginPlansManager(PlansManager):
    """The same plans; segmentations are written atomically (:class:`AtomicReaderWriter`) and made
    slab by slab (:class:`SlabwiseLabelManager`, when the plans use nnU-Net's own ``LabelManager``)."""

    @property
    def image_reader_writer_class(self):
        return functools.partial(AtomicReaderWriter, self.plans["image_reader_writer"])

    @property
    def label_manager_class(self):
        base = super().label_manager_class
        return SlabwiseLabelManager if base is LabelManager else base


__all__ = ["ERROR_KEY", "COARSE_RESAMPLING_KEY", "antialiased_resampling", "coarse_resampling_of", "report_case_error",
           "PARTIAL_DIR", "FAILED_CASES_FILE", "OBJECTS_SUFFIX", "CaseError", "CheckedPreprocessor",
           "PluginConfigurationManager", "AtomicReaderWriter", "remove_partial_folder", "PluginPlansManager",
           "one_line", "SlabwiseLabelManager", "SLAB_VOXELS", "is_label_map"]
