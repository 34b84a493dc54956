"""Fetching an adapter's two raw files: allowed local directories, and S3 against a real
S3-compatible server (moto's standalone server on loopback: the `s3_endpoint` fixture in
conftest.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from adapters_registry.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterFormatError
from adapters_registry.sources import (ROOT_FLAG, AdapterFiles, SourceError,
                                       SourceUnavailableError, fetch_adapter,
                                       read_local_directory, read_s3)
from tests import processes

ADAPTER = "attn-r4"  # the smallest of the session's PEFT adapters
CONVERT = "convert them to safetensors"


def assert_error(exc_info, *, adapter: str, file: str, reason: str,
                 kind: type[AdapterFormatError] = AdapterFormatError) -> None:
    """The error names the adapter, the file/object and the reason, on one line."""
    err = exc_info.value
    assert isinstance(err, kind), f"{type(err).__name__}: {err}"
    assert err.adapter == adapter
    assert file in err.file, err
    assert reason in err.reason, err
    assert str(err) == f"adapter {adapter!r}: {err.file}: {err.reason}"
    assert "\n" not in str(err)


@pytest.fixture
def original(tiny_adapter_dirs) -> AdapterFiles:
    """The bytes every accepted fetch must return."""
    directory = tiny_adapter_dirs[ADAPTER]
    return AdapterFiles(config=(directory / CONFIG_FILE).read_bytes(),
                        weights=(directory / WEIGHTS_FILE).read_bytes(), origin=str(directory))


# ---- local directories --------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path, tiny_adapter_dirs) -> Path:
    """An allowed root holding one adapter, root/a1."""
    root = tmp_path / "root"
    shutil.copytree(tiny_adapter_dirs[ADAPTER], root / "a1")
    return root


@pytest.fixture
def outside(tmp_path, tiny_adapter_dirs) -> Path:
    """A valid adapter directory that is under no allowed root."""
    shutil.copytree(tiny_adapter_dirs[ADAPTER], tmp_path / "outside" / "a1")
    return tmp_path / "outside" / "a1"


def test_directory_under_a_root_is_read_and_other_files_ignored(root, tmp_path, original):
    (root / "a1" / "tokenizer.json").write_text("{}")
    (root / "a1" / "modeling.py").write_text("raise SystemExit")
    files = read_local_directory(root / "a1", name="a1",
                                 allowed_roots=[tmp_path / "elsewhere", root])
    assert (files.config, files.weights) == (original.config, original.weights)
    assert files.origin == os.path.realpath(root / "a1")


def test_roots_and_paths_are_compared_as_real_paths(root, tmp_path, original):
    (tmp_path / "root-link").symlink_to(root)
    (root / "a3").mkdir()
    shutil.copy(root / "a1" / CONFIG_FILE, root / "a3" / CONFIG_FILE)
    (root / "a3" / WEIGHTS_FILE).symlink_to(root / "a1" / WEIGHTS_FILE)  # a link inside the root
    for path, roots in ((root / "a1", [tmp_path / "root-link"]),
                        (tmp_path / "root-link" / "a1", [root]),
                        (root / "a3", [root])):
        files = read_local_directory(path, name="a1", allowed_roots=roots)
        assert files.weights == original.weights


def test_directory_outside_every_root_is_refused(root, outside):
    with pytest.raises(SourceError) as exc_info:
        read_local_directory(outside, name="a1", allowed_roots=[root])
    assert_error(exc_info, adapter="a1", file=str(outside),
                 reason=f"not under an allowed {ROOT_FLAG} ({os.path.realpath(root)})")


def test_dotdot_cannot_leave_the_root(root, outside):
    escape = root / ".." / "outside" / "a1"
    with pytest.raises(SourceError) as exc_info:
        read_local_directory(escape, name="a1", allowed_roots=[root])
    assert_error(exc_info, adapter="a1", file=str(escape),
                 reason=f"resolves to {os.path.realpath(outside)}, which is not under")


def test_symlinked_directory_pointing_outside_is_refused(root, outside):
    (root / "link").symlink_to(outside)
    with pytest.raises(SourceError) as exc_info:
        read_local_directory(root / "link", name="a1", allowed_roots=[root])
    assert_error(exc_info, adapter="a1", file=str(root / "link"), reason="not under an allowed")


def test_symlinked_weights_file_pointing_outside_is_refused(root, outside):
    (root / "a2").mkdir()
    shutil.copy(outside / CONFIG_FILE, root / "a2" / CONFIG_FILE)
    (root / "a2" / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
    with pytest.raises(SourceError) as exc_info:
        read_local_directory(root / "a2", name="a2", allowed_roots=[root])
    assert_error(exc_info, adapter="a2", file=WEIGHTS_FILE,
                 reason=f"links to {os.path.realpath(outside / WEIGHTS_FILE)}, outside the "
                        f"allowed {ROOT_FLAG}")


def test_no_roots_configured_refuses_every_directory_and_names_the_flag(root):
    with pytest.raises(SourceError) as exc_info:
        fetch_adapter(str(root / "a1"), name="a1", allowed_roots=[])
    assert_error(exc_info, adapter="a1", file=str(root / "a1"),
                 reason=f"disabled: start the server with {ROOT_FLAG} DIR")


def test_pickle_only_directory_is_refused_with_the_convert_advice(root):
    (root / "pk").mkdir()
    shutil.copy(root / "a1" / CONFIG_FILE, root / "pk" / CONFIG_FILE)
    (root / "pk" / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(AdapterFormatError) as exc_info:
        read_local_directory(root / "pk", name="pk", allowed_roots=[root])
    assert_error(exc_info, adapter="pk", file=WEIGHTS_FILE, reason=CONVERT)
    assert "adapter_model.bin" in exc_info.value.reason


def test_weights_larger_than_max_bytes_are_refused(root, original):
    limit = len(original.weights) - 1
    with pytest.raises(AdapterFormatError) as exc_info:
        read_local_directory(root / "a1", name="a1", allowed_roots=[root], max_bytes=limit)
    assert_error(exc_info, adapter="a1", file=WEIGHTS_FILE,
                 reason=f"{len(original.weights)} bytes, more than the limit of {limit}")


def test_missing_directory_is_refused(root):
    with pytest.raises(AdapterFormatError) as exc_info:
        fetch_adapter(str(root / "nope"), name="nope", allowed_roots=[root])
    assert_error(exc_info, adapter="nope", file=str(root / "nope"),
                 reason="adapter directory not found")


def test_invalid_adapter_name_is_refused_before_any_read(root):
    with pytest.raises(AdapterFormatError) as exc_info:
        read_local_directory(root / "a1", name="../a1", allowed_roots=[root])
    assert "invalid adapter name" in str(exc_info.value)


# ---- malformed sources (no server needed: refused before any request) ---------------------------

@pytest.mark.parametrize("source, file, reason", [
    ("s3://", "s3://", "no bucket name (expected s3://bucket/prefix)"),
    ("s3:///prefix", "s3:///prefix", "no bucket name"),
    ("s3://bad bucket/x", "s3://bad bucket/x", "invalid bucket name 'bad bucket'"),
    ("http://host/adapter", "http://host/adapter", "unsupported scheme 'http'"),
    ("S3://bucket/adapter", "S3://bucket/adapter", "unsupported scheme 'S3'"),
])
def test_malformed_source_is_refused(source, file, reason):
    with pytest.raises(SourceError) as exc_info:
        fetch_adapter(source, name="a1", allowed_roots=[])
    assert_error(exc_info, adapter="a1", file=file, reason=reason)


def test_read_s3_refuses_a_path_that_is_not_an_s3_uri():
    with pytest.raises(SourceError) as exc_info:
        read_s3("/data/adapters/a1", name="a1")
    assert_error(exc_info, adapter="a1", file="/data/adapters/a1", reason="not an s3:// URI")


# ---- S3 against a real server -------------------------------------------------------------------

def s3_client(endpoint: str, **config):
    """A boto3 client with explicit endpoint and credentials; `config` goes to botocore Config."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1", config=Config(**config))


