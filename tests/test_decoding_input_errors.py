"""Decoding with bad or extreme input: one-line errors (exit 2 / HTTP 400), never a traceback or a 500,
and the sliding window of learned-position models: each row decodes as it would alone."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import lmzoo
from lmzoo.cli.app import main
from lmzoo.decoding.generate import (
    SEED_LIMIT,
    check_cache_fits,
    check_sampling,
    encode_prompt,
    generate,
    nan_guard,
    sample_next,
    stream,
    warp_logits,
)
from lmzoo.decoding.static import generate_static
from lmzoo.errors import CheckpointError, ConfigError, DataError, ResourceError
from lmzoo.memguard import ENV as NO_MEMORY_CHECK
from lmzoo.tokenizer import CharTokenizer

CHARS = "abcdefghij \n"
UNKNOWN = "xyz"


def _model(name: str = "gpt2-debug", **kw):
    torch.manual_seed(0)
    return lmzoo.build(name, **kw).eval()


def _prompts(lengths, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(autouse=True)
def _memory_check_on(monkeypatch):
    monkeypatch.delenv(NO_MEMORY_CHECK, raising=False)


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(list(CHARS), special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    """name -> checkpoint directory of a small random model with the char tokenizer."""
    out = {}
    for name in ("gpt2-debug", "llama-debug"):
        torch.manual_seed(0)
        out[name] = str(lmzoo.save(lmzoo.build(name, vocab_size=tok.vocab_size), tmp_path_factory.mktemp(name), tok))
    return out


def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmzoo: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- 1. batched sliding window: a row's tokens do not depend on the rest of the batch -----------------


@pytest.mark.parametrize("lengths", [[31, 17], [40, 1, 33, 32], [3, 50, 16]])
def test_batched_generation_past_the_context_equals_each_prompt_alone(lengths):
    model = _model()  # learned positions, block_size 32: the window slides
    prompts = _prompts(lengths)
    n = 45  # past the context for every row
    batched = generate(model, prompts, n, temperature=0)
    alone = [generate(model, [p], n, temperature=0)[0] for p in prompts]
    assert all(len(row) == n for row in batched)
    assert batched == alone


def test_batched_sliding_recomputes_only_the_rows_that_slide(monkeypatch):
    """Rows slide at different steps; each slide recomputes that row alone (the others' keys move in
    the cache), so the batch forwards about the tokens its rows would forward alone, not B times more."""
    model = _model()
    prompts = _prompts(range(17, 33))  # 16 rows, every one at a different distance from the window's end
    tokens = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, *a, **k: tokens.append(idx.numel()) or forward(idx, *a, **k))
    batched = generate(model, prompts, 100, temperature=0)
    in_batch = sum(tokens)
    tokens.clear()
    alone = [generate(model, [p], 100, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert in_batch <= 1.2 * sum(tokens)  # whole-batch re-prefills at every row's slide: about 10x


def test_a_finished_row_does_not_change_the_others_when_the_window_slides():
    """A row that met its stop token keeps one token of context (it only repeats the stop token), so it
    stops driving slides; the other rows still decode exactly as they do alone."""
    model = _model()
    prompts = _prompts([30, 12, 25])
    stop = generate(model, [prompts[0]], 3, temperature=0)[0][-1]  # row 0 stops at its third token
    batched = generate(model, prompts, 60, temperature=0, stop_tokens=[stop])
    alone = [generate(model, [p], 60, temperature=0, stop_tokens=[stop])[0] for p in prompts]
    assert batched == alone
    assert len(batched[0]) <= 3 and max(len(r) for r in batched[1:]) > 32  # the others slide past the window


# -- 2. a prompt as long as the context is read whole ---------------------------------------------


@torch.no_grad()
def test_prompt_of_block_size_tokens_is_predicted_from_the_whole_prompt():
    model = _model()
    block = model.config.block_size
    prompts = torch.tensor(_prompts([block] * 64, seed=3))
    first = [row[0] for row in generate(model, prompts, 1, temperature=0)]
    full = model(prompts).logits[:, -1].argmax(-1).tolist()
    half = model(prompts[:, -(block // 2) :]).logits[:, -1].argmax(-1).tolist()
    assert full != half  # the check can tell the whole prompt from its newest half
    assert first == full


@torch.no_grad()
def test_prompt_longer_than_the_context_is_predicted_from_its_newest_full_window():
    model = _model()
    block = model.config.block_size
    prompts = torch.tensor(_prompts([block + 9] * 64, seed=4))
    first = [row[0] for row in generate(model, prompts, 1, temperature=0)]
    assert first == model(prompts[:, -block:]).logits[:, -1].argmax(-1).tolist()


# -- 3. temperature, top-k, top-p ----------------------------------------------------------------


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0, -1e-30, "0.5", None])
def test_bad_temperature_is_a_config_error(temperature):
    with pytest.raises(ConfigError, match="temperature"):
        generate(_model(), [[1, 2]], 3, temperature=temperature)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_sampling_settings_are_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        check_sampling(**{"max_new_tokens": 3, **kw})


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300])
def test_a_tiny_temperature_samples_the_most_likely_token_without_nan(temperature):
    logits = torch.randn(64, 97, generator=torch.Generator().manual_seed(0)) * 5
    warped = warp_logits(logits, temperature)
    assert not torch.isnan(warped).any()
    assert torch.isfinite(warped.softmax(-1)).all()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature, generator=g), logits.argmax(-1))
    model = _model("llama-debug")
    prompts = _prompts([5, 2])
    sampled = generate(model, prompts, 12, temperature=temperature, top_p=0.9, seed=0)
    assert sampled == generate(model, prompts, 12, temperature=0)


# -- 4. seeds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [SEED_LIMIT, 99999999999999999999, -1, 1.5, "3"])
def test_a_seed_outside_what_torch_takes_is_a_config_error(seed):
    with pytest.raises(ConfigError, match="seed"):
        generate(_model(), [[1, 2]], 3, temperature=1.0, seed=seed)


def test_the_largest_seed_is_accepted_and_reproducible():
    model = _model()
    a = generate(model, [[1, 2]], 6, temperature=1.0, seed=SEED_LIMIT - 1)
    assert len(a[0]) == 6 and a == generate(model, [[1, 2]], 6, temperature=1.0, seed=SEED_LIMIT - 1)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--seed", "99999999999999999999"], "seed"),
        (["--seed", str(SEED_LIMIT - 1), "--num-samples", "2"], "seed"),
        (["--temperature", "nan"], "temperature"),
        (["--temperature", "-0.5"], "temperature"),
        (["--top-p", "nan"], "top_p"),
        (["--top-k", "0"], "top_k"),
        (["--max-new-tokens", "-3"], "max_new_tokens"),
        (["--num-samples", "0"], "--num-samples"),
        (["--num-samples", "-2"], "--num-samples"),
    ],
)
def test_cli_generate_bad_settings_are_one_line_exit_2_before_any_output(capsys, ckpt, argv, needle):
    rc, out, err = _cli(capsys, "generate", "--checkpoint", ckpt["gpt2-debug"], "--prompt", "abc", *argv)
    assert rc == 2 and out == ""
    assert needle in _one_error_line(err)


def test_cli_chat_checks_its_settings_before_loading(capsys, tmp_path):
    rc, out, err = _cli(capsys, "chat", "--checkpoint", str(tmp_path / "absent"), "--temperature", "nan")
    assert rc == 2 and "temperature" in _one_error_line(err)


# -- 6. out-of-vocabulary prompts ----------------------------------------------------------------


def test_encode_prompt_names_every_unknown_character(tok):
    with pytest.raises(DataError) as e:
        encode_prompt(tok, "ab" + UNKNOWN + "x")
    msg = str(e.value)
    assert "\n" not in msg and all(repr(c) in msg for c in UNKNOWN) and "3 character" in msg
    assert encode_prompt(tok, "abc") == tok.encode("abc")
    assert encode_prompt(tok, "") == [tok.eos_id]  # empty: generate from end-of-text


def test_cli_generate_refuses_an_out_of_vocabulary_prompt(capsys, ckpt):
    rc, out, err = _cli(
        capsys,
        "generate",
        "--checkpoint",
        ckpt["gpt2-debug"],
        "--prompt",
        UNKNOWN,
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    )
    assert rc == 2 and out == ""
    line = _one_error_line(err)
    assert all(repr(c) in line for c in UNKNOWN)
    rc, out, _ = _cli(
        capsys,
        "generate",
        "--checkpoint",
        ckpt["gpt2-debug"],
        "--prompt",
        "abc",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    )
    assert rc == 0 and out.startswith("abc")


# -- 7. huge max_new_tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [10**15, 2**70])
def test_a_cache_that_cannot_fit_is_refused_before_allocating(n):
    with pytest.raises(ResourceError, match="max_new_tokens"):
        stream(_model("llama-debug"), [[1, 2, 3]], n)  # raised by the call, before any token


@pytest.mark.parametrize("name,kw", [("mamba-debug", {}), ("gpt2-debug", {}), ("llama-debug", {"sliding_window": 8})])
def test_a_bounded_cache_generates_from_a_huge_max_new_tokens(name, kw):
    model = _model(name, **kw)
    prompts = _prompts([3, 6])
    head = list(itertools.islice(stream(model, prompts, 10**11, temperature=0), 40))
    assert [[int(t[b]) for t in head] for b in range(2)] == generate(model, prompts, 40, temperature=0)


def test_cli_huge_max_new_tokens_is_one_line_exit_3(capsys, ckpt):
    rc, out, err = _cli(
        capsys, "generate", "--checkpoint", ckpt["llama-debug"], "--prompt", "abc", "--max-new-tokens", str(10**15)
    )
    assert rc == ResourceError.exit_code == 3 and out == ""
    assert "decoding cache" in _one_error_line(err)


def test_the_memory_check_can_be_switched_off(monkeypatch):
    model = _model("llama-debug")
    with pytest.raises(ResourceError):
        check_cache_fits(model, 1, 10**15)
    monkeypatch.setenv(NO_MEMORY_CHECK, "1")
    check_cache_fits(model, 1, 10**15)  # no error: the caller takes the risk


# -- 5. lmzoo serve: every lmzoo error is a 400, streaming included --------------------------------


@pytest.fixture(scope="module")
def client(tok):
    pytest.importorskip("fastapi", reason="lmzoo serve needs FastAPI (pip install -e '.[serve]')")
    pytest.importorskip("httpx", reason="the FastAPI test client needs httpx")
    from fastapi.testclient import TestClient

    from lmzoo.serving.serve import Server, create_app

    torch.manual_seed(0)
    server = Server(lmzoo.build("gpt2-debug", vocab_size=tok.vocab_size).eval(), tok, max_tokens_limit=8)
    # the Host a loopback server answers to (TestClient's default 'testserver' is refused, as any unknown name)
    return TestClient(create_app(server), base_url="http://127.0.0.1", raise_server_exceptions=False)


def _post(client, path, body):
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("stream_", [False, True])
def test_serve_out_of_vocabulary_prompt_is_a_400_naming_the_characters(client, stream_):
    r = _post(client, "/v1/completions", {"prompt": UNKNOWN, "max_tokens": 3, "stream": stream_})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prompt" and all(repr(c) in err["message"] for c in UNKNOWN)
    r = _post(
        client,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": UNKNOWN}], "max_tokens": 3, "stream": stream_},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("stream_", [False, True])
@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("seed", 2**64), ("seed", 1e300)])
def test_serve_bad_sampling_values_are_a_400_with_the_shared_message(client, stream_, field, value):
    r = _post(client, "/v1/completions", {"prompt": "abc", "max_tokens": 3, field: value, "stream": stream_})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field
    with pytest.raises(ConfigError) as e:  # the API's own check says the same
        check_sampling(3, **{field: int(value) if field == "seed" else value})
    assert err["message"] == str(e.value)


def test_serve_a_valid_stream_still_streams(client):
    r = _post(client, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "stream": True, "seed": 5})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_serve_any_lmzoo_error_during_generation_is_a_400_not_a_500(client, monkeypatch):
    import lmzoo.serving.serve as serve

    def fail(*args, **kwargs):
        raise CheckpointError("weights went missing")
        yield ""  # a generator, like stream_text

    monkeypatch.setattr(serve, "stream_text", fail)
    r = _post(client, "/v1/completions", {"prompt": "abc", "max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["message"] == "weights went missing"
    r = _post(client, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and "weights went missing" in r.text  # started streams report in the stream


# -- a checkpoint with non-finite weights -------------------------------------------------------


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_cli_generate_from_nan_weights_is_one_line_naming_the_logits(capsys, tmp_path, tok, temperature):
    torch.manual_seed(0)
    model = lmzoo.build("gpt2-debug", vocab_size=tok.vocab_size)
    with torch.no_grad():
        model.head.weight[3].fill_(float("nan"))  # one row: most logits stay finite
    path = str(lmzoo.save(model, tmp_path / "nan", tok))
    rc, out, err = _cli(capsys, "generate", "--checkpoint", path, "--prompt", "abc", "--max-new-tokens", "3",
                        "--temperature", temperature)
    assert rc == 2 and "NaN logits" in _one_error_line(err)
    for decode in (generate, generate_static):  # the static loop checks once, after its last token
        with pytest.raises(CheckpointError, match="NaN logits"):
            decode(model, [[0, 1, 2]], 3, temperature=float(temperature), seed=0)
    clean, nan = nan_guard(torch.tensor([[0.0, float("nan")], [1.0, float("-inf")]]))
    assert nan.tolist() == [True, False] and not torch.isnan(clean).any() and clean[1, 1] == float("-inf")
