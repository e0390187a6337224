"""Distillation: the KL term against a hand computation, the combined loss, top-k logits on disk."""

from __future__ import annotations

import math

import torch

import lmzoo
from lmzoo.peft.distill import distill_loss, kd_kl, load_teacher_topk, save_teacher_topk, topk_kl


def test_kl_term_equals_hand_computed_value():
    s = torch.tensor([[[1.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0]]])
    T = 2.0

    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax([0.0, 2.0, 0.0]), softmax([1.0, 0.0, 0.0])
    want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # KL(teacher || student) = 0.21308...
    assert abs(kd_kl(s, t, T).item() - want) < 1e-6
    assert abs(want - 0.213078) < 1e-5


def test_combined_loss_mixes_ce_and_scaled_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, :2] = -1
    loss, parts = distill_loss(s, t, y, alpha=0.3, temperature=3.0)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 11), y.reshape(-1), ignore_index=-1)
    kl = kd_kl(s, t, 3.0, y != -1)
    assert torch.allclose(loss, 0.3 * ce + 0.7 * 9.0 * kl)
    assert torch.allclose(parts["ce"], ce)
    assert distill_loss(t, t, y, alpha=0.0)[0].abs() < 1e-6  # student == teacher: no soft loss


def test_topk_logits_saved_and_used(tmp_path):
    torch.manual_seed(0)
    teacher = lmzoo.build("gpt2-debug")
    x = torch.randint(0, 97, (3, 8))
    data = load_teacher_topk(save_teacher_topk(teacher, x, tmp_path / "t.safetensors", k=97))
    assert data["values"].shape == (3, 8, 97) and data["values"].dtype == torch.float16
    # with k = the whole vocabulary, the top-k KL is the full KL (up to float16 storage)
    full = kd_kl(teacher(x).logits, teacher(x).logits)
    assert abs(topk_kl(teacher(x).logits, data["values"], data["indices"]).item() - full.item()) < 1e-3


def test_sequence_level_data_is_the_teachers_greedy_continuation():
    from lmzoo.generate import generate
    from lmzoo.peft.distill import teacher_sequences

    torch.manual_seed(0)
    teacher = lmzoo.build("gpt2-debug")
    seqs = teacher_sequences(teacher, [[1, 2, 3], [4, 5]], max_new_tokens=5)
    assert seqs[0][:3] == [1, 2, 3] and len(seqs[0]) == 8
    assert seqs[1][2:] == generate(teacher, [[4, 5]], 5, temperature=0)[0]
