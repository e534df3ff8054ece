"""Text corpora for calibration and evaluation, split by document so they are disjoint.

Corpora come from PyPI ``evals==3.0.1.post1``
(``evals/registry/data/schelling_point/{wikipedia_5,owt_5}.jsonl``, one JSON
object per line, text in field ``"0"``). Each corpus's documents are split
by index: the first ``CALIB_FRACTION`` are calibration text, the rest are
evaluation text, so no document is in both.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

CORPORA = {"wikipedia": "wikipedia_5.jsonl", "owt": "owt_5.jsonl"}
CALIB_FRACTION = 0.8
TEXT_FIELD = "0"


class DataError(ValueError):
    """Text for calibration or evaluation is missing, empty or unreadable."""


def corpus_path(name: str) -> Path:
    """Path of a named corpus inside the installed ``evals`` package."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; use one of {sorted(CORPORA)} or a file path")
    spec = importlib.util.find_spec("evals")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package evals (evals==3.0.1.post1) is not installed; run scripts/setup_env.sh")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "registry" / "data" / "schelling_point" / CORPORA[name]
        if p.is_file():
            return p
    raise DataError(f"corpus file {CORPORA[name]} not found inside package evals")


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a ``.jsonl`` (field "0" or "text") or a plain text file (one document)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: text file does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    docs = []
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e})") from None
        text = obj.get(TEXT_FIELD, obj.get("text")) if isinstance(obj, dict) else None
        if isinstance(text, str) and text.strip():
            docs.append(text)
    return docs


def load_split(source: str, split: str) -> list[str]:
    """Documents of ``split`` ("calib" or "eval") of a named corpus, or all of a file's documents."""
    if source in CORPORA:
        docs = read_documents(corpus_path(source))
        cut = int(len(docs) * CALIB_FRACTION)
        if split == "calib":
            docs = docs[:cut]
        elif split == "eval":
            docs = docs[cut:]
        else:
            raise DataError(f"split must be calib or eval, got {split!r}")
    else:
        docs = read_documents(source)
    if not docs:
        raise DataError(f"{source}: no text found for the {split} split (empty calibration/evaluation text)")
    return docs


# User turns for chat-formatted calibration, cycled over the documents (deterministic).
CHAT_PROMPTS = (
    "Tell me about this topic.",
    "Write a short informative paragraph.",
    "Can you explain this to me?",
    "Give me an overview in a few sentences.",
)


def as_chat(docs: list[str], tokenizer) -> list[str]:
    """Each document rendered by the tokenizer's chat template as the assistant's answer to a
    generic user request, so an instruct model is calibrated on the token pattern it is served
    with (role markers and special tokens included). DataError if there is no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("--calib-chat needs a tokenizer with a chat template (this model has none)")
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)]},
         {"role": "assistant", "content": doc}], tokenize=False) for i, doc in enumerate(docs)]


def tokenize_sequences(docs: list[str], tokenizer, seqlen: int, nsamples: int | None,
                       chat: bool = False) -> torch.Tensor:
    """Token ids int64 ``[n, seqlen]``: documents joined with EOS, cut into consecutive windows.

    Deterministic (no sampling): the first ``nsamples`` windows (all when None).
    ``chat``: render each document with :func:`as_chat` first (it carries its own end markers).
    """
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    eos = None if chat else tokenizer.eos_token_id
    if chat:
        docs = as_chat(docs, tokenizer)
    ids: list[int] = []
    need = None if nsamples is None else nsamples * seqlen
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seqlen
    if nsamples is not None:
        if n < nsamples:
            raise DataError(f"text gives only {n} sequences of {seqlen} tokens, {nsamples} requested")
        n = nsamples
    if n == 0:
        raise DataError(f"text is shorter than one sequence of {seqlen} tokens")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long, device="cpu").view(n, seqlen)
