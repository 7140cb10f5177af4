//! Scenario tests for the whole handshake: two routers, right and wrong passwords, and a hostile
//! network that tampers, replays, truncates and sends garbage.

use proptest::prelude::*;

use super::handshake::{Handshake, HandshakeFailure, Session, MAX_HANDSHAKE_MESSAGE, MAX_INTRO};
use super::psk::Psk;
use super::transport::{derive_session_keys, ChannelFailure};

/// Cheap Argon2 parameters: the handshake does not care how the key was stretched.
fn key(password: &str) -> Psk {
    Psk::derive_with(password.as_bytes(), 64, 1, 1).unwrap()
}

const HEADERS: &[u8] = b"weavenet\x01\x01\x01weavenet\x01\x01\x01";

/// Relay every message between the two sides, round by round (both write, then both read, as
/// over TCP where both send at once), until neither has anything to say. `tamper(step, body)` may
/// rewrite a message in flight. A side that fails sends its refusal, if any, untampered.
fn run(
    initiator: &mut Handshake,
    responder: &mut Handshake,
    mut tamper: impl FnMut(usize, &mut Vec<u8>),
) -> (
    Result<Session, HandshakeFailure>,
    Result<Session, HandshakeFailure>,
) {
    let sides: [&mut Handshake; 2] = [initiator, responder];
    let mut failures: [Option<HandshakeFailure>; 2] = [None, None];
    let mut inbox: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    let mut step = 0;
    loop {
        let mut progressed = false;
        for side in 0..2 {
            while failures[side].is_none() {
                match sides[side].write_message() {
                    Ok(Some(mut body)) => {
                        tamper(step, &mut body);
                        step += 1;
                        inbox[1 - side].push(body);
                        progressed = true;
                    }
                    Ok(None) => break,
                    Err(e) => failures[side] = Some(e),
                }
            }
        }
        for side in 0..2 {
            for body in std::mem::take(&mut inbox[side]) {
                if failures[side].is_some() {
                    break;
                }
                progressed = true;
                if let Err(e) = sides[side].read_message(&body) {
                    if let Some(refusal) = sides[side].refusal() {
                        inbox[1 - side].push(refusal);
                    }
                    failures[side] = Some(e);
                }
            }
        }
        if !progressed {
            break;
        }
    }
    let [fi, fr] = failures;
    let [i, r] = sides;
    let outcome = |hs: &mut Handshake, f: Option<HandshakeFailure>| match f {
        Some(e) => Err(e),
        None => hs.finish(),
    };
    (outcome(i, fi), outcome(r, fr))
}

fn connect(
    pi: &str,
    pr: &str,
) -> (
    Result<Session, HandshakeFailure>,
    Result<Session, HandshakeFailure>,
) {
    let mut i = Handshake::new(&key(pi), true, b"intro from A", HEADERS).unwrap();
    let mut r = Handshake::new(&key(pr), false, b"intro from B", HEADERS).unwrap();
    run(&mut i, &mut r, |_, _| {})
}

#[test]
fn right_password_connects_and_both_ends_agree() {
    let (i, r) = connect("s3cret", "s3cret");
    let (mut i, mut r) = (i.unwrap(), r.unwrap());
    assert_eq!(i.remote_intro, b"intro from B");
    assert_eq!(r.remote_intro, b"intro from A");
    assert_eq!(i.data_keys.tx_key(), r.data_keys.rx_key());
    assert_eq!(i.data_keys.rx_key(), r.data_keys.tx_key());
    assert_ne!(i.data_keys.tx_key(), i.data_keys.rx_key());
    assert_eq!(i.data_keys.fingerprint(), r.data_keys.fingerprint());
    let big = vec![7u8; 3 << 20];
    assert_eq!(r.cipher.open(&i.cipher.seal(&big).unwrap()).unwrap(), big);
    assert_eq!(
        i.cipher.open(&r.cipher.seal(b"ack").unwrap()).unwrap(),
        b"ack"
    );
}

#[test]
fn each_connection_gets_its_own_keys() {
    let (a, _) = connect("pw", "pw");
    let (b, _) = connect("pw", "pw");
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.data_keys.tx_key(), b.data_keys.tx_key());
    assert_ne!(a.data_keys.fingerprint(), b.data_keys.fingerprint());
}

