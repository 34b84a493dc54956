"""`loraplex-client compare`: one prompt to the base model and adapters at once, side by side.

Every request streams in a thread of its own over the client's one channel; the main thread
redraws the grid of answers in place on a terminal, or prints it once at the end.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import threading
import time
from dataclasses import dataclass

import grpc

from clients._common import LoraplexError, Models
from clients.sync import LoraplexClient

MIN_COLUMN = 36  # a panel's least width, in characters
SEPARATOR = " | "
REDRAW_SECONDS = 0.1  # at most 10 redraws a second
UP_AND_CLEAR = "\x1b[{}F\x1b[J"  # cursor up N lines to column 1, clear to the end of the screen


@dataclass
class Answer:
    """One model's answer, filled in by its stream's thread; `adapter` None = the base model."""

    model: str
    adapter: str | None
    text: str = ""
    tokens: int = 0  # so far; at the end, the server's completion_tokens
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: LoraplexError | None = None
    started: float = 0.0  # time.monotonic() of each event
    first_token: float | None = None
    ended: float | None = None

    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def tokens_per_second(self) -> float:
        """Over the whole request, the wait for the first token included."""
        seconds = self.seconds()
        return self.tokens / seconds if seconds > 0 else 0.0

    def status(self) -> str:
        if self.error is not None:
            return f"error: {self.error.code.name}"
        if self.first_token is None and self.ended is None:
            return "waiting"
        line = f"{self.tokens} tok, {self.tokens_per_second():.1f} tok/s"
        return f"{line}, {self.finish_reason}" if self.finish_reason else line

    def as_json(self) -> dict:
        ttft = None if self.first_token is None else round(self.first_token - self.started, 3)
        return {"model": self.model, "adapter": self.adapter, "text": self.text,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "finish_reason": self.finish_reason, "seconds": round(self.seconds(), 3),
                "tokens_per_second": round(self.tokens_per_second(), 3),
                "time_to_first_token": ttft}


def answers_for(models: Models, names: str | None) -> list[Answer]:
    """The base model, then the adapters in `names` ("a,b"; None = all of them), each checked
    against the server's list before anything is sent: NOT_FOUND names the first unknown one."""
    chosen = models.adapters if names is None else list(
        dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    unknown = [name for name in chosen if name not in models.adapters]
    if unknown:
        raise LoraplexError(grpc.StatusCode.NOT_FOUND,
                            f"adapter '{unknown[0]}' is not registered (this server's adapters: "
                            f"{', '.join(models.adapters) or 'none'})")
    return [Answer(models.base_model, None)] + [Answer(name, name) for name in chosen]


def run(client: LoraplexClient, answers: list[Answer], prompt: str, *, chat: bool,
        params: dict, redraw=None) -> None:
    """Streams every answer at once; calls `redraw()` at most every REDRAW_SECONDS meanwhile.
    Raises the first answer's error, if any, once all have ended."""
    threads = [threading.Thread(target=_stream, args=(client, a, prompt, chat, params),
                                daemon=True) for a in answers]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(REDRAW_SECONDS if redraw else None)
            if redraw:
                redraw()
    failed = next((a.error for a in answers if a.error is not None), None)
    if failed is not None:
        raise failed


def _stream(client: LoraplexClient, answer: Answer, prompt: str, chat: bool,
            params: dict) -> None:
    answer.started = time.monotonic()
    try:
        for delta in client.stream(prompt, adapter=answer.adapter, chat=chat, **params):
            if answer.first_token is None and delta.token_ids:
                answer.first_token = time.monotonic()
            answer.text += delta.text
            answer.tokens += len(delta.token_ids)
            if delta.finish_reason is not None:
                answer.finish_reason = delta.finish_reason
                answer.tokens, answer.prompt_tokens = (delta.completion_tokens,
                                                       delta.prompt_tokens)
    except LoraplexError as error:
        answer.error = error
    answer.ended = time.monotonic()


# The grid


def grid(answers: list[Answer], width: int, height: int | None = None) -> list[str]:
    """Panels of at least MIN_COLUMN characters, as many to a row as `width` holds, each headed
    by its model and status. `height`: the grid fits in that many lines, each panel showing the
    end of its text (a live frame must fit the screen to be redrawn in place)."""
    columns = max(1, min(len(answers), (width + len(SEPARATOR)) // (MIN_COLUMN + len(SEPARATOR))))
    column = max(1, (width - len(SEPARATOR) * (columns - 1)) // columns)
    rows = [answers[i:i + columns] for i in range(0, len(answers), columns)]
    text_lines = None
    if height is not None:  # 3 heading lines per panel, 1 blank line between rows
        text_lines = max(1, (height - 4 * len(rows) + 1) // len(rows))
    lines = []
    for row in rows:
        panels = [_panel(answer, column, text_lines) for answer in row]
        depth = max(len(panel) for panel in panels)
        for i in range(depth):
            cells = [(panel[i] if i < len(panel) else "").ljust(column) for panel in panels]
            lines.append(SEPARATOR.join(cells).rstrip())
        lines.append("")
    return lines[:-1]


def _panel(answer: Answer, width: int, text_lines: int | None) -> list[str]:
    name = answer.model + (" (base)" if answer.adapter is None else "")
    body = _wrap(answer.error.details if answer.error else answer.text, width)
    if text_lines is not None and len(body) > text_lines:
        body = body[-text_lines:]
    return [name[:width], answer.status()[:width], "-" * width, *body]


def _wrap(text: str, width: int) -> list[str]:
    """The text's lines wrapped at `width`; characters that would move the cursor or start an
    escape sequence are shown as U+FFFD."""
    shown = "".join(c if c.isprintable() or c == "\n" else "\ufffd"
                    for c in text.expandtabs(4))
    return [piece for line in shown.split("\n")
            for piece in textwrap.wrap(line, width) or [""]]


class LiveGrid:
    """The grid redrawn in place on a terminal: each frame moves the cursor back over the last
    and clears below it."""

    def __init__(self, answers: list[Answer], out=None):
        self.answers, self.out = answers, out or sys.stdout
        self.drawn = 0  # lines of the last frame

    def __call__(self) -> None:
        size = shutil.get_terminal_size()
        # One column and one line spare: no line fills the width and the frame never scrolls.
        self.draw(grid(self.answers, size.columns - 1, size.lines - 1))

    def draw(self, lines: list[str]) -> None:
        back = UP_AND_CLEAR.format(self.drawn) if self.drawn else ""
        self.out.write(back + "".join(line + "\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)

    def finish(self) -> None:
        """The last frame, whole: every panel's full text (it may scroll)."""
        self.draw(grid(self.answers, shutil.get_terminal_size().columns - 1))
