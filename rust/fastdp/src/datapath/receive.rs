//! The receive thread: UDP → TAP. Receives batches with recvmmsg (each message possibly a GRO
//! train of datagrams), authenticates and decrypts in place, checks the replay window, learns
//! source MACs, coalesces TCP segments and writes frames to the TAP; frames for other peers and
//! broadcasts to pass on, and replies to heartbeats and PMTU probes, go to the send thread.
//!
//! In request/response traffic it also serves the TAP (the send thread's work, under its lock:
//! see `send::Waiter`), so one thread carries a round trip as a single-threaded daemon would.
//!
//! Never blocks on anything but poll and, briefly, the send thread's lock; owns all opening state
//! (keys, replay windows).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::crypto::{OpenError, RxCipher};
use super::fdb::Mac;
use super::offload::Coalescer;
use super::send::{SendThread, Waiter};
use super::stats::{add, Drop, PeerStats};
use super::sys::{poll_readable, EventFd};
use super::tap::Tap;
use super::udp::{RecvBatch, Udp};
use super::{Cmd, Shared, TxWork};
use crate::frame::{self, DataBody, Header, Kind, BROADCAST, HEADER_LEN, PMTU_BODY_LEN};

/// Messages per recvmmsg (each up to 64 KiB with GRO).
const RECV_BATCH: usize = 32;
/// recvmmsg calls per wake-up before writing out and checking commands.
const RECV_ROUNDS: usize = 8;
/// Receives of at most this many datagrams and bytes count as request-like (see `run`).
const POKE_MAX_DATAGRAMS: usize = 4;
const POKE_MAX_BYTES: usize = 2048;

struct RxPeer {
    addr: SocketAddr,
    cipher: Option<RxCipher>,
    /// The key the cipher started from (to recognise a repeated `set_peer`).
    key: Option<Zeroizing<[u8; 32]>>,
    stats: Arc<PeerStats>,
}

pub struct ReceiveThread {
    /// The send thread's state, to `poke` after delivering request-like traffic.
    send: Arc<Mutex<SendThread>>,
    /// The send thread's wait set, to mute the TAP while this thread answers itself.
    send_waiter: Arc<Waiter>,
    shared: Arc<Shared>,
    tap: Arc<Tap>,
    udp: Arc<Udp>,
    cmds: Receiver<Cmd>,
    work: SyncSender<TxWork>,
    wake: Arc<EventFd>,
    send_wake: Arc<EventFd>,
    peers: HashMap<u64, RxPeer>,
    coalescer: Coalescer,
    queued_work: bool,
    /// Monotonic time of the current receive batch (one clock read per batch).
    now_ns: u64,
    learned: Option<(Mac, u64, u64)>,
}

