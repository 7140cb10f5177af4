//! Mesh crypto: the password key, the connection handshake, the encrypted control channel and the
//! per-connection data-plane keys.
//!
//! - `psk`: WEAVE_PASSWORD → 32-byte mesh key with Argon2id (once per router start).
//! - `handshake`: SPAKE2 then Noise `NNpsk0`, carrying each side's intro; see its docs for why a
//!   PAKE is needed to stop offline password guessing (router.md §2.3's weakness).
//! - `transport`: the control channel's AEAD and the data-plane `DataKeys`.
//! - `python`: the PyO3 classes (`MeshKey`, `MeshHandshake`, `ChannelCipher`, `DataKeys`) and
//!   exceptions, documented in `python/weavenet/_fastdp.pyi`.
//!
//! Never: return key bytes to Python, log secrets, or panic on bytes from the network.

pub mod handshake;
pub mod psk;
mod python;
pub mod transport;

pub use python::register;
/// The datapath takes `DataKeys` from the Python objects it is handed.
pub use python::PyDataKeys;

#[cfg(test)]
mod tests;