#[test]
fn wrong_password_is_a_password_mismatch_on_both_sides() {
    let (i, r) = connect("alpha", "bravo");
    let (i, r) = (i.unwrap_err(), r.unwrap_err());
    assert_eq!(r, HandshakeFailure::PasswordMismatch { we_noticed: true });
    assert_eq!(i, HandshakeFailure::PasswordMismatch { we_noticed: false });
    assert_eq!(i.reason(), "password mismatch");
    assert_eq!(r.reason(), "password mismatch");
    assert!(i.to_string().contains("WEAVE_PASSWORD"));
}

#[test]
fn altered_headers_fail_the_handshake() {
    let mut i = Handshake::new(&key("pw"), true, b"a", HEADERS).unwrap();
    let mut r = Handshake::new(
        &key("pw"),
        false,
        b"b",
        b"weavenet\x01\x02\x01weavenet\x01\x01\x01",
    )
    .unwrap();
    let (i, r) = run(&mut i, &mut r, |_, _| {});
    assert!(i.is_err() && r.is_err());
}

#[test]
fn every_single_bit_flip_in_flight_fails_cleanly() {
    // Message lengths: PAKE 34 + 34, Noise 1 + 32 + intro + 16, Noise 1 + 32 + intro + 16.
    for step in 0..4 {
        for byte in 0..34 {
            let mut i = Handshake::new(&key("pw"), true, b"A", HEADERS).unwrap();
            let mut r = Handshake::new(&key("pw"), false, b"B", HEADERS).unwrap();
            let (ri, rr) = run(&mut i, &mut r, |s, body| {
                if s == step && byte < body.len() {
                    body[byte] ^= 0x01;
                }
            });
            assert!(
                ri.is_err() || rr.is_err(),
                "step {step} byte {byte} went unnoticed"
            );
        }
    }
}

#[test]
fn a_reflected_pake_message_is_refused() {
    let mut r = Handshake::new(&key("pw"), false, b"B", HEADERS).unwrap();
    let ours = r.write_message().unwrap().unwrap();
    assert!(matches!(
        r.read_message(&ours),
        Err(HandshakeFailure::Malformed(_))
    ));
}

#[test]
fn small_order_points_are_refused() {
    let mut r = Handshake::new(&key("pw"), false, b"B", HEADERS).unwrap();
    r.write_message().unwrap();
    let mut body = vec![1u8, b'A'];
    body.extend_from_slice(&[0u8; 32]); // y = 0: a point of order 4
    body[2] = 0;
    let mut identity = vec![1u8, b'A', 1];
    identity.extend_from_slice(&[0u8; 31]); // the identity (y = 1)
    assert!(matches!(
        r.read_message(&body),
        Err(HandshakeFailure::Malformed(_))
    ));
    let mut r = Handshake::new(&key("pw"), false, b"B", HEADERS).unwrap();
    r.write_message().unwrap();
    assert!(matches!(
        r.read_message(&identity),
        Err(HandshakeFailure::Malformed(_))
    ));
}

#[test]
fn a_refusal_before_any_crypto_is_not_believed() {
    let mut i = Handshake::new(&key("pw"), true, b"A", HEADERS).unwrap();
    i.write_message().unwrap();
    assert!(matches!(
        i.read_message(&[3, 1]),
        Err(HandshakeFailure::Unexpected(_))
    ));
}

#[test]
fn intro_size_is_bounded() {
    assert!(Handshake::new(&key("pw"), true, &vec![0; MAX_INTRO], HEADERS).is_ok());
    assert_eq!(
        Handshake::new(&key("pw"), true, &vec![0; MAX_INTRO + 1], HEADERS).unwrap_err(),
        HandshakeFailure::IntroTooLarge(MAX_INTRO + 1)
    );
}

