//! The receive thread: UDP → TAP. Receives batches with recvmmsg (each message possibly a GRO
//! train of datagrams), authenticates and decrypts in place, checks the replay window, learns
//! source MACs, coalesces TCP segments and writes frames to the TAP; frames for other peers and
//! broadcasts to pass on, and replies to heartbeats and PMTU probes, go to the send thread.
//!
//! Never blocks on anything but poll; owns all opening state (keys, replay windows).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use super::crypto::{OpenError, RxCipher};
use super::fdb::Mac;
use super::offload::Coalescer;
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

struct RxPeer {
    addr: SocketAddr,
    cipher: Option<RxCipher>,
    stats: Arc<PeerStats>,
}

pub struct ReceiveThread {
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
}

impl ReceiveThread {
    pub fn new(
        shared: Arc<Shared>,
        tap: Arc<Tap>,
        udp: Arc<Udp>,
        cmds: Receiver<Cmd>,
        work: SyncSender<TxWork>,
        wake: Arc<EventFd>,
        send_wake: Arc<EventFd>,
    ) -> ReceiveThread {
        ReceiveThread {
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
        }
    }

    pub fn run(mut self) {
        let fds = [self.udp.as_raw_fd(), self.wake.as_raw_fd()];
        let mut batch = RecvBatch::new(RECV_BATCH);
        while !self.shared.shutdown.load(Relaxed) {
            let ready = poll_readable(fds, Duration::from_millis(500)).unwrap_or([false, false]);
            if ready[1] {
                self.wake.clear();
            }
            self.apply_commands();
            if !ready[0] {
                continue;
            }
            for _ in 0..RECV_ROUNDS {
                let n = match self.udp.recv_batch(&mut batch) {
                    Ok(n) => n,
                    Err(_) => 0,
                };
                for i in 0..n {
                    self.handle_message(&mut batch, i);
                }
                if n < RECV_BATCH {
                    break;
                }
            }
            self.flush_tap();
            if self.queued_work {
                self.queued_work = false;
                self.send_wake.notify();
            }
        }
    }

    fn apply_commands(&mut self) {
        loop {
            match self.cmds.try_recv() {
                Ok(Cmd::SetPeer { id, addr, key, stats }) => {
                    self.peers.insert(id, RxPeer { addr, cipher: key.map(|k| RxCipher::new(&k)), stats });
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
        add(&peer.stats.rx_datagrams, 1);
        add(&peer.stats.rx_bytes, len as u64);
        let now_ns = self.shared.now_ns().max(1);
        peer.stats.last_rx_ns.store(now_ns, Relaxed);
        match h.kind {
            Kind::Data => self.handle_data(&h, body),
            Kind::Heartbeat => {
                if frame::parse_heartbeat(body).is_ok() {
                    let mut reply = self.shared.pool.get();
                    reply.extend_from_slice(body);
                    self.queue(TxWork::Control { peer: h.sender, kind: Kind::HeartbeatAck, body: reply });
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
                    self.queue(TxWork::Control { peer: h.sender, kind: Kind::PmtuAck, body: reply });
                }
                _ => self.shared.stats.drop(Drop::Malformed, 1),
            },
            Kind::PmtuAck => match frame::parse_pmtu(body, false) {
                Ok((size, id)) => peer.stats.pmtu_ack.store((u64::from(id) << 16) | u64::from(size), Relaxed),
                Err(_) => self.shared.stats.drop(Drop::Malformed, 1),
            },
        }
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
            self.shared.learn(src, origin);
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
        self.queue(TxWork::Relay { from_hop, origin, destination, frame });
    }

    fn queue(&mut self, w: TxWork) {
        match self.work.try_send(w) {
            Ok(()) => self.queued_work = true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.shared.stats.drop(Drop::QueueFull, 1),
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
