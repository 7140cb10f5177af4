//! The send thread: TAP → UDP. Reads frames (super-frames with vnet headers) from the TAP in
//! batches, learns local MACs, picks the peer(s) by destination MAC and routes, segments to the
//! path MTU (answering oversize DF packets with ICMP), packs and seals datagrams per peer and sends
//! each flush with one sendmmsg (UDP GSO for runs of equal-sized datagrams). It also sends what the
//! receive thread hands over (relays, re-floods, control replies) and runs the timers: heartbeats,
//! liveness, PMTU probes and MAC ageing.
//!
//! Never blocks on anything but its `Waiter` (and briefly on a full socket buffer). All sealing
//! state lives in `SendThread`, behind one mutex that only this thread and the receive thread
//! (`poke`, and `serve_tap` while it holds the TAP in request/response traffic) take.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::crypto::Suite;
use super::fdb::{is_multicast, Mac};
use super::icmp::{self, TooBig};
use super::offload::{self, Prepared, VnetHdr, VNET_HDR_LEN};
use super::peer::{
    TxPeer, HEARTBEAT_DOWN, HEARTBEAT_UP, PEER_TIMEOUT, PMTU_RESEARCH, PMTU_TRIES, PMTU_WAIT,
};
use super::stats::{add, get, Drop};
use super::sys::{Epoll, EventFd};
use super::tap::Tap;
use super::udp::{Outgoing, SendScratch, SockAddr, Udp, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};
use super::{Cmd, Event, Routes, Shared, TxWork};
use crate::frame::{Kind, Route, BROADCAST, PMTU_BODY_LEN};

/// At most this many ICMP errors per second for frames we relay.
const ICMP_PER_SECOND: u32 = 200;
/// Frames read from the TAP per flush.
const TAP_BATCH: usize = 128;
/// Frames a poke from the receive thread reads at most: enough for an answer, never a bulk
/// transfer's worth of work on the receive thread.
const POKE_FRAMES: usize = 4;
/// With the TAP muted, a poke reads one frame (the answer) and not a second one to find the TAP
/// empty: whichever thread then watches the TAP reads any rest.
const MUTED_POKE_FRAMES: usize = 1;
/// A last flush of at most this many bytes means request/response traffic, not a bulk transfer.
const SMALL_FLUSH_BYTES: usize = 2048;
/// Flush earlier when this many bytes are queued.
const FLUSH_BYTES: usize = 1 << 20;
const TICK: Duration = Duration::from_millis(100);
const STP: Mac = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x00];

/// What the send thread sleeps on: the TAP (token 0) and its wake-up eventfd (token 1).
///
/// In request/response traffic the receive thread mutes the TAP while it delivers a request and
/// sends the answer itself (`SendThread::poke`): otherwise the answer the local stack puts in the
/// TAP also wakes this thread, and with two runnable threads on its CPU the peer's next wake-up
/// goes to another, idle CPU, which on a VM means an IPI to a halted vCPU (tens of µs per round
/// trip). While traffic stays request/response the receive thread holds the TAP altogether
/// (`give_tap_to_receiver`), so one thread carries the whole round trip, as fastd's single thread
/// does: on the 2-core lab VM ping RTT went from 1.08x fastd's to 0.89-1.03x (host to host,
/// taking turns). Not in bulk transfers (`give_tap_to_sender`): there this thread working in
/// parallel with the receive thread's TAP writes (ACKs that release more data) is worth more.
pub struct Waiter {
    epoll: Epoll,
    tap: Arc<Tap>,
    /// Request/response traffic: the receive thread reads the TAP as well as the socket, so that
    /// one thread carries a round trip, as a single-threaded daemon does; the TAP is muted here.
    /// Bulk traffic hands it back (see `SendThread::run`, `ReceiveThread::run`).
    receiver_reads_tap: AtomicBool,
    receiver_wake: Arc<EventFd>,
}

impl Waiter {
    pub fn new(tap: Arc<Tap>, wake: &EventFd, receiver_wake: Arc<EventFd>) -> io::Result<Waiter> {
        let epoll = Epoll::new()?;
        epoll.add(tap.as_raw_fd(), 0)?;
        epoll.add(wake.as_raw_fd(), 1)?;
        Ok(Waiter {
            epoll,
            tap,
            receiver_reads_tap: AtomicBool::new(false),
            receiver_wake,
        })
    }

