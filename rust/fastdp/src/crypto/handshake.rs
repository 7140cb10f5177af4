//! The password handshake of a mesh connection: SPAKE2, then Noise `NNpsk0`, carrying the intros.
//!
//! A pure state machine: it makes and checks message bodies; the caller (Python, over TCP) frames
//! and moves them. It never panics on input bytes and never reveals the mesh key.
//!
//! # Messages (each body starts with a kind byte)
//! ```text
//!  initiator (dialled)                         responder (accepted)
//!  PAKE  [1] 'A' ‖ X   ────────┐   ┌────────   PAKE  [1] 'B' ‖ Y     (both at once)
//!  NOISE [2] e ‖ AEAD(intro_i)  ─────────────▶
//!                              ◀─────────────  NOISE [2] e ‖ ee ‖ AEAD(intro_r)
//!                              ◀─────────────  or REFUSAL [3] 1   (responder could not authenticate)
//! ```
//!
//! # Why not Noise with a password-derived PSK alone
//! Weave Net's weakness (router.md §2.3): anyone who reaches TCP 6783 completes an unauthenticated
//! key exchange and receives a message whose key is a function of (their own DH secret, password),
//! so its tag confirms password guesses offline. Replacing that with Noise and a PSK from the
//! password does not close it; the PSK position only chooses who can mount the attack:
//! - `NNpsk0`: message 1's key depends on the PSK and the *public* `e` only, so even a passive
//!   eavesdropper can test guesses offline against message 1.
//! - `NNpsk2`: message 2's key depends on `ee` and the PSK. A passive observer cannot compute `ee`,
//!   but an active attacker who dials us knows its own ephemeral secret, so it computes `ee` and
//!   tests guesses offline against message 2: exactly Weave Net's attack.
//!
//! The same holds for any pattern whose only secret is a PSK: whoever first sends a PSK-keyed
//! message to an unauthenticated party hands it a verifier. Argon2id only makes each guess cost
//! ~0.2 s; a guessable password still falls. Since the password is our only credential, we put a
//! PAKE in front (the fix router.md §5 proposes): SPAKE2 (RustCrypto `spake2`, Ed25519 group).
//! Each side sends its ephemeral point blinded by the password (X = x·G + w·M, Y = y·G + w·N, with
//! w derived from the Argon2id key). An eavesdropper cannot compute the resulting key K at all (that
//! is CDH); an active attacker commits to exactly one guess w' in the one message it sends, so it
//! learns at most whether that single guess was right. Everything after is keyed by K, so every
//! ciphertext it sees verifies only that one guess. Guessing is therefore online only, one guess per
//! TCP connection, which the accept throttle limits.
//!
//! # Why NNpsk0 after the PAKE
//! With K (high entropy, fresh per connection) as the PSK, PSK placement no longer matters for
//! dictionary attacks. `psk0` wins on the rest: the initiator's intro in message 1 is already
//! encrypted and authenticated (in `NNpsk2` message 1's payload would travel in clear), and a wrong
//! password is detected by the responder on the first Noise message. Noise adds what bare SPAKE2
//! lacks: explicit key confirmation both ways, a transcript hash over the protocol headers (the
//! prologue, so a downgrade of version or mode fails the handshake) and both PAKE messages, and
//! an `ee` DH whose split keys feed the channel and data keys. Everything is forward secret: K
//! comes from ephemeral SPAKE2 scalars and the split keys also from `ee`, so a password holder who
//! recorded the handshake cannot recompute them.
//!
//! # Reporting a wrong password on both sides
//! Only the responder can notice (message 1 fails to authenticate). It then sends a REFUSAL body,
//! two constant plaintext bytes, and closes; the initiator reports "password mismatch" on reading
//! it. That is safe: the refusal depends on nothing secret, so it tells the peer only what the
//! closed connection tells it anyway (that one online guess was wrong). A forged refusal can only
//! make a connection fail, which anyone on the path can already do by resetting TCP; the initiator
//! never treats a refusal as grounds to succeed.

use std::fmt;

use curve25519_dalek::edwards::CompressedEdwardsY;
use hkdf::Hkdf;
use sha2::Sha256;
use snow::params::NoiseParams;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use zeroize::Zeroizing;

use super::psk::Psk;
use super::transport::{derive_session_keys, ChannelCipher, DataKeys};

/// The Noise protocol name: see the module docs for the choice.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest handshake body we send or accept (the caller checks its length prefix against it).
pub const MAX_HANDSHAKE_MESSAGE: usize = 8192;
/// Largest intro blob: it must fit in one Noise message with room to spare.
pub const MAX_INTRO: usize = 4096;

