"""Run decode cases on an emulator library whose kernel logs its work split (built by
tests/test_kernel_static.py from an instrumented copy of csrc/); the log goes to stderr.

    python decode_split_probe.py LIB.so   ->   stdout: one JSON line per case (its plan and kernel)
"""

import json
import sys

import torch

from emu_util import random_activations, random_layer
from gsq_vllm import cuda_emu as ce

# (bits, dtype, G, M, N, K, sms): uneven ranges (fractional warp boundaries), ranges across row blocks,
# both token tilings, K chunks 64 and 128, and one plan without a split row block
CASES = [
    (3, torch.float16, 64, 5, 192, 576, 1),
    (2, torch.bfloat16, 128, 12, 192, 1024, 2),
    (2, torch.float16, 32, 1, 320, 512, 3),
    (3, torch.float16, 128, 16, 128, 1536, 5),
    (2, torch.bfloat16, 64, 8, 256, 128, 132),
]


def main(lib: str) -> None:
    emu = ce.Emulator(lib)
    for i, (bits, dtype, g, m, n, k, sms) in enumerate(CASES):
        _, b, s = random_layer(n, k, bits, g, dtype, seed=i)
        a = random_activations(m, k, dtype, seed=i)
        print(f"GSQ_CASE {i}", file=sys.stderr, flush=True)
        _, counters = emu.gemm(a, b, s, bits, g, n, k, ce.EmuOptions(sms=sms, order="reverse", seed=i))
        (launch,) = counters["launches"]
        print(json.dumps(dict(case=i, n=n, k=k, kernel=launch["kernel"],
                              plan=emu.plan(m, n, k, bits, g, sms))), flush=True)
        print(f"GSQ_END {i}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
