//! This peer's allocations inside the ranges it owns: allocate (lowest free first), claim a given
//! address, release, donate a block to a peer that asks, and keep our entries' free hints exact.
//!
//! Every operation here ends with `settle_hints`, so after it our own entries report exactly how
//! many of their addresses are free. Nothing here ever hands out an address we do not own.

use super::addr::{check_peer, AddrRange, Ip};
use super::error::{invalid, RingError};
use super::mutate::peer_text;
use super::space::{absent_chunks, choose_donation};
use super::Ring;

impl Ring {
    /// [start, end) clipped to the ring's range; an error if they do not overlap.
    pub(super) fn clip(&self, start: u64, end: u64) -> Result<(u64, u64), RingError> {
        let asked = AddrRange::new(start, end)?;
        let (s, e) = (start.max(self.range.start), end.min(self.range.end));
        if s >= e {
            return Err(invalid(format!(
                "{asked} does not overlap the ring range {}",
                self.range
            )));
        }
        Ok((s, e))
    }

    fn check_inside(&self, addr: u64) -> Result<(), RingError> {
        if self.range.contains(addr) {
            Ok(())
        } else {
            Err(invalid(format!(
                "address {} is outside the ring range {}",
                Ip(addr),
                self.range
            )))
        }
    }

    /// Our owned ranges clipped to [s, e), in address order.
    fn owned_in(&self, s: u64, e: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.owned.partition_point(|&(_, b)| b <= s);
        self.owned[first..]
            .iter()
            .take_while(move |&&(a, _)| a < e)
            .map(move |&(a, b)| (a.max(s), b.min(e)))
    }

    /// Take the lowest free address we own in [start, end); None if there is none.
    pub fn allocate(&mut self, start: u64, end: u64) -> Result<Option<u64>, RingError> {
        let (s, e) = self.clip(start, end)?;
        let found = self.owned_in(s, e).find_map(|(a, b)| {
            let candidate = self.space.first_absent_from(a);
            (candidate < b).then_some(candidate)
        });
        let Some(addr) = found else {
            self.settle_hints(None);
            return Ok(None);
        };
        self.space.insert(addr);
        let i = self.covering(addr);
        self.alloc_counts[i] += 1;
        self.settle_hints(Some(i));
        Ok(Some(addr))
    }

    /// Mark `addr` (which we must own) allocated; false if it already was.
    pub fn claim_address(&mut self, addr: u64) -> Result<bool, RingError> {
        self.check_inside(addr)?;
        if self.entries.is_empty() {
            return Err(invalid(format!(
                "cannot claim {}: the ring is not initialised yet, nobody owns it",
                Ip(addr)
            )));
        }
        let i = self.covering(addr);
        let owner = self.entries[i].owner;
        if owner != self.peer {
            return Err(invalid(format!(
                "cannot claim {}: it is owned by peer {}, not by us",
                Ip(addr),
                peer_text(owner)
            )));
        }
        let claimed = self.space.insert(addr);
        if claimed {
            self.alloc_counts[i] += 1;
        }
        self.settle_hints(Some(i));
        Ok(claimed)
    }

    /// Return `addr` to the free pool; false if it was not allocated.
    pub fn release(&mut self, addr: u64) -> Result<bool, RingError> {
        self.check_inside(addr)?;
        if !self.space.remove(addr) {
            self.settle_hints(None);
            return Ok(false);
        }
        let i = self.covering(addr);
        self.alloc_counts[i] -= 1;
        self.settle_hints(Some(i));
        Ok(true)
    }

    pub fn is_allocated(&self, addr: u64) -> bool {
        self.space.contains(addr)
    }

    pub fn allocated_count(&self) -> u64 {
        self.space.len()
    }

