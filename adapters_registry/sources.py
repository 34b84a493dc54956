"""Where an adapter's two raw files come from: an allowed local directory or an S3 prefix.

`fetch_adapter(source, ...)` returns the bytes of adapter_config.json and
adapter_model.safetensors, not yet validated (the registry validates them with peft_format and
stores them). Only those two files are ever read; pickle weights are never opened or downloaded.

- A local directory is read only if its real path (symlinks and '..' resolved) lies under one of
  the configured roots (`--adapter-source-roots`), and so must each of the two files: a request
  must not make the server read arbitrary files it can see.
- `s3://bucket/prefix` reads `<prefix>/adapter_config.json` and `<prefix>/adapter_model.safetensors`
  with boto3, whose endpoint and credentials come from the standard AWS environment and config
  (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, AWS_PROFILE, ...). Sizes are checked with HeadObject
  before anything is downloaded.

Every error is an `AdapterFormatError` with the one-line message "adapter 'NAME': FILE: reason";
those about the source itself are `SourceError`, and those that are the storage's fault rather
than the request's (unreachable endpoint, timeouts, 5xx, no credentials) `SourceUnavailableError`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from adapters_registry.peft_format import (CONFIG_FILE, CONVERT_PICKLES, MAX_CONFIG_BYTES,
                                           PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterFormatError,
                                           read_adapter_files, validate_adapter_name)

ROOT_FLAG = "--adapter-source-roots"  # server.config.RegistryConfig.adapter_source_roots
S3_CONNECT_TIMEOUT_SECONDS = 5
S3_READ_TIMEOUT_SECONDS = 60
S3_MAX_ATTEMPTS = 3
"""Total attempts per S3 request (botocore "standard" retries: backoff, 5xx and throttling)."""

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")  # what botocore accepts as a bucket name
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_DENIED = ("403", "AccessDenied", "Forbidden", "AllAccessDisabled")
_BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                    "InvalidToken", "TokenRefreshRequired")


@dataclass(frozen=True)
class AdapterFiles:
    """The two raw files of one adapter, as fetched; not validated yet."""

    config: bytes
    """Content of adapter_config.json."""
    weights: bytes
    """Content of adapter_model.safetensors."""
    origin: str
    """Where they came from, for logs: the resolved local directory, or s3://bucket/prefix/
    (s3://bucket/ for an empty prefix)."""


class SourceError(AdapterFormatError):
    """The adapter cannot be fetched from the source the request names: a refused or malformed
    source, a missing bucket/object, access denied. The same request will fail again."""


class SourceUnavailableError(SourceError):
    """The storage could not be used (endpoint unreachable, timeout, server error, missing or
    rejected credentials, boto3 not installed): the server's problem, not the request's."""


def fetch_adapter(source: str, *, name: str, allowed_roots: Sequence[str | Path],
                  max_bytes: int | None = None) -> AdapterFiles:
    """The adapter's files from `source`: an s3://bucket/prefix URI, else a local directory.

    `max_bytes` caps the size of adapter_model.safetensors.
    """
    if source.startswith("s3://"):
        return read_s3(source, name=name, max_bytes=max_bytes)
    if _SCHEME.match(source):
        raise _error(name, source, f"unsupported scheme {source.split('://')[0]!r}: "
                     "use s3://bucket/prefix or a local directory")
    return read_local_directory(source, name=name, allowed_roots=allowed_roots,
                                max_bytes=max_bytes)


def holds_adapter(source: str, *, name: str) -> bool:
    """Whether `source` (a directory, or s3://bucket/prefix) holds either file of an adapter.
    The resolver looks elsewhere when not; when it does, `fetch_adapter` says what is wrong."""
    if source.startswith("s3://"):
        bucket, prefix = _parse_s3_uri(name, source)
        client = _default_client(name, source)
        return any(_object_size(client, name, bucket, _key(prefix, file)) is not None
                   for file in (CONFIG_FILE, WEIGHTS_FILE))
    return os.path.isdir(source)


def _error(name: str, file: str, reason: str, kind: type[SourceError] = SourceError) -> SourceError:
    """The error in peft_format's one-line form; a file name that is not printable is quoted so
    that it cannot break the line."""
    shown = file if file.isprintable() else repr(file)
    return kind(f"adapter {name!r}: {shown}: {reason}", adapter=name, file=file, reason=reason)


# ---- local directories --------------------------------------------------------------------------

def read_local_directory(path: str | Path, *, name: str, allowed_roots: Sequence[str | Path],
                         max_bytes: int | None = None) -> AdapterFiles:
    """The adapter's files from a directory under one of `allowed_roots`.

    Real paths are compared, so '..' and symlinks cannot leave the root; each of the two files
    must also resolve under that same root (a symlinked weights file pointing elsewhere is
    refused). `max_bytes` caps adapter_model.safetensors, checked before it is read.
    """
    name = validate_adapter_name(name)
    shown = str(path)
    if not shown:
        raise _error(name, "''", "empty directory path")
    roots = [os.path.realpath(root) for root in allowed_roots]
    if not roots:
        raise _error(name, shown, f"local adapter directories are disabled: start the server "
                     f"with {ROOT_FLAG} DIR to allow directories under DIR")
    if "\0" in str(path):
        raise _error(name, repr(str(path)), "a path cannot contain a NUL byte")
    real = os.path.realpath(path)
    root = _root_of(real, roots)
    if root is None:
        raise _error(name, shown, f"resolves to {real}, which is not under an allowed "
                     f"{ROOT_FLAG} ({', '.join(roots)})")
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        target = os.path.realpath(os.path.join(real, file))
        if _root_of(target, [root]) is None:
            raise _error(name, os.path.join(real, file),
                         f"links to {target}, outside the allowed {ROOT_FLAG} {root}")
    config, weights = read_adapter_files(Path(real), name, max_bytes)
    return AdapterFiles(config=config, weights=weights, origin=real)


def _root_of(real: str, roots: list[str]) -> str | None:
    """The first root that `real` is or lies under (both already real paths)."""
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return root
    return None


# ---- S3 -----------------------------------------------------------------------------------------

def read_s3(uri: str, *, name: str, max_bytes: int | None = None, client=None) -> AdapterFiles:
    """The adapter's files from `s3://bucket/prefix` (prefix may be empty or end with '/').

    `client` defaults to a boto3 S3 client configured from the standard AWS environment, with
    short timeouts and a few retries. Both objects are sized with HeadObject first, so an
    oversized object is refused without downloading it.
    """
    name = validate_adapter_name(name)
    bucket, prefix = _parse_s3_uri(name, uri)
    if client is None:
        client = _default_client(name, uri)
    config_key, weights_key = _key(prefix, CONFIG_FILE), _key(prefix, WEIGHTS_FILE)
    weights_size = _object_size(client, name, bucket, weights_key)
    if weights_size is None:
        _reject_pickles(client, name, bucket, prefix)
    config_size = _object_size(client, name, bucket, config_key)
    for key, size in ((config_key, config_size), (weights_key, weights_size)):
        if size is None:
            raise _error(name, _s3_uri(bucket, key), "object not found")
    _check_size(name, bucket, config_key, config_size, MAX_CONFIG_BYTES)
    _check_size(name, bucket, weights_key, weights_size, max_bytes)
    return AdapterFiles(config=_download(client, name, bucket, config_key, MAX_CONFIG_BYTES),
                        weights=_download(client, name, bucket, weights_key, max_bytes),
                        origin=_s3_uri(bucket, _key(prefix, "")))


def _parse_s3_uri(name: str, uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of s3://bucket[/prefix]."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise _error(name, str(uri), "not an s3:// URI (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise _error(name, uri, "no bucket name (expected s3://bucket/prefix)")
    if not _BUCKET.fullmatch(bucket):
        raise _error(name, uri, f"invalid bucket name {bucket!r}")
    return bucket, prefix


def _key(prefix: str, file: str) -> str:
    """The object key of `file` under `prefix`; `file` "" gives the prefix in its canonical form
    ("" or ending with '/'), as listed and as shown in `AdapterFiles.origin`."""
    prefix = prefix.rstrip("/")
    return f"{prefix}/{file}" if prefix else file


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _default_client(name: str, uri: str):
    """An S3 client from the standard AWS environment and config files.

    boto3 is imported here so that the rest of the package works without it. A new Session per
    call because boto3's default session is not thread-safe to create clients from.
    """
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise _error(name, uri, "reading from S3 needs boto3, which is not installed "
                     "(pip install boto3)", SourceUnavailableError) from None
    config = Config(connect_timeout=S3_CONNECT_TIMEOUT_SECONDS,
                    read_timeout=S3_READ_TIMEOUT_SECONDS,
                    retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
    try:
        return boto3.session.Session().client("s3", config=config)
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names no profile, malformed endpoint URL
        raise _error(name, uri, f"cannot create the S3 client ({_one_line(exc)})",
                     SourceUnavailableError) from None


def _object_size(client, name: str, bucket: str, key: str) -> int | None:
    """ContentLength of the object, or None if it does not exist."""
    head = _request(name, _s3_uri(bucket, key),
                    lambda: client.head_object(Bucket=bucket, Key=key), none_on=_NOT_FOUND)
    return None if head is None else int(head["ContentLength"])


def _reject_pickles(client, name: str, bucket: str, prefix: str) -> None:
    """Raises if the prefix holds pickle weights instead of safetensors, with the advice to
    convert them. Only object names are listed; without s3:ListBucket permission there is
    nothing to say beyond "not found"."""
    listed = _key(prefix, "")
    listing = _request(name, _s3_uri(bucket, listed),
                       lambda: client.list_objects_v2(Bucket=bucket, Prefix=listed,
                                                      Delimiter="/"),
                       none_on=_DENIED)
    if listing is None:
        return
    files = (obj["Key"].rsplit("/", 1)[-1] for obj in listing.get("Contents", []))
    pickles = sorted(f for f in files if os.path.splitext(f)[1].lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _error(name, _s3_uri(bucket, _key(prefix, WEIGHTS_FILE)),
                     f"missing; only pickle weights ({', '.join(pickles)}) are present, which "
                     f"are never downloaded: {CONVERT_PICKLES}")


def _check_size(name: str, bucket: str, key: str, size: int, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise _error(name, _s3_uri(bucket, key), f"{size} bytes, more than the limit of {limit}")


def _download(client, name: str, bucket: str, key: str, limit: int | None) -> bytes:
    """The object's bytes; reads at most limit + 1 bytes, so an object replaced by a bigger one
    after HeadObject is still refused without reading all of it."""
    where = _s3_uri(bucket, key)
    response = _request(name, where, lambda: client.get_object(Bucket=bucket, Key=key))
    body = response["Body"]
    try:
        data = _request(name, where, lambda: body.read() if limit is None else body.read(limit + 1))
    finally:
        body.close()
    if limit is not None and len(data) > limit:
        raise _error(name, where, f"more than the limit of {limit} bytes")
    return data


def _request(name: str, where: str, call: Callable[[], Any], *,
             none_on: tuple[str, ...] = ()) -> Any:
    """call(), with botocore's errors mapped to one-line SourceErrors about `where`; None when
    the S3 error code is in `none_on` (e.g. 404 on HeadObject means "absent", not a failure)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except ClientError as exc:
        if _code(exc) in none_on:
            return None
        raise _client_error(name, where, exc) from None
    except BotoCoreError as exc:
        raise _botocore_error(name, where, exc) from None


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _client_error(name: str, where: str, exc) -> SourceError:
    """An error the S3 server answered with."""
    code = _code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code == "NoSuchBucket":
        bucket = where[len("s3://"):].split("/", 1)[0]
        return _error(name, where, f"bucket {bucket!r} does not exist")
    if code in _NOT_FOUND:
        return _error(name, where, "object not found")
    if code in _DENIED:
        return _error(name, where, f"access denied ({code}; S3 also answers 403 for a missing "
                      "object when s3:ListBucket is not granted)")
    if code in _BAD_CREDENTIALS:
        return _error(name, where, f"the server's AWS credentials were rejected ({code})",
                      SourceUnavailableError)
    message = _one_line(exc.response.get("Error", {}).get("Message", "") or exc)
    if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
        return _error(name, where, f"S3 server error {code or status}: {message}",
                      SourceUnavailableError)
    return _error(name, where, f"S3 error {code or status}: {message}")


def _botocore_error(name: str, where: str, exc) -> SourceError:
    """A failure on the client side: no credentials, network, timeouts, bad parameters."""
    from botocore.exceptions import (CredentialRetrievalError, HTTPClientError,
                                     NoCredentialsError, ParamValidationError,
                                     PartialCredentialsError)
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return _error(name, where, f"no usable AWS credentials ({_one_line(exc)}): set "
                      "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
                      SourceUnavailableError)
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return _error(name, where, f"S3 endpoint unreachable or timed out ({_one_line(exc)})",
                      SourceUnavailableError)
    if isinstance(exc, ParamValidationError):
        return _error(name, where, f"invalid S3 request ({_one_line(exc)})")
    return _error(name, where, f"S3 request failed ({_one_line(exc)})", SourceUnavailableError)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
