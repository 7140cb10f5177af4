//! Counters the datapath threads bump and `Datapath.stats()` reads: relaxed atomics only, never a
//! lock on the packet path.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

/// Why a frame or datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Failed authentication (tampered, wrong key), or plaintext from a peer that must encrypt.
    Auth,
    /// A counter already seen, or too old for the replay window.
    Replay,
    /// Undecodable datagram, bad frame inside, or a TAP frame we could not parse.
    Malformed,
    /// No peer, no route or no address for the destination.
    NoRoute,
    /// Larger than the path allows (answered with ICMP where possible).
    Oversize,
    /// An internal queue was full.
    QueueFull,
    /// From a sender we have no peer entry for, or addressed to another receiver.
    UnknownPeer,
    /// The underlay socket refused the datagram.
    SendError,
    /// Writing to the TAP failed.
    TapError,
}

pub const DROP_REASONS: [(Drop, &str); 9] = [
    (Drop::Auth, "auth"),
    (Drop::Replay, "replay"),
    (Drop::Malformed, "malformed"),
    (Drop::NoRoute, "no_route"),
    (Drop::Oversize, "oversize"),
    (Drop::QueueFull, "queue_full"),
    (Drop::UnknownPeer, "unknown_peer"),
    (Drop::SendError, "send_error"),
    (Drop::TapError, "tap_error"),
];

/// Datapath-wide counters.
#[derive(Default)]
pub struct Stats {
    drops: [AtomicU64; 9],
    pub tap_rx_frames: AtomicU64,
    pub tap_rx_bytes: AtomicU64,
    pub tap_tx_frames: AtomicU64,
    pub tap_tx_bytes: AtomicU64,
    /// Super-frames read from the TAP and segmented.
    pub segmented: AtomicU64,
    /// Received frames merged into a coalesced super-frame.
    pub coalesced: AtomicU64,
    pub udp_tx_datagrams: AtomicU64,
    pub udp_rx_datagrams: AtomicU64,
    /// sendmmsg entries that were GSO super-datagrams.
    pub gso_sends: AtomicU64,
    /// recvmmsg messages that held more than one datagram (GRO).
    pub gro_receives: AtomicU64,
    pub relayed: AtomicU64,
    pub flooded: AtomicU64,
    pub icmp_sent: AtomicU64,
    /// Frames the receive thread read from the TAP and sent itself (`SendThread::poke`).
    pub sent_inline: AtomicU64,
}

impl Stats {
    pub fn drop(&self, why: Drop, n: u64) {
        self.drops[why as usize].fetch_add(n, Relaxed);
    }

    pub fn drops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DROP_REASONS
            .iter()
            .map(|(d, name)| (*name, self.drops[*d as usize].load(Relaxed)))
    }
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// One peer's counters and link state, shared by both threads and the stats reader.
#[derive(Default)]
pub struct PeerStats {
    pub tx_datagrams: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub rx_datagrams: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Monotonic nanoseconds of the last authenticated datagram (0: never).
    pub last_rx_ns: AtomicU64,
    /// Latest heartbeat round trip in microseconds (0: none yet).
    pub rtt_us: AtomicU64,
    /// Last PMTU ack: probe id << 16 | probed datagram size.
    pub pmtu_ack: AtomicU64,
    /// Largest overlay MTU (L3) the path carries, 0 while unknown.
    pub overlay_mtu: AtomicU32,
    pub up: AtomicBool,
}
