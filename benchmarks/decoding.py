"""Parallel decoders on CPU: tokens per forward pass and wall-clock speed-up over greedy decoding.

Trains on character-level tiny Shakespeare (the same budget for each model):

- the target: the CPU char GPT (4 layers, 128 wide), context 128;
- a draft: 1 layer, 64 wide (about 1/15 of the target's compute);
- a multi-token-prediction model: the target's architecture with n = 4 heads (trunk of 3 blocks,
  heads of 1 block each), trained with the summed loss and the sequential backward.

Then, on prompts of 16 characters cut from the val split, ``--new`` greedy tokens per prompt (one
prompt at a time, as in interactive use):

- ``greedy``: lmzoo.decoding.generate (one token per forward pass, KV cache);
- ``speculative``: the draft proposes k tokens, the target verifies (greedy: identical output);
  also sampled at temperature 1 for the acceptance rate;
- ``jacobi``: fixed-point iteration over blocks of 16 tokens (identical output);
- ``mtp``: self-speculative decoding with the MTP model's heads (identical to its own greedy);
- ``mtp_backward_memory``: peak bytes held for backward, naive summed loss vs sequential heads;
- ``cllm``: Jacobi iterations per block before and after consistency training of the target on
  Jacobi trajectories of train prompts (Kou et al. 2024), with the LM loss added.

Every output is checked against greedy decoding token for token. One JSON line per measurement.

    python benchmarks/decoding.py --steps 500 --new 96
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lmzoo
from lmzoo.data import TokenLoader, load_meta, prepare
from lmzoo.decoding.jacobi import Trajectory, consistency_train, jacobi_generate
from lmzoo.decoding.speculative import speculative_generate
from lmzoo.models.mtp import MultiTokenLM, self_speculative_generate
from lmzoo.train import TrainConfig, Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"  # the lmzoo workspace
RECIPE = dict(
    model="gpt2-char-cpu", batch_size=12, block_size=128, lr=1e-3, min_lr=1e-4, warmup_steps=50,
    eval_iters=20, device="cpu", dtype="float32", progress=False, sample_tokens=0,
)


def train(name: str, data_dir: Path, work: Path, steps: int, threads: int, model_args: dict, mtp: int = 0):
    cfg = TrainConfig.from_dict({**RECIPE, "model_args": {"block_size": 128, **model_args},
                                 "data_dir": str(data_dir), "out_dir": str(work / name), "max_steps": steps,
                                 "eval_interval": steps, "threads": threads, "multi_token": mtp or 1})
    trainer = Trainer(cfg)  # multi_token > 1: a MultiTokenLM with that many heads
    t0 = time.time()
    summary = trainer.train()
    rec = {"bench": "decoding", "what": "train", "model": name, "params": trainer.model.num_params(),
           "steps": steps, "val_loss": round(summary["val_loss"], 4), "wall_s": round(time.time() - t0, 1)}
    if mtp:
        x, y = trainer.val_loader.next_batch()
        with torch.no_grad():
            aux = trainer.model.eval()(x, y).aux
        rec.update({k: round(v.item(), 4) for k, v in aux.items()})
    print(json.dumps(rec), flush=True)
    return trainer.model.eval(), trainer


class _Meter:
    """Bytes of the tensors autograd holds for backward, live and at their peak (saved_tensors_hooks)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        meter, n = self, t.numel() * t.element_size()

        class Held:  # freed with the graph that saved it: counts down when the graph goes
            def __init__(self):
                self.t = t
                meter.live += n
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= n

        return Held()


def backward_memory(n_future: int, vocab: int, batch: int, seq: int) -> dict:
    """Peak bytes held for backward by one training step of an MTP model, naive vs sequential heads."""
    torch.manual_seed(0)
    m = MultiTokenLM(lmzoo.build("gpt2-char-cpu", vocab_size=vocab, block_size=seq), n_future=n_future)
    x, y = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))
    out = {}
    for efficient in (False, True):
        m.memory_efficient = efficient
        meter = _Meter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda held: held.t):
            m(x, y).loss.backward()
        out["sequential" if efficient else "naive"] = meter.peak
        m.zero_grad(set_to_none=True)
    # the sequential version also keeps the heads' gradients and dL/dh from forward to backward
    kept = sum(p.numel() for p in m.head_parameters()) * 4 + batch * seq * m.config.n_embd * 4
    return {"bench": "decoding", "what": "mtp_backward_memory", "n_future": n_future, "vocab": vocab,
            "batch": batch, "seq": seq, "saved_bytes_naive": out["naive"], "saved_bytes_sequential": out["sequential"],
            "grad_bytes_kept_by_sequential": kept, "ratio": round((out["sequential"] + kept) / out["naive"], 3)}


