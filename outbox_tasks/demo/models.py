"""The demo application's own tables (not the outbox's): its orders and its consumer group's
shipments. Created by the demo with ``DemoBase.metadata.create_all``."""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import BigInteger, Numeric, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class DemoBase(DeclarativeBase):
    pass


class DemoShipment(DemoBase):
    """The demo consumer group's effect: one shipment per event, never two."""

    __tablename__ = "demo_shipment"
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    order_id: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(Text)


class DemoOrder(DemoBase):
    """The demo application's business table."""

    __tablename__ = "demo_order"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))
