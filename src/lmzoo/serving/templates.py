"""Chat templates: a conversation written the way the model saw conversations in training.

A pretrained chat model was fine-tuned on conversations in one exact format, and answers well only
when prompted in it. SmolLM2-Instruct, for one, expects ChatML::

    <|im_start|>system\\nYou are a helpful AI assistant named SmolLM...<|im_end|>\\n
    <|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n
    <|im_start|>assistant\\n

The format ships with the model as a Jinja template (GGUF ``tokenizer.chat_template``; Hugging Face
``chat_template`` in tokenizer_config.json or ``chat_template.jinja``), which the tokenizer carries
(``Tokenizer.chat_template``). Three formats, picked by ``template``:

- ``auto`` (the default): the model's own template when its tokenizer has one, else ``transcript``;
- ``model``: the model's own template (an error when it has none);
- ``transcript``: lmzoo's plain ``User: ... / Assistant:`` transcript (for base models trained here);
- ``raw``: the messages' text run together, a plain continuation.

**A template is untrusted input**: it comes with a downloaded file. It is rendered in Jinja's
``ImmutableSandboxedEnvironment`` (no attribute starting with ``_``, no mutation of the objects passed
in, ``range`` capped), the same environment and helpers ``transformers``' ``apply_chat_template``
uses, so both render the same string. A template that names an underscore attribute
(``{{ ''.__class__.__mro__ }}``) is refused before it is rendered, with one line naming it.

The rendered prompt is a :class:`~lmzoo.tokenizer.SpecialText`: its ``<|im_start|>`` and kin encode
as the special tokens they are (text a user types stays text elsewhere). As in ``transformers``, a
special-token string inside a message's content becomes that token too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmzoo.errors import CheckpointError, ConfigError, quote
from lmzoo.tokenizer import SpecialText, Tokenizer

TEMPLATES = ("auto", "model", "transcript", "raw")
ROLES = ("system", "user", "assistant")
Message = dict[str, str]
# special tokens that end a turn in the common chat formats: generation stops at any the vocabulary has
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def check_messages(messages: Sequence[Any]) -> list[Message]:
    """The messages as ``{"role", "content"}`` dicts; ConfigError for anything else."""
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError("each message needs a role (system, user or assistant) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def format_chat(messages: Sequence[Message], template: str = "transcript") -> tuple[str, list[str]]:
    """lmzoo's own formats: (prompt text ending where the assistant's reply begins, stop strings)."""
    if template not in ("transcript", "raw"):
        raise ConfigError(f"unknown chat template {template!r}; choose from {', '.join(TEMPLATES)}")
    parts = []
    for m in check_messages(messages):
        role, content = m["role"], m["content"]
        if template == "raw":
            parts.append(content)
        elif role == "system":
            parts.append(content.strip() + "\n\n")
        else:
            parts.append(f"{'User' if role == 'user' else 'Assistant'}: {content.strip()}\n")
    if template == "raw":
        return "".join(parts), ["\n"]
    return "".join(parts) + "Assistant:", ["\nUser:", "\nAssistant:"]


# -- the sandbox ---------------------------------------------------------------------------------------

def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates (and transformers) want plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _private_names(ast: Any) -> list[str]:
    """Attribute and item names starting with ``_`` anywhere in a parsed template."""
    from jinja2 import nodes

    found = [n.attr for n in ast.find_all(nodes.Getattr) if n.attr.startswith("_")]
    found += [n.arg.value for n in ast.find_all(nodes.Getitem)
              if isinstance(n.arg, nodes.Const) and isinstance(n.arg.value, str) and n.arg.value.startswith("_")]
    return found


class ChatTemplate:
    """A model's Jinja chat template, checked and compiled once; :meth:`render` fills it."""

    def __init__(self, source: str, where: str = "the chat template"):
        from jinja2.exceptions import TemplateSyntaxError

        self.source, self.where = source, where
        env = _environment()
        try:
            ast = env.parse(source)
        except TemplateSyntaxError as e:
            raise CheckpointError(f"{where} is not a valid Jinja template (line {e.lineno}: {e.message})") from None
        private = _private_names(ast)
        if private:
            raise CheckpointError(f"{where} is refused: it reaches the Python internal {private[0]!r} "
                                  "(a template may not use names starting with '_')")
        self._template = env.from_string(source)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The conversation as text; ``add_generation_prompt`` ends it where the assistant's reply begins.
        ``variables`` (``bos_token``, ``eos_token``...) are what the template may read besides."""
        from jinja2.exceptions import SecurityError, TemplateError

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **variables)
        except SecurityError as e:
            raise CheckpointError(f"{self.where} is refused: {e}") from None
        except TemplateError as e:  # the template's own raise_exception: e.g. roles must alternate
            raise ConfigError(f"{self.where}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ConfigError(f"{self.where} failed on these messages ({type(e).__name__}: {e})") from None


def template_of(tokenizer: Tokenizer | None) -> ChatTemplate | None:
    """The compiled chat template a tokenizer carries, or None (cached per template text)."""
    source = getattr(tokenizer, "chat_template", None)
    return _compiled(source) if source else None


@lru_cache(maxsize=8)
def _compiled(source: str) -> ChatTemplate:
    return ChatTemplate(source, "the model's chat template")


def _variables(tokenizer: Tokenizer) -> dict[str, Any]:
    """The special tokens a template may name, as transformers passes them."""
    return {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}


def end_of_turn(tokenizer: Tokenizer) -> list[str]:
    """The special-token strings that end an assistant turn in this vocabulary (EOS first)."""
    found = [t for t in (tokenizer.eos_token, *END_OF_TURN) if t and t in tokenizer.special_tokens]
    return list(dict.fromkeys(found))


def check_template(tokenizer: Tokenizer | None, template: str) -> ChatTemplate | None:
    """The compiled model template ``template`` asks for (``auto``/``model`` with a tokenizer that has one), or
    None; a one-line ConfigError for a template name that is not one of :data:`TEMPLATES`, or for ``model``
    when the tokenizer has none. serve calls it at start, so a refused template is a line, not a 400 later."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown chat template {quote(template)}; choose from {', '.join(TEMPLATES)}")
    compiled = template_of(tokenizer) if template in ("auto", "model") else None
    if template == "model" and compiled is None:
        raise ConfigError("--template model: this model's tokenizer has no chat template (use transcript or raw)")
    return compiled


