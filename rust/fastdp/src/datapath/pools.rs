//! Buffer pool for frames that cross from the receive thread to the send thread (relays,
//! re-floods, control replies): buffers are reused, so the steady state allocates nothing.

use std::sync::Mutex;

/// A bounded stack of reusable byte buffers.
pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl Pool {
    pub fn new(keep: usize) -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// An empty buffer, reused when one is free.
    pub fn get(&self) -> Vec<u8> {
        let mut b = self
            .free
            .lock()
            .map(|mut f| f.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        b.clear();
        b
    }

    /// Give a buffer back (dropped when the pool is full).
    pub fn put(&self, b: Vec<u8>) {
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.keep {
                f.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let p = Pool::new(1);
        let mut b = p.get();
        b.extend_from_slice(b"abc");
        let cap = b.capacity();
        p.put(b);
        p.put(Vec::with_capacity(5));
        let again = p.get();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        assert_eq!(p.get().capacity(), 0);
    }
}
