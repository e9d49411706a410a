"""Files encrypted before storage (issue 18, item 6; docs/encryption.md).

The format on its own (every way of altering a file is refused), keys and rotation, memory kept
flat on a large file, then end to end through a real api and worker: an encrypted export on the
local backend and on S3 (SeaweedFS) holds no plaintext and downloads to the bytes and SHA-256 the
task reports, ranges included; altered, cut-off and reordered files are refused; error reports and
sealed imports are encrypted and imports still work; ``dataport keys rotate`` lets an old KEK go.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dataport.settings import Settings
from storage.encrypted import EncryptedStorage, key_file
from storage.encryption import CHUNK_SIZE, HEADER_SIZE, TAG, IntegrityError
from storage.keys import Keyring, KeyUnavailable, kek_id
from storage.local import LocalStorage
from tests.client import Api
from tests.fixtures.s3 import client_for
from tests.fixtures.stack import Stack, _stack
from tests.test_imports import Target, csv_bytes, fresh_ids, good_rows

KEK_OLD, KEK_NEW = secrets.token_hex(32), secrets.token_hex(32)
RECORD = CHUNK_SIZE + TAG
KNOWN_CELL = "Zoë Ørsted 東京 🚀".encode()  # a cell of the special dataset


def local(root: Path, *keks: str) -> EncryptedStorage:
    return EncryptedStorage(LocalStorage(root, "http://127.0.0.1:1", "s"), Keyring([bytes.fromhex(k) for k in keks]))


async def store(storage: EncryptedStorage, key: str, data: bytes) -> None:
    writer = await storage.open_writer(key, "text/csv")
    for at in range(0, len(data), 100_000):
        await writer.write(data[at : at + 100_000])
    await writer.complete()


async def read(storage: EncryptedStorage, key: str, start: int = 0) -> bytes:
    stream = await storage.open_stream(key, start)
    try:
        return await asyncio.to_thread(stream.read)
    finally:
        stream.close()


# -- the format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE, 1_000_003])
async def test_round_trip_sizes_and_offsets(tmp_path: Path, size: int):
    storage = local(tmp_path, KEK_NEW)
    data = os.urandom(size)
    key = f"exports/u/t/{size}.csv"
    writer = await storage.open_writer(key, "text/csv")
    await writer.write(data)
    stored = await writer.complete()
    assert (stored.size, stored.sha256) == (size, hashlib.sha256(data).hexdigest()), "the plaintext's"
    assert await storage.verify(key) == stored
    assert await storage.size_of(key) == size
    for start in sorted({0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 7, size // 2, size}):
        if start <= size:
            assert await read(storage, key, start) == data[start:]
    stored_bytes = (tmp_path / key).read_bytes()
    assert len(stored_bytes) == HEADER_SIZE + size + TAG * max(1, -(-size // CHUNK_SIZE))


async def test_no_plaintext_is_stored(tmp_path: Path):
    storage = local(tmp_path, KEK_NEW)
    data = b"id,name\n" + b"".join(b"%d,%s\n" % (i, KNOWN_CELL) for i in range(20_000))
    await store(storage, "exports/u/t/f.csv", data)
    assert _files_with(tmp_path, KNOWN_CELL) == _files_with(tmp_path, b"id,name") == []
    assert len(_files_with(tmp_path, b"")) == 2, "the file and its key file"


def _files_with(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _tamper(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip header":
        raw[7] ^= 1
    elif how == "flip first chunk":
        raw[HEADER_SIZE + 100] ^= 0x40
    elif how == "flip a tag":
        raw[HEADER_SIZE + RECORD - 1] ^= 1
    elif how == "flip last byte":
        raw[-1] ^= 1
    elif how == "cut mid-chunk":
        del raw[HEADER_SIZE + RECORD + 1000 :]
    elif how == "cut at a record boundary":
        del raw[HEADER_SIZE + 2 * RECORD :]
    elif how == "cut the header":
        del raw[10:]
    elif how == "swap chunks":
        first, second = HEADER_SIZE + RECORD, HEADER_SIZE + 2 * RECORD
        raw[first:second], raw[second : second + RECORD] = raw[second : second + RECORD], raw[first:second]
    elif how == "drop a chunk":
        del raw[HEADER_SIZE + RECORD : HEADER_SIZE + 2 * RECORD]
    elif how == "append":
        raw += raw[HEADER_SIZE : HEADER_SIZE + RECORD]
    path.write_bytes(bytes(raw))


TAMPERING = [
    "flip header",
    "flip first chunk",
    "flip a tag",
    "flip last byte",
    "cut mid-chunk",
    "cut at a record boundary",
    "cut the header",
    "swap chunks",
    "drop a chunk",
    "append",
]


@pytest.mark.parametrize("how", TAMPERING)
async def test_an_altered_file_is_refused(tmp_path: Path, how: str):
    storage = local(tmp_path, KEK_NEW)
    key = "exports/u/t/f.csv"
    await store(storage, key, os.urandom(5 * CHUNK_SIZE + 123))
    _tamper(tmp_path / key, how)
    with pytest.raises(IntegrityError):
        await read(storage, key)
    with pytest.raises(IntegrityError):
        await storage.verify(key)


async def test_a_key_file_moved_to_another_file_does_not_open_it(tmp_path: Path):
    storage = local(tmp_path, KEK_NEW)
    await store(storage, "a/x.csv", b"first file")
    await store(storage, "b/y.csv", b"second file")
    (tmp_path / key_file("b/y.csv")).write_bytes((tmp_path / key_file("a/x.csv")).read_bytes())
    with pytest.raises(IntegrityError, match="header does not match"):
        await read(storage, "b/y.csv")
    # Body and key file moved together decrypt as the file they are: never as another.
    (tmp_path / "b/y.csv").write_bytes((tmp_path / "a/x.csv").read_bytes())
    assert await read(storage, "b/y.csv") == b"first file"


async def test_files_in_clear_are_still_read(tmp_path: Path):
    """Written before encryption was on: no key file, read as they are."""
    clear = LocalStorage(tmp_path, "http://127.0.0.1:1", "s")
    writer = await clear.open_writer("exports/u/t/old.csv", "text/csv")
    await writer.write(b"a,b\n1,2\n")
    await writer.complete()
    storage = local(tmp_path, KEK_NEW)
    assert await read(storage, "exports/u/t/old.csv") == b"a,b\n1,2\n"
    assert (await storage.verify("exports/u/t/old.csv")).size == 8  # type: ignore[union-attr]


async def test_seal_encrypts_a_clear_upload_and_links_an_encrypted_one(tmp_path: Path):
    storage = local(tmp_path, KEK_NEW)
    inner = storage.inner
    assert isinstance(inner, LocalStorage)
    upload = b"id,name\n1," + KNOWN_CELL + b"\n"
    writer = await inner.open_writer("imports/u/t/up.csv", "text/csv")  # as an S3 upload arrives: clear
    await writer.write(upload)
    await writer.complete()
    assert await storage.seal("imports/u/t/up.csv", "imports/u/t/sealed-1/up.csv") == len(upload)
    assert KNOWN_CELL not in (tmp_path / "imports/u/t/sealed-1/up.csv").read_bytes()
    assert await read(storage, "imports/u/t/sealed-1/up.csv") == upload

    # An upload encrypted as it arrived (the local backend's PUT) is sealed as it is, with its key.
    async def body() -> Iterator[bytes]:  # type: ignore[misc]
        yield upload

    received = await storage.receive("imports/u/t2/up.csv", body(), max_bytes=1000)
    assert received.size == len(upload)
    assert KNOWN_CELL not in (tmp_path / "imports/u/t2/up.csv").read_bytes()
    assert await storage.seal("imports/u/t2/up.csv", "imports/u/t2/sealed-2/up.csv") == len(upload)
    assert await read(storage, "imports/u/t2/sealed-2/up.csv") == upload
    await storage.delete("imports/u/t2/sealed-2/up.csv")
    assert not (tmp_path / key_file("imports/u/t2/sealed-2/up.csv")).exists()


# -- keys and rotation -----------------------------------------------------------------------------


async def test_rotation_keeps_old_files_readable_then_lets_the_old_key_go(tmp_path: Path):
    old = local(tmp_path, KEK_OLD)
    await store(old, "exports/u/1/a.csv", b"written under the old key")
    both = local(tmp_path, KEK_NEW, KEK_OLD)  # the new key first: new files use it
    await store(both, "exports/u/2/b.csv", b"written under the new key")
    assert await read(both, "exports/u/1/a.csv") == b"written under the old key"
    body_before = (tmp_path / "exports/u/1/a.csv").read_bytes()

    only_new = local(tmp_path, KEK_NEW)
    with pytest.raises(KeyUnavailable, match=kek_id(bytes.fromhex(KEK_OLD))):
        await read(only_new, "exports/u/1/a.csv")

    report = await both.rotate()
    assert (report.rewrapped, report.current, report.failed) == (1, 1, [])
    assert (tmp_path / "exports/u/1/a.csv").read_bytes() == body_before, "the body is not rewritten"
    assert await read(only_new, "exports/u/1/a.csv") == b"written under the old key"
    assert (await only_new.rotate()).current == 2


def test_kek_setting_is_checked_and_never_echoed(monkeypatch: pytest.MonkeyPatch):
    bad = "ab" * 31 + "zz"
    with pytest.raises(ValueError) as refused:
        Settings(kek=f"{KEK_NEW},{bad}")
    message = str(refused.value)
    assert "DATAPORT_KEK" in message and "key 2" in message and "64 hex characters" in message
    assert bad not in message and KEK_NEW not in message
    keys = Settings(kek=f" {KEK_NEW} , {KEK_OLD} ").key_encryption_keys
    assert keys == [bytes.fromhex(KEK_NEW), bytes.fromhex(KEK_OLD)]


def test_a_kek_is_generated_once_into_the_data_dir(tmp_path: Path):
    first = Settings(data_dir=tmp_path).key_encryption_keys
    assert first == Settings(data_dir=tmp_path).key_encryption_keys and len(first[0]) == 32
    assert (tmp_path / "kek").stat().st_mode & 0o777 == 0o600


# -- memory ----------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import asyncio, hashlib, os, sys
    from storage.encrypted import EncryptedStorage
    from storage.keys import Keyring
    from storage.local import LocalStorage

    async def main(root, size):
        storage = EncryptedStorage(LocalStorage(root, "http://x", "s"), Keyring([os.urandom(32)]))
        block = os.urandom(1 << 20)
        writer = await storage.open_writer("big/file.bin", "application/octet-stream")
        for _ in range(size >> 20):
            await writer.write(block)
        stored = await writer.complete()
        assert (await storage.verify("big/file.bin")) == stored
        stream = await storage.open_stream("big/file.bin")
        while stream.read(1 << 20):
            pass
        stream.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    status = open("/proc/self/status").read()
    print(next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")))
    """
)


