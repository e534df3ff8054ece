"""Test-session defaults.

GSQ_CPU_TL=off unless the caller sets it: the table-lookup decode kernels (csrc/cpu/tl_kernel.h)
round the activations' partial sums to int8, and the tests written for the exact fused kernels
(1e-5 tolerances at M <= 4, here and in the served-model tests' subprocesses, which inherit the
environment) check those kernels. tests/test_cpu_tl.py switches the table-lookup kernels on
itself (set_tl) and checks them against their stated rounding and bound."""

import os

os.environ.setdefault("GSQ_CPU_TL", "off")
