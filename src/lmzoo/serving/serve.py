"""``lmzoo serve``: an OpenAI-compatible HTTP endpoint for a checkpoint (FastAPI + uvicorn).

Endpoints (the subset of OpenAI's API a base model can honour; docs/serve.md):

- ``POST /v1/completions``: ``prompt`` (a string or a list of strings), ``n`` (choices per prompt),
  ``max_tokens`` (default 16), ``temperature`` (default 1; 0 = greedy), ``top_p``, ``top_k`` (an
  extension), ``stop`` (a string or a list), ``seed``, ``stream``.
- ``POST /v1/chat/completions``: ``messages`` rendered with the model's own chat template
  (lmzoo.serving.templates.render_chat; lmzoo's transcript for a model without one); the same
  sampling fields; ``max_tokens`` (or ``max_completion_tokens``) defaults to the limit.
- ``GET /v1/models``, ``GET /health``.

Streaming answers are server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``.

Who may drive it (the threat model, docs/serve.md): the server binds to 127.0.0.1 unless told
otherwise, so only local processes reach it; a web page in a local browser is a local process's
guest, so every request's ``Host`` must name this server (the bound address, loopback names, or
``--allowed-host``: a DNS-rebinding page carries its own domain name) and every POST must declare
``Content-Type: application/json`` (which a cross-site page cannot send without a CORS preflight
that this server never grants). With an API key (``--api-key`` or ``LMZOO_API_KEY``), every
``/v1`` request must carry ``Authorization: Bearer <key>``, as OpenAI's clients send it.

What one request may cost, and why: a body over ``max_body_bytes`` is a 413 before it is parsed;
``max_tokens`` above ``max_tokens_limit`` is a 400 (not silently clamped: a client asking for more
than it gets would see a truncated answer it did not ask for); choices x ``max_tokens`` (choices:
prompts x ``n``) above ``max_request_tokens`` is a 400 naming the cap. Malformed JSON (nesting too
deep for the decoder included), a bad field (checked by lmzoo.decoding.generate.check_sampling, as
everywhere), a model name other than the one served (404) or a prompt with characters the tokenizer
does not know are answered in OpenAI's error format before a stream starts; no user input gets a 500.

Generation runs in one worker thread fed by a bounded queue (lmzoo.serving.worker): when
``queue_size`` generations are waiting a request gets 503 with ``Retry-After`` at once; a client
that disconnects (stream or not) has its work cancelled; handlers never wait on a lock, so no number
of requests can deadlock the server; ``/health`` reports a generation without a new token for
``stall_timeout_s`` as unhealthy (503). Slow clients are cut off: a connection that has not sent a
request's headers within ``read_timeout_s`` is closed, a body not received within it is a 408, an
idle keep-alive connection closes after 5 s; beyond ``max_connections`` at once the answer is 503;
SIGTERM lets requests in flight finish (up to 5 s) and exits with code 0 (benchmarks/serve_load.py,
docs/reliability.md).
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime
import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lmzoo.common import optional_import
from lmzoo.decoding.generate import SEED_LIMIT, check_sampling, encode_prompt
from lmzoo.errors import QUOTE_CHARS, ConfigError, LmzooError, quote
from lmzoo.serving.chat import stream_text
from lmzoo.serving.templates import check_template, render_chat
from lmzoo.serving.worker import END, GenerationWorker, Job, QueueFull, Task

DEFAULT_MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
DEFAULT_READ_TIMEOUT_S = 10.0  # to send a request's headers, and again its body
DEFAULT_MAX_CONNECTIONS = 1024  # open connections + requests in flight; beyond: 503
DEFAULT_QUEUE_SIZE = 128  # generations waiting for the model; beyond: 503 + Retry-After
DEFAULT_STALL_TIMEOUT_S = 60.0  # a generation without a new token for this long: /health says "stalled"
REQUEST_TOKENS_PER_LIMIT = 4  # default per-request cap: 4 x max_tokens_limit generated tokens
SHUTDOWN_GRACE_S = 5  # on SIGTERM, requests in flight get this long to finish
API_KEY_ENV = "LMZOO_API_KEY"
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})


class RequestError(Exception):
    """A bad request: HTTP ``status`` with a one-line ``message`` for the client (OpenAI's error fields)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def _number(body: dict[str, Any], name: str, default: Any, kind: type, low: float | None = None,
            high: float | None = None) -> Any:
    """``body[name]`` as ``kind`` (int or float) within [low, high]; NaN passes (check_sampling names it)."""
    v = body.get(name, default)
    if v is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{name}' must be {what}, got {quote(v)}", param=name)
    if kind is int and isinstance(v, float):
        if not v.is_integer():  # 1.5, NaN, infinity
            raise RequestError(f"'{name}' must be {what}, got {quote(v)}", param=name)
        v = int(v)
    elif kind is float and isinstance(v, int):
        try:
            v = float(v)
        except OverflowError:  # an integer beyond any float: out of every range
            raise RequestError(f"'{name}' must be in [{low}, {high}], got {quote(v)}", param=name) from None
    if (low is not None and v < low) or (high is not None and v > high):
        raise RequestError(f"'{name}' must be in [{low}, {high}], got {quote(v)}", param=name)
    return v


