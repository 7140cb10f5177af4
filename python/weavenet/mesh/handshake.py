"""Mesh connection set-up on TCP 6783: protocol header, handshake, then a framed (encrypted) channel.

Both sides send at once: the header each way, then either the intro in a plain frame (no password)
or the password handshake from Rust (`MeshHandshake`: SPAKE2 then Noise NNpsk0, see
rust/fastdp/src/crypto/handshake.rs), then length-prefixed messages, sealed with the password.

Never: allocate a frame body before checking its announced length against the limit, wait on a
peer without a deadline during the handshake, let two senders interleave frames, or see a key
(keys stay inside Rust objects). Crypto runs inline: sealing or opening 1 MiB takes about 1 ms.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Awaitable, Callable
from types import TracebackType

import trio

from weavenet._fastdp import (
    CHANNEL_TAG_LEN,
    HANDSHAKE_MAX_INTRO,
    HANDSHAKE_MAX_MESSAGE,
    ChannelCipher,
    ChannelError,
    DataKeys,
    HandshakeError,
    MeshHandshake,
    MeshKey,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_TIMEOUT",
    "MAX_VERSION",
    "MIN_VERSION",
    "ChannelClosed",
    "HandshakeError",
    "MeshChannel",
    "ProtocolError",
    "handshake",
]

MAGIC = b"weavenet"
MIN_VERSION = 1
MAX_VERSION = 1
MODE_PLAIN = 0
MODE_PASSWORD = 1
HEADER_LEN = len(MAGIC) + 3  # magic, min version, max version, mode
DEFAULT_MAX_MESSAGE = 8 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0
_LENGTH = struct.Struct(">I")
_READ_CHUNK = 1 << 20  # largest single read from the stream
_FLUSH_GRACE_S = 1.0  # after a failure, how long our last message may take to reach the peer
_SET_BOTH = "set WEAVE_PASSWORD on both or neither"


def handshake_error(reason: str, detail: str) -> HandshakeError:
    """A HandshakeError whose `reason` is a short phrase and whose message says what to do."""
    error = HandshakeError(f"{reason}: {detail}")
    error.reason = reason
    return error


class ChannelClosed(Exception):
    """The channel is unusable and closed: EOF, a truncated frame, or a message that failed
    authentication. `reason` is a short phrase for status and logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ProtocolError(Exception):
    """The peer broke the framing rules (announced a message over the limit); the channel is
    closed. `reason` is a short phrase for status and logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _PeerClosed(Exception):
    """EOF or reset from the peer; `mid_frame` if it came inside a frame."""

    def __init__(self, mid_frame: bool) -> None:
        super().__init__("peer closed the connection mid-frame" if mid_frame else "peer closed the connection")
        self.mid_frame = mid_frame


class _Oversize(Exception):
    def __init__(self, announced: int, limit: int) -> None:
        super().__init__(f"the peer announced a {announced}-byte message; the limit is {limit}")


class _Reader:
    """Buffered reads of exact sizes and length-prefixed frames. Cancel-safe: nothing is consumed
    until a whole item is in the buffer, so a cancelled read can be retried."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            want = max(min(size - len(self._buffer), _READ_CHUNK), 65536)
            try:
                chunk = await self._stream.receive_some(want)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                raise _PeerClosed(mid_frame=bool(self._buffer))
            self._buffer += chunk

    async def exactly(self, size: int) -> bytes:
        await self._fill(size)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def frame(self, limit: int) -> bytes:
        """One frame's body; its announced length is checked against `limit` before reading it."""
        await self._fill(_LENGTH.size)
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > limit:
            raise _Oversize(length, limit)
        await self._fill(_LENGTH.size + length)
        body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
        del self._buffer[: _LENGTH.size + length]
        return body


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


