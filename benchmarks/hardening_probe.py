"""Bad files, bad settings and real disk faults at full size: how fast each is refused, and with what.

    python benchmarks/record.py results/hardening-probe.jsonl -- python benchmarks/hardening_probe.py

The tests (tests/test_hardening.py) check the same cases at small sizes; this script runs them at the
sizes an adversarial probe used, each in a fresh ``lmzoo`` process, and prints one JSON line per case:

    {"case": "config_json_3gb", "rc": 2, "wall_s": 0.01, "stderr": "lmzoo: error: ...", "lines": 1, ...}

Cases: a 3 GB ``config.json`` (sparse: no disk used) and a symlink to it; ``config.json`` and data
``meta.json`` of 100,000 nested brackets; a shard index of 300,000 names; the 9-level YAML alias bomb;
``--batch_size=10**9``; ``prepare --vocab-size 10**12``; a ``prepare`` killed with SIGKILL, then run
again. With root (to mount a tmpfs): a training run whose checkpoint fills a 1 MB file system, and one
whose file system is remounted read-only after its first checkpoint. ``wall_s`` includes the process
start (imports, about 2 s on the shared 2-core box); ``in_process_s`` times the refusal alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-c", "import sys; from lmzoo.cli import main; sys.exit(main(sys.argv[1:]))"]
TEXT = "the quick brown fox jumps over the lazy dog. " * 2000


def lmzoo(*args, cwd: Path | None = None, timeout: float = 600) -> dict:
    """Run ``lmzoo args`` in a child process: exit code, wall time, stderr's last line and line count."""
    t0 = time.perf_counter()
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    err = r.stderr.strip().splitlines()
    out = {"rc": r.returncode, "wall_s": round(time.perf_counter() - t0, 2), "lines": len(err),
           "traceback": "Traceback" in r.stderr, "stderr": (err[-1] if err else "")[:400]}
    if len(err) > 1:  # what else was said (a warning, a progress bar)
        out["stderr_head"] = [line[:200] for line in err[:3]]
    return out


def timed(fn) -> tuple[float, str]:
    """(seconds, error message) of a call expected to raise an LmzooError."""
    from lmzoo.errors import LmzooError

    t0 = time.perf_counter()
    try:
        fn()
    except LmzooError as e:
        return round(time.perf_counter() - t0, 4), str(e)[:400]
    return round(time.perf_counter() - t0, 4), "(no error)"


def untrusted_files(root: Path, emit) -> None:
    import lmzoo
    from lmzoo.config import read_yaml
    from lmzoo.data import load_meta, prepare
    from lmzoo.formats.tensors import weight_files
    from lmzoo.models import build
    from lmzoo.tokenizer import ByteTokenizer

    ckpt = root / "ckpt"
    lmzoo.save(build("gpt2-debug", vocab_size=257), ckpt, tokenizer=ByteTokenizer())
    (root / "corpus.txt").write_text(TEXT)
    data = prepare(str(root / "corpus.txt"), root / "data", tokenizer="byte", progress=False)

    huge = root / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(3 * 10**9)  # sparse: 3 GB long, no blocks on disk
    for case, how in (("config_json_3gb", "file"), ("config_json_3gb_symlink", "link")):
        d = root / case
        os.makedirs(d)
        for p in ckpt.iterdir():
            if p.name != "config.json":
                os.symlink(p, d / p.name)
        if how == "link":
            os.symlink(huge, d / "config.json")
        else:
            os.link(huge, d / "config.json")
        s, msg = timed(lambda d=d: lmzoo.load(d))
        emit({"case": case, "in_process_s": s, "error": msg, **lmzoo_cli("info", "--checkpoint", d)})
    huge.unlink()

    nested = "[" * 100_000 + "]" * 100_000
    d = root / "nested_ckpt"
    os.makedirs(d)
    (d / "config.json").write_text(nested)
    s, msg = timed(lambda: lmzoo.load(d))
    emit({"case": "config_json_nested_100k", "in_process_s": s, "error": msg, **lmzoo_cli("info", "--checkpoint", d)})
    meta = (data / "meta.json").read_text()
    (data / "meta.json").write_text(nested)
    s, msg = timed(lambda: load_meta(data))
    emit({"case": "meta_json_nested_100k", "in_process_s": s, "error": msg,
          **lmzoo_cli("eval", "--checkpoint", ckpt, "--data-dir", data, "--device", "cpu")})
    for field, value in (("format_version", "1"), ("dtype", "int8")):
        (data / "meta.json").write_text(json.dumps({**json.loads(meta), field: value}))
        emit({"case": f"meta_json_{field}_{value}", **lmzoo_cli("eval", "--checkpoint", ckpt, "--data-dir", data,
                                                               "--device", "cpu")})
    (data / "meta.json").write_text(meta)

    hf = root / "index"
    os.makedirs(hf)
    for distinct in (False, True):
        names = {f"model.layers.{i}.weight": f"model-{i if distinct else 0:06d}.safetensors" for i in range(300_000)}
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
        s, msg = timed(lambda: weight_files(hf))
        emit({"case": "shard_index_300k_names" + ("_distinct_shards" if distinct else "_one_shard"),
              "in_process_s": s, "error": msg})

    bomb = root / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n")
    s, msg = timed(lambda: read_yaml(bomb))
    emit({"case": "yaml_alias_bomb_9_levels", "bytes": bomb.stat().st_size, "in_process_s": s, "error": msg,
          **lmzoo_cli("train", "--config", bomb, cwd=root)})


