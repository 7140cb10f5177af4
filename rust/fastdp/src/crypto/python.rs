//! PyO3 classes for mesh crypto: thin wrappers that never hand key bytes to Python.
//!
//! Slow work (Argon2id, sealing or opening large messages) runs with the GIL released.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::handshake::{
    Handshake, HandshakeFailure, MAX_HANDSHAKE_MESSAGE, MAX_INTRO, NOISE_PATTERN,
};
use super::psk::Psk;
use super::transport::{ChannelCipher, ChannelFailure, DataKeys, TAG_LEN};

create_exception!(
    weavenet._fastdp,
    HandshakeError,
    PyValueError,
    "The mesh handshake failed; `reason` is a short phrase for status and logs (e.g. \"password mismatch\")."
);
create_exception!(
    weavenet._fastdp,
    ChannelError,
    PyValueError,
    "A control-channel message could not be sealed or opened; the connection must be closed."
);

/// Messages at least this large are sealed/opened with the GIL released.
const DETACH_AT: usize = 64 * 1024;

fn handshake_error(py: Python<'_>, failure: &HandshakeFailure) -> PyErr {
    let err = HandshakeError::new_err(failure.to_string());
    if let Err(e) = err.value(py).setattr("reason", failure.reason()) {
        return e;
    }
    err
}

fn channel_error(failure: ChannelFailure) -> PyErr {
    ChannelError::new_err(failure.to_string())
}

/// The mesh key derived from the password. Opaque: its bytes cannot be read from Python.
#[pyclass(frozen, module = "weavenet._fastdp", name = "MeshKey")]
pub struct PyMeshKey {
    psk: Psk,
}

#[pymethods]
impl PyMeshKey {
    /// Derive the key with Argon2id (about 0.2 s, 64 MiB; the GIL is released meanwhile).
    #[staticmethod]
    fn from_password(py: Python<'_>, password: &[u8]) -> PyResult<Self> {
        let psk = py
            .detach(|| Psk::derive(password))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyMeshKey { psk })
    }

    fn __repr__(&self) -> &'static str {
        "MeshKey(<secret>)"
    }
}

/// One side of a connection's password handshake; the caller moves the message bodies.
#[pyclass(module = "weavenet._fastdp", name = "MeshHandshake")]
pub struct PyMeshHandshake {
    inner: Handshake,
}

#[pymethods]
impl PyMeshHandshake {
    #[new]
    #[pyo3(signature = (mesh_key, *, initiator, intro, prologue))]
    fn new(
        py: Python<'_>,
        mesh_key: PyRef<'_, PyMeshKey>,
        initiator: bool,
        intro: &[u8],
        prologue: &[u8],
    ) -> PyResult<Self> {
        let inner = Handshake::new(&mesh_key.psk, initiator, intro, prologue)
            .map_err(|f| handshake_error(py, &f))?;
        Ok(PyMeshHandshake { inner })
    }

    /// The next body to send, or None when it is the peer's turn or the handshake is complete.
    fn write_message<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        match self.inner.write_message() {
            Ok(body) => Ok(body.map(|b| PyBytes::new(py, &b))),
            Err(f) => Err(handshake_error(py, &f)),
        }
    }

    /// Take in one body from the peer; raises HandshakeError (then see `refusal`).
    fn read_message(&mut self, py: Python<'_>, message: &[u8]) -> PyResult<()> {
        self.inner
            .read_message(message)
            .map_err(|f| handshake_error(py, &f))
    }

    #[getter]
    fn is_complete(&self) -> bool {
        self.inner.is_complete()
    }

    #[getter]
    fn initiator(&self) -> bool {
        self.inner.is_initiator()
    }

    /// After a failed read: the body to send the peer before closing, or None.
    fn refusal<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.refusal().map(|b| PyBytes::new(py, &b))
    }

    /// Take the result of a complete handshake: (cipher, data keys, the peer's intro).
    fn finish<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<(PyChannelCipher, PyDataKeys, Bound<'py, PyBytes>)> {
        let session = self.inner.finish().map_err(|f| handshake_error(py, &f))?;
        Ok((
            PyChannelCipher {
                inner: session.cipher,
            },
            PyDataKeys {
                inner: session.data_keys,
            },
            PyBytes::new(py, &session.remote_intro),
        ))
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// The control channel's AEAD after the handshake (ChaCha20-Poly1305, counter nonces).
#[pyclass(module = "weavenet._fastdp", name = "ChannelCipher")]
pub struct PyChannelCipher {
    inner: ChannelCipher,
}

#[pymethods]
impl PyChannelCipher {
    /// Encrypt and authenticate the next outgoing message (adds TAG_LEN bytes), straight into
    /// the returned bytes object.
    fn seal<'py>(&mut self, py: Python<'py>, plaintext: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        PyBytes::new_with(py, plaintext.len() + TAG_LEN, |out| {
            if plaintext.len() >= DETACH_AT {
                py.detach(|| inner.seal_into(plaintext, out))
            } else {
                inner.seal_into(plaintext, out)
            }
            .map_err(channel_error)
        })
    }

    /// Check and decrypt the next incoming message; any failure breaks the cipher for good. On
    /// failure the half-written bytes object is dropped: unauthenticated bytes never reach Python.
    fn open<'py>(&mut self, py: Python<'py>, sealed: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        let Some(len) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(channel_error(
                inner
                    .open(sealed)
                    .err()
                    .unwrap_or(ChannelFailure::Truncated),
            ));
        };
        PyBytes::new_with(py, len, |out| {
            if sealed.len() >= DETACH_AT {
                py.detach(|| inner.open_into(sealed, out))
            } else {
                inner.open_into(sealed, out)
            }
            .map_err(channel_error)
        })
    }

    #[getter]
    fn broken(&self) -> bool {
        self.inner.is_broken()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// Per-direction data-plane keys from one connection's handshake. Opaque to Python.
#[pyclass(frozen, module = "weavenet._fastdp", name = "DataKeys")]
pub struct PyDataKeys {
    inner: DataKeys,
}

impl PyDataKeys {
    /// The keys, for the Rust datapath.
    pub fn keys(&self) -> &DataKeys {
        &self.inner
    }
}

#[pymethods]
impl PyDataKeys {
    /// A short non-secret hash (16 hex digits), equal at both ends of the connection.
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }

    /// Whether our side dialled the connection.
    #[getter]
    fn initiator(&self) -> bool {
        self.inner.we_initiated()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// Add the mesh crypto classes, exceptions and constants to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyMeshKey>()?;
    m.add_class::<PyMeshHandshake>()?;
    m.add_class::<PyChannelCipher>()?;
    m.add_class::<PyDataKeys>()?;
    m.add("HandshakeError", py.get_type::<HandshakeError>())?;
    m.add("ChannelError", py.get_type::<ChannelError>())?;
    m.add("NOISE_PATTERN", NOISE_PATTERN)?;
    m.add("HANDSHAKE_MAX_MESSAGE", MAX_HANDSHAKE_MESSAGE)?;
    m.add("HANDSHAKE_MAX_INTRO", MAX_INTRO)?;
    m.add("CHANNEL_TAG_LEN", TAG_LEN)?;
    Ok(())
}
