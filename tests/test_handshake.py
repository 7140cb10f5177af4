"""Mesh connection set-up over real TCP on 127.0.0.1: two routers meet, with and without a password,
and a hostile peer tries garbage, huge frames, slow bytes, early hang-ups and tampering.

Every scenario runs under a short deadline, so a hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import trio

from weavenet._fastdp import DataKeys, MeshKey
from weavenet.mesh.handshake import (
    ChannelClosed,
    HandshakeError,
    MeshChannel,
    ProtocolError,
    handshake,
)

HEADER_V1_PASSWORD = b"weavenet\x01\x01\x01"
HEADER_V1_PLAIN = b"weavenet\x01\x01\x00"
INTRO_A = b"peer a: 8a:00:00:00:00:01 host-a"
INTRO_B = b"peer b: 8a:00:00:00:00:02 host-b"
# How late past a deadline a loaded CI machine may wake us (wall time): generous, since the timing
# checks are about a deadline applying at all, not about its precision.
LATE = 2.5


def trio_test(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async scenario with trio under a deadline (no pytest-trio plugin here)."""

    @functools.wraps(fn)
    def run() -> None:
        async def main() -> None:
            with trio.fail_after(20):
                await fn()

        trio.run(main)

    return run


@functools.cache
def key(password: str) -> MeshKey:
    return MeshKey.from_password(password.encode())


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected (dialler, accepted) pair of TCP streams on 127.0.0.1."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with listener:
        dialler = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listener.accept()
    return dialler, accepted


class Outcome:
    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


async def both(first: Callable[[], Awaitable[Any]], second: Callable[[], Awaitable[Any]]) -> tuple[Outcome, Outcome]:
    """Run two sides at once; each side's result or exception."""
    outcomes = (Outcome(), Outcome())

    async def capture(fn: Callable[[], Awaitable[Any]], out: Outcome) -> None:
        try:
            out.value = await fn()
        except Exception as exc:
            out.error = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(capture, first, outcomes[0])
        nursery.start_soon(capture, second, outcomes[1])
    return outcomes


async def connect(key_a: MeshKey | None, key_b: MeshKey | None, **kwargs: Any) -> tuple[Outcome, Outcome]:
    """Router A dials router B; both run the handshake."""
    dialler, accepted = await tcp_pair()
    return await both(
        lambda: handshake(dialler, outbound=True, intro=INTRO_A, mesh_key=key_a, **kwargs),
        lambda: handshake(accepted, outbound=False, intro=INTRO_B, mesh_key=key_b, **kwargs),
    )


def reason_of(outcome: Outcome) -> str:
    assert isinstance(outcome.error, HandshakeError), f"expected a HandshakeError, got {outcome.error!r}"
    return outcome.error.reason


async def hostile_peer(
    act: Callable[[trio.SocketStream], Awaitable[None]], *, mesh_key: MeshKey | None, timeout: float = 10.0
) -> tuple[HandshakeError, float]:
    """We accept a connection whose dialler runs `act`; the error our handshake raises, and how long it took."""
    dialler, accepted = await tcp_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def attacker() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await act(dialler)  # we hang up on it, as we should

        nursery.start_soon(attacker)
        with pytest.raises(HandshakeError) as caught:
            await handshake(accepted, outbound=False, intro=INTRO_B, mesh_key=mesh_key, timeout=timeout)
        nursery.cancel_scope.cancel()
    await dialler.aclose()
    return caught.value, trio.current_time() - start


# --- routers that agree ---------------------------------------------------------------------------


@trio_test
async def test_plain_handshake_exchanges_intros_and_carries_messages() -> None:
    a, b = await connect(None, None)
    chan_a: MeshChannel = a.unwrap()
    chan_b: MeshChannel = b.unwrap()
    assert (chan_a.remote_intro, chan_b.remote_intro) == (INTRO_B, INTRO_A)
    assert not chan_a.encrypted and chan_a.data_keys is None and chan_a.version == 1
    await chan_a.send(b"gossip from a")
    assert await chan_b.receive() == b"gossip from a"
    await chan_b.send(b"")
    assert await chan_a.receive() == b""
    await chan_a.aclose()
    with pytest.raises(ChannelClosed):
        await chan_b.receive()
    await chan_b.aclose()