def lmzoo_cli(*args, cwd: Path | None = None) -> dict:
    r = lmzoo(*args, cwd=cwd)
    return {f"cli_{k}": v for k, v in r.items()}


def bad_settings(root: Path, emit) -> None:
    data = root / "data"
    train = ["train", f"--data_dir={data}", f"--out_dir={root / 'run-bad'}", "--model=gpt2-debug", "--device=cpu",
             "--max_steps=2", "--progress=false", "--sample_tokens=0"]
    for setting in ("--batch_size=1000000000", "--lr=nan", "--grad_clip=nan", "--seed=" + "1" + "0" * 23,
                    "--threads=2000"):
        r = lmzoo(*train, setting)
        emit({"case": f"train {setting}", **r, "out_dir_written": (root / "run-bad").exists()})
    (root / "binary.bin").write_bytes(os.urandom(4096))
    for label, args in (("--batch-size -1", ["--data-dir", data, "--batch-size", "-1"]),
                        ("--max-tokens -5", ["--data-dir", data, "--max-tokens", "-5"]),
                        ("--task binary.bin", ["--task", root / "binary.bin"])):
        emit({"case": f"eval {label}", **lmzoo("eval", "--checkpoint", root / "ckpt", "--device", "cpu", *args)})
    for args in (["--tokenizer", "bpe", "--vocab-size", str(10**12)], ["--workers", "100000"]):
        emit({"case": "prepare " + " ".join(args), **lmzoo("prepare", root / "corpus.txt", "--out", root / "p",
                                                            *args)})


def killed_prepare(root: Path, emit) -> None:
    """SIGKILL a prepare of a 200 MB input once its temporary holds data, then run prepare again."""
    big = root / "big.txt"
    with open(big, "w") as f:
        for _ in range(200):
            f.write(TEXT[: 10**6 // 2] * 2)
    out = root / "killed"
    p = subprocess.Popen([*CLI, "prepare", str(big), "--out", str(out), "--tokenizer", "byte", "--workers", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left = 0
    for _ in range(600):
        time.sleep(0.1)
        tmps = list(out.glob(".prepare-*")) if out.exists() else []
        left = sum(f.stat().st_size for t in tmps for f in t.rglob("*") if f.is_file())
        if left > 50 << 20:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = lmzoo("prepare", root / "corpus.txt", "--out", out, "--tokenizer", "byte")
    emit({"case": "prepare_after_sigkill", "temporary_left_mb": round(left / 2**20, 1), **r,
          "temporaries_after": [t.name for t in out.glob(".prepare-*")]})
    big.unlink()


def disk_faults(root: Path, emit) -> None:
    """Real ENOSPC and EROFS from a tmpfs (needs root to mount one)."""
    if os.geteuid() != 0:
        emit({"case": "disk_full_and_read_only", "skipped": "needs root to mount a tmpfs"})
        return
    mnt = root / "mnt"
    mnt.mkdir()
    train = ["train", f"--data_dir={root / 'data'}", "--model=gpt2-debug", "--model.block_size=16", "--block_size=16",
             "--batch_size=2", "--eval_interval=0", "--eval_iters=1", "--progress=false", "--sample_tokens=0",
             "--device=cpu", "--ckpt_interval=2", "--keep_last=10"]
    try:
        # 1.2 MB: the run's first checkpoints fit (about 0.45 MB each), a later one does not
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)], check=True)
        r = lmzoo(*train, f"--out_dir={mnt / 'run'}", "--max_steps=20")
        latest = (mnt / "run" / "LATEST").read_text().strip() if (mnt / "run" / "LATEST").is_file() else None
        emit({"case": "disk_full_during_checkpoint", **r, "latest": latest,
              "leftover_temporaries": [p.name for p in (mnt / "run").glob(".*.tmp")]})
        subprocess.run(["umount", str(mnt)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
        r = lmzoo(*train, f"--out_dir={mnt / 'run'}", "--max_steps=2")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        r = lmzoo(*train, f"--out_dir={mnt / 'run'}", "--max_steps=4", "--resume")
        emit({"case": "read_only_run_directory_on_resume", **r, "mentions_free_space": "free space" in r["stderr"]})
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()

    def emit(rec: dict) -> None:
        print(json.dumps(rec), flush=True)

    with tempfile.TemporaryDirectory(prefix="lmzoo-probe-") as tmp:
        root = Path(tmp)
        untrusted_files(root, emit)
        bad_settings(root, emit)
        killed_prepare(root, emit)
        disk_faults(root, emit)


if __name__ == "__main__":
    main()
