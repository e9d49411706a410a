"""Import uploads against the real thing: a browser (httpx) uploading through the targets both
backends issue, SeaweedFS (real S3, with signatures and expiry enforced) and a temp directory, and
the worker's side reading the file back as a stream."""

from __future__ import annotations

import asyncio
import base64
import csv
import datetime as dt
import hashlib
import io
import json
import os
import secrets
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from dataport.settings import Settings
from storage import UploadTarget, UploadTooLarge, signing, storage_from_settings
from storage.base import StorageError, StoredObject
from storage.local import LocalStorage
from storage.s3 import S3Storage
from tests.fixtures.s3 import S3Server
from tests.test_storage import PUBLIC_URL, SECRET, partial_files, s3_storage, utcnow, write_all

MiB = 1024 * 1024
CSV = "text/csv"


def import_key(name: str = "samples.csv") -> str:
    return f"imports/alice/{secrets.token_hex(6)}/{name}"


def soon(seconds: float = 300) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


async def target_for(
    storage: S3Storage | LocalStorage,
    key: str,
    *,
    max_bytes: int = MiB,
    content_type: str = CSV,
    expires_at: dt.datetime | None = None,
) -> UploadTarget:
    return await storage.upload_target(
        key, task_id="T1", content_type=content_type, max_bytes=max_bytes, expires_at=expires_at or soon()
    )


async def browser_upload(
    target: UploadTarget, data: bytes, *, fields: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """What the browser client does with a target: a form POST (the fields, then the file last) or
    a PUT of the bare file with the given headers. ``fields``/``headers`` replace the target's."""
    async with httpx.AsyncClient(timeout=30) as client:
        if target.method == "POST":
            form = target.fields if fields is None else fields
            # The part's own Content-Type is ignored by S3: the form field decides what is stored.
            return await client.post(target.url, data=form, files={"file": ("samples.csv", data, CSV)})
        return await client.put(target.url, content=data, headers=target.headers if headers is None else headers)


def error_code(response: httpx.Response) -> str:
    text = response.text
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else ""


def read_in_chunks(stream: Any, size: int = 65536) -> list[bytes]:
    chunks = []
    try:
        while chunk := stream.read(size):
            chunks.append(chunk)
    finally:
        stream.close()
    return chunks


def policy_of(target: UploadTarget) -> dict[str, Any]:
    assert target.fields is not None
    return json.loads(base64.b64decode(target.fields["policy"]))


@pytest.fixture
def s3_post(s3_server: S3Server, s3_bucket: str) -> S3Storage:
    return s3_storage(s3_server, s3_bucket, upload_method="POST")


@pytest.fixture
def s3_put(s3_server: S3Server, s3_bucket: str) -> S3Storage:
    return s3_storage(s3_server, s3_bucket, upload_method="PUT")


def head(storage: S3Storage, key: str) -> dict[str, Any]:
    return storage.client.head_object(Bucket=storage.bucket, Key=key)


# --- S3: presigned POST ----------------------------------------------------------------------------


async def test_post_target_pins_key_size_type_and_encryption(s3_post: S3Storage):
    key = import_key()
    expires_at = soon(600)
    target = await target_for(s3_post, key, max_bytes=5000, expires_at=expires_at)
    assert target.method == "POST"
    assert target.headers == {}  # the browser's FormData sets the multipart Content-Type itself
    assert target.expires_at == expires_at
    assert target.url.rstrip("/").endswith(f"/{s3_post.bucket}")
    assert target.fields is not None
    assert target.fields["key"] == key
    assert target.fields["Content-Type"] == CSV
    assert target.fields["x-amz-server-side-encryption"] == "AES256"
    conditions = policy_of(target)["conditions"]
    assert ["content-length-range", 0, 5000] in conditions
    for pinned in ({"key": key}, {"Content-Type": CSV}, {"x-amz-server-side-encryption": "AES256"}):
        assert pinned in conditions
    expiration = dt.datetime.fromisoformat(policy_of(target)["expiration"].replace("Z", "+00:00"))
    assert abs((expiration - expires_at).total_seconds()) <= 2


async def test_post_upload_is_stored_encrypted_and_read_back_in_chunks(s3_post: S3Storage):
    key = import_key()
    data = os.urandom(300_000)
    target = await target_for(s3_post, key)
    response = await browser_upload(target, data)
    assert response.status_code == 204, response.text
    assert await s3_post.size_of(key) == len(data)
    stored = head(s3_post, key)
    assert stored["ContentType"] == CSV
    assert stored["ServerSideEncryption"] == "AES256"

    chunks = await asyncio.to_thread(read_in_chunks, await s3_post.open_stream(key))
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks[:-1]] == [65536] * (len(chunks) - 1)  # full chunks until the end


