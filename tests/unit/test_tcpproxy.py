"""Tests for the TCP proxy used to simulate PostgreSQL / Redis / RabbitMQ outages."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.tcpproxy import TcpProxy, proxy_factory

pytestmark = pytest.mark.timeout(60)

tcp_proxy = pytest.fixture(proxy_factory, name="tcp_proxy")

FAST = 1.0  # seconds within which a cut must be visible to clients
HANG = 0.3  # client read timeout used to observe a blackhole


class EchoServer:
    """Single-threaded echo server on 127.0.0.1 that counts its live connections."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._run, name="echo-server", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _close(self, conn: socket.socket) -> None:
        self._sel.unregister(conn)
        self._conns.discard(conn)
        conn.close()

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    for conn in list(self._conns):
                        self._close(conn)
                    return
                if sock is self._listener:
                    conn, _ = self._listener.accept()
                    conn.setblocking(True)
                    self._conns.add(conn)
                    self._sel.register(conn, selectors.EVENT_READ)
                    continue
                if sock not in self._conns:
                    continue
                try:
                    data = sock.recv(65536)
                    if data:
                        sock.sendall(data)
                    else:
                        self._close(sock)
                except OSError:
                    self._close(sock)

    def stop(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(5)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._sel.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture
def proxy(echo: EchoServer, tcp_proxy: Callable[[str, int], TcpProxy]) -> TcpProxy:
    return tcp_proxy("127.0.0.1", echo.port)


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def connect(proxy: TcpProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise AssertionError(f"EOF after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


def assert_echoes(sock: socket.socket, payload: bytes = b"ping") -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("TcpProxy")]


def test_bytes_flow_both_ways_through_the_proxy(proxy: TcpProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        assert_echoes(client, b"hello")
        assert proxy.connections == 1
        wait_until(lambda: echo.connections == 1)

        payload = bytes(range(256)) * 4096  # 1 MiB: exercises buffering and back-pressure
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(client, len(payload)) == payload
        sender.join()

        # A half-close travels through: the echo server sees EOF and closes its side.
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
    wait_until(lambda: proxy.connections == 0 and echo.connections == 0)


def test_proxy_reports_the_bound_ephemeral_port_as_its_address(proxy: TcpProxy) -> None:
    assert proxy.port > 0
    assert proxy.address == ("127.0.0.1", proxy.port)


def test_cut_resets_live_connections_and_refuses_new_ones_fast(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    clients = [connect(proxy) for _ in range(3)]
    for client in clients:
        assert_echoes(client)
    assert proxy.connections == 3

    proxy.cut()

    assert proxy.connections == 0
    for client in clients:
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        assert time.monotonic() - started < FAST
        client.close()

    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    assert time.monotonic() - started < FAST
    wait_until(lambda: echo.connections == 0)


def test_restore_listens_again_on_the_same_port(proxy: TcpProxy) -> None:
    port = proxy.port
    for _ in range(3):
        with connect(proxy) as client:
            assert_echoes(client)
            proxy.cut()
            proxy.restore()  # immediately after the cut: the port must be re-bindable
            assert proxy.port == port
            with pytest.raises(ConnectionResetError):
                client.recv(1)
        with connect(proxy) as client:
            assert_echoes(client)


def test_restore_without_a_cut_is_harmless(proxy: TcpProxy) -> None:
    with connect(proxy) as client:
        proxy.restore()
        assert_echoes(client)


def test_blackhole_makes_client_reads_time_out_and_restore_forwards_again(
    proxy: TcpProxy,
) -> None:
    with connect(proxy) as old, contextlib.ExitStack() as stack:
        assert_echoes(old)

        proxy.blackhole()

        old.sendall(b"held")
        old.settimeout(HANG)
        with pytest.raises(TimeoutError):
            old.recv(4)

        new = stack.enter_context(connect(proxy))  # accepted...
        new.sendall(b"new")
        new.settimeout(HANG)
        with pytest.raises(TimeoutError):  # ...but never answered
            new.recv(3)
        assert proxy.connections == 2

        proxy.restore()

        old.settimeout(2)
        new.settimeout(2)
        assert recv_exactly(old, 4) == b"held"  # bytes held back are delivered
        assert recv_exactly(new, 3) == b"new"  # held connection is connected upstream now
        assert_echoes(old)
        assert_echoes(new)
        with connect(proxy) as fresh:
            assert_echoes(fresh)


def test_a_restore_that_does_not_revive_leaves_the_held_connections_silent_for_ever(
    proxy: TcpProxy,
) -> None:
    with connect(proxy) as old, contextlib.ExitStack() as stack:
        assert_echoes(old)
        proxy.blackhole()
        held = stack.enter_context(connect(proxy))
        old.sendall(b"held")
        held.sendall(b"new")
        wait_until(lambda: proxy.connections == 2)  # the proxy has accepted (and held) it

        proxy.restore(revive_held=False)

        for client in (old, held):
            client.settimeout(HANG)
            with pytest.raises(TimeoutError):  # still open, still silent
                client.recv(4)
        with connect(proxy) as fresh:
            assert_echoes(fresh)
        proxy.blackhole()
        proxy.restore()  # a later restore does not revive them either
        old.settimeout(HANG)
        with pytest.raises(TimeoutError):
            old.recv(4)
        assert proxy.connections == 2


def test_cut_during_blackhole_resets_the_held_connections(proxy: TcpProxy) -> None:
    with connect(proxy) as old:
        assert_echoes(old)
        proxy.blackhole()
        with connect(proxy) as held:
            proxy.cut()
            for client in (old, held):
                with pytest.raises(ConnectionResetError):
                    client.recv(1)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    proxy.restore()
    with connect(proxy) as client:
        assert_echoes(client)


def test_unreachable_target_resets_the_client_connection() -> None:
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))  # bound but not listening: connects are refused
        with TcpProxy("127.0.0.1", reserved.getsockname()[1]) as proxy:
            # The reset may already arrive during connect() when the machine is busy.
            with pytest.raises(ConnectionResetError), connect(proxy) as client:
                client.recv(1)
            wait_until(lambda: proxy.connections == 0)


def test_stop_joins_all_threads_and_is_idempotent(echo: EchoServer) -> None:
    before = set(threading.enumerate())
    proxy = TcpProxy("127.0.0.1", echo.port).start()
    clients = [connect(proxy) for _ in range(2)]
    assert_echoes(clients[0])
    proxy.blackhole()
    clients.append(connect(proxy))
    assert proxy_threads()

    proxy.stop()

    assert proxy_threads() == []
    assert set(threading.enumerate()) <= before
    proxy.stop()  # idempotent
    for client in clients:
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        client.close()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    with pytest.raises(RuntimeError):
        proxy.restore()


def test_stop_before_start_is_a_no_op() -> None:
    proxy = TcpProxy("127.0.0.1", 1)
    proxy.stop()
    with pytest.raises(RuntimeError):
        _ = proxy.port


def test_context_manager_starts_and_stops_the_proxy(echo: EchoServer) -> None:
    with TcpProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as client:
        assert_echoes(client)
    assert proxy_threads() == []


def test_proxy_factory_stops_every_proxy_it_made(echo: EchoServer) -> None:
    factory = proxy_factory()
    make = next(factory)
    proxies = [make("127.0.0.1", echo.port) for _ in range(3)]
    assert len({p.port for p in proxies}) == 3
    for proxy in proxies:
        with connect(proxy) as client:
            assert_echoes(client)
    assert len(proxy_threads()) == 3

    with pytest.raises(StopIteration):  # what pytest does at fixture teardown
        next(factory)

    assert proxy_threads() == []
    for proxy in proxies:
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)


def test_redis_ping_works_through_the_proxy_fails_after_cut_and_works_after_restore(
    tcp_proxy: Callable[[str, int], TcpProxy],
) -> None:
    redis = pytest.importorskip("redis")
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        direct = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1)
        direct.ping()
        direct.close()
    except (OSError, redis.exceptions.RedisError) as exc:
        pytest.skip(f"Redis not reachable on 127.0.0.1:6379: {exc}")

    proxy = tcp_proxy("127.0.0.1", 6379)
    client = redis.Redis(
        host=proxy.address[0],
        port=proxy.port,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        assert client.ping() is True

        proxy.cut()
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()  # pooled connection was reset
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()  # reconnect is refused
        assert time.monotonic() - started < FAST

        proxy.restore()
        assert client.ping() is True
    finally:
        client.close()
