"""Every trick by which the plugin hooks into nnU-Net's internals, in one place: frame inspection,
class swaps, interception of nnU-Net's attribute assignments, the excepthook. Nothing else in the
package reads frames or assigns ``__class__`` or ``sys.excepthook`` (``tests/test_layout.py``
checks it). Each hook was checked against nnunetv2 2.8.1, and we pin ``nnunetv2>=2.8.1,<2.9``;
:func:`nnunet_stseg.adapters.compat.check_nnunet` (run when this module or the predictors are
imported) checks the signatures the hooks read, so a changed nnU-Net is one clear error at import.

1. **Frame of the loading predictor** (:func:`loading_frame`, :func:`loading_predictor`).
   ``nnUNetv2_predict`` always builds a plain ``nnUNetPredictor``; its
   ``initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)``
   looks the trainer class up (``recursive_find_trainer_class_by_name``) and calls the trainer's
   static ``build_network_architecture`` from its own frame, before it assigns the managers and the
   network. Relies on: that method name, its local ``self`` being the predictor, and its locals
   ``model_training_output_dir``, ``use_folds`` (already resolved when None),
   ``checkpoint_name``.
2. **Class swap on adoption** (:func:`adopt_predictor`, :func:`adopt_predictor_from_caller`,
   :func:`adopted_class`). From our trainers' ``build_network_architecture`` the predictor found
   by (1) gets our predictor class (on top of a user's ``nnUNetPredictor`` subclass), its own
   class remembered under :data:`_ORIGINAL_CLASS`. Relies on: nnU-Net keeping no reference to
   the class and calling every later method on the instance (``predict_from_files``, the
   sequential path, ``predict_single_npy_array``), which it does in 2.8.x.
3. **Class restored on the next load** (:func:`restore_original_class`, called by
   ``PluginPredictor.initialize_from_trained_model_folder``): loading another model with the same
   predictor starts from the user's own class and drops our state (:data:`_PLUGIN_STATE`).
   Relies on: nnU-Net's ``initialize_from_trained_model_folder`` re-assigning everything it
   needs (managers, network, parameters, labels).
4. **Manager interception** (:class:`ManagedManagers`, a mixin of ``PluginPredictor``): the
   ``plans_manager`` / ``configuration_manager`` attributes are properties whose setters wrap
   whatever nnU-Net assigns into ``PluginPlansManager`` / ``PluginConfigurationManager``
   (:mod:`nnunet_stseg.adapters.inference_io`). Relies on: nnU-Net assigning both as plain
   attributes (``__init__`` sets them to None before adoption; ``initialize_from_trained_model_folder``
   and ``manual_initialization`` assign them after ``build_network_architecture``), and every
   inference path building its preprocessor, reader/writer, label manager and resampling from
   these managers, also in the spawned workers (they pickle by module path). A value assigned
   before adoption sits in the instance ``__dict__`` and is wrapped on first access.
5. **Excepthook** (:func:`install_excepthook`): uncaught errors of the given types (our
   ``MissingModelError``, ``BatchIncomplete``) in a stock command such as ``nnUNetv2_predict``
   print one ``[nnunet-stseg] ERROR`` line instead of a traceback; every other error goes to the
   previous hook. Relies on: nnU-Net's entry points not catching these errors (they do not) and
   not installing their own excepthook. Installed once per process (the hook is marked).
6. **The pretrained-weights argument** (:func:`pretrained_weights_argument`,
   :func:`load_segmentation_layers`): ``nnUNetv2_train -pretrained_weights FILE`` loads every
   weight but the segmentation layers (keys with ``.seg_layers.``: nnU-Net's fine-tuning assumes
   another label set) and keeps no record of FILE on the trainer. A trainer that continues a model
   on the same labels (the size trainer's phase 2) reads FILE from the command line as nnU-Net's
   parser does and loads those layers too, where their shapes match. Relies on: the flag's name
   and nnU-Net loading FILE before ``on_train_start`` (``maybe_load_checkpoint``).
7. **Pools of one process** (:func:`pools_in_this_process`): nnU-Net starts a 'spawn' pool even
   when it is asked for one worker process (fingerprint extraction, preprocessing, the final
   validation's export and its metrics), and each spawned worker imports torch and nnU-Net again
   (5-7 s on 2 cores: the worker of a training imports the whole of ``nnUNetv2_train``). Inside
   the block, with one process asked for, the pool nnU-Net starts is one thread of this process:
   the same calls on the same data, without the import. Relies on: nnU-Net calling
   ``multiprocessing.get_context("spawn").Pool(n)`` through the module attribute at the time of
   the call, and using only what a ``ThreadPool`` also has (``starmap``, ``starmap_async``, its
   ``_pool`` of workers with ``is_alive``).

Not here, because they are ordinary subclassing or configuration through nnU-Net's public
extension points rather than tricks: our overrides of nnU-Net methods (also the private
``_internal_maybe_mirror_and_predict`` and ``_manage_input_and_output_lists``, whose signatures
:mod:`nnunet_stseg.adapters.compat` checks), the manager and preprocessor subclasses of
:mod:`nnunet_stseg.adapters.inference_io`, trainer discovery through ``nnUNet_extTrainer``
(:mod:`nnunet_stseg.adapters.discovery`), the trainers' dataset and loader subclasses.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.pool
import sys

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_stseg.adapters.compat import check_nnunet
from nnunet_stseg.adapters.inference_io import PluginConfigurationManager, PluginPlansManager
from nnunet_stseg.core.depth import DEPTH_KEY

check_nnunet()  # what the hooks below read is checked before any of them runs

# ----------------------------------------------------------------------------------------------
# 5. excepthook
# ----------------------------------------------------------------------------------------------


def _message_without_traceback(previous_hook, one_line_errors: tuple[type, ...]):
    def hook(exc_type, exc, tb):
        if isinstance(exc, one_line_errors):
            print(f"[nnunet-stseg] ERROR: {exc}", file=sys.stderr, flush=True)
        else:
            previous_hook(exc_type, exc, tb)
    hook.nnunet_stseg = True
    return hook


def install_excepthook(*one_line_errors: type) -> None:
    """Uncaught ``one_line_errors`` in a command (``nnUNetv2_predict``...) print one line, no
    traceback; once per process."""
    if not getattr(sys.excepthook, "nnunet_stseg", False):
        sys.excepthook = _message_without_traceback(sys.excepthook, tuple(one_line_errors))


# ----------------------------------------------------------------------------------------------
# 1. frame of the loading predictor
# ----------------------------------------------------------------------------------------------


def loading_frame(caller_frame):
    """The frame of nnU-Net's ``initialize_from_trained_model_folder`` up the stack from
    ``caller_frame`` (an nnU-Net predictor loading a model), or None."""
    frame = caller_frame
    while frame is not None and frame.f_code.co_name != "initialize_from_trained_model_folder":
        frame = frame.f_back
    if frame is None or not isinstance(frame.f_locals.get("self"), nnUNetPredictor):
        return None
    return frame


def loading_predictor():
    """For a trainer's ``build_network_architecture``: the nnU-Net predictor that is loading the
    model and called it (through nnU-Net's ``initialize_from_trained_model_folder``), or None
    (training, or any other caller)."""
    frame = loading_frame(sys._getframe(2))
    return None if frame is None else frame.f_locals["self"]


# ----------------------------------------------------------------------------------------------
# 2. and 3. class swap on adoption, class restored on the next load
# ----------------------------------------------------------------------------------------------

# what our predictors keep on the instance: dropped whenever the predictor loads another model
_PLUGIN_STATE = ("depth_channel", "coarse", "sts", "e2e", "lsnet", "_fallbacks", "applied_overrides", "_sts_source",
                 "centre", "centre_params", "last_objects", "_case_objects", "_current_case", "last_timings",
                 "_case_memo", "_stage_seconds", "_stseg_weights", "_stseg_net_on", "_work_device")
_MANAGERS = ("_configuration_manager", "_plans_manager")  # wrapped by PluginPredictor
_ORIGINAL_CLASS = "_stseg_original_class"


def _is_ours(cls: type) -> bool:
    """One of our predictor classes (replaced, never combined, when another model is loaded)."""
    return cls.__module__.startswith("nnunet_stseg.")


@functools.cache
def _on_top_of(target: type, user_class: type) -> type:
    """``target`` (ours) on top of a user's ``nnUNetPredictor`` subclass: our overrides come first
    and their ``super()`` calls reach the user's overrides before nnU-Net's."""
    return type(f"{target.__name__}On{user_class.__name__}", (target, user_class), {"__module__": __name__})


def adopted_class(target: type, original: type) -> type:
    """The class a predictor of class ``original`` gets to run a model of ours with ``target``'s
    behaviour: ``target`` itself for nnU-Net's plain predictor (or one of ours), else ``target`` on
    top of the user's subclass, so that its overrides keep working; one clear error when the two
    cannot be combined."""
    if original is nnUNetPredictor or issubclass(target, original) or _is_ours(original):
        return target
    try:
        return _on_top_of(target, original)
    except TypeError as e:
        raise TypeError(f"a model trained with nnunet-stseg needs {target.__name__} behaviour, which cannot be "
                        f"combined with the predictor class {original.__module__}.{original.__qualname__} ({e}); "
                        f"load the model with nnunetv2's nnUNetPredictor or a plain subclass of it") from None


def adopt_predictor(caller_frame, predictor_class: type | None = None, depth: bool = False) -> None:
    """Called from our trainers' ``build_network_architecture``: if nnU-Net's
    ``initialize_from_trained_model_folder`` is the caller, give that predictor the behaviour of
    ``predictor_class`` (default :class:`~nnunet_stseg.adapters.predictor.PluginPredictor`;
    :func:`adopted_class` keeps a user's subclass), start from clean state, and for a subclass of
    :class:`~nnunet_stseg.adapters.predictor.StSPredictor` remember the model folder and folds so
    the coarse model of the same folds is loaded on first use; the depth channel if ``depth``.
    Anything else calling is left alone. Loading another model later
    (:meth:`PluginPredictor.initialize_from_trained_model_folder`) gives the predictor its own
    class back."""
    from nnunet_stseg.adapters.predictor import PluginPredictor, StSPredictor  # they import this module

    frame = loading_frame(caller_frame)
    if frame is None:
        return
    predictor = frame.f_locals.get("self")
    original = predictor.__dict__.get(_ORIGINAL_CLASS) or type(predictor)
    target = predictor_class or PluginPredictor
    predictor.__class__ = adopted_class(target, original)
    for attr in _PLUGIN_STATE:
        predictor.__dict__.pop(attr, None)
    predictor.__dict__[_ORIGINAL_CLASS] = nnUNetPredictor if _is_ours(original) else original
    predictor.depth_channel = bool(depth)
    if issubclass(target, StSPredictor):
        predictor._sts_source = (frame.f_locals.get("model_training_output_dir"), frame.f_locals.get("use_folds"),
                                 frame.f_locals.get("checkpoint_name", "checkpoint_final.pth"))


def adopt_predictor_from_caller(predictor_class: type | None = None, depth: bool = False) -> None:
    """:func:`adopt_predictor` for the caller of the ``build_network_architecture`` that calls
    this (what nnU-Net's loading predictor runs); see there."""
    adopt_predictor(sys._getframe(2), predictor_class, depth=depth)


def restore_original_class(predictor) -> type:
    """Before ``predictor`` loads another model: drop our state and give the instance its own
    class back (nnU-Net's, or the user's subclass); returns that class."""
    original = predictor.__dict__.pop(_ORIGINAL_CLASS, nnUNetPredictor)
    for attr in _PLUGIN_STATE + _MANAGERS:
        predictor.__dict__.pop(attr, None)
    predictor.__class__ = original
    return original


# ----------------------------------------------------------------------------------------------
# 4. manager interception
# ----------------------------------------------------------------------------------------------


class ManagedManagers:
    """Mixin of :class:`~nnunet_stseg.adapters.predictor.PluginPredictor`: what nnU-Net assigns to
    ``configuration_manager`` and ``plans_manager`` is wrapped into ours (item 4 of the module
    docstring); the predictor's ``depth_channel`` decides the configuration's depth key."""

    def _managed(self, name: str):
        """The wrapped plans/configuration manager; one nnU-Net assigned as a plain attribute
        before this predictor was adopted is wrapped now (the assignment order is nnU-Net's)."""
        if self.__dict__.get(f"_{name}") is None and self.__dict__.get(name) is not None:
            setattr(self, name, self.__dict__.pop(name))
        return self.__dict__.get(f"_{name}")

    @property
    def configuration_manager(self):
        return self._managed("configuration_manager")

    @configuration_manager.setter
    def configuration_manager(self, value) -> None:
        if value is not None:
            configuration = dict(value.configuration)
            if self.depth_channel:
                configuration[DEPTH_KEY] = True
            else:
                configuration.pop(DEPTH_KEY, None)
            value = PluginConfigurationManager(configuration)
        self.__dict__["_configuration_manager"] = value

    @property
    def plans_manager(self):
        return self._managed("plans_manager")

    @plans_manager.setter
    def plans_manager(self, value) -> None:
        if value is not None and not isinstance(value, PluginPlansManager):
            value = PluginPlansManager(value.plans)
        self.__dict__["_plans_manager"] = value


# ----------------------------------------------------------------------------------------------
# 6. the pretrained-weights argument of nnUNetv2_train
# ----------------------------------------------------------------------------------------------
def pretrained_weights_argument(argv: list[str] | None = None) -> str | None:
    """FILE of ``-pretrained_weights FILE`` (or ``-pretrained_weights=FILE``) on the command line
    of this process, None without it.

    >>> pretrained_weights_argument(["nnUNetv2_train", "1", "2d", "0", "-pretrained_weights", "a.pth"])
    'a.pth'
    """
    argv = list(sys.argv if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "-pretrained_weights" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("-pretrained_weights="):
            return arg.split("=", 1)[1]
    return None


def load_segmentation_layers(network, checkpoint_file: str) -> list[str]:
    """Load the segmentation layers (``.seg_layers.`` keys) of ``checkpoint_file`` into ``network``
    where name and shape match; returns the keys loaded (none when the label sets differ)."""
    import torch

    from nnunet_stseg.adapters.passes import unwrapped

    state = torch.load(checkpoint_file, map_location="cpu", weights_only=False)["network_weights"]
    module = unwrapped(getattr(network, "module", network))  # DDP, then torch.compile
    own = module.state_dict()
    keys = [k for k in own if ".seg_layers." in k and k in state and tuple(state[k].shape) == tuple(own[k].shape)]
    if keys and len(keys) == sum(".seg_layers." in k for k in own):
        own.update({k: state[k] for k in keys})
        module.load_state_dict(own)
        return keys
    return []


# ----------------------------------------------------------------------------------------------
# 7. pools of one process
# ----------------------------------------------------------------------------------------------
class _ThreadPoolContext:
    """A multiprocessing context whose ``Pool`` is one thread of this process (see
    :func:`pools_in_this_process`); everything else is the real context's."""

    def __init__(self, context):
        self._context = context

    def Pool(self, processes=None, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
        return multiprocessing.pool.ThreadPool(1)

    def __getattr__(self, name):
        return getattr(self._context, name)


@contextlib.contextmanager
def pools_in_this_process(processes: int):
    """While the block runs, and only when ``processes <= 1``, the 'spawn' pools nnU-Net starts are
    one thread of this process instead of one spawned worker (hook 7 of the module docstring);
    with more processes nothing changes.

    >>> import multiprocessing
    >>> with pools_in_this_process(1):
    ...     with multiprocessing.get_context("spawn").Pool(1) as pool:
    ...         pool.starmap(max, [(1, 2), (4, 3)])
    [2, 4]
    """
    if processes > 1:
        yield
        return
    real = multiprocessing.get_context

    def get_context(method=None):
        context = real(method)
        return _ThreadPoolContext(context) if method == "spawn" else context

    multiprocessing.get_context = get_context
    try:
        yield
    finally:
        multiprocessing.get_context = real


__all__ = ["install_excepthook", "loading_frame", "loading_predictor", "adopted_class", "adopt_predictor",
           "adopt_predictor_from_caller", "restore_original_class", "ManagedManagers", "pretrained_weights_argument",
           "load_segmentation_layers", "pools_in_this_process"]