    /// Stop (true) or resume (false) waking the send thread for TAP input. Resuming wakes it at
    /// once if frames arrived meanwhile, so nothing waits for the next event.
    pub fn mute_tap(&self, muted: bool) {
        self.epoll.set_muted(self.tap.as_raw_fd(), 0, muted);
    }

    pub fn receiver_reads_tap(&self) -> bool {
        self.receiver_reads_tap.load(Relaxed)
    }

    /// Traffic turned request/response: the receive thread takes over the TAP (woken to poll it).
    pub fn give_tap_to_receiver(&self) {
        if !self.receiver_reads_tap.swap(true, Relaxed) {
            self.mute_tap(true);
            self.receiver_wake.notify();
        }
    }

    /// Traffic turned bulk: the send thread reads the TAP again, in parallel with the receiver.
    pub fn give_tap_to_sender(&self) {
        if self.receiver_reads_tap.swap(false, Relaxed) {
            self.mute_tap(false);
        }
    }
}

pub struct SendThread {
    shared: Arc<Shared>,
    tap: Arc<Tap>,
    udp: Arc<Udp>,
    cmds: Receiver<Cmd>,
    work: Receiver<TxWork>,
    wake: Arc<EventFd>,
    suite: Suite,
    peers: HashMap<u64, TxPeer>,
    routes: Arc<Routes>,
    read_buf: Vec<u8>,
    seg_buf: Vec<u8>,
    frag_buf: Vec<u8>,
    frag_segs: Vec<Range<usize>>,
    icmp_buf: Vec<u8>,
    scratch: SendScratch,
    queued_bytes: usize,
    /// Bytes the last flush that sent anything sent (see `SMALL_FLUSH_BYTES`).
    last_flush_bytes: usize,
    next_tick: Instant,
    next_expire: Instant,
    /// The time at the top of this loop iteration (one clock read per batch, not per frame).
    now: Instant,
    /// ICMP errors for relayed frames sent in the current one-second window.
    icmp_window: (Instant, u32),
    learned: Option<(Mac, u64, u64)>,
}

/// Where a frame from the TAP goes.
enum Target {
    Peer(u64),
    Flood,
}

