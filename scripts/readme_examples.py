"""Regenerate the README's demo blocks: the same prompts answered by the base model and by each
demo adapter, as `./dev serve` answers them (greedy; all requests in flight together); then one
prompt answered by weighted mixtures of two demo adapters (all in flight together).

    .venv/bin/python scripts/readme_examples.py            # rewrites the block in README.md
    .venv/bin/python scripts/readme_examples.py --check    # exit 1 when the README is stale

It starts `loraplex serve --demo smollm2` with the defaults `./dev serve` uses (NF4 base) on a
free port, sends every (prompt, adapter) pair at once through the Python client with `chat=True`
(the server applies the chat template, as `loraplex-client generate --chat` does), and writes the
answers between the README's `demo-examples` markers, and the mixtures' answers between its
`mixture-examples` markers.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ("What is the capital of France?", "How many employees work in Paris?")
ADAPTERS = ("uppercase", "json", "sql", "pirate", "one-sentence")
MAX_NEW_TOKENS = 64
START, END = "<!-- demo-examples:start -->", "<!-- demo-examples:end -->"
MIX_START, MIX_END = "<!-- mixture-examples:start -->", "<!-- mixture-examples:end -->"
MIX_PROMPT = "How many employees work in Paris?"
MIX_DIAL = (0, 0.5, 0.7, 1)  # the uppercase adapter's weight beside json's 1
MIX_REFUSED = ("json", "pirate")  # pirate is a DoRA adapter


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--check", action="store_true", help="only compare with the README")
    args = args.parse_args(argv)
    answers, mixed = ask_all()
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = _replace(text, START, END, render(answers))
    new = _replace(new, MIX_START, MIX_END, render_mixtures(mixed))
    if args.check:
        if new != text:
            print("README.md's demo block is stale: run scripts/readme_examples.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(render(answers))
    print(render_mixtures(mixed))
    return 0


def _replace(text: str, start: str, end: str, body: str) -> str:
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return head + start + "\n" + body + end + tail


def ask_all() -> tuple[dict[tuple[str, str | None], str], dict[object, str]]:
    """Answers by (prompt, adapter or None), from a real server given every request at once;
    then the mixtures' answers by uppercase weight (MIX_REFUSED: the server's refusal)."""
    from clients import LoraplexClient, LoraplexError
    from tests.server_process import start_server

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server = start_server("--demo", "smollm2", timeout=900)
    jobs = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, *ADAPTERS)]
    try:
        with LoraplexClient(server.target, timeout=600) as client, ThreadPoolExecutor(len(jobs)) as pool:
            replies = pool.map(lambda job: client.generate(
                job[0], adapter=job[1], chat=True, max_new_tokens=MAX_NEW_TOKENS), jobs)
            answers = {job: reply.text for job, reply in zip(jobs, replies)}
            mixed = dict(zip(MIX_DIAL, pool.map(lambda weight: client.generate(
                MIX_PROMPT, adapter_mixture=_dial(weight), chat=True,
                max_new_tokens=MAX_NEW_TOKENS).text, MIX_DIAL)))
            try:
                client.generate(MIX_PROMPT, chat=True, adapter_mixture={
                    "adapters": list(MIX_REFUSED), "weights": [1, 1], "combination_type": "cat"})
            except LoraplexError as error:
                mixed[MIX_REFUSED] = f"{error.code.name}: {error.details}"
            return answers, mixed
    finally:
        server.stop()


def _dial(weight: float) -> dict:
    return {"adapters": ["json", "uppercase"], "weights": [1, weight], "combination_type": "cat"}


def render_mixtures(mixed: dict[object, str]) -> str:
    dial = " ".join(f"{w:g}" for w in MIX_DIAL)
    lines = [
        "```sh",
        f'PROMPT="{MIX_PROMPT}"',
        f"for w in {dial}; do",
        f'  .venv/bin/loraplex-client generate --chat "$PROMPT" --max-new-tokens {MAX_NEW_TOKENS} \\',
        '      --mix json=1 --mix uppercase=$w --combination cat',
        "done",
        "```",
        "",
        "```text",
        *(f"uppercase={w:g}: {mixed[w]}" for w in MIX_DIAL),
        "```",
        "",
        f"`--mix {MIX_REFUSED[0]}=1 --mix {MIX_REFUSED[1]}=1` is refused, with the reason:",
        "",
        "```text",
        mixed[MIX_REFUSED],
        "```",
        "",
    ]
    return "\n".join(lines)


def render(answers: dict[tuple[str, str | None], str]) -> str:
    names = " ".join(("base", *ADAPTERS))
    lines = [
        "```sh",
        f'for a in {names}; do        # six requests in flight together',
        f'  .venv/bin/loraplex-client generate --chat "$PROMPT" --max-new-tokens {MAX_NEW_TOKENS} \\',
        '      $([ $a = base ] || echo --adapter $a) > /tmp/answer.$a &',
        f'done; wait; for a in {names}; do echo "$a: $(cat /tmp/answer.$a)"; done',
        "```",
        "",
    ]
    for prompt in PROMPTS:
        lines += [f"`PROMPT=\"{prompt}\"`", "", "```text"]
        for adapter in (None, *ADAPTERS):
            lines.append(f"{adapter or 'base'}: {answers[prompt, adapter]}")
        lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
