"""`loraplex-client`: the Python client from a shell.

Tokens come from files or the environment, never from a flag (flags are visible in `ps`).
Errors: one line `loraplex-client: error: CODE: details (what to do)` on stderr and exit status
1 (`explain`); usage errors exit 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from google.protobuf.message import Message
from tqdm import tqdm

from clients import compare
from clients._common import DEFAULT_TARGET, AdapterInfo, LoraplexError, ServerInfo
from clients.sync import LoraplexClient

PROG = "loraplex-client"
MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    token = _token(parser, args.token_file, "LORAPLEX_TOKEN", "LORAPLEX_INFERENCE_TOKEN")
    admin_token = _token(parser, args.admin_token_file, "LORAPLEX_ADMIN_TOKEN")
    try:
        with LoraplexClient(args.target, token=token, admin_token=admin_token,
                            root_certificates=args.tls_ca, client_certificate=args.tls_cert,
                            client_key=args.tls_key) as client:
            args.run(client, args)
    except LoraplexError as error:
        print(f"{PROG}: error: {explain(error, args.command, args.target)}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


ADMIN_COMMANDS = {"upload", "register", "list", "get", "delete", "pin", "unpin", "info"}
"""The commands that call the Admin service (it exists only on a server with an admin token)."""

WHAT_TO_DO = {
    "UNAVAILABLE": "is a loraplex server running at {target}? (--target or LORAPLEX_TARGET)",
    "UNAUTHENTICATED": "give the server's token: --token-file FILE or LORAPLEX_TOKEN (admin "
                       "commands: --admin-token-file FILE or LORAPLEX_ADMIN_TOKEN)",
    "PERMISSION_DENIED": "this token may not do that: admin commands need the admin token",
    "RESOURCE_EXHAUSTED": "the server is busy: retry in a moment",
    "DEADLINE_EXCEEDED": "the server did not answer in time: retry, or check its load",
    "UNIMPLEMENTED": "the server does not offer this call: is it a loraplex server of this "
                     "version?",
    "INTERNAL": "a server error: its log says more",
    "UNKNOWN": "a server error: its log says more",
}
"""What to do after an error, by gRPC status; the others (NOT_FOUND, INVALID_ARGUMENT, ...)
carry the server's own reason, which says it."""


