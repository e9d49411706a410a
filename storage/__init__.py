"""Where finished files live: a local directory (default) or S3. See ``storage.base`` for the seam."""

from __future__ import annotations

import logging
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

log = logging.getLogger("dataport.storage")

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
    """The backend ``settings.storage`` names, wrapped in ``EncryptedStorage`` when files are
    encrypted (``settings.resolved_encryption``), or when they are not but keys are configured, so
    that files encrypted before stay readable. With ``s3_create_bucket`` the S3 bucket is created
    here if missing (a blocking call, meant for start-up)."""
    backend: Storage
    if settings.storage == "s3":
        from storage.s3 import S3Storage  # boto3 is imported only when S3 is used

        backend = S3Storage.from_settings(settings)
    elif settings.storage == "local":
        from storage.local import LocalStorage

        backend = LocalStorage.from_settings(settings)
    else:
        raise ValueError(f"unknown storage backend {settings.storage!r} (expected 'local' or 's3')")
    encrypt = settings.resolved_encryption == "aes256-gcm"
    configured = bool(settings.kek.get_secret_value() or settings.kms_key_id)
    if not encrypt and not configured and not (settings.data_dir / "kek").exists():
        return backend
    if encrypt and not configured and not settings.dev_mode:
        log.warning(
            "files are encrypted under a key generated into %s: set DATAPORT_KEK (kept apart from the "
            "files) or DATAPORT_KMS_KEY_ID in production (docs/encryption.md)",
            settings.data_dir / "kek",
        )
    from storage.encrypted import EncryptedStorage
    from storage.keys import Keyring

    return EncryptedStorage(backend, Keyring.from_settings(settings), encrypt=encrypt)
