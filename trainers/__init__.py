"""nnU-Net trainers of nnunet-stseg (installed as ``nnunet_stseg.trainers``).

Kept import-free so that locating the discovery folder does not import nnU-Net; the classes
live in :mod:`nnunet_stseg.trainers.sts_trainers`, :mod:`~nnunet_stseg.trainers.polar_trainer` and
:mod:`~nnunet_stseg.trainers.centre_trainer`."""