def explain(error: LoraplexError, command: str, target: str) -> str:
    """One line: the status, the server's reason (gRPC's own text flattened), what to do."""
    code = error.code.name
    if code == "UNIMPLEMENTED" and command in ADMIN_COMMANDS:
        return ("UNIMPLEMENTED: this server has no admin API: start it with "
                "--admin-token-file FILE")
    details = " ".join(error.details.split())
    hint = WHAT_TO_DO.get(code)
    line = f"{code}: {details}" if details else code
    return f"{line} ({hint.format(target=target)})" if hint else line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Talk to a loraplex server.")
    parser.add_argument("--target", default=os.environ.get("LORAPLEX_TARGET", DEFAULT_TARGET),
                        help="HOST:PORT of the server (env LORAPLEX_TARGET; default %(default)s)")
    parser.add_argument("--token-file", help="file holding the inference token (or env "
                                             "LORAPLEX_TOKEN / LORAPLEX_INFERENCE_TOKEN)")
    parser.add_argument("--admin-token-file",
                        help="file holding the admin token (or env LORAPLEX_ADMIN_TOKEN)")
    parser.add_argument("--tls-ca", help="PEM root certificates: use TLS")
    parser.add_argument("--tls-cert", help="PEM client certificate chain (mTLS, with --tls-key)")
    parser.add_argument("--tls-key", help="PEM client private key (mTLS, with --tls-cert)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    params = argparse.ArgumentParser(add_help=False)
    params.add_argument("prompt")
    params.add_argument("--max-new-tokens", type=int)
    params.add_argument("--temperature", type=float, help="0 = greedy")
    params.add_argument("--top-p", type=float)
    params.add_argument("--top-k", type=int)
    params.add_argument("--seed", type=int)
    params.add_argument("--stop", action="append", help="a stop string (repeatable)")
    sampling = argparse.ArgumentParser(add_help=False, parents=[params])
    sampling.add_argument("--adapter", help="adapter name (default: the base model)")
    sampling.add_argument("--mix", action="append", metavar="NAME=WEIGHT", type=_mix_part,
                          help="an adapter of a weighted mixture, instead of --adapter "
                               "(repeatable, up to 4)")
    sampling.add_argument("--combination", choices=("linear", "cat", "svd", "ties"),
                          help="how --mix combines the adapters (default: linear)")
    sampling.add_argument("--density", type=float,
                          help="ties: the fraction of each tensor's entries kept, (0, 1]")
    sampling.add_argument("--chat", action="store_true",
                          help="send the prompt as a user message: the server renders it with "
                               "the model's chat template")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")
    name = argparse.ArgumentParser(add_help=False)
    name.add_argument("name")

    def command(verb, run, summary, parents=()):
        sub = commands.add_parser(verb, help=summary, parents=list(parents))
        sub.set_defaults(run=run)
        return sub

    command("generate", _generate, "print a whole completion", [sampling])
    command("stream", _stream, "print a completion as it is produced", [sampling])
    _compare_command(command("compare", _compare, "one prompt to the base model and adapters at "
                             "once, answers side by side", [params, as_json]))
    upload = command("upload", _upload, "upload a PEFT adapter directory", [name, as_json])
    upload.add_argument("directory", help="holds adapter_config.json and adapter_model.safetensors")
    upload.add_argument("--version", type=int, help="default: the stored version + 1")
    register = command("register", _register, "have the server fetch an adapter", [name, as_json])
    register.add_argument("source", help="s3://bucket/prefix or a directory the server can read")
    command("list", _list, "list the adapters", [as_json])
    command("get", _get, "show one adapter", [name, as_json])
    command("delete", _delete, "delete an adapter", [name])
    command("pin", _pin, "keep an adapter in host memory", [name, as_json])
    command("unpin", _unpin, "let an adapter be evicted again", [name, as_json])
    command("info", _info, "show the server's model, capacity and memory use", [as_json])
    return parser


def _compare_command(sub: argparse.ArgumentParser) -> None:
    sub.description = (
        "Sends the prompt to the base model and to adapters (default: every adapter) at once "
        "and prints the answers side by side, the base model's first: redrawn as they stream "
        "on a terminal, with tokens and tokens/s (over the whole request); --json: one list "
        "once all have ended. The server applies the model's chat template when it has one, "
        "unless --raw.")
    chosen = sub.add_mutually_exclusive_group()
    chosen.add_argument("--adapters", metavar="A,B,...", help="only these adapters")
    chosen.add_argument("--all", action="store_true", help="every adapter (the default)")
    sub.add_argument("--raw", action="store_true",
                     help="send the prompt as is, without the chat template")


def _token(parser: argparse.ArgumentParser, path: str | None, *env: str) -> str | None:
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as error:
            parser.error(f"cannot read token file: {error}")
        if not token:
            parser.error(f"token file {path} is empty")
        return token
    return next((os.environ[name].strip() for name in env if os.environ.get(name, "").strip()),
                None)


# Commands


def _params(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)


def _sampling(args) -> dict:
    mixture = None
    if args.mix:
        mixture = {"adapters": [name for name, _ in args.mix],
                   "weights": [weight for _, weight in args.mix],
                   "combination_type": args.combination, "density": args.density}
    elif args.combination or args.density is not None:
        raise SystemExit("--combination and --density go with --mix NAME=WEIGHT")
    return dict(adapter=args.adapter, adapter_mixture=mixture, chat=args.chat, **_params(args))


def _mix_part(value: str) -> tuple[str, float]:
    name, _, weight = value.rpartition("=")
    try:
        return name, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT, got {value!r}") from None


def _generate(client: LoraplexClient, args) -> None:
    print(client.generate(args.prompt, **_sampling(args)).text)


def _stream(client: LoraplexClient, args) -> None:
    for delta in client.stream(args.prompt, **_sampling(args)):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    print()


def _compare(client: LoraplexClient, args) -> None:
    models = client.list_models()
    answers = compare.answers_for(models, args.adapters)
    run = functools.partial(compare.run, client, answers, args.prompt, params=_params(args),
                            chat=models.chat_template and not args.raw)
    if args.json:
        run()
        print(json.dumps([a.as_json() for a in answers], indent=2))
    elif sys.stdout.isatty():
        live = compare.LiveGrid(answers)
        try:
            run(redraw=live)
        finally:
            live.finish()
    else:
        try:
            run()
        finally:
            print("\n".join(compare.grid(answers, shutil.get_terminal_size().columns)))


def _upload(client: LoraplexClient, args) -> None:
    bar = UploadProgress(sys.stderr)
    try:
        info = client.upload_adapter(args.name, args.directory, version=args.version, progress=bar)
    finally:
        bar.close()
    _print_adapter(info, args.json)


def _register(client: LoraplexClient, args) -> None:
    _print_adapter(client.register_adapter(args.name, args.source), args.json)


def _get(client: LoraplexClient, args) -> None:
    _print_adapter(client.get_adapter(args.name), args.json)


def _pin(client: LoraplexClient, args) -> None:
    _print_adapter(client.pin_adapter(args.name), args.json)


def _unpin(client: LoraplexClient, args) -> None:
    _print_adapter(client.unpin_adapter(args.name), args.json)


def _delete(client: LoraplexClient, args) -> None:
    client.delete_adapter(args.name)
    print(f"deleted {args.name}")


def _list(client: LoraplexClient, args) -> None:
    adapters = client.list_adapters()
    if args.json:
        print(json.dumps([_plain(a) for a in adapters], indent=2))
        return
    rows = [("NAME", "VERSION", "RANK", "SIZE", "PINNED", "IN RAM", "RUNNING", "ERROR")]
    rows += [(a.name, str(a.version), str(a.rank), _bytes(a.size_bytes), _yes(a.pinned),
              _yes(a.in_host_memory), str(a.running_requests), a.error) for a in adapters]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _info(client: LoraplexClient, args) -> None:
    info: ServerInfo = client.server_info()
    if args.json:
        print(json.dumps(_plain(info), indent=2))
        return
    m = info.memory
    _print_fields([
        ("version", info.version), ("base_model", info.base_model),
        ("model_type", info.model_type), ("quantization", info.quantization),
        ("device", info.device), ("max_slots", info.max_slots), ("max_rank", info.max_rank),
        ("adapters", f"{info.adapters_stored} stored, {info.adapters_in_host_memory} in host "
                     f"memory, {info.adapters_in_slots} in slots, {info.adapters_pinned} pinned"),
        ("requests", f"{info.running_requests} running, {info.waiting_requests} waiting"),
        ("memory", f"base model {_bytes(m.base_model_bytes)}, KV cache "
                   f"{_bytes(m.kv_cache_bytes)}, adapter slots {_bytes(m.adapter_slot_bytes)}"),
        ("host adapters", f"{_bytes(m.host_adapter_bytes)} of "
                          f"{_bytes(m.host_adapter_limit_bytes)}"),
        ("store", _bytes(m.store_bytes)),
    ])


# Output


def _print_adapter(info: AdapterInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_plain(info), indent=2))
        return
    created = datetime.fromtimestamp(info.created_at, timezone.utc).isoformat(timespec="seconds")
    _print_fields([
        ("name", info.name), ("version", info.version), ("rank", info.rank),
        ("target_modules", ", ".join(info.target_modules)), ("size", _bytes(info.size_bytes)),
        ("weights_sha256", info.weights_sha256), ("config_sha256", info.config_sha256),
        ("created_at", created), ("pinned", _yes(info.pinned)),
        ("in_host_memory", _yes(info.in_host_memory)),
        ("running_requests", info.running_requests),
    ] + ([("error", info.error)] if info.error else []))


def _print_fields(fields: list[tuple[str, object]]) -> None:
    width = max(len(key) for key, _ in fields) + 1
    for key, value in fields:
        print(f"{key + ':':<{width}} {value}".rstrip())


def _plain(value):
    """A message as JSON-ready Python values; unlike json_format, 64-bit integers stay numbers."""
    if isinstance(value, Message):
        return {f.name: _plain(getattr(value, f.name)) for f in value.DESCRIPTOR.fields}
    if isinstance(value, (str, int, float)):
        return value
    return [_plain(item) for item in value]  # a repeated field


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


class UploadProgress:
    """tqdm's progress bar for an upload (`progress(sent, total)` moves it); close() ends it."""

    def __init__(self, out):
        self.out = out
        self.bar = None

    def __call__(self, sent: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc="upload", unit="B", unit_scale=True,
                            unit_divisor=1024, file=self.out)
        self.bar.update(sent - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
