"""Who may see what: the caller's identity, dataset permissions and tenant scope.

A verified token becomes an ``Identity`` (api/auth.py makes it; the domain never sees a token).
Datasets name their ``readers`` and ``importers`` ("*", "role:NAME", "user:ID") and may carry a
``Scope``: a column whose value must equal one of the caller's claims. These functions are the one
place those rules are decided; the task functions and the streaming route ask them and nothing else.

A dataset a caller may not read is reported exactly as a missing one, so its name leaks nothing.
Admins (``Settings.admin_role``) read every dataset and see every user's tasks, but a scope binds
them like everyone else: tenant isolation does not depend on who holds which role.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sources.base import Dataset
from sources.query import NO_ROWS as NO_ROWS  # what a caller without the claim reads: no rows (re-exported)


@dataclass(frozen=True)
class Owner:
    """The user a task belongs to: its id and where to email it."""

    id: str
    email: str | None = None


@dataclass(frozen=True)
class Identity:
    """The caller, as a verified token describes them."""

    owner: Owner
    roles: frozenset[str] = frozenset()
    # The token's verified claims, for the claims a dataset scopes by.
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    admin: bool = False

    def claim(self, path: str) -> Any:
        """The claim at a dotted ``path`` (``org``, ``org.id``), or None when any step is missing."""
        return claim_at(self.claims, path)


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """A dotted path into nested claims. A whole key that contains dots (``https://x.io/roles``,
    as Auth0 names custom claims) wins over splitting it."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for step in path.split("."):
        if not isinstance(value, Mapping) or step not in value:
            return None
        value = value[step]
    return value


def _granted(grantees: tuple[str, ...], identity: Identity) -> bool:
    for grantee in grantees:
        kind, _, name = grantee.partition(":")
        if grantee == "*" or (kind == "role" and name in identity.roles):
            return True
        if kind == "user" and name == identity.owner.id:
            return True
    return False


def may_read(identity: Identity, dataset: Dataset) -> bool:
    return identity.admin or _granted(dataset.readers, identity)


def may_import(identity: Identity, dataset: Dataset) -> bool:
    """Reading is needed too: an importer who could not read would learn the dataset exists."""
    if not dataset.importable or not may_read(identity, dataset):
        return False
    importers = dataset.importers if dataset.importers is not None else dataset.readers
    return _granted(importers, identity)


def scope_value(identity: Identity, dataset: Dataset) -> Any:
    """The value the dataset's scope column must equal for this caller: None for an unscoped
    dataset, ``NO_ROWS`` when the token lacks the claim (or holds a list or object, which names no
    one tenant), else the claim's value."""
    if dataset.scope is None:
        return None
    value = identity.claim(dataset.scope.claim)
    if value is None or isinstance(value, list | dict | bool):
        return NO_ROWS
    return value


# A task keeps the scope it was asked under in its request (a worker has no token to read it
# from), and the scope is part of what the task id is made of: a caller whose claim changed never
# finds an export made for the old one.
def scope_for_request(value: Any) -> dict[str, Any] | None:
    """The JSON form of a ``scope_value`` result kept in a task's request: None when unscoped."""
    if value is None:
        return None
    if value is NO_ROWS:
        return {"rows": "none"}
    return {"value": value}


def scope_from_request(request: Mapping[str, Any]) -> Any:
    """Back from a task's request to a ``scope_value`` result (None, ``NO_ROWS`` or the value)."""
    scope = request.get("scope")
    if scope is None:
        return None
    if not isinstance(scope, Mapping) or "value" not in scope:
        return NO_ROWS
    return scope["value"]


def readable(dataset: Dataset | None, identity: Identity) -> Dataset | None:
    """The dataset when the caller may read it; None for a missing one and for one they may not
    read alike, so that every entry point answers both the same way."""
    return dataset if dataset is not None and may_read(identity, dataset) else None


def sees_task(identity: Identity, owner: str) -> bool:
    """A task is its owner's; an admin sees everyone's."""
    return identity.admin or owner == identity.owner.id


def may_read_rows_of(identity: Identity, dataset: Dataset | None, request: Mapping[str, Any]) -> bool:
    """Whether the rows a task read or wrote may reach this caller: they may read its dataset now,
    under the same scope the task ran with. A file made for another tenant (an admin looking at a
    user's task, or a user whose claim changed since) stays out of reach."""
    if dataset is None or not may_read(identity, dataset):
        return False
    return request.get("scope") == scope_for_request(scope_value(identity, dataset))
