//! After the handshake: the encrypted control channel and the data-plane keys.
//!
//! `ChannelCipher` seals and opens whole control messages (gossip can be several MiB) with
//! ChaCha20-Poly1305 under per-direction keys and counter nonces. The stream is TCP, so messages
//! arrive exactly once and in order: the receiver expects counter n, and any loss, reordering,
//! replay or tampering fails authentication and breaks the cipher for good (the connection must
//! die). It never panics on input bytes.
//!
//! Why not snow's transport mode: Noise caps a message at 65535 bytes, so multi-MiB gossip would
//! need a chunking layer with its own framing and a tag per 64 KiB. Taking the two split keys
//! from the finished handshake and running the AEAD directly costs one tag per message, allows
//! messages up to ChaCha20-Poly1305's 256 GiB limit, and lets us derive independent data-plane
//! keys from the same split with HKDF (`derive_session_keys`).
//!
//! `DataKeys` holds the per-direction keys for the future UDP datapath. They stay in Rust: the
//! only view Python gets is a short, non-secret `fingerprint`.

use std::fmt;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Bytes a sealed message carries on top of its plaintext (the Poly1305 tag).
pub const TAG_LEN: usize = 16;
/// Length of every symmetric key here.
pub const KEY_LEN: usize = 32;

const LABEL_CONTROL_I2R: &[u8] = b"weavenet control initiator->responder v1";
const LABEL_CONTROL_R2I: &[u8] = b"weavenet control responder->initiator v1";
const LABEL_DATA_I2R: &[u8] = b"weavenet data initiator->responder v1";
const LABEL_DATA_R2I: &[u8] = b"weavenet data responder->initiator v1";
const FINGERPRINT_LABEL: &[u8] = b"weavenet data keys fingerprint v1";

type SecretKey = Zeroizing<[u8; KEY_LEN]>;

/// Why a control message could not be sealed or opened. Every variant means: close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelFailure {
    /// The message failed authentication: tampered, replayed, reordered, lost or wrong key.
    Authentication,
    /// Shorter than a tag: it cannot be a sealed message.
    Truncated,
    /// 2^64 messages in one direction: never in practice, but never a nonce reuse either.
    Exhausted,
    /// An earlier message failed; this channel is dead.
    Broken,
    /// The caller's output buffer has the wrong size (a bug on our side, not the peer's).
    BadBuffer,
}

impl fmt::Display for ChannelFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChannelFailure::Authentication => {
                "message failed authentication (tampered, replayed, reordered or lost in transit)"
            }
            ChannelFailure::Truncated => "message is shorter than its authentication tag",
            ChannelFailure::Exhausted => "message counter exhausted; reconnect to rekey",
            ChannelFailure::Broken => "channel already failed; close the connection",
            ChannelFailure::BadBuffer => "output buffer has the wrong size",
        })
    }
}

/// One direction's AEAD and its next counter.
struct Direction {
    aead: ChaCha20Poly1305,
    counter: u64,
}

impl Direction {
    fn new(key: &SecretKey) -> Direction {
        Direction {
            aead: ChaCha20Poly1305::new(Key::from_slice(key.as_slice())),
            counter: 0,
        }
    }

    /// The nonce for the current counter (Noise's ChaChaPoly layout: 4 zero bytes, 64-bit LE counter),
    /// and the counter advanced; `None` once the counter space is used up.
    fn next_nonce(&mut self) -> Option<Nonce> {
        if self.counter == u64::MAX {
            return None;
        }
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.counter.to_le_bytes());
        self.counter += 1;
        Some(Nonce::from(nonce))
    }
}

/// The control channel's sealing (our tx) and opening (our rx) state.
pub struct ChannelCipher {
    tx: Direction,
    rx: Direction,
    broken: bool,
}

impl ChannelCipher {
    fn new(tx: &SecretKey, rx: &SecretKey) -> ChannelCipher {
        ChannelCipher {
            tx: Direction::new(tx),
            rx: Direction::new(rx),
            broken: false,
        }
    }

    /// Encrypt and authenticate one message: ciphertext ‖ 16-byte tag. (Python seals into its own
    /// bytes object with `seal_into`; this allocating form serves Rust callers and tests.)
    #[cfg(test)]
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, ChannelFailure> {
        let mut out = vec![0u8; plaintext.len() + TAG_LEN];
        self.seal_into(plaintext, &mut out)?;
        Ok(out)
    }

