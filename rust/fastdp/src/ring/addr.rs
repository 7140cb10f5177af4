//! Address arithmetic for the ring: IPv4 ranges, their display, CIDR-aligned blocks, peer names.
//!
//! Addresses are IPv4 values held in `u64` so that the end of a range covering 255.255.255.255
//! (2^32) is representable; nothing here allocates or fails silently.

use std::fmt;

use super::error::RingError;

/// One past the last IPv4 address.
pub const ADDRESS_SPACE_END: u64 = 1 << 32;

/// The largest peer name: peer names are 48-bit, MAC-like values.
pub const MAX_PEER: u64 = (1 << 48) - 1;

/// A half-open IPv4 range [start, end), never empty, never past 2^32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrRange {
    pub start: u64,
    pub end: u64,
}

impl AddrRange {
    /// A validated range: `start < end <= 2^32`.
    pub fn new(start: u64, end: u64) -> Result<Self, RingError> {
        if start >= end || end > ADDRESS_SPACE_END {
            return Err(RingError::Invalid(format!(
                "invalid address range [{start}, {end}): need start < end <= 2^32"
            )));
        }
        Ok(Self { start, end })
    }

    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The prefix length when the range is exactly one CIDR block.
    fn prefix_len(&self) -> Option<u32> {
        let size = self.size();
        if size.is_power_of_two() && self.start % size == 0 {
            Some(32 - size.trailing_zeros())
        } else {
            None
        }
    }
}

impl fmt::Display for AddrRange {
    /// `10.32.0.0/12` for a CIDR block, `10.0.0.1-10.0.0.6` (inclusive) for anything else.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix_len() {
            Some(len) => write!(f, "{}/{len}", Ip(self.start)),
            None => write!(f, "{}-{}", Ip(self.start), Ip(self.end - 1)),
        }
    }
}

/// Dotted-quad display of an address.
pub struct Ip(pub u64);

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [_, _, _, _, a, b, c, d] = self.0.to_be_bytes();
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Peer-name display, `aa:bb:cc:dd:ee:ff`, as Weave Net users know it.
pub struct Peer(pub u64);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0.to_be_bytes();
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[2], b[3], b[4], b[5], b[6], b[7]
        )
    }
}

/// A peer name must be a non-zero 48-bit value (0 means "unknown" and never owns anything).
pub fn check_peer(peer: u64, what: &str) -> Result<u64, RingError> {
    if peer == 0 || peer > MAX_PEER {
        return Err(RingError::Invalid(format!(
            "invalid {what} peer name {peer:#x}: must be a non-zero 48-bit value"
        )));
    }
    Ok(peer)
}

/// Weave Net's `BiggestCIDRRange`: a large CIDR-aligned block inside the non-empty [start, end).
///
/// M is the largest power of two <= the size. An M-aligned start gives [start, start+M); else the
/// next M boundary b if [b, b+M) fits; else a block of M/2 at the first M/2-aligned address.
pub fn biggest_cidr(start: u64, end: u64) -> (u64, u64) {
    debug_assert!(start < end);
    let size = end - start;
    let m = 1u64 << (63 - size.leading_zeros());
    if start % m == 0 {
        return (start, start + m);
    }
    let boundary = start.next_multiple_of(m);
    if boundary + m <= end {
        return (boundary, boundary + m);
    }
    let half = m / 2;
    let aligned = start.next_multiple_of(half);
    (aligned, aligned + half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_display_as_cidr_when_aligned() {
        assert_eq!(
            AddrRange::new(0x0A20_0000, 0x0A30_0000)
                .unwrap()
                .to_string(),
            "10.32.0.0/12"
        );
        assert_eq!(
            AddrRange::new(0, ADDRESS_SPACE_END).unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(
            AddrRange::new(0x0A00_0001, 0x0A00_0007)
                .unwrap()
                .to_string(),
            "10.0.0.1-10.0.0.6"
        );
        assert_eq!(
            AddrRange::new(0xFFFF_FFFF, ADDRESS_SPACE_END)
                .unwrap()
                .to_string(),
            "255.255.255.255/32"
        );
    }

    #[test]
    fn invalid_ranges_are_refused() {
        assert!(AddrRange::new(5, 5).is_err());
        assert!(AddrRange::new(6, 5).is_err());
        assert!(AddrRange::new(0, ADDRESS_SPACE_END + 1).is_err());
    }

    #[test]
    fn peer_names_display_like_macs() {
        assert_eq!(Peer(0x0a0b_0c0d_0e0f).to_string(), "0a:0b:0c:0d:0e:0f");
        assert!(check_peer(0, "test").is_err());
        assert!(check_peer(MAX_PEER + 1, "test").is_err());
        assert_eq!(check_peer(MAX_PEER, "test").unwrap(), MAX_PEER);
    }

    #[test]
    fn biggest_cidr_follows_weave() {
        // Aligned start: the whole power-of-two prefix.
        assert_eq!(biggest_cidr(0, 47), (0, 32));
        // Next boundary fits.
        assert_eq!(biggest_cidr(1, 8), (4, 8));
        assert_eq!(biggest_cidr(3, 40), (16, 32));
        // Neither: half a block at the first half-aligned address.
        assert_eq!(biggest_cidr(5, 13), (8, 12));
        assert_eq!(biggest_cidr(7, 8), (7, 8));
        assert_eq!(biggest_cidr(0, ADDRESS_SPACE_END), (0, ADDRESS_SPACE_END));
    }
}