@pytest.mark.parametrize("size, accepted", [(1000, True), (1001, False), (0, True)])
async def test_post_policy_caps_the_size(s3_post: S3Storage, size: int, accepted: bool):
    key = import_key()
    target = await target_for(s3_post, key, max_bytes=1000)
    response = await browser_upload(target, b"x" * size)
    if accepted:
        # 0 bytes too: an empty file is stored, and the import then says "the file is empty".
        assert response.status_code == 204, response.text
        assert await s3_post.size_of(key) == size
    else:
        assert (response.status_code, error_code(response)) == (400, "EntityTooLarge")
        assert await s3_post.size_of(key) is None


async def test_post_refuses_a_file_far_over_the_limit_without_storing_it(s3_post: S3Storage):
    key = import_key()
    target = await target_for(s3_post, key, max_bytes=1000)
    response = await browser_upload(target, os.urandom(8 * MiB))
    assert (response.status_code, error_code(response)) == (400, "EntityTooLarge")
    assert await s3_post.size_of(key) is None


@pytest.mark.parametrize(
    "change",
    [
        {"Content-Type": "text/html"},  # another content type
        {"key": "imports/mallory/elsewhere.csv"},  # another key
        {"x-amz-server-side-encryption": None},  # unencrypted
        {"x-amz-meta-owner": "mallory"},  # a field the policy does not name
    ],
)
async def test_post_refuses_fields_the_policy_does_not_allow(s3_post: S3Storage, change: dict[str, str | None]):
    key = import_key()
    target = await target_for(s3_post, key)
    assert target.fields is not None
    fields = {name: value for name, value in {**target.fields, **change}.items() if value is not None}
    response = await browser_upload(target, b"a,b\n1,2\n", fields=fields)
    # SeaweedFS enforces every condition, as AWS does: 403 AccessDenied "Invalid according to Policy".
    assert (response.status_code, error_code(response)) == (403, "AccessDenied"), response.text
    assert await s3_post.size_of(key) is None
    assert s3_post.client.list_objects_v2(Bucket=s3_post.bucket).get("KeyCount", 0) == 0


async def test_post_refuses_a_tampered_policy_or_a_forged_signature(s3_post: S3Storage, s3_server: S3Server):
    key = import_key()
    target = await target_for(s3_post, key, max_bytes=10)
    assert target.fields is not None
    policy = policy_of(target)
    policy["conditions"] = [c for c in policy["conditions"] if "content-length-range" not in c]
    tampered = {**target.fields, "policy": base64.b64encode(json.dumps(policy).encode()).decode()}
    forged = await target_for(s3_storage(s3_server, s3_post.bucket, secret_access_key="not-the-secret"), key)
    for response in (await browser_upload(target, b"x" * 100, fields=tampered), await browser_upload(forged, b"x")):
        assert (response.status_code, error_code(response)) == (403, "SignatureDoesNotMatch"), response.text
    assert await s3_post.size_of(key) is None


