"""GraphiQL without internet: Strawberry's GraphiQL page, its CDN files served by Dataport.

Strawberry renders ``strawberry/static/graphiql.html``, which loads React, GraphiQL and its explorer
plugin from unpkg.com; without internet the page stays on "Loading…". The same files, byte for byte,
are vendored under ``web/vendor/PACKAGE@VERSION/PATH`` (``web/vendor/README.md``) and served with the
browser page at ``/web``, so pointing each ``https://unpkg.com/`` address at ``/web/vendor/`` keeps
the template's subresource-integrity hashes valid. Rewriting Strawberry's own template, rather than
keeping a copy, keeps its fixes; should an upgrade name a file that is not vendored, the page is left
as Strawberry wrote it (it works online) and a warning names the missing files.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

from strawberry.http.ides import get_graphql_ide_html

log = logging.getLogger("dataport.api")

# The browser client and the vendored files: a sibling of this package, in a source tree as in an
# installed wheel (pyproject.toml ships ``web`` as package data).
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
VENDOR_DIR = WEB_DIR / "vendor"
CDN = "https://unpkg.com/"
LOCAL = "/web/vendor/"
CDN_FILE = re.compile(r'"https://unpkg\.com/([^"]+)"')


def cdn_files(html: str) -> list[str]:
    """The unpkg paths (``react@18.2.0/umd/react.production.min.js``) a GraphiQL page loads."""
    return sorted(set(CDN_FILE.findall(html)))


def missing_files(html: str, vendor_dir: Path = VENDOR_DIR) -> list[str]:
    """Those of the page's unpkg files that are not vendored."""
    return [path for path in cdn_files(html) if not (vendor_dir / path).is_file()]


@functools.cache
def graphiql_html() -> str:
    """Strawberry's GraphiQL page with its unpkg files served from ``/web/vendor/`` (once a process)."""
    html = get_graphql_ide_html("graphiql")
    missing = missing_files(html)
    if missing:
        log.warning("GraphiQL needs internet: %s not vendored under %s (web/vendor/README.md)", missing, VENDOR_DIR)
        return html
    return html.replace(CDN, LOCAL)
