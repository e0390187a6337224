"""lmzoo chat: driven through stdin in a subprocess; streaming, history, /reset and /exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lmzoo
from _tiny_run import tiny_run
from lmzoo.formats.checkpoint import load_tokenizer_of
from lmzoo.serving.chat import ChatSession, StopStrings, format_chat


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


def test_chat_through_stdin_streams_answers_and_obeys_reset_and_exit(run):
    script = "the cat says\n/reset\nthe cat says\n/exit\nthe dog says\n"  # nothing after /exit is read
    proc = subprocess.run(
        [sys.executable, "-m", "lmzoo", "chat", "--checkpoint", str(run), "--template", "raw", "--temperature", "0",
         "--max-new-tokens", "8", "--device", "cpu"],
        input=script, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("assistant>  meow.")  # the answer it was trained to give
    assert lines[1] == "(conversation reset)"
    assert lines[2] == lines[0]  # after /reset the same prompt gives the same (greedy) answer
    assert len(lines) == 3  # /exit ended the session


def test_reply_streams_pieces_and_keeps_history(run):
    session = ChatSession(lmzoo.load(run), load_tokenizer_of(run), template="raw", max_new_tokens=12,
                          sampling={"temperature": 0})
    pieces = list(session.reply("the cat says"))
    assert len(pieces) > 1 and "".join(pieces).startswith(" meow.")
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    second = "".join(session.reply(" the dog says"))  # continues the conversation so far
    assert len(session.history) == 4 and second
    session.reset()
    assert session.history == []


def test_transcript_format_and_stop_strings():
    prompt, stops = format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert prompt == "Be brief.\n\nUser: hi\nAssistant:" and "\nUser:" in stops
    cut = StopStrings(["\nUser:"])
    shown = "".join(cut.feed(p) for p in ["Hel", "lo!\nUs", "er: more"]) + cut.flush()
    assert shown == "Hello!" and cut.stopped
