"""OpenSearch as a source: ``OpenSearchSource`` (``sources.opensearch.source``), whose module
docstring maps the rest of this package, one job per module.

The names other code imports from ``sources.opensearch`` are re-exported here, each imported from
its module when first asked for: a helper process imports ``sources.opensearch.rendering``, and so
this package, and must not pay for opensearch-py and aiohttp (most of a second) to convert pages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sources.opensearch.client import OrjsonSerializer
    from sources.opensearch.dsl import compile_query
    from sources.opensearch.errors import error_reason, explain_error, is_transient, redact
    from sources.opensearch.mapping import Field, discover_columns
    from sources.opensearch.mapping import _source_fields as _source_fields
    from sources.opensearch.retries import REQUEST_TIMEOUT_SECONDS, RETRY_DELAYS
    from sources.opensearch.source import OpenSearchSource

# Each re-exported name, by the module (in this package) that holds it.
_EXPORTS = {
    "OpenSearchSource": "source",
    "compile_query": "dsl",
    "Field": "mapping",
    "discover_columns": "mapping",
    "_source_fields": "mapping",
    "REQUEST_TIMEOUT_SECONDS": "retries",
    "RETRY_DELAYS": "retries",
    "OrjsonSerializer": "client",
    "error_reason": "errors",
    "explain_error": "errors",
    "is_transient": "errors",
    "redact": "errors",
}

__all__ = [
    "REQUEST_TIMEOUT_SECONDS",
    "RETRY_DELAYS",
    "Field",
    "OpenSearchSource",
    "OrjsonSerializer",
    "compile_query",
    "discover_columns",
    "error_reason",
    "explain_error",
    "is_transient",
    "redact",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
