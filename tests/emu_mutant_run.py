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

# (bits, dtype, G, M, N, K, sms, order[, shared memory per SM])
CASES = [
    # decode, 1 token tile, K chunk 64, 3-bit (spare pairs): 27 items over 10 warps, so warp
    # boundaries fall inside items (owner_of's rounding matters: a warp begins at a row block's
    # last item), a warp's range crossing a row block (two partial segments)
    (3, torch.float16, 64, 5, 192, 576, 10, "forward"),
    # decode, 2 token tiles, K chunk 128: 24 items over 5 warps, every row block split between warps
    (2, torch.bfloat16, 128, 12, 192, 1024, 5, "reverse"),
    # prefill, 8 token tiles (rows 33..63 past M), 8 chunks in 6 uneven splits
    (3, torch.bfloat16, 128, 33, 192, 1024, 8, "random"),
    # prefill, 4 token tiles, two groups per chunk, 3 splits
    (2, torch.float16, 64, 20, 64, 384, 5, "forward"),
    # prefill with 4 chunks per split: the pipeline runs past its prologue
    (2, torch.float16, 128, 40, 64, 1024, 1, "forward"),
    # decode M = 1: one row block, two warps
    (2, torch.float16, 128, 1, 64, 256, 132, "reverse"),
    # decode M = 16, 3-bit, K chunk 128
    (3, torch.float16, 128, 16, 128, 512, 132, "forward"),
    # decode without a split: every warp stores its own row block
    (2, torch.bfloat16, 64, 8, 256, 128, 132, "random"),
    # decode with longer ranges than the ring (refills): 3-bit, 2 token tiles, 5 stages, 8 items a warp;
    # 2-bit, 1 token tile, 9 stages, 16 items a warp
    (3, torch.bfloat16, 64, 12, 64, 2048, 1, "random"),
    (2, torch.float16, 128, 1, 64, 8192, 1, "reverse"),
    # decode where four rings do not fit an SM (sm_86/89's 100 KB): two warps a block, split row blocks
    (2, torch.float16, 64, 1, 320, 640, 3, "reverse", 100 * 1024),
]


def verdict(lib: str) -> dict:
    emu = ce.Emulator(lib)
    for i, (bits, dtype, g, m, n, k, sms, order, *smem) in enumerate(CASES):
        smem = smem[0] if smem else ce.EmuOptions().smem_per_sm
        label = f"case {i} ({bits}-bit {dtype} G={g} M={m} N={n} K={k} sms={sms} {order} smem={smem})"
        w_t, b_r, s_r = random_layer(n, k, bits, g, dtype, seed=i)
        a = random_activations(m, k, dtype, seed=i)
        try:
            c, _ = emu.gemm(a, b_r, s_r, bits, g, n, k, ce.EmuOptions(sms=sms, order=order, seed=i,
                                                                             smem_per_sm=smem))
            check_against_float64(c, a, w_t, emu.plan(m, n, k, bits, g, sms, smem)["splits"])
        except (ce.EmulatorError, AssertionError) as e:
            return {"caught": True, "how": f"{label}: {str(e)[:300]}"}
    return {"caught": False, "how": "every case passed"}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(verdict(sys.argv[1])))
