"""Typed stub for `weavenet._fastdp`, the Rust core (rust/fastdp). Hand-written: keep it in step with
the Rust `register` functions. Each domain has its own section."""

from collections.abc import Iterable

def core_version() -> str:
    """The version of the compiled core; the Python package checks it matches its own at import."""

# --- Mesh crypto ---
# rust/fastdp/src/crypto: password key (Argon2id), handshake (SPAKE2 then Noise NNpsk0), the
# control channel's AEAD and the per-connection data-plane keys. No key bytes ever reach Python.

NOISE_PATTERN: str
"""The Noise protocol name used after the PAKE: "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"."""
HANDSHAKE_MAX_MESSAGE: int
"""Largest handshake message body (bytes) either side may send; check the length prefix against it."""
HANDSHAKE_MAX_INTRO: int
"""Largest intro blob (bytes) carried in the handshake."""
CHANNEL_TAG_LEN: int
"""Bytes `ChannelCipher.seal` adds to each message (the Poly1305 tag)."""

class HandshakeError(ValueError):
    """The mesh handshake failed. `str()` is one line saying what was wrong and what to do."""

    reason: str
    """A short phrase for status and logs, e.g. "password mismatch", "malformed handshake message"."""

class ChannelError(ValueError):
    """A control message failed authentication (tampered, replayed, reordered, lost) or could not be
    sealed; the cipher is broken for good and the connection must be closed."""

class MeshKey:
    """The mesh key derived from WEAVE_PASSWORD. Opaque: the bytes cannot be read; repr shows nothing."""

    @staticmethod
    def from_password(password: bytes) -> MeshKey:
        """Argon2id (m=64 MiB, t=3, p=1, fixed versioned salt): ~0.1-0.3 s, GIL released. The same
        password gives the same key on every router. Raises ValueError for an empty password."""

class MeshHandshake:
    """One side of a connection's password handshake. The caller frames and moves the bodies:
    call `write_message` until it returns None, then `read_message` the peer's next body, until
    `is_complete`; then `finish`."""

    def __init__(self, mesh_key: MeshKey, *, initiator: bool, intro: bytes, prologue: bytes) -> None:
        """`initiator`: we dialled. `intro` travels encrypted (at most HANDSHAKE_MAX_INTRO bytes).
        `prologue` is bound into the transcript: both protocol headers, the initiator's first."""
    def write_message(self) -> bytes | None:
        """The next body to send, or None when it is the peer's turn (or the handshake is complete)."""
    def read_message(self, message: bytes) -> None:
        """Take the peer's next body. Raises HandshakeError (e.g. reason "password mismatch");
        after that, send `refusal()` if it is not None, then close."""
    @property
    def is_complete(self) -> bool:
        """Whether `finish` may be called."""
    @property
    def initiator(self) -> bool:
        """Whether we dialled."""
    def refusal(self) -> bytes | None:
        """After a failed `read_message`: a constant, non-secret body telling the peer why (a wrong
        password), so both sides report "password mismatch"; None if the peer need not hear."""
    def finish(self) -> tuple[ChannelCipher, DataKeys, bytes]:
        """The control-channel cipher, the data-plane keys and the peer's intro (once)."""

