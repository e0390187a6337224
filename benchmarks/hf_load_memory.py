"""Time and memory of loading a full-size GPT-2 (124M) Hugging Face checkpoint (docs/checkpoints-hf.md).

The weights are a randomly initialized ``GPT2LMHeadModel(GPT2Config())`` (124,439,808 float32
parameters), saved in three forms: one ``model.safetensors``, safetensors shards of 200 MB, and
``pytorch_model.bin``. Each load runs in a fresh process, ``--runs`` times, the methods taking turns:

- ``from_hf``, each of the three forms;
- ``naive``: build the lmzoo model on the CPU (its initializers run), read the whole file into memory,
  rename it with the GPT-2 converter and ``load_state_dict`` it (a copy);
- ``transformers``: ``GPT2LMHeadModel.from_pretrained``.

Figures are increases over the process's state just before the load (torch, lmzoo and the method's own
library imported): ``rss_mib`` is the growth of ``ru_maxrss`` (a high-water mark, so it counts only what
rises above the imports' peak; file pages count while they are mapped), ``private_mib`` the peak of
``RssAnon`` from /proc/self/status sampled every 2 ms (the memory the tensors own). One JSON line per method with every
run's time and the largest memory figures.

    python benchmarks/hf_load_memory.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, threading, time
from pathlib import Path

method, path = sys.argv[1], Path(sys.argv[2])

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0

import torch, lmzoo  # what every method needs, imported before the baseline; the method's own library too
if method == "transformers":
    import transformers
elif method == "naive":
    from safetensors.torch import load_file
    from lmzoo.formats.hf import CONVERTERS

peak = [anon_kib()]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.002)
base_anon, base_rss = anon_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t0 = time.perf_counter()
if method == "transformers":
    model = transformers.GPT2LMHeadModel.from_pretrained(path)
elif method == "naive":  # the whole file in memory, renamed by the converter, copied into a built model
    conv = CONVERTERS["gpt2"]
    model = lmzoo.build("gpt2")
    cfg = model.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(conv.state_from_hf(load_file(str(path / "model.safetensors")).items(), cfg, expected))
    model.load_state_dict(state, strict=False)
else:
    model = lmzoo.from_hf(path)
seconds = time.perf_counter() - t0
done.set()
sampler.join()
peak[0] = max(peak[0], anon_kib())
print(json.dumps({"seconds": round(seconds, 2),
                  "rss_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024),
                  "private_mib": round((peak[0] - base_anon) / 1024),
                  "params": sum(p.numel() for p in model.parameters())}))
"""

METHODS = [("from_hf", "safetensors"), ("from_hf", "shards"), ("from_hf", "bin"), ("naive", "safetensors"),
           ("transformers", "safetensors")]


def save_forms(work: Path) -> dict[str, Path]:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    forms = {"safetensors": work / "safetensors", "shards": work / "shards", "bin": work / "bin"}
    model.save_pretrained(forms["safetensors"])
    model.save_pretrained(forms["shards"], max_shard_size="200MB")
    model.save_pretrained(forms["bin"], safe_serialization=False)
    return forms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        forms = save_forms(Path(tmp))
        results: dict[tuple[str, str], list[dict]] = {m: [] for m in METHODS}
        for _ in range(args.runs):
            for method, form in METHODS:
                res = subprocess.run([sys.executable, "-c", CHILD, method, str(forms[form])], capture_output=True,
                                     text=True, env={**os.environ, "LMZOO_NO_MEMORY_CHECK": "1"})
                if res.returncode != 0:
                    raise SystemExit(f"hf_load_memory: {method} {form} failed: {res.stderr.strip()[-400:]}")
                results[(method, form)].append(json.loads(res.stdout.strip().splitlines()[-1]))
        for (method, form), runs in results.items():
            times = [r["seconds"] for r in runs]
            print(json.dumps({"bench": "hf_load", "method": method, "form": form, "params": runs[0]["params"],
                              "seconds": times, "seconds_min": min(times), "seconds_max": max(times),
                              "rss_mib": max(r["rss_mib"] for r in runs),
                              "private_mib": max(r["private_mib"] for r in runs),
                              "load_avg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
