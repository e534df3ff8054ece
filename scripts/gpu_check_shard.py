"""pytest plugin for scripts/gpu_check.py: with GSQ_CHECK_SHARD=i/n, keep every n-th collected test
starting at i (round-robin, so large and small cases spread over the shards that run side by side).

    GSQ_CHECK_SHARD=0/3 python -m pytest -p gpu_check_shard tests/test_cuda_kernel.py
"""

from __future__ import annotations

import os


def shard_spec() -> tuple[int, int] | None:
    spec = os.environ.get("GSQ_CHECK_SHARD")
    if not spec:
        return None
    i, n = (int(x) for x in spec.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"GSQ_CHECK_SHARD={spec}: need 0 <= i < n")
    return i, n


def pytest_collection_modifyitems(config, items):
    spec = shard_spec()
    if spec is None:
        return
    i, n = spec
    keep = [it for j, it in enumerate(items) if j % n == i]
    drop = [it for j, it in enumerate(items) if j % n != i]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
