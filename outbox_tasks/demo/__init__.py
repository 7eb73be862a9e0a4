"""``outbox-tasks demo``: the whole system live on one machine (``run``), with embedded
PostgreSQL and Redis when none are named (``embedded``). Not part of the library: only the
``demo`` command (``cli/demo.py``) imports it.

Modules: ``run`` (the demo), ``environment`` (database, ports, child environment, readiness),
``models`` (the demo's own tables), ``embedded`` (both services; the child processes'
entry), ``embedded_postgres``, ``embedded_redis``, ``guard`` (cleanup if the demo is killed),
``processes`` (what the services share).
"""