async def test_post_refuses_an_expired_policy(s3_post: S3Storage):
    key = import_key()
    target = await target_for(s3_post, key, expires_at=soon(1))
    await asyncio.sleep(2.1)
    response = await browser_upload(target, b"a,b\n")
    assert (response.status_code, error_code(response)) == (403, "AccessDenied")
    assert "expired" in response.text
    assert await s3_post.size_of(key) is None


# --- S3: presigned PUT -----------------------------------------------------------------------------


async def test_put_target_with_its_headers_stores_the_file_encrypted(s3_put: S3Storage):
    key = import_key()
    data = b"sample_id,site\n1,North\n"
    target = await target_for(s3_put, key)
    assert (target.method, target.fields) == ("PUT", None)
    assert target.headers == {"Content-Type": CSV, "x-amz-server-side-encryption": "AES256"}
    # Exactly the headers the signature covers (besides Host): a browser sending them all succeeds.
    signed = parse_qs(urlsplit(target.url).query)["X-Amz-SignedHeaders"][0].split(";")
    assert sorted(signed) == sorted([*(name.lower() for name in target.headers), "host"])
    response = await browser_upload(target, data)
    assert response.status_code == 200, response.text
    assert await s3_put.size_of(key) == len(data)
    stored = head(s3_put, key)
    assert (stored["ContentType"], stored["ServerSideEncryption"]) == (CSV, "AES256")
    assert b"".join(await asyncio.to_thread(read_in_chunks, await s3_put.open_stream(key))) == data


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/html", "x-amz-server-side-encryption": "AES256"},
        {"Content-Type": CSV},  # without the signed SSE header
        {"x-amz-server-side-encryption": "AES256"},  # without the signed Content-Type
    ],
)
async def test_put_refuses_other_headers(s3_put: S3Storage, headers: dict[str, str]):
    key = import_key()
    target = await target_for(s3_put, key)
    response = await browser_upload(target, b"a,b\n", headers=headers)
    assert (response.status_code, error_code(response)) == (403, "SignatureDoesNotMatch")
    assert await s3_put.size_of(key) is None


async def test_put_refuses_an_expired_url(s3_put: S3Storage):
    key = import_key()
    target = await target_for(s3_put, key, expires_at=soon(1))
    assert parse_qs(urlsplit(target.url).query)["X-Amz-Expires"] == ["1"]
    await asyncio.sleep(2.1)
    response = await browser_upload(target, b"a,b\n")
    assert (response.status_code, error_code(response)) == (403, "AccessDenied")
    assert await s3_put.size_of(key) is None


async def test_put_cannot_cap_the_size(s3_put: S3Storage):
    """S3 has no size condition for a presigned PUT (on AWS as on SeaweedFS): the file is stored,
    and whoever starts the import must compare ``size_of`` with the limit."""
    key = import_key()
    target = await target_for(s3_put, key, max_bytes=1000)
    response = await browser_upload(target, b"x" * 5000)
    assert response.status_code == 200
    assert await s3_put.size_of(key) == 5000


# --- S3: encryption settings, reading back, settings -------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_without_sse_no_encryption_is_demanded(s3_server: S3Server, s3_bucket: str, method: str):
    storage = s3_storage(s3_server, s3_bucket, sse="", upload_method=method)
    key = import_key()
    target = await target_for(storage, key)
    assert not any("encryption" in name for name in {**target.headers, **(target.fields or {})})
    response = await browser_upload(target, b"a,b\n")
    assert response.status_code in (200, 204), response.text
    assert "ServerSideEncryption" not in head(storage, key)


