"""Security rules at the server's boundary, over gRPC: tokens, names, sources, pickles, size caps,
TLS and mTLS.

Already covered elsewhere, not repeated here: the four credentials on GetServerInfo and a
tokenless upload (tests/test_admin_service.py), names at the store and parser level
(tests/test_adapter_store.py, tests/test_adapter_validation.py), source paths and symlinks at the
function level (tests/test_adapter_sources.py), pickles at the parser level
(tests/test_adapter_validation.py), and mTLS with and without a client certificate on a real
server (tests/test_grpc_server_process.py).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from adapters_registry.peft_format import CONFIG_FILE, WEIGHTS_FILE
from adapters_registry.registry import AdapterRegistry
from adapters_registry.store import AdapterStore
from loraplex.v1 import admin_pb2 as apb
from loraplex.v1 import admin_pb2_grpc
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from server.api.auth import server_credentials
from server.serving import Tokens
from server.config import ServerConfig
from tests.certificates import write_certificates
from tests.engine_helpers import make_core
from tests.inprocess_server import serving
from tests.server_process import LORAPLEX, start_server
from tests.test_adapter_store import tree_digest

ADMIN = [("authorization", "Bearer admin-token")]
INFERENCE = [("authorization", "Bearer inference-token")]
MAX_ADAPTER_BYTES = 256 << 10
CONVERT = "convert them to safetensors"
CHUNK = 1 << 16


class TouchesWhenUnpickled:
    """A pickle whose loading creates the file `marker`: what a malicious adapter_model.bin
    could do with any other code instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(TouchesWhenUnpickled(marker))


def test_the_planted_pickle_is_live(tmp_path):
    """The payload the tests below plant really runs code when unpickled."""
    pickle.loads(malicious_pickle(tmp_path / "proof"))
    assert (tmp_path / "proof").exists()


