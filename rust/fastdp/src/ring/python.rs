//! The ring as Python sees it: `Ring`, `RingEntry` and the `RingError` family, documented in
//! `python/weavenet/_fastdp.pyi`. Thin: argument defaults and conversions only, no logic.

use std::collections::BTreeMap;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::addr::{AddrRange, Peer};
use super::codec::FORMAT_VERSION;
use super::entry::Entry;
use super::error::RingError as CoreError;
use super::mutate::{cluster_id_for_seed, normalise_seed};
use super::Ring;

create_exception!(
    weavenet._fastdp,
    RingError,
    PyValueError,
    "A ring operation was refused; the ring is unchanged."
);
create_exception!(
    weavenet._fastdp,
    RingMismatchError,
    RingError,
    "Merge refused: the rings divide different ranges or belong to different clusters."
);
create_exception!(
    weavenet._fastdp,
    RingDecodeError,
    RingError,
    "Bytes that are not a valid encoded ring."
);

fn to_py(err: CoreError) -> PyErr {
    let message = err.to_string();
    match err {
        CoreError::RangeMismatch { .. } | CoreError::ClusterMismatch { .. } => {
            RingMismatchError::new_err(message)
        }
        CoreError::Decode(_) => RingDecodeError::new_err(message),
        CoreError::Invalid(_) => RingError::new_err(message),
    }
}

/// One ring entry as status and tests see it.
#[pyclass(name = "RingEntry", module = "weavenet._fastdp", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyRingEntry {
    #[pyo3(get)]
    token: u64,
    #[pyo3(get)]
    size: u64,
    #[pyo3(get)]
    peer: u64,
    #[pyo3(get)]
    version: u64,
    #[pyo3(get)]
    free: u64,
    #[pyo3(get)]
    free_seq: u64,
}

#[pymethods]
impl PyRingEntry {
    /// (token, size, peer, version, free, free_seq)
    fn as_tuple(&self) -> (u64, u64, u64, u64, u64, u64) {
        (
            self.token,
            self.size,
            self.peer,
            self.version,
            self.free,
            self.free_seq,
        )
    }

    fn __repr__(&self) -> String {
        format!(
            "RingEntry(token={}, size={}, peer={}, version={}, free={}, free_seq={})",
            super::addr::Ip(self.token),
            self.size,
            Peer(self.peer),
            self.version,
            self.free,
            self.free_seq
        )
    }
}

/// One peer's replica of the IPAM ring plus its own allocations.
#[pyclass(name = "Ring", module = "weavenet._fastdp")]
pub struct PyRing {
    inner: Ring,
}

fn u64_list(peers: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    peers.try_iter()?.map(|p| p?.extract::<u64>()).collect()
}

#[pymethods]
impl PyRing {
    #[new]
    #[pyo3(signature = (start, end, peer, cluster_id = 0))]
    fn new(start: u64, end: u64, peer: u64, cluster_id: u64) -> PyResult<Self> {
        let range = AddrRange::new(start, end).map_err(to_py)?;
        Ok(Self {
            inner: Ring::new(range, peer, cluster_id).map_err(to_py)?,
        })
    }

    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Ok(Self {
            inner: Ring::from_bytes(data).map_err(to_py)?,
        })
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn cluster_id_for_seed(peers: &Bound<'_, PyAny>) -> PyResult<u64> {
        let seed = normalise_seed(&u64_list(peers)?).map_err(to_py)?;
        Ok(cluster_id_for_seed(&seed))
    }

    #[classattr]
    const FORMAT_VERSION: u8 = FORMAT_VERSION;

    #[getter]
    fn start(&self) -> u64 {
        self.inner.range().start
    }

    #[getter]
    fn end(&self) -> u64 {
        self.inner.range().end
    }

    #[getter]
    fn range_text(&self) -> String {
        self.inner.range().to_string()
    }

    #[getter]
    fn peer(&self) -> u64 {
        self.inner.peer()
    }

    #[getter]
    fn cluster_id(&self) -> u64 {
        self.inner.cluster_id()
    }

    fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    #[pyo3(signature = (peers, cluster_id = None))]
    fn claim_for_peers(
        &mut self,
        peers: &Bound<'_, PyAny>,
        cluster_id: Option<u64>,
    ) -> PyResult<()> {
        self.inner
            .claim_for_peers(&u64_list(peers)?, cluster_id)
            .map_err(to_py)
    }

