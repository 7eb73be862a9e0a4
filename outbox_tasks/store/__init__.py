"""All SQL of the package, one module per use case, one named function per statement.

``relay``: leases and batches (the hot path). Consumer SQL lives in ``consumer/store.py``.
"""
