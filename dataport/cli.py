"""The ``dataport`` command: run the service, its halves, and a client of it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import httpx
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from dataport.cli_help import plain_help_types
from dataport.client import Compression, FileFormat, ImportMode
from dataport.logs import message_console
from dataport.settings import Settings, get_settings

if TYPE_CHECKING:
    from dataport.client import DataportClient
    from dataport.dev_record import DevRecord, Signer

plain_help_types()  # `--help` says TEXT, PATH, USER: no `<bool>`, `<str>` or `{user}` (dataport/cli_help.py)
app = typer.Typer(
    help="Dataport: exports and imports as a GraphQL service.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = message_console()

# The options by which export and import reach the api, as _client() reads them.
ApiUrl = Annotated[
    str | None,
    typer.Option(
        envvar="DATAPORT_URL", help="the api; default: the running `dataport dev`'s URL, else http://127.0.0.1:8000"
    ),
]
ApiToken = Annotated[
    str | None,
    typer.Option(
        envvar="DATAPORT_TOKEN", help="default: --token-file, else one for $USER signed like `dataport token`"
    ),
]
ApiTokenFile = Annotated[Path | None, typer.Option(envvar="DATAPORT_TOKEN_FILE", help="a file holding the token")]


def _keys_commands() -> None:
    """``dataport keys rotate`` (dataport/keys_cli.py)."""
    from dataport.keys_cli import keys_app

    app.add_typer(keys_app, name="keys")


_keys_commands()


def _registry(settings: Settings):
    """The datasets, loaded once before serving: a mistake in the datasets file stops start-up
    with a message that names the dataset and the key, not a traceback."""
    from sources.registry import DatasetConfigError, load_registry

    try:
        return load_registry(settings)
    except DatasetConfigError as e:
        console.print(f"[red]Datasets file:[/red] {e}")
        raise typer.Exit(2) from None


def _logging() -> None:
    """One JSON object a line (``DATAPORT_LOG_FORMAT=json``, the default) or text, for every
    logger of the process: Dataport's, arq's and uvicorn's (dataport/logs.py)."""
    from dataport.logs import configure_logging

    configure_logging(get_settings().log_format, os.environ.get("DATAPORT_LOG_LEVEL", "INFO"))


@app.command()
def dev(host: str = "127.0.0.1", port: int = 8000) -> None:
    """The api, one worker and the embedded defaults; Ctrl-C stops all of it."""
    from dataport.dev import run_dev

    # The api and worker started here log text for the person at the console, unless asked otherwise.
    os.environ.setdefault("DATAPORT_LOG_FORMAT", "text")
    settings = get_settings()
    if settings.datasets is not None:
        _registry(settings)  # fail here, once, rather than in each child
    raise typer.Exit(run_dev(settings, host, port))


@app.command()
def api(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[
        int | None, typer.Option(help="api processes on this port (default DATAPORT_API_WORKERS)", min=1)
    ] = None,
) -> None:
    """The GraphQL api (needs DATAPORT_REDIS_URL); --workers N runs N processes on one port."""
    from api.serve import serve

    _logging()
    settings = get_settings()
    serve(settings, _registry(settings), host, port, workers or settings.api_workers)


@app.command()
def worker() -> None:
    """One worker (needs DATAPORT_REDIS_URL); run as many as you like."""
    from workers.worker import run_worker

    _logging()
    settings = get_settings()
    if not settings.redis_url:
        console.print("[red]DATAPORT_REDIS_URL is not set.[/red]")
        raise typer.Exit(2)
    run_worker(settings, _registry(settings))


def _claims(pairs: list[str]) -> dict[str, object]:
    from api.auth import claim_value

    claims: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            console.print(f"[red]--claim:[/red] '{pair}' is not NAME=VALUE")
            raise typer.Exit(2)
        if name in ("sub", "iat", "exp", "iss"):
            console.print(f"[red]--claim:[/red] {name} is set by the command itself")
            raise typer.Exit(2)
        claims[name] = claim_value(value)
    return claims