    /// `seal` writing into `out`, which must be exactly `plaintext.len() + TAG_LEN` bytes (so the
    /// caller can seal straight into a Python bytes object).
    pub fn seal_into(&mut self, plaintext: &[u8], out: &mut [u8]) -> Result<(), ChannelFailure> {
        if self.broken {
            return Err(ChannelFailure::Broken);
        }
        if out.len() != plaintext.len() + TAG_LEN {
            return Err(ChannelFailure::BadBuffer);
        }
        let Some(nonce) = self.tx.next_nonce() else {
            self.broken = true;
            return Err(ChannelFailure::Exhausted);
        };
        let (body, tag_out) = out.split_at_mut(plaintext.len());
        body.copy_from_slice(plaintext);
        match self.tx.aead.encrypt_in_place_detached(&nonce, b"", body) {
            Ok(tag) => {
                tag_out.copy_from_slice(&tag);
                Ok(())
            }
            Err(_) => {
                // Only possible past ChaCha20's 256 GiB per-message limit.
                self.broken = true;
                Err(ChannelFailure::Exhausted)
            }
        }
    }

    /// Check and decrypt the next message from the peer. Any failure breaks the channel.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, ChannelFailure> {
        let Some(len) = sealed.len().checked_sub(TAG_LEN) else {
            self.broken = true;
            return Err(ChannelFailure::Truncated);
        };
        let mut out = vec![0u8; len];
        self.open_into(sealed, &mut out)?;
        Ok(out)
    }

    /// `open` writing into `out`, which must be exactly `sealed.len() - TAG_LEN` bytes. On failure
    /// `out` holds unauthenticated bytes: the caller must discard it.
    pub fn open_into(&mut self, sealed: &[u8], out: &mut [u8]) -> Result<(), ChannelFailure> {
        if self.broken {
            return Err(ChannelFailure::Broken);
        }
        let result = self.open_inner(sealed, out);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn open_inner(&mut self, sealed: &[u8], out: &mut [u8]) -> Result<(), ChannelFailure> {
        let Some(body_len) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(ChannelFailure::Truncated);
        };
        if out.len() != body_len {
            return Err(ChannelFailure::BadBuffer);
        }
        let nonce = self.rx.next_nonce().ok_or(ChannelFailure::Exhausted)?;
        let (body, tag) = sealed.split_at(body_len);
        out.copy_from_slice(body);
        self.rx
            .aead
            .decrypt_in_place_detached(&nonce, b"", out, Tag::from_slice(tag))
            .map_err(|_| ChannelFailure::Authentication)
    }

    /// Whether a failure has already killed this channel.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

impl fmt::Debug for ChannelCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelCipher")
            .field("sent", &self.tx.counter)
            .field("received", &self.rx.counter)
            .field("broken", &self.broken)
            .finish()
    }
}

/// Per-direction 32-byte keys for the UDP datapath, agreed by both ends of one connection.
#[derive(Clone)]
pub struct DataKeys {
    initiator_to_responder: SecretKey,
    responder_to_initiator: SecretKey,
    we_initiated: bool,
}

impl DataKeys {
    /// The key we encrypt our datagrams with (the peer's `rx_key`).
    pub fn tx_key(&self) -> &[u8; KEY_LEN] {
        if self.we_initiated {
            &self.initiator_to_responder
        } else {
            &self.responder_to_initiator
        }
    }

    /// The key the peer's datagrams to us are encrypted with (the peer's `tx_key`).
    pub fn rx_key(&self) -> &[u8; KEY_LEN] {
        if self.we_initiated {
            &self.responder_to_initiator
        } else {
            &self.initiator_to_responder
        }
    }

    /// Whether our side dialled the connection.
    pub fn we_initiated(&self) -> bool {
        self.we_initiated
    }

    /// A short hash both ends compute identically; reveals nothing usable about the keys
    /// (64 bits of SHA-256 over 512 secret bits, under its own label).
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(FINGERPRINT_LABEL);
        hash.update(self.initiator_to_responder.as_slice());
        hash.update(self.responder_to_initiator.as_slice());
        hash.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKeys(fingerprint={})", self.fingerprint())
    }
}

fn expand(prk: &Hkdf<Sha256>, label: &[u8]) -> SecretKey {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit: this cannot fail.
    if prk.expand(label, key.as_mut_slice()).is_err() {
        unreachable!("HKDF-SHA256 can always expand 32 bytes");
    }
    key
}