impl SendThread {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<Shared>,
        tap: Arc<Tap>,
        udp: Arc<Udp>,
        cmds: Receiver<Cmd>,
        work: Receiver<TxWork>,
        wake: Arc<EventFd>,
        suite: Suite,
    ) -> SendThread {
        let now = Instant::now();
        SendThread {
            shared,
            tap,
            udp,
            cmds,
            work,
            wake,
            suite,
            peers: HashMap::new(),
            routes: Arc::default(),
            // Room for the largest GSO super-frame (64 KiB of IP plus headers) with margin: a
            // short buffer would silently truncate a read.
            read_buf: vec![0u8; VNET_HDR_LEN + 128 * 1024],
            seg_buf: Vec::with_capacity(128 << 10),
            frag_buf: Vec::new(),
            frag_segs: Vec::new(),
            icmp_buf: Vec::new(),
            scratch: SendScratch::default(),
            queued_bytes: 0,
            last_flush_bytes: 0,
            next_tick: now,
            next_expire: now + Duration::from_secs(30),
            now,
            icmp_window: (now, 0),
            learned: None,
        }
    }

    /// The thread body. The state sits behind a mutex only so the receive thread can `poke` it
    /// while this thread sleeps in `waiter`; the lock is not held while waiting for input.
    pub fn run(state: Arc<Mutex<SendThread>>, waiter: Arc<Waiter>) {
        let Ok(shared) = state.lock().map(|s| s.shared.clone()) else {
            return;
        };
        let mut spin_until = Instant::now();
        let mut next_tick = Instant::now();
        while !shared.shutdown.load(Relaxed) {
            let now = Instant::now();
            let spinning = now < spin_until && now < next_tick;
            let timeout = if spinning {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(now)
            };
            let ready = match waiter.epoll.wait(timeout) {
                Ok(r) => r,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    [false, false]
                }
            };
            if spinning && ready == [false, false] {
                std::thread::yield_now();
                continue;
            }
            let Ok(mut s) = state.lock() else {
                return;
            };
            if ready[1] {
                s.wake.clear();
            }
            s.step(if ready[0] { TAP_BATCH } else { 0 });
            if s.request_response() {
                waiter.give_tap_to_receiver();
            }
            if ready != [false, false] {
                spin_until = Instant::now() + shared.spin;
            }
            next_tick = s.next_tick;
        }
    }

    /// Do whatever is waiting, without blocking. The receive thread calls this right after it
    /// delivered request-like traffic: when the local stack answered within the TAP write, the
    /// answer leaves at once instead of after this thread's wake-up (one less hop of latency per
    /// round trip, like a single-threaded daemon; `sent_inline` counts them). When the TAP is not
    /// muted, this thread, woken by the answer, may get there first.
    /// `muted`: the receive thread muted the TAP in our `Waiter` (and unmutes it afterwards).
    pub fn poke(&mut self, muted: bool) {
        let before = get(&self.shared.stats.tap_rx_frames);
        let frames = if muted {
            MUTED_POKE_FRAMES
        } else {
            POKE_FRAMES
        };
        self.step(frames);
        add(
            &self.shared.stats.sent_inline,
            get(&self.shared.stats.tap_rx_frames) - before,
        );
    }

    /// The receive thread found the TAP readable while it holds the TAP (`Waiter`).
    pub fn serve_tap(&mut self) {
        self.step(TAP_BATCH);
    }

    /// Whether traffic is request/response-like (the last flush was small), so that muting the
    /// TAP for a poke costs no parallelism.
    pub fn request_response(&self) -> bool {
        self.last_flush_bytes <= SMALL_FLUSH_BYTES
    }

    /// One round of work: commands, work from the receive thread, up to `tap_frames` frames from
    /// the TAP, the flush, and the timers when due.
    fn step(&mut self, tap_frames: usize) {
        self.now = Instant::now();
        self.apply_commands();
        self.drain_work();
        if tap_frames > 0 {
            self.read_tap(tap_frames);
        }
        self.flush();
        if Instant::now() >= self.next_tick {
            self.tick(Instant::now());
            self.flush();
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
                    let sa = SockAddr::new(addr, self.udp.is_v6());
                    if let Some(p) = self.peers.get_mut(&id).filter(|p| p.same_key(key.as_ref())) {
                        // Same connection, new address (or a repeated push): keep the counters
                        // and epoch, or the peer's replay window would refuse us.
                        p.addr = sa;
                        continue;
                    }
                    let p = TxPeer::new(
                        self.shared.local,
                        id,
                        sa,
                        key,
                        self.suite,
                        stats,
                        self.shared.mtu,
                        Instant::now(),
                    );
                    self.peers.insert(id, p);
                }
                Ok(Cmd::RemovePeer(id)) => {
                    self.peers.remove(&id);
                }
                Ok(Cmd::Routes(r)) => self.routes = r,
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    fn drain_work(&mut self) {
        for _ in 0..4096 {
            let Ok(w) = self.work.try_recv() else {
                return;
            };
            match w {
                TxWork::Relay {
                    from_hop,
                    origin,
                    destination,
                    frame,
                } => {
                    self.relay(from_hop, origin, destination, &frame);
                    self.shared.pool.put(frame);
                }
                TxWork::Endpoint { peer, addr } => {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.addr = SockAddr::new(addr, self.udp.is_v6());
                    }
                }
                TxWork::Control { peer, kind, body } => {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.push_control(kind, &body, self.now);
                    }
                    self.shared.pool.put(body);
                }
            }
            if self.queued_bytes >= FLUSH_BYTES {
                self.flush();
            }
        }
    }

    fn relay(&mut self, from_hop: u64, origin: u64, destination: u64, frame: &[u8]) {
        let route = Some(Route {
            origin,
            destination,
        });
        if destination == BROADCAST {
            let routes = self.routes.clone();
            let Some(hops) = routes.broadcast_via.get(&origin) else {
                return;
            };
            for &hop in hops {
                if hop != from_hop && hop != origin {
                    self.push_to(hop, route, frame, true);
                    add(&self.shared.stats.flooded, 1);
                }
            }
        } else {
            match self.routes.unicast.get(&destination).copied() {
                Some(hop) if hop != from_hop => {
                    let mtu = self.peers.get(&hop).map(|p| p.overlay_mtu(self.shared.mtu));
                    if let Some(mtu) = mtu.filter(|&m| frame.len() - 14 > m) {
                        // The next leg is narrower than the origin's: answer as a router on the
                        // path would, back through the overlay to the origin's TAP.
                        self.shared.stats.drop(Drop::Oversize, 1);
                        self.answer_too_big_remote(frame, origin, destination, mtu);
                        return;
                    }
                    self.push_to(hop, route, frame, true);
                    add(&self.shared.stats.relayed, 1);
                }
                _ => self.shared.stats.drop(Drop::NoRoute, 1),
            }
        }
    }

    /// Send the ICMP answer to a relayed frame that is too big for our next hop back to the
    /// frame's origin peer (rate-limited like a router's ICMP errors). The answer carries the
    /// frame's destination peer as its origin: its source MAC is the destination's, and the origin
    /// must keep learning that MAC behind the destination, not behind us.
    fn answer_too_big_remote(&mut self, frame: &[u8], origin: u64, destination: u64, mtu: usize) {
        let now = self.now;
        if now.duration_since(self.icmp_window.0) >= Duration::from_secs(1) {
            self.icmp_window = (now, 0);
        }
        if self.icmp_window.1 >= ICMP_PER_SECOND {
            return;
        }
        let mut out = std::mem::take(&mut self.icmp_buf);
        if icmp::answer(frame, mtu.min(u16::MAX as usize) as u16, &mut out) {
            let back = self
                .routes
                .unicast
                .get(&origin)
                .copied()
                .or_else(|| self.peers.contains_key(&origin).then_some(origin));
            if let Some(hop) = back {
                let route = Some(Route {
                    origin: destination,
                    destination: origin,
                });
                if self.push_to(hop, route, &out, true) {
                    self.icmp_window.1 += 1;
                    add(&self.shared.stats.icmp_sent, 1);
                }
            }
        }
        self.icmp_buf = out;
    }

    /// Queue one wire-ready frame for `hop`, checking it against that path's MTU.
    fn push_to(
        &mut self,
        hop: u64,
        route: Option<Route>,
        frame: &[u8],
        silent_oversize: bool,
    ) -> bool {
        let mtu = self.shared.mtu;
        let Some(p) = self.peers.get_mut(&hop) else {
            self.shared.stats.drop(Drop::NoRoute, 1);
            return false;
        };
        if frame.len() - 14 > p.overlay_mtu(mtu) {
            if silent_oversize {
                self.shared.stats.drop(Drop::Oversize, 1);
            }
            return false;
        }
        p.push_frame(route, frame, self.now);
        self.queued_bytes += frame.len();
        true
    }

    fn read_tap(&mut self, max_frames: usize) {
        for _ in 0..max_frames {
            let mut buf = std::mem::take(&mut self.read_buf);
            let r = self.tap.read(&mut buf);
            match r {
                Ok(n) if n > VNET_HDR_LEN => {
                    add(&self.shared.stats.tap_rx_frames, 1);
                    add(&self.shared.stats.tap_rx_bytes, (n - VNET_HDR_LEN) as u64);
                    self.handle_tap_frame(&mut buf[..n]);
                }
                Ok(_) => self.shared.stats.drop(Drop::Malformed, 1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_buf = buf;
                    return;
                }
                Err(_) => {
                    // The TAP is gone or broken (deleted under us): poll keeps reporting it, so
                    // back off instead of spinning, and count it for the router to see.
                    self.shared.stats.drop(Drop::TapError, 1);
                    self.read_buf = buf;
                    std::thread::sleep(Duration::from_millis(20));
                    return;
                }
            }
            self.read_buf = buf;
            if self.queued_bytes >= FLUSH_BYTES {
                self.flush();
            }
        }
    }

    fn handle_tap_frame(&mut self, raw: &mut [u8]) {
        let Some(h) = VnetHdr::parse(raw) else {
            self.shared.stats.drop(Drop::Malformed, 1);
            return;
        };
        let frame = &mut raw[VNET_HDR_LEN..];
        if frame.len() < 14 {
            self.shared.stats.drop(Drop::Malformed, 1);
            return;
        }
        let mut dst: Mac = [0; 6];
        dst.copy_from_slice(&frame[..6]);
        let mut src: Mac = [0; 6];
        src.copy_from_slice(&frame[6..12]);
        if dst == STP {
            return;
        }
        let now_s = self.shared.start.elapsed().as_secs();
        self.shared
            .learn(&mut self.learned, src, self.shared.local, now_s);
        let target = if is_multicast(&dst) {
            Target::Flood
        } else {
            match self.shared.fdb.lookup(&dst) {
                Some(p) if p == self.shared.local => return,
                Some(p) => Target::Peer(p),
                None => Target::Flood,
            }
        };
        // Resolve the hop(s) before doing any work on the frame.
        let (hops, route): (Vec<u64>, Option<Route>) = match target {
            Target::Peer(dest) => {
                let hop = self
                    .routes
                    .unicast
                    .get(&dest)
                    .copied()
                    .or_else(|| self.peers.contains_key(&dest).then_some(dest));
                match hop {
                    Some(h) if self.peers.contains_key(&h) => {
                        let route = (h != dest).then_some(Route {
                            origin: self.shared.local,
                            destination: dest,
                        });
                        (vec![h], route)
                    }
                    _ => {
                        self.shared.stats.drop(Drop::NoRoute, 1);
                        return;
                    }
                }
            }
            Target::Flood => {
                let hops: Vec<u64> = self
                    .routes
                    .broadcast
                    .iter()
                    .copied()
                    .filter(|h| self.peers.contains_key(h))
                    .collect();
                if hops.is_empty() {
                    return;
                }
                add(&self.shared.stats.flooded, 1);
                (
                    hops,
                    Some(Route {
                        origin: self.shared.local,
                        destination: BROADCAST,
                    }),
                )
            }
        };
        let flood = matches!(target, Target::Flood);
        // The path MTU is the smallest over the hops (one per unicast frame).
        let mtu = hops
            .iter()
            .filter_map(|h| self.peers.get(h))
            .map(|p| p.overlay_mtu(self.shared.mtu))
            .min()
            .unwrap_or(self.shared.mtu);
        let prepared = match offload::prepare(frame, &h) {
            Ok(p) => p,
            Err(_) => {
                self.shared.stats.drop(Drop::Malformed, 1);
                return;
            }
        };
        let mut answered = false;
        match prepared {
            Prepared::Single(f) => self.forward(f, &hops, route, flood, mtu, &mut answered),
            Prepared::Segmented(seg) => {
                add(&self.shared.stats.segmented, 1);
                for i in 0..seg.count() {
                    let len = seg.len(i);
                    if len - 14 <= mtu {
                        // The fast path: each segment is built straight into its datagram.
                        for &hop in &hops {
                            if let Some(p) = self.peers.get_mut(&hop) {
                                p.push_frame_with(route, len, self.now, |dst| seg.write(i, dst));
                                self.queued_bytes += len;
                            }
                        }
                    } else {
                        let mut scratch = std::mem::take(&mut self.seg_buf);
                        scratch.clear();
                        scratch.resize(len, 0);
                        seg.write(i, &mut scratch);
                        self.forward(&scratch, &hops, route, flood, mtu, &mut answered);
                        self.seg_buf = scratch;
                    }
                }
            }
        }
    }

    /// Queue one wire-ready frame for `hops`; a frame larger than `mtu` is answered with ICMP
    /// (once per TAP read: `answered`), fragmented (IPv4 without DF) or dropped.
    fn forward(
        &mut self,
        f: &[u8],
        hops: &[u64],
        route: Option<Route>,
        flood: bool,
        mtu: usize,
        answered: &mut bool,
    ) {
        if f.len() - 14 <= mtu {
            for &hop in hops {
                self.push_to(hop, route, f, true);
            }
            return;
        }
        if flood {
            self.shared.stats.drop(Drop::Oversize, 1);
            return;
        }
        match icmp::classify(f) {
            TooBig::Answer => {
                self.shared.stats.drop(Drop::Oversize, 1);
                if !*answered {
                    *answered = true;
                    self.answer_too_big(f, mtu);
                }
            }
            TooBig::Fragmentable => {
                let mut fb = std::mem::take(&mut self.frag_buf);
                let mut fs = std::mem::take(&mut self.frag_segs);
                fb.clear();
                fs.clear();
                if icmp::fragment_ipv4(f, mtu, &mut fb, &mut fs) {
                    for fr in &fs {
                        for &hop in hops {
                            self.push_to(hop, route, &fb[fr.clone()], true);
                        }
                    }
                } else {
                    self.shared.stats.drop(Drop::Oversize, 1);
                }
                self.frag_buf = fb;
                self.frag_segs = fs;
            }
            TooBig::Drop => self.shared.stats.drop(Drop::Oversize, 1),
        }
    }

    fn answer_too_big(&mut self, frame: &[u8], mtu: usize) {
        let mut out = std::mem::take(&mut self.icmp_buf);
        if icmp::answer(frame, mtu.min(u16::MAX as usize) as u16, &mut out) {
            let hdr = offload::plain_vnet_hdr();
            if self.tap.write(&hdr, &out).is_ok() {
                add(&self.shared.stats.icmp_sent, 1);
                add(&self.shared.stats.tap_tx_frames, 1);
            } else {
                self.shared.stats.drop(Drop::TapError, 1);
            }
        }
        self.icmp_buf = out;
    }

    /// Seal what is open and send everything queued, one sendmmsg for all peers.
    fn flush(&mut self) {
        let now = Instant::now();
        let mut items: Vec<Outgoing<'_>> = Vec::new();
        // (peer id, segment count, segment size) per item, for error handling and stats.
        let mut meta: Vec<(u64, usize, usize)> = Vec::new();
        for p in self.peers.values_mut() {
            p.close_open(now, Kind::Data);
        }
        for p in self.peers.values() {
            let d = &p.out.dgrams;
            let mut i = 0;
            while i < d.len() {
                let (start, len) = d[i];
                let mut j = i + 1;
                let mut total = len;
                // A GSO run: equal sizes, the last may be shorter; contiguous in the buffer.
                while j < d.len()
                    && j - i < MAX_GSO_SEGMENTS
                    && d[j].1 <= len
                    && d[j].0 == d[j - 1].0 + d[j - 1].1
                    && total + d[j].1 <= MAX_GSO_BYTES
                {
                    total += d[j].1;
                    j += 1;
                    if d[j - 1].1 < len {
                        break;
                    }
                }
                let n = j - i;
                items.push(Outgoing {
                    addr: &p.addr,
                    data: &p.out.buf[start..start + total],
                    segment: if n > 1 { len as u16 } else { 0 },
                });
                meta.push((p.id, n, len));
                add(&p.stats.tx_datagrams, n as u64);
                add(&p.stats.tx_bytes, total as u64);
                i = j;
            }
        }
        if !items.is_empty() {
            let stats = &self.shared.stats;
            let mut failed: Vec<(u64, usize, i32)> = Vec::new();
            self.udp.send_batch(&mut self.scratch, &items, &mut |i, e| {
                let (peer, n, size) = meta[i];
                stats.drop(Drop::SendError, n as u64);
                failed.push((peer, size, e.raw_os_error().unwrap_or(0)));
            });
            self.last_flush_bytes = items.iter().map(|it| it.data.len()).sum();
            let datagrams: usize = meta.iter().map(|m| m.1).sum();
            add(&stats.udp_tx_datagrams, datagrams as u64);
            add(
                &stats.gso_sends,
                meta.iter().filter(|m| m.1 > 1).count() as u64,
            );
            drop(items);
            for (peer, size, errno) in failed {
                if errno == libc::EMSGSIZE {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        // The local stack says this size cannot leave: a PMTU probe failed at once,
                        // or the path shrank under traffic (search again).
                        if p.pmtu.probe.is_some_and(|pr| pr.0 == size) {
                            p.pmtu.failed(size);
                        } else if size <= p.dgram_limit() && p.pmtu.done {
                            // The path shrank under us: be conservative at once, then search.
                            let overhead = super::overhead(p.cipher.is_some());
                            let mtu = (size - 1).saturating_sub(overhead).max(576) as u32;
                            p.stats.overlay_mtu.store(mtu, Relaxed);
                            p.pmtu = super::peer::PmtuSearch::new(size - 1, now);
                        }
                    }
                }
            }
        }
        for p in self.peers.values_mut() {
            p.out.buf.clear();
            p.out.dgrams.clear();
        }
        self.queued_bytes = 0;
    }

    /// Timers: liveness, heartbeats, PMTU search, MAC ageing.
    fn tick(&mut self, now: Instant) {
        self.next_tick = now + TICK;
        let now_ns = self.shared.now_ns();
        let mtu = self.shared.mtu;
        let mut events = Vec::new();
        for p in self.peers.values_mut() {
            let last = p.stats.last_rx_ns.load(Relaxed);
            let alive = last != 0 && now_ns.saturating_sub(last) < PEER_TIMEOUT.as_nanos() as u64;
            if alive != p.stats.up.load(Relaxed) {
                p.stats.up.store(alive, Relaxed);
                events.push(if alive {
                    Event::PeerUp(p.id)
                } else {
                    Event::PeerDown(p.id)
                });
                if alive {
                    p.pmtu = super::peer::PmtuSearch::new(p.max_dgram, now);
                }
            }
            if now >= p.next_heartbeat {
                p.push_control(Kind::Heartbeat, &now_ns.to_be_bytes(), now);
                p.next_heartbeat = now + if alive { HEARTBEAT_UP } else { HEARTBEAT_DOWN };
            }
            if alive {
                if let Some(ev) = step_pmtu(p, now, mtu) {
                    events.push(ev);
                }
            }
        }
        for e in events {
            self.shared.events.push(e);
        }
        if now >= self.next_expire {
            self.next_expire = now + Duration::from_secs(30);
            self.shared
                .fdb
                .expire(self.shared.start.elapsed().as_secs());
        }
    }
}

