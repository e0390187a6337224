"""``lmzoo serve``: an OpenAI-compatible HTTP endpoint for a checkpoint (FastAPI + uvicorn).

Endpoints (the subset of OpenAI's API a base model can honour; docs/serve.md):

- ``POST /v1/completions``: ``prompt`` (a string or a list of strings), ``max_tokens`` (default 16),
  ``temperature`` (default 1; 0 = greedy), ``top_p``, ``top_k`` (an extension), ``stop`` (a string or
  a list), ``seed``, ``stream``.
- ``POST /v1/chat/completions``: ``messages`` turned into a transcript (lmzoo.serving.chat.format_chat);
  the same sampling fields; ``max_tokens`` (or ``max_completion_tokens``) defaults to the limit.
- ``GET /v1/models``, ``GET /health``.

Streaming answers are server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``.

Limits, and why: the server binds to 127.0.0.1 unless told otherwise (it has no authentication);
a request body over ``max_body_bytes`` is refused with 413 before it is parsed; ``max_tokens``
above ``max_tokens_limit`` is refused with 400 (not silently clamped: a client asking for more
than it gets would see a truncated answer it did not ask for); malformed JSON, a bad field (checked
by lmzoo.decoding.generate.check_sampling, as everywhere) or a prompt with characters the tokenizer does not
know is a 400 with a message in OpenAI's error format, checked before a stream starts; no user input
gets a 500. Slow clients are cut off: a connection that has not sent
a request's headers within ``read_timeout_s`` is closed, a body not received within it is a 408, an
idle keep-alive connection closes after 5 s; beyond ``max_connections`` at once the answer is 503;
SIGTERM lets requests in flight finish (up to 5 s) and exits with code 0 (benchmarks/serve_load.py,
docs/reliability.md). One model serves all requests: a lock around
generation queues concurrent requests (each waits its turn; FastAPI runs them in worker threads),
so requests never interleave inside the model or its cache.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime
import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from lmzoo.decoding.generate import check_sampling, encode_prompt
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.serving.chat import format_chat, stream_text

DEFAULT_MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
DEFAULT_READ_TIMEOUT_S = 10.0  # to send a request's headers, and again its body
DEFAULT_MAX_CONNECTIONS = 1024  # open connections + requests in flight; beyond: 503
SHUTDOWN_GRACE_S = 5  # on SIGTERM, requests in flight get this long to finish


class RequestError(Exception):
    """A bad request: HTTP ``status`` with a one-line ``message`` for the client."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def _number(body: dict[str, Any], name: str, default: Any, kind: type, low: float | None = None,
            high: float | None = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", param=name)
    v = kind(v)
    if (low is not None and v < low) or (high is not None and v > high):
        raise RequestError(f"'{name}' must be in [{low}, {high}], got {v}", param=name)
    return v