class MeshChannel:
    """An established mesh connection: whole messages in, whole messages out, in order.

    With a password every message is sealed (ChaCha20-Poly1305, counter nonces): a tampered,
    replayed, reordered or lost message closes the connection with ChannelClosed.
    """

    def __init__(
        self,
        *,
        stream: trio.abc.Stream,
        reader: _Reader,
        version: int,
        remote_intro: bytes,
        cipher: ChannelCipher | None,
        data_keys: DataKeys | None,
        max_message: int,
    ) -> None:
        self._stream = stream
        self._reader = reader
        self._cipher = cipher
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._broken: ChannelClosed | ProtocolError | None = None
        self.version = version
        self.remote_intro = remote_intro
        self.data_keys = data_keys
        self.max_message = max_message

    @property
    def encrypted(self) -> bool:
        return self._cipher is not None

    async def send(self, payload: bytes) -> None:
        """Send one message. Raises ValueError over `max_message`, ChannelClosed if the link is gone."""
        if len(payload) > self.max_message:
            raise ValueError(f"message of {len(payload)} bytes exceeds the limit of {self.max_message}")
        async with self._send_lock:
            if self._broken is not None:
                raise self._broken
            body = self._cipher.seal(payload) if self._cipher is not None else payload
            try:
                await self._stream.send_all(_frame(body))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._break("connection lost", str(exc) or type(exc).__name__) from exc
            except BaseException:
                # Cancelled mid-frame: the stream may hold half a frame, so nothing can follow it.
                self._break("send interrupted", "a cancelled send left a partial frame")
                raise

    async def receive(self) -> bytes:
        """The next message. Raises ProtocolError (oversize) or ChannelClosed (EOF, truncated,
        failed authentication); either way the connection is then closed."""
        async with self._receive_lock:
            if self._broken is not None:
                raise self._broken
            limit = self.max_message + (CHANNEL_TAG_LEN if self._cipher is not None else 0)
            try:
                body = await self._reader.frame(limit)
            except _Oversize as exc:
                error = ProtocolError("message too large", str(exc))
                await self._close_after(error)
                raise error from None
            except _PeerClosed as exc:
                error = ChannelClosed("connection closed", str(exc))
                await self._close_after(error)
                raise error from None
            except trio.ClosedResourceError:
                raise self._break("closed", "the channel was closed locally") from None
            if self._cipher is None:
                return body
            try:
                return self._cipher.open(body)
            except ChannelError as exc:
                error = ChannelClosed("message failed authentication", str(exc))
                await self._close_after(error)
                raise error from exc

    def _break(self, reason: str, detail: str) -> ChannelClosed | ProtocolError:
        if self._broken is None:
            self._broken = ChannelClosed(reason, detail)
        return self._broken

    async def _close_after(self, error: ChannelClosed | ProtocolError) -> None:
        self._broken = self._broken or error
        await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        self._broken = self._broken or ChannelClosed("closed", "closed locally")
        await self._stream.aclose()

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        mode = "encrypted" if self.encrypted else "plain"
        return f"MeshChannel(version={self.version}, {mode}, data_keys={self.data_keys!r})"


async def handshake(
    stream: trio.abc.Stream,
    *,
    outbound: bool,
    intro: bytes,
    mesh_key: MeshKey | None,
    max_message: int = DEFAULT_MAX_MESSAGE,
    timeout: float = DEFAULT_TIMEOUT,
) -> MeshChannel:
    """Set up a mesh connection on `stream` (we dialled it if `outbound`).

    Exchanges protocol headers, then the intros (encrypted and authenticated with a `mesh_key`),
    all within `timeout` seconds. Raises HandshakeError with a `.reason` such as "password
    mismatch", "protocol version mismatch", "peer requires a password", "peer has no password" or
    "handshake timed out"; on any failure the stream is closed.
    """
    reader = _Reader(stream)
    try:
        if len(intro) > HANDSHAKE_MAX_INTRO:
            raise handshake_error("intro too large", f"{len(intro)} bytes, at most {HANDSHAKE_MAX_INTRO}")
        with trio.fail_after(timeout):
            return await _negotiate(stream, reader, outbound, intro, mesh_key, max_message)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise handshake_error(
            "handshake timed out", f"the peer did not complete the handshake within {timeout:g} s"
        ) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _negotiate(
    stream: trio.abc.Stream,
    reader: _Reader,
    outbound: bool,
    intro: bytes,
    mesh_key: MeshKey | None,
    max_message: int,
) -> MeshChannel:
    mode = MODE_PLAIN if mesh_key is None else MODE_PASSWORD
    ours = MAGIC + bytes([MIN_VERSION, MAX_VERSION, mode])
    theirs = await _exchange(stream, ours, lambda: _handshake_read(reader.exactly(HEADER_LEN)))
    version = _agree(theirs, mode)

    if mesh_key is None:
        remote_intro = await _exchange(
            stream, _frame(intro), lambda: _handshake_read(reader.frame(HANDSHAKE_MAX_INTRO))
        )
        return MeshChannel(
            stream=stream,
            reader=reader,
            version=version,
            remote_intro=remote_intro,
            cipher=None,
            data_keys=None,
            max_message=max_message,
        )

    prologue = ours + theirs if outbound else theirs + ours
    noise = MeshHandshake(mesh_key, initiator=outbound, intro=intro, prologue=prologue)
    pake = noise.write_message()
    assert pake is not None, "a handshake always opens with its PAKE message"
    # The PAKE messages cross (both at once); the Noise messages alternate.
    their_pake = await _exchange(stream, _frame(pake), lambda: _handshake_read(reader.frame(HANDSHAKE_MAX_MESSAGE)))
    await _take(stream, noise, their_pake)
    while not noise.is_complete:
        body = noise.write_message()
        if body is not None:
            await _handshake_send(stream, _frame(body))
        else:
            await _take(stream, noise, await _handshake_read(reader.frame(HANDSHAKE_MAX_MESSAGE)))
    cipher, data_keys, remote_intro = noise.finish()
    return MeshChannel(
        stream=stream,
        reader=reader,
        version=version,
        remote_intro=remote_intro,
        cipher=cipher,
        data_keys=data_keys,
        max_message=max_message,
    )


