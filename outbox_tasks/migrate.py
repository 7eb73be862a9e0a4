"""Schema migrations: the Alembic configuration of the source tree, and the upgrade.

Alembic owns the schema (DESIGN 3); runtime code never runs DDL. Used by ``outbox-tasks
migrate`` and by the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from outbox_tasks.errors import ConfigurationError
from outbox_tasks.settings import Settings

if TYPE_CHECKING:
    from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent
"""The source tree: ``alembic.ini`` and ``migrations/`` live here, next to the package."""


def alembic_config(settings: Settings) -> Config:
    """The Alembic config of ``migrations/``, pointed at ``settings.database_url``.

    Raises ConfigurationError when the package was not installed from its source tree (the
    migrations are not part of a wheel).
    """
    from alembic.config import Config

    ini = ROOT / "alembic.ini"
    if not ini.exists() or not (ROOT / "migrations").is_dir():
        raise ConfigurationError(
            f"migrations not found next to the package ({ROOT}/migrations); install outbox_tasks "
            "from its source tree (pip install -e .) to run migrations"
        )
    config = Config(str(ini))
    config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url)
    return config


def upgrade(settings: Settings, revision: str = "head", *, sql: bool = False) -> None:
    """Upgrade the database to ``revision``; with ``sql``, print the SQL instead (offline mode,
    for a DBA) and touch no database. Database errors propagate as SQLAlchemy raises them."""
    from alembic import command

    command.upgrade(alembic_config(settings), revision, sql=sql)
