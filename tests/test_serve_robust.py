"""lmzoo serve cannot be wedged: cancellation, the bounded queue, the watchdog, access checks, fuzzed bodies.

Each test runs a real uvicorn server on loopback in a thread of the test process, around the tiny
trained model, so it can slow the model down or stop it dead (a forward pre-hook) and watch what
the server does. Every request has a short client timeout: a regression fails, it does not hang.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from _fuzz import fuzz
from _tiny_run import tiny_run

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="lmzoo serve needs FastAPI (pip install -e '.[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="lmzoo serve needs uvicorn (pip install -e '.[serve]')")

from lmzoo.formats.load import display_name  # noqa: E402
from lmzoo.serving.serve import Server, create_app  # noqa: E402

JSON = {"content-type": "application/json"}


class Brake:
    """A forward pre-hook on the model: ``delay`` seconds per forward; ``hold()`` stops it dead until ``release()``."""

    def __init__(self):
        self.delay, self.calls = 0.0, 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, module, args):
        self.calls += 1
        time.sleep(self.delay)
        self.gate.wait(30)  # never longer than 30 s, whatever a failing test leaves behind

    def hold(self):
        self.gate.clear()

    def release(self):
        self.gate.set()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    import torch

    from lmzoo.formats.load import load_any

    run = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    model, tok = load_any(run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model; and no spinning OpenMP helper beside the server (docs/serve.md)
    yield run, model, tok
    torch.set_num_threads(threads)


@pytest.fixture
def brake(loaded):
    b = Brake()
    handle = loaded[1].register_forward_pre_hook(b)
    yield b
    b.release()
    handle.remove()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server: Server):
    """``server`` behind uvicorn on a free loopback port, in a thread; yields the base URL."""
    port = _free_port()
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    us = uvicorn.Server(config)
    thread = threading.Thread(target=us.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not us.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        us.should_exit = True
        thread.join(15)


@pytest.fixture
def make(loaded):
    """make(**server_kwargs) -> base URL of a running server around the tiny model."""
    with contextlib.ExitStack() as stack:
        def start(**kw):
            kw = {"model_name": "tiny", "template": "raw", "max_tokens_limit": 256, **kw}
            return stack.enter_context(running(Server(loaded[1], loaded[2], **kw)))
        yield start


def _post(base, path="/v1/completions", timeout=30.0, headers=JSON, **body):
    return httpx.post(base + path, content=json.dumps(body), headers=headers, timeout=timeout)


def _health(base) -> httpx.Response:
    return httpx.get(base + "/health", timeout=10)


def _until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.02)


def _idle(base):
    h = _health(base).json()
    return h if not h["busy"] and h["queued"] == 0 else None


# -- cancellation ----------------------------------------------------------------------------------


def test_a_stream_dropped_after_its_first_bytes_stops_its_generation(make, brake):
    base = make()
    brake.delay = 0.02  # 250 tokens would take >= 5 s
    body = {"prompt": "the cat says", "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        next(r.iter_raw())  # the first bytes of the body, then hang up
    h = _until(lambda: _idle(base), 20, "the worker to go idle after the client left")
    assert h["cancelled"] == 1 and h["tokens"] < 200, h  # stopped, not run to 250 tokens
    assert _post(base, prompt="the cat says", max_tokens=6, temperature=0).json()["choices"][0]["text"] == " meow."


def test_an_abandoned_plain_request_is_cancelled(make, brake):
    base = make()
    brake.delay = 0.02  # 250 tokens would take >= 5 s
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        _post(base, prompt="the cat says", max_tokens=250, temperature=0, timeout=0.5)
    h = _until(lambda: _idle(base), 20, "the worker to go idle after the client left")
    assert h["cancelled"] == 1 and h["tokens"] < 200, h


def _occupy(base, pool):
    """A request the held model cannot finish, once it is running; its future (" meow." when released)."""
    first = pool.submit(_post, base, prompt="the cat says", max_tokens=6, temperature=0)
    _until(lambda: _health(base).json()["busy"], 20, "the first request to start")
    return first


def test_a_waiting_client_that_leaves_frees_its_place_in_the_queue(make, brake):
    base = make(queue_size=4)
    brake.hold()
    with ThreadPoolExecutor(1) as pool:
        first = _occupy(base, pool)
        with pytest.raises(httpx.ReadTimeout):
            _post(base, prompt="the dog says", max_tokens=6, timeout=0.5)  # waits behind it, then leaves
        _until(lambda: _health(base).json()["queued"] == 0, 20, "the abandoned request to leave the queue")
        brake.release()
        assert first.result(timeout=20).json()["choices"][0]["text"] == " meow."


def test_a_full_queue_is_a_503_with_retry_after_and_queued_work_still_completes(make, brake):
    base = make(queue_size=2)
    brake.hold()
    with ThreadPoolExecutor(3) as pool:
        running_one = _occupy(base, pool)
        waiting = [pool.submit(_post, base, prompt="the cow says", max_tokens=6, temperature=0) for _ in range(2)]
        _until(lambda: _health(base).json()["queued"] == 2, 20, "two requests to wait")
        refused = _post(base, prompt="the dog says", max_tokens=6, timeout=5)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "queue size 2" in refused.json()["error"]["message"]
        brake.release()
        assert [f.result(timeout=20).status_code for f in [running_one, *waiting]] == [200, 200, 200]


def test_a_client_that_does_not_read_its_stream_holds_up_nobody(make):
    """A stream's client that reads nothing (a tiny receive window): once the socket buffers are full the
    server cannot send, yet the model goes on to the next request; the stream is whole when read at last."""
    base = make(max_tokens_limit=1024, max_request_tokens=1024)
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "the cat says", "max_tokens": 1024, "temperature": 0, "stream": True}).encode()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    stalled.connect(("127.0.0.1", port))
    try:
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _until(lambda: _health(base).json()["tokens"] >= 1024, 30, "the unread stream's tokens to be generated")
        r = _post(base, prompt="the cat says", max_tokens=6, temperature=0, timeout=30)  # while it still reads nothing
        assert r.json()["choices"][0]["text"] == " meow."
        stalled.settimeout(30)
        data = b""
        while not data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):  # chunked encoding's last chunk
            chunk = stalled.recv(1 << 16)
            assert chunk, "the server closed the stream before its end"
            data += chunk
        assert len(data) > 100_000  # more than the socket buffers hold: the server had to wait for this reader
    finally:
        stalled.close()


def test_health_reports_a_stuck_generator_and_recovers(make, brake):
    base = make(stall_timeout_s=0.3)
    assert _health(base).status_code == 200
    brake.hold()
    with ThreadPoolExecutor(1) as pool:
        stuck = _occupy(base, pool)
        r = _until(lambda: (lambda r: r if r.status_code == 503 else None)(_health(base)), 20, "health to say stalled")
        assert r.json()["status"] == "stalled" and r.json()["seconds_since_progress"] > 0.3
        brake.release()
        assert stuck.result(timeout=20).status_code == 200
    _until(lambda: _health(base).status_code == 200, 20, "health to recover")


def test_a_bug_in_generation_is_a_500_for_that_request_and_the_worker_goes_on(loaded, capsys):
    server = Server(loaded[1], loaded[2], model_name="tiny", template="raw")
    generate = server.worker.generate

    def broken(task, info, progress):
        raise RuntimeError("a bug")
        yield ""

    with running(server) as base:
        server.worker.generate = broken
        for stream in (False, True):
            r = _post(base, prompt="the cat says", max_tokens=6, stream=stream)
            if stream:
                assert r.status_code == 200 and "internal error: RuntimeError" in r.text and "[DONE]" not in r.text
            else:
                assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        server.worker.generate = generate
        assert _post(base, prompt="the cat says", max_tokens=6, temperature=0).json()["choices"][0]["text"] == " meow."
        h = _health(base).json()
        assert h["status"] == "ok" and h["errors"] == 2 and h["cancelled"] == 0
    assert "RuntimeError: a bug" in capsys.readouterr().err  # the traceback goes to the server's log


# -- inputs ----------------------------------------------------------------------------------------


MALFORMED = {
    "200 KB of nested brackets": b"[" * 200_000,  # a RecursionError inside the JSON decoder
    "a nested prompt": b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "a 5000-digit integer": b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",  # Python refuses to parse it
    "not UTF-8": b"\xff\xfe{not utf-8",
    "empty": b"",
    "truncated": b'{"prompt": "x",',
}


def test_malformed_or_nested_json_is_a_400_never_a_500(make):
    base = make()
    for what, raw in MALFORMED.items():
        r = httpx.post(base + "/v1/completions", content=raw, headers=JSON, timeout=30)
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"], what
        assert len(r.json()["error"]["message"]) < 300, what


BAD_NUMBERS = {"1e400": 10**400, "-1e400": -(10**400), "inf": float("inf"), "nan": float("nan"), "string": "1",
               "list": [1], "object": {"a": 1}, "bool": True}


@pytest.mark.parametrize("field", ["temperature", "top_p", "max_tokens", "top_k", "seed", "n"])
@pytest.mark.parametrize("value", list(BAD_NUMBERS.values()), ids=list(BAD_NUMBERS))
def test_huge_or_wrong_typed_numbers_are_a_400_naming_the_field(fuzz_client, field, value):
    r = fuzz_client.post("/v1/completions", content=json.dumps({"prompt": "the", "max_tokens": 2, field: value}),
                         headers=JSON)
    if field == "top_k" and value == 10**400:  # valid: larger than the vocabulary, it keeps every token
        assert r.status_code == 200
        return
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    # quoted values are cut (the shared check_sampling message quotes a seed whole: 400 digits at most here)
    assert "\n" not in r.json()["error"]["message"] and len(r.json()["error"]["message"]) < 500


def test_the_work_cap_counts_n_and_list_prompts(make):
    base = make(max_tokens_limit=16, max_request_tokens=64)
    r = _post(base, prompt=["the"] * 300, max_tokens=16)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "300 completion(s) x 16 tokens = 4800" in msg and "cap of 64" in msg
    r = _post(base, prompt="the", n=5, max_tokens=16)
    assert r.status_code == 400 and "80 tokens" in r.json()["error"]["message"]
    r = _post(base, "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], n=5)  # default max_tokens 16
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    ok = _post(base, prompt=["the cat says", "the cow says"], n=2, max_tokens=6, temperature=0).json()
    assert [c["index"] for c in ok["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in ok["choices"]][:2] == [" meow."] * 2


def test_n_choices_stream_with_their_index(make):
    base = make()
    body = {"messages": [{"role": "user", "content": "the cat says"}], "n": 2, "max_tokens": 6, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    texts = ["", ""]
    for chunk in map(json.loads, lines[:-1]):
        c = chunk["choices"][0]
        texts[c["index"]] += c["delta"].get("content", "")
    assert texts == [" meow.", " meow."]


# -- who may drive the server ----------------------------------------------------------------------


HOSTS = {  # (bound address, --allowed-host): {Host header: served?}
    ("127.0.0.1", ()): {"127.0.0.1:8000": True, "localhost": True, "[::1]:8000": True,
                        "rebind.attacker.example:8000": False,  # DNS rebinding: the page's own name
                        "10.1.2.3": False, "": False},
    ("127.0.0.1", ("myhost.lan",)): {"MyHost.lan:8000": True, "other.lan": False},
    ("127.0.0.1", ("*",)): {"anything.example": True},
    ("0.0.0.0", ()): {"192.168.1.7:8000": True, "localhost:8000": True,  # all interfaces: any address of the machine
                      "rebind.attacker.example": False},
}


@pytest.mark.parametrize("bound,allowed", list(HOSTS))
def test_host_header_is_checked_against_the_bound_address(make, bound, allowed):
    base = make(bound_host=bound, allowed_hosts=allowed)
    for host, ok in HOSTS[bound, allowed].items():
        r = _post(base, headers={**JSON, "host": host}, prompt="the", max_tokens=1)
        assert r.status_code == (200 if ok else 400), (host, r.text)
        if not ok:
            assert r.json()["error"]["code"] == "host_not_allowed"
            assert httpx.get(base + "/v1/models", headers={"host": host}, timeout=10).status_code == 400


def test_posts_without_a_json_content_type_are_refused(make):
    """What a cross-site page can send without a CORS preflight (a 'simple request') is refused."""
    base = make()
    for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        headers = {} if ctype is None else {"content-type": ctype}
        r = httpx.post(base + "/v1/completions", content=b'{"prompt": "the", "max_tokens": 1}', headers=headers,
                       timeout=10)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], ctype
    assert _post(base, headers={"content-type": "application/json; charset=utf-8"}, prompt="the",
                 max_tokens=1).status_code == 200
    preflight = httpx.options(base + "/v1/completions", headers={"origin": "http://evil.example",
                                                                 "access-control-request-method": "POST"}, timeout=10)
    assert "access-control-allow-origin" not in preflight.headers  # no CORS: a browser sends no JSON POST


def test_api_key_is_required_as_a_bearer_token(make):
    base = make(api_key="s3cret")
    for auth in (None, "Bearer wrong", "s3cret", "Basic s3cret", "Bearer s3cret2"):
        headers = {} if auth is None else {"authorization": auth}
        r = _post(base, headers={**JSON, **headers}, prompt="the", max_tokens=1)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(base + "/v1/models", headers=headers, timeout=10).status_code == 401
    good = {**JSON, "authorization": "Bearer s3cret"}
    assert _post(base, headers=good, prompt="the", max_tokens=1).status_code == 200
    assert _health(base).status_code == 200  # liveness needs no key (it tells nothing about the model)


@pytest.mark.parametrize("key", [None, "s3cret"])
def test_the_openai_client_works_with_and_without_an_api_key(make, key):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    base = make(api_key=key)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key or "unused", timeout=30, max_retries=0)
    assert client.completions.create(model="tiny", prompt="the cat says", max_tokens=6, temperature=0).choices[0].text \
        == " meow."
    streamed = client.completions.create(model="tiny", prompt="the cat says", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == " meow."
    if key:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)


def test_serve_reads_the_api_key_from_the_environment_and_names_the_checkpoint(loaded, monkeypatch):
    from lmzoo.serving import serve as serve_mod

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setenv(serve_mod.API_KEY_ENV, "from-env")
    serve_mod.serve(str(loaded[0]), device="cpu")
    server = apps[0].state.server
    assert server.api_key == "from-env" and server.model_name == loaded[0].name
    serve_mod.serve(str(loaded[0]), device="cpu", api_key="from-flag", model_name="mine")
    assert apps[1].state.server.api_key == "from-flag" and apps[1].state.server.model_name == "mine"


def test_serving_a_tokenizer_larger_than_the_vocabulary_is_one_line_before_listening(tmp_path, monkeypatch, capsys):
    """Its highest ids would index past the embedding: an IndexError in the middle of a request otherwise."""
    import lmzoo
    from lmzoo.cli import main
    from lmzoo.tokenizer import ByteTokenizer

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("served a mismatched checkpoint"))
    path = lmzoo.save(lmzoo.build("gpt2-debug", vocab_size=64), tmp_path / "small", ByteTokenizer())
    assert main(["serve", "--checkpoint", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmzoo: error: ") and "vocabulary" in err[0]


def test_the_served_model_id_is_the_checkpoints_own_name(tmp_path):
    run = tmp_path / "shakes"
    (run / "best").mkdir(parents=True)
    (run / "LATEST").write_text("best\n")
    (tmp_path / "SmolLM2-135M.Q4_1.gguf").write_bytes(b"")
    assert display_name(str(run)) == "shakes"
    assert display_name(str(run / "best")) == "shakes/best"  # not "best": which run's?
    assert display_name(str(tmp_path / "SmolLM2-135M.Q4_1.gguf")) == "SmolLM2-135M.Q4_1"


# -- fuzzed request bodies -------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install -e '.[dev]')")
st = hypothesis.strategies

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "stop", "seed", "n", "stream", "role", "content"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([0, 1, 2, 3, -1, 2**63, 2**64, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(["tiny", "", "\x00", "é🙂"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5),
                                                                       inner, max_size=4)), max_leaves=10)
numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 0.5, 1e-300, 2**64, 10**400, -(10**400)]))  # 10**400: past any float
fields = st.one_of(numbers, values)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
                                           "content": st.one_of(st.text(max_size=20), values)}), max_size=3)
# a valid body for either endpoint with one or two fields replaced: reaches each field's own check
nearly_valid = st.builds(lambda extra: {"prompt": "the cat says", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 4, **extra},
                         st.dictionaries(st.sampled_from(FIELDS), fields, min_size=1, max_size=2))
bodies = st.one_of(
    nearly_valid,
    values,
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3))},
                          optional={k: fields for k in ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                                                        "n", "stream", "model")}),
    st.fixed_dictionaries({"messages": messages},
                          optional={k: fields for k in ("max_tokens", "temperature", "top_p", "n", "stream", "model")}),
)


@pytest.fixture(scope="module")
def fuzz_client(loaded):
    with running(Server(loaded[1], loaded[2], model_name="tiny", template="transcript", max_tokens_limit=16,
                        max_body_bytes=65536)) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


def _check_answer(client, path: str, raw: bytes) -> None:
    with client.stream("POST", path, content=raw, headers=JSON) as r:
        text = r.read().decode()
    assert r.status_code < 500, text
    if r.status_code != 200:
        err = json.loads(text)["error"]
        assert err["message"] and "\n" not in err["message"] and len(err["message"]) < 1000
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert text.rstrip().endswith("data: [DONE]") or '"error"' in text.splitlines()[-2]
    else:
        assert json.loads(text)["choices"]


@fuzz(120)
@hypothesis.given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_request_bodies_never_get_a_500_or_hang(fuzz_client, body, path):
    raw = json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    _check_answer(fuzz_client, path, raw)
