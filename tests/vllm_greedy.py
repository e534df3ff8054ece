"""Greedy tokens from vLLM's own engine (in this process), for tests that compare kernel paths.

    python tests/vllm_greedy.py CKPT DTYPE N_TOKENS PROMPTS_JSON
    -> last stdout line: JSON {"tokens": one list of token ids per prompt,
                               "emulated_gemms": calls of the CUDA emulator}

The kernel path is chosen by the environment (GSQ_KERNEL), read when the
plugin loads the weights, so each path gets its own process.
"""

import json
import os
import sys


def main(argv):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no spawn guard needed
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ckpt, dtype, n_tokens, prompts = argv[0], argv[1], int(argv[2]), json.loads(argv[3])
    llm = LLM(model=ckpt, dtype=dtype, enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    emulated = sys.modules["gsq_vllm.cuda_emu"].calls if "gsq_vllm.cuda_emu" in sys.modules else 0
    print(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "emulated_gemms": emulated}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
