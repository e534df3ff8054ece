"""Markdown table of the static cost model (benchmarks/kernel_static.py JSON) for docs/results/cuda-kernel.md.

    python -m benchmarks.kernel_table benchmarks/results/kernel_static_v1.json [more.json ...]

One row per (kernel, bits, M) on H100 SXM over the Llama-3.1-8B layer shapes:
warp-instructions per weight in the hot loop (longest path; the shortest
in brackets where they differ), the modelled issue and tensor bounds and
the HBM need in weights per clock per SM, which of issue and tensor limits
the compute, bytes in flight per SM (range over the shapes), the modelled
fraction of the HBM roofline (range; meaningful where decode streams
weights, M <= 16) and the extra device operations per call. A MODEL, not a
measurement.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def rows_of(path):
    data = json.load(open(path))
    for label, part in data.items():
        if not isinstance(part, dict) or "rows" not in part:
            continue
        for r in part["rows"]:
            if r["machine"] == "H100 SXM" and r["model"] == "llama3.1-8b":
                yield label, r


def fmt_range(vals, f="{:.0f}"):
    lo, hi = min(vals), max(vals)
    return f.format(lo) if f.format(lo) == f.format(hi) else f"{f.format(lo)}-{f.format(hi)}"


def main(paths):
    groups = defaultdict(list)
    seen = set()
    for p in paths:
        for label, r in rows_of(p):
            key = (label, r["bits"], r["m"], r["n"], r["k"])
            if key in seen:  # the same kernel in two files (Humming beside each of ours)
                continue
            seen.add(key)
            bucket = "<=8" if r["m"] <= 8 else str(r["m"])
            groups[(label, r["bits"], bucket)].append(r)
    print("| kernel | bits | M | instr/weight | issue bound | tensor bound | HBM need | compute limit "
          "| KB in flight/SM | model % of HBM | extra ops/call |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (label, bits, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], int(kv[0][2].strip("<=")))):
        ipw = fmt_range([r["instructions_per_weight"] for r in rs], "{:.3f}")
        lo = rs[0].get("instructions_per_weight_min")
        if lo is not None and f"{lo:.3f}" != ipw:
            ipw += f" [{fmt_range([r['instructions_per_weight_min'] for r in rs], '{:.3f}')}]"
        extra = max(len(r.get("operations_per_call", [1])) - 1 for r in rs)
        limit = "/".join(sorted({"tensor" if r["tensor_bound"] <= r["issue_bound"] else "issue" for r in rs}))
        print(f"| {label} | {bits} | {m} | {ipw} | {fmt_range([r['issue_bound'] for r in rs])} "
              f"| {fmt_range([r['tensor_bound'] for r in rs])} | {fmt_range([r['hbm_need'] for r in rs], '{:.1f}')} "
              f"| {limit} "
              f"| {fmt_range([r['inflight_kb'] for r in rs], '{:.1f}')} "
              f"| {fmt_range([100 * r['model_fraction_of_hbm'] for r in rs])} | {extra} |")


if __name__ == "__main__":
    main(sys.argv[1:])
