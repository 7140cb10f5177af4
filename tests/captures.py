"""Packet captures in lab namespaces: tcpdump to a pcap file, read back as plain tuples.

`capture` waits until tcpdump really listens (it writes the pcap header only then); `stop_capture`
waits until tcpdump has written everything it saw (it flushes on exit). The readers understand just
what the tests need: Ethernet frames, IPv4, UDP and VXLAN.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.lab import LabProcess, Namespace, wait_until


def capture(where: Namespace, interface: str, path: Path, bpf: Sequence[str]) -> LabProcess:
    process = where.start(
        # -B: a burst must not overflow the capture buffer (a frame the capture missed is no frame lost)
        ["tcpdump", "-i", interface, "--immediate-mode", "-U", "-n", "-s", "0", "-B", "8192", "-w", str(path), *bpf],
        name=f"tcpdump-{path.stem}",
    )
    wait_until(lambda: path.exists() and path.stat().st_size > 0, timeout=10, message=f"tcpdump on {interface}")
    return process


def stop_capture(process: LabProcess) -> None:
    process.stop(timeout=10.0)  # SIGTERM: tcpdump writes out what it has, then exits


def frames(path: Path) -> Iterator[bytes]:
    """Every complete Ethernet frame in a pcap file."""
    data = path.read_bytes()
    offset = 24
    while offset + 16 <= len(data):
        _, _, caplen, _ = struct.unpack_from("<IIII", data, offset)
        if offset + 16 + caplen > len(data):
            return  # a record tcpdump was still writing
        yield data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen


@dataclass(frozen=True)
class Datagram:
    source: str
    destination: str
    sport: int
    dport: int
    payload: bytes


def udp(frame: bytes) -> Datagram | None:
    """The IPv4/UDP datagram in an Ethernet frame, if it is one."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
    return Datagram(socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), sport, dport, frame[14 + ihl + 8 :])


def datagrams(path: Path) -> list[Datagram]:
    return [d for frame in frames(path) if (d := udp(frame)) is not None]


def vxlan_inner(payload: bytes) -> tuple[int, bytes] | None:
    """(VNI, inner Ethernet frame) of a VXLAN payload."""
    if len(payload) < 8 + 14 or payload[0] & 0x08 == 0:
        return None
    return int.from_bytes(payload[4:7], "big"), payload[8:]


def vxlan_packet(vni: int, inner: bytes) -> bytes:
    """A VXLAN payload (flags with the VNI bit, VNI) around an inner Ethernet frame."""
    return bytes([0x08, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\x00" + inner


def ethernet_udp(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, dport: int, payload: bytes) -> bytes:
    """An Ethernet frame carrying IPv4/UDP (checksums right, so a receiver's stack accepts it)."""
    udp_header = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0)
    total = 20 + len(udp_header) + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0, socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    )
    checksum = _checksum(header)
    header = header[:10] + struct.pack("!H", checksum) + header[12:]
    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    return mac(dst_mac) + mac(src_mac) + b"\x08\x00" + header + udp_header + payload


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
