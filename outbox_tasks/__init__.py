"""outbox_tasks: a transactional outbox publisher for PostgreSQL, driven by Celery.

Application code imports the producer API from here; nothing in this module imports Celery or
kombu, so a web process that only writes events stays light::

    from outbox_tasks import OutboxMessage

    with session.begin():
        session.add(order)
        session.add(OutboxMessage(aggregate_type="Order", aggregate_id=order.id,
                                  event_type="OrderCreated", payload=order.to_event_payload()))

``celery -A outbox_tasks worker|beat|flower`` finds the Celery app in ``outbox_tasks.celery``.
"""

from outbox_tasks.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DatabaseUnavailable,
    InvalidMessage,
    LeaseLost,
    NotFound,
    OutboxError,
    PayloadTooLarge,
)
from outbox_tasks.schema import OutboxMessage
from outbox_tasks.settings import Settings

__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "DatabaseUnavailable",
    "InvalidMessage",
    "LeaseLost",
    "NotFound",
    "OutboxError",
    "OutboxMessage",
    "PayloadTooLarge",
    "Settings",
]
__version__ = "0.1.0"