@trio_test
async def test_password_handshake_encrypts_and_both_ends_agree_on_data_keys() -> None:
    a, b = await connect(key("s3cret"), key("s3cret"))
    chan_a: MeshChannel = a.unwrap()
    chan_b: MeshChannel = b.unwrap()
    assert chan_a.encrypted and chan_b.encrypted
    assert (chan_a.remote_intro, chan_b.remote_intro) == (INTRO_B, INTRO_A)
    assert isinstance(chan_a.data_keys, DataKeys) and isinstance(chan_b.data_keys, DataKeys)
    assert chan_a.data_keys.fingerprint() == chan_b.data_keys.fingerprint()
    assert chan_a.data_keys.initiator and not chan_b.data_keys.initiator

    big = os.urandom(3 << 20)
    sent, got = await both(lambda: chan_a.send(big), chan_b.receive)
    sent.unwrap()
    assert got.unwrap() == big
    await chan_b.send(b"ack")
    assert await chan_a.receive() == b"ack"

    # A second connection between the same routers gets its own keys.
    c, _ = await connect(key("s3cret"), key("s3cret"))
    assert c.unwrap().data_keys.fingerprint() != chan_a.data_keys.fingerprint()


@trio_test
async def test_nothing_secret_or_private_is_readable() -> None:
    k = key("s3cret")
    assert repr(k) == "MeshKey(<secret>)"
    assert all(not isinstance(getattr(k, n, None), bytes | bytearray) for n in dir(k))
    with pytest.raises(TypeError):
        pickle.dumps(k)
    a, _ = await connect(k, k)
    keys = a.unwrap().data_keys
    assert repr(keys) == f"DataKeys(fingerprint={keys.fingerprint()})"
    assert all(not isinstance(getattr(keys, n, None), bytes | bytearray) for n in dir(keys))


@trio_test
async def test_intro_and_messages_never_cross_the_wire_in_clear() -> None:
    seen = bytearray()
    dialler, proxied = await proxy_pair(lambda data: seen.extend(data) or data)
    a, b = await both(
        lambda: handshake(dialler, outbound=True, intro=INTRO_A, mesh_key=key("s3cret")),
        lambda: handshake(proxied, outbound=False, intro=INTRO_B, mesh_key=key("s3cret")),
    )
    await a.unwrap().send(b"topology: secret routes")
    assert await b.unwrap().receive() == b"topology: secret routes"
    assert INTRO_A not in seen and b"secret routes" not in seen


@trio_test
async def test_concurrent_senders_never_interleave_frames() -> None:
    a, b = await connect(key("s3cret"), key("s3cret"))
    chan_a: MeshChannel = a.unwrap()
    chan_b: MeshChannel = b.unwrap()
    messages = {bytes([i]) * (100_000 + i) for i in range(20)}
    received: set[bytes] = set()

    async def receive_all() -> None:
        for _ in messages:
            received.add(await chan_b.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_all)
        for m in messages:
            nursery.start_soon(chan_a.send, m)
    assert received == messages


@trio_test
async def test_a_message_over_the_limit_is_refused_before_sending() -> None:
    a, _ = await connect(None, None, max_message=1024)
    with pytest.raises(ValueError, match="exceeds the limit"):
        await a.unwrap().send(b"x" * 1025)


@trio_test
async def test_closing_our_end_wakes_a_pending_receive_with_channel_closed() -> None:
    a, _ = await connect(None, None)
    channel: MeshChannel = a.unwrap()
    async with trio.open_nursery() as nursery:

        async def receiver() -> None:
            with pytest.raises(ChannelClosed):
                await channel.receive()

        nursery.start_soon(receiver)
        await trio.sleep(0.05)
        await channel.aclose()
    with pytest.raises(ChannelClosed):
        await channel.send(b"after close")


@trio_test
async def test_an_oversized_intro_is_refused_locally() -> None:
    dialler, _ = await tcp_pair()
    with pytest.raises(HandshakeError) as caught:
        await handshake(dialler, outbound=True, intro=b"x" * 5000, mesh_key=None)
    assert caught.value.reason == "intro too large"


# --- routers that disagree ------------------------------------------------------------------------


@trio_test
async def test_wrong_password_is_reported_as_password_mismatch_on_both_sides() -> None:
    a, b = await connect(key("alpha"), key("bravo"))
    assert reason_of(a) == "password mismatch"
    assert reason_of(b) == "password mismatch"
    assert "WEAVE_PASSWORD" in str(a.error) and "WEAVE_PASSWORD" in str(b.error)


@trio_test
async def test_password_on_one_side_only_is_a_clear_error_on_both_sides() -> None:
    a, b = await connect(key("s3cret"), None)
    assert reason_of(a) == "peer has no password"
    assert reason_of(b) == "peer requires a password"
    assert "set WEAVE_PASSWORD on both or neither" in str(a.error)
    assert "set WEAVE_PASSWORD on both or neither" in str(b.error)


