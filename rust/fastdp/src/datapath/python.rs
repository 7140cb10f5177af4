//! PyO3 wrapper for the datapath: a small control surface, documented in `_fastdp.pyi` under
//! "Datapath". Calls only push decisions in or read counters out; nothing here touches packets,
//! and nothing blocks with the GIL held (opening and closing release it).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::fdb::format_mac;
use super::stats::get;
use super::{Config, Datapath, Event, Routes};
use crate::crypto::PyDataKeys;

/// The running datapath of one router: TAP ↔ UDP in Rust threads.
#[pyclass(frozen, module = "weavenet._fastdp", name = "Datapath")]
pub struct PyDatapath {
    inner: Mutex<Option<Datapath>>,
    tap_name: String,
    udp_port: u16,
    cipher: &'static str,
    tap_offloads: u32,
    udp_gro: bool,
    udp_rcvbuf: usize,
}

fn parse_ip(addr: &str) -> PyResult<IpAddr> {
    addr.parse()
        .map_err(|_| PyValueError::new_err(format!("invalid IP address {addr:?}")))
}

impl PyDatapath {
    fn with<T>(&self, f: impl FnOnce(&Datapath) -> PyResult<T>) -> PyResult<T> {
        let guard = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("datapath lock poisoned"))?;
        match guard.as_ref() {
            Some(dp) => f(dp),
            None => Err(PyRuntimeError::new_err("datapath is closed")),
        }
    }
}

