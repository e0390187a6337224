"""lmzoo serve: a real server on loopback, a real HTTP client (and the openai client)."""

from __future__ import annotations

import json
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
         "--model-name", "tiny", "--max-tokens-limit", str(LIMIT), "--max-body-bytes", "4096", "--template", "raw"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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


def _complete(base: str, **body):
    return httpx.post(base + "/v1/completions", json={"model": "tiny", "temperature": 0, **body}, timeout=60)


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
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "temperature": 0, "max_tokens": 6, "messages": [{"role": "user", "content": "the cat says"}]})
    assert r.status_code == 200
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == " meow."


def test_streaming_sends_server_sent_events(base):
    events = []
    body = {"temperature": 0, "max_tokens": 6, "stream": True,
            "messages": [{"role": "user", "content": "the cat says"}]}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
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
                   headers={"content-type": "application/json"})
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
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="the cat says", max_tokens=6, temperature=0)
    assert c.choices[0].text == " meow."
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat says"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == " meow."
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat says"}],
                                              max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == " meow."
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=LIMIT + 1)


# -- under load (issue 12): many clients, misbehaving ones, SIGTERM ------------------------------------


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


@pytest.mark.slow
def test_server_under_load_200_clients(tmp_path_factory):
    pytest.importorskip("psutil")
    run = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    _check_load(_serve_load().run_load(str(run), clients=200, n_bad=5, read_timeout=2.0), 200)