@app.command()
def token(
    user: str,
    email: Annotated[str | None, typer.Option(help="E-mail for notifications")] = None,
    role: Annotated[list[str] | None, typer.Option("--role", help="a role, repeatable (DATAPORT_ROLES_CLAIM)")] = None,
    claim: Annotated[
        list[str] | None, typer.Option("--claim", help="NAME=VALUE, repeatable; JSON numbers stay numbers")
    ] = None,
    ttl: Annotated[int | None, typer.Option(help="seconds (default DATAPORT_TOKEN_TTL_SECONDS)")] = None,
) -> None:
    """Print one signed (HS256) token for USER, with the same settings the api uses.

    Roles go where the api reads them (DATAPORT_ROLES_CLAIM, nested for a dotted path). The secret:
    DATAPORT_JWT_SECRET or DATAPORT_DATA_DIR's, else the running `dataport dev`'s, else ./.dataport's."""
    from api.auth import issue_token

    claims = _claims(claim or [])
    signing = _signer(get_settings(), quiet=False)
    print(issue_token(signing.settings, user, email, ttl=ttl, roles=role or [], claims=claims))


@app.command("demo-data")
def demo_data(rows: int = typer.Option(None, help="Rows to generate (default DATAPORT_DEMO_ROWS)")) -> None:
    """(Re)generate the SQLite demo dataset."""
    from sources.demo import FILE_NAME, generate

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / FILE_NAME
    count = rows or settings.demo_rows
    with console.status(f"Generating {count:,} rows…"):
        generate(path, rows=count)
    console.print(f"Wrote {count:,} rows to {path}")


