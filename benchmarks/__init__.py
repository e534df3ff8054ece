"""The project's benchmarks: one script per benchmark (listed in docs/usage.md, "The benchmark
scripts"), the harness they share (``results_io``: common flags, the machine, the results JSON),
``plan_configs/`` and ``results/`` (the current JSON of each benchmark per machine class).

Every script is a module of this package, run from the repository root:
``python -m benchmarks.<name> --help``.
"""
