//! Per-datagram AEAD for the data plane: key epochs, counter nonces, the replay window.
//!
//! The per-direction 32-byte keys come from the mesh handshake (`crypto::DataKeys`). Each key is the
//! root of a one-way chain: epoch e+1's chain key = HKDF(epoch e's, label), and each epoch's AEAD
//! keys are expanded from its chain key under a per-cipher label. The sender moves to the next epoch
//! before `REKEY_AFTER_PACKETS` datagrams or `REKEY_AFTER` time, restarting its counter; the
//! receiver follows when a datagram of epoch+1 authenticates, keeping the previous epoch for
//! stragglers. Old chain keys are dropped (and zeroed), so a captured key does not open the past.
//!
//! The cipher is chosen by the *sender* from its CPU (AES-256-GCM with AES-NI and carry-less
//! multiply, otherwise ChaCha20-Poly1305) and named in the header; receivers open both. The two
//! ciphers never share a key (distinct HKDF labels).
//!
//! Nonce: 4 zero bytes then the 64-bit counter (big endian); the header (incl. counter, epoch,
//! sender and receiver) is the associated data. Never panics on input bytes.

use std::time::{Duration, Instant};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use zeroize::Zeroizing;

use crate::frame::{FLAG_AES, TAG_LEN};

/// Move to a new epoch after this many datagrams (far below AES-GCM's per-key limits for
/// MTU-sized records, and below any counter exhaustion).
pub const REKEY_AFTER_PACKETS: u64 = 1 << 28;
/// ... or after this long.
pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// Replay window in datagrams (WireGuard's size).
pub const REPLAY_WINDOW_BITS: u64 = 2048;

const LABEL_NEXT: &[u8] = b"weavenet data next epoch v1";
const LABEL_AES: &[u8] = b"weavenet data aes-256-gcm v1";
const LABEL_CHACHA: &[u8] = b"weavenet data chacha20-poly1305 v1";

/// The AEAD a sender uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    Aes256Gcm,
    ChaCha20Poly1305,
}

impl Suite {
    /// AES-GCM where the CPU accelerates it, ChaCha20-Poly1305 elsewhere.
    pub fn for_this_cpu() -> Suite {
        #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
        {
            if std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
            {
                return Suite::Aes256Gcm;
            }
            Suite::ChaCha20Poly1305
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("aes")
                && std::arch::is_aarch64_feature_detected!("pmull")
            {
                return Suite::Aes256Gcm;
            }
            Suite::ChaCha20Poly1305
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
        {
            Suite::ChaCha20Poly1305
        }
    }

    /// Header flag bits naming this suite.
    pub fn flag(self) -> u8 {
        match self {
            Suite::Aes256Gcm => FLAG_AES,
            Suite::ChaCha20Poly1305 => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes256Gcm => "aes-256-gcm",
            Suite::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }
}

struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf_expand(key: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, key);
    let mut out = Zeroizing::new([0u8; 32]);
    let labels = [label];
    // 32 bytes is far below HKDF-SHA256's output limit: neither step can fail.
    match prk.expand(&labels, OkmLen(32)) {
        Ok(okm) => {
            if okm.fill(out.as_mut_slice()).is_err() {
                unreachable!("HKDF-SHA256 can always fill 32 bytes");
            }
        }
        Err(_) => unreachable!("HKDF-SHA256 can always expand 32 bytes"),
    }
    out
}

fn aead_key(alg: &'static aead::Algorithm, key: &[u8; 32]) -> LessSafeKey {
    match UnboundKey::new(alg, key) {
        Ok(k) => LessSafeKey::new(k),
        Err(_) => unreachable!("both AEADs take 32-byte keys"),
    }
}

/// One epoch's keys.
struct EpochKeys {
    epoch: u8,
    chain: Zeroizing<[u8; 32]>,
    aes: LessSafeKey,
    chacha: LessSafeKey,
}

impl EpochKeys {
    fn new(epoch: u8, chain: Zeroizing<[u8; 32]>) -> EpochKeys {
        let aes = aead_key(&aead::AES_256_GCM, &hkdf_expand(&chain, LABEL_AES));
        let chacha = aead_key(&aead::CHACHA20_POLY1305, &hkdf_expand(&chain, LABEL_CHACHA));
        EpochKeys {
            epoch,
            chain,
            aes,
            chacha,
        }
    }

    fn next(&self) -> EpochKeys {
        EpochKeys::new(
            self.epoch.wrapping_add(1),
            hkdf_expand(&self.chain, LABEL_NEXT),
        )
    }

