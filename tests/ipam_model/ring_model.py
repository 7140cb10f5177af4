"""Reference model of the IPAM ring, in plain Python, for differential tests only.

Written for clarity, not speed: it states what `weavenet._fastdp.Ring` must do in the most direct
form (dicts, sets, address-by-address scans), and tests require the Rust ring to agree with it
after every operation. Same semantics, same tie-break, same encoding; never used in production.

The rules, in brief (rust/fastdp/src/ring/ has the long form):
- Entry i owns [token_i, token_{i+1}); the last entry wraps round to the first token.
- Each entry carries two clocks: `version` (ownership changes: grant +1, transfer +100) and
  `free_seq` (free-hint reports since the last ownership change).
- Merge = union of tokens; per token keep the entry with the greatest
  (version, owner, free_seq, free); then cap every free hint at its range size.
- After every local operation (not after a merge), our own entries' free hints are exact, bumping
  `free_seq` where they change; `report_free` does the same on demand.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

MAX_PEER = (1 << 48) - 1
MAX_CLOCK = (1 << 53) - 1
ADDRESS_SPACE_END = 1 << 32
TRANSFER_BUMP = 100
FORMAT_VERSION = 1
MAGIC = b"WR"


class ModelError(ValueError):
    """Refused operation (the Rust `RingError`)."""


class ModelMismatchError(ModelError):
    """Merge refused: other range or other cluster (the Rust `RingMismatchError`)."""


class ModelDecodeError(ModelError):
    """Bad encoding (the Rust `RingDecodeError`)."""


@dataclass(frozen=True)
class Entry:
    token: int
    owner: int
    version: int
    free_seq: int
    free: int

    def precedence(self) -> tuple[int, int, int, int]:
        return (self.version, self.owner, self.free_seq, self.free)


def check_peer(peer: int) -> int:
    if not 0 < peer <= MAX_PEER:
        raise ModelError(f"invalid peer name {peer:#x}")
    return peer


def cluster_id_for_seed(peers: list[int]) -> int:
    """FNV-1a 64 over a domain tag and each (sorted, unique) name as 6 big-endian bytes; never 0."""
    h = 0xCBF29CE484222325
    data = b"weavenet-ring-seed-v1" + b"".join(p.to_bytes(6, "big") for p in peers)
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    return max(h, 1)


def biggest_cidr(start: int, end: int) -> tuple[int, int]:
    size = end - start
    m = 1
    while m * 2 <= size:
        m *= 2
    if start % m == 0:
        return (start, start + m)
    boundary = (start // m + 1) * m
    if boundary + m <= end:
        return (boundary, boundary + m)
    half = m // 2
    aligned = -(-start // half) * half
    return (aligned, aligned + half)


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and out[-1][1] >= s:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


class ModelRing:
    def __init__(self, start: int, end: int, peer: int, cluster_id: int = 0) -> None:
        if not 0 <= start < end <= ADDRESS_SPACE_END:
            raise ModelError("invalid address range")
        self.start = start
        self.end = end
        self.peer = check_peer(peer)
        self.cluster_id = cluster_id
        self.entries: list[Entry] = []
        self.allocated: set[int] = set()

    # ----- geometry -------------------------------------------------------------------------

    def copy(self) -> ModelRing:
        other = ModelRing(self.start, self.end, self.peer, self.cluster_id)
        other.entries = list(self.entries)
        other.allocated = set(self.allocated)
        return other

    def dist(self, a: int, b: int) -> int:
        return b - a if b > a else (self.end - a) + (b - self.start)

    def size_of(self, i: int) -> int:
        return self.dist(self.entries[i].token, self.entries[(i + 1) % len(self.entries)].token)

    def pieces(self, i: int) -> list[tuple[int, int]]:
        """Entry i's addresses as linear ranges (the last entry wraps past the end)."""
        token = self.entries[i].token
        if i + 1 < len(self.entries):
            return [(token, self.entries[i + 1].token)]
        out = [(token, self.end)]
        if self.entries[0].token > self.start:
            out.append((self.start, self.entries[0].token))
        return out

    def index_of(self, addr: int) -> int:
        """The entry owning addr: greatest token <= addr, else the last entry (wrap)."""
        best = len(self.entries) - 1
        for i, e in enumerate(self.entries):
            if e.token <= addr:
                best = i
        return best

    def owner(self, addr: int) -> int | None:
        if not self.entries or not self.start <= addr < self.end:
            return None
        return self.entries[self.index_of(addr)].owner

    def owned_ranges(self, peer: int | None = None) -> list[tuple[int, int]]:
        peer = self.peer if peer is None else peer
        ranges = [p for i, e in enumerate(self.entries) if e.owner == peer for p in self.pieces(i)]
        return coalesce(ranges)

    def peers(self) -> list[int]:
        return sorted({e.owner for e in self.entries})

    def free_by_owner(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for e in self.entries:
            out[e.owner] = out.get(e.owner, 0) + e.free
        return out

    def size_by_owner(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for i, e in enumerate(self.entries):
            out[e.owner] = out.get(e.owner, 0) + self.size_of(i)
        return out

    def clip(self, start: int, end: int) -> tuple[int, int]:
        if not 0 <= start < end <= ADDRESS_SPACE_END:
            raise ModelError("invalid address range")
        s, e = max(start, self.start), min(end, self.end)
        if s >= e:
            raise ModelError("does not overlap the ring range")
        return s, e

    def is_ours(self, addr: int) -> bool:
        return self.owner(addr) == self.peer

    # ----- free hints -----------------------------------------------------------------------

    def exact_free(self, i: int) -> int:
        held = sum(1 for a in self.allocated for s, e in self.pieces(i) if s <= a < e)
        return self.size_of(i) - held

    def refresh_hints(self) -> bool:
        changed = False
        for i, e in enumerate(self.entries):
            if e.owner != self.peer:
                continue
            exact = self.exact_free(i)
            if e.free != exact:
                self.entries[i] = replace(e, free=exact, free_seq=min(e.free_seq + 1, MAX_CLOCK))
                changed = True
        return changed

    def report_free(self) -> bool:
        return self.refresh_hints()

    # ----- seeding, grant, transfer ---------------------------------------------------------

    def claim_for_peers(self, peers: list[int], cluster_id: int | None = None) -> None:
        if self.entries:
            raise ModelError("already initialised")
        seed = sorted({check_peer(p) for p in peers})
        if not seed:
            raise ModelError("needs a seed peer")
        cid = cluster_id_for_seed(seed) if cluster_id is None else cluster_id
        if cid == 0:
            raise ModelError("cluster id must be non-zero")
        if self.cluster_id not in (0, cid):
            raise ModelMismatchError("cluster mismatch")

        def subdivide(lo: int, hi: int, group: list[int]) -> None:
            share = hi - lo
            if share == 1 or len(group) == 1:
                self.entries.append(Entry(lo, group[0], 0, 0, share))
                return
            mid = lo + share // 2
            half = len(group) // 2
            subdivide(lo, mid, group[:half])
            subdivide(mid, hi, group[half:])

        subdivide(self.start, self.end, seed)
        self.cluster_id = cid
        self.refresh_hints()

    def insert(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.entries.sort(key=lambda e: e.token)

    def has_token(self, token: int) -> bool:
        return any(e.token == token for e in self.entries)

    def grant(self, start: int, end: int, to: int) -> None:
        check_peer(to)
        if not 0 <= start < end <= ADDRESS_SPACE_END:
            raise ModelError("invalid address range")
        if not (self.start <= start and end <= self.end):
            raise ModelError("outside the ring range")
        if to == self.peer:
            raise ModelError("cannot grant to ourselves")
        if not all(self.is_ours(a) for a in range(start, end)):
            raise ModelError("we do not own all of it")
        if any(a in self.allocated for a in range(start, end)):
            raise ModelError("allocated addresses in it")
        for e in self.entries:
            if start <= e.token < end and e.version + 1 > MAX_CLOCK:
                raise ModelError("version overflow")
        # 1. The start token: inserted for the grantee unless present.
        if not self.has_token(start):
            self.insert(Entry(start, to, 0, 0, 0))
        # 2. Every token in [start, end) changes owner.
        for i, e in enumerate(self.entries):
            if start <= e.token < end and e.owner != to:
                self.entries[i] = replace(e, owner=to, version=e.version + 1, free_seq=0)
        # 3. A token at end (wrapping to the start) keeps the rest ours.
        end_token = self.start if end == self.end else end
        if not self.has_token(end_token):
            self.insert(Entry(end_token, self.peer, 0, 0, 0))
        for i, e in enumerate(self.entries):
            if start <= e.token < end:
                self.entries[i] = replace(e, free=self.size_of(i))
        self.refresh_hints()

    def transfer(self, from_peer: int, to_peer: int) -> list[tuple[int, int]]:
        check_peer(from_peer)
        check_peer(to_peer)
        if from_peer == to_peer:
            self.refresh_hints()
            return []
        moved = [i for i, e in enumerate(self.entries) if e.owner == from_peer]
        if any(self.entries[i].version + TRANSFER_BUMP > MAX_CLOCK for i in moved):
            raise ModelError("version overflow")
        ranges = [p for i in moved for p in self.pieces(i)]
        for i in moved:
            e = self.entries[i]
            self.entries[i] = replace(e, owner=to_peer, version=e.version + TRANSFER_BUMP, free_seq=0)
        self.refresh_hints()
        return coalesce(ranges)

    # ----- merge ----------------------------------------------------------------------------

    def merge(self, other: ModelRing) -> bool:
        if (self.start, self.end) != (other.start, other.end):
            raise ModelMismatchError("range mismatch")
        if self.cluster_id and other.cluster_id and self.cluster_id != other.cluster_id:
            raise ModelMismatchError("cluster mismatch")
        by_token = {e.token: e for e in self.entries}
        for e in other.entries:
            mine = by_token.get(e.token)
            if mine is None or e.precedence() > mine.precedence():
                by_token[e.token] = e
        merged = [by_token[t] for t in sorted(by_token)]
        probe = self.copy()
        probe.entries = merged
        merged = [replace(e, free=min(e.free, probe.size_of(i))) for i, e in enumerate(merged)]
        changed = merged != self.entries
        self.entries = merged
        if not self.cluster_id and other.cluster_id:
            self.cluster_id = other.cluster_id
            changed = True
        return changed

    # ----- allocations ----------------------------------------------------------------------

    def allocate(self, start: int | None = None, end: int | None = None) -> int | None:
        s, e = self.clip(self.start if start is None else start, self.end if end is None else end)
        found = None
        for lo, hi in self.owned_ranges():
            for addr in range(max(lo, s), min(hi, e)):
                if addr not in self.allocated:
                    found = addr
                    break
            if found is not None:
                break
        if found is not None:
            self.allocated.add(found)
        self.refresh_hints()
        return found

    def check_inside(self, addr: int) -> None:
        if not self.start <= addr < self.end:
            raise ModelError("outside the ring range")

    def claim_address(self, addr: int) -> bool:
        self.check_inside(addr)
        if not self.entries:
            raise ModelError("not initialised")
        if not self.is_ours(addr):
            raise ModelError("owned by another peer")
        claimed = addr not in self.allocated
        self.allocated.add(addr)
        self.refresh_hints()
        return claimed

    def release(self, addr: int) -> bool:
        self.check_inside(addr)
        was = addr in self.allocated
        self.allocated.discard(addr)
        self.refresh_hints()
        return was

    def is_allocated(self, addr: int) -> bool:
        return addr in self.allocated

    def allocated_ranges(self) -> list[tuple[int, int]]:
        return coalesce([(a, a + 1) for a in self.allocated])

    def clear_allocations(self) -> None:
        self.allocated.clear()
        self.refresh_hints()

    def free_count(self, start: int | None = None, end: int | None = None) -> int:
        s, e = self.clip(self.start if start is None else start, self.end if end is None else end)
        return sum(1 for a in range(s, e) if self.is_ours(a) and a not in self.allocated)

    def disputed_ranges(self) -> list[tuple[int, int]]:
        return coalesce([(a, a + 1) for a in self.allocated if not self.is_ours(a)])

    def donate(self, start: int, end: int, to: int) -> tuple[int, int] | None:
        check_peer(to)
        if to == self.peer:
            raise ModelError("cannot donate to ourselves")
        s, e = self.clip(start, end)
        free = [a for a in range(s, e) if self.is_ours(a) and a not in self.allocated]
        chunks = coalesce([(a, a + 1) for a in free])
        best: tuple[int, int] | None = None
        for lo, hi in chunks:
            block = biggest_cidr(lo, hi)
            if best is None or block[1] - block[0] >= best[1] - best[0]:
                best = block
        if best is None:
            self.refresh_hints()
            return None
        size = best[1] - best[0]
        if size > 1 and 2 * size > len(free):
            best = (best[0] + size // 2, best[1])
        self.grant(best[0], best[1], to)
        return best

    def choose_donors(self, start: int | None = None, end: int | None = None) -> list[int]:
        s, e = self.clip(self.start if start is None else start, self.end if end is None else end)
        totals: dict[int, int] = {}
        for i, entry in enumerate(self.entries):
            if entry.owner == self.peer or entry.free == 0:
                continue
            overlap = sum(max(0, min(hi, e) - max(lo, s)) for lo, hi in self.pieces(i))
            if overlap > 0:
                totals[entry.owner] = totals.get(entry.owner, 0) + min(entry.free, overlap)
        return [peer for peer, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]

    # ----- status ---------------------------------------------------------------------------

    def entry_tuples(self) -> list[tuple[int, int, int, int, int, int]]:
        """(token, size, peer, version, free, free_seq), as `RingEntry.as_tuple()`."""
        return [(e.token, self.size_of(i), e.owner, e.version, e.free, e.free_seq) for i, e in enumerate(self.entries)]

    # ----- encoding -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        peers = self.peers()
        out = bytearray(MAGIC)
        out.append(FORMAT_VERSION)
        out += struct.pack(">II", self.start, self.end - 1)
        out += self.peer.to_bytes(6, "big")
        out += struct.pack(">Q", self.cluster_id)
        out += varint(len(peers))
        for p in peers:
            out += p.to_bytes(6, "big")
        out += varint(len(self.entries))
        prev = self.start
        for e in self.entries:
            for value in (e.token - prev, peers.index(e.owner), e.version, e.free_seq, e.free):
                out += varint(value)
            prev = e.token
        out += struct.pack(">I", zlib.crc32(out))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelRing:
        if len(data) < 25 + 2 + 4:
            raise ModelDecodeError("truncated")
        if data[:2] != MAGIC:
            raise ModelDecodeError("bad magic")
        if data[2] != FORMAT_VERSION:
            raise ModelDecodeError("unsupported version")
        body, crc = data[:-4], data[-4:]
        if zlib.crc32(body) != struct.unpack(">I", crc)[0]:
            raise ModelDecodeError("checksum mismatch")
        reader = _Reader(body, 3)
        start, last = struct.unpack(">II", reader.take(8))
        if last < start:
            raise ModelDecodeError("backwards range")
        peer = int.from_bytes(reader.take(6), "big")
        if peer == 0:
            raise ModelDecodeError("zero sender")
        (cluster_id,) = struct.unpack(">Q", reader.take(8))
        peers: list[int] = []
        for _ in range(reader.count(6)):
            p = int.from_bytes(reader.take(6), "big")
            if p == 0 or (peers and peers[-1] >= p):
                raise ModelDecodeError("bad peer table")
            peers.append(p)
        n = reader.count(5)
        if n > last + 1 - start:
            raise ModelDecodeError("too many entries")
        if n and cluster_id == 0:
            raise ModelDecodeError("no cluster id")
        ring = cls(start, last + 1, peer, cluster_id)
        used: set[int] = set()
        prev = start
        for i in range(n):
            delta = reader.varint()
            if i > 0 and delta == 0:
                raise ModelDecodeError("not sorted")
            token = prev + delta
            if token > last:
                raise ModelDecodeError("token outside")
            prev = token
            index = reader.varint()
            if index >= len(peers):
                raise ModelDecodeError("bad owner index")
            used.add(index)
            version, free_seq = reader.varint(), reader.varint()
            if version > MAX_CLOCK or free_seq > MAX_CLOCK:
                raise ModelDecodeError("clock too big")
            free = reader.varint()
            ring.entries.append(Entry(token, peers[index], version, free_seq, free))
        if reader.pos != len(body):
            raise ModelDecodeError("trailing bytes")
        if len(used) != len(peers):
            raise ModelDecodeError("unused peer")
        for i, e in enumerate(ring.entries):
            if e.free > ring.size_of(i):
                raise ModelDecodeError("free exceeds range")
        return ring

    # ----- invariants -----------------------------------------------------------------------

    def check(self) -> None:
        tokens = [e.token for e in self.entries]
        assert tokens == sorted(set(tokens)), "tokens not strictly sorted"
        assert all(self.start <= t < self.end for t in tokens), "token outside the range"
        for i, e in enumerate(self.entries):
            assert e.free <= self.size_of(i), "free hint above range size"
            assert 0 < e.owner <= MAX_PEER
        assert not self.entries or self.cluster_id != 0


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ModelDecodeError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def varint(self) -> int:
        value = 0
        for i in range(10):
            (byte,) = self.take(1)
            value |= (byte & 0x7F) << (7 * i)
            if byte & 0x80 == 0:
                if byte == 0 and i > 0:
                    raise ModelDecodeError("non-minimal varint")
                if value >= 1 << 64:
                    raise ModelDecodeError("varint overflow")
                return value
        raise ModelDecodeError("varint too long")

    def count(self, min_len: int) -> int:
        n = self.varint()
        if n > (len(self.data) - self.pos) // min_len:
            raise ModelDecodeError("count larger than the message")
        return n