#[pymethods]
impl PyDatapath {
    /// Create the TAP `tap_name`, bind UDP `bind_addr:udp_port` (0 picks a port) and start the
    /// threads, all in the calling thread's network namespace.
    #[staticmethod]
    #[pyo3(signature = (tap_name, udp_port, mtu, local_peer_id, bind_addr = "0.0.0.0"))]
    fn open(
        py: Python<'_>,
        tap_name: &str,
        udp_port: u16,
        mtu: usize,
        local_peer_id: u64,
        bind_addr: &str,
    ) -> PyResult<Self> {
        let cfg = Config {
            tap_name: tap_name.to_string(),
            udp_port,
            bind: parse_ip(bind_addr)?,
            mtu,
            local: local_peer_id,
        };
        let dp = py
            .detach(|| Datapath::open(cfg))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidInput => PyValueError::new_err(e.to_string()),
                _ => PyOSError::new_err(format!(
                    "cannot open datapath (TAP {tap_name:?}, UDP port {udp_port}): {e}"
                )),
            })?;
        Ok(PyDatapath {
            tap_name: dp.tap_name.clone(),
            udp_port: dp.udp_port,
            cipher: dp.suite.name(),
            tap_offloads: dp.tap_offloads,
            udp_gro: dp.udp_gro,
            udp_rcvbuf: dp.udp_rcvbuf,
            inner: Mutex::new(Some(dp)),
        })
    }

    /// Add or replace a peer: its underlay address and, for an encrypted link, the `DataKeys` from
    /// the connection's handshake (None: plain, for trusted peers or no password).
    #[pyo3(signature = (peer_id, addr, port, keys))]
    fn set_peer(
        &self,
        peer_id: u64,
        addr: &str,
        port: u16,
        keys: Option<PyRef<'_, PyDataKeys>>,
    ) -> PyResult<()> {
        let sa = SocketAddr::new(parse_ip(addr)?, port);
        let keys = keys.map(|k| (*k.keys().tx_key(), *k.keys().rx_key()));
        self.with(|dp| {
            dp.set_peer(peer_id, sa, keys)
                .map_err(|e| PyValueError::new_err(e.to_string()))
        })
    }

    fn remove_peer(&self, peer_id: u64) -> PyResult<()> {
        self.with(|dp| {
            dp.remove_peer(peer_id);
            Ok(())
        })
    }

    /// Replace the routes: `unicast` destination → next hop; `broadcast` our next hops for frames
    /// we flood; `broadcast_via` origin → our next hops for frames that origin flooded.
    #[pyo3(signature = (unicast, broadcast, broadcast_via = None))]
    fn set_routes(
        &self,
        unicast: HashMap<u64, u64>,
        broadcast: Vec<u64>,
        broadcast_via: Option<HashMap<u64, Vec<u64>>>,
    ) -> PyResult<()> {
        let routes = Routes {
            unicast,
            broadcast,
            broadcast_via: broadcast_via.unwrap_or_default(),
        };
        self.with(|dp| {
            dp.set_routes(routes);
            Ok(())
        })
    }

    /// A file descriptor that becomes readable when events are waiting (trio: wait_readable).
    fn events_fd(&self) -> PyResult<i32> {
        self.with(|dp| Ok(dp.events_fd()))
    }

    /// Take the waiting events: ("peer_up", peer) | ("peer_down", peer) | ("pmtu", peer, mtu) |
    /// ("mac_learned", mac, peer) | ("mac_moved", mac, old_peer, new_peer) |
    /// ("peer_endpoint", peer, "ip:port") | ("datapath_failed", message).
    fn drain_events<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let events = self.with(|dp| Ok(dp.drain_events()))?;
        events
            .into_iter()
            .map(|e| match e {
                Event::PeerUp(p) => ("peer_up", p).into_pyobject(py),
                Event::PeerDown(p) => ("peer_down", p).into_pyobject(py),
                Event::Pmtu(p, m) => ("pmtu", p, m).into_pyobject(py),
                Event::MacLearned(mac, p) => ("mac_learned", format_mac(&mac), p).into_pyobject(py),
                Event::Failed(why) => ("datapath_failed", why).into_pyobject(py),
                Event::Endpoint(p, addr) => {
                    ("peer_endpoint", p, addr.to_string()).into_pyobject(py)
                }
                Event::MacMoved(mac, a, b) => {
                    ("mac_moved", format_mac(&mac), a, b).into_pyobject(py)
                }
            })
            .collect()
    }

    /// Counters: totals, drops by reason, and per peer (see the stub for the keys).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.with(|dp| {
            let sh = dp.shared();
            let s = &sh.stats;
            let d = PyDict::new(py);
            for (name, c) in [
                ("tap_rx_frames", &s.tap_rx_frames),
                ("tap_rx_bytes", &s.tap_rx_bytes),
                ("tap_tx_frames", &s.tap_tx_frames),
                ("tap_tx_bytes", &s.tap_tx_bytes),
                ("segmented", &s.segmented),
                ("coalesced", &s.coalesced),
                ("udp_tx_datagrams", &s.udp_tx_datagrams),
                ("udp_rx_datagrams", &s.udp_rx_datagrams),
                ("gso_sends", &s.gso_sends),
                ("gro_receives", &s.gro_receives),
                ("relayed", &s.relayed),
                ("flooded", &s.flooded),
                ("icmp_sent", &s.icmp_sent),
                ("sent_inline", &s.sent_inline),
            ] {
                d.set_item(name, get(c))?;
            }
            d.set_item("events_dropped", sh.events.dropped.load(Relaxed))?;
            d.set_item("fdb_entries", sh.fdb.len())?;
            let drops = PyDict::new(py);
            for (name, n) in s.drops() {
                drops.set_item(name, n)?;
            }
            d.set_item("drops", drops)?;
            let peers = PyDict::new(py);
            let table = sh
                .peers
                .lock()
                .map_err(|_| PyRuntimeError::new_err("datapath lock poisoned"))?;
            for (id, info) in table.iter() {
                let p = PyDict::new(py);
                let ps = &info.stats;
                p.set_item("addr", info.addr.to_string())?;
                p.set_item("encrypted", info.encrypted)?;
                p.set_item("up", ps.up.load(Relaxed))?;
                for (name, c) in [
                    ("tx_datagrams", &ps.tx_datagrams),
                    ("tx_bytes", &ps.tx_bytes),
                    ("tx_frames", &ps.tx_frames),
                    ("rx_datagrams", &ps.rx_datagrams),
                    ("rx_bytes", &ps.rx_bytes),
                    ("rx_frames", &ps.rx_frames),
                    ("rtt_us", &ps.rtt_us),
                ] {
                    p.set_item(name, get(c))?;
                }
                p.set_item("overlay_mtu", ps.overlay_mtu.load(Relaxed))?;
                peers.set_item(*id, p)?;
            }
            d.set_item("peers", peers)?;
            Ok(d)
        })
    }

    /// Stop the threads and close the TAP (it disappears) and the socket. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let dp = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("datapath lock poisoned"))?
            .take();
        if let Some(mut dp) = dp {
            py.detach(move || dp.close());
        }
        Ok(())
    }

    #[getter]
    fn tap_name(&self) -> &str {
        &self.tap_name
    }

    #[getter]
    fn udp_port(&self) -> u16 {
        self.udp_port
    }

    /// The AEAD this host seals with ("aes-256-gcm" or "chacha20-poly1305").
    #[getter]
    fn cipher(&self) -> &'static str {
        self.cipher
    }

    /// TUN_F_* offload bits the kernel accepted for the TAP.
    #[getter]
    fn tap_offloads(&self) -> u32 {
        self.tap_offloads
    }

    #[getter]
    fn udp_gro(&self) -> bool {
        self.udp_gro
    }

    /// The socket receive buffer the kernel granted, in bytes.
    #[getter]
    fn udp_rcvbuf(&self) -> usize {
        self.udp_rcvbuf
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().map(|g| g.is_none()).unwrap_or(true)
    }

    fn __repr__(&self) -> String {
        format!(
            "Datapath(tap={:?}, udp_port={}, cipher={})",
            self.tap_name, self.udp_port, self.cipher
        )
    }
}

/// The largest overlay MTU (L3) an underlay MTU allows, for plain or encrypted links.
#[pyfunction]
#[pyo3(signature = (underlay_mtu, encrypted, ipv6_underlay = false))]
fn datapath_overlay_mtu(underlay_mtu: usize, encrypted: bool, ipv6_underlay: bool) -> usize {
    super::overlay_mtu(underlay_mtu, encrypted, ipv6_underlay)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDatapath>()?;
    m.add_function(wrap_pyfunction!(datapath_overlay_mtu, m)?)?;
    Ok(())
}
