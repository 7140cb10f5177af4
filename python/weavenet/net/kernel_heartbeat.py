"""Heartbeats across the kernel fast path: proof, per peer and direction, that full-size frames pass.

A heartbeat is an Ethernet frame of the overlay MTU (ethertype 0x88B5, IEEE's local experimental
one) sent from the bridge's own stack to the peer's heartbeat MAC, which is pinned to the VXLAN port
like any peer MAC, so it takes the very path container frames take (bridge → VXLAN → underlay,
outer DF set). At the receiver the heartbeat MAC is a local entry of the bridge: the frame goes up
to the bridge's stack, where a packet socket bound to that ethertype reads it; no container port
ever sees one. Each heartbeat says which of the receiver's heartbeats the sender heard last, so one
side knows both directions work when it hears the other say it hears it (Weave Net acknowledged
over TCP instead). Few frames a second per peer: the router's loop reads and writes them itself.
Everything received is checked (size, magic, version, addressee) before it counts.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ETHERTYPE = 0x88B5
MAGIC = b"WNKH"
VERSION = 1
# magic, version, sender peer, receiver peer, connection uid, our sequence, last sequence heard from the receiver
_BODY = struct.Struct("!4sBQQQII")
HEADER = 14 + _BODY.size
MIN_FRAME = HEADER


class HeartbeatError(ValueError):
    """A frame that is not a heartbeat for us; the message says what was wrong."""


def heartbeat_mac(peer: int) -> str:
    """A peer's heartbeat MAC: unicast, locally administered, derived from the 48-bit peer name so
    every peer can compute every other's (and never equal to the name itself)."""
    value = ((peer ^ 0x5A5A5A5A5A5A) & 0xFEFFFFFFFFFF) | 0x020000000000
    raw = value.to_bytes(6, "big")
    return ":".join(f"{b:02x}" for b in raw)


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


@dataclass(frozen=True)
class Heartbeat:
    sender: int
    receiver: int
    conn_uid: int
    seq: int
    heard: int  # the last sequence number the sender received from the receiver (0: none yet)

    def frame(self, size: int) -> bytes:
        """The frame, padded to `size` bytes of Ethernet payload (the overlay MTU)."""
        head = _mac_bytes(heartbeat_mac(self.receiver)) + _mac_bytes(heartbeat_mac(self.sender))
        body = _BODY.pack(MAGIC, VERSION, self.sender, self.receiver, self.conn_uid, self.seq, self.heard)
        frame = head + struct.pack("!H", ETHERTYPE) + body
        return frame + bytes(max(0, 14 + size - len(frame)))


def parse(frame: bytes, *, receiver: int) -> Heartbeat:
    """Decode a received frame addressed to `receiver` (us). Raises HeartbeatError."""
    if len(frame) < MIN_FRAME:
        raise HeartbeatError(f"frame of {len(frame)} bytes is shorter than a heartbeat")
    if struct.unpack_from("!H", frame, 12)[0] != ETHERTYPE:
        raise HeartbeatError("not a heartbeat ethertype")
    magic, version, sender, to, conn_uid, seq, heard = _BODY.unpack_from(frame, 14)
    if magic != MAGIC:
        raise HeartbeatError("bad heartbeat magic")
    if version != VERSION:
        raise HeartbeatError(f"heartbeat version {version} (we speak {VERSION})")
    if to != receiver:
        raise HeartbeatError(f"heartbeat for peer {to:012x}, not us")
    if frame[:6] != _mac_bytes(heartbeat_mac(receiver)):
        raise HeartbeatError("heartbeat sent to another MAC")
    return Heartbeat(sender, to, conn_uid, seq, heard)


def open_socket(bridge: str) -> socket.socket:
    """A non-blocking packet socket on the bridge's own stack for heartbeat frames only."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.htons(ETHERTYPE))
    try:
        sock.bind((bridge, ETHERTYPE))
    except OSError:
        sock.close()
        raise
    return sock