impl ReceiveThread {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        send: Arc<Mutex<SendThread>>,
        send_waiter: Arc<Waiter>,
        shared: Arc<Shared>,
        tap: Arc<Tap>,
        udp: Arc<Udp>,
        cmds: Receiver<Cmd>,
        work: SyncSender<TxWork>,
        wake: Arc<EventFd>,
        send_wake: Arc<EventFd>,
    ) -> ReceiveThread {
        ReceiveThread {
            send,
            send_waiter,
            shared,
            tap,
            udp,
            cmds,
            work,
            wake,
            send_wake,
            peers: HashMap::new(),
            coalescer: Coalescer::default(),
            queued_work: false,
            now_ns: 1,
            learned: None,
        }
    }

    pub fn run(mut self) {
        let mut batch = RecvBatch::new(RECV_BATCH);
        let mut spin_until = Instant::now();
        // Our own handle on the send thread's state, so its guard can live across `&mut self` calls.
        let send = self.send.clone();
        while !self.shared.shutdown.load(Relaxed) {
            let spinning = Instant::now() < spin_until;
            let timeout = if spinning {
                Duration::ZERO
            } else {
                Duration::from_millis(500)
            };
            // poll ignores a negative fd: the TAP only while we hold it (see `Waiter`).
            let holding_tap = self.send_waiter.receiver_reads_tap();
            let tap_fd = if holding_tap {
                self.tap.as_raw_fd()
            } else {
                -1
            };
            let fds = [self.udp.as_raw_fd(), self.wake.as_raw_fd(), tap_fd];
            let ready = poll_readable(fds, timeout).unwrap_or([false; 3]);
            if spinning && ready == [false; 3] {
                std::thread::yield_now();
                continue;
            }
            if ready[1] {
                self.wake.clear();
            }
            self.apply_commands();
            if ready[2] {
                if let Ok(mut s) = send.lock() {
                    s.serve_tap();
                    if !s.request_response() {
                        self.send_waiter.give_tap_to_sender();
                    }
                }
            }
            if !ready[0] {
                continue;
            }
            spin_until = Instant::now() + self.shared.spin;
            // A few small datagrams after a quiet spell (a ping, an RPC): the local stack answers
            // within our TAP write, so this thread sends the answer itself (`SendThread::poke`) if
            // the send thread is idle. In request/response traffic it takes the send thread's lock
            // and mutes the TAP before the writes, so the answer does not also wake the send
            // thread (see `Waiter`).
            let mut request_like = false;
            let mut poke = None;
            let mut muted_here = false;
            for round in 0..RECV_ROUNDS {
                let n = self.udp.recv_batch(&mut batch).unwrap_or_default();
                self.now_ns = self.shared.now_ns().max(1);
                if round == 0 {
                    let bytes: usize = batch.lens[..n].iter().sum();
                    request_like = (1..=POKE_MAX_DATAGRAMS).contains(&n) && bytes <= POKE_MAX_BYTES;
                    poke = request_like
                        .then(|| send.try_lock().ok())
                        .flatten()
                        .filter(|s| s.request_response());
                    // Read under the lock: only the send thread, holding it, hands us the TAP.
                    muted_here = poke.is_some() && !self.send_waiter.receiver_reads_tap();
                    if muted_here {
                        self.send_waiter.mute_tap(true);
                    }
                }
                for i in 0..n {
                    self.handle_message(&mut batch, i);
                }
                if n < RECV_BATCH {
                    break;
                }
            }
            self.flush_tap();
            let muted = poke.is_some();
            if request_like && !muted {
                poke = send.try_lock().ok();
            }
            let poked = poke.is_some();
            if let Some(mut send) = poke {
                send.poke(muted);
            }
            if muted_here {
                self.send_waiter.mute_tap(false);
            }
            if self.queued_work && !poked {
                self.send_wake.notify();
            }
            self.queued_work = false;
        }
    }

    fn apply_commands(&mut self) {
        loop {
            match self.cmds.try_recv() {
                Ok(Cmd::SetPeer {
                    id,
                    addr,
                    key,
                    stats,
                }) => {
                    let key = key.map(Zeroizing::new);
                    if let Some(p) = self.peers.get_mut(&id).filter(|p| p.key == key) {
                        // Same connection: keep the replay windows and epochs.
                        p.addr = addr;
                        continue;
                    }
                    let cipher = key.as_ref().map(|k| RxCipher::new(k));
                    self.peers.insert(
                        id,
                        RxPeer {
                            addr,
                            cipher,
                            key,
                            stats,
                        },
                    );
                }
                Ok(Cmd::RemovePeer(id)) => {
                    self.peers.remove(&id);
                }
                Ok(Cmd::Routes(_)) => {}
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    fn handle_message(&mut self, batch: &mut RecvBatch, i: usize) {
        let from = batch.from[i].to_std();
        let seg = batch.gro_size[i];
        let msg = batch.message(i);
        if seg > 0 && seg < msg.len() {
            add(&self.shared.stats.gro_receives, 1);
            for d in msg.chunks_mut(seg) {
                self.handle_datagram(d, from);
            }
        } else {
            self.handle_datagram(msg, from);
        }
    }

    fn handle_datagram(&mut self, dg: &mut [u8], from: Option<SocketAddr>) {
        let stats = &self.shared.stats;
        add(&stats.udp_rx_datagrams, 1);
        let Ok(h) = Header::parse(dg) else {
            stats.drop(Drop::Malformed, 1);
            return;
        };
        if h.receiver != self.shared.local {
            stats.drop(Drop::UnknownPeer, 1);
            return;
        }
        let Some(peer) = self.peers.get_mut(&h.sender) else {
            stats.drop(Drop::UnknownPeer, 1);
            return;
        };
        let len = dg.len();
        let (aad, rest) = dg.split_at_mut(HEADER_LEN);
        let body: &mut [u8] = match (&mut peer.cipher, h.encrypted()) {
            (Some(c), true) => match c.open(h.epoch, h.flags, h.counter, aad, rest) {
                Ok(n) => &mut rest[..n],
                Err(OpenError::Auth) => {
                    stats.drop(Drop::Auth, 1);
                    return;
                }
                Err(OpenError::Replay) => {
                    stats.drop(Drop::Replay, 1);
                    return;
                }
            },
            (None, false) => {
                // Plain mode (trusted peer): at least insist on the configured address.
                if from.map(|a| a.ip()) != Some(peer.addr.ip()) {
                    stats.drop(Drop::UnknownPeer, 1);
                    return;
                }
                rest
            }
            // Plaintext from a peer that must encrypt, or ciphertext we have no key for.
            _ => {
                stats.drop(Drop::Auth, 1);
                return;
            }
        };
        // Roaming (NAT rebinding, a changed address): an authenticated, fresh datagram from a new
        // source moves the peer's endpoint there, as WireGuard does. Replays never reach this
        // point, and plain peers (unauthenticated) never roam.
        let roamed = match from {
            Some(addr) if peer.cipher.is_some() && addr != peer.addr => {
                peer.addr = addr;
                Some(addr)
            }
            _ => None,
        };
        add(&peer.stats.rx_datagrams, 1);
        add(&peer.stats.rx_bytes, len as u64);
        let now_ns = self.now_ns;
        peer.stats.last_rx_ns.store(now_ns, Relaxed);
        match h.kind {
            Kind::Data => self.handle_data(&h, body),
            Kind::Heartbeat => {
                if frame::parse_heartbeat(body).is_ok() {
                    let mut reply = self.shared.pool.get();
                    reply.extend_from_slice(body);
                    self.queue(TxWork::Control {
                        peer: h.sender,
                        kind: Kind::HeartbeatAck,
                        body: reply,
                    });
                } else {
                    self.shared.stats.drop(Drop::Malformed, 1);
                }
            }
            Kind::HeartbeatAck => match frame::parse_heartbeat(body) {
                Ok(sent) if sent <= now_ns => {
                    peer.stats.rtt_us.store((now_ns - sent) / 1000, Relaxed);
                }
                _ => self.shared.stats.drop(Drop::Malformed, 1),
            },
            Kind::PmtuProbe => match frame::parse_pmtu(body, true) {
                Ok((size, _)) if usize::from(size) == len => {
                    let mut reply = self.shared.pool.get();
                    reply.extend_from_slice(&body[..PMTU_BODY_LEN]);
                    self.queue(TxWork::Control {
                        peer: h.sender,
                        kind: Kind::PmtuAck,
                        body: reply,
                    });
                }
                _ => self.shared.stats.drop(Drop::Malformed, 1),
            },
            Kind::PmtuAck => match frame::parse_pmtu(body, false) {
                Ok((size, id)) => peer
                    .stats
                    .pmtu_ack
                    .store((u64::from(id) << 16) | u64::from(size), Relaxed),
                Err(_) => self.shared.stats.drop(Drop::Malformed, 1),
            },
        }
        if let Some(addr) = roamed {
            self.roam(h.sender, addr);
        }
    }

    fn roam(&mut self, peer: u64, addr: SocketAddr) {
        if let Ok(mut peers) = self.shared.peers.lock() {
            if let Some(info) = peers.get_mut(&peer) {
                info.addr = addr;
            }
        }
        self.shared.events.push(super::Event::Endpoint(peer, addr));
        self.queue(TxWork::Endpoint { peer, addr });
    }

    fn handle_data(&mut self, h: &Header, body: &[u8]) {
        let Ok(data) = DataBody::parse(body, h.routed()) else {
            self.shared.stats.drop(Drop::Malformed, 1);
            return;
        };
        let (origin, destination) = match data.route {
            Some(r) => (r.origin, r.destination),
            None => (h.sender, self.shared.local),
        };
        if origin == self.shared.local {
            // Our own frame came back: a routing loop; never deliver it.
            self.shared.stats.drop(Drop::NoRoute, 1);
            return;
        }
        if destination != self.shared.local && destination != BROADCAST {
            for f in data.frames() {
                self.relay(h.sender, origin, destination, f);
            }
            return;
        }
        let Some(peer) = self.peers.get(&h.sender) else {
            return;
        };
        let peer_stats = peer.stats.clone();
        let tap = &self.tap;
        let stats = &self.shared.stats;
        let mut write = |hdr: &[u8], f: &[u8]| match tap.write(hdr, f) {
            Ok(_) => {
                add(&stats.tap_tx_frames, 1);
                add(&stats.tap_tx_bytes, f.len() as u64);
            }
            Err(_) => stats.drop(Drop::TapError, 1),
        };
        for f in data.frames() {
            add(&peer_stats.rx_frames, 1);
            let mut src: Mac = [0; 6];
            src.copy_from_slice(&f[6..12]);
            self.shared
                .learn(&mut self.learned, src, origin, self.now_ns / 1_000_000_000);
            self.coalescer.push(f, &mut write);
        }
        if destination == BROADCAST {
            for f in data.frames() {
                self.relay(h.sender, origin, BROADCAST, f);
            }
        }
    }

    fn relay(&mut self, from_hop: u64, origin: u64, destination: u64, f: &[u8]) {
        let mut frame = self.shared.pool.get();
        frame.extend_from_slice(f);
        self.queue(TxWork::Relay {
            from_hop,
            origin,
            destination,
            frame,
        });
    }

    fn queue(&mut self, w: TxWork) {
        match self.work.try_send(w) {
            Ok(()) => self.queued_work = true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.stats.drop(Drop::QueueFull, 1)
            }
        }
    }

    fn flush_tap(&mut self) {
        let tap = &self.tap;
        let stats = &self.shared.stats;
        let mut write = |hdr: &[u8], f: &[u8]| match tap.write(hdr, f) {
            Ok(_) => {
                add(&stats.tap_tx_frames, 1);
                add(&stats.tap_tx_bytes, f.len() as u64);
            }
            Err(_) => stats.drop(Drop::TapError, 1),
        };
        self.coalescer.flush(&mut write);
        let merged = std::mem::take(&mut self.coalescer.merged);
        add(&stats.coalesced, merged);
    }
}
