"""`lmzoo serve` under load: many concurrent clients plus misbehaving ones, then SIGTERM.

    python benchmarks/serve_load.py [--checkpoint RUN_DIR] [--clients 200]          # scenario "load"
    python benchmarks/serve_load.py [--checkpoint RUN_DIR] --scenario mixed

Without ``--checkpoint`` it first trains the tests' tiny byte-level gpt2-debug run (tests/_tiny_run.py,
a few seconds) in a temporary directory. The server runs with OMP_NUM_THREADS=1 (docs/serve.md).

"load": starts `lmzoo serve` on loopback, then at once: ``clients`` well-formed greedy completions
(their answers checked against in-process ``lmzoo.generate``), and a few bad clients: malformed
JSON, oversized bodies (declared and chunked), slowloris (half the headers, then silence) and slow
bodies (headers, part of the body, silence). Then it opens one more stalled connection and sends
SIGTERM. Prints one JSON line: answers right / sent, p50/p99 latency, the server's RSS before, at
its peak during the load and after, how long slow clients were held, status codes of the bad
clients, and the exit code and time of the shutdown.

"mixed": the clients that wedge a server whose request handlers lock the model. After a warm-up,
the server's thread count and RSS are the baseline; then ``dropped`` streams that ask for the
longest answer the server allows and hang up after their first bytes; then ``plain`` plain and
``streams`` streaming completions at once, ``slow`` of the streams read by slow readers (one event
per ``slow_read_s``). Every answer is checked against in-process greedy decoding; the tokens the
dropped streams cost (from /health) against what they asked for; the thread count and RSS once the
server is idle against the baseline.

tests/test_serve.py runs both scenarios. benchmarks/record.py stores a run with its date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["the cat says", "the dog says", "the cow says", "the", "says moo"]
MAX_TOKENS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_answers(checkpoint: str) -> dict[str, str]:
    """Greedy continuations computed in-process with lmzoo.decoding.generate: what the server must answer."""
    import lmzoo
    from lmzoo.formats.checkpoint import load_tokenizer_of

    model, tok = lmzoo.load(checkpoint), load_tokenizer_of(checkpoint)
    out = {}
    for p in PROMPTS:
        ids = tok.encode(p)
        out[p] = tok.decode(lmzoo.generate(model, [ids], MAX_TOKENS, temperature=0)[0])
    return out


def start_server(checkpoint: str, port: int, read_timeout: float, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmzoo", "serve", "--checkpoint", checkpoint, "--port", str(port), "--device",
           "cpu", "--model-name", "tiny", "--max-tokens-limit", "48", "--max-body-bytes", "4096", "--template", "raw",
           "--read-timeout", str(read_timeout), *extra]  # later flags win: `extra` may raise the limits
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_listening(proc: subprocess.Popen, port: int, seconds: float = 120) -> None:
    """Until the server accepts connections (up to ``seconds``: importing torch on a busy machine)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"server did not listen within {seconds:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def tiny_checkpoint(root: Path) -> str:
    """The tiny byte-level gpt2-debug run the tests use (tests/_tiny_run.py), trained into ``root``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _tiny_run import tiny_run

    return str(tiny_run(root))


async def _http(port: int, raw: bytes, stall_after: bool = False, timeout: float = 120) -> tuple[int | None, float]:
    """Send ``raw`` bytes; (HTTP status or None if the server closed without one, seconds until it answered/closed)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), timeout)  # b"" when the server closes the socket
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
        return status, time.perf_counter() - t0
    finally:
        writer.close()


def _post(body: bytes, extra_headers: str = "", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {n}\r\n{extra_headers}\r\n").encode() + body


async def _good_client(port: int, prompt: str) -> tuple[str | None, float]:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_post(body) + b"")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        payload = json.loads(await reader.readexactly(length))
        text = payload["choices"][0]["text"] if head.startswith(b"HTTP/1.1 200") else None
        return text, time.perf_counter() - t0
    finally:
        writer.close()


def _rss_sampler(pid: int, samples: list[int], stop: threading.Event) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            samples.append(proc.memory_info().rss)
        except psutil.Error:
            return
        stop.wait(0.05)