@app.command()
def export(
    dataset: str,
    format: Annotated[FileFormat, typer.Option("--format", "-f", case_sensitive=False)] = FileFormat.CSV,
    filter: Annotated[list[str] | None, typer.Option("--filter", help="field:op:value, repeatable")] = None,
    columns: Annotated[str | None, typer.Option(help="comma-separated column names")] = None,
    limit: int | None = None,
    any_of: Annotated[
        list[str] | None, typer.Option("--any-of", help="N:field:op:value, repeatable: filter group N (1-20)")
    ] = None,
    compression: Annotated[Compression, typer.Option(case_sensitive=False)] = Compression.NONE,
    label: Annotated[str | None, typer.Option(help="shown in the history and part of the file name")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o")] = None,
    url: ApiUrl = None,
    token: ApiToken = None,
    token_file: ApiTokenFile = None,
) -> None:
    """Request an export over GraphQL, follow its progress, download the file."""
    from dataport.client import ClientError
    from sources.query import parse_any_of_text, parse_filter_text

    client = _client(url, token, token_file)
    try:
        filters = [parse_filter_text(f) for f in filter or []]
    except ValueError as e:
        console.print(f"[red]--filter:[/red] {e}")
        raise typer.Exit(2) from None
    try:
        groups = parse_any_of_text(any_of or [])
    except ValueError as e:
        console.print(f"[red]--any-of:[/red] {e}")
        raise typer.Exit(2) from None
    try:
        export_input = {
            "dataset": dataset,
            "format": format.value,
            "filters": filters,
            "columns": columns.split(",") if columns else None,
            "limit": limit,
            "compression": compression.value,
            "label": label,
            "anyOf": groups or None,
        }
        task = asyncio.run(_export(client, export_input, out))
    except (ClientError, httpx.TransportError) as e:
        _failed("Export", client, e)
    console.print(f"{task['rowCount']:,} rows, {task['fileSize']:,} bytes, sha256 {task['checksumSha256']}")


def _progress() -> Progress:
    """The bar export and import draw: what is happening, how far, how fast, how long yet."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=console)


async def _export(client, export_input: dict, out: Path | None) -> dict:
    from dataport.client import EXPORT_TASK, ClientError

    task = await client.request_export(export_input)
    with _progress() as bar:
        line = bar.add_task("waiting", total=None, rate="")
        async for snapshot in client.follow(task["id"]):
            task = snapshot
            p = snapshot["progress"]
            bar.update(
                line,
                description=snapshot["status"].lower(),
                completed=p["processedRows"],
                total=p["totalRows"],
                rate=f"{p['rowsPerSecond'] or 0:,.0f} rows/s",
            )
    if task["status"] != "SUCCEEDED":
        reason = (task.get("error") or {}).get("message") or task["status"].lower()
        raise ClientError(reason)
    fresh = (await client.execute(EXPORT_TASK, {"id": task["id"]}))["exportTask"]  # a fresh URL
    target = out or Path(fresh.get("fileName") or f"{task['dataset']}-{task['run']}.{task['format'].lower()}")
    await client.download(fresh["downloadUrl"], target)
    console.print(f"Saved {target}")
    return fresh


IMPORT_FORMATS = {".csv": "CSV", ".json": "JSON", ".ndjson": "NDJSON", ".jsonl": "NDJSON", ".xlsx": "XLSX"}


@app.command("import")
def import_(
    dataset: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    format: Annotated[
        FileFormat | None,
        typer.Option("--format", "-f", case_sensitive=False, help="default: from the file's extension"),
    ] = None,
    mode: Annotated[
        ImportMode,
        typer.Option(
            case_sensitive=False,
            help="UPSERT: insert or update on the key, the file's columns only; UPDATE: existing keys only",
        ),
    ] = ImportMode.INSERT,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check every row, write nothing")] = False,
    max_errors: Annotated[int | None, typer.Option(help="stop after this many failed rows")] = None,
    report: Annotated[Path | None, typer.Option(help="where to save the error report, if there is one")] = None,
    column_map: Annotated[
        list[str] | None, typer.Option("--map", help="HEADER=COLUMN: the file's HEADER is COLUMN; repeatable")
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="ask for a results file (a line per input row) and save it here")
    ] = None,
    allow_row_errors: Annotated[
        bool, typer.Option("--allow-row-errors", help="exit 0 even when some rows were refused")
    ] = False,
    url: ApiUrl = None,
    token: ApiToken = None,
    token_file: ApiTokenFile = None,
) -> None:
    """Upload a file, import it over GraphQL with a progress bar, save the error report if any."""
    from dataport.client import ClientError

    file_format = format.value if format else IMPORT_FORMATS.get(file.suffix.lower(), "")
    if not file_format:
        console.print(f"[red]--format:[/red] cannot tell the format of {file.name}; pass --format CSV|JSON|NDJSON|XLSX")
        raise typer.Exit(2)
    client = _client(url, token, token_file)
    import_input = {
        "dataset": dataset,
        "format": file_format,
        "mode": mode.value,
        "fileName": file.name,
        "fileSize": file.stat().st_size,
        "dryRun": dry_run,
        "maxErrors": max_errors,
        "columnMap": _column_map(column_map or []),
        "results": results is not None,
    }
    try:
        task = asyncio.run(_import(client, import_input, file, report, results))
    except (ClientError, httpx.TransportError) as e:
        _failed("Import", client, e)
    verb = "would be written (dry run)" if task["dryRun"] else "written"
    console.print(f"{task['rowsImported']:,} rows {verb}, {task['rowsFailed']:,} failed")
    if task["rowsFailed"] and not allow_row_errors:
        # Partial failure is not success: scripts must not take a refused row for an imported one.
        console.print("[red]Some rows were refused[/red] (see the error report); --allow-row-errors accepts that")
        raise typer.Exit(3)


def _column_map(pairs: list[str]) -> dict[str, str] | None:
    """``--map HEADER=COLUMN`` options as the request's columnMap."""
    found: dict[str, str] = {}
    for pair in pairs:
        header, sep, column = pair.partition("=")
        if not sep or not header.strip() or not column.strip():
            console.print(f"[red]--map:[/red] {pair!r} is not HEADER=COLUMN")
            raise typer.Exit(2)
        found[header] = column.strip()
    return found or None


# The final read of an import: its fields, a fresh results link and a dry run's preview.
IMPORT_DONE = """query($id: ID!) { importTask(id: $id) {
  id status dryRun rowsImported rowsFailed errorReportUrl resultsUrl outcome error { code message }
  preview { newRows updatedRows unchangedRows failedRows samples }
} }"""


async def _import(client, import_input: dict, file: Path, report: Path | None, results: Path | None = None) -> dict:
    from dataport.client import IMPORT_PROGRESS, ClientError

    task = await client.request_import(import_input)
    with _progress() as bar:
        sending = bar.add_task("uploading", total=import_input["fileSize"], rate="")
        await asyncio.to_thread(client.upload, task["upload"], file, lambda n: bar.advance(sending, n))
        task = await client.start_import(task["id"])
        line = bar.add_task("pending", total=100, rate="")
        async for snapshot in client.follow(task["id"], IMPORT_PROGRESS):
            task = snapshot
            p = snapshot["progress"]
            bar.update(
                line,
                description=snapshot["status"].lower(),
                completed=p["percent"] or 0,
                rate=f"{p['processedRows']:,} rows",
            )
    fresh = (await client.execute(IMPORT_DONE, {"id": task["id"]}))["importTask"]  # fresh links
    if fresh["errorReportUrl"]:
        target = report or file.with_name(f"{file.stem}-errors.csv")
        await client.download(fresh["errorReportUrl"], target)
        console.print(f"{fresh['rowsFailed']:,} rows failed; the error report is in {target}")
    if results is not None and fresh.get("resultsUrl"):
        await client.download(fresh["resultsUrl"], results)
        console.print(f"every row's outcome is in {results}")
    preview = fresh.get("preview")
    if preview:
        console.print(
            f"preview: {preview['newRows']:,} new, {preview['updatedRows']:,} updated, "
            f"{preview['unchangedRows']:,} unchanged, {preview['failedRows']:,} failed"
        )
        for sample in preview["samples"].get("updated", []):
            changes = ", ".join(f"{c} {v['old']!r} → {v['new']!r}" for c, v in sample["changes"].items())
            console.print(f"  row {sample['row']}: {changes}")
    if fresh["status"] != "SUCCEEDED":
        reason = (fresh.get("error") or {}).get("message") or fresh["status"].lower()
        raise ClientError(reason)
    return fresh


def _signer(settings: Settings, quiet: bool = True) -> Signer:
    """Whose secret signs the CLI's tokens (dataport/dev_record.py): DATAPORT_JWT_SECRET or
    DATAPORT_DATA_DIR's, else the running `dataport dev`'s, else ./.dataport's. Unless ``quiet``, a
    secret about to be made, which no running server knows, is said on stderr with where it looked."""
    from dataport.dev_record import record_path, signer

    signing = signer(settings)
    if quiet or signing.settings.jwt_secret:
        return signing
    secret = signing.settings.data_dir.resolve() / "secret"
    if signing.record is not None and signing.record.secret_file is None:
        console.print(
            f"[yellow]The dataport dev at {signing.record.url} signs with DATAPORT_JWT_SECRET; set it here too."
            f"[/yellow] This token is signed with {secret}."
        )
    elif not secret.exists():
        console.print(
            f"[yellow]No running `dataport dev` found ({record_path()}) and no secret at {secret}:[/yellow] "
            "making one there; only a server started with that data dir accepts this token."
        )
    return signing


def _client(url: str | None, token: str | None, token_file: Path | None) -> DataportClient:
    """The GraphQL client of export and import: --url (DATAPORT_URL), else the running `dataport
    dev`'s URL, else http://127.0.0.1:8000; the token as ``_token`` finds it."""
    from dataport.client import DataportClient

    signing = _signer(get_settings())
    record = signing.record
    url = url or (record.url if record else "http://127.0.0.1:8000")
    source = "--token / DATAPORT_TOKEN" if token else str(token_file) if token_file else signing.source
    return DataportClient(url.rstrip("/"), _token(signing.settings, token, token_file, record), source)


def _failed(verb: str, client: DataportClient, error: Exception) -> NoReturn:
    """One line for a failure, never a traceback; a refused token also says where it came from."""
    from dataport.client import unreachable

    if isinstance(error, httpx.TransportError):
        error = unreachable(str(error.request.url) if _has_request(error) else client.url, error)
    console.print(f"[red]{verb} failed:[/red] {error}", highlight=False, soft_wrap=True)
    if getattr(error, "code", None) == "UNAUTHENTICATED":
        console.print(f"The token came from {client.token_source}.", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _has_request(error: httpx.TransportError) -> bool:
    try:
        error.request  # noqa: B018 - httpx raises RuntimeError when the error has no request
    except RuntimeError:
        return False
    return True


def _token(settings: Settings, token: str | None, token_file: Path | None, record: DevRecord | None = None) -> str:
    """--token (DATAPORT_TOKEN), else the file --token-file (DATAPORT_TOKEN_FILE) names, which an
    identity provider's tooling may refresh; else an HS256 token for $USER signed with ``settings``'
    secret (``_signer``); else, when a running `dataport dev` signs with a secret this shell has not
    got (its DATAPORT_JWT_SECRET), the token it recorded. A "Bearer " prefix is dropped."""
    if not token and token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            console.print(f"[red]--token-file:[/red] cannot read {token_file}: {e.strerror}")
            raise typer.Exit(2) from None
        if not token:
            console.print(f"[red]--token-file:[/red] {token_file} is empty")
            raise typer.Exit(2)
    if token:
        return token.removeprefix("Bearer ").strip()
    from api.auth import issue_token

    if record is not None and record.secret_file is None and not settings.jwt_secret:
        return record.token
    return issue_token(settings, os.environ.get("USER") or "dev")


def _audit_commands() -> None:
    """``dataport audit verify|export`` (audit/cli.py)."""
    from audit.cli import audit_app

    app.add_typer(audit_app, name="audit")


_audit_commands()


if __name__ == "__main__":
    app()
