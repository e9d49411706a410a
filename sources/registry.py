"""The dataset registry: which datasets exist, their columns, and a source to read each.

Without ``DATAPORT_DATASETS`` the demo dataset ``samples`` alone is served. A datasets file is
TOML (DESIGN.md, "Datasets file"); a mistake in it stops start-up with a message that names the
dataset and the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dataport.settings import Settings
from sources.base import COLUMN_TYPES, Column, Dataset, Scope, Source, SourceError
from sources.sqlite import SqliteSource, discover_columns

SOURCE_KINDS = ("sqlite", "postgres", "opensearch")
_KNOWN_KEYS = {
    "title", "source", "url", "table", "index", "key", "importable", "max_export_rows", "stream_max_rows", "columns",
    "notify", "readers", "importers", "scope",
}  # fmt: skip
_COLUMN_KEYS = {"type", "filterable", "sortable", "required", "max_length"}


class DatasetConfigError(Exception):
    """The datasets file is wrong; the message names the dataset and the key."""


class Registry:
    def __init__(self, datasets: Mapping[str, Dataset], settings: Settings):
        self.datasets = dict(datasets)
        self.settings = settings

    def __iter__(self) -> Iterator[Dataset]:
        return iter(self.datasets.values())

    def get(self, name: str) -> Dataset | None:
        return self.datasets.get(name)

    def open(self, dataset: Dataset) -> Source:
        if dataset.source == "sqlite":
            return SqliteSource(dataset, busy_timeout=self.settings.sqlite_busy_timeout_seconds)
        if dataset.source == "postgres":
            from sources.postgres import PostgresSource

            return PostgresSource(dataset, self.settings)
        if dataset.source == "opensearch":
            from sources.opensearch import OpenSearchSource

            return OpenSearchSource(dataset, self.settings)
        raise SourceError(f"dataset '{dataset.name}': unknown source '{dataset.source}'")


def load_registry(settings: Settings) -> Registry:
    if settings.datasets is None:
        from sources.demo import demo_dataset, ensure_demo_database

        path = ensure_demo_database(settings.data_dir, settings.demo_rows)
        demo = demo_dataset(path, settings.max_export_rows, settings.stream_max_rows)
        return Registry({"samples": demo}, settings)
    return Registry(load_datasets_file(settings.datasets, settings), settings)


def load_datasets_file(path: Path, settings: Settings) -> dict[str, Dataset]:
    try:
        document = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetConfigError(f"datasets file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise DatasetConfigError(f"datasets file {path} is not valid TOML: {e}") from None
    entries = document.get("datasets")
    if not isinstance(entries, dict) or not entries:
        raise DatasetConfigError(f"datasets file {path} has no [datasets.NAME] tables")
    return {name: _dataset(name, entry, Path(path).parent, settings) for name, entry in entries.items()}


def _dataset(name: str, entry: Any, base: Path, settings: Settings) -> Dataset:
    def fail(key: str, problem: str) -> DatasetConfigError:
        return DatasetConfigError(f"dataset '{name}', key '{key}': {problem}")

    if not isinstance(entry, dict):
        raise fail("datasets", "must be a table")
    unknown = set(entry) - _KNOWN_KEYS
    if unknown:
        raise fail(sorted(unknown)[0], f"unknown key (known: {', '.join(sorted(_KNOWN_KEYS))})")
    source = entry.get("source")
    if source not in SOURCE_KINDS:
        raise fail("source", f"must be one of {', '.join(SOURCE_KINDS)}, not {source!r}")
    url = _resolve_url(entry.get("url"), fail)
    if source == "sqlite" and not Path(url).is_absolute():
        url = str((base / url).resolve())
    table = entry.get("index" if source == "opensearch" else "table")
    if not isinstance(table, str) or not table:
        raise fail("index" if source == "opensearch" else "table", "is required")

    columns_spec = entry.get("columns", "discover")
    if columns_spec == "discover":
        try:
            columns = _discover(source, url, table)
        except SourceError as e:
            raise fail("columns", f"could not be discovered: {e}") from None
    elif isinstance(columns_spec, dict) and columns_spec:
        columns = tuple(_column(col, spec, fail) for col, spec in columns_spec.items())
    else:
        raise fail("columns", 'must be "discover" or a table of column definitions')

    names = {c.name for c in columns}
    key = entry.get("key", [])
    key = [key] if isinstance(key, str) else key
    if not isinstance(key, list) or any(k not in names for k in key):
        raise fail("key", f"must list columns of the dataset, got {key!r}")
    limits = {}
    for limit_key, default in (
        ("max_export_rows", settings.max_export_rows),
        ("stream_max_rows", settings.stream_max_rows),
    ):
        value = entry.get(limit_key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(limit_key, f"must be a positive integer, not {value!r}")
        limits[limit_key] = value
    importable = entry.get("importable", False)
    if not isinstance(importable, bool):
        raise fail("importable", "must be true or false")
    notify = entry.get("notify", False)
    if not isinstance(notify, bool):
        raise fail("notify", "must be true or false")
    title = entry.get("title")
    if title is not None and not isinstance(title, str):
        raise fail("title", "must be text")
    readers = _grantees(entry.get("readers", ["*"]), lambda problem: fail("readers", problem))
    importers = entry.get("importers")
    if importers is not None:
        importers = _grantees(importers, lambda problem: fail("importers", problem))
    scope = _scope(entry.get("scope"), names, fail)
    return Dataset(
        name=name,
        source=source,
        url=url,
        table=table,
        columns=columns,
        title=title,
        key=tuple(key),
        importable=importable,
        notify=notify,
        readers=readers,
        importers=importers,
        scope=scope,
        **limits,
    )


def _grantees(value: Any, fail: Callable[[str], DatasetConfigError]) -> tuple[str, ...]:
    """``readers`` / ``importers``: a list of "*", "role:NAME" and "user:ID"."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail('must be a list such as ["*"], ["role:analyst", "user:ada"]')
    for grantee in value:
        kind, _, name = grantee.partition(":")
        if grantee != "*" and (kind not in ("role", "user") or not name):
            raise fail(f'{grantee!r} must be "*", "role:NAME" or "user:ID"')
    return tuple(value)