const KIND_PAKE: u8 = 1;
const KIND_NOISE: u8 = 2;
const KIND_REFUSAL: u8 = 3;
const REFUSAL_PASSWORD_MISMATCH: u8 = 1;
const SPAKE2_MESSAGE_LEN: usize = 33; // side byte ‖ compressed Edwards point
const ID_INITIATOR: &[u8] = b"weavenet mesh initiator v1";
const ID_RESPONDER: &[u8] = b"weavenet mesh responder v1";
const PROLOGUE_LABEL: &[u8] = b"weavenet mesh handshake v1";
const NOISE_PSK_SALT: &[u8] = b"weavenet noise psk v1";
/// Noise's own limit on one message.
const NOISE_MAX: usize = 65535;

/// Why a handshake failed. `reason()` is a short phrase for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The peer's handshake did not authenticate under our key, or it refused ours.
    PasswordMismatch { we_noticed: bool },
    /// The peer sent bytes that are not a well-formed handshake message.
    Malformed(&'static str),
    /// A well-formed message arrived at the wrong step.
    Unexpected(&'static str),
    /// Our own intro is larger than `MAX_INTRO`.
    IntroTooLarge(usize),
    /// The caller drove the state machine out of order (a bug on our side, not the peer's).
    Misuse(&'static str),
    /// The crypto library failed (RNG, parameters): not caused by the peer.
    Internal(String),
}

impl HandshakeFailure {
    /// A short phrase, suitable for status and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeFailure::PasswordMismatch { .. } => "password mismatch",
            HandshakeFailure::Malformed(_) => "malformed handshake message",
            HandshakeFailure::Unexpected(_) => "unexpected handshake message",
            HandshakeFailure::IntroTooLarge(_) => "intro too large",
            HandshakeFailure::Misuse(_) => "handshake used out of order",
            HandshakeFailure::Internal(_) => "handshake failed",
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeFailure::PasswordMismatch { we_noticed: true } => f.write_str(
                "password mismatch: the peer's handshake did not authenticate with our password \
                 (or was altered in transit); set the same WEAVE_PASSWORD on both hosts",
            ),
            HandshakeFailure::PasswordMismatch { we_noticed: false } => f.write_str(
                "password mismatch: the peer could not authenticate our handshake; \
                 set the same WEAVE_PASSWORD on both hosts",
            ),
            HandshakeFailure::Malformed(what) => write!(f, "malformed handshake message: {what}"),
            HandshakeFailure::Unexpected(what) => write!(f, "unexpected handshake message: {what}"),
            HandshakeFailure::IntroTooLarge(n) => {
                write!(f, "intro too large: {n} bytes, at most {MAX_INTRO}")
            }
            HandshakeFailure::Misuse(what) => write!(f, "handshake used out of order: {what}"),
            HandshakeFailure::Internal(what) => write!(f, "handshake failed: {what}"),
        }
    }
}

impl From<snow::Error> for HandshakeFailure {
    fn from(e: snow::Error) -> Self {
        HandshakeFailure::Internal(format!("noise: {e}"))
    }
}

/// What a finished handshake gives the connection (its `Debug` shows no key bytes).
#[derive(Debug)]
pub struct Session {
    pub cipher: ChannelCipher,
    pub data_keys: DataKeys,
    pub remote_intro: Vec<u8>,
}

enum Stage {
    /// Our PAKE message is ready to send.
    SendPake {
        spake: Spake2<Ed25519Group>,
        ours: Vec<u8>,
    },
    /// Waiting for the peer's PAKE message.
    AwaitPake {
        spake: Spake2<Ed25519Group>,
        ours: Vec<u8>,
    },
    /// Our next Noise message is ready to write.
    SendNoise(Box<snow::HandshakeState>),
    /// Waiting for the peer's next Noise message.
    AwaitNoise(Box<snow::HandshakeState>),
    /// Done: the session is waiting to be taken.
    Complete(Box<Session>),
    /// The session was taken, or the handshake failed.
    Over,
}

/// One side of one connection's password handshake.
pub struct Handshake {
    initiator: bool,
    intro: Vec<u8>,
    prologue: Vec<u8>,
    stage: Stage,
    remote_intro: Option<Vec<u8>>,
    refusal_due: bool,
}

impl Handshake {
    /// Start a handshake. `prologue` is bound into the transcript (the caller passes both protocol
    /// headers, initiator's first); `intro` travels encrypted to the peer.
    pub fn new(
        psk: &Psk,
        initiator: bool,
        intro: &[u8],
        prologue: &[u8],
    ) -> Result<Handshake, HandshakeFailure> {
        if intro.len() > MAX_INTRO {
            return Err(HandshakeFailure::IntroTooLarge(intro.len()));
        }
        let password = Password::new(psk.expose());
        let (id_a, id_b) = (Identity::new(ID_INITIATOR), Identity::new(ID_RESPONDER));
        let (spake, ours) = if initiator {
            Spake2::<Ed25519Group>::start_a(&password, &id_a, &id_b)
        } else {
            Spake2::<Ed25519Group>::start_b(&password, &id_a, &id_b)
        };
        let mut body = Vec::with_capacity(1 + ours.len());
        body.push(KIND_PAKE);
        body.extend_from_slice(&ours);
        Ok(Handshake {
            initiator,
            intro: intro.to_vec(),
            prologue: prologue.to_vec(),
            stage: Stage::SendPake { spake, ours: body },
            remote_intro: None,
            refusal_due: false,
        })
    }

