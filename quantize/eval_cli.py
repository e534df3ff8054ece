"""``gsq-eval``: perplexity table of bf16 folders and GSQ checkpoints on held-out text."""

from __future__ import annotations

import argparse
import sys

from gsq_format.format import FormatError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gsq-eval", description=__doc__)
    p.add_argument("models", nargs="+", help="model folders (bf16 or gsq); 'default' = embedded SmolLM2 bf16; "
                   "with --server, the last one's tokenizer tokenizes the text sent to the server")
    p.add_argument("--corpus", default="wikipedia", help="corpus name (eval split) or a .jsonl/.txt file")
    p.add_argument("--nsamples", type=int, default=40, help="eval sequences (default 40)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see gsq-quantize --threads)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="also score the same text through a running vLLM OpenAI server (e.g. gsq-serve on one "
                        "of the folders; http://127.0.0.1:8000) and report it as its own row")
    args = p.parse_args(argv)
    import httpx

    from quantize.data import DataError
    from quantize.evaluate import evaluate_folders, format_table, served_row, write_json
    from quantize.models import resolve_model

    import torch

    torch.set_num_threads(max(1, args.threads))
    try:
        folders = [str(resolve_model(m)) for m in args.models]
        rows = evaluate_folders(folders, args.corpus, args.nsamples, args.seqlen, progress=not args.no_progress)
        if args.server:
            rows.append(served_row(args.server, folders[-1], args.corpus, args.nsamples, args.seqlen))
    except httpx.HTTPError as e:
        print(f"gsq-eval: error: server {args.server}: {e}", file=sys.stderr)
        return 2
    except (FormatError, DataError, OSError) as e:
        print(f"gsq-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
    # A checkpoint's report.html shows its own perplexity and that of the float models beside it.
    from quantize.report import add_perplexity

    baselines = [r for r in rows if r["kind"] == "bf16"]
    for r in rows:
        if r["kind"] not in ("bf16", "served") and add_perplexity(r["model"], r):
            for b in baselines:
                add_perplexity(r["model"], b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