def _agree(theirs: bytes, our_mode: int) -> int:
    """Check the peer's header; the protocol version to speak."""
    if theirs[: len(MAGIC)] != MAGIC:
        raise handshake_error("not a weavenet peer", f"its first bytes were {theirs[: len(MAGIC)]!r}")
    their_min, their_max, their_mode = theirs[len(MAGIC) :]
    if their_min > their_max:
        raise handshake_error("malformed protocol header", f"version range {their_min}..{their_max}")
    if their_max < MIN_VERSION or their_min > MAX_VERSION:
        raise handshake_error(
            "protocol version mismatch",
            f"ours {MIN_VERSION}..{MAX_VERSION}, theirs {their_min}..{their_max}; upgrade the older router",
        )
    if their_mode not in (MODE_PLAIN, MODE_PASSWORD):
        raise handshake_error("malformed protocol header", f"unknown mode {their_mode}")
    if our_mode == MODE_PASSWORD and their_mode == MODE_PLAIN:
        raise handshake_error("peer has no password", _SET_BOTH)
    if our_mode == MODE_PLAIN and their_mode == MODE_PASSWORD:
        raise handshake_error("peer requires a password", _SET_BOTH)
    return min(MAX_VERSION, their_max)


async def _handshake_read(read: Awaitable[bytes]) -> bytes:
    """Await a read from the peer, mapping EOF and oversize to HandshakeError."""
    try:
        return await read
    except _PeerClosed as exc:
        raise handshake_error("connection closed during handshake", str(exc)) from None
    except _Oversize as exc:
        raise handshake_error("handshake message too large", str(exc)) from None


async def _handshake_send(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise handshake_error("connection closed during handshake", str(exc) or type(exc).__name__) from exc


async def _exchange(stream: trio.abc.Stream, data: bytes, receive: Callable[[], Awaitable[bytes]]) -> bytes:
    """Send `data` while receiving the peer's message: both sides send at once, so neither may wait
    for the other to read first. If receiving fails, our message still gets a short grace to leave,
    so the peer can report its side of the problem (e.g. a version mismatch) too."""
    failure: HandshakeError | None = None
    sent_error: HandshakeError | None = None

    async def send() -> None:
        nonlocal sent_error
        try:
            await _handshake_send(stream, data)
        except HandshakeError as exc:
            sent_error = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        try:
            received = await receive()
        except HandshakeError as exc:
            failure = exc
            nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline, trio.current_time() + _FLUSH_GRACE_S)
    if failure is not None:
        raise failure
    if sent_error is not None:
        raise sent_error
    return received


async def _take(stream: trio.abc.Stream, noise: MeshHandshake, body: bytes) -> None:
    """Feed a handshake message to Rust; if it fails in a way the peer should hear about (a wrong
    password), send the constant refusal first (best effort: the peer may already be gone)."""
    try:
        noise.read_message(body)
    except HandshakeError:
        refusal = noise.refusal()
        if refusal is not None:
            # The peer may have hung up first; then our own error below is all that matters.
            with (
                trio.move_on_after(_FLUSH_GRACE_S),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(_frame(refusal))
        raise