def _peak_kib(root: Path, size: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(root), str(size)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return int(out.stdout.strip())


def test_memory_stays_flat_for_a_large_file(tmp_path: Path):
    """Peak RSS (VmHWM of a fresh process) writing, verifying and reading 16 MiB, then 512 MiB:
    the large file costs no more than a few MiB over the small one."""
    small = _peak_kib(tmp_path / "small", 16 << 20)
    large = _peak_kib(tmp_path / "large", 512 << 20)
    assert large - small < 16 * 1024, f"peak {small} KiB for 16 MiB, {large} KiB for 512 MiB"


# -- end to end: a real api and worker -------------------------------------------------------------


@pytest.fixture(scope="module")
def enc_local(tmp_path_factory, redis_url, test_data) -> Iterator[Stack]:
    extra = {"DATAPORT_STORAGE": "local", "DATAPORT_KEK": KEK_OLD}  # encrypted: the local default
    yield from _stack("enc-local", tmp_path_factory, redis_url, test_data, extra, workers=1)


@pytest.fixture(scope="module")
def enc_s3(tmp_path_factory, redis_url, test_data, s3_settings_env) -> Iterator[Stack]:
    extra = {**s3_settings_env, "DATAPORT_ENCRYPTION": "aes256-gcm", "DATAPORT_KEK": KEK_OLD}
    yield from _stack("enc-s3", tmp_path_factory, redis_url, test_data, extra, workers=1)


def stored_files(stack: Stack) -> dict[str, bytes]:
    """Every stored object of the stack, raw, by key."""
    settings = stack.settings
    if settings.storage == "local":
        root = settings.resolved_files_dir
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    s3 = client_for(settings)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket)
            for o in page.get("Contents", [])]  # fmt: skip
    return {k: s3.get_object(Bucket=settings.s3_bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_an_encrypted_export_holds_no_plaintext_and_downloads_exactly(backend: str, request: pytest.FixtureRequest):
    stack: Stack = request.getfixturevalue(f"enc_{backend}")
    api = stack.api()
    task, content = api.run_export(dataset="special", format="CSV")
    assert KNOWN_CELL in content
    assert hashlib.sha256(content).hexdigest() == task["checksumSha256"] and len(content) == task["fileSize"]
    assert task["downloadUrl"].startswith(f"{stack.url}/files/{task['id']}?"), "both backends: the api"
    files = {k: v for k, v in stored_files(stack).items() if task["id"] in k}
    body = next(v for k, v in files.items() if not k.startswith("keys/"))
    assert body.startswith(b"DPENC") and len(body) > len(content)
    assert any(k.startswith("keys/") for k in files), "the wrapped data key beside it"
    assert all(KNOWN_CELL not in v and b'say ""hello' not in v for v in files.values())
    # A range is decrypted from the chunk that holds its start.
    part = httpx.get(task["downloadUrl"], headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(content)}"
    assert httpx.get(task["downloadUrl"], headers={"Range": f"bytes={len(content)}-"}).status_code == 416


def _stored_path(stack: Stack, task_id: str) -> Path:
    [path] = [p for p in stack.settings.resolved_files_dir.glob(f"exports/*/{task_id}/**/*") if p.is_file()]
    return path


@pytest.mark.parametrize("how", ["flip first chunk", "cut mid-chunk", "cut at a record boundary", "swap chunks"])
def test_the_api_refuses_an_altered_file_with_a_clean_error(enc_local: Stack, how: str):
    api = enc_local.api()
    task, content = api.run_export(dataset="samples", format="CSV", limit=5_000)
    path = _stored_path(enc_local, task["id"])
    original = path.read_bytes()
    _tamper(path, how)
    try:
        response = httpx.get(task["downloadUrl"], timeout=60)
        assert response.status_code == 500 and b"integrity" in response.content
        assert content[:1000] not in response.content
    finally:
        path.write_bytes(original)
    assert api.download(task["downloadUrl"]).content == content


def test_a_byte_altered_deep_in_a_file_ends_the_download_short(enc_local: Stack):
    """Past the first records the response has begun: the altered record ends it short of its
    Content-Length, which the client reports as a failed download, never a complete one."""
    api = enc_local.api()
    task, content = api.run_export(dataset="samples", format="CSV", limit=60_000)
    assert len(content) > 3 * 1024 * 1024
    path = _stored_path(enc_local, task["id"])
    original = path.read_bytes()
    raw = bytearray(original)
    raw[HEADER_SIZE + 40 * RECORD + 5] ^= 1  # chunk 40: 2.5 MiB in
    path.write_bytes(bytes(raw))
    try:
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("GET", task["downloadUrl"], timeout=60) as response:
                assert response.status_code == 200
                received = b"".join(response.iter_bytes())
                pytest.fail(f"a download of {len(received):,} bytes of {len(content):,} passed as complete")
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_error_reports_and_sealed_imports_are_encrypted_and_imports_work(
    backend: str, request: pytest.FixtureRequest, test_data
):
    stack: Stack = request.getfixturevalue(f"enc_{backend}")
    api = stack.api()
    ids = fresh_ids(3)
    rows = good_rows(ids)
    rows[0][1] = KNOWN_CELL.decode()
    rows[2][2] = "not-a-float"
    task = api.run_import("imp_sqlite", csv_bytes(rows))
    assert task["status"] == "SUCCEEDED" and (task["rowsImported"], task["rowsFailed"]) == (2, 1), task
    assert Target(test_data, "sqlite").ids(ids) == ids[:2]
    report = api.download(task["errorReportUrl"])
    assert report.status_code == 200 and "not-a-float" in report.text
    files = {k: v for k, v in stored_files(stack).items() if task["id"] in k}
    sealed = [k for k in files if "/sealed-" in k and not k.startswith("keys/")]
    reports = [k for k in files if "/report/" in k and not k.startswith("keys/")]
    assert sealed and reports, sorted(files)
    assert all(files[k].startswith(b"DPENC") for k in sealed + reports)
    assert all(KNOWN_CELL not in v and b"not-a-float" not in v for v in files.values()), "nothing in clear"
    assert not [k for k in files if k.endswith("/rows.csv") and "/sealed-" not in k], "the clear upload is gone"


def test_keys_rotate_lets_the_old_kek_go(enc_local: Stack):
    api = enc_local.api()
    task, content = api.run_export(dataset="special", format="JSON")
    key = next(k for k in stored_files(enc_local) if task["id"] in k and not k.startswith("keys/"))
    root = enc_local.settings.resolved_files_dir
    new_only = local(root, KEK_NEW)
    with pytest.raises(KeyUnavailable):
        asyncio.run(read(new_only, key))
    env = {**enc_local.env, "DATAPORT_KEK": f"{KEK_NEW},{KEK_OLD}"}
    run = subprocess.run(
        [sys.executable, "-m", "dataport.cli", "keys", "rotate"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "re-wrapped under " + kek_id(bytes.fromhex(KEK_NEW)) in run.stderr and "0 failed" in run.stderr
    assert asyncio.run(read(new_only, key)) == content
    # With the old key gone and the files re-wrapped, a second rotation finds nothing to do.
    env["DATAPORT_KEK"] = KEK_NEW
    again = subprocess.run(
        [sys.executable, "-m", "dataport.cli", "keys", "rotate"], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "0 data keys re-wrapped" in again.stderr, again.stderr


def test_s3_without_encryption_redirects_to_a_fresh_presigned_url(s3_stack: Stack):
    api: Api = s3_stack.api()
    task, content = api.run_export(dataset="special", format="CSV")
    response = httpx.get(task["downloadUrl"])
    assert response.status_code == 307 and "X-Amz-Signature" in response.headers["location"]
    assert httpx.get(response.headers["location"]).content == content
