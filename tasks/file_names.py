"""An export's file name: ``{dataset}-{yyyymmddThhmmssZ}[-{label}].{ext}[.gz|.zst]``.

The time is when the run was asked for (the task's ``created_at``, in UTC); the label is the
request's, made safe for every file system and kept short (``label_for_name``); the extension is
the format's, then the compression's. The name is worked out from the task whenever it is wanted
(``ExportTask.fileName``, the stored object's key, the download's ``Content-Disposition``), so it
is the same everywhere without being stored twice.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata

from dataport import errors
from dataport.errors import UserErrors
from formats import WRITERS
from formats.compression import compression_for
from tasks.models import Task

MAX_LABEL = 100  # characters of ExportInput.label
MAX_LABEL_IN_NAME = 40  # characters of it in the file name
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOT_NAME = re.compile(r"[^\w.-]+")  # letters and digits of any script, "_", "." and "-" stay
_RUNS = re.compile(r"([.-])[.-]+")


def checked_label(label: str | None) -> str | None:
    """``ExportInput.label`` as stored: surrounding spaces dropped, None when empty; more than
    ``MAX_LABEL`` characters or a control character is a user error (``INVALID_LABEL``)."""
    if label is None:
        return None
    text = unicodedata.normalize("NFC", label.strip())
    if len(text) > MAX_LABEL:
        raise UserErrors.one(
            f"A label has at most {MAX_LABEL} characters, not {len(text):,}.", errors.INVALID_LABEL, "input", "label"
        )
    if _CONTROL.search(text):
        raise UserErrors.one(
            "A label cannot hold control characters (line breaks, tabs).", errors.INVALID_LABEL, "input", "label"
        )
    return text or None


def label_for_name(label: str | None) -> str:
    """The label as it goes into a file name: compatibility forms folded (NFKC), every run of other
    characters than letters, digits, ``_``, ``.`` and ``-`` a single ``-``, no dots or dashes at
    either end (no hidden files, no ``..``), at most ``MAX_LABEL_IN_NAME`` characters."""
    if not label:
        return ""
    text = _NOT_NAME.sub("-", unicodedata.normalize("NFKC", label))
    text = _RUNS.sub(r"\1", text).strip(".-_")
    return text[:MAX_LABEL_IN_NAME].rstrip(".-_")


def make_file_name(dataset: str, at: dt.datetime, file_format: str, compression: str | None, label: str | None) -> str:
    moment = at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    slug = label_for_name(label)
    extension = WRITERS[file_format.upper()].extension + compression_for(compression).suffix
    return f"{dataset}-{moment}{'-' + slug if slug else ''}.{extension}"


def file_name(task: Task) -> str:
    """The name of ``task``'s file (of its current run)."""
    request = task.request
    return make_file_name(task.dataset, task.created_at, task.format, request.get("compression"), request.get("label"))
