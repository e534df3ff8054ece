"""Bytes saved for backward by one GSQ soft weight, regenerated vs stored Gumbel noise,
plus the peak RSS of a forward+backward over one SmolLM2-sized MLP (3 linears, 576 x 1536).

    python -m benchmarks.gsq_noise_memory [--store-noise]
Run once per mode (separate processes, so the RSS peaks do not mix).
"""

import argparse
import json
import resource

import torch

from quantize.gsq import GumbelGridLinear
from gsq_format.qtypes import QuantizedWeight


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--store-noise", action="store_true")
    p.add_argument("--bits", type=float, default=2)
    args = p.parse_args()
    bits = 1.58 if args.bits == 1.58 else int(args.bits)
    gen = torch.Generator().manual_seed(0)
    layers = []
    for n, k in [(1536, 576), (1536, 576), (576, 1536)]:
        codes = torch.zeros(n, k, dtype=torch.int8)
        init = QuantizedWeight(codes, torch.full((n, k // 64), 0.01), bits, 64)
        m = GumbelGridLinear(torch.nn.Linear(k, n, bias=False), init, 0.01, 6.0, gen)
        m.store_noise, m.tau, m.kappa = args.store_noise, 1.0, 100.0
        layers.append(m)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ws = [m.weight() for m in layers]
    sum((w ** 2).sum() for w in ws).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"bits": bits, "store_noise": args.store_noise,
                      "saved_for_backward_mib": round(saved[0] / 2**20, 1),
                      "peak_rss_mib": round(after / 1024, 1),
                      "rss_growth_mib": round((after - before) / 1024, 1)}))


if __name__ == "__main__":
    main()
