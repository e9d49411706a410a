"""The GraphQL schema on its own: what an unexpected failure looks like to a client."""

from __future__ import annotations

from pathlib import Path

from schema import schema


class _BrokenContext:
    """A context whose services blow up, as a bug deep inside a resolver would."""

    owner = "someone"

    @property
    def services(self):
        raise RuntimeError("secret detail: postgresql://admin:hunter2@db/prod")


async def test_an_unexpected_error_is_masked_and_names_nothing_internal():
    result = await schema.execute("{ datasets { name } }", context_value=_BrokenContext())
    assert result.data is None
    [error] = result.errors
    assert error.message == "Internal error; it has been logged."
    assert "hunter2" not in str(error.formatted) and "Traceback" not in str(error.formatted)
    assert error.path == ["datasets"]


def test_schema_graphql_is_the_schema_the_code_serves():
    """``schema.graphql`` is the contract clients read: regenerate it when the schema changes with
    ``python -c "from schema import schema; open('schema.graphql', 'w').write(schema.as_str() + '\\n')"``."""
    checked_in = (Path(__file__).resolve().parent.parent / "schema.graphql").read_text()
    assert checked_in == schema.as_str() + "\n", "schema.graphql has drifted from the code; regenerate it"
