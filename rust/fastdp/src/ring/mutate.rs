//! Ring mutations that change ownership: seeding an empty ring, granting a range, transferring a
//! peer's ranges. Each validates everything before it changes anything.

use super::addr::{check_peer, AddrRange, Ip, Peer};
use super::entry::Entry;
use super::error::{invalid, RingError};
use super::{coalesce, Ring, MAX_CLOCK};

/// How much a transfer bumps versions: enough to beat grants the departed peer made unseen.
pub const TRANSFER_VERSION_BUMP: u64 = 100;

/// The cluster identity of a ring seeded by `peers` (sorted, de-duplicated): FNV-1a 64 over a
/// domain tag and each name as 6 big-endian bytes; never 0 (0 means "unknown").
pub fn cluster_id_for_seed(peers: &[u64]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |byte: u8| {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    };
    for &b in b"weavenet-ring-seed-v1" {
        feed(b);
    }
    for &peer in peers {
        for &b in &peer.to_be_bytes()[2..] {
            feed(b);
        }
    }
    hash.max(1)
}

/// Sorted, de-duplicated, validated seed peers.
pub fn normalise_seed(peers: &[u64]) -> Result<Vec<u64>, RingError> {
    let mut seed = peers
        .iter()
        .map(|&p| check_peer(p, "seed"))
        .collect::<Result<Vec<_>, _>>()?;
    seed.sort_unstable();
    seed.dedup();
    if seed.is_empty() {
        return Err(invalid("a ring needs at least one seed peer".into()));
    }
    Ok(seed)
}

fn bump(version: u64, by: u64, token: u64) -> Result<u64, RingError> {
    version
        .checked_add(by)
        .filter(|&v| v <= MAX_CLOCK)
        .ok_or_else(|| {
            invalid(format!(
                "version of the entry at {} would pass 2^53",
                Ip(token)
            ))
        })
}

impl Ring {
    /// Seed an empty ring: halve the range recursively, the first half of the (sorted) peers
    /// taking the lower half, so shares are power-of-two, CIDR-aligned blocks on a CIDR range.
    /// Deterministic: every peer given the same seed builds the identical ring.
    pub fn claim_for_peers(
        &mut self,
        peers: &[u64],
        cluster_id: Option<u64>,
    ) -> Result<(), RingError> {
        if !self.entries.is_empty() {
            return Err(invalid(format!(
                "the ring is already initialised ({} entries); only an empty ring can be seeded",
                self.entries.len()
            )));
        }
        let seed = normalise_seed(peers)?;
        let id = cluster_id.unwrap_or_else(|| cluster_id_for_seed(&seed));
        if id == 0 {
            return Err(invalid("a cluster id must be non-zero".into()));
        }
        if self.cluster_id != 0 && self.cluster_id != id {
            return Err(RingError::ClusterMismatch {
                ours: self.cluster_id,
                theirs: id,
            });
        }
        let mut entries = Vec::with_capacity(seed.len());
        subdivide(self.range.start, self.range.end, &seed, &mut entries);
        self.entries = entries;
        self.cluster_id = id;
        self.reindex();
        self.hints_stale = true;
        self.settle_hints(None);
        Ok(())
    }

