//! The datapath engine: TAP ↔ UDP, in its own threads, never touching Python per packet.
//!
//! Split like wireguard-go's `device/`: `tap` and `udp` own the two fds; `send` is the thread that
//! reads the TAP (plus relays and control replies) and sends datagrams; `receive` is the thread that
//! reads the socket and writes the TAP; `fdb` is the MAC table, `peer` the per-peer send state and
//! PMTU search, `crypto` the data AEAD and replay window, `offload` segmentation/coalescing,
//! `icmp` the too-big answers, `stats` the counters, `pools` the buffer pool and `python` the PyO3
//! wrapper. The router (Python) decides peers, routes and keys and pushes them in through `Cmd`s;
//! the engine reports through `Event`s and counters. No lock is held across a syscall, and no
//! Python code ever runs on these threads.

pub mod crypto;
pub mod fdb;
pub mod icmp;
pub mod offload;
pub mod peer;
pub mod pools;
mod python;
mod receive;
mod send;
pub mod stats;
pub mod sys;
pub mod tap;
pub mod udp;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::frame::{self, Kind};
use fdb::{Fdb, Mac};
use pools::Pool;
use stats::{PeerStats, Stats};
use sys::EventFd;

pub use python::register;

/// Bytes the overlay costs per frame on top of the L3 packet (Ethernet header, our header,
/// route, length prefix, tag when encrypted), excluding the underlay's IP/UDP headers.
pub fn overhead(encrypted: bool) -> usize {
    14 + frame::MAX_OVERHEAD - if encrypted { 0 } else { frame::TAG_LEN }
}

/// The largest overlay MTU an underlay MTU allows.
pub fn overlay_mtu(underlay_mtu: usize, encrypted: bool, ipv6_underlay: bool) -> usize {
    let ip_udp = if ipv6_underlay { 48 } else { 28 };
    underlay_mtu.saturating_sub(ip_udp + overhead(encrypted))
}

/// Default busy-poll window after activity (off): a thread keeps polling this long before it
/// sleeps. Measured on the 2-core VM it did not lower RTT beyond noise once the receive thread
/// sends answers itself (`SendThread::poke`), and it costs CPU other work needs.
/// `WEAVENET_DP_SPIN_US` sets it (e.g. 50) for experiments on other machines.
pub const DEFAULT_SPIN_US: u64 = 0;

fn spin_from_env() -> std::time::Duration {
    let us = std::env::var("WEAVENET_DP_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SPIN_US);
    std::time::Duration::from_micros(us.min(10_000))
}

// The threads stay SCHED_OTHER. SCHED_BATCH (no wake-up preemption) kept an idle VM's round trip
// on one vCPU (RTT -10 %), but with the CPUs busy a woken datapath thread then waits for the tick:
// 2.4 ms instead of 0.08 ms per ping under two CPU hogs.

/// What the router configures once.
#[derive(Debug, Clone)]
pub struct Config {
    pub tap_name: String,
    pub udp_port: u16,
    pub bind: IpAddr,
    /// Overlay MTU: the largest L3 packet carried; larger ones get ICMP answers.
    pub mtu: usize,
    pub local: u64,
}

/// What the engine reports to the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    PeerUp(u64),
    PeerDown(u64),
    /// The overlay MTU (L3) the path to this peer carries, after discovery.
    Pmtu(u64, u32),
    MacLearned(Mac, u64),
    MacMoved(Mac, u64, u64),
    /// A peer's authenticated datagrams now come from this address (NAT rebinding, a move).
    Endpoint(u64, SocketAddr),
    /// A datapath thread died (a bug): the datapath has stopped; the router should reopen it.
    Failed(String),
}

/// Queue of events plus the eventfd the router's loop waits on.
pub struct Events {
    queue: Mutex<VecDeque<Event>>,
    fd: EventFd,
    pub dropped: AtomicU64,
}

const MAX_EVENTS: usize = 65536;

impl Events {
    pub fn push(&self, e: Event) {
        if let Ok(mut q) = self.queue.lock() {
            if q.len() >= MAX_EVENTS {
                self.dropped.fetch_add(1, Relaxed);
                return;
            }
            q.push_back(e);
        }
        self.fd.notify();
    }