    /// The next body to send, or `None` when it is the peer's turn (or we are done).
    pub fn write_message(&mut self) -> Result<Option<Vec<u8>>, HandshakeFailure> {
        match std::mem::replace(&mut self.stage, Stage::Over) {
            Stage::SendPake { spake, ours } => {
                let out = ours.clone();
                self.stage = Stage::AwaitPake { spake, ours };
                Ok(Some(out))
            }
            Stage::SendNoise(mut noise) => {
                let mut buf = vec![0u8; NOISE_MAX];
                let n = noise.write_message(&self.intro, &mut buf)?;
                let mut body = Vec::with_capacity(1 + n);
                body.push(KIND_NOISE);
                body.extend_from_slice(&buf[..n]);
                self.stage = self.after_noise_step(noise)?;
                Ok(Some(body))
            }
            stage @ (Stage::AwaitPake { .. } | Stage::AwaitNoise(_) | Stage::Complete(_)) => {
                self.stage = stage;
                Ok(None)
            }
            Stage::Over => Err(HandshakeFailure::Misuse("the handshake is over")),
        }
    }

    /// Take in one body from the peer. On failure the handshake is over; see `refusal`.
    pub fn read_message(&mut self, body: &[u8]) -> Result<(), HandshakeFailure> {
        let result = self.read_inner(body);
        if result.is_err() {
            self.stage = Stage::Over;
        }
        result
    }

    fn read_inner(&mut self, body: &[u8]) -> Result<(), HandshakeFailure> {
        if body.len() > MAX_HANDSHAKE_MESSAGE {
            return Err(HandshakeFailure::Malformed(
                "longer than the handshake limit",
            ));
        }
        let Some((&kind, rest)) = body.split_first() else {
            return Err(HandshakeFailure::Malformed("empty"));
        };
        match std::mem::replace(&mut self.stage, Stage::Over) {
            Stage::AwaitPake { spake, ours } => match kind {
                KIND_PAKE => {
                    let noise = self.finish_pake(spake, &ours, rest)?;
                    self.stage = if self.initiator {
                        Stage::SendNoise(noise)
                    } else {
                        Stage::AwaitNoise(noise)
                    };
                    Ok(())
                }
                _ => Err(HandshakeFailure::Unexpected("expected the PAKE message")),
            },
            Stage::AwaitNoise(mut noise) => match kind {
                KIND_NOISE => {
                    if rest.len() > NOISE_MAX {
                        return Err(HandshakeFailure::Malformed("longer than a Noise message"));
                    }
                    let mut payload = vec![0u8; rest.len()];
                    let n = match noise.read_message(rest, &mut payload) {
                        Ok(n) => n,
                        Err(snow::Error::Decrypt) => {
                            // Only the side that fails to authenticate tells the peer why.
                            self.refusal_due = true;
                            return Err(HandshakeFailure::PasswordMismatch { we_noticed: true });
                        }
                        Err(_) => {
                            return Err(HandshakeFailure::Malformed("not a valid Noise message"))
                        }
                    };
                    if n > MAX_INTRO {
                        return Err(HandshakeFailure::Malformed("intro longer than the limit"));
                    }
                    payload.truncate(n);
                    self.remote_intro = Some(payload);
                    self.stage = self.after_noise_step(noise)?;
                    Ok(())
                }
                KIND_REFUSAL if rest == [REFUSAL_PASSWORD_MISMATCH] && self.initiator => {
                    Err(HandshakeFailure::PasswordMismatch { we_noticed: false })
                }
                _ => Err(HandshakeFailure::Unexpected(
                    "expected a Noise handshake message",
                )),
            },
            Stage::SendPake { .. } | Stage::SendNoise(_) => Err(HandshakeFailure::Misuse(
                "a message arrived while we still had one to send",
            )),
            Stage::Complete(_) | Stage::Over => {
                Err(HandshakeFailure::Unexpected("the handshake is over"))
            }
        }
    }

