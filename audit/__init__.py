"""The audit log: a hash-chained record of who did what to which task, kept apart from Redis.

Flat modules, one idea each (docs/audit.md): ``records`` (a record), ``chain`` (the hash chain and
its verification), ``outbox`` (appending, in the api and the workers), ``drain`` (outbox → store,
retention), ``base`` (the store interface) and the stores ``sqlite``, ``postgres``, ``dynamodb``;
``cli`` holds ``dataport audit verify|export``.
"""
