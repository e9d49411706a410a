"""opensearch-py as the source uses it: orjson for the bulk of the bytes (``OrjsonSerializer``,
which the OpenSearch sink uses too), and a successful JSON answer handed over as bytes, unparsed
(``_SourceSerializer`` over ``_Connection``), for ``Requests._call`` to parse and digest a page in
one go.
"""

from __future__ import annotations

from typing import Any

import orjson
from opensearchpy import AIOHttpConnection
from opensearchpy._async.http_aiohttp import OpenSearchClientResponse
from opensearchpy.serializer import JSONSerializer


class OrjsonSerializer(JSONSerializer):
    """orjson for the bulk of the bytes (search answers); the standard one for what it refuses
    (integers beyond 64 bits)."""

    def loads(self, s: str | bytes) -> Any:
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError:
            return super().loads(s)  # type: ignore[arg-type]  # typed str, but it is json.loads: bytes do too

    def dumps(self, data: Any) -> Any:
        if isinstance(data, str | bytes):
            return data
        try:
            return orjson.dumps(data, default=self.default).decode()
        except TypeError:
            return super().dumps(data)


class _SourceSerializer(OrjsonSerializer):
    """Hands a successful JSON answer (bytes, from ``_Connection``) to ``OpenSearchSource._call``
    unparsed: it parses and digests a page in one go (see there)."""

    def loads(self, s: str | bytes) -> Any:
        return s if s.__class__ is bytes else super().loads(s)


class _JsonBytesResponse(OpenSearchClientResponse):
    async def text(self, encoding: Any = None, errors: str = "strict") -> Any:
        """A successful JSON answer as its bytes: orjson parses UTF-8 bytes directly, where text
        would be decoded here and encoded back inside orjson (~25 % of the parse of a page with
        non-ASCII text). Anything else (errors, other types) as text."""
        if self.status < 300 and self.content_type == "application/json":
            return await self.read()
        return await super().text(encoding, errors)


class _Connection(AIOHttpConnection):
    async def _create_aiohttp_session(self) -> Any:
        await super()._create_aiohttp_session()
        # aiohttp takes the response class only when the session is made, and opensearch-py makes
        # it; should the attribute ever be renamed, answers are simply decoded to text as before.
        self.session._response_class = _JsonBytesResponse
