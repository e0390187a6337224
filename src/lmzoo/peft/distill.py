"""Knowledge distillation (Hinton et al. 2015, arXiv:1503.02531; Kim & Rush 2016, arXiv:1606.07947).

**Word-level (Hinton).** A student learns from the teacher's whole next-token distribution, not only
from the one observed token. Both are softened with a temperature T (``softmax(z / T)``) so the small
probabilities the teacher gives to plausible alternatives ("dark knowledge") carry signal:

    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)

The ``T^2`` keeps the soft term's gradients at the same scale as the hard term's when T changes (the
gradient of the softened KL shrinks as 1/T^2). The teacher runs in eval mode under ``no_grad``.

**Sequence-level (Kim & Rush).** Train the student with plain CE on sequences the teacher *generates*
(greedy or beam); :func:`teacher_sequences` makes them. It approximates matching the teacher's
distribution over whole sequences, and needs no teacher at training time.

**Precomputed logits.** For a fixed dataset, :func:`save_teacher_topk` stores the teacher's top-k
logits per position (values float16 + indices int32, safetensors); the KL then runs over those k
entries, renormalized (the tail mass is dropped: an approximation that is close for k ~ 32-64).

Teacher and student must share the tokenizer. Training (:class:`DistillLoss`, the shared trainer's loss
hook) refuses different vocabulary sizes; the functions on logits compare the common prefix of the
vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmzoo.errors import ConfigError


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of ``KL(softmax(t/T) || softmax(s/T))``, in float32.

    ``student_logits``/``teacher_logits`` (..., V) (the last dim cut to the shorter vocabulary);
    ``mask`` (...) bool keeps positions (e.g. targets != -1). Returns a scalar (no T^2 factor).
    """
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = F.log_softmax(student_logits[..., :v].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[..., :v].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (...)
    if mask is not None:
        return kl[mask].mean() if mask.any() else kl.sum() * 0
    return kl.mean()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 alpha: float = 0.5, temperature: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``alpha * CE + (1 - alpha) * T^2 * KL`` and its parts ``{"ce", "kl"}``.

    ``student_logits`` (B, T, V), ``teacher_logits`` (B, T, V'), ``targets`` (B, T) with -1 ignored (both
    terms skip those positions).
    """
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ConfigError(f"alpha must be in [0, 1] and temperature > 0, got {alpha}, {temperature}")
    ce = F.cross_entropy(student_logits.reshape(-1, student_logits.size(-1)).float(), targets.reshape(-1),
                         ignore_index=-1)
    kl = kd_kl(student_logits, teacher_logits, temperature, targets != -1)
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def topk_kl(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL over the teacher's stored top-k entries: ``values``/``indices`` (..., k); both distributions are
    renormalized over those k tokens."""
    s = F.log_softmax(student_logits.float().gather(-1, indices.long()) / temperature, dim=-1)
    t = F.log_softmax(values.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def save_teacher_topk(teacher, inputs: torch.Tensor, path: str | Path, k: int = 32, batch_size: int = 16) -> Path:
    """Run ``teacher`` (eval, no_grad) over ``inputs`` (N, T) and write its top-k logits per position:
    ``values`` float16 (N, T, k), ``indices`` int32 (N, T, k), ``inputs`` (N, T) to ``path`` (safetensors)."""
    teacher.eval()
    device = next(teacher.parameters()).device
    vals, idxs = [], []
    for i in range(0, inputs.shape[0], batch_size):
        logits = teacher(inputs[i:i + batch_size].to(device)).logits
        v, ix = logits.float().topk(k, dim=-1)
        vals.append(v.half().cpu())
        idxs.append(ix.int().cpu())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"values": torch.cat(vals), "indices": torch.cat(idxs), "inputs": inputs.cpu().contiguous()},
              str(path))
    return path


def load_teacher_topk(path: str | Path) -> dict[str, torch.Tensor]:
    """``{"values", "indices", "inputs"}`` as written by :func:`save_teacher_topk`."""
    return load_file(str(path))


@torch.no_grad()
def teacher_sequences(teacher, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Sequence-level KD data (Kim & Rush): prompt + the teacher's greedy continuation, per prompt."""
    from lmzoo.decoding.generate import generate

    teacher.eval()
    outs = generate(teacher, prompts, max_new_tokens, temperature=0)
    return [p + o for p, o in zip(prompts, outs)]


class DistillLoss:
    """The shared trainer's loss hook for word-level distillation: ``Trainer(cfg, model=student,
    loss_fn=DistillLoss(teacher, alpha, temperature))``.

    Called as ``loss_fn(student, x, y, cache=None)``; returns the student's :class:`LMOutput` with
    ``loss`` = :func:`distill_loss` and ``aux`` {``ce``, ``kl``} (logged with each step). The teacher is
    frozen, in eval mode, run under ``no_grad`` (and moved to the batch's device on first use).
    ``alpha=1`` is plain training on the data. Given ``student``, the vocabulary sizes are checked (they
    must be equal) and a mixture-of-experts student keeps its router losses (weighted by its config).
    """

    def __init__(self, teacher, alpha: float = 0.5, temperature: float = 2.0, student=None):
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ConfigError(f"alpha must be in [0, 1] and temperature > 0, got {alpha}, {temperature}")
        if student is not None:
            check_vocab(teacher, student)
        cfg = getattr(student, "config", None)
        self.router_weights = (getattr(cfg, "moe_aux_weight", 0.0), getattr(cfg, "moe_z_weight", 0.0))
        self.teacher, self.alpha, self.temperature = teacher.eval(), alpha, temperature
        for p in teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, cache=None):
        from lmzoo.layers.moe import add_router_losses
        from lmzoo.models.base import LMOutput

        out = model(x, cache=cache)  # no targets: the full logits (a model may chunk its own CE)
        if next(self.teacher.parameters()).device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            t_logits = self.teacher(x).logits
        loss, parts = distill_loss(out.logits, t_logits, y, self.alpha, self.temperature)
        aux = {**(out.aux or {}), **parts}
        if "moe_balance" in aux:  # the router losses the model adds to its own training loss
            loss = add_router_losses(loss, aux, *self.router_weights)
        return LMOutput(out.logits, loss, aux)


def check_vocab(teacher, student) -> None:
    """ConfigError unless teacher and student have the same vocabulary size (both sizes named)."""
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise ConfigError(
            f"the teacher's vocab_size {vt} differs from the student's {vs}: distillation compares next-token "
            "distributions, so both must use the same tokenizer (and vocabulary size)"
        )
