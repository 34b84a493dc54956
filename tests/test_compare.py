"""`loraplex-client compare` and the ListModels call it starts with, against real servers.

Two `loraplex serve` processes on the tiny demo: one as `./dev serve` runs it (the demo model,
its chat template, the five demo adapters); one without a chat template, with an inference token
and an adapter whose stored weights are truncated (so ListModels leaves it out). Each answer of
compare must equal a greedy `generate` of the same model for the same prompt.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import pytest

from adapters_registry.peft_format import CONFIG_FILE, WEIGHTS_FILE
from adapters_registry.store import AdapterStore
from clients import AsyncLoraplexClient, LoraplexClient, LoraplexError, Models
from clients import cli
from clients.compare import MIN_COLUMN, Answer, LiveGrid, grid
from server.tools.demo import DEMO_ADAPTERS, build_demo
from tests.server_process import start_server

PROMPT = "What is the capital of France?"
MAX_NEW_TOKENS = 6
TOKEN = "compare-inference-token"
NO_TEMPLATE = "no-template"  # the second server's model id: the demo model, no chat template


def _stop(process) -> None:
    assert process.stop() == 0, process.output()
    assert "Traceback" not in process.output(), process.output()


@pytest.fixture(scope="module")
def demo(demo_cache):
    return build_demo(demo_cache, progress=None)


@pytest.fixture(scope="module")
def server(demo_cache, tmp_path_factory):
    process = start_server("--threads", "1", "--quantize", "none",
                           "--store", str(tmp_path_factory.mktemp("compare") / "store"),
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    yield process
    _stop(process)


@pytest.fixture(scope="module")
def plain_server(demo, tmp_path_factory):
    """No chat template, an inference token, adapters attn-r4 (usable) and broken (not)."""
    tmp = tmp_path_factory.mktemp("compare-plain")
    model = tmp / NO_TEMPLATE
    shutil.copytree(demo.model_dir, model)
    (model / "chat_template.jinja").unlink()
    broken = demo.adapters["attn-r8"]
    with AdapterStore(tmp / "store") as store:
        weights = store.put("broken", (broken / CONFIG_FILE).read_bytes(),
                            (broken / WEIGHTS_FILE).read_bytes()).weights_path
    weights.write_bytes(weights.read_bytes()[:100])  # found at start: the size is wrong
    (tmp / "token").write_text(TOKEN)
    process = start_server("--model", str(model), "--threads", "1", "--quantize", "none",
                           "--adapter-dir", f"attn-r4={demo.adapters['attn-r4']}",
                           "--store", str(tmp / "store"),
                           "--inference-token-file", str(tmp / "token"))
    yield process
    _stop(process)


@pytest.fixture(scope="module")
def client(server):
    with LoraplexClient(server.target, timeout=120) as client:
        yield client


def compare(capsys, target: str, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `loraplex-client --target TARGET compare PROMPT ARGS`."""
    status = cli.main(["--target", target, "compare", PROMPT, *args])
    out, err = capsys.readouterr()
    return status, out, err


def compare_json(capsys, target: str, *args: str) -> list[dict]:
    status, out, err = compare(capsys, target, "--json", "--max-new-tokens", str(MAX_NEW_TOKENS),
                               *args)
    assert status == 0, err
    return json.loads(out)


def assert_greedy(answers: list[dict], client: LoraplexClient, chat: bool) -> None:
    """Each answer is what `generate` gives its model alone, greedy, for the same prompt."""
    for answer in answers:
        alone = client.generate(PROMPT, adapter=answer["adapter"], max_new_tokens=MAX_NEW_TOKENS,
                                temperature=0, chat=chat)
        assert (answer["text"], answer["completion_tokens"], answer["finish_reason"],
                answer["prompt_tokens"]) == (alone.text, alone.completion_tokens,
                                             alone.finish_reason, alone.prompt_tokens), answer
        assert answer["seconds"] >= answer["time_to_first_token"] >= 0
        assert answer["tokens_per_second"] > 0


# ---- ListModels --------------------------------------------------------------------------------

def test_list_models_gives_the_base_its_chat_template_and_the_demo_adapters(client, server, demo):
    expected = Models(base_model=demo.model_dir.name, chat_template=True,
                      adapters=sorted(DEMO_ADAPTERS))
    assert client.list_models() == expected

    async def listed():
        async with AsyncLoraplexClient(server.target, timeout=120) as aio:
            return await aio.list_models()

    assert asyncio.run(listed()) == expected


def test_list_models_leaves_out_unusable_adapters_and_needs_the_inference_token(plain_server):
    with LoraplexClient(plain_server.target, token=TOKEN, timeout=120) as client:
        assert client.list_models() == Models(NO_TEMPLATE, False, ["attn-r4"])
    with LoraplexClient(plain_server.target, timeout=120) as client:
        with pytest.raises(LoraplexError) as error:
            client.list_models()
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED


# ---- compare --json ----------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [False, True], ids=["chat", "raw"])
def test_compare_json_is_every_model_greedy_the_base_first(capsys, client, server, demo, raw):
    answers = compare_json(capsys, server.target, *(["--raw"] if raw else []))
    assert [(a["model"], a["adapter"]) for a in answers] == (
        [(demo.model_dir.name, None)] + [(name, name) for name in sorted(DEMO_ADAPTERS)])
    assert set(answers[0]) == {"model", "adapter", "text", "prompt_tokens", "completion_tokens",
                               "finish_reason", "seconds", "tokens_per_second",
                               "time_to_first_token"}
    assert_greedy(answers, client, chat=not raw)
    raw_prompt = len(client.tokenize(PROMPT, add_special_tokens=True))
    assert (answers[0]["prompt_tokens"] == raw_prompt) == raw  # the template added tokens


