"""Run the mutation test's cases on one emulator library; print a JSON verdict as the last line.

    python -m emu_mutant_run LIB.so   ->   {"caught": bool, "how": str}

Run in a subprocess by tests/test_cuda_emu_mutants.py so a mutant that
crashes or hangs cannot take the test session with it.
"""

import json
import sys

import torch

from emu_util import check_against_float64, random_activations, random_layer
from gsq_vllm import cuda_emu as ce

# (bits, dtype, G, M, N, K, sms, order): 2 and 3 bit, both dtypes, partial 16/32/64-row blocks,
# K = 9 k tiles split 5 ways (uneven: 2,2,2,2,1) and unsplit, every schedule order
CASES = [
    (3, torch.float16, 64, 17, 128, 576, 5, "forward"),
    (2, torch.bfloat16, 64, 1, 128, 576, 5, "reverse"),
    (3, torch.bfloat16, 128, 33, 192, 1024, 1, "random"),
    (2, torch.float16, 128, 3, 64, 384, 132, "forward"),
    (3, torch.float16, 64, 65, 64, 576, 3, "reverse"),
]


def verdict(lib: str) -> dict:
    emu = ce.Emulator(lib)
    for i, (bits, dtype, g, m, n, k, sms, order) in enumerate(CASES):
        label = f"case {i} ({bits}-bit {dtype} G={g} M={m} N={n} K={k} sms={sms} {order})"
        w_t, b_r, s_r = random_layer(n, k, bits, g, dtype, seed=i)
        a = random_activations(m, k, dtype, seed=i)
        try:
            c, _ = emu.gemm(a, b_r, s_r, bits, g, n, k, ce.EmuOptions(sms=sms, order=order, seed=i))
            check_against_float64(c, a, w_t, emu.plan(m, n, k, sms)["splits"])
        except (ce.EmulatorError, AssertionError) as e:
            return {"caught": True, "how": f"{label}: {str(e)[:300]}"}
    return {"caught": False, "how": "every case passed"}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(verdict(sys.argv[1])))