    pub fn drain(&self) -> Vec<Event> {
        self.fd.clear();
        self.queue
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

/// Routes pushed by the router.
#[derive(Debug, Default, Clone)]
pub struct Routes {
    /// Destination peer → next hop (a direct peer).
    pub unicast: HashMap<u64, u64>,
    /// Our next hops for frames we flood.
    pub broadcast: Vec<u64>,
    /// For frames flooded by origin O: our next hops along O's broadcast tree.
    pub broadcast_via: HashMap<u64, Vec<u64>>,
}

/// Per-peer facts the stats reader needs.
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub encrypted: bool,
    pub stats: Arc<PeerStats>,
}

/// State both threads and the control side share.
pub struct Shared {
    pub stats: Stats,
    pub events: Events,
    pub fdb: Fdb,
    pub peers: Mutex<HashMap<u64, PeerInfo>>,
    pub start: Instant,
    pub shutdown: AtomicBool,
    pub local: u64,
    pub mtu: usize,
    pub pool: Pool,
    /// How long a thread keeps polling without sleeping after activity (latency vs idle CPU).
    pub spin: std::time::Duration,
}

impl Shared {
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Learn a source MAC and report news. `last` caches the previous call's arguments, so a
    /// burst from one MAC costs a comparison, not a hash lookup.
    pub fn learn(&self, last: &mut Option<(Mac, u64, u64)>, mac: Mac, peer: u64, now_s: u64) {
        if *last == Some((mac, peer, now_s)) {
            return;
        }
        *last = Some((mac, peer, now_s));
        match self.fdb.learn(mac, peer, now_s) {
            fdb::Learned::Known => {}
            fdb::Learned::New => self.events.push(Event::MacLearned(mac, peer)),
            fdb::Learned::Moved(from) => self.events.push(Event::MacMoved(mac, from, peer)),
        }
    }
}

/// Control commands to a thread.
pub enum Cmd {
    SetPeer {
        id: u64,
        addr: SocketAddr,
        key: Option<[u8; 32]>,
        stats: Arc<PeerStats>,
    },
    RemovePeer(u64),
    Routes(Arc<Routes>),
}

/// Work the receive thread hands to the send thread.
pub enum TxWork {
    /// A frame to pass on: towards `destination`, or along `origin`'s tree when broadcast.
    Relay {
        from_hop: u64,
        origin: u64,
        destination: u64,
        frame: Vec<u8>,
    },
    /// The peer's datagrams now come from `addr`: send there.
    Endpoint { peer: u64, addr: SocketAddr },
    /// A control datagram to `peer`.
    Control {
        peer: u64,
        kind: Kind,
        body: Vec<u8>,
    },
}

/// Run a thread body; if it panics (a bug), stop the datapath and tell the router instead of
/// leaving half a datapath running silently.
fn guarded(
    shared: Arc<Shared>,
    name: &'static str,
    body: impl FnOnce() + Send + 'static,
) -> impl FnOnce() + Send + 'static {
    move || {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            shared.shutdown.store(true, Relaxed);
            shared.events.push(Event::Failed(format!(
                "datapath {name} thread failed: {what}"
            )));
        }
    }
}

/// A control handle to one datapath thread.
struct Control {
    cmds: Sender<Cmd>,
    wake: Arc<EventFd>,
}

impl Control {
    fn send(&self, cmd: Cmd) {
        // A send error means the thread has exited (closing): nothing left to configure.
        let _ = self.cmds.send(cmd);
        self.wake.notify();
    }
}

/// A running datapath.
pub struct Datapath {
    shared: Arc<Shared>,
    tx: Control,
    rx: Control,
    threads: Vec<JoinHandle<()>>,
    pub tap_name: String,
    pub udp_port: u16,
    pub tap_offloads: u32,
    pub udp_gro: bool,
    pub udp_rcvbuf: usize,
    pub suite: crypto::Suite,
}

