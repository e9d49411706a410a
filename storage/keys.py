"""Key-encryption keys: how each file's data key is wrapped, unwrapped and re-wrapped.

Two wrappers, chosen by settings:

- ``DATAPORT_KEK``: one or more 256-bit keys (64 hex characters each, comma-separated, newest
  first). New data keys are wrapped under the newest with AES-256-GCM (a random 96-bit nonce; the
  file's header is the associated data, so a wrapped key moved to another file does not open);
  every listed key can unwrap, so files written under an older one stay readable until
  ``dataport keys rotate`` has re-wrapped them and the old key can be dropped. A key is named by a
  fingerprint (``kek:`` + 16 hex characters of a labelled SHA-256 of it), never by itself.
- ``DATAPORT_KMS_KEY_ID``: AWS KMS makes each data key (``GenerateDataKey``) and unwraps it
  (``Decrypt``), with the file's nonce prefix as encryption context. The KEKs, if any, still
  unwrap older files.

Both calls may block (KMS is a network call): the storage layer runs them in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.base import StorageError
from storage.encryption import KEY_BYTES, new_data_key

if TYPE_CHECKING:
    from dataport.settings import Settings

_ID_LABEL = b"dataport-kek-id-v1\x00"
_WRAP_LABEL = b"dataport-data-key-v1\x00"
NONCE = 12


class KeyUnavailable(StorageError):
    """A data key cannot be unwrapped: its KEK is no longer configured, or the wrapped key does not
    belong to this file. Not transient (a KMS outage is raised as a transient StorageError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


@dataclass(frozen=True)
class WrappedKey:
    """A data key as stored beside its file: which wrapper, which key of it, the wrapped bytes."""

    scheme: str  # "kek" or "kms"
    key_id: str
    blob: bytes

    def to_json(self) -> dict[str, str]:
        return {"scheme": self.scheme, "key_id": self.key_id, "wrapped": base64.b64encode(self.blob).decode()}

    @classmethod
    def from_json(cls, data: Any) -> WrappedKey:
        try:
            return cls(str(data["scheme"]), str(data["key_id"]), base64.b64decode(data["wrapped"], validate=True))
        except (KeyError, TypeError, ValueError) as e:
            raise KeyUnavailable(f"the stored data key is malformed ({type(e).__name__})") from None


def kek_id(kek: bytes) -> str:
    return "kek:" + hashlib.sha256(_ID_LABEL + kek).hexdigest()[:16]


class KmsKeys:
    """Data keys made and unwrapped by AWS KMS (boto3's ``kms`` client, thread-safe)."""

    def __init__(self, key_id: str, *, region: str | None = None, endpoint_url: str | None = None) -> None:
        import boto3

        if key_id.startswith("arn:") and len(parts := key_id.split(":")) > 3 and parts[3]:
            region = parts[3]  # an ARN names its region
        self.key_id = key_id
        self.client: Any = boto3.session.Session(region_name=region or None).client(
            "kms", endpoint_url=endpoint_url or None
        )

    def _call(self, action: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result: dict[str, Any] = getattr(self.client, action)(**kwargs)
            return result
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            transient = status >= 500 or status == 429 or "Throttl" in code or code == "KMSInternalException"
            if not transient:
                raise KeyUnavailable(f"KMS {action}: {code} {e}") from e
            raise StorageError(f"KMS {action}: {code} {e}", transient=True) from e
        except BotoCoreError as e:
            raise StorageError(f"KMS {action}: {e}", transient=True) from e

    def new(self, context: bytes) -> tuple[bytes, WrappedKey]:
        made = self._call(
            "generate_data_key", KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=self._context(context)
        )
        return made["Plaintext"], WrappedKey("kms", str(made["KeyId"]), made["CiphertextBlob"])

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        opened = self._call("decrypt", CiphertextBlob=wrapped.blob, EncryptionContext=self._context(context))
        key: bytes = opened["Plaintext"]
        return key

    @staticmethod
    def _context(context: bytes) -> dict[str, str]:
        return {"dataport:file": context.hex()}


class Keyring:
    """Wraps new data keys under the current key (KMS when configured, else the newest KEK) and
    unwraps with whichever key wrapped them. ``context`` is the file's header: a wrapped key opens
    only for the file it was made for."""

    def __init__(self, keks: Sequence[bytes], kms: KmsKeys | None = None) -> None:
        if not keks and kms is None:
            raise ValueError("encryption needs DATAPORT_KEK or DATAPORT_KMS_KEY_ID")
        self._keks = {kek_id(k): AESGCM(k) for k in keks}
        self._newest = kek_id(keks[0]) if keks else None
        self.kms = kms

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        kms = None
        if settings.kms_key_id:
            kms = KmsKeys(settings.kms_key_id, region=settings.s3_region, endpoint_url=settings.kms_endpoint_url)
        # With KMS, configured KEKs only unwrap older files; none is generated.
        keks = settings.key_encryption_keys if kms is None or settings.kek.get_secret_value() else []
        return cls(keks, kms)

    @property
    def current(self) -> str:
        """What new data keys are wrapped under: ``kms`` or a KEK's id."""
        return "kms" if self.kms is not None else str(self._newest)

    def is_current(self, wrapped: WrappedKey) -> bool:
        if self.kms is not None:
            return wrapped.scheme == "kms"
        return wrapped.scheme == "kek" and wrapped.key_id == self._newest

    def new(self, context: bytes) -> tuple[bytes, WrappedKey]:
        """A fresh data key and its wrapped form."""
        if self.kms is not None:
            return self.kms.new(context)
        key = new_data_key()
        return key, self._wrap_kek(key, context)

    def _wrap_kek(self, key: bytes, context: bytes) -> WrappedKey:
        assert self._newest is not None
        nonce = os.urandom(NONCE)
        blob = nonce + self._keks[self._newest].encrypt(nonce, key, _WRAP_LABEL + context)
        return WrappedKey("kek", self._newest, blob)

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        if wrapped.scheme == "kms":
            if self.kms is None:
                raise KeyUnavailable("this file's data key is wrapped by KMS, and DATAPORT_KMS_KEY_ID is not set")
            key = self.kms.unwrap(wrapped, context)
        elif wrapped.scheme == "kek":
            aead = self._keks.get(wrapped.key_id)
            if aead is None:
                raise KeyUnavailable(
                    f"this file's data key is wrapped by {wrapped.key_id}, which DATAPORT_KEK no longer lists"
                )
            try:
                key = aead.decrypt(wrapped.blob[:NONCE], wrapped.blob[NONCE:], _WRAP_LABEL + context)
            except InvalidTag:
                raise KeyUnavailable("the stored data key does not open for this file (altered or moved)") from None
        else:
            raise KeyUnavailable(f"unknown key wrapping {wrapped.scheme!r}")
        if len(key) != KEY_BYTES:
            raise KeyUnavailable("the unwrapped data key has the wrong length")
        return key

    def rewrap(self, wrapped: WrappedKey, context: bytes) -> WrappedKey | None:
        """The same data key wrapped under the current key; None when it already is."""
        if self.is_current(wrapped):
            return None
        key = self.unwrap(wrapped, context)
        if self.kms is not None:
            blob = self.kms._call(
                "encrypt", KeyId=self.kms.key_id, Plaintext=key, EncryptionContext=self.kms._context(context)
            )
            return WrappedKey("kms", str(blob["KeyId"]), blob["CiphertextBlob"])
        return self._wrap_kek(key, context)
