"""The Redis link: kombu's virtual exchange routing, paid once per batch.

One SMEMBERS of the binding table, then every LPUSH of the batch in one pipeline; the wire
format is kombu's, byte for byte, so kombu consumers cannot tell the difference.

kombu's Redis transport emulates direct, topic and fanout exchanges only (no headers exchange,
no ``BCC``): a message is matched against the bindings with its routing key alone. Ordered
consumer groups bind their partition queues to slot ranges with patterns over the slot routing
key (``outbox.envelope.slot_routing_key``), so this link also matches each message's slot key
against those bindings, as RabbitMQ does with the ``BCC`` header: each event reaches one queue
of each ordered group.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from kombu.entity import Exchange
from kombu.utils.json import JSONEncoder, dumps

from outbox_tasks.broker import PERSISTENT
from outbox_tasks.envelope import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    SLOT_ROUTE,
    OutboundMessage,
    parse_slot_binding,
    slot_routing_key,
)
from outbox_tasks.publisher.results import BatchResult, encoding_failure

__all__ = ["RedisLink"]

# kombu is only partly annotated: it is called through ``Any`` rather than through ignores.
_exchange: Any = Exchange
_json_dumps: Any = dumps
_JSONEncoder: Any = JSONEncoder


class RedisLink:
    """kombu's Redis virtual channel, published to in bulk.

    Raises driver errors as they come; :class:`~outbox_tasks.publisher.BrokerPublisher`
    translates them and drops the link.
    """

    def __init__(self, conn: Any, exchange: str, exchange_type: str) -> None:
        # Creating the channel PINGs Redis, so a dead server shows up here.
        self._channel: Any = conn.channel()
        self._exchange = exchange
        self._exchange_type = exchange_type
        # kombu makes a new redis-py client (copying its response callbacks) for every call
        # (``conn_or_acquire``): a quarter of a millisecond each, twice per batch. One client
        # on the channel's connection pool serves every batch.
        self._client: Any = self._channel._create_client()

    def alive(self) -> bool:
        # redis-py's pool already checks a pooled socket before reusing it.
        return True

    def declare(self) -> None:
        # Virtual exchanges live in the connection's memory; kombu needs the declaration to
        # know the exchange type when routing.
        _exchange(self._exchange, type=self._exchange_type, durable=True).declare(
            channel=self._channel
        )

    def publish(self, messages: Sequence[OutboundMessage]) -> BatchResult:
        """Route every message with one read of the binding table, then push them all in one
        pipeline (one LPUSH per destination list, in send order)."""
        channel = self._channel
        exchange = self._exchange
        router = channel.typeof(exchange)
        deadletter = channel.deadletter_queue
        # The one read of the binding table for the whole batch (kombu does it per message),
        # as kombu's ``get_table`` reads it.
        members = self._client.smembers(channel.keyprefix_queue % exchange)
        table = [
            tuple((m.decode() if isinstance(m, bytes) else m).split(channel.sep)) for m in members
        ]
        slot_prefix = f"{SLOT_ROUTE}."
        slotted = [entry for entry in table if entry[0].startswith(slot_prefix)]
        plain = (
            [entry for entry in table if not entry[0].startswith(slot_prefix)] if slotted else table
        )
        slot_routes = _SlotRoutes(router, slotted) if slotted else None
        # Every message is sent with the default priority, so its list keys depend on the
        # routing key (and slot key) only: computed once per key per batch.
        priority = channel.default_priority
        routes: dict[str, list[str]] = {}
        # kombu draws a uuid4 per message for the delivery tag; one per batch plus the index
        # is just as unique and costs nothing per message.
        tag_prefix = uuid.uuid4().hex
        encode = payload_encoder(channel, exchange, tag_prefix, priority)

        published: list[str] = []
        failed: dict[str, str] = {}
        skipped: list[str] = []
        unroutable = 0
        dead: set[tuple[str, str]] = set()
        pushes: dict[str, list[str]] = {}
        for index, message in enumerate(messages):
            if message.aggregate_key in dead:
                skipped.append(message.event_id)
                continue
            by_slot = slot_routes is not None and message.slot is not None
            route = message.slot_key if by_slot else message.routing_key
            keys = routes.get(route)
            if keys is None:
                matched = router.lookup(plain, exchange, message.routing_key, None)
                if slot_routes is not None and message.slot is not None:
                    matched = matched | slot_routes.match(message.slot, message.routing_key)
                # Unlike kombu, never fall back to the ``ae.undeliver`` queue: nobody reads it.
                keys = [
                    channel._q_for_pri(q, priority)
                    for q in sorted(q for q in matched if q and q != deadletter)
                ]
                routes[route] = keys
            try:
                payload = encode(message, index)
            except Exception as exc:  # local encoding only, so the message's own fault
                failed[message.event_id] = encoding_failure(exc)
                dead.add(message.aggregate_key)
                continue
            published.append(message.event_id)
            if not keys:
                unroutable += 1
            for key in keys:
                pushes.setdefault(key, []).append(payload)

        if pushes:
            # One round trip, one LPUSH per list with every payload of the batch in send order
            # (LPUSH k a b c leaves the list as three LPUSHes would). No automatic retry (kombu's
            # pool has none), so a failure is reported instead of silently duplicated.
            with self._client.pipeline(transaction=False) as pipe:
                for key, payloads in pushes.items():
                    pipe.lpush(key, *payloads)
                pipe.execute()
        return BatchResult(published, failed, skipped, unroutable)


class _SlotRoutes:
    """The slot bindings of one batch's table, matched by range and routing key: a block of
    slots is an integer test, and each pattern meets each routing key once (kombu would run
    every binding's regular expression against every slot key)."""

    def __init__(self, router: Any, slotted: Sequence[tuple[str, str, str]]) -> None:
        self._router = router
        self._ranges: list[tuple[int, int, re.Pattern[str], str]] = []
        self._odd: list[tuple[str, str, str]] = []  # an outbox-slot binding of another shape
        for entry in slotted:
            parsed = parse_slot_binding(entry[0])
            if parsed is None:
                self._odd.append(entry)
            else:
                lo, hi, pattern = parsed
                regex = re.compile(router.key_to_pattern(pattern))
                self._ranges.append((lo, hi, regex, entry[2]))
        self._matches: dict[tuple[re.Pattern[str], str], bool] = {}

    def match(self, slot: int, routing_key: str) -> set[str]:
        queues = set()
        for lo, hi, regex, queue in self._ranges:
            if lo <= slot < hi:
                known = self._matches.get((regex, routing_key))
                if known is None:
                    known = self._matches[(regex, routing_key)] = bool(regex.match(routing_key))
                if known:
                    queues.add(queue)
        if self._odd:
            queues |= self._router.lookup(
                self._odd, None, slot_routing_key(slot, routing_key), None
            )
        return queues


def payload_encoder(
    channel: Any, exchange: str, tag_prefix: str, priority: int
) -> Callable[[OutboundMessage, int], str]:
    """``encode(message, index)``: the JSON kombu would LPUSH for the ``index``-th message of a
    batch (delivery tag ``<tag_prefix>.<index>``).

    With kombu's default body encoding (base64), a template made once per batch: only the
    headers and the routing key go through the JSON encoder; the body is base64 (no escaping),
    the id a uuid. Byte for byte what :func:`kombu_payload` gives (tests hold both to it).
    Another body encoding takes the general path.
    """
    if channel.body_encoding != "base64":

        def general(message: OutboundMessage, index: int) -> str:
            return kombu_payload(channel, exchange, message, f"{tag_prefix}.{index}", priority)

        return general

    head = '{"body": "'
    middle = (
        f'", "content-encoding": {_quote(CONTENT_ENCODING)}, '
        f'"content-type": {_quote(CONTENT_TYPE)}, "headers": '
    )
    properties = f', "properties": {{"delivery_mode": {PERSISTENT}, "message_id": '
    info = f', "delivery_info": {{"exchange": {_quote(exchange)}, "routing_key": '
    tail = (
        f'}}, "priority": {int(priority)}, "body_encoding": "base64", '
        f'"delivery_tag": "{tag_prefix}.'
    )
    b64 = base64.b64encode
    quote = _quote
    # kombu's dumps builds a new encoder per call; one encoder, the same output.
    dumps_headers = _JSONEncoder().encode

    def encode(message: OutboundMessage, index: int) -> str:
        return (
            f"{head}{b64(message.body).decode('ascii')}{middle}{dumps_headers(message.headers)}"
            f"{properties}{quote(message.event_id)}{info}{quote(message.routing_key)}"
            f'{tail}{index}"}}}}'
        )

    return encode


# Strings exactly as json.dumps (ensure_ascii, kombu's default) writes them.
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def kombu_payload(
    channel: Any, exchange: str, message: OutboundMessage, delivery_tag: str, priority: int
) -> str:
    """The JSON kombu would LPUSH for ``message``, built in one step.

    Mirrors kombu 5.7's ``Producer.publish`` -> ``prepare_message`` -> virtual ``basic_publish``
    (``_inplace_augment_message``) -> Redis ``_put``, key for key, so consumers cannot tell the
    difference; only the delivery tag is drawn differently (unique all the same).
    """
    body, body_encoding = channel.encode_body(message.body, channel.body_encoding)
    wire = {
        "body": body,
        "content-encoding": CONTENT_ENCODING,
        "content-type": CONTENT_TYPE,
        "headers": message.headers,
        "properties": {
            "delivery_mode": PERSISTENT,
            "message_id": message.event_id,
            "delivery_info": {"exchange": exchange, "routing_key": message.routing_key},
            "priority": priority,
            "body_encoding": body_encoding,
            "delivery_tag": delivery_tag,
        },
    }
    payload: str = _json_dumps(wire)
    return payload
