"""A small TCP proxy for tests that need a dependency to go "down" or "hang".

Put a :class:`TcpProxy` in front of PostgreSQL, Redis or RabbitMQ and point the code under
test (in this process or in subprocesses such as Celery workers) at ``proxy.address``
instead of the real service. The shared service itself is never touched:

* :meth:`TcpProxy.cut` -- "down": every live connection is reset (RST on both sides) and the
  listening port refuses new connections (``ECONNREFUSED``) until :meth:`TcpProxy.restore`.
* :meth:`TcpProxy.blackhole` -- "hang": connections stay open but no byte is forwarded and new
  connections are accepted but never answered, until :meth:`TcpProxy.restore`.
* :meth:`TcpProxy.restore` -- listen again on the same port and forward normally. Bytes that
  were held back by :meth:`TcpProxy.blackhole` are delivered then; with ``revive_held=False``
  the connections held by the blackhole stay open and silent for ever instead (a NAT or load
  balancer that lost its state: only new connections work), so a client recovers only if it
  gives up on a silent connection by itself.

Implementation: a single daemon thread runs a ``selectors`` event loop over the listening
socket, every proxied socket pair and a wake-up socket pair. Control calls (cut, blackhole,
restore, stop) are queued to that thread and block until it has applied them, so when such a
call returns the new state is already in effect (sockets are reset, the port refuses, ...).

While cut, the port stays reserved by a bound-but-not-listening socket (``SO_REUSEPORT``
where available), so nothing else can grab it before :meth:`TcpProxy.restore` listens on it
again. Without ``SO_REUSEPORT`` the listener is closed and re-bound with ``SO_REUSEADDR``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Literal, cast

__all__ = ["TcpProxy", "proxy_factory"]

_CHUNK = 64 * 1024
_BACKLOG = 128
_COMMAND_TIMEOUT = 30.0
_LINGER_RST = struct.pack("ii", 1, 0)
_CONNECT_PENDING = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY})

_Mode = Literal["forward", "cut", "blackhole"]
_SockAddr = tuple[Any, ...]

# Markers used as selector key data for the two non-connection sockets.
_WAKE = "wake"
_LISTEN = "listen"


def _close_with_reset(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer gets a RST instead of an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


def _set_nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Flow:
    """One direction of a proxied connection."""

    __slots__ = ("buf", "eof", "shut")

    def __init__(self) -> None:
        self.buf = b""  # read from the source, not yet written to the destination
        self.eof = False  # the source sent FIN
        self.shut = False  # FIN was propagated to the destination (shutdown(SHUT_WR))


class _Pair:
    """A client connection and its upstream connection."""

    __slots__ = (
        "client",
        "closed",
        "connecting",
        "paused",
        "silent",
        "to_client",
        "to_upstream",
        "upstream",
    )

    def __init__(self, client: socket.socket, paused: bool) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False
        self.paused = paused
        self.silent = False  # held for ever: restore() does not revive it
        self.closed = False
        self.to_upstream = _Flow()
        self.to_client = _Flow()


class _Command:
    __slots__ = ("done", "error", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.error: BaseException | None = None


class TcpProxy:
    """Threaded TCP proxy that can simulate its target being down or hanging."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self._target_host = target_host
        self._target_port = target_port
        self._listen_host = listen_host
        self._listen_port = listen_port

        self._port: int | None = None
        self._mode: _Mode = "forward"
        self._live = 0

        # Set up by start(); only touched by the loop thread afterwards.
        self._target_family = socket.AF_INET
        self._target_addr: _SockAddr = ()
        self._listen_family = socket.AF_INET
        self._listen_addr: _SockAddr = ()
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._reserve: socket.socket | None = None
        self._pairs: set[_Pair] = set()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False

        self._life_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopped = False

        self._cmd_lock = threading.Lock()
        self._commands: deque[_Command] = deque()
        self._closed = True  # no loop thread to run commands

    def __repr__(self) -> str:
        port = self._port if self._port is not None else self._listen_port
        return (
            f"<TcpProxy {self._listen_host}:{port} -> {self._target_host}:{self._target_port}"
            f" mode={self._mode} connections={self._live}>"
        )

    # ------------------------------------------------------------------ public API

    def start(self) -> TcpProxy:
        """Bind and listen, then start the forwarding thread. Returns ``self``."""
        with self._life_lock:
            if self._started or self._stopped:
                raise RuntimeError("TcpProxy can only be started once, and not after stop()")
            self._started = True

            target = socket.getaddrinfo(
                self._target_host, self._target_port, type=socket.SOCK_STREAM
            )[0]
            self._target_family, self._target_addr = target[0], target[4]
            listen = socket.getaddrinfo(
                self._listen_host,
                self._listen_port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )[0]
            self._listen_family, self._listen_addr = listen[0], listen[4]

            self._sel = selectors.DefaultSelector()
            try:
                sock = self._bound_socket(self._listen_addr)
                self._port = cast(int, sock.getsockname()[1])
                self._listen_addr = (self._listen_addr[0], self._port, *self._listen_addr[2:])
                self._reserve = sock
                self._listen()
                self._wake_r, self._wake_w = socket.socketpair()
                self._wake_r.setblocking(False)
                self._wake_w.setblocking(False)
                self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
            except BaseException:
                self._close_all()
                self._close_wake()
                raise

            self._thread = threading.Thread(
                target=self._run,
                name=f"TcpProxy-{self._port}->{self._target_host}:{self._target_port}",
                daemon=True,
            )
            with self._cmd_lock:
                self._closed = False
            self._thread.start()
        return self

    @property
    def port(self) -> int:
        """The listening port (the ephemeral one when ``listen_port`` was 0)."""
        if self._port is None:
            raise RuntimeError("TcpProxy is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients should connect to."""
        return (self._listen_host, self.port)

    @property
    def connections(self) -> int:
        """Number of live proxied (client) connections, including held/blackholed ones."""
        return self._live

    def cut(self) -> None:
        """Reset every live connection and refuse new ones until :meth:`restore`."""
        self._call(self._do_cut)

    def blackhole(self) -> None:
        """Stop forwarding bytes and accept-but-never-answer new connections until
        :meth:`restore`."""
        self._call(self._do_blackhole)

    def restore(self, *, revive_held: bool = True) -> None:
        """Listen again on the same port and forward normally.

        ``revive_held=False``: the connections the blackhole holds stay open and forward
        nothing for ever (they are reset only by :meth:`cut` or :meth:`stop`)."""
        self._call(lambda: self._do_restore(revive_held))

    def stop(self) -> None:
        """Close every socket and join the forwarding thread. Idempotent."""
        with self._life_lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        if thread is None:
            return
        # RuntimeError: the loop thread is already gone; it closed everything on its way out.
        with contextlib.suppress(RuntimeError):
            self._call(self._do_stop)
        thread.join()
        self._close_wake()

    def __enter__(self) -> TcpProxy:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ control plumbing

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread and wait until it has run."""
        cmd = _Command(fn)
        with self._cmd_lock:
            if self._closed:
                raise RuntimeError("TcpProxy is not running")
            self._commands.append(cmd)
            if self._wake_w is not None:  # closed only under this lock, see stop()
                with contextlib.suppress(OSError):  # buffer full: a wake-up is pending anyway
                    self._wake_w.send(b"\0")
        if not cmd.done.wait(_COMMAND_TIMEOUT):
            raise RuntimeError("TcpProxy loop did not respond")
        if cmd.error is not None:
            raise cmd.error

    def _run_commands(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            with self._cmd_lock:
                if not self._commands:
                    return
                cmd = self._commands.popleft()
            try:
                cmd.fn()
            except BaseException as exc:  # handed back to the caller
                cmd.error = exc
            finally:
                cmd.done.set()

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                for key, mask in sel.select():
                    if self._stopping:
                        break
                    if key.data is _WAKE:
                        self._run_commands()
                    elif key.data is _LISTEN:
                        self._on_accept()
                    else:
                        pair, is_client = cast(tuple[_Pair, bool], key.data)
                        self._on_io(pair, is_client, mask)
        finally:
            with self._cmd_lock:
                self._closed = True
                pending = list(self._commands)
                self._commands.clear()
            for cmd in pending:
                cmd.error = RuntimeError("TcpProxy stopped")
                cmd.done.set()
            self._close_all()

    # ------------------------------------------------------------------ commands (loop thread)

    def _do_cut(self) -> None:
        self._mode = "cut"
        for pair in list(self._pairs):
            self._drop(pair, reset=True)
        self._unlisten()

    def _do_blackhole(self) -> None:
        self._mode = "blackhole"
        for pair in list(self._pairs):
            pair.paused = True
            self._sync(pair)
        self._listen()

    def _do_restore(self, revive_held: bool) -> None:
        self._mode = "forward"
        self._listen()
        for pair in list(self._pairs):
            if not pair.paused or pair.silent:
                continue
            if not revive_held:
                pair.silent = True
                continue
            pair.paused = False
            try:
                if pair.upstream is None:
                    self._connect_upstream(pair)
                self._sync(pair)
            except OSError:
                self._drop(pair, reset=True)

    def _do_stop(self) -> None:
        self._stopping = True

    # ------------------------------------------------------------------ listening socket

    def _bound_socket(self, addr: _SockAddr) -> socket.socket:
        sock = socket.socket(self._listen_family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def _listen(self) -> None:
        if self._listener is not None:
            return
        assert self._sel is not None
        sock = self._reserve if self._reserve is not None else self._bound_socket(self._listen_addr)
        self._reserve = None
        try:
            sock.listen(_BACKLOG)
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ, _LISTEN)
        except BaseException:
            sock.close()
            raise
        self._listener = sock

    def _unlisten(self) -> None:
        listener = self._listener
        if listener is None:
            return
        assert self._sel is not None
        if self._reserve is None:
            # Keep the port while not listening: connects are refused, nobody can steal it.
            try:
                self._reserve = self._bound_socket(self._listen_addr)
            except OSError:
                self._reserve = None  # no SO_REUSEPORT: _listen() re-binds with SO_REUSEADDR
        self._sel.unregister(listener)
        self._listener = None
        listener.close()  # also resets connections still waiting in the accept queue

    def _on_accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError:
                return
            client.setblocking(False)
            _set_nodelay(client)
            pair = _Pair(client, paused=self._mode == "blackhole")
            self._pairs.add(pair)
            self._live = len(self._pairs)
            try:
                if not pair.paused:
                    self._connect_upstream(pair)
                self._sync(pair)
            except OSError:
                self._drop(pair, reset=True)

    # ------------------------------------------------------------------ connections

    def _connect_upstream(self, pair: _Pair) -> None:
        upstream = socket.socket(self._target_family, socket.SOCK_STREAM)
        pair.upstream = upstream
        upstream.setblocking(False)
        _set_nodelay(upstream)
        err = upstream.connect_ex(self._target_addr)
        if err in _CONNECT_PENDING:
            pair.connecting = True
        elif err != 0:
            raise OSError(err, os.strerror(err))

    def _drop(self, pair: _Pair, *, reset: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        self._live = len(self._pairs)
        assert self._sel is not None
        for sock in (pair.client, pair.upstream):
            if sock is None:
                continue
            self._set_interest(sock, 0, None)
            if reset:
                _close_with_reset(sock)
            else:
                sock.close()

    def _set_interest(self, sock: socket.socket, events: int, data: object) -> None:
        assert self._sel is not None
        try:
            key: selectors.SelectorKey | None = self._sel.get_key(sock)
        except KeyError:
            key = None
        if events == 0:
            if key is not None:
                self._sel.unregister(sock)
        elif key is None:
            self._sel.register(sock, events, data)
        elif key.events != events:
            self._sel.modify(sock, events, data)

    def _sync(self, pair: _Pair) -> None:
        """Register exactly the events ``pair`` can make progress on right now."""
        client_events = upstream_events = 0
        if not pair.paused and pair.upstream is not None:
            if pair.connecting:
                upstream_events = selectors.EVENT_WRITE
            else:
                up, down = pair.to_upstream, pair.to_client
                if not up.eof and not up.buf:
                    client_events |= selectors.EVENT_READ
                if down.buf:
                    client_events |= selectors.EVENT_WRITE
                if not down.eof and not down.buf:
                    upstream_events |= selectors.EVENT_READ
                if up.buf:
                    upstream_events |= selectors.EVENT_WRITE
        self._set_interest(pair.client, client_events, (pair, True))
        if pair.upstream is not None:
            self._set_interest(pair.upstream, upstream_events, (pair, False))

    def _on_io(self, pair: _Pair, is_client: bool, mask: int) -> None:
        if pair.closed or pair.paused or pair.upstream is None:
            return  # stale event from before a command changed the pair
        try:
            if not is_client and pair.connecting:
                err = pair.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                pair.connecting = False
            else:
                if is_client:
                    sock, other = pair.client, pair.upstream
                    outgoing, incoming = pair.to_upstream, pair.to_client
                else:
                    sock, other = pair.upstream, pair.client
                    outgoing, incoming = pair.to_client, pair.to_upstream
                if mask & selectors.EVENT_WRITE and incoming.buf:
                    self._send(sock, incoming)
                if mask & selectors.EVENT_READ and not outgoing.eof and not outgoing.buf:
                    try:
                        data = sock.recv(_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        pass
                    else:
                        if data:
                            outgoing.buf = data
                            self._send(other, outgoing)
                        else:
                            outgoing.eof = True
                # Propagate half-closes once everything before the FIN was delivered.
                for flow, dst in ((pair.to_upstream, pair.upstream), (pair.to_client, pair.client)):
                    if flow.eof and not flow.buf and not flow.shut:
                        dst.shutdown(socket.SHUT_WR)
                        flow.shut = True
                if pair.to_upstream.shut and pair.to_client.shut:
                    self._drop(pair, reset=False)
                    return
            self._sync(pair)
        except OSError:
            # Refused upstream, reset by a peer, broken pipe...: reset the other side too.
            self._drop(pair, reset=True)

    @staticmethod
    def _send(sock: socket.socket, flow: _Flow) -> None:
        try:
            sent = sock.send(flow.buf)
        except (BlockingIOError, InterruptedError):
            return
        flow.buf = flow.buf[sent:]

    # ------------------------------------------------------------------ teardown

    def _close_all(self) -> None:
        for pair in list(self._pairs):
            self._drop(pair, reset=True)
        for sock in (self._listener, self._reserve):
            if sock is not None:
                sock.close()
        self._listener = self._reserve = None
        if self._sel is not None:
            self._sel.close()

    def _close_wake(self) -> None:
        # Not done by the loop thread: _call() may be sending a wake-up byte concurrently.
        with self._cmd_lock:
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._wake_r = self._wake_w = None


def proxy_factory() -> Iterator[Callable[[str, int], TcpProxy]]:
    """Generator for a pytest fixture that hands out started proxies and stops them all.

    Register it in a conftest, e.g. ``tcp_proxy = pytest.fixture(proxy_factory, name="tcp_proxy")``,
    then in a test: ``proxy = tcp_proxy("127.0.0.1", 6379)``.
    """
    proxies: list[TcpProxy] = []

    def make(target_host: str, target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_host, target_port).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for proxy in reversed(proxies):
            try:
                proxy.stop()
            except Exception as exc:  # stop the others first
                errors.append(exc)
        if errors:
            raise errors[0]