#[test]
fn largest_intro_fits_the_handshake_limit() {
    let mut i = Handshake::new(&key("pw"), true, &vec![1; MAX_INTRO], HEADERS).unwrap();
    let mut r = Handshake::new(&key("pw"), false, &vec![2; MAX_INTRO], HEADERS).unwrap();
    let mut biggest = 0;
    let (ri, rr) = run(&mut i, &mut r, |_, body| biggest = biggest.max(body.len()));
    assert_eq!(ri.unwrap().remote_intro.len(), MAX_INTRO);
    assert_eq!(rr.unwrap().remote_intro.len(), MAX_INTRO);
    assert!(biggest <= MAX_HANDSHAKE_MESSAGE);
}

#[test]
fn replayed_and_reordered_channel_messages_kill_the_connection() {
    let (i, r) = connect("pw", "pw");
    let (mut i, mut r) = (i.unwrap(), r.unwrap());
    let m0 = i.cipher.seal(b"zero").unwrap();
    let m1 = i.cipher.seal(b"one").unwrap();
    assert_eq!(r.cipher.open(&m0).unwrap(), b"zero");
    assert_eq!(r.cipher.open(&m0), Err(ChannelFailure::Authentication)); // replay
    assert_eq!(r.cipher.open(&m1), Err(ChannelFailure::Broken)); // and the channel stays dead

    let (i2, r2) = connect("pw", "pw");
    let (mut i2, mut r2) = (i2.unwrap(), r2.unwrap());
    let _m0 = i2.cipher.seal(b"zero").unwrap();
    let m1 = i2.cipher.seal(b"one").unwrap();
    assert_eq!(r2.cipher.open(&m1), Err(ChannelFailure::Authentication)); // reorder / loss
                                                                          // A message from another connection (same password) does not open either.
    let (mut i3, _) = connect("pw", "pw");
    let foreign = i3.as_mut().unwrap().cipher.seal(b"x").unwrap();
    let (_, r4) = connect("pw", "pw");
    assert_eq!(
        r4.unwrap().cipher.open(&foreign),
        Err(ChannelFailure::Authentication)
    );
}

/// A handshake waiting for the peer's PAKE message (`stage` 0) or its Noise message (`stage` 1).
fn waiting_for(initiator: bool, stage: usize) -> Handshake {
    let mut me = Handshake::new(&key("pw"), initiator, b"me", HEADERS).unwrap();
    let mut peer = Handshake::new(&key("pw"), !initiator, b"peer", HEADERS).unwrap();
    let mine = me.write_message().unwrap().unwrap();
    let theirs = peer.write_message().unwrap().unwrap();
    if stage == 0 {
        return me;
    }
    me.read_message(&theirs).unwrap();
    peer.read_message(&mine).unwrap();
    while me.write_message().unwrap().is_some() {}
    me
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn garbage_never_panics_at_any_stage(
        initiator in any::<bool>(),
        stage in 0usize..2,
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        // Waiting for the peer's PAKE (stage 0) or its Noise message (stage 1).
        let mut hs = waiting_for(initiator, stage);
        prop_assert!(hs.read_message(&body).is_err());
        prop_assert!(hs.read_message(&body).is_err());
        prop_assert!(!hs.is_complete());
    }

    #[test]
    fn well_typed_garbage_never_panics(
        initiator in any::<bool>(),
        stage in 0usize..2,
        kind in 1u8..4,
        body in prop::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut hs = waiting_for(initiator, stage);
        let mut msg = vec![kind];
        msg.extend_from_slice(&body);
        prop_assert!(hs.read_message(&msg).is_err());
    }

    #[test]
    fn truncated_messages_are_rejected(cut in 0usize..64, which in 0usize..2) {
        let mut i = Handshake::new(&key("pw"), true, b"A", HEADERS).unwrap();
        let mut r = Handshake::new(&key("pw"), false, b"B", HEADERS).unwrap();
        let (ri, rr) = run(&mut i, &mut r, |step, body| {
            if step == 2 + which {
                body.truncate(cut % body.len());
            }
        });
        prop_assert!(ri.is_err() || rr.is_err());
    }

    #[test]
    fn channel_open_never_panics(sealed in prop::collection::vec(any::<u8>(), 0..300)) {
        // Fresh keys per case (a failed open breaks a cipher); no handshake needed for that.
        let (mut cipher, _) = derive_session_keys(&[1; 32], &[2; 32], &[3; 32], false);
        prop_assert!(cipher.open(&sealed).is_err());
    }
}