/// Derive the control-channel cipher and the data-plane keys from a finished Noise handshake:
/// `split_i2r`/`split_r2i` are Noise's Split() outputs and `handshake_hash` its transcript hash.
/// Each direction's split key is HKDF-extracted with the transcript hash as salt, then expanded
/// under distinct labels, so control and data keys are independent of each other and of snow's own
/// transport keys, and bound to this exact handshake.
pub fn derive_session_keys(
    split_i2r: &[u8; KEY_LEN],
    split_r2i: &[u8; KEY_LEN],
    handshake_hash: &[u8],
    we_initiated: bool,
) -> (ChannelCipher, DataKeys) {
    let i2r = Hkdf::<Sha256>::new(Some(handshake_hash), split_i2r);
    let r2i = Hkdf::<Sha256>::new(Some(handshake_hash), split_r2i);
    let control_i2r = expand(&i2r, LABEL_CONTROL_I2R);
    let control_r2i = expand(&r2i, LABEL_CONTROL_R2I);
    let cipher = if we_initiated {
        ChannelCipher::new(&control_i2r, &control_r2i)
    } else {
        ChannelCipher::new(&control_r2i, &control_i2r)
    };
    let data = DataKeys {
        initiator_to_responder: expand(&i2r, LABEL_DATA_I2R),
        responder_to_initiator: expand(&r2i, LABEL_DATA_R2I),
        we_initiated,
    };
    (cipher, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> ((ChannelCipher, DataKeys), (ChannelCipher, DataKeys)) {
        let (a, b, h) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        (
            derive_session_keys(&a, &b, &h, true),
            derive_session_keys(&a, &b, &h, false),
        )
    }

    #[test]
    fn both_directions_round_trip_and_keys_agree() {
        let ((mut ic, ik), (mut rc, rk)) = pair();
        for i in 0..5u8 {
            let m = vec![i; 1000 * usize::from(i)];
            assert_eq!(rc.open(&ic.seal(&m).unwrap()).unwrap(), m);
            assert_eq!(ic.open(&rc.seal(&m).unwrap()).unwrap(), m);
        }
        assert_eq!(ik.tx_key(), rk.rx_key());
        assert_eq!(ik.rx_key(), rk.tx_key());
        assert_ne!(ik.tx_key(), ik.rx_key());
        assert_eq!(ik.fingerprint(), rk.fingerprint());
        assert_eq!(ik.fingerprint().len(), 16);
    }

    #[test]
    fn data_keys_differ_from_control_keys() {
        let ((mut ic, ik), _) = pair();
        // A message sealed under the control key must not open under the data key.
        let sealed = ic.seal(b"hello").unwrap();
        let mut as_data =
            ChannelCipher::new(&Zeroizing::new(*ik.rx_key()), &Zeroizing::new(*ik.tx_key()));
        assert_eq!(as_data.open(&sealed), Err(ChannelFailure::Authentication));
    }

    #[test]
    fn tampered_message_is_rejected_and_breaks_the_channel() {
        let ((mut ic, _), (mut rc, _)) = pair();
        let mut sealed = ic.seal(b"gossip").unwrap();
        sealed[0] ^= 1;
        assert_eq!(rc.open(&sealed), Err(ChannelFailure::Authentication));
        assert!(rc.is_broken());
        let next = ic.seal(b"more").unwrap();
        assert_eq!(rc.open(&next), Err(ChannelFailure::Broken));
    }

    #[test]
    fn replayed_message_is_rejected() {
        let ((mut ic, _), (mut rc, _)) = pair();
        let first = ic.seal(b"one").unwrap();
        assert_eq!(rc.open(&first).unwrap(), b"one");
        assert_eq!(rc.open(&first), Err(ChannelFailure::Authentication));
    }

    #[test]
    fn reordered_messages_are_rejected() {
        let ((mut ic, _), (mut rc, _)) = pair();
        let _first = ic.seal(b"one").unwrap();
        let second = ic.seal(b"two").unwrap();
        assert_eq!(rc.open(&second), Err(ChannelFailure::Authentication));
    }

    #[test]
    fn reflected_message_is_rejected() {
        // Our own message sent back to us must not open: directions have different keys.
        let ((mut ic, _), _) = pair();
        let sealed = ic.seal(b"echo").unwrap();
        assert_eq!(ic.open(&sealed), Err(ChannelFailure::Authentication));
    }

    #[test]
    fn truncated_message_is_rejected() {
        let ((_, _), (mut rc, _)) = pair();
        assert_eq!(rc.open(&[0u8; TAG_LEN - 1]), Err(ChannelFailure::Truncated));
    }

    #[test]
    fn empty_and_multi_mebibyte_messages_work() {
        let ((mut ic, _), (mut rc, _)) = pair();
        assert_eq!(rc.open(&ic.seal(b"").unwrap()).unwrap(), b"");
        let big = vec![0xa5u8; 5 << 20];
        let sealed = ic.seal(&big).unwrap();
        assert_eq!(sealed.len(), big.len() + TAG_LEN);
        assert_eq!(rc.open(&sealed).unwrap(), big);
    }

    #[test]
    fn counter_exhaustion_refuses_instead_of_reusing_a_nonce() {
        let ((mut ic, _), _) = pair();
        ic.tx.counter = u64::MAX;
        assert_eq!(ic.seal(b"x"), Err(ChannelFailure::Exhausted));
        assert_eq!(ic.seal(b"x"), Err(ChannelFailure::Broken));
    }

    #[test]
    fn debug_output_shows_no_keys() {
        let ((ic, ik), _) = pair();
        assert!(format!("{ic:?}").starts_with("ChannelCipher"));
        assert_eq!(
            format!("{ik:?}"),
            format!("DataKeys(fingerprint={})", ik.fingerprint())
        );
    }
}
