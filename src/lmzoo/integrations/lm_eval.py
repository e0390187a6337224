"""An adapter so the EleutherAI lm-evaluation-harness (``lm_eval``) evaluates any lmzoo checkpoint.

    import lm_eval
    from lmzoo.integrations.lm_eval import LmzooLM
    lm_eval.simple_evaluate(model=LmzooLM("runs/latest"), tasks=["hellaswag"])
    # or, after importing this module: lm_eval --model lmzoo --model_args checkpoint=runs/latest ...

The harness asks three things of a model, all answered with lmzoo's own pieces:

- ``loglikelihood(context, continuation)``: the summed log-probability of the continuation's tokens
  and whether greedy decoding would have produced them (multiple-choice tasks);
- ``loglikelihood_rolling(text)``: the log-likelihood of a whole text, every token predicted from
  an end-of-text token onwards in windows of the model's context (perplexity tasks);
- ``generate_until(context, {until, max_gen_toks, temperature})``: generation with stop strings.

Needs ``pip install 'lmzoo[lm-eval]'`` (the harness); tests/test_lm_eval.py runs a local
multiple-choice task with it, offline.
"""

from __future__ import annotations

from typing import Any

import torch

from lmzoo.errors import ConfigError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # optional
    LM, register_model = object, None


class LmzooLM(LM):
    """``lm_eval`` model around an lmzoo checkpoint (or an already loaded model and tokenizer)."""

    def __init__(self, checkpoint: str | None = None, model=None, tokenizer=None, device: str = "cpu",
                 max_length: int | None = None, batch_size: int | str = 1, **_: Any):
        if register_model is None:
            raise ConfigError("the lm-eval adapter needs lm-eval: pip install 'lmzoo[lm-eval]'")
        super().__init__()
        if model is None:
            from lmzoo.formats.load import load_any

            if checkpoint is None:
                raise ConfigError("LmzooLM needs checkpoint=DIR or a model and its tokenizer")
            model, tokenizer = load_any(checkpoint, device=device)
        if tokenizer is None:
            raise ConfigError("the lm-eval adapter needs the checkpoint's tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        limit = model.max_positions()
        self.max_length = int(max_length or getattr(model.config, "block_size", None) or limit or 1024)
        self.eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0

    @torch.inference_mode()
    def _logprobs(self, ids: list[int], n_cont: int) -> tuple[float, bool]:
        """Sum of log p over the last ``n_cont`` tokens of ``ids`` (cut to the context from the left)."""
        ids = ids[-(self.max_length + 1):]
        n_cont = min(n_cont, len(ids) - 1)
        x = torch.tensor([ids[:-1]], device=self.model.device)
        logp = self.model(x).logits[0, -n_cont:].float().log_softmax(-1)
        target = torch.tensor(ids[-n_cont:], device=logp.device)
        greedy = bool((logp.argmax(-1) == target).all())
        return float(logp.gather(-1, target[:, None]).sum()), greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tokenizer.encode(context) if context else [self.eos]
            cont = self.tokenizer.encode(continuation)
            out.append(self._logprobs(ctx + cont, len(cont)) if cont else (0.0, True))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lmzoo.evaluation.evaluate import sequence_nll

        out = []
        for req in requests:
            ids = [self.eos] + self.tokenizer.encode(req.args[0])
            out.append(-sequence_nll(self.model, ids, self.max_length)[0] if len(ids) > 1 else 0.0)
        return out

    def generate_until(self, requests) -> list[str]:
        from lmzoo.serving.chat import stream_text

        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            max_new = int(kwargs.get("max_gen_toks", 256))
            out.append("".join(stream_text(self.model, self.tokenizer, context, max_new, until,
                                           temperature=temperature)))
        return out


if register_model is not None:
    register_model("lmzoo")(LmzooLM)
