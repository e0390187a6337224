"""Batch-1 greedy decoding of SmolLM2-135M on a CPU: lmzoo's fast path against transformers' float32
``generate``, in one process, interleaved (prints JSON lines).

    python benchmarks/cpu_decode_real.py [--new-tokens 48] [--rounds 5] [--threads 1] [--ppl-tokens 2048]

At batch 1 each new token reads every weight once, so decoding is bound by bytes read per token over the
memory bandwidth. lmzoo's fast path reads fewer bytes: int8 weight-only linears (per-row scales) for every
block and the tied head, ``load_any(name, quantize="int8")`` (lmzoo.quant.int8; ``lmzoo generate --quantize
int8``). Also measured: lmzoo in float32 (the same arithmetic as transformers) and with bfloat16 weights
(``--dtype bf16``). Each round decodes the same prompt with every system in turn; the figures are medians
over rounds. Perplexity is on the first ``--ppl-tokens`` of tiny Shakespeare's val split (SmolLM2's tokens,
windows of 512). ``bandwidth_share`` = bytes of weights read per token x tokens/s / the matrix-vector
bandwidth measured here (a float32 matrix of 256 MiB times a vector). The last line holds the keys
``lmzoo_tok_s``, ``hf_tok_s``, ``ratio``, ``ppl_fp32``, ``ppl_fast``, ``path``, ``bandwidth_share``; then a
``table`` record (docs/real-models.md, results/real-models/cpu-decode.jsonl).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import MODEL, ROOT, data_dir, emit, evaluate, hf_smol, load_smol, split_tokens, table  # noqa: E402

PATH = ("int8 weight-only linears (torch.ops.aten._weight_int8pack_mm, bfloat16 activations inside the "
        "product) on every block and the head; float32 elsewhere")


def bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: all the weights (``weight_bytes``: quantized layers' included),
    except an embedding table that is not also the head's weight, of which a lookup reads one row."""
    head = getattr(model, "head", None)
    head_weight = head.weight if type(head) is nn.Linear else None
    tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)
              and m.weight is not head_weight}
    return model.weight_bytes() - sum((t.numel() - t.shape[-1]) * t.element_size() for t in tables.values())


def matvec_bandwidth(repeats: int = 9) -> float:
    """Bytes/s of a float32 matrix-vector product over a 256 MiB matrix (median of ``repeats``)."""
    w = torch.randn(16384, 4096)
    x = torch.randn(4096)
    torch.mv(w, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mv(w, x)
        times.append(time.perf_counter() - t0)
    return w.numel() * 4 / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, the same for both systems")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "real-models")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    emit(experiment="cpu-decode", **{k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
         load_avg=[round(x, 2) for x in os.getloadavg()])
    from lmzoo.decoding.generate import generate
    from lmzoo.formats.load import load_any

    fp32, tok = load_smol()
    systems = {"lmzoo int8": load_any(MODEL, quantize="int8")[0], "lmzoo bf16": load_smol(dtype=torch.bfloat16)[0],
               "lmzoo fp32": fp32}
    hf = hf_smol()
    ids = split_tokens(data_dir(a.work, "shakespeare"), a.ppl_tokens)
    ppl = {name: evaluate(m, tok, ids, 512).perplexity for name, m in systems.items()}
    emit(perplexity=ppl, tokens=len(ids) - 1)
    bw = matvec_bandwidth()
    prompt = ids[: a.prompt_tokens].tolist()
    x = torch.tensor([prompt])
    n = a.new_tokens
    speeds: dict[str, list[float]] = {"transformers fp32": [], **{k: [] for k in systems}}
    tokens: dict[str, list[int]] = {}
    for r in range(a.rounds):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=tok.eos_id)
        speeds["transformers fp32"].append(n / (time.perf_counter() - t0))
        tokens["transformers fp32"] = out[0, len(prompt):].tolist()
        for name, m in systems.items():
            t0 = time.perf_counter()
            tokens[name] = generate(m, [prompt], n, temperature=0)[0]
            speeds[name].append(n / (time.perf_counter() - t0))
        emit(round=r, tok_s={k: round(v[-1], 2) for k, v in speeds.items()}, load_avg=os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in speeds.items()}
    wbytes = {name: bytes_per_token(m) for name, m in systems.items()}
    hf_weights = {id(t): t for t in hf.parameters()}.values()  # the tied head once: it reads the whole table
    wbytes["transformers fp32"] = sum(t.numel() * t.element_size() for t in hf_weights)
    share = {k: wbytes[k] * med[k] / bw for k in med}
    emit(tok_s=med, bytes_per_token=wbytes, bandwidth_share=share, matvec_gb_s=bw / 1e9,
         same_greedy_tokens_as_transformers={k: v == tokens["transformers fp32"] for k, v in tokens.items()})
    fast, hf_tps = med["lmzoo int8"], med["transformers fp32"]
    emit(lmzoo_tok_s=fast, hf_tok_s=hf_tps, ratio=fast / hf_tps, ppl_fp32=ppl["lmzoo fp32"], ppl_fast=ppl["lmzoo int8"],
         ppl_rel_change=ppl["lmzoo int8"] / ppl["lmzoo fp32"] - 1, path=PATH, bandwidth_share=share["lmzoo int8"],
         threads=a.threads, new_tokens=n, rounds=a.rounds, load_avg=[round(x, 2) for x in os.getloadavg()])
    rows = []
    for name in ("transformers fp32", "lmzoo fp32", "lmzoo bf16", "lmzoo int8"):
        rows.append([name, f"{med[name]:.2f}", f"{med[name] / hf_tps:.2f}x", f"{wbytes[name] / 2**20:.1f} MiB",
                     f"{share[name] * 100:.0f}%", f"{ppl[name]:.3f}" if name in ppl else "—"])
    table(["system", "tokens/s (median)", "vs transformers fp32", "weight bytes per token", "bandwidth share",
           "perplexity"], rows)


if __name__ == "__main__":
    main()
