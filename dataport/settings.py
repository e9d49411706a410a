"""All of Dataport's settings, read from ``DATAPORT_*`` environment variables.

One class, so that the api, the workers and the CLI agree on every value. Paths that are not set
explicitly live under ``data_dir``, which is what makes ``dataport token`` and ``dataport dev``
started with the same data dir agree on the signing secret.
"""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected value may be a secret (a KEK one character short).
    model_config = SettingsConfigDict(env_prefix="DATAPORT_", extra="ignore", hide_input_in_errors=True)

    # Where the embedded defaults keep everything: demo database, local files, Redis data, secret.
    data_dir: Path = Path(".dataport")

    # Queue and task store. Empty means "start the embedded Redis-compatible server" (dev only).
    redis_url: str = ""
    queue_name: str = "dataport:queue"
    # Connections to it of one process's shared pool (the api's subscriptions add one of their own).
    redis_max_connections: int = Field(default=8, ge=2)

    # Auth: HS256 JWT. Empty secret means "generate one and keep it in the data dir".
    jwt_secret: str = ""
    jwt_issuer: str = "dataport"
    token_ttl_seconds: int = 12 * 3600
    dev_mode: bool = False
    # Holders of this role (from the token's roles claim) see every dataset and every user's tasks.
    admin_role: str = "admin"
    # HS256 tokens signed with the secret above (`dataport token`, `dataport dev`); a deployment
    # whose users all come from an identity provider may turn them off.
    local_tokens: bool = True

    # Tokens from an OpenID Connect identity provider (api/oidc.py, docs/access.md "Tokens"): RS256
    # or ES256, keys from the issuer's discovery document and JWKS. Empty issuer: none accepted.
    oidc_issuer: str = ""
    # Required with an issuer: a token for another application of the same provider is refused.
    oidc_audience: str = ""
    # Where the audience is: `aud`, or e.g. `client_id` for Cognito access tokens (which have no aud).
    oidc_audience_claim: str = "aud"
    # Clock skew allowed on exp, nbf and iat.
    oidc_leeway_seconds: float = Field(default=30.0, ge=0)
    # The JWKS is fetched again after this long, and at most this often for a token of unknown kid.
    oidc_jwks_max_age_seconds: float = Field(default=3600.0, gt=0)
    oidc_jwks_min_refresh_seconds: float = Field(default=30.0, ge=0)
    oidc_timeout_seconds: float = Field(default=5.0, gt=0)
    # For the browser page's sign-in (authorization code + PKCE; a public client, no secret).
    oidc_client_id: str = ""
    oidc_scopes: str = "openid profile email"
    # Claims, as dotted paths into the verified token (a key that itself contains dots wins).
    user_id_claim: str = "sub"
    email_claim: str = "email"
    # A list of strings or one string of names separated by spaces or commas, e.g.
    # `realm_access.roles` (Keycloak), `cognito:groups` (Cognito), `https://example.com/roles` (Auth0).
    roles_claim: str = "roles"

    # Public address of the api, used to build signed URLs for the local storage backend.
    public_url: str = "http://127.0.0.1:8000"

    # Datasets. Empty means the SQLite demo dataset alone.
    datasets: Path | None = None
    demo_rows: int = 100_000

    # Storage.
    storage: Literal["local", "s3"] = "local"
    files_dir: Path | None = None
    s3_bucket: str = "dataport"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_sse: str = "AES256"  # "AES256", "aws:kms" or "" for none
    s3_sse_kms_key_id: str | None = None
    s3_part_size: int = 8 * 1024 * 1024
    s3_create_bucket: bool = False

    # Encryption before storage (docs/encryption.md): "aes256-gcm" or "none". Unset: on for the
    # local backend, off for S3 (which keeps its server-side encryption, s3_sse).
    encryption: Literal["aes256-gcm", "none"] | None = None
    # Key-encryption keys: 64 hex characters each, comma-separated, newest first (rotation). Empty
    # (and no KMS key): one is generated into <data dir>/kek, as the signing secret is.
    kek: SecretStr = SecretStr("")
    # An AWS KMS key (id, ARN or alias) that makes and unwraps the data keys instead of a KEK.
    kms_key_id: str = ""
    kms_endpoint_url: str | None = None

    # Limits.
    max_export_rows: int = 80_000
    stream_max_rows: int = 10_000
    max_upload_bytes: int = 1024**3
    download_url_ttl_seconds: int = 15 * 60
    retention_seconds: int = 7 * 24 * 3600
    export_reuse_seconds: int = 600

    # Worker.
    worker_concurrency: int = 3
    max_tries: int = 3
    # Transient failures (a store or storage restarting, a lock) are tried again after
    # retry_delay_seconds, doubling up to retry_max_delay_seconds, with jitter; a run gives up
    # only after max_tries tries AND retry_window_seconds since its first failure, so a restart of
    # a minute or so is ridden out. 0 turns the window off (max_tries alone).
    retry_delay_seconds: float = 1.0
    retry_max_delay_seconds: float = 20.0
    retry_window_seconds: float = 90.0
    job_timeout_seconds: int = 6 * 3600
    # A running job renews its claim this often; a dead worker's job is picked up again once the
    # claim lapses (lease), by whichever worker polls next.
    worker_lease_seconds: float = 10.0
    # On SIGTERM (or Ctrl-C) a worker takes no new job and lets running ones finish for this long;
    # what is still running then is handed back to the queue at once and does not count as a try.
    # Keep it below the orchestrator's grace period (compose: stop_grace_period 30s).
    worker_shutdown_grace_seconds: float = 25.0
    batch_rows: int = 2_000
    sqlite_busy_timeout_seconds: float = 2.0
    opensearch_timeout_seconds: float = 30.0

    # Progress and polling.
    progress_interval_seconds: float = Field(default=0.25, ge=0.25)
    poll_base_seconds: float = 5.0

    # The streaming route: requests per minute, per user and per client address.
    stream_rate_per_user: int = 30
    stream_rate_per_ip: int = 120

    # Files.
    csv_formula_guard: bool = True

    # Imports. Browsers upload straight to storage: on S3 through a presigned POST (its policy caps
    # the size) or a presigned PUT (content type fixed); on the local backend through a signed PUT.
    s3_upload_method: Literal["POST", "PUT"] = "POST"
    upload_url_ttl_seconds: int = 60 * 60
    # S3 bucket notifications (POST /storage-events) must carry this secret; empty turns the route off.
    storage_events_secret: str = ""
    # A cell larger than this fails its row (a 10 MB cell is a mistake, not data).
    import_max_cell_bytes: int = 1024 * 1024
    import_batch_rows: int = 5_000
    # An import stops as FAILED once this many rows have failed, unless the request sets maxErrors.
    import_max_errors: int = 1_000

    # Notifications (README, "Notifications"). Email goes to the owner's address from the token when
    # the request says notify: true or the dataset has notify = true. An empty host means dev mode:
    # the mail is logged, not sent. smtp_tls: "none" (plain SMTP, no STARTTLS even if offered),
    # "starttls" (upgrade after connecting; fails if the server cannot) or "tls" (implicit TLS,
    # usually port 465).
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_username: str | None = None
    smtp_password: str | None = None
    mail_from: str = "dataport@localhost"
    # Every finished task is POSTed here as JSON, signed with the secret (HMAC-SHA256); empty turns
    # webhooks off. Connection errors, 5xx and 429 are tried again after webhook_backoff_seconds,
    # doubling each time, up to webhook_max_tries tries in all.
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_max_tries: int = Field(default=5, ge=1)
    webhook_backoff_seconds: float = Field(default=10.0, gt=0)

    # ---- Limits on what clients can send (docs/limits.md) ----
    # Parsers of import files (formats/, workers/imports.py).
    # maxErrors may not be set above this; the error report stops there in rows and bytes.
    import_max_errors_limit: int = 100_000
    # The error report stops growing past this many bytes (a last line says how many were left out).
    import_max_report_bytes: int = 32 * 1024 * 1024
    # JSON/NDJSON: a row nested deeper than this (the row's object is level 1) is refused.
    import_max_nesting: int = 8
    # XLSX: the archive's members are measured before anything is inflated. The sheets' inflated
    # total, the shared strings (held whole while the sheet is read) and the inflated/compressed ratio.
    import_xlsx_max_inflated_bytes: int = 2 * 1024**3
    import_xlsx_max_shared_strings_bytes: int = 48 * 1024 * 1024
    import_xlsx_max_shared_strings: int = 1_000_000
    import_xlsx_max_ratio: int = 200
    # A worker whose memory (RSS) is above this after an import stops taking jobs, finishes the ones
    # it runs and starts afresh in the same process (exec): freed memory is not given back otherwise.
    worker_restart_rss_bytes: int = 1024 * 1024 * 1024
    # GraphQL limits (schema/, api/): refused as top-level QUERY_TOO_COMPLEX / PAYLOAD_TOO_LARGE.
    graphql_max_depth: int = 12
    graphql_max_aliases: int = 20
    graphql_max_tokens: int = 5_000
    max_request_bytes: int = 1024 * 1024
    # Operations (query/mutation/subscription definitions) in one document; fields in one document,
    # fragments counted as often as they are spread (bounds the overlapping-fields check; the
    # standard introspection query selects 229).
    graphql_max_operations: int = 5
    graphql_max_fields: int = 300
    # Requests without a valid token can only introspect: they get a smaller body and token budget.
    graphql_anonymous_max_tokens: int = 1_000
    max_anonymous_request_bytes: int = 16 * 1024
    # `dataport api`'s processes on its one port (api/serve.py); `--workers` overrides it.
    api_workers: int = Field(default=1, ge=1)
    # Admission control (api/admission.py), per api process: HTTP requests being worked on at once;
    # past it a request waits up to the queue budget for a slot, then gets 503 SERVICE_UNAVAILABLE.
    api_max_in_flight: int = Field(default=64, ge=1)
    api_queue_seconds: float = Field(default=0.5, ge=0)
    # Mutations: per-minute limits (RATE_LIMITED) and active tasks (QUOTA_EXCEEDED), per user.
    mutation_rate_per_user: int = 60
    mutation_rate_per_ip: int = 300
    # The window those two counts are taken over (a minute; tests shorten it).
    mutation_rate_window_seconds: float = Field(default=60.0, gt=0)
    max_active_tasks_per_user: int = 10
    # WebSockets: open subscriptions per user.
    max_subscriptions_per_user: int = 50
    # A subscription's slot is a lease in Redis, renewed while it runs: a killed api's slots lapse.
    subscription_lease_seconds: float = 30.0
    # The streaming route: concurrent streams, per user and in all.
    stream_concurrency_per_user: int = 3
    stream_concurrency: int = 50
    # A stream whose client reads nothing for this long is dropped, and its source read and slot freed.
    stream_idle_timeout_seconds: float = Field(default=30.0, gt=0)
    # ---- end of the limits ----

    # The audit log (docs/audit.md): where records are kept ("none" records nothing: benchmarks),
    # the database URL (sqlite: a file, default data_dir/audit.sqlite3; postgres: a URL; dynamodb:
    # an endpoint URL, empty for AWS), the table, and how long records are kept.
    audit_store: Literal["sqlite", "postgres", "dynamodb", "none"] = "sqlite"
    audit_url: str = ""
    audit_table: str = "dataport_audit"
    audit_region: str = "us-east-1"
    audit_create_table: bool = True
    audit_retention_days: float = Field(default=400, gt=0)
    # The drain moves the outbox into the store every this many seconds (1-60; 0: this worker
    # does not drain, another one does), this many records a batch.
    audit_drain_seconds: int = Field(default=5, ge=0, le=60)
    audit_drain_batch: int = Field(default=500, ge=1)

    # Logs of `dataport api` and `dataport worker`: one JSON object a line, or text for people
    # (`dataport dev` starts its api and worker with text unless this is set).
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _audience_with_issuer(self) -> Settings:
        if self.oidc_issuer and not self.oidc_audience:
            raise ValueError(
                "DATAPORT_OIDC_AUDIENCE must be set with DATAPORT_OIDC_ISSUER (the API's identifier at the"
                " provider), or tokens the provider issued for other applications would be accepted"
            )
        return self

    @field_validator("kek")
    @classmethod
    def _kek_is_hex(cls, value: SecretStr) -> SecretStr:
        parse_keks(value.get_secret_value())  # a ValueError names DATAPORT_KEK, never the key
        return value

    @property
    def resolved_encryption(self) -> str:
        """``encryption``, or its default for the backend: encrypted on local, off on S3."""
        return self.encryption or ("none" if self.storage == "s3" else "aes256-gcm")

    @cached_property
    def key_encryption_keys(self) -> list[bytes]:
        """The KEKs, newest first: the setting, else one kept in ``<data dir>/kek`` (generated once,
        written whole before it appears, so processes starting together read the same key)."""
        if keys := parse_keks(self.kek.get_secret_value()):
            return keys
        path = self.data_dir / "kek"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"kek.partial-{secrets.token_hex(8)}")
            partial.write_text(secrets.token_hex(32))
            partial.chmod(0o600)
            try:
                os.link(partial, path)  # first writer wins, with the whole key in place
            except FileExistsError:
                pass
            finally:
                partial.unlink()
        return parse_keks(path.read_text().strip())

    @cached_property
    def resolved_files_dir(self) -> Path:
        return self.files_dir or self.data_dir / "files"

    @cached_property
    def signing_secret(self) -> str:
        """The HMAC secret for tokens and signed URLs: the setting, else one kept in the data dir."""
        if self.jwt_secret:
            return self.jwt_secret
        path = self.data_dir / "secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            candidate = secrets.token_urlsafe(48)
            try:
                with path.open("x") as f:  # first writer wins; a racing process reads its secret
                    f.write(candidate)
                path.chmod(0o600)
            except FileExistsError:
                pass
        return path.read_text().strip()


def get_settings() -> Settings:
    return Settings()


# A KEK is a 256-bit AES key (storage.encryption.KEY_BYTES, which the key wrapper checks again).
KEK_BYTES = 32


def parse_keks(value: str) -> list[bytes]:
    """``DATAPORT_KEK``'s comma-separated hex keys, newest first. A ValueError names the setting
    and the position of a bad key, never the key."""
    keys: list[bytes] = []
    for position, part in enumerate((p.strip() for p in value.split(",")), start=1):
        if not part:
            continue
        if len(part) != 2 * KEK_BYTES or any(c not in "0123456789abcdefABCDEF" for c in part):
            raise ValueError(
                f"DATAPORT_KEK: key {position} must be 64 hex characters (a 256-bit key), got {len(part)} "
                "characters; make one with: python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        keys.append(bytes.fromhex(part))
    return keys