def render_chat(messages: Sequence[Any], tokenizer: Tokenizer | None = None,
                template: str = "auto") -> tuple[str, list[str]]:
    """(prompt ending where the assistant's reply begins, stop strings) for OpenAI-style ``messages``.

    ``template``: ``auto`` (the model's own template when its tokenizer has one, else lmzoo's
    transcript), ``model``, ``transcript`` or ``raw`` (module docstring). A model template's prompt is a
    :class:`~lmzoo.tokenizer.SpecialText` and its stops are the vocabulary's end-of-turn tokens.
    This is the one call chat and serve make (``lmzoo serve`` in place of ``format_chat``).
    """
    compiled = check_template(tokenizer, template)
    messages = check_messages(messages)
    if compiled is None:
        return format_chat(messages, "transcript" if template == "auto" else template)
    assert tokenizer is not None
    prompt = compiled.render(messages, add_generation_prompt=True, **_variables(tokenizer))
    return SpecialText(prompt), end_of_turn(tokenizer)


def chat_segments(tokenizer: Tokenizer, messages: Sequence[Any]) -> list[tuple[str, bool]]:
    """A conversation rendered with the model's template, cut into ``(text, is_response)`` pieces for
    instruction tuning: each assistant turn as the template writes it (its content, end token and what
    follows up to the next turn) is a response piece; everything else is prompt.

    The pieces come from rendering prefixes: the text added by an assistant message is what lies
    between the prompt for it (rendered with ``add_generation_prompt``) and the conversation up to
    and including it. A template whose renderings are not prefixes of one another (one that rewrites
    earlier turns) is refused with a ConfigError.
    """
    compiled = template_of(tokenizer)
    if compiled is None:
        raise ConfigError("the tokenizer has no chat template")
    messages = check_messages(messages)
    variables = _variables(tokenizer)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = compiled.render(messages[:i], add_generation_prompt=True, **variables)
        full = compiled.render(messages[: i + 1], add_generation_prompt=False, **variables)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ConfigError(f"the model's chat template rewrites earlier turns (at message {i}): "
                              "responses cannot be told apart from prompts; use lmzoo's own format")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = compiled.render(messages, add_generation_prompt=False, **variables)
    if not rest.startswith(done):
        raise ConfigError("the model's chat template rewrites earlier turns: use lmzoo's own format")
    if len(rest) > len(done):
        pieces.append((rest[len(done):], False))
    return [(SpecialText(text), trained) for text, trained in pieces if text]
