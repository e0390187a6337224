"""`lmzoo serve` under load: many concurrent clients plus misbehaving ones, then SIGTERM.

    python benchmarks/serve_load.py --checkpoint RUN_DIR [--clients 200]

Starts `lmzoo serve` on loopback, then at once: ``clients`` well-formed greedy completions (their
answers checked against in-process ``lmzoo.generate``), and a few bad clients: malformed JSON,
oversized bodies (declared and chunked), slowloris (half the headers, then silence) and slow bodies
(headers, part of the body, silence). Then it opens one more stalled connection and sends SIGTERM.
Prints one JSON line: answers right / sent, p50/p99 latency, the server's RSS before, at its peak
during the load and after, how long slow clients were held, status codes of the bad clients, and the
exit code and time of the shutdown. tests/test_serve.py runs the same scenario with 50 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
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


def start_server(checkpoint: str, port: int, read_timeout: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmzoo", "serve", "--checkpoint", checkpoint, "--port", str(port), "--device",
           "cpu", "--max-tokens-limit", "48", "--max-body-bytes", "4096", "--template", "raw", "--read-timeout",
           str(read_timeout)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


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
        "chunked_oversized": [_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                                    b"\r\n\r\n" + b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(6)))
                              for _ in range(n_bad)],
        "slowloris": [_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-") for _ in range(n_bad)],
        "slow_body": [_http(port, _post(b'{"prompt": "the', length=200)) for _ in range(n_bad)],
    }
    bad_tasks = {k: [asyncio.create_task(c) for c in v] for k, v in bad.items()}
    results = await asyncio.gather(*good)
    bad_results = {k: await asyncio.gather(*v) for k, v in bad_tasks.items()}
    return {"good": results, "bad": bad_results}


def run_load(checkpoint: str, clients: int = 200, n_bad: int = 3, read_timeout: float = 2.0) -> dict:
    """The whole scenario; returns the figures (see the module docstring)."""
    import psutil

    expected = expected_answers(checkpoint)
    port = free_port()
    proc = start_server(checkpoint, port, read_timeout)
    try:
        for _ in range(480):  # up to 120 s to import torch and load the model on a busy machine
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.25)
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
        if proc.poll() is None:
            proc.kill()
            proc.wait()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="an lmzoo checkpoint or run directory with a tokenizer")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--bad", type=int, default=3, help="clients of each misbehaving kind")
    ap.add_argument("--read-timeout", type=float, default=2.0)
    a = ap.parse_args()
    if not Path(a.checkpoint).exists():
        sys.exit(f"serve_load: no such checkpoint: {a.checkpoint}")
    print(json.dumps({"bench": "serve_load", **run_load(a.checkpoint, a.clients, a.bad, a.read_timeout)}))


if __name__ == "__main__":
    main()
