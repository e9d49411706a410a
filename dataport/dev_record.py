"""Where ``dataport dev`` runs, for the CLI in any other directory.

``dataport dev`` keeps its data (and so the secret that signs its tokens) under a data dir that is
relative to where it was started, ``./.dataport`` by default. A ``dataport export`` or ``dataport
token`` run from another directory would sign with another secret and be refused. So ``dataport dev``
writes a small record to the user's config dir (``$XDG_CONFIG_HOME/dataport/dev.json``, via
``platformdirs`` where installed): its URL, its pid, where it runs, its data dir and secret file, and
the token it printed. The file is 0600 (it holds a token), written atomically, and removed when
``dataport dev`` stops; a record whose process is gone (a SIGKILL leaves it behind) is stale,
ignored and removed by the next reader.

Who wins, for the CLI: an explicit ``DATAPORT_JWT_SECRET`` or ``DATAPORT_DATA_DIR``, then a live
record, then ``./.dataport``. ``DATAPORT_URL``, ``DATAPORT_TOKEN`` and ``DATAPORT_TOKEN_FILE`` (or
the options) override the record's URL and token.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from dataport.settings import Settings

RECORD_NAME = "dev.json"


def config_dir() -> Path:
    """The user's config dir for Dataport: platformdirs' where installed (which follows
    ``$XDG_CONFIG_HOME`` on Linux), else ``$XDG_CONFIG_HOME/dataport`` or ``~/.config/dataport``."""
    try:
        from platformdirs import user_config_dir
    except ImportError:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "dataport"
    return Path(user_config_dir("dataport", appauthor=False))


def record_path() -> Path:
    """The file ``dataport dev`` writes and the CLI reads."""
    return config_dir() / RECORD_NAME


@dataclass(frozen=True)
class DevRecord:
    """What one running ``dataport dev`` tells the CLI."""

    url: str  # e.g. http://127.0.0.1:8000
    pid: int  # the dataport dev process
    cwd: str  # where it was started
    data_dir: str  # absolute
    secret_file: str | None  # <data dir>/secret, or None when DATAPORT_JWT_SECRET signs its tokens
    token: str  # the dev token it printed
    user: str  # whom that token is for
    started_at: float  # time.time() when it was written

    def alive(self) -> bool:
        """Whether the process that wrote the record still runs (and is not a later one with its pid)."""
        try:
            process = psutil.Process(self.pid)
            return process.is_running() and process.create_time() <= self.started_at + 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False


def write_record(record: DevRecord, path: Path | None = None) -> Path:
    """Write ``record`` atomically with 0600 permissions (the directory 0700); return its path."""
    path = path or record_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f"{path.name}.{secrets.token_hex(6)}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f, indent=2)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return path


def read_record(path: Path | None = None) -> DevRecord | None:
    """The live record, or None: no file, an unreadable one, or a stale one (removed)."""
    path = path or record_path()
    try:
        record = DevRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if record.alive():
        return record
    remove_record(record.pid, path)
    return None


def remove_record(pid: int, path: Path | None = None) -> None:
    """Remove the record if it is the one process ``pid`` wrote (another dev may have replaced it)."""
    path = path or record_path()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def new_record(settings: Settings, url: str, token: str, user: str) -> DevRecord:
    """The record of this process, a ``dataport dev`` serving ``url`` with ``settings``."""
    data_dir = settings.data_dir.resolve()
    return DevRecord(
        url=url,
        pid=os.getpid(),
        cwd=str(Path.cwd()),
        data_dir=str(data_dir),
        secret_file=None if settings.jwt_secret else str(data_dir / "secret"),
        token=token,
        user=user,
        started_at=time.time(),
    )


@dataclass(frozen=True)
class Signer:
    """The settings to sign the CLI's tokens with, and where their secret came from (for messages)."""

    settings: Settings
    source: str
    record: DevRecord | None = None


def signer(settings: Settings) -> Signer:
    """Explicit ``DATAPORT_JWT_SECRET`` / ``DATAPORT_DATA_DIR`` first, then a running ``dataport
    dev``'s secret file, then the secret in ``./.dataport`` (as before: it is made if missing)."""
    if settings.jwt_secret:
        return Signer(settings, "DATAPORT_JWT_SECRET")
    if "data_dir" in settings.model_fields_set:
        return Signer(settings, f"{settings.data_dir.resolve() / 'secret'} (DATAPORT_DATA_DIR)")
    record = read_record()
    if record is not None and record.secret_file and Path(record.secret_file).is_file():
        source = f"{record.secret_file} (the dataport dev at {record.url}, started in {record.cwd})"
        return Signer(Settings(data_dir=Path(record.data_dir)), source, record)
    return Signer(settings, f"{settings.data_dir.resolve() / 'secret'}", record)