    /// Give [start, end), which we must own entirely and have nothing allocated in, to `to`.
    ///
    /// Inserts at most two tokens: `start` (for `to`, unless a token is there, which is re-owned)
    /// and `end` (for us, so the rest of our range stays ours). Re-owned entries get version + 1;
    /// `to`'s entries in the range report it all free (it is: nothing in it is allocated).
    pub fn grant(&mut self, start: u64, end: u64, to: u64) -> Result<(), RingError> {
        check_peer(to, "grantee")?;
        let span = AddrRange::new(start, end)?;
        if !(self.range.contains(start) && end <= self.range.end) {
            return Err(invalid(format!(
                "cannot grant {span}: outside the ring range {}",
                self.range
            )));
        }
        if to == self.peer {
            return Err(invalid(format!("cannot grant {span} to ourselves")));
        }
        let inside = self.owned.partition_point(|&(_, e)| e <= start);
        if !self
            .owned
            .get(inside)
            .is_some_and(|&(s, e)| s <= start && end <= e)
        {
            return Err(invalid(format!(
                "cannot grant {span}: we do not own all of it"
            )));
        }
        let allocated = self.space.count_in(start, end);
        if allocated > 0 {
            return Err(invalid(format!(
                "cannot grant {span}: {allocated} address(es) in it are allocated"
            )));
        }
        // Versions of the entries re-owned: check them all before changing anything.
        let first_reowned = self.entries.partition_point(|e| e.token < start);
        let last_reowned = self.entries.partition_point(|e| e.token < end);
        for e in &self.entries[first_reowned..last_reowned] {
            bump(e.version, 1, e.token)?;
        }

        // 1. The start token: re-owned if present, else inserted for `to`.
        match self.entries.binary_search_by_key(&start, |e| e.token) {
            Ok(_) => {}
            Err(at) => self.entries.insert(at, Entry::new(start, to, 0)),
        }
        // 2. Every token in [start, end) changes owner (except the one just inserted).
        for e in self
            .entries
            .iter_mut()
            .filter(|e| start <= e.token && e.token < end)
        {
            if e.owner != to {
                e.owner = to;
                e.version += 1;
                e.free_seq = 0;
            }
        }
        // 3. A token at `end` (wrapping to the start) keeps the rest of our range ours.
        let end_token = if end == self.range.end {
            self.range.start
        } else {
            end
        };
        if let Err(at) = self.entries.binary_search_by_key(&end_token, |e| e.token) {
            self.entries.insert(at, Entry::new(end_token, self.peer, 0));
        }
        // The grantee's entries are all free; ours are recomputed by settle_hints.
        for i in 0..self.entries.len() {
            let token = self.entries[i].token;
            if start <= token && token < end {
                self.entries[i].free = self.entry_size(i);
            }
        }
        self.reindex();
        self.hints_stale = true;
        self.settle_hints(None);
        Ok(())
    }

    /// Every entry of `from` becomes `to`'s with version + 100 (rmpeer: to = us; reset: from = us).
    /// Returns the ranges that moved, coalesced and sorted.
    pub fn transfer(&mut self, from: u64, to: u64) -> Result<Vec<(u64, u64)>, RingError> {
        check_peer(from, "from")?;
        check_peer(to, "to")?;
        if from == to {
            self.settle_hints(None);
            return Ok(Vec::new());
        }
        let moved: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].owner == from)
            .collect();
        for &i in &moved {
            let e = &self.entries[i];
            bump(e.version, TRANSFER_VERSION_BUMP, e.token)?;
        }
        let mut ranges = Vec::new();
        for &i in &moved {
            ranges.extend(self.pieces(i));
            let e = &mut self.entries[i];
            e.owner = to;
            e.version += TRANSFER_VERSION_BUMP;
            e.free_seq = 0;
        }
        ranges.sort_unstable();
        if !moved.is_empty() {
            self.reindex();
            self.hints_stale = true;
        }
        self.settle_hints(None);
        Ok(coalesce(ranges))
    }
}

/// Weave Net's `subdivide`, except that an odd share splits at its middle without skipping an
/// address (which only matters for a range that is not a CIDR block).
fn subdivide(from: u64, to: u64, peers: &[u64], out: &mut Vec<Entry>) {
    let share = to - from;
    if share == 1 || peers.len() == 1 {
        out.push(Entry::new(from, peers[0], share));
        return;
    }
    let mid = from + share / 2;
    let (lower, upper) = peers.split_at(peers.len() / 2);
    subdivide(from, mid, lower, out);
    subdivide(mid, to, upper, out);
}

