//! The mesh pre-shared key: WEAVE_PASSWORD stretched once per router start with Argon2id.
//!
//! The key never leaves Rust: it is only ever fed to the PAKE in `handshake.rs`. Nothing here may
//! log, print or return its bytes (its `Debug` shows nothing secret).
//!
//! Parameters: Argon2id, m = 64 MiB, t = 3, p = 1, 32-byte output. That is RFC 9106's second
//! recommended profile with p = 1 (one lane; our hosts may have 2 cores and the router is busy
//! starting). It costs about 0.1–0.3 s and 64 MiB once per router start, which is nothing next to
//! start-up, while every password guess an attacker tests against a *recorded* exchange (see
//! `handshake.rs`: only possible by breaking the PAKE's discrete-log assumption) costs the same.
//! The salt is fixed, versioned and domain separating, so every router with the same password
//! derives the same key without any coordination; a new salt version means a new protocol version.

use std::fmt;

use argon2::{Algorithm, Argon2, Params, Version};
use zeroize::Zeroizing;

/// Domain-separating, versioned salt: all routers of this protocol version use it.
pub const PSK_SALT: &[u8] = b"weavenet mesh psk v1";
/// Argon2id memory cost in KiB (64 MiB).
pub const ARGON2_M_KIB: u32 = 64 * 1024;
/// Argon2id passes over the memory.
pub const ARGON2_T: u32 = 3;
/// Argon2id lanes.
pub const ARGON2_P: u32 = 1;
/// Length of the derived key.
pub const PSK_LEN: usize = 32;

/// Why a key could not be derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PskError {
    /// An empty password is "no password": the caller must use plain mode instead.
    Empty,
    /// Argon2 refused its inputs (a password longer than 4 GiB, or bad parameters).
    Kdf(String),
}

impl fmt::Display for PskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PskError::Empty => f.write_str(
                "the mesh password is empty; leave WEAVE_PASSWORD unset for no encryption",
            ),
            PskError::Kdf(why) => write!(f, "cannot derive the mesh key from the password: {why}"),
        }
    }
}

/// The 32-byte mesh key, zeroed when dropped.
#[derive(Clone)]
pub struct Psk(Zeroizing<[u8; PSK_LEN]>);

impl Psk {
    /// Stretch `password` with the production Argon2id parameters (slow on purpose; call it once).
    pub fn derive(password: &[u8]) -> Result<Psk, PskError> {
        Psk::derive_with(password, ARGON2_M_KIB, ARGON2_T, ARGON2_P)
    }

    /// Stretch `password` with explicit parameters (tests use cheap ones; production uses `derive`).
    pub fn derive_with(password: &[u8], m_kib: u32, t: u32, p: u32) -> Result<Psk, PskError> {
        if password.is_empty() {
            return Err(PskError::Empty);
        }
        let params =
            Params::new(m_kib, t, p, Some(PSK_LEN)).map_err(|e| PskError::Kdf(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; PSK_LEN]);
        argon
            .hash_password_into(password, PSK_SALT, key.as_mut_slice())
            .map_err(|e| PskError::Kdf(e.to_string()))?;
        Ok(Psk(key))
    }

    /// The key bytes, for the PAKE only.
    pub(crate) fn expose(&self) -> &[u8; PSK_LEN] {
        &self.0
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<secret>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_password_same_key_and_different_password_different_key() {
        let a = Psk::derive_with(b"correct horse", 64, 1, 1).unwrap();
        let b = Psk::derive_with(b"correct horse", 64, 1, 1).unwrap();
        let c = Psk::derive_with(b"battery staple", 64, 1, 1).unwrap();
        assert_eq!(a.expose(), b.expose());
        assert_ne!(a.expose(), c.expose());
    }

    #[test]
    fn production_parameters_are_deterministic() {
        // One real derivation: the production parameters are accepted and stable across calls.
        let a = Psk::derive(b"s3cret").unwrap();
        let b = Psk::derive(b"s3cret").unwrap();
        assert_eq!(a.expose(), b.expose());
    }

    #[test]
    fn empty_password_is_refused() {
        assert_eq!(Psk::derive(b"").unwrap_err(), PskError::Empty);
    }

    #[test]
    fn debug_shows_nothing_secret() {
        let k = Psk::derive_with(b"pw", 64, 1, 1).unwrap();
        assert_eq!(format!("{k:?}"), "Psk(<secret>)");
    }
}