def _host_name(header: str) -> str:
    """The name part of a ``Host`` header: ``example.com:8000`` -> ``example.com``, ``[::1]:80`` -> ``::1``."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        h = h.partition(":")[0]
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass
class Plan:
    """A checked request: what to generate (one Task per choice) and how to answer."""

    kind: str  # "text_completion" or "chat.completion"
    tasks: list[Task]
    stream: bool


class Server:
    """The model, its tokenizer, the limits and the generation worker; request handling without HTTP."""

    def __init__(self, model, tokenizer, model_name: str = "lmzoo", max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, template: str = "auto",
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, queue_size: int = DEFAULT_QUEUE_SIZE,
                 max_request_tokens: int | None = None, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                 api_key: str | None = None, bound_host: str = "127.0.0.1", allowed_hosts: Sequence[str] = ()):
        if tokenizer is None:
            raise ConfigError("serving needs the checkpoint's tokenizer, and none was saved with it")
        max_request_tokens = REQUEST_TOKENS_PER_LIMIT * max_tokens_limit if max_request_tokens is None \
            else max_request_tokens
        for name, v in (("max_tokens_limit", max_tokens_limit), ("max_body_bytes", max_body_bytes),
                        ("read_timeout_s", read_timeout_s), ("queue_size", queue_size),
                        ("max_request_tokens", max_request_tokens), ("stall_timeout_s", stall_timeout_s)):
            if not v > 0:  # `not >`: NaN is refused too
                raise ConfigError(f"{name} must be positive, got {quote(v)}")
        if api_key is not None and not api_key.strip():
            raise ConfigError("the API key must not be empty")
        check_template(tokenizer, template)  # compiled and checked now: a line at start, not a 400 later
        self.model, self.tokenizer, self.model_name, self.template = model, tokenizer, model_name, template
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.max_request_tokens, self.read_timeout_s = max_request_tokens, float(read_timeout_s)
        self.api_key = api_key
        bound = _host_name(bound_host)
        self.any_host = "*" in allowed_hosts
        # a wildcard bind is reached by any of the machine's addresses: IP literals are fine (a rebinding
        # page always sends its own domain name); loopback binds answer to the loopback names
        self.any_ip = bound in WILDCARD
        self.host_names = frozenset({bound, *(_host_name(h) for h in allowed_hosts)}
                                    | (LOOPBACK if bound in LOOPBACK | WILDCARD else set())) - {""}
        self.worker = GenerationWorker(self._generate, queue_size, stall_timeout_s)

    # -- who may ask ----------------------------------------------------------------------------------
    def check_access(self, headers, method: str, needs_key: bool) -> None:
        """Raise RequestError unless the request's Host, credentials and (for POST) content type are right.

        ``headers``: a case-insensitive mapping (Starlette's ``request.headers``).
        """
        host = headers.get("host")
        name = _host_name(host) if host is not None else None
        if not (self.any_host or name in self.host_names or (self.any_ip and name is not None and _is_ip(name))):
            allowed = ", ".join(sorted(self.host_names)) + (", any IP address" if self.any_ip else "")
            raise RequestError(f"Host {quote(host)} is not served here (allowed: {allowed}; add names with "
                               "--allowed-host)", 400, code="host_not_allowed")
        if needs_key and self.api_key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                raise RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'", 401,
                                   code="invalid_api_key")
        if method == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise RequestError(f"POST bodies must be sent as Content-Type: application/json, got "
                                   f"{quote(ctype or None)}", 415)

    # -- parsing --------------------------------------------------------------------------------------
    def parse(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > self.max_body_bytes:
            raise RequestError(f"request body of {len(raw)} bytes exceeds the limit of {self.max_body_bytes}", 413)
        try:
            body = json.loads(raw)
        except RecursionError:  # nesting deeper than the decoder's stack ([[[[...)
            raise RequestError("malformed JSON body: nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
            raise RequestError(f"malformed JSON body: {str(e)[:QUOTE_CHARS]}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(f"'model' must be a string, got {quote(model)}", param="model")
        if model is not None and model != self.model_name:  # absent: the served model
            raise RequestError(f"the model {quote(model)} does not exist; this server serves {self.model_name!r}",
                               404, param="model", code="model_not_found")
        if body.get("stream") not in (None, True, False):
            raise RequestError(f"'stream' must be true or false, got {quote(body['stream'])}", param="stream")
        return body

    def sampling(self, body: dict[str, Any], default_max: int, choices: int) -> tuple[int, list[str], dict[str, Any]]:
        """(max_tokens, stop strings, sampling kwargs) from a request, checked against the limits.

        ``choices``: the generations the request asks for (prompts x n), counted against the work cap.
        """
        max_tokens = _number(body, "max_tokens", None, int, 1)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", default_max, int, 1)
        if max_tokens > self.max_tokens_limit:
            raise RequestError(f"max_tokens {quote(max_tokens)} exceeds this server's limit of "
                               f"{self.max_tokens_limit}", param="max_tokens")
        if choices * max_tokens > self.max_request_tokens:
            raise RequestError(f"this request asks for {choices} completion(s) x {max_tokens} tokens = "
                               f"{choices * max_tokens} tokens, over this server's cap of {self.max_request_tokens} "
                               "tokens per request (prompts x n x max_tokens)", param="n" if choices > 1 else
                               "max_tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise RequestError("'stop' must be a string or a list of up to 4 strings", param="stop")
        kwargs = {"temperature": _number(body, "temperature", 1.0, float, 0.0, 2.0),
                  "top_p": _number(body, "top_p", None, float, 0.0, 1.0), "top_k": _number(body, "top_k", None, int, 1),
                  "seed": _number(body, "seed", None, int)}
        if kwargs["top_p"] == 0.0:
            kwargs["top_p"] = None if kwargs["temperature"] == 0 else 1e-9  # 0: only the most likely token
        try:  # what generation itself checks (NaN, a seed past 2**64, ...): now, as a 400, before any work
            check_sampling(max_tokens, **kwargs)
        except ConfigError as e:
            name = str(e).split()[0]
            raise RequestError(str(e), param=name if name in kwargs else None) from None
        return max_tokens, stop, kwargs

    def check_prompt(self, prompt: str, param: str) -> None:
        """A prompt the tokenizer cannot encode (a character a char-level model does not know) is a 400."""
        try:
            encode_prompt(self.tokenizer, prompt)
        except LmzooError as e:
            raise RequestError(str(e), param=param) from None

    def _n(self, body: dict[str, Any]) -> int:
        """Choices per prompt: each costs at least a token, so more than the work cap can never be served."""
        return _number(body, "n", 1, int, 1, self.max_request_tokens)

    def _tasks(self, prompts: list[str], n: int, max_tokens: int, stops: list[str], kwargs: dict) -> list[Task]:
        """One Task per choice, in OpenAI's order (prompt-major); a seeded request gives choice j ``seed + j``."""
        seed = kwargs["seed"]
        return [Task(p, max_tokens, stops, {**kwargs, "seed": None if seed is None else (seed + j) % SEED_LIMIT})
                for p in prompts for j in range(n)]

    def completions(self, body: dict[str, Any]) -> Plan:
        prompts = body.get("prompt", "")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("'prompt' must be a string or a non-empty list of strings", param="prompt")
        n = self._n(body)
        max_tokens, stops, kwargs = self.sampling(body, 16, len(prompts) * n)
        for p in prompts:  # every prompt checked before the first is generated (and before a stream starts)
            self.check_prompt(p, "prompt")
        return Plan("text_completion", self._tasks(prompts, n, max_tokens, stops, kwargs), bool(body.get("stream")))

    def chat(self, body: dict[str, Any]) -> Plan:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
        try:
            # the one place a conversation becomes text; a bad message or the template's own refusal: a 400
            prompt, stops = render_chat(messages, self.tokenizer, self.template)
        except LmzooError as e:
            raise RequestError(str(e), param="messages") from None
        n = self._n(body)
        max_tokens, extra_stops, kwargs = self.sampling(body, self.max_tokens_limit, n)
        self.check_prompt(prompt, "messages")
        return Plan("chat.completion", self._tasks([prompt], n, max_tokens, stops + extra_stops, kwargs),
                    bool(body.get("stream")))

    # -- generation (in the worker thread) ------------------------------------------------------------
    def _generate(self, task: Task, info: dict, progress: Callable[[], bool]) -> Iterator[str]:
        return stream_text(self.model, self.tokenizer, task.prompt, task.max_tokens, task.stops, info,
                           progress=progress, **task.sampling)

    # -- answers --------------------------------------------------------------------------------------
    def _head(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.model_name}

    async def collect(self, plan: Plan, job: Job) -> dict[str, Any]:
        """Await a job's events and build the whole (non-streamed) answer."""
        texts: list[list[str]] = [[] for _ in plan.tasks]
        infos: list[dict | None] = [None] * len(plan.tasks)
        while (event := await job.next()) is not END:
            if event[0] == "piece":
                texts[event[1]].append(event[2])
            elif event[0] == "done":
                infos[event[1]] = event[2]
            else:
                raise RequestError(event[2], event[1], code="server_error" if event[1] >= 500 else None)
        if any(i is None for i in infos):  # abandoned: the client has gone, nobody reads this
            raise RequestError("the request was cancelled", 503)
        out = self._head(plan.kind)
        if plan.kind == "chat.completion":
            out["choices"] = [{"index": i, "message": {"role": "assistant", "content": "".join(t)},
                               "finish_reason": info["finish_reason"]} for i, (t, info) in enumerate(zip(texts, infos))]
        else:
            out["choices"] = [{"text": "".join(t), "index": i, "logprobs": None, "finish_reason": info["finish_reason"]}
                              for i, (t, info) in enumerate(zip(texts, infos))]
        prompt_tokens = sum(i["prompt_tokens"] for i in infos)
        completion_tokens = sum(i["completion_tokens"] for i in infos)
        out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens}
        return out

    async def events(self, plan: Plan, job: Job) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text piece, a chunk with finish_reason per choice, [DONE]."""
        chat = plan.kind == "chat.completion"
        head = self._head("chat.completion.chunk" if chat else "text_completion")

        def event(i: int, delta: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": i, "delta": d, "finish_reason": finish}
            else:
                choice = {"text": delta or "", "index": i, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        if chat:
            for i in range(len(plan.tasks)):
                yield event(i, None, first=True)
        while (ev := await job.next()) is not END:
            if ev[0] == "piece":
                yield event(ev[1], ev[2])
            elif ev[0] == "done":
                yield event(ev[1], None, ev[2]["finish_reason"])
            else:  # headers are sent: report in the stream
                kind = "server_error" if ev[1] >= 500 else "invalid_request_error"
                yield f"data: {json.dumps({'error': {'message': ev[2], 'type': kind}})}\n\n"
                return
        if not job.cancelled.is_set():
            yield "data: [DONE]\n\n"


async def _abandon_on_disconnect(receive, worker: GenerationWorker, job: Job) -> None:
    """Wait for the client to go away (ASGI ``http.disconnect``), then cancel its job."""
    while (await receive())["type"] != "http.disconnect":
        pass
    worker.abandon(job)


def create_app(server: Server):
    """The FastAPI application around a :class:`Server`."""
    optional_import("fastapi", "serve", "lmzoo serve")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    class EventStream(StreamingResponse):
        """A stream of server-sent events whose job is abandoned the moment its client disconnects.

        Starlette's own StreamingResponse notices a disconnect only on some ASGI versions and only
        between chunks; this one watches ``receive`` itself, so a dropped stream stops its generation
        even while no piece is being sent.
        """

        def __init__(self, chunks: AsyncIterator[str], job: Job):
            super().__init__(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.job = job

        async def __call__(self, scope, receive, send) -> None:
            watcher = asyncio.create_task(_abandon_on_disconnect(receive, server.worker, self.job))
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                watcher.cancel()
                server.worker.abandon(self.job)  # a finished job ignores this

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.worker.close(SHUTDOWN_GRACE_S)  # stop the generation in flight and the worker thread

    app = FastAPI(title="lmzoo", description="OpenAI-compatible endpoint for an lmzoo checkpoint", lifespan=lifespan)

    def error(e: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
        kind = {413: "request_too_large", 408: "timeout"}.get(
            e.status, "server_error" if e.status >= 500 else "invalid_request_error")
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers=headers)

    async def read_body(request: Request) -> bytes:
        raw = bytearray()
        async for chunk in request.stream():  # a chunked body without a length: stop at the limit
            raw += chunk
            if len(raw) > server.max_body_bytes:
                raise RequestError(f"request body exceeds the limit of {server.max_body_bytes} bytes", 413)
        return bytes(raw)

    async def handle(request: Request, prepare: Callable[[dict[str, Any]], Plan]) -> Any:
        try:
            server.check_access(request.headers, "POST", needs_key=True)
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > server.max_body_bytes:  # refuse before reading
                raise RequestError(f"request body of {declared} bytes exceeds the limit of {server.max_body_bytes}",
                                   413)
            try:  # a client that stops sending its body mid-way (slowloris) is cut off, not waited on forever
                raw = await asyncio.wait_for(read_body(request), server.read_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(f"request body not received within {server.read_timeout_s:g} s", 408) from None
            # parsing and checks run on the event loop: bounded by max_body_bytes, and no thread pool to exhaust
            plan = prepare(server.parse(raw))
            job = Job(plan.tasks, plan.stream)
            server.worker.submit(job)
        except RequestError as e:
            return error(e)
        except QueueFull as e:
            return error(RequestError(str(e), 503, code="server_busy"), headers={"Retry-After": "1"})
        if plan.stream:
            return EventStream(server.events(plan, job), job)
        watcher = asyncio.create_task(_abandon_on_disconnect(request.receive, server.worker, job))
        try:
            return JSONResponse(await server.collect(plan, job))
        except RequestError as e:
            return error(e)
        finally:  # answered, failed, or cancelled with the connection: the job is over either way
            watcher.cancel()
            server.worker.abandon(job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, server.completions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, server.chat)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            server.check_access(request.headers, "GET", needs_key=True)
        except RequestError as e:
            return error(e)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "lmzoo"}]}

    @app.get("/health")
    async def health(request: Request):
        """Liveness for supervisors (no API key): 503 when the generation worker is stalled or dead."""
        try:
            server.check_access(request.headers, "GET", needs_key=False)
        except RequestError as e:
            return error(e)
        report = server.worker.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    app.state.server = server
    return app


def _protocol(read_timeout_s: float):
    """uvicorn's h11 protocol with a deadline on request headers (uvicorn has none: slowloris).

    A connection must deliver a request's headers within ``read_timeout_s`` of connecting, or of
    sending its first byte after a previous response; otherwise it is closed. (The body has its
    own deadline in the app; an idle keep-alive connection is closed by uvicorn's keep-alive timeout.)
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowClientTimeoutH11(H11Protocol):
        _header_timer = None

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(read_timeout_s, self._expired)

        def _expired(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._arm()
            super().data_received(data)
            if not self._between_requests() and self._header_timer is not None:  # headers are in
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return SlowClientTimeoutH11


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          max_connections: int = DEFAULT_MAX_CONNECTIONS, api_key: str | None = None, **limits: Any) -> None:
    """Load ``checkpoint`` and serve it with uvicorn until SIGINT or SIGTERM (then exit cleanly).

    ``api_key`` (or the LMZOO_API_KEY environment variable, which keeps it out of the process list):
    required as ``Authorization: Bearer <key>`` on every /v1 request. ``limits``: the keyword
    arguments of :class:`Server` (``model_name`` defaults to the checkpoint's own name:
    lmzoo.formats.load.display_name). Slow clients are cut off (``read_timeout_s`` for headers and
    again for the body; idle keep-alive connections after 5 s); more than ``max_connections`` at once
    get 503; on SIGTERM requests in flight get SHUTDOWN_GRACE_S to finish, then the process exits
    with code 0.
    """
    uvicorn = optional_import("uvicorn", "serve", "lmzoo serve")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if max_connections <= 0:
        raise ConfigError(f"--max-connections must be positive, got {max_connections}")
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    from lmzoo.common import resolve_device
    from lmzoo.formats.load import display_name, load_any

    model, tok = load_any(checkpoint, device=str(resolve_device(device)))
    server = Server(model, tok, model_name=limits.pop("model_name", None) or display_name(checkpoint),
                    api_key=api_key, bound_host=host, **limits)
    app = create_app(server)
    if _host_name(host) not in LOOPBACK and api_key is None:
        print(f"lmzoo serve: listening on {host} without an API key: anyone who can reach it can use it "
              f"(set {API_KEY_ENV})", flush=True)
    print(f"lmzoo serve: http://{host}:{port}/v1 (model {server.model_name}, max_tokens <= "
          f"{server.max_tokens_limit}{', API key required' if api_key else ''})", flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; handled here, it ends serve() normally
    # and `lmzoo serve` exits 0 (a supervisor's SIGTERM is the normal way to stop a server)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", http=_protocol(server.read_timeout_s),
                    timeout_keep_alive=5, limit_concurrency=max_connections,
                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("lmzoo serve: stopped", flush=True)
