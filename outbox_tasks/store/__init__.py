"""All SQL of the package, one module per use case, one named function per statement.

- ``relay``: leases and batches (the hot path), and ``PostgresRelayStore``, the relay's store on
  PostgreSQL (``protocols.RelayStore``; ``testing.InMemoryRelayStore`` is its in-memory twin).
- ``finish``: the one fenced statement that ends a batch (mark or delete, failures, backoff,
  parking, redeliveries).
- ``records``: the relay store's value types (``Lease``, ``Row``, ``Failure``, ``FinishResult``).
- ``deadletter``: recording, reading and resolving dead letters, and their audit trail.
- ``cleanup``: bounded deletes of aged rows, the archive read, the per-database lock.
- ``reports``: read-only queries for status, metrics and counts.
- ``events``: the event catalog (``outbox-tasks events``) and the demo's statements.

Consumer SQL lives in ``consumer/store.py``.
"""
