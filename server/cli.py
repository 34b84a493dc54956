"""The `loraplex` command line: demo assets, one-off generation, the server.

Errors a user can fix (a missing model, a bad adapter, a bad flag) print one line and exit with
the code of their kind (`EXIT_CODES`); only bugs print a traceback.
"""

from __future__ import annotations

import argparse
import functools
import asyncio
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loraplex never downloads weights at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from server.config import (DemoConfig, EngineConfig, LogConfig,  # noqa: E402
                           RegistryConfig, ServerConfig, add_arguments, from_arguments)
from server.errors import DOMAIN_ERRORS, ConfigError, ErrorKind, kind_of  # noqa: E402

log = logging.getLogger("loraplex")

EXIT_CODES = {kind: 2 for kind in ErrorKind}
"""Every error a user can fix exits 2 (as argparse does for a bad flag); a bug exits 1."""

COST_ENGINE_FIELDS = ("model", "quantize", "dtype", "lora_dtype", "max_slots", "max_rank")
"""The serve flags `loraplex cost` takes: what the served model and slot tables weigh."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(from_arguments(args, LogConfig))
    _quiet_libraries()
    try:
        return args.run(args) or 0
    except DOMAIN_ERRORS as exc:
        print(f"loraplex: error: {exc}", file=sys.stderr)
        return EXIT_CODES[kind_of(exc)]
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=(
        "Serve many LoRA adapters on one quantized base model."))
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build the demo model and adapters (offline, cached)")
    _add_common_flags(demo)
    demo.set_defaults(run=_run_demo)

    generate = commands.add_parser("generate", help="generate once from a prompt and exit")
    _add_engine_flags(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--adapter", default=None, help="adapter name (default: base model)")
    generate.add_argument("--mix", action="append", default=[], metavar="NAME=WEIGHT",
                          help="an adapter of a weighted mixture, instead of --adapter "
                               "(repeatable, up to 4)")
    generate.add_argument("--combination", default="linear",
                          help="how --mix combines the adapters: linear, cat, svd or ties")
    generate.add_argument("--density", type=float, default=None,
                          help="ties: the fraction of each tensor's entries kept, (0, 1]")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.set_defaults(run=_run_generate)

    serve = commands.add_parser("serve", help="start the server (gRPC, and HTTP and metrics "
                                              "when their ports are set)")
    _add_engine_flags(serve)
    add_arguments(serve, RegistryConfig)
    add_arguments(serve, ServerConfig)
    serve.set_defaults(run=_run_serve)

    cost = commands.add_parser("cost", help="memory of one base + N adapters against N fully "
                                            "fine-tuned copies: a table and a PNG chart")
    add_arguments(cost, EngineConfig, only=COST_ENGINE_FIELDS)
    cost.add_argument("--adapter-dir", action="append", default=[], metavar="NAME=PATH",
                      help="a PEFT adapter directory (repeatable); without --model the demo "
                           "adapters are added too")
    cost.add_argument("--out", default="cost.png", help="where to write the PNG chart")
    cost.add_argument("--max-adapters", type=int, default=1000, help="largest N on the chart")
    cost.add_argument("--throughput-requests", type=int, default=8,
                      help="requests per adapter for the measured throughput line: all of them "
                           "in one shared batch, then one batch per adapter in turn (as separate "
                           "copies would serve them on this machine); 0 = skip")
    _add_common_flags(cost)
    cost.set_defaults(run=_run_cost)
    return parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, EngineConfig)
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="NAME=PATH",
                        help="a PEFT adapter directory served as NAME (repeatable; `serve` "
                             "registers it in the adapter store); without --model the demo "
                             "adapters are added too")
    _add_common_flags(parser)


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, DemoConfig)
    add_arguments(parser, LogConfig)


def _demo_assets(args):
    """The demo chosen by --demo, built into the cache on first use."""
    demo = from_arguments(args, DemoConfig)
    if demo.demo == "tiny":
        from server.tools.demo import build_demo

        return build_demo(demo.cache_path, progress=_progress)
    from server.tools.smollm2_demo import build_smollm2_demo

    return build_smollm2_demo(demo.cache_path, progress=_progress)


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

    mixture = _mixture(args)  # checked before the model loads
    core = _load_core(args)
    params = SamplingParams.given(max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed)
    core.add_request(GenerationRequest(prompt=args.prompt, adapter_id=args.adapter, params=params,
                                       mixture=mixture))
    started = time.monotonic()
    pieces, reason, count = [], None, 0
    while core.has_work():
        for out in core.step():
            pieces.append(out.new_text)
            count += len(out.new_token_ids)
            reason = out.finish_reason or reason
    print("".join(pieces))
    log.info("%d tokens in %.2f s, finish reason %s", count, time.monotonic() - started, reason)


def _mixture(args):
    """The --mix NAME=WEIGHT adapters as a mixture, or None."""
    from adapters_registry.mixtures import AdapterMix

    if not args.mix:
        return None
    names, weights = [], []
    for value in args.mix:
        name, _, weight = value.rpartition("=")
        try:
            weights.append(float(weight))
        except ValueError:
            raise ConfigError(f"--mix expects NAME=WEIGHT, got {value!r}") from None
        names.append(name)
    mixture = AdapterMix(tuple(names), tuple(weights), args.combination, args.density)
    mixture.validate()
    return mixture


def _run_serve(args) -> None:
    from adapters_registry.store import AdapterStore
    from server.app import serve

    registry_config = from_arguments(args, RegistryConfig)
    server_config = from_arguments(args, ServerConfig)
    max_rank = from_arguments(args, EngineConfig).max_rank  # flag errors now, before the port opens
    store_path = registry_config.store_path(from_arguments(args, DemoConfig).cache_path)
    opened = []

    def load():
        from server.engine.core import make_registry
        from server.engine.threads import background

        store = AdapterStore(store_path, keep_versions=registry_config.keep_versions,
                             worker_init=functools.partial(background,
                                                           registry_config.load_nice))
        opened.append(store)
        core = _load_core(args, registry=lambda spec: make_registry(
            spec, max_rank, store=store, config=registry_config))
        opened.append(core.registry)
        log.info("adapter store %s: %d adapters", store.root, len(store))
        return core

    try:
        asyncio.run(serve(load, server_config))
    finally:
        for resource in reversed(opened):
            resource.close()


def _run_cost(args) -> None:
    """Loads the engine on CPU as `serve` would (quantized base, slot tables reserved, the
    adapters resident), prints the table, writes the chart, and measures what sharing a batch
    is worth."""
    from server.engine.core import load_engine_core
    from server.model.memory import cost_report
    from server.tools.cost import format_table, measure_batch_sharing, write_chart

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
    leases = [core.registry.acquire(name).result() for name in adapters]
    report = cost_report(core.model, {lease.key.name: lease.weights for lease in leases},
                         config.model)
    for lease in leases:
        core.registry.release(lease)
    print(format_table(report))
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font cache notices
    write_chart(report, args.out, max_adapters=args.max_adapters)
    print(f"chart: {args.out}")
    if args.throughput_requests:
        print(measure_batch_sharing(core, list(adapters), args.throughput_requests))


def _load_core(args, registry=None):
    """The engine core, its registry holding the --adapter-dir adapters (and, without --model,
    the demo's); `registry(spec)` opens a durable registry (serve), None: in RAM."""
    from server.engine.core import load_engine_core

    config = from_arguments(args, EngineConfig)
    adapters = _with_demo(args, config)
    log.info("loading %s (quantize=%s) with %d adapters", config.model, config.quantize,
             len(adapters))
    started = time.monotonic()
    core = load_engine_core(config, adapters, registry=registry)
    log.info("ready in %.1f s: %s on %s, %d KV blocks of %d tokens, %d adapter slots (rank <= %d)",
             time.monotonic() - started, core.model.name, core.model.device, core.kv.num_blocks,
             core.kv.block_size, config.max_slots, config.max_rank)
    return core


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


def _configure_logging(config: LogConfig) -> None:
    """Text lines, or one JSON object per line (`--log-format json`), from `--log-level` up."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        from server.api.request_log import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level, handlers=[handler])


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


if __name__ == "__main__":
    sys.exit(main())
