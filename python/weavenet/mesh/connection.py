"""One control connection to a neighbour, after the handshake: heartbeats, sending, receiving.

`Connection.run` is one nursery with three tasks — the receive loop (with a read deadline), the
sender (draining the connection's `ConnectionSender`) and the heartbeat ticker — and returns the
reason the connection ended as one line for status and logs. Protocol violations, gossip a
gossiper rejects, a missed read deadline or the peer going away all end just this connection.

The connection knows nothing about other connections: the router decides whether it may be added
(tie-break, conn-limit) and what to do with each message (`on_message`). Nothing here blocks the
trio loop; nothing here logs payloads or keys.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from weavenet.mesh import wire
from weavenet.mesh.gossip import ConnectionSender, GossipError
from weavenet.mesh.handshake import ChannelClosed
from weavenet.mesh.handshake import ProtocolError as FramingError
from weavenet.mesh.peer_name import PeerName

if TYPE_CHECKING:
    from weavenet.mesh.handshake import MeshChannel

log = logging.getLogger("weavenet.mesh.connection")

HEARTBEAT_FRAME = wire.encode_message(wire.Heartbeat())


def new_conn_id() -> int:
    """A random 64-bit connection id (our half of the connection uid)."""
    return secrets.randbits(64)


def connection_uid(ours: int, theirs: int) -> int:
    """The connection uid both ends compute alike: the XOR of the two conn ids."""
    return ours ^ theirs


def tie_break(new_uid: int, existing_uid: int) -> str:
    """Which of two connections to the same peer survives: "new", "existing" or "both-die" (equal uids).

    Both ends compute the same uids for the same pair of TCP connections, so they keep the same one.
    """
    if new_uid < existing_uid:
        return "new"
    if new_uid > existing_uid:
        return "existing"
    return "both-die"


@dataclass(frozen=True, slots=True)
class ConnectionTimings:
    heartbeat: float = 30.0  # send a heartbeat this often
    read_timeout: float = 60.0  # close if nothing arrives for this long


class ConnectionEnded(Exception):
    """Raised inside a connection's tasks to end it with a reason (one line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Connection:
    """An established, introduced control connection to peer `remote_name`."""

    def __init__(
        self,
        *,
        channel: MeshChannel,
        local_name: PeerName,
        intro: wire.Intro,
        our_conn_id: int,
        outbound: bool,
        remote_address: str,
        target: str | None,
        we_trust_them: bool,
        sender: ConnectionSender,
        timings: ConnectionTimings,
    ) -> None:
        self.channel = channel
        self.local_name = local_name
        self.intro = intro
        self.uid = connection_uid(our_conn_id, intro.conn_id)
        self.outbound = outbound
        self.remote_address = remote_address
        self.target = target
        self.we_trust_them = we_trust_them
        self.sender = sender
        self.timings = timings
        self.established = False
        self.attrs: dict[str, Any] = {}
        self.started_at = trio.current_time()
        self._cancel_scope = trio.CancelScope()
        self._shutdown_reason: str | None = None

    # -- identity ------------------------------------------------------------------------------

    @property
    def remote_name(self) -> PeerName:
        return self.intro.name

    @property
    def remote_nickname(self) -> str:
        return self.intro.nickname

    @property
    def remote_uid(self) -> int:
        return self.intro.uid

    @property
    def encrypted(self) -> bool:
        """The control channel is encrypted (there is a password)."""
        return bool(self.channel.encrypted)

    @property
    def untrusted(self) -> bool:
        """Either end does not trust the other: the datapath must encrypt (when there is a password)."""
        return not (self.we_trust_them and self.intro.trusted)

    def __str__(self) -> str:
        arrow = "->" if self.outbound else "<-"
        return f"{arrow}[{self.remote_address}|{self.remote_name}({self.remote_nickname})]"

    # -- control -------------------------------------------------------------------------------

    def shutdown(self, reason: str) -> None:
        """End this connection soon with `reason` (idempotent; the first reason wins)."""
        if self._shutdown_reason is None:
            self._shutdown_reason = reason
        self._cancel_scope.cancel()

    def send_overlay_control(self, subtag: int, payload: bytes) -> None:
        self.sender.send_control(wire.encode_message(wire.OverlayControl(subtag, payload)))

    # -- running -------------------------------------------------------------------------------

    async def run(self, on_message: Callable[[Connection, wire.Message, bytes], None]) -> str:
        """Run until the connection ends; returns why. Cancellation from outside propagates."""
        reason = "closed"
        with self._cancel_scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_loop, on_message)
                    nursery.start_soon(self.sender.run, self._write)
                    nursery.start_soon(self._heartbeat_loop)
            except* ConnectionEnded as group:
                reason = _first(group).reason
        if self._shutdown_reason is not None:
            return self._shutdown_reason
        return reason

    async def _write(self, frame: bytes) -> None:
        try:
            with trio.move_on_after(self.timings.read_timeout) as scope:
                await self.channel.send(frame)
        except ChannelClosed as exc:
            raise ConnectionEnded(str(exc)) from None
        except FramingError as exc:  # the receive side broke the channel first
            raise ConnectionEnded(f"protocol error: {exc}") from None
        if scope.cancelled_caught:
            raise ConnectionEnded(f"peer has not read anything for {self.timings.read_timeout:g}s (write timeout)")

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.timings.heartbeat)
            self.sender.send_control(HEARTBEAT_FRAME)

    async def _receive_loop(self, on_message: Callable[[Connection, wire.Message, bytes], None]) -> None:
        while True:
            data = None
            with trio.move_on_after(self.timings.read_timeout):
                try:
                    data = await self.channel.receive()
                except ChannelClosed as exc:
                    raise ConnectionEnded(str(exc)) from None
                except FramingError as exc:
                    raise ConnectionEnded(f"protocol error: {exc}") from None
            if data is None:
                raise ConnectionEnded(f"no message for {self.timings.read_timeout:g}s (heartbeat timeout)")
            try:
                message = wire.decode_message(data)
            except wire.ProtocolError as exc:
                raise ConnectionEnded(f"protocol error: {exc}") from None
            try:
                on_message(self, message, data)
            except wire.ProtocolError as exc:
                raise ConnectionEnded(f"protocol error: {exc}") from None
            except GossipError as exc:
                raise ConnectionEnded(f"gossip rejected: {exc}") from None
            except Exception:
                # A bug in a subsystem's handler: one peer's message must not take the router down.
                log.exception(
                    "%s bug while handling a %s message; closing this connection", self, type(message).__name__
                )
                raise ConnectionEnded(
                    f"internal error handling a {type(message).__name__} message (see the log)"
                ) from None


def _first(group: BaseExceptionGroup[ConnectionEnded]) -> ConnectionEnded:
    for exc in group.exceptions:
        if isinstance(exc, ConnectionEnded):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
    raise AssertionError("empty exception group")  # pragma: no cover
