"""nnU-Net adapters: the plans' ``sts`` block and plan options, results folders, trainer discovery,
and the predictors that nnU-Net's own commands run for our models.

May import :mod:`nnunet_stseg.core`, :mod:`nnunet_stseg.settings`, :mod:`nnunet_stseg.atomic` and
nnU-Net; never the commands or the data converters."""
