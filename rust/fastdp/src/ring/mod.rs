//! The IPAM ring: one allocation range divided among peers, replicated on every peer as a CRDT,
//! plus this peer's own allocations inside the ranges it owns.
//!
//! What it is for: deciding who owns which address without coordination, and letting replicas
//! converge whatever order gossip arrives in (`merge` is a join: commutative, associative,
//! idempotent, with a total tie-break). What it must never do: give away an allocated address,
//! leave an invariant broken after an error (every failing call leaves the ring as it was), or
//! panic on input from the network (`from_bytes` validates everything).
//!
//! Layout: `entry` (entries and their merge order), `merge` (the join), `mutate` (seeding, grant,
//! transfer), `local` (allocations, donation, free hints), `query` (read-only views), `codec`
//! (the versioned binary encoding), `python` (the PyO3 wrapper), `space` and `addr` (helpers).

mod addr;
mod codec;
mod entry;
mod error;
mod local;
mod merge;
mod mutate;
#[cfg(test)]
mod proptests;
mod python;
mod query;
mod space;

pub use python::register;

use addr::{check_peer, AddrRange};
use entry::Entry;
use error::RingError;
use space::Space;

/// Versions and hint sequence numbers stay below 2^53 so JSON consumers of `/report` read them exactly.
pub const MAX_CLOCK: u64 = (1 << 53) - 1;

/// One peer's replica of the ring and its own allocations.
#[derive(Clone, Debug)]
pub struct Ring {
    range: AddrRange,
    /// Our own peer name: the owner whose free hints we maintain. Merge ignores it.
    peer: u64,
    /// Identity of the cluster that created the ring (a hash of the seed); 0 = not yet known.
    cluster_id: u64,
    /// Sorted by token, tokens unique and inside `range`; never shrinks.
    entries: Vec<Entry>,
    /// Addresses we have handed out (inside ranges we own, unless a merge took the range away).
    space: Space,
    /// Derived: allocated addresses inside each entry's range, parallel to `entries`.
    alloc_counts: Vec<u64>,
    /// Derived: the ranges we own, coalesced, sorted, split at the end of the range.
    owned: Vec<(u64, u64)>,
    /// True when our entries' free hints may differ from the exact counts (after a merge or a
    /// decode); the next local operation or `report_free` recomputes them all.
    hints_stale: bool,
}

impl Ring {
    /// An empty (uninitialised) ring over `range`, held by `peer`.
    pub fn new(range: AddrRange, peer: u64, cluster_id: u64) -> Result<Self, RingError> {
        check_peer(peer, "local")?;
        Ok(Self {
            range,
            peer,
            cluster_id,
            entries: Vec::new(),
            space: Space::default(),
            alloc_counts: Vec::new(),
            owned: Vec::new(),
            hints_stale: false,
        })
    }

    pub fn range(&self) -> AddrRange {
        self.range
    }