def test_compare_all_is_the_default_and_adapters_picks_in_the_order_given(capsys, server, demo):
    every = compare_json(capsys, server.target, "--all")
    assert [a["adapter"] for a in every] == [None] + sorted(DEMO_ADAPTERS)
    picked = compare_json(capsys, server.target, "--adapters", "attn-r8, attn-r4,attn-r8")
    assert [a["adapter"] for a in picked] == [None, "attn-r8", "attn-r4"]


def test_without_a_chat_template_compare_sends_the_prompt_as_is(capsys, plain_server,
                                                                 monkeypatch):
    monkeypatch.setenv("LORAPLEX_TOKEN", TOKEN)
    answers = compare_json(capsys, plain_server.target)
    assert [a["model"] for a in answers] == [NO_TEMPLATE, "attn-r4"]
    with LoraplexClient(plain_server.target, token=TOKEN, timeout=120) as client:
        assert_greedy(answers, client, chat=False)
        with pytest.raises(LoraplexError) as error:  # what asking for the template would give
            client.generate(PROMPT, chat=True)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("names", ["attn-r4,no-such-adapter", "no-such-adapter"])
def test_an_unknown_adapter_is_one_line_and_nothing_else(capsys, server, names):
    status, out, err = compare(capsys, server.target, "--adapters", names)
    assert (status, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("loraplex-client: error: NOT_FOUND: adapter 'no-such-adapter' is not "
                          "registered (this server's adapters: all-r16, ")


def test_an_adapter_the_server_cannot_serve_is_unknown_too(capsys, plain_server, monkeypatch):
    monkeypatch.setenv("LORAPLEX_TOKEN", TOKEN)
    status, out, err = compare(capsys, plain_server.target, "--adapters", "broken")
    assert (status, out) == (1, "")
    assert "NOT_FOUND: adapter 'broken' is not registered" in err


def test_without_the_token_compare_says_to_give_it(capsys, plain_server, monkeypatch):
    for name in ("LORAPLEX_TOKEN", "LORAPLEX_INFERENCE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    status, out, err = compare(capsys, plain_server.target)
    assert (status, out) == (1, "")
    assert err.startswith("loraplex-client: error: UNAUTHENTICATED: ")
    assert "--token-file FILE" in err and len(err.splitlines()) == 1


def test_adapters_and_all_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", PROMPT, "--all", "--adapters", "attn-r4"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---- the grid ----------------------------------------------------------------------------------

def test_off_a_terminal_the_grid_is_printed_once_without_escape_codes(capsys, server, demo,
                                                                      monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    status, out, err = compare(capsys, server.target, "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert status == 0, err
    lines = out.splitlines()
    headers = [demo.model_dir.name + " (base)"] + sorted(DEMO_ADAPTERS)
    firsts = [cell.strip() for line in lines for cell in line.split(" | ")]
    assert all(header in firsts for header in headers), out
    assert out.count(f"{MAX_NEW_TOKENS} tok, ") == len(headers)
    assert "\x1b" not in out and all(len(line) <= 100 for line in lines)


def test_on_a_terminal_the_last_frame_holds_every_answer(capsys, server, demo, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    status, out, err = compare(capsys, server.target, "--max-new-tokens", str(MAX_NEW_TOKENS),
                               "--adapters", "attn-r4")
    assert status == 0, err
    last = out.split("\x1b[J")[-1]  # after the last redraw's clearing, if any
    assert demo.model_dir.name + " (base)" in last and "attn-r4" in last


def answers(count: int, text: str) -> list[Answer]:
    return [Answer(f"m{i}", None if i == 0 else f"m{i}", text=text, tokens=3, started=1.0,
                   first_token=1.5, ended=2.0, finish_reason="length") for i in range(count)]


@pytest.mark.parametrize("width, columns", [(30, 1), (2 * MIN_COLUMN + 3, 2), (80, 2),
                                            (120, 3), (400, 6)])
def test_the_grid_puts_as_many_panels_in_a_row_as_the_width_holds(width, columns):
    lines = grid(answers(6, "word " * 40), width)
    assert lines[0].count(" | ") == columns - 1
    assert all(len(line) <= max(width, MIN_COLUMN) for line in lines)
    assert lines[0].split(" | ")[0].strip() == "m0 (base)"
    assert lines[1].split(" | ")[0].strip() == "3 tok, 3.0 tok/s, length"


def test_the_grid_shows_control_characters_as_replacement_characters():
    lines = grid(answers(1, "red \x1b[31mtext\x1b[0m\rline\x07\nnext\tline"), 80)
    assert not any(c in "".join(lines) for c in "\x1b\r\x07\t")
    assert lines[3:] == ["red \ufffd[31mtext\ufffd[0m\ufffdline\ufffd", "next    line"]


def test_a_live_frame_fits_the_terminal_and_replaces_the_last(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "20")
    writes = []

    class Terminal:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    live = LiveGrid(answers(3, "word " * 200), out=Terminal())
    live()
    live()
    first = writes[0].splitlines()
    assert len(first) <= 19 and all(len(line) < 80 for line in first)
    assert writes[1].startswith(f"\x1b[{len(first)}F\x1b[J")
    assert writes[1].removeprefix(f"\x1b[{len(first)}F\x1b[J") == writes[0]
    live.finish()  # every line of every text, whatever the height
    assert writes[2].count("word") == 3 * 200
