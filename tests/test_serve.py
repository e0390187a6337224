"""lmzoo serve: a real server (``lmzoo serve`` in a subprocess) on loopback, real HTTP clients (and openai's).

The module's server requires an API key (``--api-key``), as a server exposed beyond loopback would;
every request here carries it. Requests have short timeouts: a server that hangs fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from _tiny_run import tiny_run

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="lmzoo serve needs FastAPI (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="lmzoo serve needs uvicorn (pip install -e '.[serve]')")

LIMIT = 48
KEY = "test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmzoo", "serve", "--checkpoint", str(run), "--port", str(port), "--device", "cpu",
         "--model-name", "tiny", "--max-tokens-limit", str(LIMIT), "--max-body-bytes", "4096", "--template", "raw",
         "--api-key", KEY, "--allowed-host", "myhost.lan"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny model; and no spinning OpenMP helper (docs/serve.md)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # up to 60 s to import torch and load the model
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        else:
            pytest.fail("server did not start within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _complete(base: str, timeout: float = 60, **body):
    return httpx.post(base + "/v1/completions", json={"model": "tiny", "temperature": 0, **body}, headers=AUTH,
                      timeout=timeout)


def test_completion_answers_what_the_model_learned(base):
    r = _complete(base, prompt="the cat says", max_tokens=6)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["choices"][0]["text"] == " meow." and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
    stopped = _complete(base, prompt="the cat says", max_tokens=20, stop=".").json()["choices"][0]
    assert stopped["text"] == " meow" and stopped["finish_reason"] == "stop"


def test_chat_completion(base):
    r = httpx.post(base + "/v1/chat/completions", timeout=60, headers=AUTH, json={
        "model": "tiny", "temperature": 0, "max_tokens": 6, "messages": [{"role": "user", "content": "the cat says"}]})
    assert r.status_code == 200
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == " meow."


def test_streaming_sends_server_sent_events(base):
    events = []
    body = {"temperature": 0, "max_tokens": 6, "stream": True,
            "messages": [{"role": "user", "content": "the cat says"}]}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == " meow." and len(chunks) >= 4 and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_malformed_json_is_a_400_with_a_message(base):
    r = httpx.post(base + "/v1/completions", content=b'{"prompt": "x",', timeout=30,
                   headers={"content-type": "application/json", **AUTH})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    bad = _complete(base, prompt="x", temperature="hot")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


def test_oversized_body_is_a_413(base):
    r = _complete(base, prompt="a" * 10_000)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]


def test_max_tokens_above_the_limit_is_a_400(base):
    r = _complete(base, prompt="the", max_tokens=LIMIT + 1)
    assert r.status_code == 400 and f"limit of {LIMIT}" in r.json()["error"]["message"]
    assert _complete(base, prompt="the", max_tokens=LIMIT).status_code == 200


def test_twenty_concurrent_requests_are_all_answered_correctly(base):
    prompts = ["the cat says", "the cow says"] * 10
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda p: _complete(base, prompt=p, max_tokens=6), prompts))
    assert all(r.status_code == 200 for r in results)
    texts = [r.json()["choices"][0]["text"] for r in results]
    assert texts[0::2] == [" meow."] * 10  # greedy: each answer as if it were alone
    assert len(set(texts[1::2])) == 1


def test_the_openai_client_works_against_the_server(base):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="the cat says", max_tokens=6, temperature=0)
    assert c.choices[0].text == " meow."
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat says"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == " meow."
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat says"}],
                                              max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == " meow."
    streamed = client.completions.create(model="tiny", prompt="the cat says", max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == " meow."
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=LIMIT + 1)
    with pytest.raises(openai.NotFoundError):  # the served model's own name, not any
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):  # --api-key
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_request_for_another_model_is_a_404(base):
    r = _complete(base, model="family-name", prompt="x", max_tokens=1)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'tiny'" in r.json()["error"]["message"]
    assert _complete(base, model=None, prompt="the cat says", max_tokens=6).status_code == 200  # absent: the one served


def test_a_browser_page_cannot_drive_the_server(base):
    """DNS rebinding (a foreign Host), a cross-site form or text POST (no JSON type), no key: all refused."""
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    rebound = httpx.post(base + "/v1/completions", content=body, timeout=10,
                         headers={**AUTH, "content-type": "application/json", "host": "attacker.example:8000"})
    assert rebound.status_code == 400 and "attacker.example" in rebound.json()["error"]["message"]
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = httpx.post(base + "/v1/completions", content=body, headers={**AUTH, "content-type": ctype}, timeout=10)
        assert r.status_code == 415
    assert httpx.post(base + "/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 401
    allowed = httpx.post(base + "/v1/completions", content=body, timeout=10,  # --allowed-host myhost.lan
                         headers={**AUTH, "content-type": "application/json", "host": "myhost.lan:8000"})
    assert allowed.status_code == 200


def _drop_after_first_bytes(base: str, max_tokens: int) -> None:
    body = {"prompt": "the cat says", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=10) as r:
        assert r.status_code == 200
        next(r.iter_raw())  # then leave: the connection closes mid-stream


def test_a_stream_dropped_after_its_first_bytes_does_not_wedge_the_server(base):
    for _ in range(3):
        _drop_after_first_bytes(base, LIMIT)
        r = _complete(base, prompt="the cat says", max_tokens=6, timeout=15)  # answered, not queued behind a lock
        assert r.json()["choices"][0]["text"] == " meow."
    assert httpx.get(base + "/health", timeout=5).json()["status"] == "ok"


async def _stream_text(client, prompt: str) -> str | None:
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None
        lines = [x[6:] async for x in r.aiter_lines() if x.startswith("data: ")]
    return "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) if lines[-1] == "[DONE]" else None


async def _plain_text(client, prompt: str) -> str | None:
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0})
    return r.json()["choices"][0]["text"] if r.status_code == 200 else None


@pytest.mark.parametrize("plain,streams", [(0, 41), (30, 20)])
def test_many_concurrent_streams_and_plain_requests_never_deadlock(base, plain, streams):
    """More streams than a thread pool has threads, and plain requests beside them: every one answered."""

    async def run():
        limits = httpx.Limits(max_connections=plain + streams)
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=30, limits=limits) as client:
            return await asyncio.gather(*[_plain_text(client, "the cat says") for _ in range(plain)],
                                        *[_stream_text(client, "the cat says") for _ in range(streams)])

    assert asyncio.run(run()) == [" meow."] * (plain + streams)


# -- under load: many clients, misbehaving ones, dropped streams, slow readers, SIGTERM -----------------


def _serve_load():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_load(r: dict, clients: int) -> None:
    assert r["answered_right"] == clients  # every well-formed request: the in-process greedy answer
    assert r["bad_status"] == {"malformed": [400], "oversized": [413], "chunked_oversized": [413],
                               "slowloris": [None], "slow_body": [408]}
    # slow clients are cut off at the read timeout (not held for ever, not before it)
    assert r["read_timeout_s"] * 0.9 <= r["slow_held_s"] <= r["read_timeout_s"] + 5
    assert r["rss_peak_mb"] - r["rss_before_mb"] < 150  # bounded: no per-connection leak or body buffering
    assert r["shutdown_exit_code"] == 0 and r["shutdown_s"] < 10  # SIGTERM: clean exit despite a stalled client


def test_server_under_load_with_bad_clients_then_sigterm(tmp_path_factory):
    pytest.importorskip("psutil")
    run = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    _check_load(_serve_load().run_load(str(run), clients=50, n_bad=2, read_timeout=1.5), 50)


def test_after_dropped_streams_and_mixed_load_every_request_is_answered_and_the_server_returns_to_baseline(
        tmp_path_factory):
    """20 streams dropped after their first bytes, then 100 requests at once (50 streaming, 5 of them read
    slowly): every answer right, the dropped streams' work cancelled, threads and memory back to the baseline."""
    pytest.importorskip("psutil")
    run = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    r = _serve_load().run_mixed(str(run), plain=50, streams=50, slow=5, dropped=20, slow_read_s=0.3)
    assert r["answered_right_plain"] == 50 and r["answered_right_streams"] == 50
    assert r["dropped_got_bytes"] == 20 and r["dropped_cancelled"] == 20
    assert r["dropped_tokens"] < r["dropped_tokens_asked"] / 4  # stopped at once, not run to max_tokens
    assert r["idle_after"]
    assert r["threads_after"] == r["threads_before"]  # no thread per request or per connection left behind
    assert r["rss_after_mb"] - r["rss_before_mb"] < 16  # nothing of 120 requests kept


@pytest.mark.slow
def test_server_under_load_200_clients(tmp_path_factory):
    pytest.importorskip("psutil")
    run = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    _check_load(_serve_load().run_load(str(run), clients=200, n_bad=5, read_timeout=2.0), 200)
