"""The kernel fast path's pieces that need no kernel: heartbeat frames, MAC announcements, the MAC
table's conflict rules, and the path judgement's reasons. The whole path, with real devices and
packets, is in test_kernel_path_lab.py."""

from __future__ import annotations

import contextlib
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from weavenet.config import ConfigError, OneLineErrorParser, Settings, add_launch_arguments, settings_from
from weavenet.net import kernel_heartbeat, peer_macs
from weavenet.net.kernel_heartbeat import Heartbeat, HeartbeatError, heartbeat_mac
from weavenet.net.peer_macs import Announcement, AnnouncementError, PeerMacs

US, THEM = 0x0A0000000001, 0x0A0000000002


# --- heartbeats ---


def test_a_heartbeat_is_padded_to_the_overlay_mtu_and_reads_back() -> None:
    beat = Heartbeat(THEM, US, conn_uid=77, seq=5, heard=4)
    frame = beat.frame(1420)
    assert len(frame) == 14 + 1420
    assert frame[:6] == bytes.fromhex(heartbeat_mac(US).replace(":", ""))
    assert kernel_heartbeat.parse(frame, receiver=US) == beat


def test_heartbeat_macs_are_unicast_local_distinct_and_not_the_peer_name() -> None:
    macs = {heartbeat_mac(peer) for peer in (US, THEM, 0xFFFFFFFFFFFF, 1)}
    assert len(macs) == 4
    for mac in macs:
        first = int(mac[:2], 16)
        assert first & 1 == 0 and first & 2 == 2, mac
    assert heartbeat_mac(US).replace(":", "") != f"{US:012x}"


@pytest.mark.parametrize(
    ("mangle", "why"),
    [
        (lambda f: f[:20], "shorter"),
        (lambda f: f[:12] + b"\x08\x00" + f[14:], "ethertype"),
        (lambda f: f[:14] + b"XXXX" + f[18:], "magic"),
        (lambda f: f[:18] + b"\x09" + f[19:], "version"),
        (lambda f: f[:27] + struct.pack("!Q", THEM) + f[35:], "not us"),
        (lambda f: bytes(6) + f[6:], "another MAC"),
    ],
)
def test_frames_that_are_not_our_heartbeats_are_refused_with_the_reason(mangle, why: str) -> None:
    frame = Heartbeat(THEM, US, 1, 1, 0).frame(100)
    with pytest.raises(HeartbeatError, match=why):
        kernel_heartbeat.parse(mangle(frame), receiver=US)


@given(st.binary(max_size=200))
def test_garbage_never_passes_as_a_heartbeat(data: bytes) -> None:
    try:
        beat = kernel_heartbeat.parse(data, receiver=US)
    except HeartbeatError:
        return
    assert beat.receiver == US  # only a well-formed frame for us could get here


# --- MAC announcements ---

MACS = st.builds(lambda b: (bytes([b[0] & 0xFE]) + b[1:]).hex(":"), st.binary(min_size=6, max_size=6))


@given(st.booleans(), st.frozensets(MACS, max_size=50), st.frozensets(MACS, max_size=50))
def test_announcements_round_trip(full: bool, added: frozenset[str], removed: frozenset[str]) -> None:
    announcement = Announcement(full, added, removed)
    assert peer_macs.decode(peer_macs.encode(announcement)) == announcement


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\xc1", "undecodable"),
        (msgpack.packb([1, 2]), "version"),
        (msgpack.packb({"v": 2, "full": True}), "version"),
        (msgpack.packb({"v": 1, "full": "yes"}), "types"),
        (msgpack.packb({"v": 1, "full": True, "add": [b"12345"]}), "6 bytes"),
        (msgpack.packb({"v": 1, "full": True, "add": [b"\x01\x00\x5e\x00\x00\x01"]}), "unicast"),
        (msgpack.packb({"v": 1, "full": True, "add": [bytes(6)] * (peer_macs.MAX_PER_MESSAGE + 1)}), "undecodable"),
    ],
)
def test_bad_announcements_are_refused_with_the_reason(payload: bytes, why: str) -> None:
    with pytest.raises(AnnouncementError, match=why):
        peer_macs.decode(payload)


