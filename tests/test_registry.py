"""The datasets file: every mistake stops start-up with a message naming the dataset and the key."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from dataport.settings import Settings
from sources.registry import DatasetConfigError, load_registry


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "d.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL, seen DATETIME)")
    return path


def _load(tmp_path, text: str):
    path = tmp_path / "datasets.toml"
    path.write_text(text)
    return load_registry(Settings(datasets=path, data_dir=tmp_path))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            'source = "mysql"\nurl = "x"\ntable = "t"',
            "dataset 'd', key 'source': must be one of sqlite, postgres, opensearch",
        ),
        ('source = "sqlite"\ntable = "t"', "dataset 'd', key 'url': is required"),
        (
            'source = "sqlite"\nurl = "env:NOPE_NOT_SET"\ntable = "t"',
            "dataset 'd', key 'url': environment variable NOPE_NOT_SET",
        ),
        ('source = "sqlite"\nurl = "{db}"', "dataset 'd', key 'table': is required"),
        ('source = "opensearch"\nurl = "http://x"\ntable = "t"', "dataset 'd', key 'index': is required"),
        ('source = "sqlite"\nurl = "{db}"\ntable = "t"\nkey = ["nope"]', "dataset 'd', key 'key': must list columns"),
        ('source = "sqlite"\nurl = "{db}"\ntable = "t"\nmax_export_rows = 0', "dataset 'd', key 'max_export_rows'"),
        (
            'source = "sqlite"\nurl = "{db}"\ntable = "t"\nstream_max_rows = "many"',
            "dataset 'd', key 'stream_max_rows'",
        ),
        ('source = "sqlite"\nurl = "{db}"\ntable = "t"\nimportable = "yes"', "dataset 'd', key 'importable'"),
        ('source = "sqlite"\nurl = "{db}"\ntable = "t"\ncolour = "blue"', "dataset 'd', key 'colour': unknown key"),
        ('source = "sqlite"\nurl = "{db}"\ntable = "missing"', "dataset 'd', key 'columns': could not be discovered"),
        (
            'source = "sqlite"\nurl = "{db}"\ntable = "t"\ncolumns = { id = { type = "uuid" } }',
            "dataset 'd', key 'columns.id.type': must be one of",
        ),
        (
            'source = "sqlite"\nurl = "{db}"\ntable = "t"\ncolumns = { id = { type = "integer", colour = 1 } }',
            "dataset 'd', key 'columns.id.colour': unknown key",
        ),
    ],
)
def test_a_mistake_names_the_dataset_and_the_key(tmp_path, db, body, message):
    with pytest.raises(DatasetConfigError) as e:
        _load(tmp_path, "[datasets.d]\n" + body.replace("{db}", str(db)))
    assert message in str(e.value)


def test_a_file_that_is_not_toml_or_empty_is_refused(tmp_path):
    with pytest.raises(DatasetConfigError, match="not valid TOML"):
        _load(tmp_path, "[datasets.d\n")
    with pytest.raises(DatasetConfigError, match=r"no \[datasets.NAME\] tables"):
        _load(tmp_path, "title = 1\n")


def test_discovery_maps_declared_types_and_env_urls(tmp_path, db, monkeypatch):
    monkeypatch.setenv("DATAPORT_TEST_DB_PATH", str(db))
    registry = _load(
        tmp_path,
        '[datasets.d]\nsource = "sqlite"\nurl = "env:DATAPORT_TEST_DB_PATH"\ntable = "t"\n'
        'key = "id"\nimportable = true\n',
    )
    dataset = registry.get("d")
    assert [(c.name, c.type) for c in dataset.columns] == [
        ("id", "integer"),
        ("name", "string"),
        ("score", "float"),
        ("seen", "datetime"),
    ]
    assert dataset.key == ("id",) and dataset.importable and dataset.max_export_rows == 80_000


def test_the_api_refuses_to_start_with_a_clear_message(tmp_path):
    path = tmp_path / "datasets.toml"
    path.write_text(
        '[datasets.rocks]\nsource = "sqlite"\nurl = "x.db"\ntable = "t"\nmax_export_rows = -5\n'
        'columns = { id = { type = "integer" } }\n'
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DATAPORT_")},
        "DATAPORT_DATASETS": str(path),
        "DATAPORT_REDIS_URL": "redis://127.0.0.1:1/0",
        "COLUMNS": "200",
    }
    for command in ("api", "worker"):
        result = subprocess.run(
            [sys.executable, "-m", "dataport.cli", command], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stderr
        assert "dataset 'rocks', key 'max_export_rows'" in result.stderr and "Traceback" not in result.stderr
