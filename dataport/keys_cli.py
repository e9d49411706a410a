"""``dataport keys rotate``: re-wrap every stored file's data key under the current key.

The current key is the first of ``DATAPORT_KEK`` (or KMS, with ``DATAPORT_KMS_KEY_ID``). Only the
small key files (``keys/<file key>``) are rewritten, never a file's body (docs/encryption.md).
The exit status is 1 while any file could not be re-wrapped: the old key must stay until then.
"""

from __future__ import annotations

import asyncio

import typer

from dataport.logs import message_console

keys_app = typer.Typer(help="Encryption keys of the stored files (docs/encryption.md).", no_args_is_help=True)
console = message_console()


@keys_app.command("rotate")
def rotate() -> None:
    """Re-wrap every stored file's data key under the newest DATAPORT_KEK (or KMS); bodies stay as they are."""
    from dataport.settings import get_settings
    from storage import storage_from_settings
    from storage.encrypted import EncryptedStorage

    storage = storage_from_settings(get_settings())
    if not isinstance(storage, EncryptedStorage):
        console.print("Encryption is off and no key is configured: there is nothing to re-wrap.")
        return
    report = asyncio.run(storage.rotate())
    console.print(
        f"{report.rewrapped} data keys re-wrapped under {storage.keyring.current}, "
        f"{report.current} already were, {len(report.failed)} failed."
    )
    for failure in report.failed:
        console.print(f"[red]not re-wrapped:[/red] {failure}")
    if report.failed:
        console.print("Keep the old key in DATAPORT_KEK until every file is re-wrapped (or has expired).")
        raise typer.Exit(1)
