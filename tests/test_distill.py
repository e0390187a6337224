"""Distillation: the KL term against a hand computation, the combined loss, top-k logits on disk, and
`lmzoo finetune --teacher` through the shared trainer."""

from __future__ import annotations

import json
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
    from lmzoo.decoding.generate import generate
    from lmzoo.peft.distill import teacher_sequences

    torch.manual_seed(0)
    teacher = lmzoo.build("gpt2-debug")
    seqs = teacher_sequences(teacher, [[1, 2, 3], [4, 5]], max_new_tokens=5)
    assert seqs[0][:3] == [1, 2, 3] and len(seqs[0]) == 8
    assert seqs[1][2:] == generate(teacher, [[4, 5]], 5, temperature=0)[0]


def _teacher_and_text(tmp_path, vocab_size=257):
    from lmzoo.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    lmzoo.save(lmzoo.build("gpt2-debug", vocab_size=vocab_size), tmp_path / "teacher", ByteTokenizer())
    text = tmp_path / "t.txt"
    text.write_text("a stitch in time saves nine; " * 300)
    return [f"--source={text}", "--tokenizer=byte", f"--data_dir={tmp_path / 'data'}", "--block_size=32",
            "--batch_size=4", "--eval_iters=1", "--warmup_steps=0", "--device=cpu", "--progress=false"]


def _train_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_cli_distills_through_the_trainer(tmp_path):
    """A student that starts equal to its teacher has KL 0 at step 1; the logged loss is
    alpha * CE + (1 - alpha) * T^2 * KL of its parts; a fresh preset student's distillation loss falls."""
    from lmzoo.cli.app import main

    common = _teacher_and_text(tmp_path)
    teacher = str(tmp_path / "teacher")
    same = ["finetune", teacher, "--method=full", f"--teacher={teacher}", "--kd-alpha=0.3", "--temperature=2",
            "--max_steps=2", f"--out_dir={tmp_path / 'same'}", *common]
    assert main(same) == 0
    first = _train_records(tmp_path / "same")[0]
    assert abs(first["kl"]) < 1e-6 and abs(first["loss"] - 0.3 * first["ce"]) < 1e-5

    fresh = ["finetune", "gpt2-debug", f"--teacher={teacher}", "--kd-alpha=0.5", "--temperature=2",
             "--max_steps=5", "--lr=3e-3", f"--out_dir={tmp_path / 'fresh'}", *common]
    assert main(fresh) == 0
    recs = _train_records(tmp_path / "fresh")
    for r in recs:
        assert abs(r["loss"] - (0.5 * r["ce"] + 0.5 * 4.0 * r["kl"])) < 1e-4
    assert recs[-1]["loss"] < recs[0]["loss"]
    student = lmzoo.load(tmp_path / "fresh")
    assert student.config.n_embd == 32 and student.config.vocab_size == 257  # the teacher's vocabulary

    # a mixture-of-experts student (another family layout than its teacher) keeps its router loss
    moe = ["finetune", "gpt2-moe-debug", f"--teacher={teacher}", "--max_steps=1", f"--out_dir={tmp_path / 'moe'}",
           *common]
    assert main(moe) == 0
    r, w = _train_records(tmp_path / "moe")[0], lmzoo.load(tmp_path / "moe").config.moe_aux_weight
    assert r["moe_balance"] > 0 and abs(r["loss"] - (0.5 * r["ce"] + 2.0 * r["kl"] + w * r["moe_balance"])) < 1e-4


def test_cli_refuses_a_teacher_with_another_vocabulary(tmp_path, capsys):
    from lmzoo.cli.app import main
    from lmzoo.tokenizer import ByteTokenizer

    common = _teacher_and_text(tmp_path)
    lmzoo.save(lmzoo.build("gpt2-debug", vocab_size=300), tmp_path / "student", ByteTokenizer())
    code = main(["finetune", str(tmp_path / "student"), "--method=full", f"--teacher={tmp_path / 'teacher'}",
                 f"--out_dir={tmp_path / 'run'}", *common])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "vocab_size 257" in err and "student's 300" in err
    code = main(["finetune", "gpt2-debug", f"--teacher={tmp_path / 'teacher'}", "--kd-alpha=1.5",
                 f"--out_dir={tmp_path / 'run'}", *common])
    assert code == 2 and "alpha must be in [0, 1]" in capsys.readouterr().err
