"""The S3 backend (AWS or any S3-compatible store), through boto3's thread-safe sync client with
every call in a worker thread.

A file is written as a real multipart upload while it is produced: bytes gather in a buffer of
``part_size`` (at least 5 MiB), each full buffer is sent as one part while the next one fills (one
part in flight at most, so memory stays at about two parts), and ``complete()`` sends the rest and
completes the upload. A file smaller than one part is sent with one ``PutObject``. SHA-256 and size
are computed on the way. Server-side encryption is asked for on every object when ``sse`` is set.

Import files are uploaded by the browser straight to the bucket, through a presigned POST (its
policy caps the size, fixes the key and the Content-Type, and demands the SSE header) or a
presigned PUT (Content-Type and SSE headers signed; S3 cannot cap a PUT's size). The worker reads
them back through ``open_stream``, a forward-only stream of the GetObject body.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)

from storage.base import StorageError, StoredObject, UploadTarget
from storage.disposition import content_disposition
from storage.signing import signed_path

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import MultipartUploadTypeDef  # boto3-stubs, a test dependency

    from dataport.settings import Settings

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PARTS = 10_000
HASH_IN_THREAD = 1024 * 1024  # chunks at least this big are hashed off the event loop
READ_CHUNK = 1024 * 1024
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 limit
UPLOAD_METHODS = ("POST", "PUT")
# A presigned POST accepts empty files: the import then fails with a clear "the file is empty",
# as it must anyway for a PUT upload (which S3 cannot size-check), instead of the browser getting
# S3's bare EntityTooSmall and the task waiting for a file that never comes.
MIN_UPLOAD_BYTES = 0

T = TypeVar("T")

_THROTTLING = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
}
# PreconditionFailed: verify's GetObject If-Match lost a race with a concurrent overwrite.
_TRANSIENT_CODES = _THROTTLING | {
    "PreconditionFailed",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _caused_by(error: StorageError, code: str) -> bool:
    cause = error.__cause__
    return isinstance(cause, ClientError) and _error_code(cause) == code


def storage_error(e: BaseException, action: str) -> StorageError:
    """A botocore error as a ``StorageError``: connection trouble, throttling and 5xx are transient
    (worth another try); access denied, a missing bucket, bad credentials and other 4xx are not."""
    if isinstance(e, ClientError):
        code, status = _error_code(e), _status(e)
        message = e.response.get("Error", {}).get("Message") or ""
        transient = status >= 500 or status == 429 or code in _TRANSIENT_CODES
        return StorageError(f"S3 {action}: {code or status} {message}".rstrip(), transient=transient)
    if isinstance(e, ConnectionError | HTTPClientError | IncompleteReadError | ResponseStreamingError):
        return StorageError(f"S3 {action}: {e}", transient=True)
    return StorageError(f"S3 {action}: {e}", transient=False)


def _presign_seconds(expires_at: dt.datetime) -> int:
    """Seconds from now to ``expires_at``, within what SigV4 allows (at least 1, at most 7 days)."""
    now = dt.datetime.now(expires_at.tzinfo or None)
    seconds = math.ceil((expires_at - now).total_seconds())
    return min(max(seconds, 1), MAX_PRESIGN_SECONDS)


class S3ReadStream(io.RawIOBase):
    """A GetObject body as a raw stream whose errors are ``StorageError``s (a dropped connection
    is transient), so the worker's retry logic sees storage failures, not botocore's. Wrapped in
    an ``io.BufferedReader`` by ``open_stream``; forward-only."""

    def __init__(self, body: Any, where: str) -> None:
        super().__init__()
        self._body = body
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            # StreamingBody checks the byte count against Content-Length at the end: a body cut
            # short raises IncompleteReadError instead of passing for a shorter file.
            read: int = self._body.readinto(buffer)  # (botocore's StreamingBody is untyped)
            return read
        except (BotoCoreError, ClientError) as e:
            raise storage_error(e, f"reading {self._where}") from e

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Writer:
    """One object being written. Every S3 call runs as a task of its own, awaited through a shield:
    a cancelled caller (a cancelled export) leaves the call to finish, and ``abort()`` waits for it,
    so an upload created or a part sent at the moment of cancellation is still cleaned up."""

    def __init__(self, storage: S3Storage, key: str, content_type: str) -> None:
        self._s3 = storage
        self.key = key
        self.content_type = content_type
        self._buffer = bytearray()
        self._sha = hashlib.sha256()
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._next_part = 1
        self._inflight: asyncio.Future[None] | None = None  # the part being sent while more is written
        self._calls: set[asyncio.Future[Any]] = set()
        self._visible = False  # PutObject / CompleteMultipartUpload went through
        self._state = "open"

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    def _start(self, action: str, fn: Callable[..., T], **kwargs: Any) -> asyncio.Future[T]:
        call = asyncio.ensure_future(
            self._s3._call(action, self.key, fn, Bucket=self._s3.bucket, Key=self.key, **kwargs)
        )
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        return call

    async def _run(self, action: str, fn: Callable[..., T], **kwargs: Any) -> T:
        return await asyncio.shield(self._start(action, fn, **kwargs))

    async def write(self, chunk: bytes) -> None:
        if self._state != "open":
            raise StorageError(f"S3 write to {self.key!r} after it was {self._state}", transient=False)
        if not chunk:
            return
        if len(chunk) >= HASH_IN_THREAD:
            await asyncio.to_thread(self._sha.update, chunk)
        else:
            self._sha.update(chunk)
        self._size += len(chunk)
        self._buffer += chunk
        if len(self._buffer) >= self._s3.part_size:
            await self._send_part()

    async def _wait_inflight(self) -> None:
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            self._inflight = None

    async def _send_part(self) -> None:
        """Start sending the buffer as the next part, once the previous part has gone."""
        await self._wait_inflight()
        if self._upload_id is None:
            created = self._start(
                "CreateMultipartUpload",
                self._s3.client.create_multipart_upload,
                ContentType=self.content_type,
                **self._s3.sse_args,
            )
            # Remember the id even if our caller is cancelled meanwhile: abort() needs it.
            created.add_done_callback(self._remember_upload_id)
            await asyncio.shield(created)
        number = self._next_part
        if number > MAX_PARTS:
            raise StorageError(f"S3 upload of {self.key!r} needs more than {MAX_PARTS} parts", transient=False)
        self._next_part += 1
        data, self._buffer = self._buffer, bytearray()
        self._inflight = asyncio.ensure_future(self._upload_part(number, data))
        self._calls.add(self._inflight)
        self._inflight.add_done_callback(self._calls.discard)

    def _remember_upload_id(self, created: asyncio.Future[Any]) -> None:
        if not created.cancelled() and created.exception() is None:
            self._upload_id = created.result()["UploadId"]

    async def _upload_part(self, number: int, data: bytearray) -> None:
        response = await self._s3._call(
            "UploadPart",
            self.key,
            self._s3.client.upload_part,
            Bucket=self._s3.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=bytes(data),
        )
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def _made_visible(self, call: asyncio.Future[Any]) -> None:
        if not call.cancelled() and call.exception() is None:
            self._visible = True

    async def complete(self) -> StoredObject:
        if self._state != "open":
            raise StorageError(f"S3 complete {self.key!r} after it was {self._state}", transient=False)
        self._state = "completing"
        try:
            if self._upload_id is None and self._inflight is None:
                # Awaited for completion only: what S3 answers is not read.
                call: asyncio.Future[object] = self._start(
                    "PutObject",
                    self._s3.client.put_object,
                    Body=bytes(self._buffer),
                    ContentType=self.content_type,
                    **self._s3.sse_args,
                )
            else:
                if self._buffer:
                    await self._send_part()  # the last part may be smaller than 5 MiB
                await self._wait_inflight()
                call = self._start(
                    "CompleteMultipartUpload",
                    self._s3.client.complete_multipart_upload,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])},
                )
            call.add_done_callback(self._made_visible)
            await asyncio.shield(call)
        except BaseException:
            await asyncio.shield(self._abort())
            raise
        self._state = "completed"
        self._buffer = bytearray()
        return StoredObject(self.key, self._size, self._sha.hexdigest())

    async def abort(self) -> None:
        if self._state in ("completed", "aborted"):
            return
        await self._abort()

    async def _abort(self) -> None:
        self._state = "aborted"
        self._buffer = bytearray()
        # Calls still running (the caller was cancelled) finish first: no part may arrive after the
        # abort, and an upload id or a completed object they produce must be cleaned up too.
        calls = list(self._calls)
        if calls:
            await asyncio.wait(calls)  # unlike gather, being cancelled here does not cancel them
            for call in calls:
                if not call.cancelled():
                    call.exception()  # retrieved: already reported to the caller, or moot now
        self._inflight = None
        if self._upload_id is not None and not self._visible:
            try:
                await self._s3._call(
                    "AbortMultipartUpload",
                    self.key,
                    self._s3.client.abort_multipart_upload,
                    Bucket=self._s3.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                )
            except StorageError as e:
                if not _caused_by(e, "NoSuchUpload"):
                    raise
        if self._visible:  # complete() was cancelled after S3 had made the object: the caller saw no success
            await self._s3.delete(self.key)


class S3Storage:
    name = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        sse: str | None = "AES256",
        sse_kms_key_id: str | None = None,
        part_size: int = 8 * 1024 * 1024,
        upload_method: str = "POST",
        public_url: str = "http://127.0.0.1:8000",
        secret: str = "",
    ) -> None:
        if upload_method not in UPLOAD_METHODS:
            raise ValueError(f"unknown S3 upload method {upload_method!r} (expected 'POST' or 'PUT')")
        self.bucket = bucket
        self.upload_method = upload_method
        self.public_url = public_url.rstrip("/")  # the api, which serves the download links
        self.secret = secret
        self.region = region or "us-east-1"
        self.part_size = max(int(part_size), MIN_PART_SIZE)
        self.sse_args: dict[str, str] = {}
        if sse:
            self.sse_args["ServerSideEncryption"] = sse
            if sse_kms_key_id:
                self.sse_args["SSEKMSKeyId"] = sse_kms_key_id
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=32,
        )
        # A session of our own: boto3's default session is shared and not thread-safe to create
        # clients from; the client itself is thread-safe.
        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            region_name=self.region,
        )
        self.client = session.client("s3", endpoint_url=endpoint_url or None, config=config)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        storage = cls(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            sse=settings.s3_sse,
            sse_kms_key_id=settings.s3_sse_kms_key_id,
            part_size=settings.s3_part_size,
            upload_method=settings.s3_upload_method,
            public_url=settings.public_url,
            secret=settings.signing_secret,
        )
        if settings.s3_create_bucket:
            storage.ensure_bucket()
        return storage

    async def _call(self, action: str, key: str | None, fn: Callable[..., T], /, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except (BotoCoreError, ClientError) as e:
            where = f"{self.bucket}/{key}" if key is not None else self.bucket
            raise storage_error(e, f"{action} {where}") from e

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (blocking; for start-up with ``s3_create_bucket``)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if _status(e) != 404 and _error_code(e) not in ("404", "NoSuchBucket", "NotFound"):
                raise storage_error(e, f"HeadBucket {self.bucket}") from e
        except BotoCoreError as e:
            raise storage_error(e, f"HeadBucket {self.bucket}") from e
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as e:
            if _error_code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise storage_error(e, f"CreateBucket {self.bucket}") from e
        except BotoCoreError as e:
            raise storage_error(e, f"CreateBucket {self.bucket}") from e

    async def open_writer(self, key: str, content_type: str) -> S3Writer:
        return S3Writer(self, key, content_type)

    async def incomplete_uploads(self, prefix: str) -> list[MultipartUploadTypeDef]:
        """Open multipart uploads (``Key``, ``UploadId``) whose key starts with ``prefix``."""

        def _list() -> list[MultipartUploadTypeDef]:
            uploads: list[MultipartUploadTypeDef] = []
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
                uploads.extend(page.get("Uploads", []))
            return uploads

        return await self._call("ListMultipartUploads", prefix, _list)

    async def _abort(self, upload: MultipartUploadTypeDef) -> bool:
        """Abort one open multipart upload (as ``incomplete_uploads`` lists it): True, or False for
        one that was gone already."""
        try:
            await self._call(
                "AbortMultipartUpload",
                upload["Key"],
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )
        except StorageError as e:
            if not _caused_by(e, "NoSuchUpload"):
                raise
            return False
        return True

    async def discard_incomplete(self, key: str) -> None:
        """Abort the open multipart uploads of ``key`` (of every key under it when it ends in /)."""
        for upload in await self.incomplete_uploads(key):
            if upload["Key"] != key and not key.endswith("/"):
                continue  # same prefix, another object
            await self._abort(upload)

    async def sweep_incomplete(self, older_than: dt.datetime) -> int:
        swept = 0
        for upload in await self.incomplete_uploads(""):
            if upload["Initiated"] >= older_than:
                continue  # may belong to a job that is still writing
            if await self._abort(upload):
                swept += 1
        return swept

    async def verify(self, key: str) -> StoredObject | None:
        """Size from HeadObject, SHA-256 from the body streamed in chunks (never whole in memory),
        read with If-Match so both describe the same version of the object."""

        def _verify() -> StoredObject | None:
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _status(e) == 404 and _error_code(e) in _MISSING:
                    return None
                raise
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=head["ETag"])
            except ClientError as e:
                if _error_code(e) == "NoSuchKey":  # deleted in between
                    return None
                raise
            body = response["Body"]
            sha = hashlib.sha256()
            size = 0
            try:
                for chunk in body.iter_chunks(READ_CHUNK):
                    sha.update(chunk)
                    size += len(chunk)
            finally:
                body.close()
            expected = head["ContentLength"]
            if size != expected:
                raise StorageError(f"S3 verify {self.bucket}/{key}: read {size} bytes, expected {expected}")
            return StoredObject(key, size, sha.hexdigest())

        return await self._call("verify", key, _verify)

    async def download_url(self, key: str, *, task_id: str, filename: str, expires_at: dt.datetime) -> str:
        """The api's signed ``GET /files/{task_id}`` (as for the local backend): the api records the
        download and streams the file (decrypting it) or redirects to ``presigned_download_url``."""
        return self.public_url + signed_path(self.secret, "GET", "/files", task_id, int(expires_at.timestamp()))

    async def presigned_download_url(self, key: str, *, filename: str, expires_at: dt.datetime) -> str:
        """A presigned GetObject of ``key`` valid until ``expires_at``, as ``filename``."""
        seconds = _presign_seconds(expires_at)
        return await self._call(
            "presign GetObject",
            key,
            self.client.generate_presigned_url,
            ClientMethod="get_object",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ResponseContentDisposition": content_disposition(filename),
            },
            ExpiresIn=seconds,
        )

    def _header_names(self, params: dict[str, str]) -> dict[str, str]:
        """PutObject parameters (``ContentType``, ``ServerSideEncryption``, ``SSEKMSKeyId``...) as
        the HTTP headers (and POST form fields) that carry them, named by botocore's own model."""
        shape = self.client.meta.service_model.operation_model("PutObject").input_shape
        assert shape is not None  # PutObject takes parameters
        members = shape.members
        return {members[name].serialization["name"]: value for name, value in params.items()}

    async def upload_target(
        self, key: str, *, task_id: str, content_type: str, max_bytes: int, expires_at: dt.datetime
    ) -> UploadTarget:
        """A presigned POST or PUT (``upload_method``) for ``key``. Only POST can cap the size: with
        PUT, whoever starts the import must compare ``size_of`` with ``max_bytes``."""
        seconds = _presign_seconds(expires_at)
        # What the signature really allows: the requested time unless SigV4's limit cut it short.
        expires_at = min(expires_at, dt.datetime.now(expires_at.tzinfo or None) + dt.timedelta(seconds=seconds))
        headers = self._header_names({"ContentType": content_type, **self.sse_args})
        if self.upload_method == "PUT":
            url = await self._call(
                "presign PutObject",
                key,
                self.client.generate_presigned_url,
                ClientMethod="put_object",
                Params={"Bucket": self.bucket, "Key": key, "ContentType": content_type, **self.sse_args},
                ExpiresIn=seconds,
            )
            # Content-Type and SSE headers are signed: the browser must send exactly these.
            return UploadTarget(url=url, method="PUT", headers=headers, fields=None, expires_at=expires_at)
        # Every field the browser sends must be matched by a condition (S3 refuses extra fields),
        # and each condition pins the value: the stored object gets our Content-Type and SSE.
        conditions: list[Any] = [["content-length-range", MIN_UPLOAD_BYTES, max_bytes]]
        conditions += [{name: value} for name, value in headers.items()]
        post = await self._call(
            "presign PostObject",
            key,
            self.client.generate_presigned_post,
            Bucket=self.bucket,
            Key=key,  # boto3 adds the {"key": key} condition itself
            Fields=headers,
            Conditions=conditions,
            ExpiresIn=seconds,
        )
        return UploadTarget(url=post["url"], method="POST", headers={}, fields=post["fields"], expires_at=expires_at)

    async def size_of(self, key: str) -> int | None:
        def _size() -> int | None:
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
            except ClientError as e:
                if _status(e) == 404 and _error_code(e) in _MISSING:
                    return None
                raise

        return await self._call("HeadObject", key, _size)

    async def seal(self, key: str, sealed_key: str) -> int | None:
        """A server-side copy (at most 5 GiB, more than uploads may be): the copy is of the object as
        it was when S3 took the request, and a later PUT to ``key`` leaves it as it is."""

        def _copy() -> int | None:
            try:
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=sealed_key,
                    CopySource={"Bucket": self.bucket, "Key": key},
                    MetadataDirective="COPY",
                    # The configured names, as given: S3 judges them, not the stubs' Literal types.
                    **self.sse_args,  # type: ignore[arg-type]
                )
            except ClientError as e:
                if _status(e) == 404 and _error_code(e) in _MISSING:
                    return None
                raise
            return int(self.client.head_object(Bucket=self.bucket, Key=sealed_key)["ContentLength"])

        return await self._call("CopyObject", key, _copy)

    async def open_stream(self, key: str, start: int = 0) -> io.BufferedReader:
        """The object's body from byte ``start`` on, as a synchronous, forward-only stream, for a
        worker thread. A missing object is a ``StorageError`` (not transient) naming the key."""
        ranged = {"Range": f"bytes={start}-"} if start else {}
        response = await self._call("GetObject", key, self.client.get_object, Bucket=self.bucket, Key=key, **ranged)
        return io.BufferedReader(S3ReadStream(response["Body"], f"{self.bucket}/{key}"), READ_CHUNK)

    async def list_keys(self, prefix: str) -> list[str]:
        """The keys of the objects under ``prefix``."""

        def _list() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(str(o["Key"]) for o in page.get("Contents", []))
            return keys

        return await self._call("ListObjectsV2", prefix, _list)

    async def delete(self, key: str) -> None:
        await self._call("DeleteObject", key, self.client.delete_object, Bucket=self.bucket, Key=key)

    async def check(self) -> None:
        await self._call("HeadBucket", None, self.client.head_bucket, Bucket=self.bucket)