@pytest.fixture(scope="module")
def secured(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    """(channel, registry, sources root, markers dir): admin and inference tokens, adapters
    registered from `sources` only, adapter files capped at 256 KiB."""
    root = tmp_path_factory.mktemp("security")
    sources, markers = root / "sources", root / "markers"
    markers.mkdir()
    shutil.copytree(tiny_adapter_dirs["attn-r4"], sources / "good")
    def open_registry(spec):
        return AdapterRegistry(AdapterStore(root / "store"), spec, max_rank=64,
                               cache_bytes=16 << 20, allowed_roots=[sources],
                               max_adapter_bytes=MAX_ADAPTER_BYTES)

    core = make_core(tiny_model_dir, {}, max_slots=2, registry=open_registry)
    registry = core.registry
    registry.register("kept", (sources / "good" / CONFIG_FILE).read_bytes(),
                      (sources / "good" / WEIGHTS_FILE).read_bytes())
    with serving(core, tokens=Tokens(admin=b"admin-token",
                                               inference=b"inference-token")) as (channel, _):
        yield channel, registry, sources, markers
    registry.close()
    registry.store.close()


@pytest.fixture
def admin(secured):
    return admin_pb2_grpc.AdminStub(secured[0])


def upload(name: str, config: bytes, weights: bytes, *, size: int | None = None):
    yield apb.UploadAdapterRequest(header=apb.UploadHeader(
        name=name, adapter_config_json=config.decode(), sha256=hashlib.sha256(weights).hexdigest(),
        size=len(weights) if size is None else size))
    for i in range(0, len(weights), CHUNK):
        yield apb.UploadAdapterRequest(chunk=weights[i:i + CHUNK])


def good_files(secured) -> tuple[bytes, bytes]:
    good = secured[2] / "good"
    return (good / CONFIG_FILE).read_bytes(), (good / WEIGHTS_FILE).read_bytes()


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value


# ---- tokens: every Admin method, and a refused call changes nothing -----------------------------

ADMIN_CALLS = {
    "UploadAdapter": lambda s, files: upload("new", *files),
    "RegisterAdapter": lambda s, files: apb.RegisterAdapterRequest(
        name="new", source=str(s[2] / "good")),
    "GetAdapter": lambda s, files: apb.GetAdapterRequest(name="kept"),
    "ListAdapters": lambda s, files: apb.ListAdaptersRequest(),
    "DeleteAdapter": lambda s, files: apb.DeleteAdapterRequest(name="kept"),
    "PinAdapter": lambda s, files: apb.PinAdapterRequest(name="kept"),
    "UnpinAdapter": lambda s, files: apb.UnpinAdapterRequest(name="kept"),
    "GetServerInfo": lambda s, files: apb.GetServerInfoRequest(),
}


@pytest.mark.parametrize("metadata, code", [
    ([], grpc.StatusCode.UNAUTHENTICATED),
    ([("authorization", "Bearer not-the-token")], grpc.StatusCode.UNAUTHENTICATED),
    ([("authorization", "Basic YWRtaW46YWRtaW4=")], grpc.StatusCode.UNAUTHENTICATED),
    (INFERENCE, grpc.StatusCode.PERMISSION_DENIED),
], ids=["none", "wrong", "basic", "inference-token"])
@pytest.mark.parametrize("method", sorted(ADMIN_CALLS))
def test_every_admin_method_refuses_without_the_admin_token_and_does_nothing(
        secured, admin, method, metadata, code):
    store = secured[1].store
    before = tree_digest(store.root)
    error = refused(getattr(admin, method), ADMIN_CALLS[method](secured, good_files(secured)),
                    metadata=metadata)
    assert error.code() == code
    assert tree_digest(store.root) == before and not secured[1].is_pinned("kept")


# ---- names and sources --------------------------------------------------------------------------

ODD_NAMES = ["../kept", "..", "a/b/c", "org/../kept", "/etc/passwd", "a\\b", ".hidden", "-x", "a..b", "x" * 129,
             "", "名前", "a b", "kept\n", "kept\x00"]


@pytest.mark.parametrize("name", ODD_NAMES, ids=[repr(n)[:24] for n in ODD_NAMES])
def test_odd_names_are_invalid_for_every_admin_call_and_change_nothing(secured, admin, name):
    store = secured[1].store
    before = tree_digest(store.root)
    calls = [(admin.UploadAdapter, upload(name, *good_files(secured))),
             (admin.RegisterAdapter, apb.RegisterAdapterRequest(
                 name=name, source=str(secured[2] / "good"))),
             (admin.GetAdapter, apb.GetAdapterRequest(name=name)),
             (admin.DeleteAdapter, apb.DeleteAdapterRequest(name=name)),
             (admin.PinAdapter, apb.PinAdapterRequest(name=name)),
             (admin.UnpinAdapter, apb.UnpinAdapterRequest(name=name))]
    for call, request in calls:
        error = refused(call, request, metadata=ADMIN)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (call, error.details())
    if name:  # "" names the base model
        error = refused(inference_pb2_grpc.InferenceStub(secured[0]).Generate,
                        pb.GenerateRequest(prompt="x", adapter_id=name), metadata=INFERENCE)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert tree_digest(store.root) == before


@pytest.mark.parametrize("escape", ["dotdot", "symlinked directory", "symlinked weights",
                                    "absolute outside", "file scheme"])
def test_register_cannot_read_outside_the_allowed_roots(secured, admin, tmp_path, escape):
    sources = secured[2]
    outside = tmp_path / "outside"
    shutil.copytree(sources / "good", outside)
    source = {"dotdot": lambda: f"{sources}/{os.path.relpath(outside, sources)}",
              "symlinked directory": lambda: _link(sources / f"link-{tmp_path.name}", outside),
              "symlinked weights": lambda: _weights_link(sources / f"half-{tmp_path.name}",
                                                         outside),
              "absolute outside": lambda: str(outside),
              "file scheme": lambda: f"file://{sources / 'good'}"}[escape]()
    before = tree_digest(secured[1].store.root)
    error = refused(admin.RegisterAdapter, apb.RegisterAdapterRequest(name="escape",
                                                                      source=source),
                    metadata=ADMIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "outside" in error.details() or "not under" in error.details() or \
        "unsupported scheme" in error.details()
    assert tree_digest(secured[1].store.root) == before


def _link(link: Path, target: Path) -> str:
    link.symlink_to(target)
    return str(link)


def _weights_link(directory: Path, outside: Path) -> str:
    directory.mkdir()
    shutil.copy(outside / CONFIG_FILE, directory / CONFIG_FILE)
    (directory / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
    return str(directory)


# ---- pickles ------------------------------------------------------------------------------------

def test_register_refuses_a_pickle_adapter_without_opening_it(secured, admin):
    _, registry, sources, markers = secured
    marker = markers / "register"
    evil = sources / "evil"
    evil.mkdir()
    shutil.copy(sources / "good" / CONFIG_FILE, evil / CONFIG_FILE)
    (evil / "adapter_model.bin").write_bytes(malicious_pickle(marker))
    before = tree_digest(registry.store.root)
    error = refused(admin.RegisterAdapter, apb.RegisterAdapterRequest(name="evil",
                                                                      source=str(evil)),
                    metadata=ADMIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert CONVERT in error.details() and "adapter_model.bin" in error.details()
    assert not marker.exists() and tree_digest(registry.store.root) == before


def test_a_pickle_next_to_safetensors_is_ignored_not_opened(secured, admin):
    _, registry, sources, markers = secured
    marker = markers / "beside"
    both = sources / "both"
    shutil.copytree(sources / "good", both)
    (both / "adapter_model.bin").write_bytes(malicious_pickle(marker))
    info = admin.RegisterAdapter(apb.RegisterAdapterRequest(name="both", source=str(both)),
                                 metadata=ADMIN)
    assert info.weights_sha256 == hashlib.sha256(good_files(secured)[1]).hexdigest()
    assert not marker.exists()


def test_pickle_bytes_uploaded_as_safetensors_are_refused_unopened(secured, admin):
    _, registry, _, markers = secured
    marker = markers / "upload"
    before = tree_digest(registry.store.root)
    error = refused(admin.UploadAdapter, upload("evil", good_files(secured)[0],
                                                malicious_pickle(marker)), metadata=ADMIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not marker.exists() and tree_digest(registry.store.root) == before


def test_serve_refuses_a_pickle_adapter_dir_at_start(demo_cache, tmp_path, tiny_adapter_dirs):
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(tiny_adapter_dirs["attn-r4"] / CONFIG_FILE, evil / CONFIG_FILE)
    marker = tmp_path / "marker"
    (evil / "adapter_model.bin").write_bytes(malicious_pickle(marker))
    result = subprocess.run(
        LORAPLEX + ["serve", "--port", "0", "--quantize", "none", "--kv-cache-mb", "16",
                    "--threads", "1", "--store", str(tmp_path / "store"),
                    "--adapter-dir", f"evil={evil}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LORAPLEX_CACHE_DIR": str(demo_cache)})
    assert result.returncode == 2, result.stderr
    assert "loraplex: error: adapter 'evil'" in result.stderr and CONVERT in result.stderr
    assert not marker.exists()


# ---- upload size caps ---------------------------------------------------------------------------

def header_then_wait(header: apb.UploadHeader, then: bytes, release: threading.Event):
    """The header, `then` as one chunk if any, and then nothing until `release` is set: the
    stream stays open, so an answer can only come from what was sent so far."""
    yield apb.UploadAdapterRequest(header=header)
    if then:
        yield apb.UploadAdapterRequest(chunk=then)
    release.wait(60)


def test_an_oversized_header_is_refused_before_any_byte_is_sent(secured, admin):
    config, _ = good_files(secured)
    release = threading.Event()
    header = apb.UploadHeader(name="huge", adapter_config_json=config.decode(), sha256="0" * 64,
                              size=MAX_ADAPTER_BYTES + 1)
    try:
        error = refused(admin.UploadAdapter, header_then_wait(header, b"", release),
                        metadata=ADMIN, timeout=30)
    finally:
        release.set()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"exceeds the server's limit of {MAX_ADAPTER_BYTES} bytes" in error.details()


def test_more_bytes_than_announced_are_refused_as_they_arrive(secured, admin):
    config, weights = good_files(secured)
    release = threading.Event()
    header = apb.UploadHeader(name="more", adapter_config_json=config.decode(),
                              sha256=hashlib.sha256(weights).hexdigest(), size=len(weights) - 1)
    try:
        error = refused(admin.UploadAdapter, header_then_wait(header, weights, release),
                        metadata=ADMIN, timeout=30)
    finally:
        release.set()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"more than the {len(weights) - 1} bytes the header announced" in error.details()


# ---- TLS and mTLS -------------------------------------------------------------------------------

def pki(directory: Path) -> dict[str, Path]:
    directory.mkdir()
    return write_certificates(directory)


def test_tls_without_client_certificates_still_needs_the_tokens(tiny_model_dir, tmp_path):
    pem, other = pki(tmp_path / "pki"), pki(tmp_path / "other-pki")
    credentials = server_credentials(ServerConfig(tls_cert_file=str(pem["server.pem"]),
                                                  tls_key_file=str(pem["server.key"])))
    core = make_core(tiny_model_dir, {}, max_slots=1)
    request = pb.GenerateRequest(prompt_token_ids=[1, 2], params=pb.SamplingParams(
        max_new_tokens=2))
    with serving(core, tokens=Tokens(admin=None, inference=b"inference-token"),
                 credentials=credentials) as (_, running):
        target = f"127.0.0.1:{running.port}"
        trusted = grpc.ssl_channel_credentials(pem["ca.pem"].read_bytes())
        with grpc.secure_channel(target, trusted) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            assert len(stub.Generate(request, metadata=INFERENCE, timeout=60).token_ids) == 2
            assert refused(stub.Generate, request, timeout=60).code() == \
                grpc.StatusCode.UNAUTHENTICATED
        untrusting = grpc.ssl_channel_credentials(other["ca.pem"].read_bytes())
        for channel in (grpc.secure_channel(target, untrusting), grpc.insecure_channel(target)):
            with channel:
                error = refused(inference_pb2_grpc.InferenceStub(channel).Generate, request,
                                metadata=INFERENCE, timeout=30)
                assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_process_refuses_foreign_certificates_and_keeps_admin_rules(
        demo_cache, tmp_path):
    pem, foreign = pki(tmp_path / "pki"), pki(tmp_path / "foreign-pki")
    (tmp_path / "admin-token").write_text("admin-token")
    attn = demo_cache / "demo" / "v1" / "adapters" / "attn-r4"
    config, weights = (attn / CONFIG_FILE).read_bytes(), (attn / WEIGHTS_FILE).read_bytes()
    process = start_server(
        "--threads", "1", "--quantize", "none", "--kv-cache-mb", "16",
        "--store", str(tmp_path / "store"), "--admin-token-file", str(tmp_path / "admin-token"),
        "--max-adapter-mb", "5",  # the demo adapters registered at start are up to 4.8 MiB
        "--tls-cert-file", str(pem["server.pem"]), "--tls-key-file", str(pem["server.key"]),
        "--tls-client-ca-file", str(pem["ca.pem"]),
        env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    try:
        ours = grpc.ssl_channel_credentials(pem["ca.pem"].read_bytes(),
                                            pem["client.key"].read_bytes(),
                                            pem["client.pem"].read_bytes())
        with grpc.secure_channel(process.target, ours) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            info = stub.UploadAdapter(upload("tls", config, weights), metadata=ADMIN, timeout=60)
            assert info.name == "tls"
            assert refused(stub.GetAdapter, apb.GetAdapterRequest(name="tls"),
                           timeout=60).code() == grpc.StatusCode.UNAUTHENTICATED
            release = threading.Event()
            header = apb.UploadHeader(name="huge", adapter_config_json=config.decode(),
                                      sha256="0" * 64, size=5 * 2**20 + 1)
            try:
                error = refused(stub.UploadAdapter, header_then_wait(header, b"", release),
                                metadata=ADMIN, timeout=30)
            finally:
                release.set()
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "(--max-adapter-mb)" in error.details()
        theirs = grpc.ssl_channel_credentials(pem["ca.pem"].read_bytes(),  # signed by another CA
                                              foreign["client.key"].read_bytes(),
                                              foreign["client.pem"].read_bytes())
        with grpc.secure_channel(process.target, theirs) as channel:
            error = refused(admin_pb2_grpc.AdminStub(channel).GetServerInfo,
                            apb.GetServerInfoRequest(), metadata=ADMIN, timeout=30)
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake is refused
    finally:
        assert process.stop(signal.SIGTERM) == 0, process.output()
