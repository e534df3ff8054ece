"""Session setting for every test: the fused CPU kernels alone (``GSQ_CPU_TL=off``) unless the
environment says otherwise. The served default also runs the table-lookup decode kernels at 1-16
rows of x, which round x's partial sums (csrc/cpu/tl_kernel.h); most tests compare the CPU path
with a float reference at bf16 precision, so they pin the exact kernels, and the tables are tested
on their own, against their stated rounding and bound (tests/test_cpu_tl.py, which switches them on
per test; test_gsq_cpu_tl_environment_variable checks the default with the variable unset). Set
here, before any test imports gsq_vllm._C_cpu (it reads the variable once, when it loads), and
inherited by the servers tests start."""

import os

os.environ.setdefault("GSQ_CPU_TL", "off")
