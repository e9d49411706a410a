"""Where finished files live: a local directory (default) or S3. See ``storage.base`` for the seam."""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.base import (
    ObjectWriter,
    ReadStream,
    Storage,
    StorageError,
    StoredObject,
    UploadTarget,
    UploadTooLarge,
)
from storage.disposition import content_disposition

if TYPE_CHECKING:
    from dataport.settings import Settings

__all__ = [
    "ObjectWriter",
    "ReadStream",
    "Storage",
    "StorageError",
    "StoredObject",
    "UploadTarget",
    "UploadTooLarge",
    "content_disposition",
    "storage_from_settings",
]


def storage_from_settings(settings: Settings) -> Storage:
    """The backend ``settings.storage`` names. With ``s3_create_bucket`` the S3 bucket is created
    here if missing (a blocking call, meant for start-up)."""
    if settings.storage == "s3":
        from storage.s3 import S3Storage  # boto3 is imported only when S3 is used

        return S3Storage.from_settings(settings)
    if settings.storage == "local":
        from storage.local import LocalStorage

        return LocalStorage.from_settings(settings)
    raise ValueError(f"unknown storage backend {settings.storage!r} (expected 'local' or 's3')")
