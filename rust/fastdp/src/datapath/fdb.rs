//! The forwarding database: MAC address → the peer it lives behind (our own name for local MACs).
//!
//! Learned from source MACs (frames read from the TAP: local; frames received: their origin peer),
//! refreshed at most once a second per entry without a write lock, aged out after `MAX_AGE`
//! (longer than ARP's reachable time, as Weave Net's 10 minutes). Read by the send thread per frame
//! under a read lock; written only when a MAC is new or moves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;
use std::time::Duration;

pub type Mac = [u8; 6];

/// How long an entry lives without being seen.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// Most entries kept: a container spraying random source MACs must not grow the table (or the
/// router's event queue) without bound. Unknown MACs are flooded, so a full table only costs
/// bandwidth, never reachability.
pub const MAX_ENTRIES: usize = 65536;

struct Entry {
    peer: u64,
    /// Seconds since the datapath started, when last seen.
    seen: AtomicU64,
}

/// What `learn` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    Known,
    New,
    /// The MAC moved from this other peer.
    Moved(u64),
}

#[derive(Default)]
pub struct Fdb {
    map: RwLock<HashMap<Mac, Entry>>,
}

pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Fdb {
    /// Record that `mac` was seen behind `peer` at `now_s`.
    pub fn learn(&self, mac: Mac, peer: u64, now_s: u64) -> Learned {
        if is_multicast(&mac) || mac == [0; 6] {
            return Learned::Known;
        }
        if let Ok(map) = self.map.read() {
            if let Some(e) = map.get(&mac) {
                if e.peer == peer {
                    if e.seen.load(Relaxed) != now_s {
                        e.seen.store(now_s, Relaxed);
                    }
                    return Learned::Known;
                }
            }
        }
        let Ok(mut map) = self.map.write() else {
            return Learned::Known;
        };
        if map.len() >= MAX_ENTRIES && !map.contains_key(&mac) {
            return Learned::Known;
        }
        let old = map.insert(
            mac,
            Entry {
                peer,
                seen: AtomicU64::new(now_s),
            },
        );
        match old {
            None => Learned::New,
            Some(e) if e.peer == peer => Learned::Known,
            Some(e) => Learned::Moved(e.peer),
        }
    }

    pub fn lookup(&self, mac: &Mac) -> Option<u64> {
        self.map.read().ok()?.get(mac).map(|e| e.peer)
    }

    /// Drop entries not seen for `MAX_AGE`; returns how many went.
    pub fn expire(&self, now_s: u64) -> usize {
        let Ok(mut map) = self.map.write() else {
            return 0;
        };
        let before = map.len();
        map.retain(|_, e| now_s.saturating_sub(e.seen.load(Relaxed)) < MAX_AGE.as_secs());
        before - map.len()
    }

    /// Forget every MAC behind `peer` (the peer was removed).
    pub fn forget_peer(&self, peer: u64) {
        if let Ok(mut map) = self.map.write() {
            map.retain(|_, e| e.peer != peer);
        }
    }

    pub fn len(&self) -> usize {
        self.map.read().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learn_move_expire_forget() {
        let f = Fdb::default();
        let a = [2, 0, 0, 0, 0, 1];
        assert_eq!(f.learn(a, 7, 0), Learned::New);
        assert_eq!(f.learn(a, 7, 1), Learned::Known);
        assert_eq!(f.lookup(&a), Some(7));
        assert_eq!(f.learn(a, 8, 2), Learned::Moved(7));
        assert_eq!(f.learn([0xff; 6], 8, 2), Learned::Known);
        assert_eq!(f.lookup(&[0xff; 6]), None);
        assert_eq!(f.expire(2 + MAX_AGE.as_secs() - 1), 0);
        assert_eq!(f.expire(2 + MAX_AGE.as_secs()), 1);
        assert_eq!(f.len(), 0);
        f.learn(a, 9, 0);
        f.forget_peer(9);
        assert_eq!(f.lookup(&a), None);
    }

    #[test]
    fn table_is_bounded() {
        let f = Fdb::default();
        for i in 0..MAX_ENTRIES as u32 + 10 {
            let b = i.to_be_bytes();
            f.learn([2, 0, b[0], b[1], b[2], b[3]], 1, 0);
        }
        assert_eq!(f.len(), MAX_ENTRIES);
        // Known MACs still move.
        assert_eq!(f.learn([2, 0, 0, 0, 0, 1], 2, 0), Learned::Moved(1));
    }
}
