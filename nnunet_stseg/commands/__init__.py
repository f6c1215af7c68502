"""Commands: the ``nnunet-stseg`` command line, the demo, benchmarks and experiments, and the
runner they share (:mod:`nnunet_stseg.commands.runner`) that drives the stock nnU-Net commands.

The top layer: may import every other part of the package; nothing imports it."""
