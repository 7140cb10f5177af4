"""Peer names: 48-bit identifiers written like MAC addresses, as Weave Net users know them.

Pure value type; no I/O.
"""

from __future__ import annotations

import re
import secrets

_MAX = (1 << 48) - 1
_HEX_GROUP = re.compile(r"^[0-9a-fA-F]{1,2}$")


class PeerName(int):
    """A peer's stable name: a 48-bit value shown as `aa:bb:cc:dd:ee:ff`."""

    def __new__(cls, value: int) -> PeerName:
        if not 0 < value <= _MAX:
            raise ValueError(f"peer name out of range: {value:#x} (must be a non-zero 48-bit value)")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> PeerName:
        """Parse `aa:bb:cc:dd:ee:ff`; `::` stands for a run of zero groups, as in Weave Net (`::1`)."""
        text = text.strip()
        if text.count("::") > 1:
            raise ValueError(f"invalid peer name {text!r}: '::' may appear once")
        if "::" in text:
            head, tail = text.split("::")
            head_groups = head.split(":") if head else []
            tail_groups = tail.split(":") if tail else []
            missing = 6 - len(head_groups) - len(tail_groups)
            if missing < 1:
                raise ValueError(f"invalid peer name {text!r}: too many groups")
            groups = head_groups + ["0"] * missing + tail_groups
        else:
            groups = text.split(":")
        if len(groups) != 6 or not all(_HEX_GROUP.match(g) for g in groups):
            raise ValueError(f"invalid peer name {text!r}: expected six hex groups like aa:bb:cc:dd:ee:ff")
        value = 0
        for group in groups:
            value = (value << 8) | int(group, 16)
        if value == 0:
            raise ValueError(f"invalid peer name {text!r}: must not be all zeros")
        return cls(value)

    @classmethod
    def random(cls) -> PeerName:
        """A fresh random name with the locally-administered bit set and the multicast bit clear."""
        raw = bytearray(secrets.token_bytes(6))
        raw[0] = (raw[0] | 0x02) & 0xFE
        return cls(int.from_bytes(raw, "big"))

    def __str__(self) -> str:
        return ":".join(f"{b:02x}" for b in int(self).to_bytes(6, "big"))

    def __repr__(self) -> str:
        return f"PeerName({self})"
