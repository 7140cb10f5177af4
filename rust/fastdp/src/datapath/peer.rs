//! Per-peer send state owned by the send thread: address, sealing key, the datagrams being
//! assembled for the next flush, heartbeat timer and the path-MTU search.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::crypto::{Suite, TxCipher};
use super::stats::PeerStats;
use super::udp::SockAddr;
use crate::frame::{
    self, Header, Kind, Route, FLAG_ENCRYPTED, FLAG_ROUTED, HEADER_LEN, ROUTE_LEN, TAG_LEN,
};

/// Heartbeat interval while the peer is not (yet) up, and once it is.
pub const HEARTBEAT_DOWN: Duration = Duration::from_millis(500);
pub const HEARTBEAT_UP: Duration = Duration::from_secs(2);
/// A peer with no authenticated datagram for this long is down.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a PMTU ack, how many tries per size, and how often to search again.
pub const PMTU_WAIT: Duration = Duration::from_millis(250);
pub const PMTU_TRIES: u8 = 3;
pub const PMTU_RESEARCH: Duration = Duration::from_secs(600);
/// Smallest datagram every IPv4 path carries (576 - IP - UDP).
pub const PMTU_FLOOR: usize = 548;

/// Binary search for the largest datagram the path carries (DPLPMTUD-style, RFC 8899).
#[derive(Debug, Clone)]
pub struct PmtuSearch {
    /// Largest size known to arrive.
    pub good: usize,
    /// Smallest size known not to (exclusive upper bound + 1).
    pub bad: usize,
    /// Probe in flight: (size, id, sent at, tries).
    pub probe: Option<(usize, u32, Instant, u8)>,
    pub done: bool,
    pub next_id: u32,
    pub started: Instant,
}

impl PmtuSearch {
    pub fn new(max: usize, now: Instant) -> PmtuSearch {
        PmtuSearch {
            good: PMTU_FLOOR.min(max),
            bad: max + 1,
            probe: None,
            done: false,
            next_id: 1,
            started: now,
        }
    }

    /// The next size to probe, or None when the search has converged.
    pub fn next_size(&self) -> Option<usize> {
        if self.good + 1 >= self.bad {
            return None;
        }
        // Try the top first: on a healthy path one probe settles it.
        if self.bad == usize::MAX || self.next_id == 1 {
            return Some(self.bad - 1);
        }
        Some((self.good + self.bad).div_ceil(2))
    }

    /// An ack for (size, id) arrived.
    pub fn acked(&mut self, size: usize, id: u32) -> bool {
        match self.probe {
            Some((s, i, _, _)) if s == size && i == id => {
                self.good = self.good.max(size);
                self.probe = None;
                true
            }
            _ => false,
        }
    }

    /// The probe of `size` cannot pass (timed out, or the local stack refused it).
    pub fn failed(&mut self, size: usize) {
        self.bad = self.bad.min(size);
        self.good = self.good.min(self.bad.saturating_sub(1));
        self.probe = None;
    }
}

/// Datagrams queued for one peer, encoded (and sealed) in one contiguous buffer.
#[derive(Default)]
pub struct OutQueue {
    pub buf: Vec<u8>,
    /// (start, len) of each finished datagram in `buf`.
    pub dgrams: Vec<(usize, usize)>,
    /// The datagram still taking frames: (start, route).
    open: Option<(usize, Option<Route>)>,
}

/// The send thread's view of one peer.
pub struct TxPeer {
    pub id: u64,
    /// Our own peer name (the sender of everything queued here).
    pub local: u64,
    pub addr: SockAddr,
    pub cipher: Option<TxCipher>,
    /// The key the cipher started from (to recognise a repeated `set_peer`).
    key: Option<zeroize::Zeroizing<[u8; 32]>>,
    pub plain_counter: u64,
    pub stats: Arc<PeerStats>,
    pub out: OutQueue,
    pub next_heartbeat: Instant,
    pub pmtu: PmtuSearch,
    /// Largest datagram we build for this peer (configured MTU + overhead).
    pub max_dgram: usize,
}