class Server:
    """The model, its tokenizer, the limits and the lock; request handling without any HTTP."""

    def __init__(self, model, tokenizer, model_name: str = "lmzoo", max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, template: str = "transcript",
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
        if tokenizer is None:
            raise ConfigError("serving needs the checkpoint's tokenizer, and none was saved with it")
        if max_tokens_limit <= 0 or max_body_bytes <= 0 or not read_timeout_s > 0:
            raise ConfigError("max_tokens_limit, max_body_bytes and read_timeout_s must be positive")
        self.read_timeout_s = float(read_timeout_s)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_tokens_limit, self.max_body_bytes, self.template = max_tokens_limit, max_body_bytes, template
        self.lock = threading.Lock()

    # -- parsing ------------------------------------------------------------------------------------
    def parse(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > self.max_body_bytes:
            raise RequestError(f"request body of {len(raw)} bytes exceeds the limit of {self.max_body_bytes}", 413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def sampling(self, body: dict[str, Any], default_max: int) -> tuple[int, list[str], dict[str, Any]]:
        """(max_tokens, stop strings, sampling kwargs) from a request, checked against the limits."""
        n = _number(body, "n", 1, int, 1)
        if n != 1:
            raise RequestError("only n=1 is supported", param="n")
        max_tokens = _number(body, "max_tokens", None, int, 1)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", default_max, int, 1)
        if max_tokens > self.max_tokens_limit:
            raise RequestError(f"max_tokens {max_tokens} exceeds this server's limit of {self.max_tokens_limit}",
                               param="max_tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise RequestError("'stop' must be a string or a list of up to 4 strings", param="stop")
        top_k = _number(body, "top_k", None, int, 1)
        kwargs = {"temperature": _number(body, "temperature", 1.0, float, 0.0, 2.0),
                  "top_p": _number(body, "top_p", None, float, 0.0, 1.0), "top_k": top_k,
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

    # -- generation (under the lock) ----------------------------------------------------------------
    def _pieces(self, prompt: str, max_tokens: int, stops: list[str], kwargs: dict, info: dict) -> Iterator[str]:
        with self.lock:  # one request in the model at a time; the others wait here
            try:
                yield from stream_text(self.model, self.tokenizer, prompt, max_tokens, stops, info, **kwargs)
            except LmzooError as e:  # any user-caused error (lmzoo.errors) is a 400, never a 500
                raise RequestError(str(e)) from None

    def _head(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.model_name}

    def completions(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[str]:
        prompts = body.get("prompt", "")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("'prompt' must be a string or a non-empty list of strings", param="prompt")
        max_tokens, stops, kwargs = self.sampling(body, 16)
        for p in prompts:  # every prompt checked before the first is generated (and before a stream starts)
            self.check_prompt(p, "prompt")
        if body.get("stream"):
            if len(prompts) > 1:
                raise RequestError("streaming takes a single prompt", param="prompt")
            return self._stream("text_completion", prompts[0], max_tokens, stops, kwargs)
        out, usage = self._head("text_completion"), {"prompt_tokens": 0, "completion_tokens": 0}
        out["choices"] = []
        for i, p in enumerate(prompts):
            info: dict[str, Any] = {}
            text = "".join(self._pieces(p, max_tokens, stops, kwargs, info))
            out["choices"].append({"text": text, "index": i, "logprobs": None, "finish_reason": info["finish_reason"]})
            usage["prompt_tokens"] += info["prompt_tokens"]
            usage["completion_tokens"] += info["completion_tokens"]
        out["usage"] = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        return out

    def chat(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[str]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
        try:
            prompt, stops = format_chat(messages, self.template)
        except ConfigError as e:
            raise RequestError(str(e), param="messages") from None
        max_tokens, extra_stops, kwargs = self.sampling(body, self.max_tokens_limit)
        self.check_prompt(prompt, "messages")
        stops = stops + extra_stops
        if body.get("stream"):
            return self._stream("chat.completion.chunk", prompt, max_tokens, stops, kwargs)
        info: dict[str, Any] = {}
        text = "".join(self._pieces(prompt, max_tokens, stops, kwargs, info))
        out = self._head("chat.completion")
        out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": info["finish_reason"]}]
        out["usage"] = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                        "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}
        return out

    def _stream(self, kind: str, prompt: str, max_tokens: int, stops: list[str], kwargs: dict) -> Iterator[str]:
        """Server-sent events: one chunk per text piece, a final chunk with finish_reason, [DONE]."""
        head, chat = self._head(kind), kind.startswith("chat")

        def event(delta: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"text": delta or "", "index": 0, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        def gen() -> Iterator[str]:
            info: dict[str, Any] = {}
            if chat:
                yield event(None, first=True)
            try:
                for piece in self._pieces(prompt, max_tokens, stops, kwargs, info):
                    yield event(piece)
            except RequestError as e:  # headers are sent: report in the stream
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'invalid_request_error'}})}\n\n"
                return
            yield event(None, info.get("finish_reason", "stop"))
            yield "data: [DONE]\n\n"

        return gen()


def create_app(server: Server):
    """The FastAPI application around a :class:`Server`."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.concurrency import run_in_threadpool
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError:
        raise ConfigError("lmzoo serve needs FastAPI and uvicorn: pip install 'lmzoo[serve]'") from None

    app = FastAPI(title="lmzoo", description="OpenAI-compatible endpoint for an lmzoo checkpoint")

    def error(e: RequestError) -> JSONResponse:
        kind = {413: "request_too_large", 408: "timeout"}.get(e.status, "invalid_request_error")
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": None}},
                            status_code=e.status)

    async def read_body(request: Request) -> bytes:
        raw = bytearray()
        async for chunk in request.stream():  # a chunked body without a length: stop at the limit
            raw += chunk
            if len(raw) > server.max_body_bytes:
                raise RequestError(f"request body exceeds the limit of {server.max_body_bytes} bytes", 413)
        return bytes(raw)

    async def handle(request: Request, method) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > server.max_body_bytes:  # refuse before reading
            return error(RequestError(f"request body of {declared} bytes exceeds the limit of "
                                      f"{server.max_body_bytes}", 413))
        try:  # a client that stops sending its body mid-way (slowloris) is cut off, not waited on forever
            raw = await asyncio.wait_for(read_body(request), server.read_timeout_s)
        except RequestError as e:
            return error(e)
        except asyncio.TimeoutError:
            return error(RequestError(f"request body not received within {server.read_timeout_s:g} s", 408))
        try:
            body = server.parse(raw)
            if not body.get("stream"):  # generation runs in a worker thread, off the event loop
                return await run_in_threadpool(method, body)
            # validated now (errors are HTTP errors); the generator runs in a worker thread as it is sent
            return StreamingResponse(method(body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        except RequestError as e:
            return error(e)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, server.completions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, server.chat)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "lmzoo"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

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
          max_connections: int = DEFAULT_MAX_CONNECTIONS, **limits: Any) -> None:
    """Load ``checkpoint`` and serve it with uvicorn until SIGINT or SIGTERM (then exit cleanly).

    Slow clients are cut off (``read_timeout_s`` for headers and again for the body; idle keep-alive
    connections after 5 s); more than ``max_connections`` at once get 503; on SIGTERM requests in
    flight get SHUTDOWN_GRACE_S to finish, then the process exits with code 0.
    """
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("lmzoo serve needs FastAPI and uvicorn: pip install 'lmzoo[serve]'") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if max_connections <= 0:
        raise ConfigError(f"--max-connections must be positive, got {max_connections}")
    from lmzoo.common import resolve_device
    from lmzoo.formats.load import load_any

    model, tok = load_any(checkpoint, device=str(resolve_device(device)))
    server = Server(model, tok, model_name=limits.pop("model_name", None) or model.family, **limits)
    app = create_app(server)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lmzoo serve: listening on {host}: the endpoint has no authentication", flush=True)
    print(f"lmzoo serve: http://{host}:{port}/v1 (model {server.model_name}, max_tokens <= "
          f"{server.max_tokens_limit})", flush=True)
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