/// Advance one peer's PMTU search; returns an event when it converges.
fn step_pmtu(p: &mut TxPeer, now: Instant, configured_mtu: usize) -> Option<Event> {
    let s = &mut p.pmtu;
    if s.done {
        if now.duration_since(s.started) >= PMTU_RESEARCH {
            p.pmtu = super::peer::PmtuSearch::new(p.max_dgram, now);
        }
        return None;
    }
    if let Some((size, id, sent, tries)) = s.probe {
        let ack = p.stats.pmtu_ack.load(Relaxed);
        if ack >> 16 == u64::from(id) && (ack & 0xffff) as usize == size {
            s.acked(size, id);
        } else if now.duration_since(sent) < PMTU_WAIT {
            return None;
        } else if tries + 1 < PMTU_TRIES {
            s.probe = Some((size, id, now, tries + 1));
            send_probe(p, size, id, now);
            return None;
        } else {
            s.failed(size);
        }
    }
    let s = &mut p.pmtu;
    match s.next_size() {
        Some(size) => {
            let id = s.next_id;
            s.next_id = s.next_id.wrapping_add(1);
            s.probe = Some((size, id, now, 0));
            send_probe(p, size, id, now);
            None
        }
        None => {
            s.done = true;
            let overhead = super::overhead(p.cipher.is_some());
            let mtu = s.good.saturating_sub(overhead).min(configured_mtu) as u32;
            let old = p.stats.overlay_mtu.swap(mtu, Relaxed);
            (old != mtu).then_some(Event::Pmtu(p.id, mtu))
        }
    }
}

/// Queue a probe datagram of exactly `size` bytes.
fn send_probe(p: &mut TxPeer, size: usize, id: u32, now: Instant) {
    let tag = if p.cipher.is_some() {
        crate::frame::TAG_LEN
    } else {
        0
    };
    let body_len = size
        .saturating_sub(crate::frame::HEADER_LEN + tag)
        .max(PMTU_BODY_LEN);
    let mut body = vec![0u8; body_len];
    body[..2].copy_from_slice(&(size.min(u16::MAX as usize) as u16).to_be_bytes());
    body[2..6].copy_from_slice(&id.to_be_bytes());
    p.push_control(Kind::PmtuProbe, &body, now);
}