def recording(client) -> list[tuple[str, str | None]]:
    """The (operation, key) of every request `client` makes from now on, in order."""
    calls = []

    def record(params, model, **_):
        calls.append((model.name, params.get("Key") or params.get("Prefix")))

    client.meta.events.register("provide-client-params.s3", record)
    return calls


@pytest.fixture(scope="module")
def buckets(s3_endpoint, tiny_adapter_dirs):
    """Bucket "adapters": team/attn-r4/ (valid), pickled/ (only adapter_model.bin),
    half/ (only the config). Bucket "flat-adapter": a valid adapter at the bucket's root."""
    client = s3_client(s3_endpoint)
    directory = tiny_adapter_dirs[ADAPTER]
    config = (directory / CONFIG_FILE).read_bytes()
    weights = (directory / WEIGHTS_FILE).read_bytes()
    for bucket in ("adapters", "flat-adapter"):
        client.create_bucket(Bucket=bucket)
    for key, body in ((f"team/{ADAPTER}/{CONFIG_FILE}", config),
                      (f"team/{ADAPTER}/{WEIGHTS_FILE}", weights),
                      (f"team/{ADAPTER}/tokenizer.json", b"{}"),
                      (f"pickled/{CONFIG_FILE}", config),
                      ("pickled/adapter_model.bin", b"not really a pickle"),
                      (f"half/{CONFIG_FILE}", config)):
        client.put_object(Bucket="adapters", Key=key, Body=body)
    for key, body in ((CONFIG_FILE, config), (WEIGHTS_FILE, weights)):
        client.put_object(Bucket="flat-adapter", Key=key, Body=body)


