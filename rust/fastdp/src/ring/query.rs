//! Read-only views of the ring for the allocator, status and metrics.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::error::RingError;
use super::{coalesce, Ring};

impl Ring {
    /// The owner of `addr`; None if the ring is empty or `addr` is outside its range.
    pub fn owner(&self, addr: u64) -> Option<u64> {
        if self.entries.is_empty() || !self.range.contains(addr) {
            return None;
        }
        Some(self.entries[self.covering(addr)].owner)
    }

    /// The ranges `peer` owns, coalesced, sorted, split where the ring wraps.
    pub fn owned_ranges(&self, peer: u64) -> Vec<(u64, u64)> {
        if peer == self.peer {
            return self.owned.clone();
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for i in 0..self.entries.len() {
            if self.entries[i].owner == peer {
                ranges.extend(self.pieces(i));
            }
        }
        ranges.sort_unstable();
        coalesce(ranges)
    }

    /// The distinct owners, ascending.
    pub fn peers(&self) -> Vec<u64> {
        let mut peers: Vec<u64> = self.entries.iter().map(|e| e.owner).collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// Per owner, the sum of its entries' free hints.
    pub fn free_by_owner(&self) -> BTreeMap<u64, u64> {
        let mut totals = BTreeMap::new();
        for e in &self.entries {
            *totals.entry(e.owner).or_insert(0) += e.free;
        }
        totals
    }

    /// Per owner, how many addresses it owns.
    pub fn size_by_owner(&self) -> BTreeMap<u64, u64> {
        let mut totals = BTreeMap::new();
        for i in 0..self.entries.len() {
            *totals.entry(self.entries[i].owner).or_insert(0) += self.entry_size(i);
        }
        totals
    }

    /// Peers to ask for space in [start, end), best first: other peers whose hints promise free
    /// addresses there, by estimated free space (each entry counts min(free hint, overlap)),
    /// most first, ties by ascending name. Deterministic; never us, never a peer with nothing.
    pub fn choose_donors(&self, start: u64, end: u64) -> Result<Vec<u64>, RingError> {
        let (s, e) = self.clip(start, end)?;
        let mut totals: BTreeMap<u64, u64> = BTreeMap::new();
        for i in 0..self.entries.len() {
            let entry = self.entries[i];
            if entry.owner == self.peer || entry.free == 0 {
                continue;
            }
            let overlap: u64 = self
                .pieces(i)
                .map(|(a, b)| b.min(e).saturating_sub(a.max(s)))
                .sum();
            if overlap > 0 {
                *totals.entry(entry.owner).or_insert(0) += entry.free.min(overlap);
            }
        }
        let mut donors: Vec<(u64, u64)> = totals.into_iter().collect();
        donors.sort_unstable_by_key(|&(peer, free)| (Reverse(free), peer));
        Ok(donors.into_iter().map(|(peer, _)| peer).collect())
    }
}