impl Datapath {
    /// Create the TAP, bind the socket and start the threads (in the caller's network namespace).
    pub fn open(cfg: Config) -> io::Result<Datapath> {
        if cfg.local == 0 || cfg.local > frame::MAX_PEER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "local peer id must be a non-zero 48-bit value",
            ));
        }
        if !(576..=65000).contains(&cfg.mtu) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mtu must be between 576 and 65000",
            ));
        }
        let tap = Arc::new(tap::Tap::open(&cfg.tap_name)?);
        let udp = Arc::new(udp::Udp::bind(cfg.bind, cfg.udp_port)?);
        let shared = Arc::new(Shared {
            stats: Stats::default(),
            events: Events {
                queue: Mutex::new(VecDeque::new()),
                fd: EventFd::new()?,
                dropped: AtomicU64::new(0),
            },
            fdb: Fdb::default(),
            peers: Mutex::new(HashMap::new()),
            start: Instant::now(),
            shutdown: AtomicBool::new(false),
            local: cfg.local,
            mtu: cfg.mtu,
            pool: Pool::new(4096),
            spin: spin_from_env(),
        });
        let suite = crypto::Suite::for_this_cpu();
        let (tx_cmds, tx_cmd_rx): (Sender<Cmd>, Receiver<Cmd>) = mpsc::channel();
        let (rx_cmds, rx_cmd_rx): (Sender<Cmd>, Receiver<Cmd>) = mpsc::channel();
        let (work_tx, work_rx): (SyncSender<TxWork>, Receiver<TxWork>) = mpsc::sync_channel(8192);
        let tx_wake = Arc::new(EventFd::new()?);
        let rx_wake = Arc::new(EventFd::new()?);
        let waiter = Arc::new(send::Waiter::new(tap.clone(), &tx_wake, rx_wake.clone())?);
        let sender = Arc::new(Mutex::new(send::SendThread::new(
            shared.clone(),
            tap.clone(),
            udp.clone(),
            tx_cmd_rx,
            work_rx,
            tx_wake.clone(),
            suite,
        )));
        let receiver = receive::ReceiveThread::new(
            sender.clone(),
            waiter.clone(),
            shared.clone(),
            tap.clone(),
            udp.clone(),
            rx_cmd_rx,
            work_tx,
            rx_wake.clone(),
            tx_wake.clone(),
        );
        let threads = vec![
            std::thread::Builder::new()
                .name(format!("dp-send-{:04x}", cfg.local & 0xffff))
                .spawn(guarded(shared.clone(), "send", move || {
                    send::SendThread::run(sender, waiter)
                }))?,
            std::thread::Builder::new()
                .name(format!("dp-recv-{:04x}", cfg.local & 0xffff))
                .spawn(guarded(shared.clone(), "receive", move || receiver.run()))?,
        ];
        Ok(Datapath {
            shared,
            tx: Control {
                cmds: tx_cmds,
                wake: tx_wake,
            },
            rx: Control {
                cmds: rx_cmds,
                wake: rx_wake,
            },
            threads,
            tap_name: tap.name().to_string(),
            udp_port: udp.port(),
            tap_offloads: tap.offloads(),
            udp_gro: udp.gro(),
            udp_rcvbuf: udp.rcvbuf(),
            suite,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Add or replace a peer. `keys` = (our tx key, our rx key); None for plain mode.
    pub fn set_peer(
        &self,
        id: u64,
        addr: SocketAddr,
        keys: Option<([u8; 32], [u8; 32])>,
    ) -> io::Result<()> {
        if id == 0 || id > frame::MAX_PEER || id == self.shared.local {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "peer id must be a non-zero 48-bit value other than ours",
            ));
        }
        let stats = {
            let mut peers = self
                .shared
                .peers
                .lock()
                .map_err(|_| io::Error::other("datapath lock poisoned"))?;
            // A peer set again keeps its counters (and, with the same keys, its crypto state).
            let stats: Arc<PeerStats> = peers.get(&id).map(|p| p.stats.clone()).unwrap_or_default();
            let encrypted = keys.is_some();
            peers.insert(
                id,
                PeerInfo {
                    addr,
                    encrypted,
                    stats: stats.clone(),
                },
            );
            stats
        };
        self.tx.send(Cmd::SetPeer {
            id,
            addr,
            key: keys.map(|k| k.0),
            stats: stats.clone(),
        });
        self.rx.send(Cmd::SetPeer {
            id,
            addr,
            key: keys.map(|k| k.1),
            stats,
        });
        Ok(())
    }

    pub fn remove_peer(&self, id: u64) {
        if let Ok(mut peers) = self.shared.peers.lock() {
            peers.remove(&id);
        }
        self.shared.fdb.forget_peer(id);
        self.tx.send(Cmd::RemovePeer(id));
        self.rx.send(Cmd::RemovePeer(id));
    }

    pub fn set_routes(&self, routes: Routes) {
        self.tx.send(Cmd::Routes(Arc::new(routes)));
    }

    pub fn events_fd(&self) -> i32 {
        self.shared.events.fd.as_raw_fd()
    }

    pub fn drain_events(&self) -> Vec<Event> {
        self.shared.events.drain()
    }

    /// Stop the threads and close the TAP and socket (idempotent).
    pub fn close(&mut self) {
        self.shared.shutdown.store(true, Relaxed);
        self.tx.wake.notify();
        self.rx.wake.notify();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.close();
    }
}