    /// The allocated addresses as runs [start, end), in address order.
    pub fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        self.space.runs().collect()
    }

    /// Forget every allocation (reset, shutdown of a peer handing its ranges on).
    pub fn clear_allocations(&mut self) {
        self.space.clear();
        self.reindex();
        self.hints_stale = true;
        self.settle_hints(None);
    }

    /// Exactly how many addresses we own in [start, end) are free.
    pub fn free_count(&self, start: u64, end: u64) -> Result<u64, RingError> {
        let (s, e) = self.clip(start, end)?;
        Ok(self
            .owned_in(s, e)
            .map(|(a, b)| (b - a) - self.space.count_in(a, b))
            .sum())
    }

    /// Allocated addresses in ranges we no longer own (a merge gave them to someone else):
    /// disputed, to surface in status; never handed out again while someone else owns them.
    pub fn disputed_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cursor = self.range.start;
        for &(a, b) in &self.owned {
            if cursor < a {
                out.extend(self.space.runs_in(cursor, a));
            }
            cursor = b;
        }
        if cursor < self.range.end {
            out.extend(self.space.runs_in(cursor, self.range.end));
        }
        out
    }

    /// Answer a request for space in [start, end) from `to`: grant it an aligned block of at
    /// most half our free space there (a single free address can be given whole), never an
    /// allocated address. Returns the block, or None if we have nothing free there.
    pub fn donate(
        &mut self,
        start: u64,
        end: u64,
        to: u64,
    ) -> Result<Option<(u64, u64)>, RingError> {
        check_peer(to, "requesting")?;
        if to == self.peer {
            return Err(invalid("cannot donate to ourselves".into()));
        }
        let (s, e) = self.clip(start, end)?;
        let mut free_chunks = Vec::new();
        for (a, b) in self.owned_in(s, e) {
            absent_chunks(&self.space, a, b, &mut free_chunks);
        }
        match choose_donation(&free_chunks) {
            Some((bs, be)) => {
                self.grant(bs, be, to)?;
                Ok(Some((bs, be)))
            }
            None => {
                self.settle_hints(None);
                Ok(None)
            }
        }
    }

    /// Make our entries' free hints exact (after a merge); true if any changed, in which case
    /// the ring should be persisted (broadcasting is optional: hints are only hints).
    pub fn report_free(&mut self) -> bool {
        self.refresh_hints()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0x0a;
    const B: u64 = 0x0b;

    fn seeded(seed: &[u64]) -> Ring {
        let mut r = Ring::new(AddrRange::new(0x0A00_0000, 0x0A00_0100).unwrap(), A, 0).unwrap();
        r.claim_for_peers(seed, None).unwrap();
        r
    }

    #[test]
    fn allocates_lowest_first_and_reuses_released_addresses() {
        let mut r = seeded(&[A]);
        assert_eq!(
            r.allocate(0x0A00_0001, 0x0A00_00FF).unwrap(),
            Some(0x0A00_0001)
        );
        assert_eq!(
            r.allocate(0x0A00_0001, 0x0A00_00FF).unwrap(),
            Some(0x0A00_0002)
        );
        assert!(r.release(0x0A00_0001).unwrap());
        assert!(!r.release(0x0A00_0001).unwrap());
        assert_eq!(
            r.allocate(0x0A00_0001, 0x0A00_00FF).unwrap(),
            Some(0x0A00_0001)
        );
        assert_eq!(r.entries()[0].free, 254);
        assert_eq!(r.free_count(0x0A00_0000, 0x0A00_0100).unwrap(), 254);
        r.check().unwrap();
    }

    #[test]
    fn allocation_stops_at_what_we_own() {
        let mut r = seeded(&[A, B]);
        let mut got = Vec::new();
        while let Some(addr) = r.allocate(0x0A00_0000, 0x0A00_0100).unwrap() {
            got.push(addr);
        }
        assert_eq!(got.len(), 128);
        assert_eq!(r.entries()[0].free, 0);
        assert!(r
            .allocate(0x0B00_0000, 0x0B00_0100)
            .unwrap_err()
            .to_string()
            .contains("does not overlap"));
    }

    #[test]
    fn claims_need_ownership_and_report_repeats() {
        let mut r = seeded(&[A, B]);
        assert!(r.claim_address(0x0A00_0005).unwrap());
        assert!(!r.claim_address(0x0A00_0005).unwrap());
        let err = r.claim_address(0x0A00_0085).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot claim 10.0.0.133: it is owned by peer 00:00:00:00:00:0b, not by us"
        );
        let mut empty = Ring::new(r.range(), A, 0).unwrap();
        assert!(empty
            .claim_address(0x0A00_0005)
            .unwrap_err()
            .to_string()
            .contains("not initialised"));
        assert!(r
            .claim_address(0x0B00_0000)
            .unwrap_err()
            .to_string()
            .contains("outside"));
    }

    #[test]
    fn donation_gives_half_aligned_and_skips_allocated_addresses() {
        let mut r = seeded(&[A]);
        for a in 0x0A00_0000..0x0A00_0010 {
            r.claim_address(a).unwrap();
        }
        // 240 free in .16-.255: the biggest block is .128/25, more than half, so .192/26.
        assert_eq!(
            r.donate(0x0A00_0000, 0x0A00_0100, B).unwrap(),
            Some((0x0A00_00C0, 0x0A00_0100))
        );
        assert_eq!(r.owner(0x0A00_00C0), Some(B));
        // One specific free address (a claim from another peer) is given whole.
        assert_eq!(
            r.donate(0x0A00_0020, 0x0A00_0021, B).unwrap(),
            Some((0x0A00_0020, 0x0A00_0021))
        );
        // An allocated one is not.
        assert_eq!(r.donate(0x0A00_0003, 0x0A00_0004, B).unwrap(), None);
        assert!(r.donate(0x0A00_0000, 0x0A00_0100, A).is_err());
        assert!(r.is_allocated(0x0A00_0003));
        r.check().unwrap();
    }

    #[test]
    fn report_free_repairs_hints_after_a_merge() {
        let mut a = seeded(&[A, B]);
        let mut b = Ring::new(a.range(), B, 0).unwrap();
        b.merge(&a).unwrap();
        a.claim_address(0x0A00_0001).unwrap();
        // B grants part of its range to A; the grant reports it all free, which it is.
        b.grant(0x0A00_0080, 0x0A00_0090, A).unwrap();
        a.merge(&b).unwrap();
        assert!(!a.report_free());
        // B resets, handing its ranges to A with its own hints (it had .240 allocated): after
        // the merge they are stale for A until report_free makes them exact.
        let mut b2 = b.clone();
        b2.claim_address(0x0A00_00F0).unwrap();
        b2.transfer(B, A).unwrap();
        let mut a2 = a.clone();
        a2.merge(&b2).unwrap();
        assert_eq!(a2.entries().last().unwrap().free, 0x6F);
        assert!(a2.report_free());
        assert_eq!(a2.entries().last().unwrap().free, 0x70);
        assert_eq!(a2.free_count(0x0A00_0000, 0x0A00_0100).unwrap(), 255);
        a2.check().unwrap();
    }
}
