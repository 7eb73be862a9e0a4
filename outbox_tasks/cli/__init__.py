"""``outbox-tasks``: the operator's command line (click). Thin: every command calls the library.

Modules: ``main`` (the group, :func:`main`), ``options`` (the Settings helper, shared options),
``commands`` (migrate, status, events, config, bench), ``dlq``, ``cleanup``, ``consume``
(consume, consumers), ``demo``. ``python -m outbox_tasks.cli`` and
``python -m outbox_tasks.consumer`` run the same :func:`main`.
"""

from outbox_tasks.cli.commands import config_table
from outbox_tasks.cli.main import main, outbox
from outbox_tasks.cli.options import settings_from_options

__all__ = ["config_table", "main", "outbox", "settings_from_options"]