@trio_test
async def test_protocol_version_mismatch_names_both_ranges() -> None:
    async def future_router(stream: trio.SocketStream) -> None:
        await stream.send_all(b"weavenet\x03\x04\x00")
        assert await stream.receive_some(11) == HEADER_V1_PLAIN  # it hears our range too
        await trio.sleep_forever()

    error, _ = await hostile_peer(future_router, mesh_key=None)
    assert error.reason == "protocol version mismatch"
    assert "ours 1..1, theirs 3..4" in str(error)


# --- hostile peers: each fails with the right error, quickly -------------------------------------


@trio_test
async def test_random_bytes_are_not_a_weavenet_peer() -> None:
    async def noise(stream: trio.SocketStream) -> None:
        await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await trio.sleep_forever()

    error, took = await hostile_peer(noise, mesh_key=key("s3cret"))
    assert error.reason == "not a weavenet peer"
    assert took < 2


@trio_test
async def test_valid_header_then_garbage_is_a_malformed_handshake() -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER_V1_PASSWORD + struct.pack(">I", 34) + os.urandom(34))
        await trio.sleep_forever()

    error, took = await hostile_peer(garbage, mesh_key=key("s3cret"))
    assert error.reason in ("malformed handshake message", "unexpected handshake message")
    assert took < 2


@trio_test
async def test_valid_header_then_random_stream_never_hangs() -> None:
    for _ in range(20):

        async def garbage(stream: trio.SocketStream) -> None:
            await stream.send_all(HEADER_V1_PASSWORD + os.urandom(200))
            await trio.sleep_forever()

        error, _ = await hostile_peer(garbage, mesh_key=key("s3cret"), timeout=3)
        assert error.reason in (
            "malformed handshake message",
            "unexpected handshake message",
            "handshake message too large",
            "handshake timed out",  # a small random length prefix that 200 bytes do not fill
        )


@trio_test
async def test_a_frame_claiming_two_gigabytes_is_refused_before_reading_it() -> None:
    async def huge(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER_V1_PASSWORD + struct.pack(">I", 2**31))
        await trio.sleep_forever()  # never sends the body: reading it would hang

    error, took = await hostile_peer(huge, mesh_key=key("s3cret"))
    assert error.reason == "handshake message too large"
    assert took < 2


@trio_test
async def test_a_frame_claiming_two_gigabytes_after_the_handshake_is_a_protocol_error() -> None:
    dialler, accepted = await tcp_pair()
    raw = dialler
    _, ours = await both(
        lambda: raw.send_all(HEADER_V1_PLAIN + struct.pack(">I", 1) + b"i"),
        lambda: handshake(accepted, outbound=False, intro=INTRO_B, mesh_key=None),
    )
    channel: MeshChannel = ours.unwrap()
    assert channel.remote_intro == b"i"
    await raw.send_all(struct.pack(">I", 2**31))
    with trio.fail_after(2), pytest.raises(ProtocolError, match="2147483648"):
        await channel.receive()
    with pytest.raises(ProtocolError):  # and the channel stays dead
        await channel.receive()


@trio_test
async def test_a_byte_per_interval_sender_is_dropped_at_the_deadline() -> None:
    async def slow_loris(stream: trio.SocketStream) -> None:
        for byte in HEADER_V1_PASSWORD * 10:
            await stream.send_all(bytes([byte]))
            await trio.sleep(0.1)

    error, took = await hostile_peer(slow_loris, mesh_key=key("s3cret"), timeout=0.5)
    assert error.reason == "handshake timed out"
    # Trickling bytes must not extend the deadline.
    assert 0.4 < took < 0.5 + LATE, f"dropped after {took:.2f}s (deadline 0.5s)"


@trio_test
async def test_a_slow_sender_during_the_password_handshake_is_dropped_too() -> None:
    async def stall_after_header(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER_V1_PASSWORD + struct.pack(">I", 34) + b"\x01A")
        await trio.sleep_forever()

    error, took = await hostile_peer(stall_after_header, mesh_key=key("s3cret"), timeout=0.5)
    assert error.reason == "handshake timed out"
    assert took < 0.5 + LATE, f"dropped after {took:.2f}s (deadline 0.5s)"


@trio_test
async def test_eof_mid_header_and_mid_frame_is_connection_closed_during_handshake() -> None:
    for prefix in (b"weave", HEADER_V1_PASSWORD + struct.pack(">I", 34) + b"\x01A"):

        async def hang_up(stream: trio.SocketStream, prefix: bytes = prefix) -> None:
            await stream.send_all(prefix)
            await stream.aclose()

        error, took = await hostile_peer(hang_up, mesh_key=key("s3cret"))
        assert error.reason == "connection closed during handshake"
        assert took < 2