    fn merge(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> PyResult<bool> {
        if slf.is(other) {
            return Ok(false);
        }
        let other = other.borrow();
        let mut this = slf.borrow_mut();
        this.inner.merge(&other.inner).map_err(to_py)
    }

    fn grant(&mut self, start: u64, end: u64, to_peer: u64) -> PyResult<()> {
        self.inner.grant(start, end, to_peer).map_err(to_py)
    }

    fn transfer(&mut self, from_peer: u64, to_peer: u64) -> PyResult<Vec<(u64, u64)>> {
        self.inner.transfer(from_peer, to_peer).map_err(to_py)
    }

    fn donate(&mut self, start: u64, end: u64, to_peer: u64) -> PyResult<Option<(u64, u64)>> {
        self.inner.donate(start, end, to_peer).map_err(to_py)
    }

    fn report_free(&mut self) -> bool {
        self.inner.report_free()
    }

    #[pyo3(signature = (start = None, end = None))]
    fn allocate(&mut self, start: Option<u64>, end: Option<u64>) -> PyResult<Option<u64>> {
        let (s, e) = self.bounds(start, end);
        self.inner.allocate(s, e).map_err(to_py)
    }

    fn claim_address(&mut self, addr: u64) -> PyResult<bool> {
        self.inner.claim_address(addr).map_err(to_py)
    }

    fn release(&mut self, addr: u64) -> PyResult<bool> {
        self.inner.release(addr).map_err(to_py)
    }

    fn is_allocated(&self, addr: u64) -> bool {
        self.inner.is_allocated(addr)
    }

    fn allocated_count(&self) -> u64 {
        self.inner.allocated_count()
    }

    fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        self.inner.allocated_ranges()
    }

    fn clear_allocations(&mut self) {
        self.inner.clear_allocations()
    }

    #[pyo3(signature = (start = None, end = None))]
    fn free_count(&self, start: Option<u64>, end: Option<u64>) -> PyResult<u64> {
        let (s, e) = self.bounds(start, end);
        self.inner.free_count(s, e).map_err(to_py)
    }

    fn disputed_ranges(&self) -> Vec<(u64, u64)> {
        self.inner.disputed_ranges()
    }

    fn owner(&self, addr: u64) -> Option<u64> {
        self.inner.owner(addr)
    }

    #[pyo3(signature = (peer = None))]
    fn owned_ranges(&self, peer: Option<u64>) -> Vec<(u64, u64)> {
        self.inner.owned_ranges(peer.unwrap_or(self.inner.peer()))
    }

    fn peers(&self) -> Vec<u64> {
        self.inner.peers()
    }

    fn free_by_owner(&self) -> BTreeMap<u64, u64> {
        self.inner.free_by_owner()
    }

    fn size_by_owner(&self) -> BTreeMap<u64, u64> {
        self.inner.size_by_owner()
    }

    #[pyo3(signature = (start = None, end = None))]
    fn choose_donors(&self, start: Option<u64>, end: Option<u64>) -> PyResult<Vec<u64>> {
        let (s, e) = self.bounds(start, end);
        self.inner.choose_donors(s, e).map_err(to_py)
    }

    fn entries(&self) -> Vec<PyRingEntry> {
        let ring = &self.inner;
        let entries = ring.entries();
        (0..entries.len())
            .map(|i| {
                let Entry {
                    token,
                    owner,
                    version,
                    free_seq,
                    free,
                } = entries[i];
                PyRingEntry {
                    token,
                    size: ring.entry_size(i),
                    peer: owner,
                    version,
                    free,
                    free_seq,
                }
            })
            .collect()
    }

    fn check_invariants(&self) -> PyResult<()> {
        self.inner
            .check()
            .map_err(|m| RingError::new_err(format!("ring invariant broken: {m}")))
    }

    fn copy(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }

    fn __copy__(&self) -> Self {
        self.copy()
    }

    fn __deepcopy__(&self, _memo: &Bound<'_, PyAny>) -> Self {
        self.copy()
    }

    fn __repr__(&self) -> String {
        format!(
            "Ring({}, peer={}, entries={}, cluster_id={:#018x})",
            self.inner.range(),
            Peer(self.inner.peer()),
            self.inner.entries().len(),
            self.inner.cluster_id()
        )
    }
}

impl PyRing {
    /// Defaults for optional [start, end) arguments: the whole ring range.
    fn bounds(&self, start: Option<u64>, end: Option<u64>) -> (u64, u64) {
        let range = self.inner.range();
        (start.unwrap_or(range.start), end.unwrap_or(range.end))
    }
}

/// Add the ring's classes and exceptions to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyRing>()?;
    m.add_class::<PyRingEntry>()?;
    m.add("RingError", py.get_type::<RingError>())?;
    m.add("RingMismatchError", py.get_type::<RingMismatchError>())?;
    m.add("RingDecodeError", py.get_type::<RingDecodeError>())?;
    Ok(())
}