/// Display helper for messages naming a peer.
pub fn peer_text(peer: u64) -> String {
    Peer(peer).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0x0a;
    const B: u64 = 0x0b;
    const C: u64 = 0x0c;

    fn ring(peer: u64, start: u64, end: u64) -> Ring {
        Ring::new(AddrRange::new(start, end).unwrap(), peer, 0).unwrap()
    }

    fn owners(r: &Ring) -> Vec<(u64, u64, u64)> {
        r.entries()
            .iter()
            .map(|e| (e.token, e.owner, e.version))
            .collect()
    }

    #[test]
    fn seeding_halves_the_range_in_aligned_shares() {
        let mut r = ring(A, 0x0A20_0000, 0x0A30_0000);
        r.claim_for_peers(&[C, A, B, A], None).unwrap();
        // Three peers: A gets the lower half, B and C a quarter each.
        assert_eq!(
            owners(&r),
            vec![
                (0x0A20_0000, A, 0),
                (0x0A28_0000, B, 0),
                (0x0A2C_0000, C, 0)
            ]
        );
        assert_eq!(r.cluster_id(), cluster_id_for_seed(&[A, B, C]));
        assert_eq!(r.owned_ranges(A), vec![(0x0A20_0000, 0x0A28_0000)]);
        assert_eq!(r.free_by_owner()[&B], 0x4_0000);
        r.check().unwrap();
        let again = r.claim_for_peers(&[A], None).unwrap_err();
        assert!(again.to_string().contains("already initialised"));
        assert!(ring(A, 0, 8).claim_for_peers(&[], None).is_err());
        assert!(ring(A, 0, 8).claim_for_peers(&[0], None).is_err());
    }

    #[test]
    fn more_peers_than_addresses_leaves_some_without_a_share() {
        let mut r = ring(A, 10, 13);
        r.claim_for_peers(&[1, 2, 3, 4], None).unwrap();
        assert_eq!(owners(&r), vec![(10, 1, 0), (11, 3, 0), (12, 4, 0)]);
        r.check().unwrap();
    }

    #[test]
    fn grant_inserts_at_most_two_tokens_and_bumps_reowned_versions() {
        let mut r = ring(A, 0, 256);
        r.claim_for_peers(&[A], None).unwrap();
        r.grant(64, 128, B).unwrap();
        assert_eq!(owners(&r), vec![(0, A, 0), (64, B, 0), (128, A, 0)]);
        assert_eq!(r.owned_ranges(A), vec![(0, 64), (128, 256)]);
        let free: Vec<u64> = r.entries().iter().map(|e| e.free).collect();
        assert_eq!(free, vec![64, 64, 128]);
        // Granting from an existing token re-owns it (version + 1), and the end token exists.
        r.grant(128, 256, C).unwrap();
        assert_eq!(owners(&r), vec![(0, A, 0), (64, B, 0), (128, C, 1)]);
        r.check().unwrap();
    }

    #[test]
    fn grant_to_the_end_wraps_the_tail_token_to_the_start() {
        let mut r = ring(A, 0, 100);
        r.claim_for_peers(&[A], None).unwrap();
        r.grant(0, 10, B).unwrap();
        r.transfer(B, A).unwrap();
        r.grant(90, 100, C).unwrap();
        assert_eq!(r.owner(95), Some(C));
        assert_eq!(r.owner(0), Some(A));
        assert_eq!(r.owner(89), Some(A));
        r.check().unwrap();
    }

    #[test]
    fn grant_refuses_what_we_do_not_own_or_have_allocated() {
        let mut r = ring(A, 0, 256);
        r.claim_for_peers(&[A, B], None).unwrap();
        let err = r.grant(100, 200, C).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot grant 0.0.0.100-0.0.0.199: we do not own all of it"
        );
        r.claim_address(5).unwrap();
        let err = r.grant(0, 8, C).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot grant 0.0.0.0/29: 1 address(es) in it are allocated"
        );
        assert!(r
            .grant(8, 16, A)
            .unwrap_err()
            .to_string()
            .contains("ourselves"));
        assert!(r.grant(8, 8, B).is_err());
        assert!(r.grant(250, 300, B).is_err());
    }

    #[test]
    fn transfer_moves_every_range_with_a_big_version_bump() {
        let mut r = ring(A, 0, 256);
        r.claim_for_peers(&[A, B, C], None).unwrap();
        let moved = r.transfer(B, A).unwrap();
        assert_eq!(moved, vec![(128, 192)]);
        assert_eq!(owners(&r), vec![(0, A, 0), (128, A, 100), (192, C, 0)]);
        assert_eq!(r.owned_ranges(A), vec![(0, 192)]);
        assert!(r.transfer(B, A).unwrap().is_empty());
        assert!(r.transfer(A, A).unwrap().is_empty());
        r.check().unwrap();
    }
}