@trio_test
async def test_eof_mid_frame_after_the_handshake_is_channel_closed() -> None:
    dialler, accepted = await tcp_pair()
    _, ours = await both(
        lambda: dialler.send_all(HEADER_V1_PLAIN + struct.pack(">I", 0)),
        lambda: handshake(accepted, outbound=False, intro=INTRO_B, mesh_key=None),
    )
    channel: MeshChannel = ours.unwrap()
    await dialler.send_all(struct.pack(">I", 100) + b"only ten b")
    await dialler.aclose()
    with trio.fail_after(2), pytest.raises(ChannelClosed, match="mid-frame"):
        await channel.receive()


# --- a man in the middle --------------------------------------------------------------------------


async def proxy_pair(
    rewrite: Callable[[bytes], bytes],
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A TCP pair whose dialler→acceptor bytes pass through `rewrite` on the way (in a system task
    that ends when either side closes)."""
    near_dialler, near_acceptor = await tcp_pair()
    far_dialler, far_acceptor = await tcp_pair()

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, fn: Callable[[bytes], bytes]) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(fn(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(dst)

    async def run_proxy() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, near_acceptor, far_dialler, rewrite)
            nursery.start_soon(pump, far_dialler, near_acceptor, lambda d: d)

    trio.lowlevel.spawn_system_task(run_proxy)
    return near_dialler, far_acceptor


class Tamper:
    """Once armed, rewrites the dialler's byte stream: flip one byte, or deliver a frame twice."""

    def __init__(self) -> None:
        self.armed = False
        self.flip_at: int | None = None
        self.replay_len: int | None = None
        self._seen = 0
        self._held = bytearray()

    def __call__(self, data: bytes) -> bytes:
        if not self.armed:
            return data
        if self.flip_at is not None and self._seen <= self.flip_at < self._seen + len(data):
            data = bytearray(data)
            data[self.flip_at - self._seen] ^= 0x40
            data = bytes(data)
        self._seen += len(data)
        if self.replay_len is not None:
            self._held += data
            if len(self._held) < self.replay_len:
                return b""
            frame, rest = bytes(self._held[: self.replay_len]), bytes(self._held[self.replay_len :])
            self.replay_len = None
            return frame + frame + rest
        return data


async def tampered_channels(tamper: Tamper) -> tuple[MeshChannel, MeshChannel]:
    dialler, acceptor = await proxy_pair(tamper)
    a, b = await both(
        lambda: handshake(dialler, outbound=True, intro=INTRO_A, mesh_key=key("s3cret")),
        lambda: handshake(acceptor, outbound=False, intro=INTRO_B, mesh_key=key("s3cret")),
    )
    tamper.armed = True
    return a.unwrap(), b.unwrap()


@trio_test
async def test_tampered_ciphertext_closes_the_channel() -> None:
    tamper = Tamper()
    tamper.flip_at = 500  # inside the ciphertext of the next message
    chan_a, chan_b = await tampered_channels(tamper)
    await chan_a.send(b"m" * 1000)
    with pytest.raises(ChannelClosed) as caught:
        await chan_b.receive()
    assert caught.value.reason == "message failed authentication"


@trio_test
async def test_a_replayed_frame_closes_the_channel() -> None:
    tamper = Tamper()
    tamper.replay_len = 4 + 100 + 16
    chan_a, chan_b = await tampered_channels(tamper)
    await chan_a.send(b"r" * 100)
    assert await chan_b.receive() == b"r" * 100
    with pytest.raises(ChannelClosed) as caught:
        await chan_b.receive()
    assert caught.value.reason == "message failed authentication"


@trio_test
async def test_a_tampered_handshake_fails_on_both_sides() -> None:
    # Flip a bit in the dialler's protocol header: the transcripts differ, so nothing connects.
    flip_mode_bit = Tamper()
    flip_mode_bit.armed = True
    flip_mode_bit.flip_at = 9  # max version 1 -> 0x41: a downgrade/upgrade attempt
    dialler, acceptor = await proxy_pair(flip_mode_bit)
    a, b = await both(
        lambda: handshake(dialler, outbound=True, intro=INTRO_A, mesh_key=key("s3cret")),
        lambda: handshake(acceptor, outbound=False, intro=INTRO_B, mesh_key=key("s3cret")),
    )
    assert a.error is not None and b.error is not None
    assert reason_of(b) == "password mismatch"
