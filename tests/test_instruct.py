"""Instruction tuning: response-only targets, packing, and a generated task that tuning teaches."""

from __future__ import annotations

import json

import pytest
import torch

import lmzoo
from lmzoo.cli import main
from lmzoo.errors import DataError
from lmzoo.peft.finetune import finetune
from lmzoo.peft.instruct import encode_chat, exact_match, instruct_loaders, make_task, pack, read_jsonl
from lmzoo.tokenizer import ByteTokenizer


def test_targets_only_on_response_tokens_and_packing():
    tok = ByteTokenizer()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = encode_chat(tok, chat)
    assert tok.decode(ids) == "<|user|>\nhi\n<|assistant|>\nyo<|endoftext|>"
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("yo") + [256]
    x, y = pack([(ids, mask)] * 3, block_size=2 * len(ids))
    assert x.shape == (2, 2 * len(ids))  # two examples fit in the first row, the third starts the next
    trained = y[y >= 0].tolist()
    assert trained == (tok.encode("yo") + [256]) * 3  # rows hold block_size + 1 tokens: nothing is cut
    with pytest.raises(DataError, match="does not fit"):
        pack([(ids, mask)], block_size=4)


def test_reads_prompt_response_and_chat_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": "a", "response": "b"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "x"}, {"role": "user", "content": "v"},
                          {"role": "assistant", "content": "y"}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    chats = read_jsonl(p)
    assert chats[0][1] == {"role": "assistant", "content": "b"} and len(chats[1]) == 5
    _, mask = encode_chat(ByteTokenizer(), chats[1])
    assert sum(mask) == 4  # "x" + end, "y" + end: both assistant turns are trained on
    p.write_text('{"question": 1}')
    with pytest.raises(DataError, match="prompt/response or messages"):
        read_jsonl(p)


def _write(path, chats):
    path.write_text("\n".join(json.dumps({"messages": c}) for c in chats))
    return path


def test_tuning_teaches_string_reversal(tmp_path):
    """Held-out (unseen words) exact match: 0% before, >= 80% after 250 steps of the shared trainer
    (``finetune(instruct=...)``; see docs/instruction-tuning.md)."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    held = make_task("reverse", 100, seed=1, length=3)
    unseen = {c[0]["content"] for c in held}
    train = [c for c in make_task("reverse", 2000, seed=0, length=3) if c[0]["content"] not in unseen]
    model = lmzoo.build("gpt2-debug", vocab_size=257, block_size=64, n_embd=64, n_head=4, n_kv_head=4)
    assert exact_match(model, tok, held) == 0.0
    lmzoo.save(model, tmp_path / "base", tok)
    s = finetune(tmp_path / "base", method="full", instruct=_write(tmp_path / "train.jsonl", train),
                 instruct_val=_write(tmp_path / "val.jsonl", held), out_dir=str(tmp_path / "run"), max_steps=250,
                 batch_size=16, lr=3e-3, schedule="constant", warmup_steps=0, weight_decay=0.0, eval_interval=250,
                 eval_iters=2, seed=0, device="cpu", progress=False)
    assert s["step"] == 250 and s["method"] == "full"
    tuned = lmzoo.load(tmp_path / "run")  # the trainer's newest checkpoint
    assert exact_match(tuned, tok, held) >= 0.8


def test_trainer_loss_counts_response_tokens_only(tmp_path):
    """The loss the trainer logs at step 1 equals the CE over response tokens of its first batch."""
    import lmzoo.cli.app

    tok = ByteTokenizer()
    chats = make_task("add", 40, seed=0)
    torch.manual_seed(0)
    lmzoo.save(lmzoo.build("gpt2-debug", vocab_size=257, block_size=64), tmp_path / "base", tok)
    data = _write(tmp_path / "d.jsonl", chats)
    args = ["finetune", str(tmp_path / "base"), "--method=full", f"--instruct={data}", "--max_steps=2",
            "--batch_size=4", "--eval_iters=1", "--seed=3", "--device=cpu", "--progress=false",
            f"--out_dir={tmp_path / 'run'}"]
    assert main(args) == 0
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in rec if r["kind"] == "train")
    train, _ = instruct_loaders(tok, data, 64, 4, seed=3)
    x, y = train.batch_at(0)
    logits = lmzoo.load(tmp_path / "base")(x).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), y.reshape(-1), ignore_index=-1)
    assert abs(logged - ce.item()) < 1e-4
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 257), x[:, 1:].reshape(-1))
    assert abs(full.item() - ce.item()) > 0.05  # counting the prompt tokens would log another loss
    assert (y >= 0).sum() < (y.numel() / 2)  # most positions are prompt or padding, not trained on
    # resumable like any run: the packed loader's position is in the checkpoint
    assert main([*args[:-1], "--max_steps=4", "--resume", f"--out_dir={tmp_path / 'run'}"]) == 0
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_cli_bad_instruction_file_is_one_line(tmp_path, capsys):
    import lmzoo.cli.app

    lmzoo.save(lmzoo.build("gpt2-debug", vocab_size=257), tmp_path / "base", ByteTokenizer())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    code = main(["finetune", str(tmp_path / "base"), f"--instruct={bad}", f"--out_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bad.jsonl:2: not valid JSON" in err and "Traceback" not in err


def test_without_packing_each_example_is_trained_exactly_as_it_is_seen_alone(tmp_path):
    """packing=False: one example per row, so its logits (and loss) are those of the example alone;
    packed, the second example of a row sees the first and gets other logits."""
    import lmzoo.cli.app

    tok = ByteTokenizer()
    chats = make_task("add", 3, seed=4)
    enc = [encode_chat(tok, c) for c in chats]
    torch.manual_seed(0)
    model = lmzoo.build("gpt2-debug", vocab_size=257, block_size=64).eval()
    second = torch.tensor([enc[1][0]])
    alone = model(second).logits[0]
    n = second.shape[1]

    x, y = pack(enc, block_size=63, pad_id=256, packing=False)
    assert x.shape[0] == 3 and [int((r >= 0).sum()) for r in y] == [sum(m) for _, m in enc]
    torch.testing.assert_close(model(x[1:2]).logits[0, :n], alone, rtol=0, atol=1e-5)

    xp, _ = pack(enc, block_size=63, pad_id=256)
    assert xp.shape[0] == 2  # the first two share a packed row (32 + 32 tokens), the third starts the next
    start = len(enc[0][0])
    seen = model(xp).logits[0, start : start + n]  # the row's inputs end one token before the example does
    assert (seen - alone[: seen.shape[0]]).abs().max() > 1e-2

    lmzoo.save(model, tmp_path / "base", tok)
    data = _write(tmp_path / "d.jsonl", make_task("add", 20, seed=0))
    base = ["finetune", str(tmp_path / "base"), "--method=full", "--max_steps=1", "--batch_size=2",
            "--eval_iters=1", "--device=cpu", "--progress=false", f"--out_dir={tmp_path / 'run'}"]
    assert main([*base, f"--instruct={data}", "--no-packing"]) == 0
    assert main([*base, "--no-packing"]) == 2  # a usage error without instruction data
