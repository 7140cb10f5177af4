//! Property tests of the ring (proptest): random histories over a few replicas, then the
//! invariants of spec/ipam.md §5 — the join laws, exact cover, cross-replica safety, atomic
//! rejection, donation limits, and a decoder that never panics.

use proptest::prelude::*;

use super::addr::AddrRange;
use super::codec::crc32_for_tests;
use super::Ring;

const PEERS: [u64; 4] = [
    0x0a_0000_0001,
    0x0a_0000_0002,
    0x0b_0000_0003,
    0x0c_0000_0004,
];

#[derive(Clone, Debug)]
enum Op {
    Allocate {
        r: usize,
        lo: u64,
        len: u64,
    },
    Claim {
        r: usize,
        at: u64,
    },
    Release {
        r: usize,
        pick: u64,
    },
    Donate {
        r: usize,
        to: usize,
        lo: u64,
        len: u64,
    },
    Grant {
        r: usize,
        to: usize,
        pick: u64,
        lo: u64,
        len: u64,
    },
    Transfer {
        r: usize,
        from: usize,
    },
    Gossip {
        from: usize,
        to: usize,
    },
    ReportFree {
        r: usize,
    },
}

fn op(transfers: bool) -> impl Strategy<Value = Op> {
    let r = 0..PEERS.len();
    let base = prop_oneof![
        4 => (r.clone(), any::<u64>(), any::<u64>()).prop_map(|(r, lo, len)| Op::Allocate { r, lo, len }),
        1 => (r.clone(), any::<u64>()).prop_map(|(r, at)| Op::Claim { r, at }),
        2 => (r.clone(), any::<u64>()).prop_map(|(r, pick)| Op::Release { r, pick }),
        3 => (r.clone(), r.clone(), any::<u64>(), any::<u64>())
            .prop_map(|(r, to, lo, len)| Op::Donate { r, to, lo, len }),
        2 => (r.clone(), r.clone(), any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(r, to, pick, lo, len)| Op::Grant { r, to, pick, lo, len }),
        6 => (r.clone(), r.clone()).prop_map(|(from, to)| Op::Gossip { from, to }),
        1 => r.clone().prop_map(|r| Op::ReportFree { r }),
    ];
    let transfer_weight = if transfers { 1 } else { 0 };
    prop_oneof![
        20 => base,
        transfer_weight => (r.clone(), r).prop_map(|(r, from)| Op::Transfer { r, from }),
    ]
}

/// A universe (start, size), which replicas start seeded (bit mask), and the seed peers (mask).
fn setup() -> impl Strategy<Value = (u64, u64, u8, u8)> {
    let size = prop_oneof![1u64..=8, 9u64..=300, Just(256), Just(1024)];
    (size, any::<u32>(), 1u8..16, 0u8..16).prop_map(|(size, start, seed_mask, seeded)| {
        let start = u64::from(start).min((1 << 32) - size);
        (start, size, seed_mask, seeded)
    })
}

fn replicas(start: u64, size: u64, seed_mask: u8, seeded: u8) -> Vec<Ring> {
    let range = AddrRange::new(start, start + size).unwrap();
    let seed: Vec<u64> = (0..PEERS.len())
        .filter(|i| seed_mask & (1 << i) != 0)
        .map(|i| PEERS[i])
        .collect();
    (0..PEERS.len())
        .map(|i| {
            let mut ring = Ring::new(range, PEERS[i], 0).unwrap();
            if seeded & (1 << i) != 0 {
                ring.claim_for_peers(&seed, None).unwrap();
            }
            ring
        })
        .collect()
}

fn snapshot(ring: &Ring) -> (Vec<super::entry::Entry>, u64, Vec<(u64, u64)>) {
    (
        ring.entries().to_vec(),
        ring.cluster_id(),
        ring.allocated_ranges(),
    )
}

/// Apply one op; errors must leave the replica exactly as it was.
fn apply(reps: &mut [Ring], op: &Op) {
    let range = reps[0].range();
    let at = |v: u64| range.start + v % range.size();
    let span = |lo: u64, len: u64| {
        let s = at(lo);
        (s, (s + 1 + len % range.size()).min(range.end))
    };
    match *op {
        Op::Gossip { from, to } => {
            if from != to {
                let sender = reps[from].clone();
                let before = snapshot(&reps[to]);
                let changed = reps[to].merge(&sender).unwrap();
                assert_eq!(changed, snapshot(&reps[to]) != before);
            }
        }
        Op::Transfer { r, from } => {
            let before = reps[r]
                .size_by_owner()
                .get(&PEERS[from])
                .copied()
                .unwrap_or(0);
            let moved = reps[r].transfer(PEERS[from], PEERS[r]).unwrap();
            if from != r {
                assert_eq!(moved.iter().map(|(s, e)| e - s).sum::<u64>(), before);
            }
        }
        _ => {
            let r = match *op {
                Op::Allocate { r, .. }
                | Op::Claim { r, .. }
                | Op::Release { r, .. }
                | Op::Donate { r, .. }
                | Op::Grant { r, .. }
                | Op::ReportFree { r } => r,
                _ => unreachable!(),
            };
            let before = reps[r].clone();
            let result = local_op(&mut reps[r], op, at, span);
            if result.is_err() {
                assert_eq!(
                    snapshot(&reps[r]),
                    snapshot(&before),
                    "a failed {op:?} changed the ring"
                );
            }
        }
    }
}

