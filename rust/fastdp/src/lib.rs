//! PyO3 bindings only: thin, typed, and releasing the GIL around blocking work.
//!
//! Every function exposed here is documented in `python/weavenet/_fastdp.pyi`; keep the two in step.
//! Each domain module (`ring`, `crypto`, `datapath`) owns a `register` function that adds its
//! classes and functions, so this file stays a table of contents.

mod crypto;
mod datapath;
mod frame;
mod ring;

use pyo3::prelude::*;

/// The version of the compiled core; the Python package checks it matches its own at import.
#[pyfunction]
fn core_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _fastdp(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(core_version, m)?)?;
    crypto::register(m)?;
    datapath::register(m)?;
    ring::register(m)?;
    Ok(())
}
