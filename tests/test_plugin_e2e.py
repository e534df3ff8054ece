"""End to end: a tiny GSQ checkpoint served by ONE real vLLM OpenAI server (gsq-serve).

Checks /v1/models, completions, chat, streaming, 32 concurrent requests, and
greedy tokens equal to a plain transformers forward of the same dequantized
weights (float32 on both sides so near-ties cannot flip a token). With the
official ``openai`` client: chat and streaming, completion logprobs, stop
sequences, n > 1, a prompt over the context length (400), an unknown model
(404), and a client that disconnects mid-stream. Also: a corrupt checkpoint /
wrong config is refused by gsq-serve up front.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm not installed")
httpx = pytest.importorskip("httpx")
import plugin_tiny  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[1]
N_TOKENS = 24
STARTUP_TIMEOUT_S = 420


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsq_e2e")
    tok = plugin_tiny.make_tokenizer_dir(root / "tok")
    ckpt = root / "ckpt"
    ref_model = plugin_tiny.make_tiny_checkpoint(ckpt, tok, bits=2, group_size=32)
    return ckpt, ref_model


@pytest.fixture(scope="session")
def server(tiny):
    ckpt, _ = tiny
    port = _free_port()
    log = open(ckpt.parent / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gsq_vllm.serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "256", "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "32",
         "--served-model-name", "tiny-gsq"],
        env=_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {(ckpt.parent / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not come up in time")
            time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _reference_greedy(model, prompt_ids, n):
    """Plain argmax loop (no EOS handling, like ignore_eos on the server)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def test_models_endpoint(server):
    data = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in data["data"]] == ["tiny-gsq"]


def test_greedy_completion_matches_torch_reference(server, tiny):
    _, ref_model = tiny
    prompt_ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30]
    ref = _reference_greedy(ref_model, prompt_ids, N_TOKENS)
    r = httpx.post(f"{server}/v1/completions", timeout=120, json={
        "model": "tiny-gsq", "prompt": prompt_ids, "max_tokens": N_TOKENS, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True,
    })
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["token_ids"]
    assert len(got) == N_TOKENS
    assert got == ref


def test_chat_and_streaming(server):
    msg = {"model": "tiny-gsq", "messages": [{"role": "user", "content": "Hello!"}],
           "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{server}/v1/chat/completions", json=msg, timeout=120)
    assert r.status_code == 200, r.text
    full = r.json()["choices"][0]["message"]["content"]
    assert full
    pieces = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**msg, "stream": True}, timeout=120) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    assert len([p for p in pieces if p]) > 1  # really streamed, several chunks
    assert "".join(pieces) == full  # greedy: same text as the non-streamed answer


def test_32_concurrent_requests_complete(server):
    async def one(client, i):
        r = await client.post(f"{server}/v1/completions", json={
            "model": "tiny-gsq", "prompt": f"Request number {i}:", "max_tokens": 8,
            "temperature": 0, "ignore_eos": True})
        return r.status_code, r.json()["usage"]["completion_tokens"]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert results == [(200, 8)] * 32


def test_served_perplexity_equals_offline(server, tiny):
    """The server's prompt logprobs give the offline gsq-eval perplexity of the same checkpoint (both
    float32, so the bound is float32 rounding over a few hundred tokens, not quantization)."""
    from quantize.evaluate import load_model, perplexity, served_perplexity

    ckpt, _ = tiny
    ids = torch.randint(0, 49152, (3, 64), generator=torch.Generator().manual_seed(0))
    offline = perplexity(load_model(ckpt)[0], ids, progress=False)
    served = served_perplexity(server, ids, model="tiny-gsq")
    assert served == pytest.approx(offline, rel=1e-4)


# ------------------------------------------------- the official openai client against the server


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)


def test_openai_chat_and_stream(client):
    kw = dict(model="tiny-gsq", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text == full.choices[0].message.content


def test_openai_completion_logprobs(client):
    r = client.completions.create(model="tiny-gsq", prompt="The weather today is", max_tokens=5, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) >= 3
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the chosen token is the top one
        assert tok in top


def test_openai_stop_sequence(client):
    kw = dict(model="tiny-gsq", prompt="Once upon a time", max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    free = client.completions.create(**kw).choices[0].text
    words = [w for w in free.split() if len(w) >= 3]
    assert words, f"greedy output has no word to stop at: {free!r}"
    stop = words[len(words) // 2]
    stopped = client.completions.create(**kw, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(stop)]


def test_openai_n_choices(client):
    r = client.completions.create(model="tiny-gsq", prompt="A list of fruits:", max_tokens=6, temperature=1.0,
                                  n=3, seed=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.text for c in r.choices)


def test_openai_over_context_length_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-gsq", prompt=[1] * 300, max_tokens=4)  # --max-model-len 256
    assert e.value.status_code == 400


def test_openai_unknown_model_is_a_404(client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404


def test_client_disconnecting_mid_stream_leaves_the_server_serving(client, server):
    stream = client.completions.create(model="tiny-gsq", prompt="Count:", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()  # drop the connection with ~197 tokens still to come
    r = client.completions.create(model="tiny-gsq", prompt="Still there?", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


# ------------------------------------------------------- bad checkpoints (no server needed)


def _gsq_serve(folder):
    return subprocess.run([sys.executable, "-m", "gsq_vllm.serve", str(folder), "--port", "1"],
                          env=_env(), capture_output=True, text=True, timeout=120)


def test_corrupt_checkpoint_is_refused_up_front(tiny, tmp_path):
    import shutil

    ckpt, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated download
    r = _gsq_serve(bad)
    assert r.returncode == 2
    assert "invalid checkpoint" in r.stderr and "corrupt or truncated" in r.stderr
    assert "Traceback" not in r.stderr


def test_wrong_config_is_refused_up_front(tiny, tmp_path):
    import shutil

    ckpt, _ = tiny
    bad = tmp_path / "wrongcfg"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64  # scales on disk were written for G=32
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _gsq_serve(bad)
    assert r.returncode == 2
    assert "invalid checkpoint" in r.stderr and "scales" in r.stderr