fn local_op(
    ring: &mut Ring,
    op: &Op,
    at: impl Fn(u64) -> u64,
    span: impl Fn(u64, u64) -> (u64, u64),
) -> Result<(), super::error::RingError> {
    match *op {
        Op::Allocate { lo, len, .. } => {
            let (s, e) = span(lo, len);
            let lowest_free =
                (s..e).find(|&a| ring.owner(a) == Some(ring.peer()) && !ring.is_allocated(a));
            assert_eq!(ring.allocate(s, e)?, lowest_free);
        }
        Op::Claim { at: a, .. } => {
            ring.claim_address(at(a))?;
        }
        Op::Release { pick, .. } => {
            let runs = ring.allocated_ranges();
            let addr = match runs.get(pick as usize % runs.len().max(1)) {
                Some(&(s, e)) => s + pick % (e - s),
                None => at(pick),
            };
            let was = ring.is_allocated(addr);
            assert_eq!(ring.release(addr)?, was);
        }
        Op::Donate { r: _, to, lo, len } => {
            let (s, e) = span(lo, len);
            let free_before = ring.free_count(s, e)?;
            let total_before = ring.free_count(ring.range().start, ring.range().end)?;
            if let Some((bs, be)) = ring.donate(s, e, PEERS[to])? {
                let size = be - bs;
                assert!(s <= bs && be <= e, "donation outside the request");
                assert!(
                    size.is_power_of_two() && bs % size == 0,
                    "donation not CIDR-aligned"
                );
                assert!(
                    size <= 1.max(free_before.div_ceil(2)),
                    "donated more than half"
                );
                let total_after = ring.free_count(ring.range().start, ring.range().end)?;
                assert_eq!(total_before - total_after, size);
                assert!((bs..be).all(|a| ring.owner(a) == Some(PEERS[to])));
            } else {
                assert_eq!(free_before, 0);
            }
        }
        Op::Grant {
            to, pick, lo, len, ..
        } => {
            let owned = ring.owned_ranges(ring.peer());
            if let Some(&(a, b)) = owned.get(pick as usize % owned.len().max(1)) {
                let s = a + lo % (b - a);
                let e = (s + 1 + len % (b - s)).min(b);
                let tokens_before = ring.entries().len();
                let outside: Vec<_> = [a.saturating_sub(1), e, b]
                    .into_iter()
                    .filter(|&x| ring.range().contains(x) && !(s..e).contains(&x))
                    .map(|x| (x, ring.owner(x)))
                    .collect();
                ring.grant(s, e, PEERS[to])?;
                assert!(ring.entries().len() <= tokens_before + 2);
                assert!((s..e).all(|x| ring.owner(x) == Some(PEERS[to])));
                for (x, owner) in outside {
                    assert_eq!(
                        ring.owner(x),
                        owner,
                        "grant changed an address outside its range"
                    );
                }
            }
        }
        Op::ReportFree { .. } => {
            ring.report_free();
        }
        Op::Gossip { .. } | Op::Transfer { .. } => unreachable!(),
    }
    Ok(())
}

fn run(setup: (u64, u64, u8, u8), ops: &[Op]) -> Vec<Ring> {
    let (start, size, seed_mask, seeded) = setup;
    let mut reps = replicas(start, size, seed_mask, seeded);
    for op in ops {
        apply(&mut reps, op);
        for ring in &reps {
            ring.check().unwrap_or_else(|m| panic!("after {op:?}: {m}"));
        }
    }
    reps
}

fn assert_exact_cover(ring: &Ring) {
    let range = ring.range();
    if ring.is_empty() {
        return;
    }
    let mut all: Vec<(u64, u64, u64)> = Vec::new();
    for p in ring.peers() {
        all.extend(ring.owned_ranges(p).into_iter().map(|(s, e)| (s, e, p)));
    }
    all.sort_unstable();
    let mut cursor = range.start;
    for (s, e, p) in all {
        assert_eq!(s, cursor, "gap or overlap at {s}");
        assert!(s < e);
        assert_eq!(ring.owner(s), Some(p));
        assert_eq!(ring.owner(e - 1), Some(p));
        cursor = e;
    }
    assert_eq!(cursor, range.end);
    let sizes: u64 = ring.size_by_owner().values().sum();
    assert_eq!(sizes, range.size());
}

fn merged(a: &Ring, b: &Ring) -> Ring {
    let mut out = a.clone();
    out.merge(b).unwrap();
    out
}

