//! Ring errors. Each message is one line a user can act on; python.rs maps each kind to a
//! `ValueError` subclass. Every operation that returns an error has left the ring unchanged.

use std::fmt;

use super::addr::AddrRange;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingError {
    /// Merge refused: the two rings divide different address ranges.
    RangeMismatch { ours: AddrRange, theirs: AddrRange },
    /// Merge refused: the two rings were created independently (different seeds or consensus).
    ClusterMismatch { ours: u64, theirs: u64 },
    /// Bytes that are not a valid encoded ring.
    Decode(String),
    /// A bad argument, or an operation the ring's state does not allow (the message says which).
    Invalid(String),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::RangeMismatch { ours, theirs } => write!(
                f,
                "ring range mismatch: ours {ours}, theirs {theirs} \
                 (every peer must use the same allocation range)"
            ),
            RingError::ClusterMismatch { ours, theirs } => write!(
                f,
                "ring cluster mismatch: ours {ours:#018x}, theirs {theirs:#018x} \
                 (the rings were seeded independently; reset IPAM data on one side to join the other)"
            ),
            RingError::Decode(detail) => write!(f, "invalid ring encoding: {detail}"),
            RingError::Invalid(detail) => f.write_str(detail),
        }
    }
}

impl std::error::Error for RingError {}

/// Shorthand for the `Invalid` kind.
pub fn invalid(message: String) -> RingError {
    RingError::Invalid(message)
}