async def test_kms_targets_carry_the_key_id(s3_server: S3Server):
    # Presigning happens offline: SeaweedFS cannot do aws:kms, but the form and headers can be checked.
    kms = {"sse": "aws:kms", "sse_kms_key_id": "arn:aws:kms:us-east-1:111122223333:key/k1"}
    expected = {
        "x-amz-server-side-encryption": "aws:kms",
        "x-amz-server-side-encryption-aws-kms-key-id": kms["sse_kms_key_id"],
    }
    post = await target_for(s3_storage(s3_server, "bucket", **kms, upload_method="POST"), import_key())
    assert post.fields is not None and expected.items() <= post.fields.items()
    assert all({name: value} in policy_of(post)["conditions"] for name, value in expected.items())
    put = await target_for(s3_storage(s3_server, "bucket", **kms, upload_method="PUT"), import_key())
    assert put.headers == {"Content-Type": CSV, **expected}
    signed = parse_qs(urlsplit(put.url).query)["X-Amz-SignedHeaders"][0].split(";")
    assert set(expected) <= set(signed)


def read_csv_rows(stream: Any) -> list[list[str]]:
    """As the CSV parser reads: text decoded on the fly from the binary stream."""
    with io.TextIOWrapper(stream, encoding="utf-8", newline="") as text:
        return list(csv.reader(text))


def read_all_tracing_memory(stream: Any) -> tuple[int, str, int]:
    tracemalloc.start()
    try:
        sha, size = hashlib.sha256(), 0
        with stream:
            while chunk := stream.read(65536):  # as a parser reads: nothing kept
                sha.update(chunk)
                size += len(chunk)
        return size, sha.hexdigest(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_s3_open_stream_streams_a_large_object(s3_post: S3Storage):
    data = os.urandom(24 * MiB)
    stored = await write_all(s3_post, import_key(), data, chunk=MiB)
    del data
    size, sha, peak = await asyncio.to_thread(read_all_tracing_memory, await s3_post.open_stream(stored.key))
    assert (size, sha) == (stored.size, stored.sha256)
    assert peak < 6 * MiB  # chunk by chunk, never the whole 24 MiB body


async def test_s3_open_stream_feeds_a_text_parser(s3_post: S3Storage):
    key = import_key()
    await write_all(s3_post, key, 'sample_id,site\r\n1,Nörth\r\n2,"a,b"\r\n'.encode())
    rows = await asyncio.to_thread(read_csv_rows, await s3_post.open_stream(key))
    assert rows == [["sample_id", "site"], ["1", "Nörth"], ["2", "a,b"]]


async def test_s3_missing_object(s3_post: S3Storage):
    key = import_key()
    assert await s3_post.size_of(key) is None
    with pytest.raises(StorageError) as missing:
        await s3_post.open_stream(key)
    assert not missing.value.transient
    assert key in str(missing.value)


def test_s3_upload_method_from_settings(s3_server: S3Server):
    settings = Settings(
        storage="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
        s3_upload_method="PUT",
    )
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage) and storage.upload_method == "PUT"
    assert S3Storage.from_settings(Settings(storage="s3")).upload_method == "POST"  # the default
    with pytest.raises(ValueError):
        s3_storage(s3_server, "bucket", upload_method="GET")


# --- local backend ---------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "files", PUBLIC_URL, SECRET)


