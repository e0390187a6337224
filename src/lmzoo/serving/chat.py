"""``lmzoo chat``: an interactive terminal conversation with a checkpoint, streamed token by token.

A pretrained chat model (SmolLM2-Instruct...) brings its own chat template, which renders the
conversation (:mod:`lmzoo.serving.templates`). lmzoo's own models are base language models: they
continue text. For them a conversation is written as a plain transcript the model continues (the
format of the early chat fine-tunes)::

    <system prompt>

    User: <message>
    Assistant: <reply>
    User: <message>
    Assistant:

and the reply ends at the model's end-of-text token or when it starts the next ``User:`` turn.
``template="raw"`` drops the role labels: the history is the text so far and each message is
appended as is (completion mode; the reply ends at a newline). ``lmzoo serve`` uses the same
formatting for ``/v1/chat/completions``.

Commands: ``/reset`` forgets the history, ``/exit`` (or end of input) quits, ``/help``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from lmzoo.errors import LmzooError
from lmzoo.serving.templates import TEMPLATES, format_chat, render_chat  # noqa: F401 - re-exported


class StopStrings:
    """Cuts a stream of text pieces at the first stop string, holding back what could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text safe to show after ``piece`` arrived ('' while a stop string may be forming)."""
        if self.stopped:
            return ""
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
            return out
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def stream_text(
    model, tokenizer, prompt: str, max_new_tokens: int, stops: Sequence[str] = (), info: dict | None = None,
    progress: Callable[[], bool] | None = None, **sampling: Any,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, one per step (multi-byte characters whole),
    ending at end-of-text or at a stop string (not included).

    ``info`` (optional) receives ``prompt_tokens``, ``completion_tokens`` and ``finish_reason``
    ("stop": end-of-text or a stop string, "length": ``max_new_tokens`` reached), OpenAI's fields.
    ``progress`` (optional) is called after every generated token, yielded or held back; when it
    returns False the generation ends there (``finish_reason`` "cancelled"): a server stops the
    work of a client that has gone without waiting for the next piece to be shown.
    """
    from lmzoo.decoding.generate import encode_prompt, stream

    info = {} if info is None else info

    ids = encode_prompt(tokenizer, prompt)  # with the BOS token a pretrained model may expect
    limit = model.max_positions()
    if limit is not None and len(ids) >= limit:  # keep the newest context (the oldest turns fall out)
        ids = ids[-(limit - 1):]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    info.update(prompt_tokens=len(ids), completion_tokens=0, finish_reason="length")
    cutter = StopStrings(stops)
    new: list[int] = []
    shown = ""
    for toks in stream(model, [ids], max_new_tokens, stop_tokens=eos, **sampling):
        t = int(toks[0])
        info["completion_tokens"] += 1
        if progress is not None and not progress():
            info["finish_reason"] = "cancelled"
            return
        if t in eos:
            info["finish_reason"] = "stop"
            break
        new.append(t)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        piece = cutter.feed(text[len(shown):])
        shown = text
        if piece:
            yield piece
        if cutter.stopped:
            info["finish_reason"] = "stop"
            return
    rest = cutter.flush()
    if rest:
        yield rest


@dataclass
class ChatSession:
    """A conversation: the history and the sampling settings; ``reply`` streams the next answer."""

    model: Any
    tokenizer: Any
    system: str | None = None
    template: str = "auto"  # the model's own chat template if it has one, else lmzoo's transcript
    max_new_tokens: int = 200
    sampling: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def reply(self, message: str) -> Iterator[str]:
        """Stream the answer to ``message``; the exchange joins the history once the answer is complete."""
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        msgs.append({"role": "user", "content": message})
        prompt, stops = render_chat(msgs, self.tokenizer, self.template)
        pieces = []
        for piece in stream_text(self.model, self.tokenizer, prompt, self.max_new_tokens, stops, **self.sampling):
            pieces.append(piece)
            yield piece
        answer = "".join(pieces)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]


HELP = "commands: /reset (forget the conversation), /exit (quit), /help"


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The read-reply loop; prompts ('you> ') only on a terminal, so piped input gives clean output."""
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {session.model.family}; {HELP}", file=stdout)
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        message = line.rstrip("\n")
        cmd = message.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            session.reset()
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if cmd == "/help":
            print(HELP, file=stdout, flush=True)
            continue
        if not cmd:
            continue
        stdout.write("assistant> ")
        stdout.flush()
        try:
            for piece in session.reply(message):
                stdout.write(piece)
                stdout.flush()
        except LmzooError as e:  # e.g. a character the tokenizer does not know: say so, keep chatting
            print(f"\nlmzoo: error: {e}", file=sys.stderr, flush=True)
        stdout.write("\n")
        stdout.flush()
    return 0
