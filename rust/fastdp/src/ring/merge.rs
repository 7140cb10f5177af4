//! Merge: the ring CRDT's join.
//!
//! The state is a grow-only set of tokens with, per token, one entry chosen by a total order
//! (`Entry::precedence`). Merge takes the union of tokens and, for a token both sides have, the
//! entry with the greater precedence; then it clips every free hint to its (possibly smaller)
//! range. Union and per-token max are commutative, associative and idempotent; clipping only
//! lowers the last component of the order and only depends on the final token set, so it keeps
//! all three laws. Unlike Weave Net's merge it never refuses a valid, compatible ring: a range
//! taken from us while we hold allocations in it shows up in `disputed_ranges`, not as an error.

use super::entry::Entry;
use super::error::RingError;
use super::Ring;

impl Ring {
    /// Merge `other` into this replica; true if anything changed. Refuses rings over another
    /// range or from another cluster, leaving this ring unchanged. Our free hints are not
    /// touched: call `report_free` (or any local operation) afterwards to make them exact.
    pub fn merge(&mut self, other: &Ring) -> Result<bool, RingError> {
        if self.range != other.range {
            return Err(RingError::RangeMismatch {
                ours: self.range,
                theirs: other.range,
            });
        }
        if self.cluster_id != 0 && other.cluster_id != 0 && self.cluster_id != other.cluster_id {
            return Err(RingError::ClusterMismatch {
                ours: self.cluster_id,
                theirs: other.cluster_id,
            });
        }
        let mut changed = false;
        if self.cluster_id == 0 && other.cluster_id != 0 {
            self.cluster_id = other.cluster_id;
            changed = true;
        }
        changed |= self.join(&other.entries);
        if changed {
            self.reindex();
            self.hints_stale = true;
        }
        Ok(changed)
    }

    /// Join `theirs` into our entries, in place; true if that changed anything.
    ///
    /// Pass 1 reads both lists to see whether anything changes and how many tokens are new
    /// (most gossip brings nothing new, and then nothing is written). Pass 2 grows our list and
    /// merges from the back, so a merge allocates nothing once the list has room.
    fn join(&mut self, theirs: &[Entry]) -> bool {
        let mine = &self.entries;
        let mut new_tokens = 0;
        let mut differs = false;
        let (mut i, mut j) = (0, 0);
        while j < theirs.len() {
            if i == mine.len() || theirs[j].token < mine[i].token {
                new_tokens += 1;
                j += 1;
                continue;
            }
            if mine[i].token == theirs[j].token {
                // Their entry as it would end up: capped at our range for that token.
                let capped = Entry {
                    free: theirs[j].free.min(self.entry_size(i)),
                    ..theirs[j]
                };
                differs |= capped.precedence() > mine[i].precedence();
                j += 1;
            }
            i += 1;
        }
        if new_tokens == 0 && !differs {
            return false;
        }

        let n = self.entries.len();
        self.entries.resize(n + new_tokens, Entry::new(0, 0, 0));
        let entries = &mut self.entries;
        let (mut i, mut j, mut k) = (n, theirs.len(), n + new_tokens);
        while j > 0 {
            k -= 1;
            let b = theirs[j - 1];
            if i > 0 && entries[i - 1].token > b.token {
                entries[k] = entries[i - 1];
                i -= 1;
            } else if i > 0 && entries[i - 1].token == b.token {
                let a = entries[i - 1];
                entries[k] = if b.precedence() > a.precedence() {
                    b
                } else {
                    a
                };
                i -= 1;
                j -= 1;
            } else {
                entries[k] = b;
                j -= 1;
            }
        }
        debug_assert_eq!(k, i, "our remaining entries are already in place");
        // Either side's hints may exceed a range the other side's tokens shortened.
        for k in 0..self.entries.len() {
            let size = self.entry_size(k);
            let entry = &mut self.entries[k];
            entry.free = entry.free.min(size);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::addr::AddrRange;
    use super::*;

    const A: u64 = 0x0a;
    const B: u64 = 0x0b;

    fn seeded(peer: u64, seed: &[u64]) -> Ring {
        let mut r = Ring::new(AddrRange::new(0, 256).unwrap(), peer, 0).unwrap();
        r.claim_for_peers(seed, None).unwrap();
        r
    }

    #[test]
    fn a_grant_propagates_and_merging_twice_changes_nothing() {
        let mut a = seeded(A, &[A, B]);
        let mut b = seeded(B, &[A, B]);
        a.grant(64, 128, B).unwrap();
        assert!(b.merge(&a).unwrap());
        assert!(!b.merge(&a).unwrap());
        assert_eq!(b.entries(), a.entries());
        assert_eq!(b.owned_ranges(B), vec![(64, 256)]);
    }

    #[test]
    fn an_empty_ring_adopts_the_cluster_and_entries() {
        let a = seeded(A, &[A, B]);
        let mut observer = Ring::new(a.range(), B, 0).unwrap();
        assert!(observer.merge(&a).unwrap());
        assert_eq!(observer.cluster_id(), a.cluster_id());
        assert_eq!(observer.entries(), a.entries());
        // And an empty ring brings nothing.
        let mut a2 = a.clone();
        assert!(!a2.merge(&Ring::new(a.range(), B, 0).unwrap()).unwrap());
    }

    #[test]
    fn mismatched_rings_are_refused_and_left_unchanged() {
        let mut a = seeded(A, &[A, B]);
        let before = a.entries().to_vec();
        let other_range = Ring::new(AddrRange::new(0, 128).unwrap(), B, 0).unwrap();
        assert_eq!(
            a.merge(&other_range).unwrap_err().to_string(),
            "ring range mismatch: ours 0.0.0.0/24, theirs 0.0.0.0/25 (every peer must use the same allocation range)"
        );
        let other_seed = seeded(B, &[B]);
        let err = a.merge(&other_seed).unwrap_err();
        assert!(matches!(err, RingError::ClusterMismatch { .. }));
        assert!(err
            .to_string()
            .starts_with("ring cluster mismatch: ours 0x"));
        assert_eq!(a.entries(), before);
    }

    #[test]
    fn equal_versions_with_different_owners_converge_on_the_higher_name() {
        // Two peers both rmpeer the same dead peer: same token, same version, different owner.
        let c = 0x0c;
        let mut a = seeded(A, &[A, B, c]);
        let mut b = seeded(B, &[A, B, c]);
        a.transfer(c, A).unwrap();
        b.transfer(c, B).unwrap();
        let (a0, b0) = (a.clone(), b.clone());
        a.merge(&b0).unwrap();
        b.merge(&a0).unwrap();
        assert_eq!(a.entries(), b.entries());
        assert_eq!(a.owner(200), Some(B));
        // A held nothing there, so nothing is disputed; had it allocated, it would be.
        assert!(a.disputed_ranges().is_empty());
    }

    #[test]
    fn a_range_taken_from_us_with_allocations_is_disputed_not_refused() {
        let c = 0x0c;
        let mut a = seeded(A, &[A, B]);
        let mut b = seeded(B, &[A, B]);
        a.claim_address(10).unwrap();
        b.transfer(A, c).unwrap();
        assert!(a.merge(&b).unwrap());
        assert_eq!(a.owner(10), Some(c));
        assert_eq!(a.disputed_ranges(), vec![(10, 11)]);
        assert_eq!(a.allocate(0, 256).unwrap(), None);
        a.check().unwrap();
    }
}
