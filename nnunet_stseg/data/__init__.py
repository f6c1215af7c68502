"""Datasets: the generated ellipse dataset and converters of public data into nnU-Net's raw format.

May import :mod:`nnunet_stseg.core` and :mod:`nnunet_stseg.atomic`; not the adapters or commands."""