class ChannelCipher:
    """The control channel's ChaCha20-Poly1305 with per-direction keys and counter nonces."""

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt and authenticate our next message (any size up to 256 GiB; adds CHANNEL_TAG_LEN).
        Large messages are sealed with the GIL released."""
    def open(self, sealed: bytes) -> bytes:
        """Check and decrypt the peer's next message. Raises ChannelError on any failure, after
        which the cipher stays broken."""
    @property
    def broken(self) -> bool:
        """Whether a failure has killed this cipher."""

class DataKeys:
    """Per-direction 32-byte keys for the UDP datapath, unique to one connection, agreed by both ends
    (our tx = their rx), forward secret. Opaque: hand the object to the datapath."""

    def fingerprint(self) -> str:
        """16 hex digits, equal at both ends of the connection; reveals nothing about the keys."""
    @property
    def initiator(self) -> bool:
        """Whether our side dialled the connection."""

# --- IPAM ring ---
# rust/fastdp/src/ring: the allocation range divided among peers, replicated on every peer as a
# CRDT, plus this peer's own allocations. Addresses are IPv4 ints; ranges are [start, end) with
# end up to 2**32; peer names are non-zero 48-bit ints. Every method that raises leaves the ring
# unchanged. Reference model (tests only): tests/ipam_model/ring_model.py.

class RingError(ValueError):
    """A ring operation was refused (bad argument, range we do not own, ...); one-line message."""

class RingMismatchError(RingError):
    """Merge refused: the rings divide different ranges ("ring range mismatch: ours 10.32.0.0/12,
    theirs 10.40.0.0/16 ...") or were seeded by different clusters ("ring cluster mismatch: ...")."""

class RingDecodeError(RingError):
    """Bytes that are not a valid encoded ring ("invalid ring encoding: <what was wrong>")."""

class RingEntry:
    """One entry, for `/report` and `weavenet status ipam`. Frozen, hashable, comparable."""

    token: int
    """First address of the entry's range."""
    size: int
    """How many addresses the entry owns (up to the next token, wrapping at the end)."""
    peer: int
    """The owner's peer name."""
    version: int
    """Ownership clock: +1 per grant, +100 per transfer; new tokens start at 0."""
    free: int
    """The owner's last report of free addresses in the range (a hint, <= size)."""
    free_seq: int
    """How many free reports the owner made since the last ownership change."""

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        """(token, size, peer, version, free, free_seq)."""

class Ring:
    """One peer's replica of the IPAM ring and this peer's allocations inside its ranges.

    Entry i owns [token_i, token_{i+1}); the last entry wraps round to the first token. Merge is a
    join (commutative, associative, idempotent): per token the entry with the greatest
    (version, owner, free_seq, free) wins, so equal versions are decided by the higher peer name
    and every replica converges whatever order gossip arrives in. After every local operation
    (not after `merge`) our own entries' free hints are exact.
    """

    FORMAT_VERSION: int
    """The encoding version `to_bytes` writes and `from_bytes` reads (1)."""

    def __init__(self, start: int, end: int, peer: int, cluster_id: int = 0) -> None:
        """An empty (uninitialised) ring over [start, end) held by `peer` (us). `cluster_id` 0 means
        "adopt the first one seen"; pass one to refuse rings from any other cluster. Raises
        RingError for an empty or out-of-bounds range or an invalid peer name."""
    @staticmethod
    def from_bytes(data: bytes) -> Ring:
        """Decode gossip or persisted state, validating everything (magic, version, checksum,
        sorted unique tokens inside the range, free <= range, sane counts, canonical varints).
        `peer` is the sender's name; the ring has no allocations. Raises RingDecodeError."""
    def to_bytes(self) -> bytes:
        """The canonical encoding of the replicated state (range, our name, cluster, entries);
        allocations are not included. Equal states encode to equal bytes."""
    @staticmethod
    def cluster_id_for_seed(peers: Iterable[int]) -> int:
        """The cluster id that seeding with `peers` gives (order and duplicates do not matter)."""

    @property
    def start(self) -> int:
        """First address of the ring range."""
    @property
    def end(self) -> int:
        """One past the last address of the ring range (up to 2**32)."""
    @property
    def range_text(self) -> str:
        """The range for humans: "10.32.0.0/12", or "10.0.0.1-10.0.0.6" if it is not a CIDR."""
    @property
    def peer(self) -> int:
        """Our peer name (for a decoded ring: the sender's)."""
    @property
    def cluster_id(self) -> int:
        """The identity of the cluster that seeded the ring; 0 while unknown."""
    def is_empty(self) -> bool:
        """True until the ring is seeded or a seeded ring is merged in: nobody owns anything yet."""

    # Ownership
    def claim_for_peers(self, peers: Iterable[int], cluster_id: int | None = None) -> None:
        """Seed an empty ring (seed mode, or the value consensus decided): the sorted, de-duplicated
        peers split the range by recursive halving into CIDR-aligned shares (3 peers get 1/2, 1/4,
        1/4). Deterministic, so every peer seeded alike builds the same ring. The cluster id is
        `cluster_id_for_seed(peers)` unless given. Raises RingError if the ring is not empty or the
        list is empty, RingMismatchError if the ring already belongs to another cluster."""
    def merge(self, other: Ring) -> bool:
        """Join `other` (gossip) into this replica; True if anything changed (persist, and tell
        the allocator: pending requests may now succeed). Never refuses a compatible ring: ranges
        taken from us while we hold addresses in them show in `disputed_ranges`. Does not touch
        our free hints: call `report_free` afterwards. Raises RingMismatchError (unchanged)."""
    def grant(self, start: int, end: int, to_peer: int) -> None:
        """Give [start, end) to `to_peer`. We must own all of it and have nothing allocated in it.
        Inserts at most two tokens; re-owned entries get version + 1. Raises RingError."""
    def donate(self, start: int, end: int, to_peer: int) -> tuple[int, int] | None:
        """Answer a space request for [start, end) from `to_peer`: grant it a CIDR-aligned block of
        at most half our free space there (Weave Net's choice; one free address is given whole, so
        a request for [a, a+1) hands over address a if it is free). Never gives an allocated
        address. Returns the block, or None if we have nothing free there (deny the request)."""
    def transfer(self, from_peer: int, to_peer: int) -> list[tuple[int, int]]:
        """All of `from_peer`'s entries become `to_peer`'s with version + 100 (rmpeer: to = us;
        reset: from = us). Returns the ranges moved, coalesced. Not partition-safe: a peer that
        is still alive keeps allocating there (its allocations become disputed)."""
    def report_free(self) -> bool:
        """Make our entries' free hints exact (after `merge`); True if any changed (persist)."""

    # Allocations (ours only)
    def allocate(self, start: int | None = None, end: int | None = None) -> int | None:
        """Take the lowest free address we own in [start, end) (default: the whole ring range;
        pass the subnet's host range). None if we own nothing free there: ask `choose_donors`.
        Raises RingError if [start, end) does not overlap the ring range."""
    def claim_address(self, addr: int) -> bool:
        """Mark `addr` allocated (a static address, or one found at restart). True if it was free,
        False if it already was allocated. Raises RingError if the ring is empty or someone else
        owns `addr` (ask that owner to `donate(addr, addr + 1, us)`)."""
    def release(self, addr: int) -> bool:
        """Free `addr`; False if it was not allocated."""
    def is_allocated(self, addr: int) -> bool:
        """Whether we hold `addr`."""
    def allocated_count(self) -> int:
        """How many addresses we hold."""
    def allocated_ranges(self) -> list[tuple[int, int]]:
        """The addresses we hold, as sorted runs [start, end)."""
    def clear_allocations(self) -> None:
        """Forget every allocation (reset, after transferring our ranges to an heir)."""
    def free_count(self, start: int | None = None, end: int | None = None) -> int:
        """Exactly how many addresses we own in [start, end) are free."""
    def disputed_ranges(self) -> list[tuple[int, int]]:
        """Addresses we hold in ranges a merge gave to another peer (rmpeer of a live peer):
        surface them in status; they are never handed out again while someone else owns them."""

    # Queries
    def owner(self, addr: int) -> int | None:
        """Who owns `addr`; None if the ring is empty or `addr` is outside the range."""
    def owned_ranges(self, peer: int | None = None) -> list[tuple[int, int]]:
        """The ranges `peer` (default: us) owns, coalesced, sorted, split at the end of the range."""
    def peers(self) -> list[int]:
        """The distinct owners, ascending."""
    def free_by_owner(self) -> dict[int, int]:
        """Per owner, the sum of its entries' free hints (exact for us after `report_free`)."""
    def size_by_owner(self) -> dict[int, int]:
        """Per owner, how many addresses it owns (for "IPs owned, % of the universe")."""
    def choose_donors(self, start: int | None = None, end: int | None = None) -> list[int]:
        """Peers to ask for space in [start, end), best first: estimated free space there (each
        entry counts min(free hint, overlap)), most first, ties by ascending name. Never us, never
        a peer with nothing free there. Deterministic."""
    def entries(self) -> list[RingEntry]:
        """Every entry in token order, for `/report` and `weavenet status ipam`."""
    def check_invariants(self) -> None:
        """Raise RingError if an invariant is broken (for tests; it never should be)."""
    def copy(self) -> Ring:
        """An independent copy (allocations included)."""
    def __copy__(self) -> Ring: ...
    def __deepcopy__(self, memo: object) -> Ring: ...

# --- Datapath ---
# rust/fastdp/src/datapath (+ src/frame.rs): the TAP ↔ UDP engine in Rust threads. Python pushes
# peers, keys and routes in and reads events and counters out; no packet ever passes through Python
# and no Python code runs on the datapath threads.

def datapath_overlay_mtu(underlay_mtu: int, encrypted: bool, ipv6_underlay: bool = False) -> int:
    """The largest overlay MTU (L3 packet) an underlay MTU carries: underlay − IP/UDP (28, or 48 for
    IPv6) − Ethernet 14 − header 24 − route 12 − length 2 − tag 16 (encrypted). 1500 → 1420 plain,
    1404 encrypted."""

DatapathEvent = (
    tuple[str, int]
    | tuple[str, int, int]
    | tuple[str, int, str]
    | tuple[str, str]
    | tuple[str, str, int]
    | tuple[str, str, int, int]
)
"""See `Datapath.drain_events`."""

class Datapath:
    """One router's datapath: a TAP device (vnet header, TSO/checksum offloads) and a UDP socket
    (recvmmsg/sendmmsg, UDP GSO/GRO, forced 8 MiB buffers, DF), a send thread and a receive thread.

    Frames are forwarded by destination MAC (learned from received frames, aged out after 10 min);
    unknown unicast, broadcast and multicast are flooded along the broadcast routes; frames for a
    peer with no direct link are relayed via the unicast next hop. Encrypted peers use the
    `DataKeys` of their connection: AES-256-GCM (with AES-NI) or ChaCha20-Poly1305, counter nonces,
    a 2048-datagram replay window, rekeyed by a KDF chain every 2^28 datagrams or 120 s. Frames
    larger than a path carries get ICMP fragmentation-needed / Packet Too Big written back into the
    TAP (a relay answers frames too big for its next leg back through the overlay). Attaching the
    TAP to the bridge, its MTU and link state are the caller's job (the TAP MTU should be large,
    e.g. 65000, so oversize packets reach the datapath to be answered)."""

    @staticmethod
    def open(tap_name: str, udp_port: int, mtu: int, local_peer_id: int, bind_addr: str = "0.0.0.0") -> Datapath:
        """Create TAP `tap_name` and bind UDP `bind_addr:udp_port` (0 picks a free port) in the calling
        thread's network namespace, and start the threads. `mtu` is the overlay MTU (576..65000);
        `local_peer_id` our 48-bit peer name. Raises OSError (TAP or port unavailable; needs
        CAP_NET_ADMIN) or ValueError (bad arguments). The GIL is released meanwhile."""
    def set_peer(self, peer_id: int, addr: str, port: int, keys: DataKeys | None) -> None:
        """Add or replace a peer at underlay `addr:port`. With `keys` (from the connection's
        handshake) every datagram to and from it is encrypted and anything else from it is dropped
        (counted as "auth"); None means plain (trusted peers or no password). Replacing a peer:
        with the same keys (a repeated push, or a new address) counters, epochs and
        replay windows carry on; with new keys (a new connection) the crypto state starts over.
        Per-peer counters and liveness are kept either way."""
    def remove_peer(self, peer_id: int) -> None:
        """Forget a peer and every MAC learned behind it."""
    def set_routes(
        self, unicast: dict[int, int], broadcast: list[int], broadcast_via: dict[int, list[int]] | None = None
    ) -> None:
        """Replace the routes: `unicast` maps a destination peer to the next hop (a direct peer, itself
        when directly connected); `broadcast` lists our next hops for frames we flood; `broadcast_via`
        maps an origin peer to our next hops for frames that origin flooded (its broadcast tree)."""
    def events_fd(self) -> int:
        """A file descriptor that becomes readable when events wait (`trio.lowlevel.wait_readable`)."""
    def drain_events(self) -> list[DatapathEvent]:
        """Take the waiting events and clear the fd: ("peer_up", peer), ("peer_down", peer),
        ("pmtu", peer, overlay_mtu), ("mac_learned", "aa:bb:cc:dd:ee:ff", peer),
        ("mac_moved", mac, old_peer, new_peer), ("peer_endpoint", peer, "ip:port") (an encrypted peer's
        authenticated datagrams now come from there, e.g. a NAT rebinding: we send there too; plain
        peers never roam), ("datapath_failed", message) (a datapath thread hit a
        bug and the datapath stopped: close and reopen it). A peer is up while authenticated
        datagrams (heartbeats every 0.5 s, 2 s once up) keep arriving; down after 10 s of silence."""
    def stats(self) -> dict[str, object]:
        """Counters: tap_rx_frames/bytes, tap_tx_frames/bytes, segmented (TSO super-frames split),
        coalesced (received segments merged), udp_tx/rx_datagrams, gso_sends, gro_receives, relayed,
        flooded, icmp_sent, sent_inline (answers sent by the receive thread), events_dropped,
        fdb_entries; "drops": {auth, replay, malformed, no_route,
        oversize, queue_full, unknown_peer, send_error, tap_error}; "peers": {peer_id: {addr,
        encrypted, up, tx/rx_datagrams, tx/rx_bytes, tx/rx_frames, rtt_us, overlay_mtu}}."""
    def close(self) -> None:
        """Stop the threads, close the socket and the TAP (the device disappears). Idempotent; the GIL
        is released while the threads finish."""
    @property
    def tap_name(self) -> str: ...
    @property
    def udp_port(self) -> int:
        """The bound port (useful after opening with port 0)."""
    @property
    def cipher(self) -> str:
        """The AEAD this host seals with: "aes-256-gcm" or "chacha20-poly1305" (receivers open both)."""
    @property
    def tap_offloads(self) -> int:
        """TUN_F_* bits the kernel accepted (CSUM 1, TSO4 2, TSO6 4, TSO_ECN 8, USO4 0x20, USO6 0x40)."""
    @property
    def udp_gro(self) -> bool:
        """Whether UDP GRO is on for the socket."""
    @property
    def udp_rcvbuf(self) -> int:
        """The socket receive buffer the kernel granted, in bytes."""
    @property
    def closed(self) -> bool: ...
