"""What a mesh connection costs: the password handshake, and the encrypted channel's throughput.

Gates are same-run ratios (benches/ratio.py); absolute numbers are printed and stored in
pytest-benchmark's extra_info, never asserted:
- the whole in-memory handshake (SPAKE2 + Noise, both sides, in Rust) must be at least 20x cheaper
  than one Argon2id derivation, which runs once per router start and never per connection;
- sealing and opening 1 MiB must cost at most about 7 BLAKE2b passes over it (hashlib, same run),
  so the channel's crypto can stay inline on the trio loop;
- a password handshake over real TCP must cost at most 5x a plain one (same run, same sockets).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import trio

from benches.ratio import assert_speedup
from weavenet._fastdp import ChannelCipher, MeshHandshake, MeshKey
from weavenet.mesh.handshake import handshake

PASSWORD = b"correct horse battery staple"
HEADERS = b"weavenet\x01\x01\x01" * 2
MIB = 1 << 20
_KEY = MeshKey.from_password(PASSWORD)


def in_memory_handshake() -> tuple[ChannelCipher, ChannelCipher]:
    """Both sides of one password handshake, bodies handed across in memory."""
    dialler = MeshHandshake(_KEY, initiator=True, intro=b"a" * 100, prologue=HEADERS)
    acceptor = MeshHandshake(_KEY, initiator=False, intro=b"b" * 100, prologue=HEADERS)
    pake_d, pake_a = dialler.write_message(), acceptor.write_message()
    assert pake_d is not None and pake_a is not None
    acceptor.read_message(pake_d)
    dialler.read_message(pake_a)
    first = dialler.write_message()
    assert first is not None
    acceptor.read_message(first)
    second = acceptor.write_message()
    assert second is not None
    dialler.read_message(second)
    (cipher_d, _, _), (cipher_a, _, _) = dialler.finish(), acceptor.finish()
    return cipher_d, cipher_a


def test_full_handshake_is_cheap_next_to_the_password_kdf(benchmark: Any) -> None:
    result = assert_speedup(
        benchmark,
        in_memory_handshake,
        lambda: MeshKey.from_password(PASSWORD),
        at_least=20.0,
        label="SPAKE2+Noise handshake (both sides) vs one Argon2id derivation",
    )
    benchmark.extra_info["handshakes_per_s"] = round(1 / result.ours_s)
    benchmark.extra_info["argon2id_s"] = round(result.reference_s, 4)
    print(f"handshakes/s (both sides, in memory): {1 / result.ours_s:.0f}; Argon2id: {result.reference_s:.3f} s")


def test_channel_seal_and_open_of_one_mebibyte(benchmark: Any) -> None:
    sender, receiver = in_memory_handshake()
    message = os.urandom(MIB)

    def seal_open() -> bytes:
        return receiver.open(sender.seal(message))

    assert seal_open() == message
    result = assert_speedup(
        benchmark,
        seal_open,
        lambda: hashlib.blake2b(message).digest(),
        at_least=0.15,
        label="seal+open 1 MiB vs BLAKE2b of 1 MiB",
    )
    benchmark.extra_info["seal_open_MB_per_s"] = round(1 / result.ours_s)
    print(f"encrypted channel seal+open: {1 / result.ours_s:.0f} MiB/s ({result.ours_s * 1e3:.2f} ms per MiB)")


async def _tcp_handshake(mesh_key: MeshKey | None) -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with listener:
        dialler = await trio.open_tcp_stream("127.0.0.1", port)
        acceptor = await listener.accept()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handshake(dialler, outbound=True, intro=b"a", mesh_key=mesh_key))
        await handshake(acceptor, outbound=False, intro=b"b", mesh_key=mesh_key)
    await dialler.aclose()
    await acceptor.aclose()


def test_password_handshake_over_tcp_against_a_plain_one(benchmark: Any) -> None:
    result = assert_speedup(
        benchmark,
        lambda: trio.run(_tcp_handshake, _KEY),
        lambda: trio.run(_tcp_handshake, None),
        at_least=0.2,
        label="password handshake over TCP vs plain handshake over TCP",
    )
    benchmark.extra_info["tcp_password_handshakes_per_s"] = round(1 / result.ours_s)
    print(f"over TCP (connect + both sides): password {1 / result.ours_s:.0f}/s, plain {1 / result.reference_s:.0f}/s")