def _scope(value: Any, columns: set[str], fail: Callable[[str, str], DatasetConfigError]) -> Scope | None:
    """``scope = { column = "org_id", claim = "org" }``: rows limited to the token's claim."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"column", "claim"}:
        raise fail("scope", 'must be a table { column = "...", claim = "..." }')
    column, claim = value["column"], value["claim"]
    if not isinstance(column, str) or column not in columns:
        raise fail("scope.column", f"must name a column of the dataset, not {column!r}")
    if not isinstance(claim, str) or not claim or any(not part for part in claim.split(".")):
        raise fail("scope.claim", f"must be a claim name or a dotted path such as org.id, not {claim!r}")
    return Scope(column=column, claim=claim)


def _resolve_url(url: Any, fail: Callable[[str, str], DatasetConfigError]) -> str:
    if not isinstance(url, str) or not url:
        raise fail("url", "is required")
    if url.startswith("env:"):
        variable = url[4:]
        if variable not in os.environ:
            raise fail("url", f"environment variable {variable} is not set")
        return os.environ[variable]
    return url


def _column(name: str, spec: Any, fail: Callable[[str, str], DatasetConfigError]) -> Column:
    if not isinstance(spec, dict):
        raise fail(f"columns.{name}", 'must be a table such as { type = "float" }')
    unknown = set(spec) - _COLUMN_KEYS
    if unknown:
        raise fail(f"columns.{name}.{sorted(unknown)[0]}", "unknown key")
    kind = spec.get("type", "string")
    if kind not in COLUMN_TYPES:
        raise fail(f"columns.{name}.type", f"must be one of {', '.join(COLUMN_TYPES)}, not {kind!r}")
    return Column(
        name=name,
        type=kind,
        filterable=bool(spec.get("filterable", True)),
        sortable=bool(spec.get("sortable", True)),
        required=bool(spec.get("required", False)),
        max_length=spec.get("max_length"),
    )


def _discover(source: str, url: str, table: str) -> tuple[Column, ...]:
    """Columns read from the store at start-up (blocking, once)."""
    if source == "sqlite":
        return discover_columns(url, table)
    if source == "postgres":
        from sources import postgres

        return postgres.discover_columns(url, table)
    from sources import opensearch

    return opensearch.discover_columns(url, table)