    fn key(&self, suite: Suite) -> &LessSafeKey {
        match suite {
            Suite::Aes256Gcm => &self.aes,
            Suite::ChaCha20Poly1305 => &self.chacha,
        }
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Our sealing state towards one peer.
pub struct TxCipher {
    suite: Suite,
    keys: EpochKeys,
    counter: u64,
    since: Instant,
}

impl TxCipher {
    pub fn new(key: &[u8; 32], suite: Suite) -> TxCipher {
        TxCipher {
            suite,
            keys: EpochKeys::new(0, Zeroizing::new(*key)),
            counter: 0,
            since: Instant::now(),
        }
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Reserve the next (epoch, counter) for one datagram, rekeying first when due.
    pub fn next(&mut self, now: Instant) -> (u8, u64) {
        if self.counter >= REKEY_AFTER_PACKETS || now.duration_since(self.since) >= REKEY_AFTER {
            self.keys = self.keys.next();
            self.counter = 0;
            self.since = now;
        }
        let c = self.counter;
        self.counter += 1;
        (self.keys.epoch, c)
    }

    /// Encrypt `body` in place under the header `aad` (already written with the epoch and counter
    /// from `next`) and write the tag to `tag`.
    pub fn seal(&self, counter: u64, aad: &[u8], body: &mut [u8], tag: &mut [u8]) {
        match self.keys.key(self.suite).seal_in_place_separate_tag(
            nonce(counter),
            Aad::from(aad),
            body,
        ) {
            Ok(t) => tag[..TAG_LEN].copy_from_slice(t.as_ref()),
            // Only possible past the AEAD's per-message size limit, far above 64 KiB.
            Err(_) => unreachable!("datagram bodies are far below the AEAD size limit"),
        }
    }
}

/// Why a datagram did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Failed authentication (tampered, wrong key, wrong epoch).
    Auth,
    /// Already seen, or too old for the window.
    Replay,
}

/// WireGuard's sliding replay window (an RFC 6479 ring of 64-bit blocks): accepts each counter
/// once, and anything up to `REPLAY_WINDOW_BITS - 64` behind the newest seen.
#[derive(Clone)]
pub struct ReplayWindow {
    last: u64,
    ring: [u64; RING_BLOCKS],
}

const RING_BLOCKS: usize = (REPLAY_WINDOW_BITS / 64) as usize;
const WINDOW: u64 = REPLAY_WINDOW_BITS - 64;

impl Default for ReplayWindow {
    fn default() -> ReplayWindow {
        ReplayWindow {
            last: 0,
            ring: [0; RING_BLOCKS],
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` may be new (call before authenticating, to drop replays cheaply).
    pub fn check(&self, counter: u64) -> bool {
        if counter > self.last {
            return true;
        }
        if self.last - counter > WINDOW {
            return false;
        }
        let block = (counter / 64) as usize % RING_BLOCKS;
        self.ring[block] & (1 << (counter % 64)) == 0
    }

    /// Record an authenticated `counter`; false if it was a replay after all.
    pub fn update(&mut self, counter: u64) -> bool {
        if counter > self.last {
            let current = self.last / 64;
            let diff = (counter / 64 - current).min(RING_BLOCKS as u64);
            for i in current + 1..=current + diff {
                self.ring[i as usize % RING_BLOCKS] = 0;
            }
            self.last = counter;
        } else if self.last - counter > WINDOW {
            return false;
        }
        let block = (counter / 64) as usize % RING_BLOCKS;
        let old = self.ring[block];
        self.ring[block] = old | 1 << (counter % 64);
        old != self.ring[block]
    }
}

/// Our opening state for one peer's datagrams: the current epoch (with the next one derived
/// ahead) and the previous one, each with its own replay window.
pub struct RxCipher {
    current: (EpochKeys, ReplayWindow),
    previous: Option<(EpochKeys, ReplayWindow)>,
    upcoming: EpochKeys,
}

impl RxCipher {
    pub fn new(key: &[u8; 32]) -> RxCipher {
        let current = EpochKeys::new(0, Zeroizing::new(*key));
        let upcoming = current.next();
        RxCipher {
            current: (current, ReplayWindow::default()),
            previous: None,
            upcoming,
        }
    }

    /// Authenticate and decrypt `body_and_tag` in place; returns the plaintext length.
    pub fn open(
        &mut self,
        epoch: u8,
        flags: u8,
        counter: u64,
        aad: &[u8],
        body_and_tag: &mut [u8],
    ) -> Result<usize, OpenError> {
        if body_and_tag.len() < TAG_LEN {
            return Err(OpenError::Auth);
        }
        let suite = if flags & FLAG_AES != 0 {
            Suite::Aes256Gcm
        } else {
            Suite::ChaCha20Poly1305
        };
        let plain_len = body_and_tag.len() - TAG_LEN;
        let open = |keys: &EpochKeys, buf: &mut [u8]| {
            keys.key(suite)
                .open_in_place(nonce(counter), Aad::from(aad), buf)
                .map(|_| ())
                .map_err(|_| OpenError::Auth)
        };
        if epoch == self.current.0.epoch {
            if !self.current.1.check(counter) {
                return Err(OpenError::Replay);
            }
            open(&self.current.0, body_and_tag)?;
            return if self.current.1.update(counter) {
                Ok(plain_len)
            } else {
                Err(OpenError::Replay)
            };
        }
        if let Some(prev) = self.previous.as_mut().filter(|p| p.0.epoch == epoch) {
            if !prev.1.check(counter) {
                return Err(OpenError::Replay);
            }
            open(&prev.0, body_and_tag)?;
            return if prev.1.update(counter) {
                Ok(plain_len)
            } else {
                Err(OpenError::Replay)
            };
        }
        if epoch == self.upcoming.epoch {
            open(&self.upcoming, body_and_tag)?;
            // Authenticated: the peer has moved on; so do we.
            let next = self.upcoming.next();
            let new_current = std::mem::replace(&mut self.upcoming, next);
            let mut window = ReplayWindow::default();
            window.update(counter);
            let old = std::mem::replace(&mut self.current, (new_current, window));
            self.previous = Some(old);
            return Ok(plain_len);
        }
        Err(OpenError::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal_one(tx: &mut TxCipher, now: Instant, msg: &[u8]) -> (u8, u64, Vec<u8>) {
        let (epoch, counter) = tx.next(now);
        let aad = [epoch, 1, 2, 3];
        let mut buf = msg.to_vec();
        let mut tag = [0u8; TAG_LEN];
        tx.seal(counter, &aad, &mut buf, &mut tag);
        buf.extend_from_slice(&tag);
        (epoch, counter, buf)
    }

    fn open_one(
        rx: &mut RxCipher,
        suite: Suite,
        sealed: &(u8, u64, Vec<u8>),
    ) -> Result<Vec<u8>, OpenError> {
        let (epoch, counter, buf) = sealed;
        let mut b = buf.clone();
        let n = rx.open(*epoch, suite.flag(), *counter, &[*epoch, 1, 2, 3], &mut b)?;
        Ok(b[..n].to_vec())
    }

    #[test]
    fn round_trip_both_suites() {
        for suite in [Suite::Aes256Gcm, Suite::ChaCha20Poly1305] {
            let mut tx = TxCipher::new(&[7; 32], suite);
            let mut rx = RxCipher::new(&[7; 32]);
            let now = Instant::now();
            for i in 0..10u8 {
                let msg = vec![i; 100 + usize::from(i)];
                let s = seal_one(&mut tx, now, &msg);
                assert_ne!(&s.2[..msg.len()], &msg[..]);
                assert_eq!(open_one(&mut rx, suite, &s).unwrap(), msg);
            }
        }
    }

    #[test]
    fn tamper_wrong_key_wrong_suite_fail() {
        let now = Instant::now();
        let mut tx = TxCipher::new(&[7; 32], Suite::Aes256Gcm);
        let s = seal_one(&mut tx, now, b"hello world");
        for i in 0..s.2.len() {
            let mut t = s.clone();
            t.2[i] ^= 0x40;
            assert_eq!(
                open_one(&mut RxCipher::new(&[7; 32]), Suite::Aes256Gcm, &t),
                Err(OpenError::Auth)
            );
        }
        assert_eq!(
            open_one(&mut RxCipher::new(&[8; 32]), Suite::Aes256Gcm, &s),
            Err(OpenError::Auth)
        );
        assert_eq!(
            open_one(&mut RxCipher::new(&[7; 32]), Suite::ChaCha20Poly1305, &s),
            Err(OpenError::Auth)
        );
        // Changing the associated data (the header) fails too.
        let mut rx = RxCipher::new(&[7; 32]);
        let mut b = s.2.clone();
        assert_eq!(
            rx.open(s.0, FLAG_AES, s.1, &[s.0, 1, 2, 4], &mut b),
            Err(OpenError::Auth)
        );
        assert_eq!(
            rx.open(s.0, FLAG_AES, s.1 + 1, &[s.0, 1, 2, 3], &mut s.2.clone()),
            Err(OpenError::Auth)
        );
        // A failed forgery does not burn the counter: the real datagram still opens.
        assert!(open_one(&mut rx, Suite::Aes256Gcm, &s).is_ok());
    }

    #[test]
    fn replays_are_rejected_reordering_within_window_is_not() {
        let now = Instant::now();
        let mut tx = TxCipher::new(&[1; 32], Suite::ChaCha20Poly1305);
        let mut rx = RxCipher::new(&[1; 32]);
        let sealed: Vec<_> = (0..3000)
            .map(|i| seal_one(&mut tx, now, &[i as u8; 20]))
            .collect();
        assert!(open_one(&mut rx, Suite::ChaCha20Poly1305, &sealed[2999]).is_ok());
        assert_eq!(
            open_one(&mut rx, Suite::ChaCha20Poly1305, &sealed[2999]),
            Err(OpenError::Replay)
        );
        // 1500 behind the newest: still inside the window, once.
        assert!(open_one(&mut rx, Suite::ChaCha20Poly1305, &sealed[1499]).is_ok());
        assert_eq!(
            open_one(&mut rx, Suite::ChaCha20Poly1305, &sealed[1499]),
            Err(OpenError::Replay)
        );
        // Too old.
        assert_eq!(
            open_one(&mut rx, Suite::ChaCha20Poly1305, &sealed[10]),
            Err(OpenError::Replay)
        );
    }

    #[test]
    fn replay_window_matches_a_reference_set() {
        // Compare against a brute-force model on a pseudo-random sequence of counters.
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::HashSet::new();
        let mut max: Option<u64> = None;
        let mut x: u64 = 12345;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let base = max.unwrap_or(0);
            let delta = (x >> 33) % 3000;
            let c = if x & 1 == 0 {
                base + delta % 70
            } else {
                base.saturating_sub(delta)
            };
            let m = max.unwrap_or(0);
            let expect = c > m || (m - c <= REPLAY_WINDOW_BITS - 64 && !seen.contains(&c));
            assert_eq!(w.update(c), expect, "counter {c} max {max:?}");
            if expect {
                seen.insert(c);
                max = Some(max.map_or(c, |m| m.max(c)));
            }
        }
    }

    #[test]
    fn rekey_by_count_and_time_is_followed() {
        let t0 = Instant::now();
        let mut tx = TxCipher::new(&[3; 32], Suite::Aes256Gcm);
        let mut rx = RxCipher::new(&[3; 32]);
        let a = seal_one(&mut tx, t0, b"epoch0");
        assert_eq!(a.0, 0);
        let late = seal_one(&mut tx, t0, b"epoch0-late");
        tx.counter = REKEY_AFTER_PACKETS;
        let b = seal_one(&mut tx, t0, b"epoch1");
        assert_eq!((b.0, b.1), (1, 0));
        let c = seal_one(
            &mut tx,
            t0 + REKEY_AFTER + Duration::from_secs(1),
            b"epoch2",
        );
        assert_eq!((c.0, c.1), (2, 0));
        assert_eq!(open_one(&mut rx, Suite::Aes256Gcm, &a).unwrap(), b"epoch0");
        assert_eq!(open_one(&mut rx, Suite::Aes256Gcm, &b).unwrap(), b"epoch1");
        // A straggler of the previous epoch still opens once.
        assert_eq!(
            open_one(&mut rx, Suite::Aes256Gcm, &late).unwrap(),
            b"epoch0-late"
        );
        assert_eq!(
            open_one(&mut rx, Suite::Aes256Gcm, &late),
            Err(OpenError::Replay)
        );
        assert_eq!(open_one(&mut rx, Suite::Aes256Gcm, &c).unwrap(), b"epoch2");
        // Two epochs back is gone.
        assert_eq!(
            open_one(&mut rx, Suite::Aes256Gcm, &a),
            Err(OpenError::Auth)
        );
    }

    #[test]
    fn forged_next_epoch_does_not_advance() {
        let mut rx = RxCipher::new(&[3; 32]);
        let mut junk = vec![0u8; 64];
        assert_eq!(rx.open(1, 0, 0, b"x", &mut junk), Err(OpenError::Auth));
        assert_eq!(rx.current.0.epoch, 0);
    }
}
