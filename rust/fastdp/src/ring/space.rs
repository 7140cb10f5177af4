//! The addresses this peer has handed out, as coalesced runs, and the choice of a block to donate.
//!
//! `Space` knows nothing about ownership: the ring intersects it with the ranges it owns. Every
//! operation is O(log runs) except the range walks, which are linear in the runs they touch.

use std::collections::BTreeMap;

use super::addr::biggest_cidr;

/// A set of addresses stored as disjoint, non-adjacent runs [start, end).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Space {
    runs: BTreeMap<u64, u64>,
    count: u64,
}

impl Space {
    /// The run holding `addr`, if any.
    fn run_containing(&self, addr: u64) -> Option<(u64, u64)> {
        let (&start, &end) = self.runs.range(..=addr).next_back()?;
        (addr < end).then_some((start, end))
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.run_containing(addr).is_some()
    }

    /// The lowest address >= `addr` not in the set (runs never touch, so one jump suffices).
    pub fn first_absent_from(&self, addr: u64) -> u64 {
        self.run_containing(addr).map_or(addr, |(_, end)| end)
    }

    /// Add `addr`; false if it was already there.
    pub fn insert(&mut self, addr: u64) -> bool {
        if self.contains(addr) {
            return false;
        }
        let mut start = addr;
        let mut end = addr + 1;
        if let Some((&s, &e)) = self.runs.range(..addr).next_back() {
            if e == addr {
                start = s;
            }
        }
        if let Some(e) = self.runs.remove(&end) {
            end = e;
        }
        self.runs.insert(start, end);
        self.count += 1;
        true
    }

    /// Remove `addr`; false if it was not there.
    pub fn remove(&mut self, addr: u64) -> bool {
        let Some((start, end)) = self.run_containing(addr) else {
            return false;
        };
        if start < addr {
            self.runs.insert(start, addr);
        } else {
            self.runs.remove(&start);
        }
        if addr + 1 < end {
            self.runs.insert(addr + 1, end);
        }
        self.count -= 1;
        true
    }

    pub fn clear(&mut self) {
        self.runs.clear();
        self.count = 0;
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    /// The runs, in address order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &e)| (s, e))
    }

    /// The runs overlapping [start, end), clipped to it, in address order.
    pub fn runs_in(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.run_containing(start).map_or(start, |(s, _)| s);
        self.runs
            .range(first..end.max(first))
            .map(move |(&s, &e)| (s.max(start), e.min(end)))
    }

    /// How many addresses of [start, end) are in the set.
    pub fn count_in(&self, start: u64, end: u64) -> u64 {
        if start >= end || self.count == 0 {
            return 0;
        }
        self.runs_in(start, end).map(|(s, e)| e - s).sum()
    }
}

/// [a, b) minus the runs of `space`, appended to `out` in address order.
pub fn absent_chunks(space: &Space, a: u64, b: u64, out: &mut Vec<(u64, u64)>) {
    let mut cursor = a;
    for (s, e) in space.runs_in(a, b) {
        if cursor < s {
            out.push((cursor, s));
        }
        cursor = e;
    }
    if cursor < b {
        out.push((cursor, b));
    }
}

/// Weave Net's donation choice over free chunks (sorted, disjoint) of a request range.
///
/// The largest `biggest_cidr` block of any chunk wins, a later chunk on a tie; if the block holds
/// more than half of all the free addresses, only its upper half is given. So a donor keeps at
/// least half of its free space, gives an aligned block, and a single free address can be given.
pub fn choose_donation(free_chunks: &[(u64, u64)]) -> Option<(u64, u64)> {
    let free_total: u64 = free_chunks.iter().map(|(s, e)| e - s).sum();
    let mut best: Option<(u64, u64)> = None;
    for &(s, e) in free_chunks {
        let block = biggest_cidr(s, e);
        if best.is_none_or(|(bs, be)| block.1 - block.0 >= be - bs) {
            best = Some(block);
        }
    }
    let (start, end) = best?;
    let size = end - start;
    if size > 1 && 2 * size > free_total {
        Some((start + size / 2, end))
    } else {
        Some((start, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(space: &Space) -> Vec<(u64, u64)> {
        space.runs().collect()
    }

    #[test]
    fn inserts_coalesce_and_removes_split() {
        let mut space = Space::default();
        for a in [5, 7, 6, 4, 10] {
            assert!(space.insert(a));
        }
        assert!(!space.insert(6));
        assert_eq!(runs(&space), vec![(4, 8), (10, 11)]);
        assert_eq!(space.len(), 5);
        assert_eq!(space.first_absent_from(4), 8);
        assert_eq!(space.first_absent_from(9), 9);
        assert!(space.remove(5));
        assert!(!space.remove(5));
        assert_eq!(runs(&space), vec![(4, 5), (6, 8), (10, 11)]);
        assert_eq!(space.count_in(0, 100), 4);
        assert_eq!(space.count_in(6, 7), 1);
        assert_eq!(space.count_in(5, 6), 0);
        assert!(space.remove(4) && space.remove(10));
        assert_eq!(runs(&space), vec![(6, 8)]);
    }

    #[test]
    fn absent_chunks_subtracts_runs() {
        let mut space = Space::default();
        for a in [2, 3, 8] {
            space.insert(a);
        }
        let mut out = Vec::new();
        absent_chunks(&space, 0, 10, &mut out);
        assert_eq!(out, vec![(0, 2), (4, 8), (9, 10)]);
        out.clear();
        absent_chunks(&space, 3, 4, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn donation_matches_weave_examples() {
        // A /12, all free, donates its upper /13.
        let slash12 = (0x0A20_0000, 0x0A30_0000);
        assert_eq!(
            choose_donation(&[slash12]),
            Some((0x0A28_0000, 0x0A30_0000))
        );
        // .0-.46 free (.47 allocated) donates .16/28.
        assert_eq!(choose_donation(&[(0, 47)]), Some((16, 32)));
        // Repeated donation empties a 64-address space.
        let mut free = vec![(0u64, 64u64)];
        let mut rounds = 0;
        while let Some((s, e)) = choose_donation(&free) {
            let mut next = Vec::new();
            for &(a, b) in &free {
                if a < s {
                    next.push((a, s.min(b)));
                }
                if e < b {
                    next.push((e.max(a), b));
                }
            }
            free = next;
            rounds += 1;
            assert!(rounds < 64);
        }
        assert!(free.is_empty());
        assert_eq!(choose_donation(&[]), None);
    }
}
