"""lm-eval against the served checkpoint, beside lm-eval on the same checkpoint offline.

One command: starts ``gsq-serve`` on a checkpoint, defines a local lm-eval task from our held-out
text (``loglikelihood_rolling``: word/byte perplexity and bits per byte; the hub is not reachable
here, so the task reads a JSONL file through the ``json`` dataset builder), and runs it twice:

* **served**: lm-eval's ``local-completions`` model against the server's OpenAI completions API
  (token-id prompts, ``echo`` + ``logprobs``: the server scores every prompt token);
* **offline**: lm-eval's ``hf`` model on the same checkpoint dequantized in float32 by
  ``quantize.evaluate.load_model`` (the path ``gsq-eval`` uses).

The two perplexities must agree: the server runs our kernels on what the quantizer wrote, the
offline path dequantizes it in plain torch. Prints both and writes JSON.

    python -m benchmarks.lm_eval_served runs/smollm2-gsq-3b-g64 --docs 20 --out benchmarks/results/lm_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.results_io import RESULTS, add_common_args, write_json
from benchmarks.serving import running_server

TASK = "gsq_heldout"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def write_task(folder: Path, docs: list[str]) -> Path:
    """A local lm-eval task (YAML + JSONL) scoring ``docs`` by rolling log-likelihood."""
    data = folder / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood_rolling\n"
        "test_split: test\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n" + "".join(f"  - metric: {m}\n" for m in METRICS) +
        "metadata:\n  version: 1.0\n")
    return folder


def _scores(results: dict) -> dict:
    row = results["results"][TASK]
    return {m: row[f"{m},none"] for m in METRICS}


def run_served(base: str, model_name: str, tokenizer: str, task_dir: Path, max_length: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{base}/v1/completions", "model": model_name, "tokenizer": tokenizer,
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": max_length,
                    "num_concurrent": 1, "max_retries": 1},
        tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)), batch_size=1,
        log_samples=False, bootstrap_iters=0)
    return _scores(res)


def run_offline(folder: str, task_dir: Path, max_length: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from quantize.evaluate import load_model

    model, _ = load_model(folder)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), max_length=max_length,
              batch_size=1, device="cpu")
    res = simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                          log_samples=False, bootstrap_iters=0)
    return _scores(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a GSQ checkpoint (or bf16) folder")
    ap.add_argument("--docs", type=int, default=20, help="held-out documents to score")
    ap.add_argument("--corpus", default="wikipedia")
    ap.add_argument("--max-length", type=int, default=512, help="lm-eval rolling window (tokens)")
    ap.add_argument("--server-args", default="--max-model-len 1024 --dtype float32 --enforce-eager")
    add_common_args(ap, str(RESULTS / "lm_eval.json"), flag="--out")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from quantize.data import load_split

    docs = load_split(args.corpus, "eval")[: args.docs]
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = write_task(Path(tmp), docs)
        offline = run_offline(args.checkpoint, task_dir, args.max_length)
        with running_server(args.checkpoint, args.server_args.split(), Path(tmp) / "server.log") as (base, _):
            served = run_served(base, "bench", args.checkpoint, task_dir, args.max_length)
    print(f"{'metric':<18}{'served':>14}{'offline':>14}{'served/offline':>16}")
    for m in METRICS:
        print(f"{m:<18}{served[m]:>14.6g}{offline[m]:>14.6g}{served[m] / offline[m]:>16.5f}")
    write_json({"checkpoint": args.checkpoint, "docs": args.docs, "corpus": args.corpus,
                "server_args": args.server_args, "served": served, "offline": offline}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