async def _scenario(port: int, clients: int, n_bad: int) -> dict:
    good = [asyncio.create_task(_good_client(port, PROMPTS[i % len(PROMPTS)])) for i in range(clients)]
    bad = {
        "malformed": [_http(port, _post(b'{"prompt": "x",')) for _ in range(n_bad)],
        "oversized": [_http(port, _post(b"x" * 1000, length=10_000_000)) for _ in range(n_bad)],
        "chunked_oversized": [_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                    b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(6)))
                              for _ in range(n_bad)],
        "slowloris": [_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-") for _ in range(n_bad)],
        "slow_body": [_http(port, _post(b'{"prompt": "the', length=200)) for _ in range(n_bad)],
    }
    bad_tasks = {k: [asyncio.create_task(c) for c in v] for k, v in bad.items()}
    results = await asyncio.gather(*good)
    bad_results = {k: await asyncio.gather(*v) for k, v in bad_tasks.items()}
    return {"good": results, "bad": bad_results}


def run_load(checkpoint: str, clients: int = 200, n_bad: int = 3, read_timeout: float = 2.0) -> dict:
    """The "load" scenario; returns the figures (see the module docstring)."""
    import psutil

    expected = expected_answers(checkpoint)
    port = free_port()
    proc = start_server(checkpoint, port, read_timeout, "--queue-size", str(clients + 1))
    try:
        wait_listening(proc, port)
        asyncio.run(_good_client(port, PROMPTS[0]))  # warm up (first request pays one-time costs)
        rss_before = psutil.Process(proc.pid).memory_info().rss
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_rss_sampler, args=(proc.pid, samples, stop), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        out = asyncio.run(_scenario(port, clients, n_bad))
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        rss_after = psutil.Process(proc.pid).memory_info().rss

        # one more stalled connection, then SIGTERM: it must not hold the shutdown up
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        t_term = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        shutdown_s = time.perf_counter() - t_term
        stalled.close()
    finally:
        stop_server(proc)
    lat = sorted(t for _, t in out["good"])
    right = sum(text == expected[PROMPTS[i % len(PROMPTS)]] for i, (text, _) in enumerate(out["good"]))
    return {
        "clients": clients, "answered_right": right, "wall_s": round(wall, 2),
        "p50_s": round(lat[len(lat) // 2], 3), "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3),
        "rss_before_mb": round(rss_before / 2**20, 1), "rss_peak_mb": round(max(samples or [rss_after]) / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "bad_status": {k: sorted({s for s, _ in v}, key=str) for k, v in out["bad"].items()},
        "slow_held_s": round(max(t for k in ("slowloris", "slow_body") for _, t in out["bad"][k]), 2),
        "read_timeout_s": read_timeout, "shutdown_exit_code": code, "shutdown_s": round(shutdown_s, 2),
    }


# -- "mixed": dropped streams, plain and streaming requests at once, slow readers ----------------------


def _sse_text(lines: list[str]) -> str | None:
    """The text of a completed stream's events; None unless it ended with [DONE]."""
    if not lines or lines[-1] != "data: [DONE]":
        return None
    return "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1])


async def _mixed_plain(client, prompt: str) -> str | None:
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    return r.json()["choices"][0]["text"] if r.status_code == 200 else None


async def _mixed_stream(client, prompt: str, slow_read_s: float = 0.0) -> str | None:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None
        lines = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
                await asyncio.sleep(slow_read_s)  # a slow reader: the server must not wait for it
    return _sse_text(lines)


async def _dropped_stream(client, max_tokens: int) -> bool:
    """Ask for the longest answer, hang up after the first bytes of the body; True if some arrived."""
    body = {"prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for _ in r.aiter_raw():
            return True  # leaving the block closes the connection mid-stream
    return False


async def _wait_idle(client, seconds: float = 60) -> dict:
    """/health once nothing is running or waiting (the dropped and abandoned work included)."""
    deadline = time.monotonic() + seconds
    while True:
        h = (await client.get("/health")).json()
        if (not h["busy"] and h["queued"] == 0) or time.monotonic() > deadline:
            return h
        await asyncio.sleep(0.05)


async def _mixed(port: int, plain: int, streams: int, slow: int, dropped: int, slow_read_s: float,
                 drop_tokens: int, measure) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=plain + streams + dropped + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120) as client:
        await _mixed_plain(client, PROMPTS[0])  # warm-up: the worker thread and torch's threads exist now
        await _mixed_stream(client, PROMPTS[1])
        base, before = await _wait_idle(client), measure()
        t0 = time.perf_counter()
        got_bytes = await asyncio.gather(*[_dropped_stream(client, drop_tokens) for _ in range(dropped)])
        after_drops = await _wait_idle(client)
        drop_s = time.perf_counter() - t0

        async def timed(coro):
            t = time.perf_counter()
            return await coro, time.perf_counter() - t

        t0 = time.perf_counter()
        jobs = [timed(_mixed_plain(client, PROMPTS[i % len(PROMPTS)])) for i in range(plain)]
        jobs += [timed(_mixed_stream(client, PROMPTS[i % len(PROMPTS)], slow_read_s if i < slow else 0.0))
                 for i in range(streams)]
        results = await asyncio.gather(*jobs)
        wall = time.perf_counter() - t0
        end = await _wait_idle(client)
        await asyncio.sleep(0.5)  # let the last connections' tasks finish before counting threads
        after = measure()
    return {"base": base, "before": before, "after": after, "got_bytes": got_bytes, "after_drops": after_drops,
            "drop_s": drop_s, "results": results, "wall": wall, "end": end}


def run_mixed(checkpoint: str, plain: int = 50, streams: int = 50, slow: int = 5, dropped: int = 20,
              slow_read_s: float = 0.5, drop_tokens: int = 512) -> dict:
    """The "mixed" scenario; returns the figures (see the module docstring)."""
    import psutil

    expected = expected_answers(checkpoint)
    port = free_port()
    proc = start_server(checkpoint, port, 10.0, "--max-tokens-limit", str(drop_tokens), "--queue-size",
                        str(plain + streams + dropped))
    try:
        wait_listening(proc, port)
        ps = psutil.Process(proc.pid)

        def measure() -> dict:
            return {"threads": ps.num_threads(), "rss": ps.memory_info().rss}

        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_rss_sampler, args=(proc.pid, samples, stop), daemon=True)
        sampler.start()
        out = asyncio.run(_mixed(port, plain, streams, slow, dropped, slow_read_s, drop_tokens, measure))
        stop.set()
        sampler.join()
    finally:
        stop_server(proc)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(plain)] + [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    right = [text == expected[p] for p, (text, _) in zip(prompts, out["results"])]
    slow_s = [t for (_, t) in out["results"][plain:plain + slow]]
    others_s = [t for (_, t) in out["results"][:plain] + out["results"][plain + slow:]]
    mb = 2**20
    return {
        "plain": plain, "streams": streams, "slow_readers": slow, "slow_read_s": slow_read_s, "dropped": dropped,
        "answered_right": sum(right), "answered_right_plain": sum(right[:plain]),
        "answered_right_streams": sum(right[plain:]), "dropped_got_bytes": sum(out["got_bytes"]),
        "dropped_cancelled": out["after_drops"]["cancelled"] - out["base"]["cancelled"],
        "dropped_tokens": out["after_drops"]["tokens"] - out["base"]["tokens"],
        "dropped_tokens_asked": dropped * drop_tokens, "dropped_s": round(out["drop_s"], 2),
        "wall_s": round(out["wall"], 2), "others_max_s": round(max(others_s), 2),
        "slow_readers_min_s": round(min(slow_s), 2) if slow_s else None,
        "idle_after": not out["end"]["busy"] and out["end"]["queued"] == 0,
        "threads_before": out["before"]["threads"], "threads_after": out["after"]["threads"],
        "rss_before_mb": round(out["before"]["rss"] / mb, 1), "rss_peak_mb": round(max(samples, default=0) / mb, 1),
        "rss_after_mb": round(out["after"]["rss"] / mb, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None,
                    help="an lmzoo checkpoint or run directory with a tokenizer (default: train the tests' tiny run)")
    ap.add_argument("--scenario", choices=["load", "mixed"], default="load")
    ap.add_argument("--clients", type=int, default=200, help="load: well-formed clients")
    ap.add_argument("--bad", type=int, default=3, help="load: clients of each misbehaving kind")
    ap.add_argument("--read-timeout", type=float, default=2.0, help="load: the server's --read-timeout")
    ap.add_argument("--plain", type=int, default=50, help="mixed: plain completions at once")
    ap.add_argument("--streams", type=int, default=50, help="mixed: streaming completions at once")
    ap.add_argument("--slow", type=int, default=5, help="mixed: how many of the streams read slowly")
    ap.add_argument("--dropped", type=int, default=20, help="mixed: streams dropped after their first bytes")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.checkpoint is None:
            with contextlib.redirect_stdout(sys.stderr):  # training's progress lines: not this script's output
                a.checkpoint = tiny_checkpoint(Path(tmp))
        elif not Path(a.checkpoint).exists():
            sys.exit(f"serve_load: no such checkpoint: {a.checkpoint}")
        if a.scenario == "load":
            figures = run_load(a.checkpoint, a.clients, a.bad, a.read_timeout)
        else:
            figures = run_mixed(a.checkpoint, a.plain, a.streams, a.slow, a.dropped)
    print(json.dumps({"bench": f"serve_{a.scenario}", **figures}))


if __name__ == "__main__":
    main()
