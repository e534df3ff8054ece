"""Factual chat probe: short questions with one-word answers, asked through the served model.

Each model folder (bf16 or GSQ) is served by ``gsq-serve`` (vLLM's OpenAI API
server, ``--enforce-eager``) and asked every question as a chat message
("<question> Answer with one word.", greedy, 24 tokens) with the official
``openai`` client. An answer scores when one of the accepted words is one of
its words (lower-cased, punctuation stripped; the answer is at most 24
tokens): "Paris." and "The capital of France is Paris." both count,
"France." does not. Prints a table and merges the results into a JSON file.

    python -m benchmarks.chat_probe ~/.cache/gsq-vllm/models/SmolLM2-135M-Instruct-bf16 runs/x \\
        --out benchmarks/results/chat_probe.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from benchmarks.results_io import RESULTS, add_common_args, machine_line, read_json, write_json
from benchmarks.serving import running_server

QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("What is the capital of England?", ["london"]),
    ("What is the capital of Russia?", ["moscow"]),
    ("What is the capital of Egypt?", ["cairo"]),
    ("What is the capital of China?", ["beijing"]),
    ("What is the capital of Greece?", ["athens"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is grass?", ["green"]),
    ("What color is snow?", ["white"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What is 2 plus 2?", ["four", "4"]),
    ("What is 5 times 3?", ["fifteen", "15"]),
    ("What is 10 minus 7?", ["three", "3"]),
    ("What planet do we live on?", ["earth"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("What star is at the center of our solar system?", ["sun"]),
    ("What gas do humans need to breathe?", ["oxygen"]),
    ("What is frozen water called?", ["ice"]),
    ("What animal is known as man's best friend?", ["dog", "dogs"]),
    ("What is the largest ocean on Earth?", ["pacific"]),
    ("Which animal says moo?", ["cow", "cows"]),
    ("What do bees make?", ["honey"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What is the opposite of up?", ["down"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What language is spoken in Brazil?", ["portuguese"]),
    ("What is the chemical symbol for gold?", ["au"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twentyfour"]),
    ("What is the tallest animal?", ["giraffe", "giraffes"]),
    ("What is the main ingredient in bread?", ["flour", "wheat"]),
    ("In which country are the pyramids of Giza?", ["egypt"]),
    ("What is the currency of Japan?", ["yen"]),
    ("At how many degrees Celsius does water boil?", ["100", "hundred"]),
    ("What is the largest mammal?", ["whale", "whales"]),
    # The second 40 (added 2026-12-04): 40 questions have a standard error of about 8 points, too
    # coarse to choose a default by. Scores on the first 40 stay comparable with earlier runs.
    ("What is the capital of Canada?", ["ottawa"]),
    ("What is the capital of Australia?", ["canberra"]),
    ("What is the capital of Portugal?", ["lisbon"]),
    ("What is the capital of Ireland?", ["dublin"]),
    ("What is the capital of Norway?", ["oslo"]),
    ("What is the capital of Austria?", ["vienna"]),
    ("What is the capital of South Korea?", ["seoul"]),
    ("What is the capital of Kenya?", ["nairobi"]),
    ("What color is a ripe banana?", ["yellow"]),
    ("What color do you get by mixing blue and yellow?", ["green"]),
    ("What color is coal?", ["black"]),
    ("How many sides does a triangle have?", ["three", "3"]),
    ("How many months are in a year?", ["twelve", "12"]),
    ("How many legs does a dog have?", ["four", "4"]),
    ("How many minutes are in an hour?", ["sixty", "60"]),
    ("What is 3 plus 4?", ["seven", "7"]),
    ("What is 6 times 2?", ["twelve", "12"]),
    ("What is 9 minus 4?", ["five", "5"]),
    ("What is the closest planet to the Sun?", ["mercury"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What is the natural satellite of the Earth called?", ["moon"]),
    ("What gas do plants absorb from the air?", ["carbon", "co2"]),
    ("What do fish live in?", ["water"]),
    ("What animal is known as the king of the jungle?", ["lion", "lions"]),
    ("Which animal has a long trunk?", ["elephant", "elephants"]),
    ("Which bird is a symbol of peace?", ["dove", "doves"]),
    ("What is the hardest natural substance?", ["diamond", "diamonds"]),
    ("What is the opposite of day?", ["night"]),
    ("What is the opposite of big?", ["small", "little", "tiny"]),
    ("What is the opposite of wet?", ["dry"]),
    ("Who painted the Mona Lisa?", ["leonardo", "vinci"]),
    ("What language is spoken in France?", ["french"]),
    ("What is the chemical symbol for water?", ["h2o"]),
    ("What is the largest desert in Africa?", ["sahara"]),
    ("What is the longest river in Africa?", ["nile"]),
    ("In which country is the Eiffel Tower?", ["france"]),
    ("What is the currency of the United States?", ["dollar", "dollars", "usd"]),
    ("What season comes after winter?", ["spring"]),
    ("What is the fastest land animal?", ["cheetah", "cheetahs"]),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth", "moths"]),
]
FIRST_SET = 40  # the original questions: their score is reported on its own, for older runs


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s-]", " ", text.lower()).split()


def scores(answer: str, accepted: list[str]) -> bool:
    return any(w in accepted for w in words(answer))


def probe(model: str, log_dir: Path, timeout_s: float = 900) -> dict:
    from openai import OpenAI

    with running_server(model, ["--enforce-eager", "--max-model-len", "512"],
                        log_dir / f"probe-{Path(model).name}.log", timeout_s) as (base, startup):
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        rows = []
        for q, accepted in QUESTIONS:
            r = client.chat.completions.create(model="bench", temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": f"{q} Answer with one word."}])
            a = r.choices[0].message.content or ""
            rows.append({"question": q, "answer": a, "correct": scores(a, accepted)})
        first = rows[:FIRST_SET]
        return {"score": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
                "score_first_40": sum(r["correct"] for r in first) / len(first), "startup_s": startup,
                "answers": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model folders (bf16 or GSQ)")
    add_common_args(ap, str(RESULTS / "chat_probe.json"), flag="--out")
    ap.add_argument("--label", action="append", default=[], help="name for each model in the JSON (in order)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = read_json(out)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    for i, model in enumerate(args.models):
        label = args.label[i] if i < len(args.label) else Path(model).name
        t0 = time.time()
        res = probe(model, log_dir)
        res.update(model=str(model), machine=machine_line(), seconds=round(time.time() - t0))
        results[label] = res
        hits = sum(r["correct"] for r in res["answers"])
        print(f"{label:40} {res['score'] * 100:5.1f} %  ({hits}/{res['n']}; first {FIRST_SET}: "
              f"{res['score_first_40'] * 100:.1f} %)")
        for r in res["answers"]:
            if not r["correct"]:
                print(f"    miss: {r['question']!r} -> {r['answer'][:60]!r}")
        write_json(results, str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