    /// Check the peer's PAKE message, derive K and set up Noise with it as the PSK.
    fn finish_pake(
        &self,
        spake: Spake2<Ed25519Group>,
        ours: &[u8],
        theirs: &[u8],
    ) -> Result<Box<snow::HandshakeState>, HandshakeFailure> {
        if theirs.len() != SPAKE2_MESSAGE_LEN {
            return Err(HandshakeFailure::Malformed(
                "PAKE message has the wrong length",
            ));
        }
        // The crate checks the side byte and that the point decompresses; we also refuse the
        // identity and points with a small-order component, which carry no honest peer's key.
        let mut point = [0u8; 32];
        point.copy_from_slice(&theirs[1..]);
        match CompressedEdwardsY(point).decompress() {
            Some(p) if p.is_torsion_free() && !p.is_small_order() => {}
            _ => {
                return Err(HandshakeFailure::Malformed(
                    "PAKE message is not a valid group element",
                ))
            }
        }
        let shared = Zeroizing::new(spake.finish(theirs).map_err(|_| {
            HandshakeFailure::Malformed("PAKE message from the wrong side or corrupt")
        })?);
        let mut noise_psk = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(NOISE_PSK_SALT), &shared)
            .expand(b"", noise_psk.as_mut_slice())
            .map_err(|_| HandshakeFailure::Internal("HKDF expand".into()))?;

        // Prologue: label ‖ len(caller prologue) ‖ caller prologue ‖ PAKE(A) ‖ PAKE(B).
        let ours = ours.get(1..).unwrap_or_default(); // without our kind byte, like `theirs`
        let (pake_a, pake_b) = if self.initiator {
            (ours, theirs)
        } else {
            (theirs, ours)
        };
        let mut prologue =
            Vec::with_capacity(PROLOGUE_LABEL.len() + 4 + self.prologue.len() + 2 * 34);
        prologue.extend_from_slice(PROLOGUE_LABEL);
        prologue.extend_from_slice(
            &u32::try_from(self.prologue.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        prologue.extend_from_slice(&self.prologue);
        prologue.extend_from_slice(pake_a);
        prologue.extend_from_slice(pake_b);

        let params: NoiseParams = NOISE_PATTERN.parse()?;
        let builder = snow::Builder::new(params)
            .prologue(&prologue)?
            .psk(0, &noise_psk)?;
        let noise = if self.initiator {
            builder.build_initiator()?
        } else {
            builder.build_responder()?
        };
        Ok(Box::new(noise))
    }

    /// After we wrote or read a Noise message: either more to do, or derive the session.
    fn after_noise_step(
        &mut self,
        mut noise: Box<snow::HandshakeState>,
    ) -> Result<Stage, HandshakeFailure> {
        if !noise.is_handshake_finished() {
            return Ok(if noise.is_my_turn() {
                Stage::SendNoise(noise)
            } else {
                Stage::AwaitNoise(noise)
            });
        }
        let remote_intro = self.remote_intro.take().ok_or(HandshakeFailure::Internal(
            "finished without the peer's intro".into(),
        ))?;
        let hash = noise.get_handshake_hash().to_vec();
        let (i2r, r2i) = noise.dangerously_get_raw_split();
        let (i2r, r2i) = (Zeroizing::new(i2r), Zeroizing::new(r2i));
        let (cipher, data_keys) = derive_session_keys(&i2r, &r2i, &hash, self.initiator);
        Ok(Stage::Complete(Box::new(Session {
            cipher,
            data_keys,
            remote_intro,
        })))
    }

    /// Whether `finish` can be called.
    pub fn is_complete(&self) -> bool {
        matches!(self.stage, Stage::Complete(_))
    }

    /// After a failed `read_message`: the body to send the peer before closing, if it should hear
    /// why (a wrong password, so both sides report "password mismatch"). Constant, not secret.
    pub fn refusal(&self) -> Option<Vec<u8>> {
        self.refusal_due
            .then(|| vec![KIND_REFUSAL, REFUSAL_PASSWORD_MISMATCH])
    }

    /// Take the finished session (once).
    pub fn finish(&mut self) -> Result<Session, HandshakeFailure> {
        match std::mem::replace(&mut self.stage, Stage::Over) {
            Stage::Complete(session) => Ok(*session),
            other => {
                self.stage = other;
                Err(HandshakeFailure::Misuse("the handshake is not complete"))
            }
        }
    }

    /// Whether we dialled.
    pub fn is_initiator(&self) -> bool {
        self.initiator
    }
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match self.stage {
            Stage::SendPake { .. } => "send-pake",
            Stage::AwaitPake { .. } => "await-pake",
            Stage::SendNoise(_) => "send-noise",
            Stage::AwaitNoise(_) => "await-noise",
            Stage::Complete(_) => "complete",
            Stage::Over => "over",
        };
        f.debug_struct("Handshake")
            .field("initiator", &self.initiator)
            .field("stage", &stage)
            .finish()
    }
}
