"""All SQL of the package, one module per use case, one named function per statement.

``relay``: leases and batches (the hot path), and ``PostgresRelayStore``, the relay's store on
PostgreSQL. Consumer SQL lives in ``consumer/store.py``.
"""