impl TxPeer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        local: u64,
        id: u64,
        addr: SockAddr,
        key: Option<[u8; 32]>,
        suite: Suite,
        stats: Arc<PeerStats>,
        mtu: usize,
        now: Instant,
    ) -> TxPeer {
        let encrypted = key.is_some();
        let max_dgram = mtu + super::overhead(encrypted);
        TxPeer {
            id,
            local,
            addr,
            cipher: key.map(|k| TxCipher::new(&k, suite)),
            key: key.map(zeroize::Zeroizing::new),
            plain_counter: 0,
            stats,
            out: OutQueue::default(),
            next_heartbeat: now,
            pmtu: PmtuSearch::new(max_dgram, now),
            max_dgram,
        }
    }

    /// Whether this peer was set up with exactly `key` (None: plain).
    pub fn same_key(&self, key: Option<&[u8; 32]>) -> bool {
        match (&self.key, key) {
            (None, None) => true,
            (Some(a), Some(b)) => a.as_slice() == b.as_slice(),
            _ => false,
        }
    }

    /// The largest L3 packet this peer's path carries now.
    pub fn overlay_mtu(&self, configured: usize) -> usize {
        match self
            .stats
            .overlay_mtu
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => configured,
            m => configured.min(m as usize),
        }
    }

    fn tag_len(&self) -> usize {
        if self.cipher.is_some() {
            TAG_LEN
        } else {
            0
        }
    }

    /// The largest datagram to build now: the configured maximum until the path MTU is known.
    pub fn dgram_limit(&self) -> usize {
        match self
            .stats
            .overlay_mtu
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => self.max_dgram,
            m => self
                .max_dgram
                .min(m as usize + super::overhead(self.cipher.is_some())),
        }
    }

    /// Append an Ethernet frame to the open datagram if it fits there, else to a new one.
    pub fn push_frame(&mut self, route: Option<Route>, frame: &[u8], now: Instant) {
        self.push_frame_with(route, frame.len(), now, |dst| dst.copy_from_slice(frame));
    }

    /// Like `push_frame` for a frame of `len` bytes that `fill` writes in place (segments are
    /// built straight into the datagram, without an intermediate copy).
    pub fn push_frame_with(
        &mut self,
        route: Option<Route>,
        len: usize,
        now: Instant,
        fill: impl FnOnce(&mut [u8]),
    ) {
        let need = frame::FRAME_PREFIX_LEN + len + self.tag_len();
        let limit = self.dgram_limit();
        let fits = match self.out.open {
            Some((start, r)) => r == route && self.out.buf.len() - start + need <= limit,
            None => false,
        };
        if !fits {
            self.close_open(now, Kind::Data);
            let start = self.out.buf.len();
            self.out.buf.resize(start + HEADER_LEN, 0);
            if let Some(r) = route {
                let at = self.out.buf.len();
                self.out.buf.resize(at + ROUTE_LEN, 0);
                r.write(&mut self.out.buf[at..]);
            }
            self.out.open = Some((start, route));
        }
        self.out.buf.extend_from_slice(&(len as u16).to_be_bytes());
        let at = self.out.buf.len();
        self.out.buf.resize(at + len, 0);
        fill(&mut self.out.buf[at..]);
        crate::datapath::stats::add(&self.stats.tx_frames, 1);
    }

    /// Queue a complete control datagram (closing any open data datagram first).
    pub fn push_control(&mut self, kind: Kind, body: &[u8], now: Instant) {
        self.close_open(now, Kind::Data);
        let start = self.out.buf.len();
        self.out.buf.resize(start + HEADER_LEN, 0);
        self.out.buf.extend_from_slice(body);
        self.out.open = Some((start, None));
        self.close_open(now, kind);
    }

    /// Finish the open datagram: write its header and seal it.
    pub fn close_open(&mut self, now: Instant, kind: Kind) {
        let Some((start, route)) = self.out.open.take() else {
            return;
        };
        let mut flags = if route.is_some() { FLAG_ROUTED } else { 0 };
        let (epoch, counter) = match self.cipher.as_mut() {
            Some(c) => {
                flags |= FLAG_ENCRYPTED | c.suite().flag();
                c.next(now)
            }
            None => {
                self.plain_counter += 1;
                (0, self.plain_counter)
            }
        };
        let header = Header {
            kind,
            flags,
            epoch,
            sender: self.local,
            receiver: self.id,
            counter,
        };
        let end = self.out.buf.len();
        let tag = self.tag_len();
        self.out.buf.resize(end + tag, 0);
        let dgram = &mut self.out.buf[start..];
        header.write(dgram);
        if let Some(c) = self.cipher.as_ref() {
            let (aad, rest) = dgram.split_at_mut(HEADER_LEN);
            let body_len = end - start - HEADER_LEN;
            let (body, t) = rest.split_at_mut(body_len);
            c.seal(counter, aad, body, t);
        }
        self.out.dgrams.push((start, end + tag - start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::crypto::RxCipher;
    use crate::frame::DataBody;

    fn peer(key: Option<[u8; 32]>) -> TxPeer {
        let addr = SockAddr::new("127.0.0.1:6783".parse().unwrap(), false);
        TxPeer::new(
            1,
            2,
            addr,
            key,
            Suite::Aes256Gcm,
            Arc::default(),
            1400,
            Instant::now(),
        )
    }

    #[test]
    fn small_frames_share_a_datagram_big_ones_do_not() {
        let mut p = peer(None);
        p.push_frame(None, &[1u8; 60], Instant::now());
        p.push_frame(None, &[2u8; 60], Instant::now());
        p.push_frame(None, &[3u8; 1400], Instant::now());
        p.push_frame(
            Some(Route {
                origin: 1,
                destination: 0,
            }),
            &[4u8; 60],
            Instant::now(),
        );
        p.close_open(Instant::now(), Kind::Data);
        assert_eq!(p.out.dgrams.len(), 3);
        let frames: Vec<usize> = p
            .out
            .dgrams
            .iter()
            .map(|&(s, l)| {
                let d = &p.out.buf[s..s + l];
                let h = Header::parse(d).unwrap();
                assert_eq!((h.sender, h.receiver), (1, 2));
                DataBody::parse(&d[HEADER_LEN..], h.routed())
                    .unwrap()
                    .frames()
                    .count()
            })
            .collect();
        assert_eq!(frames, vec![2, 1, 1]);
        assert!(p.out.dgrams.iter().all(|&(_, l)| l <= p.max_dgram));
    }

    #[test]
    fn sealed_datagrams_open_with_the_peer_key() {
        let mut p = peer(Some([9; 32]));
        p.push_frame(None, &[5u8; 100], Instant::now());
        p.push_control(Kind::Heartbeat, &7u64.to_be_bytes(), Instant::now());
        let mut rx = RxCipher::new(&[9; 32]);
        for &(s, l) in &p.out.dgrams.clone() {
            let d = &mut p.out.buf[s..s + l];
            let h = Header::parse(d).unwrap();
            assert!(h.encrypted());
            let (aad, body) = d.split_at_mut(HEADER_LEN);
            let n = rx.open(h.epoch, h.flags, h.counter, aad, body).unwrap();
            assert!(n > 0);
        }
    }

    #[test]
    fn pmtu_search_converges() {
        for path in [1472usize, 1400, 1300, 600] {
            let now = Instant::now();
            let mut s = PmtuSearch::new(1472, now);
            let mut probes = 0;
            while let Some(size) = s.next_size() {
                probes += 1;
                s.probe = Some((size, s.next_id, now, 0));
                s.next_id += 1;
                if size <= path {
                    assert!(s.acked(size, s.next_id - 1));
                } else {
                    s.failed(size);
                }
                assert!(probes < 20);
            }
            assert_eq!(s.good, path);
        }
    }
}
