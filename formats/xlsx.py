"""XLSX: the sheet's XML rendered by ``formats.xlsx_cells``, deflated as it goes into a zip.

An XLSX file is a zip archive, so no byte of it can go out before the last row is in: each batch
is rendered to ``<row>`` elements and deflated straight into a temporary file (``ZipBuilder``);
``finish()`` yields the archive in 1 MiB chunks: the few fixed parts (content types, workbook,
styles), the sheet read back from the file, the central directory. Memory holds one batch's XML,
never the sheet; the file on disk is the compressed sheet, never the XML itself.

Why not xlsxwriter (used until 2026-12): its per-cell Python calls cost ~0.2 µs × 5 per cell,
80,000 × 67 cells took 18 s to write and 4 s to zip, 11x the CSV of the same rows. Here a column
is one ``orjson`` call or a few ``bytes`` operations (bench/results/2026-12-06-export_formats.md).

Cells: numbers are numbers, booleans booleans, ``None`` and ``""`` an empty cell, everything else
text, dates included (``formats.xlsx_cells`` says exactly how). Text is never read as a formula, a
number or a URL; the formula guard (on by default) still prefixes formula-like text in string
columns with ``'``, as in CSV, because a user may re-save the sheet as CSV and open that.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from dataport.columns import Column, Row
from formats.xlsx_cells import SheetRows
from formats.zip_parts import ZipBuilder

CHUNK_BYTES = 1 << 20
MAX_ROWS = 1_048_576  # the sheet's hard limit, header included
# zlib level 1: about 3x faster than the default 6 on sheet XML, for a file ~15 % larger.
LEVEL = 1

_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_RELS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
PARTS = {
    "[Content_Types].xml": _XML + '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
    '<Override PartName="/xl/styles.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
    "</Types>",
    "_rels/.rels": _XML + f'<Relationships xmlns="{_PKG}">'
    f'<Relationship Id="rId1" Type="{_RELS}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
    "xl/workbook.xml": _XML + f'<workbook xmlns="{_MAIN}" xmlns:r="{_RELS}">'
    '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
    "xl/_rels/workbook.xml.rels": _XML + f'<Relationships xmlns="{_PKG}">'
    f'<Relationship Id="rId1" Type="{_RELS}/worksheet" Target="worksheets/sheet1.xml"/>'
    f'<Relationship Id="rId2" Type="{_RELS}/styles" Target="styles.xml"/></Relationships>',
    "xl/styles.xml": _XML + f'<styleSheet xmlns="{_MAIN}">'
    '<fonts count="1"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill>'
    '<fill><patternFill patternType="gray125"/></fill></fills>'
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles></styleSheet>',
}
_SHEET_START = (_XML + f'<worksheet xmlns="{_MAIN}" xmlns:r="{_RELS}"><sheetData>').encode()
_SHEET_END = b"</sheetData></worksheet>"


def _remove(zipped: ZipBuilder, spool: BinaryIO, path: str) -> None:
    zipped.close()
    spool.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class XlsxWriter:
    extension = "xlsx"
    content_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"

    def __init__(self, columns: Sequence[Column], *, formula_guard: bool = True) -> None:
        self.columns = tuple(columns)
        self.formula_guard = formula_guard
        fd, self.path = tempfile.mkstemp(prefix="dataport-", suffix=".xlsx.part")
        spool = os.fdopen(fd, "w+b")
        self._zip = ZipBuilder(spool, LEVEL)
        # Removes the temp file even if finish() is never run to the end (or never called).
        self._cleanup = weakref.finalize(self, _remove, self._zip, spool, self.path)
        for name, text in PARTS.items():
            self._zip.add(name, text.encode())
        self._zip.stream("xl/worksheets/sheet1.xml")
        self._sheet = SheetRows(self.columns, formula_guard=formula_guard)

    def begin(self) -> bytes:
        self._zip.write(_SHEET_START + self._sheet.header())
        return b""

    def write(self, rows: Sequence[Row]) -> bytes:
        # A sheet has MAX_ROWS rows; a cut-off export must fail rather than lose rows.
        if self._sheet.next_row - 1 + len(rows) > MAX_ROWS:
            raise ValueError(f"XLSX holds at most {MAX_ROWS - 1:,} rows besides the header")
        self._zip.write(self._sheet.render(rows))
        return b""

    def finish(self) -> Iterator[bytes]:
        try:
            self._zip.write(_SHEET_END)
            yield from self._zip.chunks(CHUNK_BYTES)
        finally:  # also when the consumer closes the generator early
            self.close()

    def close(self) -> None:
        """Remove the temp file; safe to call at any time, and more than once."""
        self._cleanup()
