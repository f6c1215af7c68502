"""Experiments and benchmarks: the commands that made the reports in ``docs/benchmarks/``.

Not installed: run them from a checkout's root, e.g. ``.venv/bin/python -m benchmarks.experiment_kvasir --help``.
They find the real datasets through ``--data DIR`` or ``STSEG_DATA`` (default ``../shared/data``
next to the checkout; :func:`benchmarks.runner.shared_data`). Nothing under ``nnunet_stseg/``
imports this folder."""
