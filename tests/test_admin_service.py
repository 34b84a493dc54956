"""The Admin service's rules, called with raw stubs on an in-process server (tiny model).

Uploads: the header comes first and the bytes must match its size and sha256; anything wrong
is refused before the store changes. Auth: the admin token, never the inference token.
"""

from __future__ import annotations

import hashlib

import grpc
import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters_registry.peft_format import CONFIG_FILE, WEIGHTS_FILE
from adapters_registry.registry import AdapterRegistry
from adapters_registry.store import AdapterStore
from loraplex.v1 import admin_pb2 as apb
from loraplex.v1 import admin_pb2_grpc
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from server.serving import Tokens
from tests.engine_helpers import make_core
from tests.inprocess_server import serving
from tests.test_adapter_store import tree_digest

ADMIN = [("authorization", "Bearer admin-token")]
INFERENCE = [("authorization", "Bearer inference-token")]


@pytest.fixture(scope="module")
def files(tiny_adapter_dirs):
    d = tiny_adapter_dirs["all-r8"]
    return (d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes()


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """(channel, registry) of a server with admin and inference tokens."""
    root = tmp_path_factory.mktemp("admin")
    def open_registry(spec):
        return AdapterRegistry(AdapterStore(root / "store"), spec, max_rank=64,
                               cache_bytes=2**24, allowed_roots=[root],
                               max_adapter_bytes=2**20)

    core = make_core(tiny_model_dir, {}, max_slots=2, registry=open_registry)
    registry = core.registry
    with serving(core, tokens=Tokens(admin=b"admin-token",
                                               inference=b"inference-token")) as (channel, _):
        yield channel, registry
    registry.close()
    registry.store.close()


@pytest.fixture
def admin(served):
    return admin_pb2_grpc.AdminStub(served[0])


def upload_messages(name, config, weights, *, sha=None, size=None, chunk=1000, version=None):
    header = apb.UploadHeader(name=name, adapter_config_json=config.decode(),
                              sha256=sha or hashlib.sha256(weights).hexdigest(),
                              size=len(weights) if size is None else size)
    if version is not None:
        header.version = version
    yield apb.UploadAdapterRequest(header=header)
    for start in range(0, len(weights), chunk):
        yield apb.UploadAdapterRequest(chunk=weights[start:start + chunk])


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value


def test_upload_then_get_list_pin_delete(admin, served, files):
    info = admin.UploadAdapter(upload_messages("up", *files), metadata=ADMIN)
    assert (info.name, info.version, info.rank) == ("up", 1, 8)
    assert info.weights_sha256 == hashlib.sha256(files[1]).hexdigest()
    assert sorted(info.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert admin.GetAdapter(apb.GetAdapterRequest(name="up"), metadata=ADMIN) == info
    pinned = admin.PinAdapter(apb.PinAdapterRequest(name="up"), metadata=ADMIN)
    assert pinned.pinned and pinned.in_host_memory
    assert not admin.UnpinAdapter(apb.UnpinAdapterRequest(name="up"), metadata=ADMIN).pinned
    generated = inference_pb2_grpc.InferenceStub(served[0]).Generate(
        pb.GenerateRequest(prompt_token_ids=[1, 2, 3], adapter_id="up",
                           params=pb.SamplingParams(max_new_tokens=3)), metadata=INFERENCE)
    assert len(generated.token_ids) == 3
    admin.DeleteAdapter(apb.DeleteAdapterRequest(name="up"), metadata=ADMIN)
    error = refused(admin.GetAdapter, apb.GetAdapterRequest(name="up"), metadata=ADMIN)
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_new_upload_under_a_name_is_the_next_version(admin, files):
    admin.UploadAdapter(upload_messages("versioned", *files), metadata=ADMIN)
    tensors = {k: t * 2 for k, t in load_safetensors(files[1]).items()}
    info = admin.UploadAdapter(upload_messages("versioned", files[0], save_safetensors(tensors)),
                               metadata=ADMIN)
    assert info.version == 2
    error = refused(admin.UploadAdapter,
                    upload_messages("versioned", *files, version=2), metadata=ADMIN)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version must be an integer above 2" in error.details()


@pytest.mark.parametrize("case, code, fragment", [
    ("sha256 of other bytes", grpc.StatusCode.INVALID_ARGUMENT, "checksum mismatch"),
    ("size smaller than sent", grpc.StatusCode.INVALID_ARGUMENT, "more than the"),
    ("size larger than sent", grpc.StatusCode.INVALID_ARGUMENT, "upload ended after"),
    ("over the server's limit", grpc.StatusCode.INVALID_ARGUMENT, "exceeds the server's limit"),
    ("bad name", grpc.StatusCode.INVALID_ARGUMENT, "invalid adapter name"),
    ("sha256 not hex", grpc.StatusCode.INVALID_ARGUMENT, "sha256 must be 64"),
    ("chunk before header", grpc.StatusCode.INVALID_ARGUMENT, "first UploadAdapter message"),
    ("no messages", grpc.StatusCode.INVALID_ARGUMENT, "empty upload"),
    ("second header", grpc.StatusCode.INVALID_ARGUMENT, "only the first"),
    ("corrupted in transit", grpc.StatusCode.INVALID_ARGUMENT, "checksum mismatch"),
])
def test_bad_uploads_are_refused_and_change_nothing(admin, served, files, case, code, fragment):
    config, weights = files
    store_root = served[1].store.root
    before = tree_digest(store_root)
    messages = {
        "sha256 of other bytes": lambda: upload_messages("x", config, weights, sha="0" * 64),
        "size smaller than sent": lambda: upload_messages("x", config, weights,
                                                          size=len(weights) - 1),
        "size larger than sent": lambda: upload_messages("x", config, weights,
                                                         size=len(weights) + 1),
        "over the server's limit": lambda: upload_messages("x", config, weights, size=2**21),
        "bad name": lambda: upload_messages("../x", config, weights),
        "sha256 not hex": lambda: upload_messages("x", config, weights, sha="z" * 64),
        "chunk before header": lambda: iter([apb.UploadAdapterRequest(chunk=b"abc")]),
        "no messages": lambda: iter([]),
        "second header": lambda: (m for part in (upload_messages("x", config, weights),
                                                 upload_messages("x", config, weights))
                                  for m in part),
        "corrupted in transit": lambda: _flip_a_byte(upload_messages("x", config, weights)),
    }[case]()
    error = refused(admin.UploadAdapter, messages, metadata=ADMIN)
    assert error.code() == code and fragment in error.details(), error.details()
    assert tree_digest(store_root) == before


def _flip_a_byte(messages):
    for i, message in enumerate(messages):
        if i == 2:
            data = bytearray(message.chunk)
            data[0] ^= 0xFF
            message = apb.UploadAdapterRequest(chunk=bytes(data))
        yield message


def test_malformed_adapter_upload_names_file_and_reason(admin, files):
    config = files[0].replace(b'"peft_type": "LORA"', b'"peft_type": "IA3"')
    error = refused(admin.UploadAdapter, upload_messages("bad", config, files[1]), metadata=ADMIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("adapter 'bad': adapter_config.json: peft_type 'IA3'")


def test_register_from_an_allowed_directory_and_not_elsewhere(admin, served, tiny_adapter_dirs):
    import shutil

    root = served[1].allowed_roots[0]
    shutil.copytree(tiny_adapter_dirs["attn-r4"], root / "attn")
    info = admin.RegisterAdapter(apb.RegisterAdapterRequest(name="attn", source=str(root / "attn")),
                                 metadata=ADMIN)
    assert info.rank == 4
    error = refused(admin.RegisterAdapter, apb.RegisterAdapterRequest(
        name="elsewhere", source=str(tiny_adapter_dirs["attn-r4"])), metadata=ADMIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not under an allowed --adapter-source-roots" in error.details()


def test_list_pages_through_every_adapter_in_name_order(admin, files):
    names = [f"page-{i:02d}" for i in range(7)]
    for name in names:
        admin.UploadAdapter(upload_messages(name, *files), metadata=ADMIN)
    seen, token = [], ""
    while True:
        page = admin.ListAdapters(apb.ListAdaptersRequest(page_size=3, page_token=token),
                                  metadata=ADMIN)
        assert len(page.adapters) <= 3
        seen += [a.name for a in page.adapters]
        token = page.next_page_token
        if not token:
            break
    assert [n for n in seen if n.startswith("page-")] == names and seen == sorted(seen)


def test_server_info(admin, served):
    info = admin.GetServerInfo(apb.GetServerInfoRequest(), metadata=ADMIN)
    assert info.quantization == "none" and info.model_type == "llama" and info.max_slots == 2
    assert info.memory.base_model_bytes > 0 and info.memory.kv_cache_bytes > 0
    assert info.memory.adapter_slot_bytes > 0
    assert info.adapters_stored == len(served[1].store)
    cost = info.cost  # one base + the stored adapters against one full copy per adapter
    stored = served[1].store.list()
    assert cost.adapters == len(stored) and cost.full_copy_dtype == "float32"
    assert cost.adapters_bytes == sum(r.weights_size for r in stored)
    assert cost.loraplex_bytes == (cost.base_served_bytes + cost.slot_table_bytes
                                   + cost.adapters_bytes)
    assert cost.full_copies_bytes == cost.adapters * cost.full_copy_bytes
    assert cost.ratio == pytest.approx(cost.full_copies_bytes / cost.loraplex_bytes)
    assert cost.base_served_bytes == info.memory.base_model_bytes


@pytest.mark.parametrize("metadata, code", [
    ([], grpc.StatusCode.UNAUTHENTICATED),
    ([("authorization", "Bearer wrong")], grpc.StatusCode.UNAUTHENTICATED),
    ([("authorization", "admin-token")], grpc.StatusCode.UNAUTHENTICATED),  # no Bearer scheme
    (INFERENCE, grpc.StatusCode.PERMISSION_DENIED),
])
def test_admin_calls_need_the_admin_token(admin, metadata, code):
    error = refused(admin.GetServerInfo, apb.GetServerInfoRequest(), metadata=metadata)
    assert error.code() == code


def test_upload_stream_without_token_is_refused(admin, files):
    error = refused(admin.UploadAdapter, upload_messages("x", *files), metadata=[])
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_inference_needs_its_token_or_the_admin_token(served):
    stub = inference_pb2_grpc.InferenceStub(served[0])
    request = pb.GenerateRequest(prompt_token_ids=[1, 2], params=pb.SamplingParams(
        max_new_tokens=1))
    assert refused(stub.Generate, request).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = refused(stub.GenerateStream(request, metadata=[("authorization", "Bearer no")])
                    .__next__)
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(stub.Generate(request, metadata=INFERENCE).token_ids) == 1
    assert len(stub.Generate(request, metadata=ADMIN).token_ids) == 1
    listed = pb.ListModelsRequest()
    assert refused(stub.ListModels, listed).code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused(stub.ListModels, listed, metadata=[("authorization", "Bearer no")]
                   ).code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ListModels(listed, metadata=INFERENCE) == stub.ListModels(listed, metadata=ADMIN)
    assert stub.ListModels(listed, metadata=INFERENCE).base_model