    pub fn peer(&self) -> u64 {
        self.peer
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Distance from token `a` forward to token `b`; `dist(a, a)` is the whole ring.
    fn dist(&self, a: u64, b: u64) -> u64 {
        if b > a {
            b - a
        } else {
            (self.range.end - a) + (b - self.range.start)
        }
    }

    /// The token after entry `i`, wrapping to the first.
    fn next_token(&self, i: usize) -> u64 {
        self.entries[(i + 1) % self.entries.len()].token
    }

    /// How many addresses entry `i` owns.
    fn entry_size(&self, i: usize) -> u64 {
        self.dist(self.entries[i].token, self.next_token(i))
    }

    /// The index of the entry owning `addr` (the ring must be non-empty, `addr` inside it).
    fn covering(&self, addr: u64) -> usize {
        match self.entries.binary_search_by_key(&addr, |e| e.token) {
            Ok(i) => i,
            Err(0) => self.entries.len() - 1,
            Err(i) => i - 1,
        }
    }

    /// Entry `i`'s range as at most two linear pieces: the last entry wraps past the end.
    fn pieces(&self, i: usize) -> impl Iterator<Item = (u64, u64)> {
        let token = self.entries[i].token;
        let first = self.entries[0].token;
        let (main, wrap) = if i + 1 < self.entries.len() {
            ((token, self.entries[i + 1].token), None)
        } else {
            let wrap = (first > self.range.start).then_some((self.range.start, first));
            ((token, self.range.end), wrap)
        };
        std::iter::once(main).chain(wrap)
    }

    /// Recompute the derived state (`owned`, `alloc_counts`) after the entries changed shape.
    fn reindex(&mut self) {
        let mut owned: Vec<(u64, u64)> = Vec::new();
        for i in 0..self.entries.len() {
            if self.entries[i].owner == self.peer {
                owned.extend(self.pieces(i));
            }
        }
        owned.sort_unstable();
        self.owned = coalesce(owned);

        let n = self.entries.len();
        let mut counts = std::mem::take(&mut self.alloc_counts);
        counts.clear();
        counts.resize(n, 0);
        if n > 0 && self.space.len() > 0 {
            // One sweep over the pieces in address order against the runs in address order.
            let runs: Vec<(u64, u64)> = self.space.runs().collect();
            let first = self.entries[0].token;
            let wrap = (first > self.range.start).then_some((self.range.start, first, n - 1));
            let linear = (0..n).map(|i| {
                let end = self.entries.get(i + 1).map_or(self.range.end, |e| e.token);
                (self.entries[i].token, end, i)
            });
            let mut j = 0;
            for (a, b, i) in wrap.into_iter().chain(linear) {
                while j < runs.len() && runs[j].1 <= a {
                    j += 1;
                }
                let mut k = j;
                while k < runs.len() && runs[k].0 < b {
                    counts[i] += runs[k].1.min(b) - runs[k].0.max(a);
                    k += 1;
                }
            }
        }
        self.alloc_counts = counts;
    }

    /// Set each of our entries' free hint to the exact count, bumping `free_seq` where it changes.
    fn refresh_hints(&mut self) -> bool {
        let mut changed = false;
        for i in 0..self.entries.len() {
            changed |= self.refresh_hint(i);
        }
        self.hints_stale = false;
        changed
    }

    fn refresh_hint(&mut self, i: usize) -> bool {
        if self.entries[i].owner != self.peer {
            return false;
        }
        let exact = self.entry_size(i) - self.alloc_counts[i];
        let entry = &mut self.entries[i];
        if entry.free == exact {
            return false;
        }
        entry.free = exact;
        entry.free_seq = (entry.free_seq + 1).min(MAX_CLOCK);
        true
    }

    /// End of every local operation: our hints become exact (all of them if a merge made them
    /// stale, else just the entry the operation touched).
    fn settle_hints(&mut self, touched: Option<usize>) {
        if self.hints_stale {
            self.refresh_hints();
        } else if let Some(i) = touched {
            self.refresh_hint(i);
        }
    }

    /// Check every invariant, including the derived state; for tests and debugging.
    pub fn check(&self) -> Result<(), String> {
        let n = self.entries.len();
        if n > 0 && self.cluster_id == 0 {
            return Err("non-empty ring without a cluster id".into());
        }
        for (i, entry) in self.entries.iter().enumerate() {
            if !self.range.contains(entry.token) {
                return Err(format!("token {} outside {}", entry.token, self.range));
            }
            if i > 0 && self.entries[i - 1].token >= entry.token {
                return Err(format!("tokens not strictly sorted at index {i}"));
            }
            check_peer(entry.owner, "owner").map_err(|e| e.to_string())?;
            if entry.free > self.entry_size(i) {
                return Err(format!(
                    "entry {} has free {} > size {}",
                    entry.token,
                    entry.free,
                    self.entry_size(i)
                ));
            }
            if entry.version > MAX_CLOCK || entry.free_seq > MAX_CLOCK {
                return Err(format!("entry {} has a clock above 2^53", entry.token));
            }
        }
        let mut fresh = self.clone();
        fresh.reindex();
        if fresh.owned != self.owned || fresh.alloc_counts != self.alloc_counts {
            return Err("derived state out of date".into());
        }
        if !self.hints_stale {
            for i in 0..n {
                let entry = &self.entries[i];
                if entry.owner == self.peer
                    && entry.free != self.entry_size(i) - self.alloc_counts[i]
                {
                    return Err(format!("our entry {} has a stale free hint", entry.token));
                }
            }
        }
        Ok(())
    }
}

/// Merge sorted ranges that touch or overlap.
fn coalesce(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}