def timed(fn, prompts, reps: int):
    """Median wall time over ``reps`` passes over the prompts; returns (outputs, stats list, seconds)."""
    times, outs = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        res = [fn(p) for p in prompts]
        times.append(time.perf_counter() - t0)
        outs = res
    return outs, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=SHAKESPEARE, help="tiny Shakespeare text file")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--new", type=int, default=96, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--block", type=int, default=16, help="Jacobi block")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cllm-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-vocab", type=int, default=50304, help="vocabulary of the MTP backward-memory lines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": args.threads, "new_tokens": args.new, "prompts": args.prompts}
    for n in (1, 4):  # memory first: the sequential backward against the naive summed loss (GPT-2's vocabulary)
        print(json.dumps({**backward_memory(n, args.memory_vocab, 4, 128), **env}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = prepare(str(args.input), work / "data", tokenizer="char", progress=False)
        target, t_trainer = train("target", data_dir, work, args.steps, args.threads, {})
        draft, _ = train("draft", data_dir, work, args.steps, args.threads, {"n_layer": 1, "n_embd": 64})
        mtp, _ = train("mtp4", data_dir, work, args.steps, args.threads, {}, mtp=4)
        meta = load_meta(data_dir)
        val = np.memmap(data_dir / "val.bin", dtype=meta["dtype"], mode="r")
        train_ids = np.memmap(data_dir / "train.bin", dtype=meta["dtype"], mode="r")
        rng = np.random.default_rng(0)
        prompts = [val[i : i + 16].astype(int).tolist() for i in rng.integers(0, len(val) - 16, args.prompts)]
        N = args.new
        torch.set_num_threads(args.threads)

        def report(what: str, model_name: str, outs, secs: float, base_secs: float, ref, extra: dict) -> None:
            tokens, steps = sum(s.tokens for _, s in outs), sum(s.steps for _, s in outs)
            acc = [a for _, s in outs for a in s.accepted]
            rec = {"bench": "decoding", "what": what, "model": model_name, "identical_to_greedy": None,
                   "tokens_per_forward": round(tokens / steps, 3),
                   "mean_accepted_per_step": round(sum(acc) / len(acc), 3),
                   "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs, 1),
                   "speedup_vs_greedy": round(base_secs / secs, 3), **extra, **env,
                   "loadavg": [round(v, 2) for v in os.getloadavg()]}
            if ref is not None:
                rec["identical_to_greedy"] = [o[0] for o, _ in outs] == ref
            print(json.dumps(rec), flush=True)

        # greedy baselines (target and the MTP model's own next-token head)
        greedy = lambda m: (lambda p: lmzoo.generate(m, [p], N, temperature=0)[0])  # noqa: E731
        ref, t_greedy = timed(greedy(target), prompts, args.reps)
        ref_mtp, t_greedy_mtp = timed(greedy(mtp.base), prompts, args.reps)
        print(json.dumps({"bench": "decoding", "what": "greedy", "model": "target", "seconds": round(t_greedy, 3),
                          "tokens_per_s": round(N * len(prompts) / t_greedy, 1), "mtp_base_seconds":
                          round(t_greedy_mtp, 3), **env, "loadavg": [round(v, 2) for v in os.getloadavg()]}))

        outs, secs = timed(lambda p: speculative_generate(target, draft, [p], N, k=args.k, temperature=0), prompts,
                           args.reps)
        report("speculative", "target+draft", outs, secs, t_greedy, ref, {"k": args.k, "temperature": 0})
        outs, secs = timed(lambda p: speculative_generate(target, draft, [p], N, k=args.k, temperature=1.0, seed=0),
                           prompts, args.reps)
        report("speculative", "target+draft", outs, secs, t_greedy, None, {"k": args.k, "temperature": 1.0})
        outs, secs = timed(lambda p: jacobi_generate(target, [p], N, block=args.block), prompts, args.reps)
        report("jacobi", "target", outs, secs, t_greedy, ref, {"block": args.block})
        outs, secs = timed(lambda p: self_speculative_generate(mtp, [p], N), prompts, args.reps)
        report("mtp_self_speculative", "mtp4", outs, secs, t_greedy_mtp, ref_mtp, {"n_future": 4})
        jac_before = [jacobi_generate(target, [p], N, block=args.block)[1] for p in prompts]

        # CLLM: trajectories of train prompts, consistency training, iterations on the val prompts again
        trajs: list[Trajectory] = []
        for i in rng.integers(0, len(train_ids) - 16, 48):
            jacobi_generate(target, [train_ids[i : i + 16].astype(int).tolist()], 64, block=args.block,
                            trajectories=trajs)
        loader = TokenLoader(data_dir, "train", 128, 12, seed=7)
        lm_batches = iter(loader.next_batch, None)
        val_before = t_trainer.evaluate(iters=50)
        t0 = time.time()
        log = consistency_train(target, trajs, lm_batches, steps=args.cllm_steps, lr=3e-4, ar_weight=1.0)
        train_s = time.time() - t0
        val_after = t_trainer.evaluate(iters=50)
        ref_after = [lmzoo.generate(target, [p], N, temperature=0)[0] for p in prompts]
        outs_j = [jacobi_generate(target, [p], N, block=args.block) for p in prompts]
        iters_before = [it for s in jac_before for it in s.iterations]
        iters_after = [it for _, s in outs_j for it in s.iterations]
        print(json.dumps({
            "bench": "decoding", "what": "cllm", "block": args.block, "trajectories": len(trajs),
            "train_steps": args.cllm_steps, "train_s": round(train_s, 1),
            "consistency_loss_first_last": [round(log[0]["consistency"], 3),
                                            round(statistics.mean(r["consistency"] for r in log[-20:]), 3)],
            "jacobi_iterations_per_block_before": round(statistics.mean(iters_before), 3),
            "jacobi_iterations_per_block_after": round(statistics.mean(iters_after), 3),
            "tokens_per_forward_before": round(sum(s.tokens for s in jac_before) / sum(s.steps for s in jac_before), 3),
            "tokens_per_forward_after": round(sum(s.tokens for _, s in outs_j) / sum(s.steps for _, s in outs_j), 3),
            "identical_to_greedy_after": [o[0] for o, _ in outs_j] == ref_after,
            "val_loss_before": round(val_before, 4), "val_loss_after": round(val_after, 4), **env,
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        }), flush=True)


if __name__ == "__main__":
    main()