async def body(data: bytes, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    """A request body as the api's ``request.stream()`` yields it."""
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


async def test_local_upload_target_is_a_signed_put(local: LocalStorage):
    expires_at = dt.datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=dt.UTC)
    target = await target_for(local, import_key(), content_type=CSV, expires_at=expires_at)
    assert (target.method, target.headers, target.fields) == ("PUT", {"Content-Type": CSV}, None)
    assert target.expires_at == expires_at.replace(microsecond=0)  # the signature's whole second
    parts = urlsplit(target.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{PUBLIC_URL}/uploads/T1"
    query = parse_qs(parts.query)
    assert query["expires"] == [str(int(expires_at.timestamp()))]
    now = expires_at.timestamp() - 60
    assert signing.verify(SECRET, "PUT", "T1", query["expires"][0], query["signature"][0], now=now)
    assert not signing.verify(SECRET, "GET", "T1", query["expires"][0], query["signature"][0], now=now)


async def test_local_receive_stores_streams_and_reports(local: LocalStorage):
    key = import_key()
    data = os.urandom(5 * MiB + 123)
    stored = await local.receive(key, body(data), max_bytes=8 * MiB)
    assert stored == StoredObject(key, len(data), hashlib.sha256(data).hexdigest())
    assert await local.size_of(key) == len(data)
    assert await local.verify(key) == stored
    chunks = await asyncio.to_thread(read_in_chunks, await local.open_stream(key))
    assert b"".join(chunks) == data
    assert partial_files(local.root) == []


@pytest.mark.parametrize("size", [0, 1000])
async def test_local_receive_up_to_the_limit(local: LocalStorage, size: int):
    key = import_key()
    stored = await local.receive(key, body(b"x" * size, chunk=300), max_bytes=1000)
    assert stored.size == size == await local.size_of(key)


async def test_local_receive_over_the_limit_stops_reading_and_keeps_nothing(local: LocalStorage):
    key = import_key()
    read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        while True:  # a body that never ends: only refusing early can finish this test
            read += 300
            yield b"x" * 300

    with pytest.raises(UploadTooLarge) as refused:
        await local.receive(key, endless(), max_bytes=1000)
    assert read == 1200  # the chunk that went over the limit was the last one read
    assert not refused.value.transient
    assert "1,000 bytes" in str(refused.value)
    assert await local.size_of(key) is None
    assert partial_files(local.root) == []


async def test_local_refused_upload_leaves_the_earlier_file(local: LocalStorage):
    key = import_key()
    first = await local.receive(key, body(b"a,b\n1,2\n"), max_bytes=100)
    with pytest.raises(UploadTooLarge):
        await local.receive(key, body(b"x" * 1000, chunk=10), max_bytes=100)
    assert await local.verify(key) == first
    assert partial_files(local.root) == []


async def test_local_second_upload_replaces_the_first(local: LocalStorage):
    key = import_key()
    await local.receive(key, body(b"first upload, the longer one\n"), max_bytes=MiB)
    reader = await local.open_stream(key)  # opened before the replacement: keeps the old file
    second = await local.receive(key, body(b"second\n"), max_bytes=MiB)
    assert await local.verify(key) == second
    assert (await local.open_stream(key)).read() == b"second\n"
    assert reader.read() == b"first upload, the longer one\n"
    reader.close()
    assert partial_files(local.root) == []


async def test_local_interrupted_upload_keeps_nothing(local: LocalStorage):
    key = import_key()

    async def cut_short() -> AsyncIterator[bytes]:
        yield os.urandom(3 * MiB)  # more than one write batch: a partial file exists on disk
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await local.receive(key, cut_short(), max_bytes=8 * MiB)
    assert await local.size_of(key) is None
    assert partial_files(local.root) == []


async def test_local_missing_keys(local: LocalStorage):
    key = import_key()
    assert await local.size_of(key) is None
    with pytest.raises(StorageError) as missing:
        await local.open_stream(key)
    assert not missing.value.transient
    assert key in str(missing.value)
    await local.receive(key, body(b"x"), max_bytes=10)
    folder = key.rsplit("/", 1)[0]
    assert await local.size_of(folder) is None  # a directory is not a stored file
    with pytest.raises(StorageError):
        await local.open_stream(folder)


@pytest.mark.parametrize("key", ["../outside.csv", "imports/../../outside.csv", "/etc/passwd", "imports/x.partial-1"])
async def test_local_refuses_keys_that_escape_the_root(local: LocalStorage, tmp_path: Path, key: str):
    for attempt in (
        local.receive(key, body(b"x"), max_bytes=10),
        target_for(local, key),
        local.size_of(key),
        local.open_stream(key),
    ):
        with pytest.raises(StorageError) as refused:
            await attempt
        assert not refused.value.transient
    assert not (tmp_path / "outside.csv").exists()
    assert not local.root.exists() or partial_files(local.root) == []
