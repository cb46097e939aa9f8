"""A userspace TCP fault proxy: network faults between cluster nodes without root (tier 1).

Why: on loopback there is no `tc netem` and no firewall a test may touch, yet the cluster must be
tested against links that go silent or break. Put a `FaultProxy` between a node and the address
it connects to (point `Mesh.TcpIp.Members` or a client at the proxy's port) and switch it:

- "pass": forward both ways, byte for byte;
- "blackhole": a silent cut. Accept and read, forward nothing in either direction, send no FIN
  and no RST: only heartbeats can notice. New connections are accepted (the kernel would accept
  them anyway) but not connected upstream until the cut heals;
- "reset": close every connection with RST on both sides, and refuse new ones (accepted, then
  closed with RST at once: closing the listening socket could let another test take the port).

Back to "pass" heals new traffic, and also every connection that lost no byte during the cut
(its pending bytes then flow, as TCP would retransmit them). A connection from which the cut
discarded bytes never forwards again: its stream has a hole, and resuming it would feed a peer a
corrupt ZMTP or MQTT stream, which no real network does. It stays silent until a peer closes it,
a reset, or `stop`; the peers' heartbeats notice it and they reconnect through the healed proxy.

Must not: connect anywhere but the one target it was given, listen anywhere but where told
(tests give 127.0.0.x), alter or reorder bytes, block the caller's thread on the network, or
outlive `stop` (the thread is joined, every socket closed).

Invariants:
- One thread owns every socket; other threads reach it only through `mode`/`stop`, which queue
  a command, wake the loop through a socket pair and wait until it ran: when `mode("reset")`
  returns, every connection is already reset.
- At most `_MAX_PENDING_BYTES` wait per direction; past that the proxy stops reading the sending
  side (TCP backpressure, as a slow link gives), except in a cut, where it reads and discards.
- `bytes_up`/`bytes_down` count bytes delivered to the target / to the client; `dropped_*`
  count bytes a cut read and discarded.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

__all__ = ["FaultProxy", "ProxyMode", "ProxyStats"]

_MAX_PENDING_BYTES: Final = 1 << 20
_RECV_BYTES: Final = 65536
_SELECT_TIMEOUT_S: Final = 0.5
_COMMAND_TIMEOUT_S: Final = 5.0
_RST_LINGER: Final = struct.pack("ii", 1, 0)  # linger on, 0 s: close() sends RST


class ProxyMode(Enum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class ProxyStats:
    bytes_up: int  # client -> target, delivered
    bytes_down: int  # target -> client, delivered
    dropped_up: int  # client -> target, read and discarded by a cut
    dropped_down: int  # target -> client, read and discarded by a cut
    accepted: int  # connections accepted so far
    open: int  # connections open now
    resets: int  # connections the proxy closed with RST


class _Side(Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"

    @property
    def other(self) -> _Side:
        return _Side.UPSTREAM if self is _Side.CLIENT else _Side.CLIENT


class _End:
    """One socket of a pipe and what waits to be sent to it."""

    __slots__ = ("connecting", "eof", "pending", "shut", "sock")

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock  # None: not connected (yet), or dropped during a cut
        self.connecting = False
        self.pending = bytearray()  # bytes read from the other end, to send to this one
        self.eof = False  # this end sent FIN
        self.shut = False  # we sent FIN to this end


class _Pipe:
    """One accepted connection and its upstream connection."""

    __slots__ = ("ends", "poisoned")

    def __init__(self, client: socket.socket) -> None:
        self.ends = {_Side.CLIENT: _End(client), _Side.UPSTREAM: _End(None)}
        self.poisoned = False  # a cut discarded bytes: never forward again

    def socks(self) -> list[socket.socket]:
        return [e.sock for e in self.ends.values() if e.sock is not None]


def _close_rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    sock.close()


class FaultProxy:
    """A TCP proxy from `listen` to `target` whose link can be cut or reset; see the module docstring."""

    def __init__(
        self, listen: tuple[str, int] = ("127.0.0.1", 0), target: tuple[str, int] = ("127.0.0.1", 0)
    ) -> None:
        if not target[1]:
            raise ValueError("FaultProxy needs a target (host, port)")
        self.listen = listen
        self.target = target
        self._mode = ProxyMode.PASS
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._masks: dict[socket.socket, int] = {}
        self._pipes: set[_Pipe] = set()
        self._commands: list[tuple[Callable[[], None], threading.Event]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._port = 0
        self._bytes = {_Side.CLIENT: 0, _Side.UPSTREAM: 0}  # delivered to that side
        self._dropped = {_Side.CLIENT: 0, _Side.UPSTREAM: 0}  # discarded on the way to that side
        self._accepted = 0
        self._resets = 0

    # --- the caller's side --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (0 before `start`)."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen[0], self._port)

    @property
    def current_mode(self) -> str:
        return self._mode.value

    def start(self) -> int:
        """Bind, listen and start the proxy thread; the listening port."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self.listen)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"fault-proxy-{self._port}", daemon=True)
        self._thread.start()
        return self._port

    def mode(self, m: str | ProxyMode) -> None:
        """Switch to "pass", "blackhole" or "reset"; returns once the proxy thread applied it."""
        new = ProxyMode(m)
        self._call(lambda: self._apply_mode(new))

    def stats(self) -> ProxyStats:
        return ProxyStats(
            bytes_up=self._bytes[_Side.UPSTREAM],
            bytes_down=self._bytes[_Side.CLIENT],
            dropped_up=self._dropped[_Side.UPSTREAM],
            dropped_down=self._dropped[_Side.CLIENT],
            accepted=self._accepted,
            open=len(self._pipes),
            resets=self._resets,
        )

    def stop(self) -> None:
        """Close every connection (RST) and the listener, and join the thread; safe to call twice."""
        thread = self._thread
        if thread is None or self._stopping:
            return
        self._stopping = True
        self._wake()
        thread.join(_COMMAND_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"fault proxy thread on port {self._port} did not stop")

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, command: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            command()  # not running: nothing races with us
            return
        done = threading.Event()
        with self._lock:
            self._commands.append((command, done))
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT_S):
            raise RuntimeError(
                f"fault proxy on port {self._port} did not answer within {_COMMAND_TIMEOUT_S}s"
            )

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer: the loop is awake anyway
            self._wake_w.send(b"x")

    # --- the proxy thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select(_SELECT_TIMEOUT_S):
                    if key.fileobj is self._wake_r:
                        self._drain_wake()
                    elif key.fileobj is self._listener:
                        self._accept()
                    else:
                        pipe, side = key.data
                        if pipe in self._pipes:
                            self._on_ready(pipe, side, events)
                self._run_commands()
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command, done in commands:
            try:
                command()
            finally:
                done.set()

    def _shutdown(self) -> None:
        for pipe in list(self._pipes):
            self._close(pipe, rst=True, count=False)
        self._run_commands()  # release callers waiting on a command
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
        self._selector.unregister(self._wake_r)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _apply_mode(self, new: ProxyMode) -> None:
        self._mode = new
        if new is ProxyMode.RESET:
            for pipe in list(self._pipes):
                self._close(pipe, rst=True)
            return
        for pipe in list(self._pipes):
            up = pipe.ends[_Side.UPSTREAM]
            if new is ProxyMode.PASS and not pipe.poisoned and up.sock is None and not up.eof:
                self._connect_upstream(pipe)
            self._progress(pipe)

    def _forwarding(self, pipe: _Pipe) -> bool:
        return self._mode is ProxyMode.PASS and not pipe.poisoned

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # bounded: other sockets get their turn
            try:
                conn, _addr = self._listener.accept()
            except OSError:  # nothing more to accept (or EMFILE: it stays in the backlog)
                return
            self._accepted += 1
            if self._mode is ProxyMode.RESET:
                self._resets += 1
                _close_rst(conn)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(conn)
            self._pipes.add(pipe)
            if self._mode is ProxyMode.PASS:
                self._connect_upstream(pipe)
            self._progress(pipe)

    def _connect_upstream(self, pipe: _Pipe) -> None:
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = pipe.ends[_Side.UPSTREAM]
        end.sock = up
        code = up.connect_ex(self.target)
        if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            end.connecting = True
        elif code not in (0, errno.EISCONN):  # refused at once: the client sees a reset
            self._close(pipe, rst=True)

    def _on_ready(self, pipe: _Pipe, side: _Side, events: int) -> None:
        end = pipe.ends[side]
        if end.connecting:
            assert end.sock is not None
            if end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._close(pipe, rst=True)  # the target refused: so does the proxy
                return
            end.connecting = False
        if events & selectors.EVENT_READ:
            self._read(pipe, side)
        self._progress(pipe)

    def _progress(self, pipe: _Pipe) -> None:
        if pipe in self._pipes:
            self._flush(pipe)
        if pipe in self._pipes:
            self._update(pipe)

    def _read(self, pipe: _Pipe, side: _Side) -> None:
        end = pipe.ends[side]
        assert end.sock is not None
        try:
            data = end.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._on_error(pipe, side)
            return
        if not data:
            end.eof = True
            if not self._forwarding(pipe) and all(e.eof or e.sock is None for e in pipe.ends.values()):
                self._close(pipe, rst=False)  # both gone during a cut: nobody left to tell
            return
        if not self._forwarding(pipe):
            pipe.poisoned = True
            self._dropped[side.other] += len(data)
            return
        pipe.ends[side.other].pending.extend(data)

    def _on_error(self, pipe: _Pipe, side: _Side) -> None:
        if self._forwarding(pipe):
            self._close(pipe, rst=True)  # pass the reset on, as the network would
            return
        # A cut: the other end must learn nothing. Drop the broken end, keep the other silent.
        pipe.poisoned = True
        end = pipe.ends[side]
        if end.sock is not None:
            self._forget(end.sock)
            end.sock.close()
        end.sock = None
        end.eof = True
        if all(e.sock is None for e in pipe.ends.values()):
            self._pipes.discard(pipe)

    def _flush(self, pipe: _Pipe) -> None:
        """Send what waits, and pass a FIN on once everything before it went out."""
        if not self._forwarding(pipe):
            return
        for side in (_Side.UPSTREAM, _Side.CLIENT):
            end = pipe.ends[side]
            if end.sock is None or end.connecting:
                continue
            if end.pending:
                try:
                    sent = end.sock.send(end.pending)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    self._on_error(pipe, side)
                    return
                del end.pending[:sent]
                self._bytes[side] += sent
            if not end.pending and pipe.ends[side.other].eof and not end.shut:
                end.shut = True
                with contextlib.suppress(OSError):
                    end.sock.shutdown(socket.SHUT_WR)
        if all(e.shut for e in pipe.ends.values()):
            self._close(pipe, rst=False)

    def _update(self, pipe: _Pipe) -> None:
        """Register each socket of `pipe` for what it should wait on now."""
        cut = not self._forwarding(pipe)
        for side, end in pipe.ends.items():
            if end.sock is None:
                continue
            mask = 0
            if end.connecting:
                mask = selectors.EVENT_WRITE
            else:
                if not end.eof and (cut or len(pipe.ends[side.other].pending) < _MAX_PENDING_BYTES):
                    mask |= selectors.EVENT_READ
                if not cut and end.pending:
                    mask |= selectors.EVENT_WRITE
            self._watch(end.sock, mask, (pipe, side))

    def _watch(self, sock: socket.socket, mask: int, data: tuple[_Pipe, _Side]) -> None:
        old = self._masks.get(sock, 0)
        if mask == old:
            return
        if not mask:
            self._forget(sock)
        elif not old:
            self._selector.register(sock, mask, data)
            self._masks[sock] = mask
        else:
            self._selector.modify(sock, mask, data)
            self._masks[sock] = mask

    def _forget(self, sock: socket.socket) -> None:
        if self._masks.pop(sock, 0):
            self._selector.unregister(sock)

    def _close(self, pipe: _Pipe, *, rst: bool, count: bool = True) -> None:
        self._pipes.discard(pipe)
        if rst and count:
            self._resets += 1
        for sock in pipe.socks():
            self._forget(sock)
            if rst:
                _close_rst(sock)
            else:
                sock.close()
        for end in pipe.ends.values():
            end.sock = None
