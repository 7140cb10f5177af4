//! The ring's binary encoding, for gossip and persistence: compact, versioned, canonical, and
//! validated completely before a `Ring` is built. Decoding never panics and never allocates more
//! than the input could describe.
//!
//! Format version 1 (integers big-endian; "varint" = unsigned LEB128, minimal length):
//!
//! ```text
//! offset  size  field
//!  0      2     magic "WR"
//!  2      1     format version (1)
//!  3      4     range start (IPv4)
//!  7      4     range last address (inclusive; >= start)
//! 11      6     sender's peer name (48-bit, non-zero)
//! 17      8     cluster id (0 only for an empty ring)
//! 25      var   peer count P, then P peer names of 6 bytes: strictly ascending, non-zero, all used
//!         var   entry count N (<= range size), then N entries of 5 varints:
//!                 token delta (from the range start for the first, else from the previous token,
//!                 >= 1), owner (index into the peer table), version, free_seq, free
//! end-4   4     CRC-32 (IEEE) of all preceding bytes
//! ```
//! Clocks (version, free_seq) are at most 2^53-1, tokens lie inside the range, and each free hint
//! is at most its entry's range size. Nothing may follow the checksum.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::addr::{check_peer, AddrRange, Ip};
use super::entry::Entry;
use super::error::RingError;
use super::{Ring, MAX_CLOCK};

/// Owner name -> peer-table index while encoding.
type PeerIndex = HashMap<u64, u64, BuildHasherDefault<FoldHasher>>;

/// A multiply-fold hasher for peer names: an order of magnitude faster than SipHash for one
/// u64, and plenty for keys we produced ourselves (no untrusted input is ever hashed).
#[derive(Default)]
struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let m = u128::from(self.0 ^ x) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (m >> 64) as u64 ^ m as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

const MAGIC: &[u8; 2] = b"WR";
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 25;
const CRC_LEN: usize = 4;
/// The smallest encoded entry: five one-byte varints.
const MIN_ENTRY_LEN: usize = 5;
const PEER_LEN: usize = 6;

impl Ring {
    /// The canonical encoding of the replicated state (range, sender, cluster, entries).
    /// Allocations are local and not part of it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut peers: Vec<u64> = self.entries.iter().map(|e| e.owner).collect();
        peers.sort_unstable();
        peers.dedup();

        let mut out =
            Vec::with_capacity(HEADER_LEN + 8 + peers.len() * PEER_LEN + self.entries.len() * 8);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&(self.range.start as u32).to_be_bytes());
        out.extend_from_slice(&((self.range.end - 1) as u32).to_be_bytes());
        out.extend_from_slice(&self.peer.to_be_bytes()[2..]);
        out.extend_from_slice(&self.cluster_id.to_be_bytes());
        put_varint(&mut out, peers.len() as u64);
        let mut index_of = PeerIndex::with_capacity_and_hasher(peers.len(), Default::default());
        for (i, &p) in peers.iter().enumerate() {
            out.extend_from_slice(&p.to_be_bytes()[2..]);
            index_of.insert(p, i as u64);
        }
        put_varint(&mut out, self.entries.len() as u64);
        let mut prev = self.range.start;
        for e in &self.entries {
            put_varint(&mut out, e.token - prev);
            prev = e.token;
            put_varint(&mut out, index_of[&e.owner]);
            put_varint(&mut out, e.version);
            put_varint(&mut out, e.free_seq);
            put_varint(&mut out, e.free);
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decode and validate; the error says what was wrong. The ring has no allocations.
    pub fn from_bytes(data: &[u8]) -> Result<Ring, RingError> {
        if data.len() < HEADER_LEN + 2 + CRC_LEN {
            return Err(fail(format!(
                "truncated: {} bytes, a ring needs at least {}",
                data.len(),
                HEADER_LEN + 2 + CRC_LEN
            )));
        }
        if &data[..2] != MAGIC {
            return Err(fail("not an encoded ring (bad magic)".into()));
        }
        if data[2] != FORMAT_VERSION {
            return Err(fail(format!(
                "unsupported format version {} (this build reads version {FORMAT_VERSION})",
                data[2]
            )));
        }
        let (body, crc) = data.split_at(data.len() - CRC_LEN);
        let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32(body) != stored {
            return Err(fail("checksum mismatch (corrupted or truncated)".into()));
        }
        decode_body(body)
    }
}

fn fail(detail: String) -> RingError {
    RingError::Decode(detail)
}

