"""The passes every predictor of ours makes over a case's networks, in one place: the folds'
weights, the test-time mirroring axes and autocast on CUDA (docs/design.md, "Prediction through
the stock nnUNetv2_predict").

The fine crops (cascade, polar stage) mirror each batch of crops with nnU-Net's
``_internal_maybe_mirror_and_predict`` (network logits averaged); the end-to-end models mirror the
whole case (their boxes depend on the image) with :func:`mirror_axis_sets`. Both iterate the folds
with :func:`fold_weights`. Where the full-resolution arrays live (``work_device``) and the
out-of-memory retry on the CPU are :class:`~nnunet_stseg.adapters.predictor.PluginPredictor`'s.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

WEIGHTS_KEY = "_stseg_weights"  # (network, state dict) loaded last with one fold, on the predictor


def unwrapped(net: nn.Module) -> nn.Module:
    """The module itself of a network that may be ``torch.compile``'d (its weights load there)."""
    return net._orig_mod if hasattr(net, "_orig_mod") else net


def fold_weights(model: nnUNetPredictor, net: nn.Module | None = None) -> Iterator[dict | None]:
    """Load each fold's weights (``model.list_of_parameters``) into ``net`` (default
    ``model.network``) in turn and yield them. With one fold they are loaded once for this network
    object, not per batch or per case (the polar stage forwards batch by batch); without any (a
    network given directly) it yields once, with the weights the network has."""
    net = model.network if net is None else net
    params = list(getattr(model, "list_of_parameters", None) or []) or [None]
    for p in params:
        loaded = model.__dict__.get(WEIGHTS_KEY)
        if p is not None and not (loaded is not None and loaded[0] is net and loaded[1] is p):
            unwrapped(net).load_state_dict(p)
            model.__dict__[WEIGHTS_KEY] = (net, p) if len(params) == 1 else None
        yield p


def n_folds(model: nnUNetPredictor) -> int:
    """How many weight sets :func:`fold_weights` goes through."""
    return max(1, len(getattr(model, "list_of_parameters", None) or []))


def mirror_axes(model: nnUNetPredictor) -> tuple[int, ...]:
    """The mirroring axes of the test-time augmentation (of a patch, as nnU-Net's trainer allows
    them), or none when ``use_mirroring`` is off."""
    axes = model.allowed_mirroring_axes if model.use_mirroring and model.allowed_mirroring_axes else ()
    return tuple(int(a) for a in axes)


def mirror_axis_sets(model: nnUNetPredictor, offset: int) -> list[tuple[int, ...]]:
    """Every subset of :func:`mirror_axes` (the empty one first: no flip), as axes of an array whose
    patch axes start at ``offset`` (2 for a (C, Z, Y, X) case predicted by a 2D configuration)."""
    dims = [a + offset for a in mirror_axes(model)]
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast on CUDA (as nnU-Net's sliding window), nothing elsewhere."""
    return torch.autocast(device.type) if device.type == "cuda" else contextlib.nullcontext()


def network_on(model: nnUNetPredictor, key: str = "_stseg_net_on") -> nn.Module:
    """``model.network`` on ``model.device`` in eval mode; ``.to()`` walks every module, so only
    when the network or the device changed since the last call."""
    net = model.network
    ready = model.__dict__.get(key)
    if ready is None or ready[0] is not net or ready[1] != model.device:
        net = model.network = net.to(model.device)
        net.eval()
        model.__dict__[key] = (net, model.device)
    return net


__all__ = ["WEIGHTS_KEY", "autocast", "fold_weights", "mirror_axes", "mirror_axis_sets", "n_folds", "network_on",
           "unwrapped"]
