"""Both storage backends against the real thing: a temp directory, and SeaweedFS (real S3) for S3."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from dataport.net import free_port
from dataport.settings import Settings
from storage import content_disposition, signing, storage_from_settings
from storage.base import StorageError, StoredObject
from storage.encrypted import EncryptedStorage
from storage.local import LocalStorage
from storage.s3 import MIN_PART_SIZE, S3Storage, storage_error
from tests.fixtures.s3 import S3Server

MiB = 1024 * 1024
PART = MIN_PART_SIZE  # 5 MiB, the smallest part S3 allows
SECRET = "test-signing-secret"
PUBLIC_URL = "http://dataport.test:8000"

Backend = LocalStorage | S3Storage


def new_key(name: str = "samples-1.csv") -> str:
    return f"exports/alice/{secrets.token_hex(6)}/{name}"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def s3_storage(server: S3Server, bucket: str, **overrides: Any) -> S3Storage:
    options: dict[str, Any] = {
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "sse": "AES256",
        "part_size": PART,
    }
    options.update(overrides)
    return S3Storage(bucket, **options)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return LocalStorage(tmp_path / "files", PUBLIC_URL, SECRET)
    server: S3Server = request.getfixturevalue("s3_server")
    return s3_storage(server, server.make_bucket())


@pytest.fixture
def s3(s3_server: S3Server, s3_bucket: str) -> S3Storage:
    return s3_storage(s3_server, s3_bucket)


async def write_all(storage: Backend, key: str, data: bytes, chunk: int = 64 * 1024, content_type: str = "text/csv"):
    writer = await storage.open_writer(key, content_type)
    for i in range(0, len(data), chunk):
        await writer.write(data[i : i + chunk])
    return await writer.complete()


def open_uploads(s3: S3Storage, prefix: str = "") -> list[dict[str, Any]]:
    return s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])


def partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name]


# --- writing, verifying, aborting -------------------------------------------------------------


async def test_multipart_upload_is_streamed_stored_and_verified(storage: Backend):
    data = os.urandom(2 * PART + 1_234_567)  # three parts: 5 MiB, 5 MiB, the rest
    key = new_key()
    writer = await storage.open_writer(key, "text/csv")
    for i in range(0, len(data), 64 * 1024):  # small chunks, as the format writers produce them
        await writer.write(data[i : i + 64 * 1024])
    if isinstance(storage, S3Storage):
        # Parts went out while writing: the upload is open before complete() and nothing is visible.
        assert writer.upload_id is not None
        assert [u["Key"] for u in open_uploads(storage, key)] == [key]
    assert await storage.verify(key) is None
    stored = await writer.complete()

    expected = StoredObject(key, len(data), hashlib.sha256(data).hexdigest())
    assert stored == expected
    assert await storage.verify(key) == expected
    if isinstance(storage, S3Storage):
        head = storage.client.head_object(Bucket=storage.bucket, Key=key)
        assert head["ContentLength"] == len(data)
        assert head["ETag"].strip('"').endswith("-3")  # a multipart object of three parts
        assert head["ServerSideEncryption"] == "AES256"
        assert head["ContentType"] == "text/csv"
        assert open_uploads(storage, key) == []
    else:
        assert storage.path_for(key).read_bytes() == data
        assert partial_files(storage.root) == []


@pytest.mark.parametrize("size", [0, 1, 100_000])
async def test_small_files(storage: Backend, size: int):
    data = os.urandom(size)
    key = new_key()
    writer = await storage.open_writer(key, "application/json")
    await writer.write(data)
    stored = await writer.complete()
    assert stored == StoredObject(key, size, hashlib.sha256(data).hexdigest())
    assert await storage.verify(key) == stored
    if isinstance(storage, S3Storage):
        assert writer.upload_id is None  # smaller than one part: one PutObject
        head = storage.client.head_object(Bucket=storage.bucket, Key=key)
        assert head["ServerSideEncryption"] == "AES256"


async def test_write_in_one_big_chunk(storage: Backend):
    data = os.urandom(PART * 2 + 17)
    stored = await write_all(storage, new_key(), data, chunk=len(data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await storage.verify(stored.key) == stored


async def test_overwrite_replaces_whole_object(storage: Backend):
    key = new_key()
    await write_all(storage, key, b"x" * 1000)
    second = await write_all(storage, key, b"short")
    assert await storage.verify(key) == second
    assert second.size == 5


async def test_abort_leaves_no_object_and_no_open_upload(storage: Backend):
    key = new_key()
    writer = await storage.open_writer(key, "text/csv")
    chunk = os.urandom(256 * 1024)
    for _ in range((PART + MiB) // len(chunk)):  # more than a part: an upload is open on S3
        await writer.write(chunk)
    if isinstance(storage, S3Storage):
        assert open_uploads(storage, key)
    else:
        assert partial_files(storage.root)
    await writer.abort()
    await writer.abort()  # idempotent

    assert await storage.verify(key) is None
    if isinstance(storage, S3Storage):
        assert open_uploads(storage, key) == []
        assert storage.client.list_objects_v2(Bucket=storage.bucket).get("KeyCount", 0) == 0
    else:
        assert partial_files(storage.root) == []
        assert not storage.path_for(key).exists()
    with pytest.raises(StorageError):
        await writer.write(b"more")
    with pytest.raises(StorageError):
        await writer.complete()


async def test_cancelled_writer_can_still_be_aborted(storage: Backend):
    """A cancelled export (the worker's task is cancelled mid-write) aborts its writer cleanly."""
    key = new_key()
    writer = await storage.open_writer(key, "text/csv")

    async def produce() -> None:
        while True:
            await writer.write(os.urandom(512 * 1024))

    task = asyncio.create_task(produce())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.shield(writer.abort())
    assert await storage.verify(key) is None
    if isinstance(storage, S3Storage):
        assert open_uploads(storage, key) == []
    else:
        assert partial_files(storage.root) == []


@pytest.mark.parametrize("size", [100, PART + 1])
@pytest.mark.parametrize("delay", [0, 0.05])
async def test_cancelled_complete_then_abort_leaves_nothing(storage: Backend, size: int, delay: float):
    """Cancelled while S3 (or the disk) is still completing: the abort that follows waits for the
    call in flight and removes whatever it made, so neither an object nor an upload remains."""
    key = new_key()
    writer = await storage.open_writer(key, "text/csv")
    await writer.write(os.urandom(size))
    task = asyncio.create_task(writer.complete())
    await asyncio.sleep(delay)
    if delay and task.done():  # the disk was quicker than the delay: completed, and stays so
        await writer.abort()
        assert await storage.verify(key) == task.result()
        return
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.shield(writer.abort())
    assert await storage.verify(key) is None
    if isinstance(storage, S3Storage):
        assert open_uploads(storage, key) == []
    else:
        assert partial_files(storage.root) == []


async def make_stale_partial(storage: Backend, key: str) -> None:
    """What a worker killed mid-write leaves behind."""
    if isinstance(storage, S3Storage):
        upload = storage.client.create_multipart_upload(Bucket=storage.bucket, Key=key, ServerSideEncryption="AES256")
        storage.client.upload_part(
            Bucket=storage.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=os.urandom(PART)
        )
    else:
        path = storage.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(f"{path.name}.partial-{secrets.token_hex(8)}").write_bytes(os.urandom(3 * MiB))


async def test_discard_incomplete_removes_stale_partial(storage: Backend):
    key = new_key("samples-1.csv")
    neighbour = key.replace("samples-1.csv", "samples-1.csv.bak")  # same prefix, another object
    await make_stale_partial(storage, key)
    await make_stale_partial(storage, key)
    await make_stale_partial(storage, neighbour)

    def stale(k: str) -> int:
        if isinstance(storage, S3Storage):
            return sum(u["Key"] == k for u in open_uploads(storage, k))
        path = storage.path_for(k)
        return len([p for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.partial-")])

    assert (stale(key), stale(neighbour)) == (2, 1)
    await storage.discard_incomplete(key)
    assert (stale(key), stale(neighbour)) == (0, 1)
    await storage.discard_incomplete(new_key())  # nothing there: fine

    # The next attempt writes the object as if nothing had happened.
    data = os.urandom(PART + 10)
    stored = await write_all(storage, key, data)
    assert await storage.verify(key) == stored == StoredObject(key, len(data), hashlib.sha256(data).hexdigest())


async def test_discard_incomplete_of_a_folder(storage: Backend):
    folder = f"exports/alice/{secrets.token_hex(6)}/"
    await make_stale_partial(storage, folder + "a.csv")
    await make_stale_partial(storage, folder + "b.csv")
    if isinstance(storage, LocalStorage):
        await storage.discard_incomplete(folder + "a.csv")
        assert len(partial_files(storage.root)) == 1
    else:
        await storage.discard_incomplete(folder)
        assert open_uploads(storage, folder) == []


async def test_the_sweep_removes_old_partial_writes_and_keeps_young_ones(storage: Backend):
    """What a killed worker, or one that gave up while the storage was down, left behind: the cron
    sweep removes what began before the cutoff, and nothing that may still be written."""
    folder = f"exports/sweep/{secrets.token_hex(6)}/"
    await make_stale_partial(storage, folder + "a.csv")
    await make_stale_partial(storage, folder + "b.csv")
    kept = await write_all(storage, folder + "done.csv", b"complete")

    def left() -> int:
        if isinstance(storage, S3Storage):
            return len(open_uploads(storage, folder))
        return len([p for p in (storage.root / folder).iterdir() if ".partial-" in p.name])

    assert await storage.sweep_incomplete(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)) == 0  # too young
    assert left() == 2
    assert await storage.sweep_incomplete(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)) >= 2
    assert left() == 0
    assert await storage.verify(folder + "done.csv") == kept  # finished objects are never touched


async def test_verify_of_missing_key_is_none(storage: Backend):
    assert await storage.verify(new_key()) is None


async def test_delete_removes(storage: Backend):
    key = new_key()
    sibling = key.replace("samples-1.csv", "samples-2.csv")
    await write_all(storage, key, b"a,b\n1,2\n")
    await write_all(storage, sibling, b"a,b\n")
    await storage.delete(key)
    assert await storage.verify(key) is None
    assert await storage.verify(sibling) is not None
    await storage.delete(key)  # already gone: fine
    await storage.delete(sibling)
    assert await storage.verify(sibling) is None
    if isinstance(storage, LocalStorage):  # empty folders go too, the root stays
        assert storage.root.is_dir()
        assert list(storage.root.iterdir()) == []


async def test_check_passes(storage: Backend):
    await storage.check()


# --- S3: encryption, presigned URLs, errors ------------------------------------------------------


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def marked(marker: bytes, size: int) -> bytes:
    """Random (incompressible, so SeaweedFS stores it as is) with ``marker`` every 4 KiB."""
    block = 4096 - len(marker)
    return b"".join(os.urandom(block) + marker for _ in range(size // 4096 + 1))[:size]


async def test_sse_encrypts_at_rest(s3: S3Storage, s3_server: S3Server):
    secret_marker = b"DATAPORT-SECRET-" + secrets.token_hex(8).encode()
    small, large = new_key("small.bin"), new_key("large.bin")
    await write_all(s3, small, marked(secret_marker, 200_000), content_type="application/octet-stream")
    await write_all(s3, large, marked(secret_marker, PART + MiB), content_type="application/octet-stream")
    for key in (small, large):  # single PutObject and multipart upload
        assert s3.client.head_object(Bucket=s3.bucket, Key=key)["ServerSideEncryption"] == "AES256"

    # Control: the same kind of bytes without SSE is found on disk, so the search does find plaintext.
    plain = s3_storage(s3_server, s3.bucket, sse="")
    plain_marker = b"DATAPORT-PLAIN-" + secrets.token_hex(8).encode()
    plain_key = new_key("plain.bin")
    await write_all(plain, plain_key, marked(plain_marker, 200_000), content_type="application/octet-stream")
    assert "ServerSideEncryption" not in s3.client.head_object(Bucket=s3.bucket, Key=plain_key)
    assert files_containing(s3_server.data_dir, plain_marker)

    assert files_containing(s3_server.data_dir, secret_marker) == []


async def test_presigned_download(s3: S3Storage):
    data = b"sample_id,site\n1,North \xe2\x80\x94 ridge\n"
    key = new_key()
    await write_all(s3, key, data)
    url = await s3.presigned_download_url(key, filename="samples-1.csv", expires_at=utcnow() + dt.timedelta(minutes=15))
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["900"]
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-disposition"] == 'attachment; filename="samples-1.csv"'


async def test_presigned_download_with_unicode_filename(s3: S3Storage):
    key = new_key()
    await write_all(s3, key, b"x")
    url = await s3.presigned_download_url(
        key, filename="échantillons-1.csv", expires_at=utcnow() + dt.timedelta(minutes=1)
    )
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-disposition"] == content_disposition("échantillons-1.csv")


async def test_expired_presigned_url_is_refused(s3: S3Storage):
    key = new_key()
    await write_all(s3, key, b"secret rows")
    url = await s3.presigned_download_url(key, filename="f.csv", expires_at=utcnow() + dt.timedelta(seconds=1))
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["1"]
    await asyncio.sleep(2)
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 403
    assert b"secret rows" not in response.content


async def test_tampered_presigned_urls_are_refused(s3: S3Storage, s3_server: S3Server):
    key, other = new_key(), new_key()
    await write_all(s3, key, b"mine")
    await write_all(s3, other, b"someone else's")
    expires = utcnow() + dt.timedelta(minutes=5)
    url = await s3.presigned_download_url(key, filename="f.csv", expires_at=expires)
    parts = urlsplit(url)
    signature = parse_qs(parts.query)["X-Amz-Signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    bad_signature = url.replace(signature, flipped)
    other_object = urlunsplit(parts._replace(path=parts.path.replace(key, other)))
    longer = url.replace("X-Amz-Expires=300", "X-Amz-Expires=3000")
    assert longer != url
    forged = await s3_storage(s3_server, s3.bucket, secret_access_key="not-the-secret").presigned_download_url(
        key, filename="f.csv", expires_at=expires
    )
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 200
        for bad in (bad_signature, other_object, longer, forged):
            response = await client.get(bad)
            assert response.status_code == 403, bad
            assert b"mine" not in response.content and b"someone" not in response.content


async def test_s3_check_errors(s3_server: S3Server):
    with pytest.raises(StorageError) as missing:
        await s3_storage(s3_server, "no-such-bucket-" + secrets.token_hex(4)).check()
    assert not missing.value.transient

    with pytest.raises(StorageError) as denied:
        await s3_storage(s3_server, s3_server.make_bucket(), secret_access_key="wrong").check()
    assert not denied.value.transient

    nobody = s3_storage(s3_server, "dataport", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError) as refused:
        await nobody.check()
    assert refused.value.transient


async def test_s3_write_with_bad_credentials_is_not_transient(s3_server: S3Server, s3_bucket: str):
    storage = s3_storage(s3_server, s3_bucket, secret_access_key="wrong")
    writer = await storage.open_writer(new_key(), "text/csv")
    await writer.write(b"x")
    with pytest.raises(StorageError) as refused:
        await writer.complete()
    assert not refused.value.transient


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (client_error("SlowDown", 503), True),
        (client_error("Throttling", 400), True),
        (client_error("InternalError", 500), True),
        (client_error("ServiceUnavailable", 503), True),
        (client_error("AccessDenied", 403), False),
        (client_error("NoSuchBucket", 404), False),
        (client_error("SignatureDoesNotMatch", 403), False),
        (client_error("InvalidAccessKeyId", 403), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    ],
)
def test_error_mapping(error: Exception, transient: bool):
    mapped = storage_error(error, "PutObject bucket/key")
    assert isinstance(mapped, StorageError)
    assert mapped.transient is transient
    assert "PutObject bucket/key" in str(mapped)


def test_part_size_is_at_least_5_mib(s3_server: S3Server):
    assert s3_storage(s3_server, "b", part_size=1024).part_size == MIN_PART_SIZE
    assert s3_storage(s3_server, "b", part_size=16 * MiB).part_size == 16 * MiB


# --- local: signed URLs, keys, reading --------------------------------------------------------------


def test_signing_valid_and_refused():
    expires = int(time.time()) + 60
    signature = signing.sign(SECRET, "GET", "T1", expires)
    assert signing.verify(SECRET, "GET", "T1", expires, signature)
    assert signing.verify(SECRET, "get", "T1", str(expires), signature)  # as the query string gives it

    tampered = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert not signing.verify(SECRET, "GET", "T1", expires, tampered)
    assert not signing.verify(SECRET, "GET", "T1", expires, signature.upper())
    assert not signing.verify(SECRET, "GET", "T1", expires, "")
    assert not signing.verify(SECRET, "GET", "T1", expires, "é" * 64)
    assert not signing.verify(SECRET, "GET", "T2", expires, signature)  # other task
    assert not signing.verify(SECRET, "PUT", "T1", expires, signature)  # other method
    assert not signing.verify(SECRET, "GET", "T1", expires + 1, signature)  # expiry moved
    assert not signing.verify("other-secret", "GET", "T1", expires, signature)
    assert not signing.verify(SECRET, "GET", "T1", "soon", signature)


def test_signing_refuses_expired():
    expires = 1_800_000_000
    signature = signing.sign(SECRET, "GET", "T1", expires)
    assert signing.verify(SECRET, "GET", "T1", expires, signature, now=expires - 1)
    assert signing.verify(SECRET, "GET", "T1", expires, signature, now=expires)
    assert not signing.verify(SECRET, "GET", "T1", expires, signature, now=expires + 1)
    past = int(time.time()) - 1
    assert not signing.verify(SECRET, "GET", "T1", past, signing.sign(SECRET, "GET", "T1", past))


def test_signed_path():
    path = signing.signed_path(SECRET, "PUT", "/uploads", "T 1/x", 1_800_000_000)
    parts = urlsplit(path)
    assert parts.path == "/uploads/T%201%2Fx"
    query = parse_qs(parts.query)
    assert query["expires"] == ["1800000000"]
    assert signing.verify(SECRET, "PUT", "T 1/x", query["expires"][0], query["signature"][0], now=0)


async def test_s3_download_url_points_to_the_api(s3: S3Storage):
    """The link users get is the api's signed ``GET /files/{task_id}``, as for the local backend:
    the api records the download and serves (decrypts) it or redirects to a fresh presigned URL."""
    s3 = S3Storage(s3.bucket, public_url=PUBLIC_URL + "/", secret=SECRET)
    expires_at = utcnow() + dt.timedelta(minutes=15)
    url = await s3.download_url(new_key(), task_id="T1", filename="samples-1.csv", expires_at=expires_at)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == PUBLIC_URL + "/files/T1"
    query = parse_qs(parts.query)
    assert signing.verify(SECRET, "GET", "T1", query["expires"][0], query["signature"][0])


async def test_local_download_url_is_signed_for_get(tmp_path: Path):
    storage = LocalStorage(tmp_path, PUBLIC_URL + "/", SECRET)
    expires_at = utcnow() + dt.timedelta(minutes=15)
    url = await storage.download_url(new_key(), task_id="T1", filename="samples-1.csv", expires_at=expires_at)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_URL
    assert parts.path == "/files/T1"
    query = parse_qs(parts.query)
    assert query["expires"] == [str(int(expires_at.timestamp()))]
    assert signing.verify(SECRET, "GET", "T1", query["expires"][0], query["signature"][0])
    assert not signing.verify(SECRET, "PUT", "T1", query["expires"][0], query["signature"][0])

    upload = urlsplit(storage.upload_url("T1", expires_at))
    assert upload.path == "/uploads/T1"
    query = parse_qs(upload.query)
    assert signing.verify(SECRET, "PUT", "T1", query["expires"][0], query["signature"][0])


@pytest.mark.parametrize(
    "key",
    [
        "../outside.csv",
        "exports/../../outside.csv",
        "exports/a/../../../etc/passwd",
        "/etc/passwd",
        "exports//x.csv",
        "exports/./x.csv",
        "exports/x.csv/",
        "exports\\..\\x.csv",
        "exports/x\x00.csv",
        "exports/x.csv.partial-abc",
        "",
        "..",
    ],
)
async def test_local_refuses_keys_that_escape_the_root(tmp_path: Path, key: str):
    storage = LocalStorage(tmp_path / "files", PUBLIC_URL, SECRET)
    with pytest.raises(StorageError) as refused:
        storage.path_for(key)
    assert not refused.value.transient
    with pytest.raises(StorageError):
        await storage.open_writer(key, "text/csv")
    with pytest.raises(StorageError):
        await storage.delete(key)
    assert not (tmp_path / "outside.csv").exists()


async def test_local_refuses_symlink_out_of_the_root(tmp_path: Path):
    root, outside = tmp_path / "files", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "exports").symlink_to(outside)
    storage = LocalStorage(root, PUBLIC_URL, SECRET)
    with pytest.raises(StorageError):
        await storage.open_writer("exports/x.csv", "text/csv")
    assert list(outside.iterdir()) == []


async def test_local_open_read_streams_the_file(tmp_path: Path):
    storage = LocalStorage(tmp_path, PUBLIC_URL, SECRET)
    data = os.urandom(3 * MiB + 5)
    key = new_key()
    await write_all(storage, key, data)
    reader = await storage.open_read(key, chunk_size=MiB)
    assert reader is not None and reader.size == len(data)
    chunks = [chunk async for chunk in reader]
    assert [len(c) for c in chunks] == [MiB, MiB, MiB, 5]
    assert b"".join(chunks) == data
    async with await storage.open_read(key) as early:  # stopping early closes the file too
        assert await anext(early)
    assert await storage.open_read(new_key()) is None


async def test_local_large_file_is_synced_as_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Past every ``SYNC_EVERY`` bytes the writer syncs the file to disk (so that the fsync before
    the rename has little left); the writes run one at a time, in order, while more is gathered."""
    import storage.local

    synced: list[int] = []
    monkeypatch.setattr(storage.local, "SYNC_EVERY", 2 * MiB)
    monkeypatch.setattr(storage.local, "_datasync", lambda fd: synced.append(os.fstat(fd).st_size) or os.fdatasync(fd))
    storage_ = LocalStorage(tmp_path, PUBLIC_URL, SECRET)
    data = os.urandom(7 * MiB + 3)
    key = new_key()
    writer = await storage_.open_writer(key, "text/csv")
    for at in range(0, len(data), 300_000):
        await writer.write(data[at : at + 300_000])
    stored = await writer.complete()
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert storage_.path_for(key).read_bytes() == data
    assert len(synced) == 3 and synced == sorted(synced) and synced[0] >= 2 * MiB


async def test_local_write_that_fails_in_its_thread_fails_the_export_and_leaves_nothing(tmp_path: Path):
    """A write fails in its thread (the file-size limit stands in for a full disk): a later
    ``write`` or ``complete`` raises the storage error that says so, and after ``abort`` neither
    the file nor a partial file is left."""
    import resource
    import signal

    storage_ = LocalStorage(tmp_path, PUBLIC_URL, SECRET)
    key = new_key()
    writer = await storage_.open_writer(key, "text/csv")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 * MiB, limit[1]))
    try:
        with pytest.raises(StorageError, match=r"writing .*File too large"):
            for _ in range(8):
                await writer.write(b"x" * MiB)
            await writer.complete()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    await writer.abort()
    assert [files for _, _, files in os.walk(tmp_path) if files] == []
    assert await storage_.verify(key) is None


async def test_local_check_refuses_unusable_root(tmp_path: Path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StorageError) as refused:
        await LocalStorage(not_a_dir, PUBLIC_URL, SECRET).check()
    assert not refused.value.transient


def test_content_disposition():
    assert content_disposition("samples-1.csv") == 'attachment; filename="samples-1.csv"'
    assert content_disposition('a"b.csv') == "attachment; filename=\"a_b.csv\"; filename*=UTF-8''a%22b.csv"
    assert content_disposition("../x\r\n.csv") == 'attachment; filename=".._x__.csv"'
    assert content_disposition("é.csv") == "attachment; filename=\"_.csv\"; filename*=UTF-8''%C3%A9.csv"


# --- settings ---------------------------------------------------------------------------------------


def test_storage_from_settings_local(tmp_path: Path):
    settings = Settings(storage="local", data_dir=tmp_path, public_url=PUBLIC_URL, jwt_secret=SECRET)
    encrypted = storage_from_settings(settings)  # encrypted by default on the local backend
    assert isinstance(encrypted, EncryptedStorage) and isinstance(encrypted.inner, LocalStorage)
    assert encrypted.name == "local"
    clear = Settings(storage="local", data_dir=tmp_path / "clear", encryption="none", jwt_secret=SECRET)
    assert isinstance(storage_from_settings(clear), LocalStorage)
    storage = encrypted.inner
    assert storage.name == "local"
    assert storage.root == (tmp_path / "files").absolute()
    assert storage.secret == SECRET


async def test_storage_from_settings_s3_env(s3_settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    for name, value in s3_settings_env.items():
        monkeypatch.setenv(name, value)
    storage = storage_from_settings(Settings())
    assert isinstance(storage, S3Storage)
    assert storage.name == "s3"
    assert storage.bucket == s3_settings_env["DATAPORT_S3_BUCKET"]
    await storage.check()
    stored = await write_all(storage, new_key(), b"a,b\n")
    assert await storage.verify(stored.key) == stored
    head = storage.client.head_object(Bucket=storage.bucket, Key=stored.key)
    assert head["ServerSideEncryption"] == "AES256"
    await storage.delete(stored.key)


def test_storage_from_settings_creates_bucket(s3_server: S3Server):
    bucket = "created-" + secrets.token_hex(4)
    settings = Settings(
        storage="s3",
        s3_bucket=bucket,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
        s3_create_bucket=True,
    )
    storage_from_settings(settings)
    storage_from_settings(settings)  # exists already: fine
    s3_server.client().head_bucket(Bucket=bucket)
