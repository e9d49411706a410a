"""The GraphQL schema on its own: what an unexpected failure looks like to a client."""

from __future__ import annotations

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