/// Everything after the magic/version/checksum checks: the structure and its invariants.
fn decode_body(body: &[u8]) -> Result<Ring, RingError> {
    let mut r = Reader { data: body, pos: 3 };
    let start = u64::from(r.u32()?);
    let last = u64::from(r.u32()?);
    if last < start {
        return Err(fail(format!(
            "range ends ({}) before it starts ({})",
            Ip(last),
            Ip(start)
        )));
    }
    let range = AddrRange {
        start,
        end: last + 1,
    };
    let peer = check_peer(r.u48()?, "sender").map_err(|e| fail(e.to_string()))?;
    let cluster_id = r.u64()?;

    let peer_count = r.count("peer", PEER_LEN)?;
    let mut peers = Vec::with_capacity(peer_count);
    for _ in 0..peer_count {
        let p = check_peer(r.u48()?, "owner").map_err(|e| fail(e.to_string()))?;
        if peers.last().is_some_and(|&prev| prev >= p) {
            return Err(fail("peer table not strictly ascending".into()));
        }
        peers.push(p);
    }

    let entry_count = r.count("entry", MIN_ENTRY_LEN)?;
    if entry_count as u64 > range.size() {
        return Err(fail(format!("{entry_count} entries cannot fit in {range}")));
    }
    if entry_count > 0 && cluster_id == 0 {
        return Err(fail("a non-empty ring must carry a cluster id".into()));
    }
    let mut used = vec![false; peers.len()];
    let mut entries: Vec<Entry> = Vec::with_capacity(entry_count);
    let mut prev = start;
    for i in 0..entry_count {
        let delta = r.varint()?;
        if i > 0 && delta == 0 {
            return Err(fail(format!(
                "entries not strictly sorted: token {} repeated",
                Ip(prev)
            )));
        }
        let token = prev
            .checked_add(delta)
            .filter(|&t| t < range.end)
            .ok_or_else(|| fail(format!("entry {i} has a token outside {range}")))?;
        prev = token;
        let owner_index = r.varint()?;
        let owner = usize::try_from(owner_index)
            .ok()
            .filter(|&k| k < peers.len())
            .ok_or_else(|| {
                fail(format!(
                    "entry {i} names owner #{owner_index}; the peer table has {}",
                    peers.len()
                ))
            })?;
        used[owner] = true;
        let version = r.clock("version")?;
        let free_seq = r.clock("free_seq")?;
        let free = r.varint()?;
        entries.push(Entry {
            token,
            owner: peers[owner],
            version,
            free_seq,
            free,
        });
    }
    if r.pos != body.len() {
        return Err(fail(format!(
            "{} unexpected bytes after the entries",
            body.len() - r.pos
        )));
    }
    if used.iter().any(|&u| !u) {
        return Err(fail("the peer table lists a peer no entry uses".into()));
    }

    let mut ring = Ring::new(range, peer, cluster_id)?;
    ring.entries = entries;
    for i in 0..ring.entries.len() {
        let size = ring.entry_size(i);
        let e = &ring.entries[i];
        if e.free > size {
            return Err(fail(format!(
                "entry at {} claims {} free addresses but its range holds {size}",
                Ip(e.token),
                e.free
            )));
        }
    }
    ring.reindex();
    ring.hints_stale = true;
    Ok(ring)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RingError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| fail(format!("truncated at byte {}", self.pos)))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, RingError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u48(&mut self) -> Result<u64, RingError> {
        let b = self.take(PEER_LEN)?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    fn u64(&mut self) -> Result<u64, RingError> {
        let b = self.take(8)?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    /// Unsigned LEB128, at most 10 bytes, minimal (no trailing zero groups), no overflow.
    fn varint(&mut self) -> Result<u64, RingError> {
        let at = self.pos;
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = *self
                .data
                .get(self.pos)
                .ok_or_else(|| fail(format!("truncated at byte {}", self.pos)))?;
            self.pos += 1;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(fail(format!("varint at byte {at} overflows 64 bits")));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                if byte == 0 && shift > 0 {
                    return Err(fail(format!(
                        "varint at byte {at} is not minimally encoded"
                    )));
                }
                return Ok(value);
            }
        }
        Err(fail(format!("varint at byte {at} is longer than 10 bytes")))
    }

    fn clock(&mut self, what: &str) -> Result<u64, RingError> {
        let value = self.varint()?;
        if value > MAX_CLOCK {
            return Err(fail(format!("{what} {value} is above 2^53-1")));
        }
        Ok(value)
    }

    /// A count of items that take at least `min_len` bytes each: bounded by what is left.
    fn count(&mut self, what: &str, min_len: usize) -> Result<usize, RingError> {
        let n = self.varint()?;
        let left = (self.data.len() - self.pos) as u64;
        if n > left / min_len as u64 {
            return Err(fail(format!(
                "{what} count {n} is larger than the {left} remaining bytes could hold"
            )));
        }
        Ok(n as usize)
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// CRC-32 (IEEE 802.3, as zlib's `crc32`), SIMD-accelerated.
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
pub(super) fn crc32_for_tests(data: &[u8]) -> u32 {
    crc32(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> Ring {
        let mut ring = Ring::new(AddrRange::new(0x0A20_0000, 0x0A30_0000).unwrap(), 1, 0).unwrap();
        ring.claim_for_peers(&[1, 2, 3], None).unwrap();
        ring
    }

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn round_trips() {
        let ring = seeded();
        let bytes = ring.to_bytes();
        let back = Ring::from_bytes(&bytes).unwrap();
        assert_eq!(back.entries(), ring.entries());
        assert_eq!(back.range(), ring.range());
        assert_eq!(back.cluster_id(), ring.cluster_id());
        assert_eq!(back.peer(), ring.peer());
        assert_eq!(back.to_bytes(), bytes);
        back.check().unwrap();
    }

    #[test]
    fn empty_ring_round_trips_and_whole_space_fits() {
        let ring = Ring::new(AddrRange::new(0, 1 << 32).unwrap(), 7, 0).unwrap();
        let back = Ring::from_bytes(&ring.to_bytes()).unwrap();
        assert!(back.is_empty());
        assert_eq!(back.range().end, 1 << 32);
    }

    fn reseal(mut body: Vec<u8>) -> Vec<u8> {
        let crc = crc32(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        body
    }

    fn err(data: &[u8]) -> String {
        Ring::from_bytes(data).unwrap_err().to_string()
    }

    #[test]
    fn rejects_with_clear_errors() {
        let good = seeded().to_bytes();
        assert!(err(&good[..10]).contains("truncated"));
        assert!(err(&good[..good.len() - 1]).contains("checksum"));
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(err(&bad_magic).contains("bad magic"));
        let mut future = good.clone();
        future[2] = 9;
        assert!(err(&future).contains("unsupported format version 9"));
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert!(err(&flipped).contains("checksum"));
        let body = good[..good.len() - CRC_LEN].to_vec();
        let mut trailing = body.clone();
        trailing.push(0);
        assert!(err(&reseal(trailing)).contains("unexpected bytes"));
        let mut truncated = body.clone();
        truncated.pop();
        assert!(err(&reseal(truncated)).contains("truncated"));
    }

    #[test]
    fn rejects_structural_violations() {
        // Build bodies by hand: range 10.0.0.0/24, peer 1, cluster 5.
        let header = |cluster: u64| {
            let mut b = Vec::new();
            b.extend_from_slice(MAGIC);
            b.push(FORMAT_VERSION);
            b.extend_from_slice(&0x0A00_0000u32.to_be_bytes());
            b.extend_from_slice(&0x0A00_00FFu32.to_be_bytes());
            b.extend_from_slice(&1u64.to_be_bytes()[2..]);
            b.extend_from_slice(&cluster.to_be_bytes());
            b
        };
        let with = |cluster: u64, peers: &[u64], entries: &[[u64; 5]]| {
            let mut b = header(cluster);
            put_varint(&mut b, peers.len() as u64);
            for p in peers {
                b.extend_from_slice(&p.to_be_bytes()[2..]);
            }
            put_varint(&mut b, entries.len() as u64);
            for e in entries {
                for &v in e {
                    put_varint(&mut b, v);
                }
            }
            reseal(b)
        };
        assert!(Ring::from_bytes(&with(5, &[2], &[[0, 0, 0, 0, 256]])).is_ok());
        assert!(err(&with(5, &[2], &[[0, 0, 0, 0, 257]])).contains("claims 257 free"));
        assert!(err(&with(5, &[2], &[[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]))
            .contains("not strictly sorted"));
        assert!(err(&with(5, &[2], &[[256, 0, 0, 0, 0]])).contains("outside"));
        assert!(err(&with(5, &[2], &[[0, 1, 0, 0, 0]])).contains("owner #1"));
        assert!(err(&with(5, &[3, 2], &[[0, 0, 0, 0, 0], [1, 1, 0, 0, 0]])).contains("ascending"));
        assert!(err(&with(5, &[2, 3], &[[0, 0, 0, 0, 0]])).contains("no entry uses"));
        assert!(err(&with(0, &[2], &[[0, 0, 0, 0, 0]])).contains("cluster id"));
        assert!(err(&with(5, &[0], &[[0, 0, 0, 0, 0]])).contains("non-zero"));
        assert!(err(&with(5, &[2], &[[0, 0, MAX_CLOCK + 1, 0, 0]])).contains("above 2^53"));
        // Absurd counts fail before any allocation.
        let mut absurd = header(5);
        put_varint(&mut absurd, u64::MAX);
        assert!(err(&reseal(absurd)).contains("peer count"));
        let mut absurd = header(5);
        put_varint(&mut absurd, 0);
        put_varint(&mut absurd, 1 << 40);
        assert!(err(&reseal(absurd)).contains("entry count"));
        // Non-minimal and overlong varints.
        let mut padded = header(5);
        padded.extend_from_slice(&[0x80, 0x00]);
        assert!(err(&reseal(padded)).contains("not minimally encoded"));
        let mut overlong = header(5);
        overlong.extend_from_slice(&[0xff; 11]);
        assert!(err(&reseal(overlong)).contains("overflows"));
        // A backwards range.
        let mut backwards = header(5);
        backwards[7..11].copy_from_slice(&0x09FF_FFFFu32.to_be_bytes());
        put_varint(&mut backwards, 0);
        put_varint(&mut backwards, 0);
        assert!(err(&reseal(backwards)).contains("before it starts"));
    }
}
