"""Regenerate the README's demo block: the same prompts answered by the base model and by each
demo adapter, as `./dev serve` answers them (greedy; all requests in flight together).

    .venv/bin/python scripts/readme_examples.py            # rewrites the block in README.md
    .venv/bin/python scripts/readme_examples.py --check    # exit 1 when the README is stale

It starts `loraplex serve --demo smollm2` with the defaults `./dev serve` uses (NF4 base) on a
free port, sends every (prompt, adapter) pair at once through the Python client with `chat=True`
(the server applies the chat template, as `loraplex-client generate --chat` does), and writes the
answers between the README's `demo-examples` markers.
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


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--check", action="store_true", help="only compare with the README")
    args = args.parse_args(argv)
    answers = ask_all()
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = head + START + "\n" + render(answers) + END + tail
    if args.check:
        if new != text:
            print("README.md's demo block is stale: run scripts/readme_examples.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(render(answers))
    return 0


def ask_all() -> dict[tuple[str, str | None], str]:
    """Answers by (prompt, adapter or None), from a real server given every request at once."""
    from clients import LoraplexClient
    from tests.server_process import start_server

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server = start_server("--demo", "smollm2", timeout=900)
    jobs = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, *ADAPTERS)]
    try:
        with LoraplexClient(server.target, timeout=600) as client, ThreadPoolExecutor(len(jobs)) as pool:
            replies = pool.map(lambda job: client.generate(
                job[0], adapter=job[1], chat=True, max_new_tokens=MAX_NEW_TOKENS), jobs)
            return {job: reply.text for job, reply in zip(jobs, replies)}
    finally:
        server.stop()


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