@pytest.fixture
def aws_env(monkeypatch, tmp_path, s3_endpoint, buckets):
    """The standard AWS environment pointing at the test server, isolated from the user's."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.mark.parametrize("uri, origin", [
    (f"s3://adapters/team/{ADAPTER}", f"s3://adapters/team/{ADAPTER}/"),
    (f"s3://adapters/team/{ADAPTER}/", f"s3://adapters/team/{ADAPTER}/"),
    ("s3://flat-adapter", "s3://flat-adapter/"),
    ("s3://flat-adapter/", "s3://flat-adapter/"),
])
def test_s3_prefix_is_read_with_a_client_from_the_environment(aws_env, original, uri, origin):
    files = fetch_adapter(uri, name=ADAPTER, allowed_roots=[])
    assert (files.config, files.weights) == (original.config, original.weights)
    assert files.origin == origin


def test_s3_sizes_are_checked_before_anything_is_downloaded(s3_endpoint, buckets, original):
    client = s3_client(s3_endpoint)
    calls = recording(client)
    files = read_s3(f"s3://adapters/team/{ADAPTER}", name=ADAPTER, client=client)
    assert files.weights == original.weights
    prefix = f"team/{ADAPTER}/"
    assert calls == [("HeadObject", prefix + WEIGHTS_FILE), ("HeadObject", prefix + CONFIG_FILE),
                     ("GetObject", prefix + CONFIG_FILE), ("GetObject", prefix + WEIGHTS_FILE)]


def test_s3_weights_larger_than_max_bytes_are_refused_without_downloading(
        s3_endpoint, buckets, original):
    client = s3_client(s3_endpoint)
    calls = recording(client)
    limit = len(original.weights) - 1
    with pytest.raises(SourceError) as exc_info:
        read_s3(f"s3://adapters/team/{ADAPTER}", name=ADAPTER, client=client, max_bytes=limit)
    assert_error(exc_info, adapter=ADAPTER,
                 file=f"s3://adapters/team/{ADAPTER}/{WEIGHTS_FILE}",
                 reason=f"{len(original.weights)} bytes, more than the limit of {limit}")
    assert "GetObject" not in [operation for operation, _ in calls]


def test_s3_pickle_only_prefix_is_refused_and_the_pickle_never_downloaded(s3_endpoint, buckets):
    client = s3_client(s3_endpoint)
    calls = recording(client)
    with pytest.raises(SourceError) as exc_info:
        read_s3("s3://adapters/pickled/", name="pk", client=client)
    assert_error(exc_info, adapter="pk", file=f"s3://adapters/pickled/{WEIGHTS_FILE}",
                 reason=CONVERT)
    assert "adapter_model.bin" in exc_info.value.reason
    assert "GetObject" not in [operation for operation, _ in calls]


def test_s3_missing_bucket_is_refused(aws_env):
    with pytest.raises(SourceError) as exc_info:
        read_s3("s3://no-such-bucket/a1", name="a1")
    assert_error(exc_info, adapter="a1", file="s3://no-such-bucket/a1",
                 reason="bucket 'no-such-bucket' does not exist")
    assert not isinstance(exc_info.value, SourceUnavailableError)


@pytest.mark.parametrize("uri, missing", [
    ("s3://adapters/team/nothing", f"team/nothing/{CONFIG_FILE}"),
    ("s3://adapters/half", f"half/{WEIGHTS_FILE}"),
])
def test_s3_missing_object_is_refused(aws_env, uri, missing):
    with pytest.raises(SourceError) as exc_info:
        read_s3(uri, name="a1")
    assert_error(exc_info, adapter="a1", file=f"s3://adapters/{missing}", reason="object not found")
    assert not isinstance(exc_info.value, SourceUnavailableError)


def test_s3_unreachable_endpoint_is_a_clean_unavailable_error(buckets):
    closed = processes.unused_port()
    client = s3_client(f"http://127.0.0.1:{closed}", connect_timeout=1, read_timeout=1,
                       retries={"max_attempts": 1})
    with pytest.raises(SourceUnavailableError) as exc_info:
        read_s3(f"s3://adapters/team/{ADAPTER}", name=ADAPTER, client=client)
    assert_error(exc_info, adapter=ADAPTER, file=f"s3://adapters/team/{ADAPTER}/{WEIGHTS_FILE}",
                 reason="S3 endpoint unreachable or timed out")


def test_s3_unreachable_endpoint_from_the_environment(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{processes.unused_port()}")
    with pytest.raises(SourceUnavailableError) as exc_info:
        read_s3(f"s3://adapters/team/{ADAPTER}", name=ADAPTER)
    assert_error(exc_info, adapter=ADAPTER, file=f"s3://adapters/team/{ADAPTER}/{WEIGHTS_FILE}",
                 reason="S3 endpoint unreachable or timed out")


def test_s3_without_credentials_is_a_clean_unavailable_error(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SourceUnavailableError) as exc_info:
        read_s3(f"s3://adapters/team/{ADAPTER}", name=ADAPTER)
    assert_error(exc_info, adapter=ADAPTER, file=f"s3://adapters/team/{ADAPTER}/{WEIGHTS_FILE}",
                 reason="no usable AWS credentials")