fn state(ring: &Ring) -> (Vec<super::entry::Entry>, u64) {
    (ring.entries().to_vec(), ring.cluster_id())
}

fn reseal(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32_for_tests(&body);
    body.extend_from_slice(&crc.to_be_bytes());
    body
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Invariants after every step (checked in `run`), exact cover, and the join laws over the
    /// replicas any history (transfers included: non-owner changes, equal-version conflicts) leaves.
    #[test]
    fn merge_is_a_join(setup in setup(), ops in prop::collection::vec(op(true), 0..40), pick in any::<[usize; 3]>()) {
        let reps = run(setup, &ops);
        let [a, b, c] = pick.map(|i| &reps[i % reps.len()]);
        for ring in &reps {
            assert_exact_cover(ring);
        }
        // Commutative.
        prop_assert_eq!(state(&merged(a, b)), state(&merged(b, a)));
        // Associative.
        prop_assert_eq!(state(&merged(&merged(a, b), c)), state(&merged(a, &merged(b, c))));
        // Idempotent, and reports no change.
        let mut again = merged(a, b);
        prop_assert!(!again.merge(b).unwrap());
        prop_assert!(!again.clone().merge(&again).unwrap());
        let ab = merged(a, b);
        assert_exact_cover(&ab);
        ab.check().unwrap();
    }

    /// Owner-only histories: what each peer owns in its own replica never overlaps what another
    /// owns in its own replica, nobody holds an address it does not own, and full gossip converges.
    #[test]
    fn owner_only_histories_are_safe_and_converge(setup in setup(), ops in prop::collection::vec(op(false), 0..40)) {
        let mut reps = run(setup, &ops);
        for p in 0..reps.len() {
            prop_assert!(reps[p].disputed_ranges().is_empty());
            for q in 0..reps.len() {
                if p == q {
                    continue;
                }
                let mine = reps[p].owned_ranges(PEERS[p]);
                let theirs = reps[q].owned_ranges(PEERS[q]);
                for &(s1, e1) in &mine {
                    for &(s2, e2) in &theirs {
                        prop_assert!(e1 <= s2 || e2 <= s1, "peers {} and {} both own {}..{}", p, q, s1.max(s2), e1.min(e2));
                    }
                }
            }
        }
        // Gossip everyone to everyone, in a ring and back, twice: every replica converges.
        for _ in 0..2 {
            for i in 0..reps.len() {
                let j = (i + 1) % reps.len();
                let sender = reps[i].clone();
                reps[j].merge(&sender).unwrap();
            }
        }
        for ring in &reps[1..] {
            prop_assert_eq!(state(ring), state(&reps[0]));
        }
    }

    /// Encoding round-trips, and a decoder fed mutated (re-checksummed) encodings either refuses
    /// them or yields a ring that satisfies every invariant and re-encodes to the same bytes.
    #[test]
    fn decode_of_mutated_encodings_is_safe(setup in setup(), ops in prop::collection::vec(op(true), 0..20),
                                           r in 0usize..4, edits in prop::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..4)) {
        let reps = run(setup, &ops);
        let bytes = reps[r].to_bytes();
        let back = Ring::from_bytes(&bytes).unwrap();
        prop_assert_eq!(state(&back), state(&reps[r]));
        prop_assert_eq!(back.to_bytes(), bytes.clone());

        let mut body = bytes[..bytes.len() - 4].to_vec();
        for (at, value, kind) in edits {
            let i = usize::from(at) % (body.len() + 1);
            match kind {
                0 if i < body.len() => body[i] ^= value | 1,
                1 => body.insert(i, value),
                _ if i < body.len() => { body.remove(i); }
                _ => body.push(value),
            }
        }
        let mutated = reseal(body);
        if let Ok(ring) = Ring::from_bytes(&mutated) {
            ring.check().unwrap();
            prop_assert_eq!(ring.to_bytes(), mutated);
        }
    }

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = Ring::from_bytes(&data);
        let _ = Ring::from_bytes(&reseal(data));
    }

    /// Seeding is deterministic whatever the order or duplicates of the peer list.
    #[test]
    fn seeding_is_deterministic(setup in setup(), peers in prop::collection::vec(0usize..4, 1..8)) {
        let (start, size, _, _) = setup;
        let range = AddrRange::new(start, start + size).unwrap();
        let names: Vec<u64> = peers.iter().map(|&i| PEERS[i]).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let mut a = Ring::new(range, PEERS[0], 0).unwrap();
        a.claim_for_peers(&names, None).unwrap();
        let mut b = Ring::new(range, PEERS[1], 0).unwrap();
        b.claim_for_peers(&sorted, None).unwrap();
        prop_assert_eq!(state(&a), state(&b));
        prop_assert!(!a.merge(&b).unwrap());
        assert_exact_cover(&a);
        let total: u64 = a.free_by_owner().values().sum();
        prop_assert_eq!(total, size);
        if size >= sorted.len() as u64 {
            prop_assert_eq!(a.peers(), sorted);
        }
    }
}
