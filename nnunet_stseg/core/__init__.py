"""The method core: the cascade of one case, boxes, crops, resampling, fusion, polar maps, depth,
centre heatmaps, metrics.

Pure functions on numpy arrays and torch tensors (any device). Nothing here imports nnU-Net, the
adapters or the commands; a new method adds its geometry here and its nnU-Net side in
:mod:`nnunet_stseg.adapters`, ``trainers/`` and ``planners/``."""