@given(st.binary(max_size=300))
def test_garbage_announcements_raise_only_announcement_errors(data: bytes) -> None:
    with contextlib.suppress(AnnouncementError):
        peer_macs.decode(data)


def test_a_large_set_is_split_and_the_first_part_alone_says_full() -> None:
    added = {f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(peer_macs.MAX_PER_MESSAGE + 10)}
    parts = list(peer_macs.announcements(True, added))
    assert [p.full for p in parts] == [True, False]
    assert set().union(*(p.added for p in parts)) == added
    table = PeerMacs()
    for part in parts:
        table.apply(THEM, part)
    assert table.of(THEM) == added


def test_an_empty_full_set_still_makes_one_message() -> None:
    assert list(peer_macs.announcements(True, set())) == [Announcement(True, frozenset(), frozenset())]


A, B, C = 1, 2, 3
M1, M2 = "02:00:00:00:00:01", "02:00:00:00:00:02"


def test_the_newest_claim_wins_and_a_withdrawal_returns_the_mac_to_the_other_claimant() -> None:
    table = PeerMacs()
    table.apply(A, Announcement(True, frozenset({M1, M2})))
    table.apply(B, Announcement(True, frozenset({M1})))  # M1 moved to B
    assert table.owners({A, B}, set()) == {M1: B, M2: A}
    table.apply(B, Announcement(False, frozenset(), frozenset({M1})))
    assert table.owners({A, B}, set()) == {M1: A, M2: A}


def test_a_mac_that_moved_to_a_sleeve_peer_is_not_pinned_to_the_old_fastdp_peer() -> None:
    table = PeerMacs()
    table.apply(A, Announcement(True, frozenset({M1})))
    table.apply(C, Announcement(True, frozenset({M1})))
    assert table.owners({A}, set()) == {}  # C (not on fastdp) holds it now: the TAP learns it


def test_our_own_macs_are_never_pinned_away_and_a_full_set_replaces_the_old_one() -> None:
    table = PeerMacs()
    table.apply(A, Announcement(True, frozenset({M1, M2})))
    assert table.owners({A}, {M1}) == {M2: A}
    table.apply(A, Announcement(True, frozenset({M1})))
    assert table.of(A) == {M1}
    table.drop(A)
    assert table.owners({A}, set()) == {}


def test_a_peer_cannot_announce_more_than_the_limit_and_keeps_what_it_had() -> None:
    table = PeerMacs()
    table.apply(A, Announcement(True, frozenset({M1})))
    many = frozenset(
        f"02:00:00:{i >> 16:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
        for i in range(0x10000, 0x10000 + peer_macs.MAX_PER_PEER)
    )
    with pytest.raises(AnnouncementError, match="more than"):
        table.apply(A, Announcement(False, many))
    assert table.of(A) == {M1}


# --- settings ---


def parse_launch(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    parser = OneLineErrorParser(prog="weavenet launch")
    add_launch_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_kernel_port_follows_the_mesh_port_and_can_be_set() -> None:
    assert parse_launch([]).kernel_port == 6784
    assert parse_launch(["--port", "7000"]).kernel_port == 7001
    assert parse_launch(["--kernel-port", "4789"]).kernel_port == 4789
    assert parse_launch([], env={"WEAVE_KERNEL_PORT": "4790"}).kernel_port == 4790


def test_no_fastdp_keeps_the_userspace_datapath_and_no_datapath_drops_both() -> None:
    plain = parse_launch([])
    assert plain.datapath and plain.fastdp
    sleeve_only = parse_launch(["--no-fastdp"])
    assert sleeve_only.datapath and not sleeve_only.fastdp
    assert not parse_launch([], env={"WEAVE_NO_FASTDP": "true"}).fastdp
    control_only = parse_launch(["--no-datapath"])
    assert not control_only.datapath


def test_a_kernel_port_equal_to_the_datapath_port_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--kernel-port.*6783"):
        parse_launch(["--kernel-port", "6783"])
    with pytest.raises(ConfigError, match="WEAVE_KERNEL_PORT"):
        parse_launch([], env={"WEAVE_KERNEL_PORT": "0"})
