//! The overlay datagram format: what one UDP datagram between two routers carries.
//!
//! Pure functions over byte slices: no I/O, no allocation on the decode path, and never a panic on
//! any input (decoding is property-tested with arbitrary bytes). Anything malformed is rejected
//! whole, so nothing half-parsed ever reaches the TAP.
//!
//! ```text
//! header (24 bytes, always cleartext; it is the AEAD's associated data when encrypted)
//!   0      version (1)
//!   1      kind: 0 data, 1 heartbeat, 2 heartbeat ack, 3 PMTU probe, 4 PMTU ack
//!   2      flags: 0x01 encrypted, 0x02 routed, 0x04 cipher AES-256-GCM (else ChaCha20-Poly1305)
//!   3      key epoch (wraps; 0 when plain)
//!   4..10  sender peer name (48-bit, big endian): the hop that sent this datagram
//!   10..16 receiver peer name: the hop it is for
//!   16..24 counter (u64 BE): the AEAD nonce when encrypted, a sequence number when plain
//! body (encrypted as a whole when flagged, followed by a 16-byte tag)
//!   data:  [origin peer 6][destination peer 6]   only when routed; destination 0 = broadcast
//!          then one or more [length u16 BE][Ethernet frame, >= 14 bytes]; nothing after the last
//!   heartbeat / heartbeat ack:  [token u64 BE]
//!   PMTU probe / ack:           [probed datagram size u16 BE][probe id u32 BE] (probe: zero padding)
//! ```
//! A data datagram that is not routed travels from its origin (the sender) straight to its
//! destination (the receiver); relayed and broadcast frames carry the origin and final destination,
//! so relays never need MAC knowledge (as in Weave Net's sleeve).

/// Current (and only) format version.
pub const VERSION: u8 = 1;
/// Fixed header length.
pub const HEADER_LEN: usize = 24;
/// The optional origin/destination block of routed data datagrams.
pub const ROUTE_LEN: usize = 12;
/// Length prefix of each Ethernet frame.
pub const FRAME_PREFIX_LEN: usize = 2;
/// AEAD tag appended to an encrypted body.
pub const TAG_LEN: usize = 16;
/// Shortest Ethernet frame accepted (a bare header).
pub const MIN_FRAME_LEN: usize = 14;
/// Largest Ethernet frame one datagram entry can carry.
#[cfg(test)]
pub const MAX_FRAME_LEN: usize = u16::MAX as usize;
/// Largest peer name (48 bits).
pub const MAX_PEER: u64 = (1 << 48) - 1;
/// Destination meaning "everyone along the origin's broadcast tree".
pub const BROADCAST: u64 = 0;
/// Worst-case bytes one Ethernet frame costs on top of itself inside a datagram (header, route,
/// prefix, tag), excluding the underlay's IP and UDP headers.
pub const MAX_OVERHEAD: usize = HEADER_LEN + ROUTE_LEN + FRAME_PREFIX_LEN + TAG_LEN;

pub const FLAG_ENCRYPTED: u8 = 0x01;
pub const FLAG_ROUTED: u8 = 0x02;
pub const FLAG_AES: u8 = 0x04;
const KNOWN_FLAGS: u8 = FLAG_ENCRYPTED | FLAG_ROUTED | FLAG_AES;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Data = 0,
    Heartbeat = 1,
    HeartbeatAck = 2,
    PmtuProbe = 3,
    PmtuAck = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Data,
            1 => Kind::Heartbeat,
            2 => Kind::HeartbeatAck,
            3 => Kind::PmtuProbe,
            4 => Kind::PmtuAck,
            _ => return None,
        })
    }
}

/// Why a datagram was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    TooShort,
    BadVersion,
    BadKind,
    BadFlags,
    BadPeer,
    /// A frame length prefix runs past the end, or a frame is shorter than an Ethernet header.
    BadFrame,
    /// A data datagram with no frame in it.
    Empty,
    /// A control body of the wrong size or with non-zero padding.
    BadControl,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u8,
    pub epoch: u8,
    pub sender: u64,
    pub receiver: u64,
    pub counter: u64,
}

impl Header {
    pub fn encrypted(&self) -> bool {
        self.flags & FLAG_ENCRYPTED != 0
    }

    pub fn routed(&self) -> bool {
        self.flags & FLAG_ROUTED != 0
    }

    /// Write the header into the first `HEADER_LEN` bytes of `out` (which must be that long).
    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_LEN];
        out[0] = VERSION;
        out[1] = self.kind as u8;
        out[2] = self.flags;
        out[3] = self.epoch;
        out[4..10].copy_from_slice(&self.sender.to_be_bytes()[2..]);
        out[10..16].copy_from_slice(&self.receiver.to_be_bytes()[2..]);
        out[16..24].copy_from_slice(&self.counter.to_be_bytes());
    }

    /// Parse and validate the header of `buf`; the rest of `buf` is the body (and tag).
    pub fn parse(buf: &[u8]) -> Result<Header, FrameError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Err(FrameError::TooShort);
        };
        if h[0] != VERSION {
            return Err(FrameError::BadVersion);
        }
        let kind = Kind::from_u8(h[1]).ok_or(FrameError::BadKind)?;
        let flags = h[2];
        if flags & !KNOWN_FLAGS != 0
            || (flags & FLAG_AES != 0 && flags & FLAG_ENCRYPTED == 0)
            || (flags & FLAG_ROUTED != 0 && kind != Kind::Data)
        {
            return Err(FrameError::BadFlags);
        }
        let sender = read_u48(&h[4..10]);
        let receiver = read_u48(&h[10..16]);
        if sender == 0 || receiver == 0 || sender == receiver {
            return Err(FrameError::BadPeer);
        }
        let counter = u64::from_be_bytes(h[16..24].try_into().map_err(|_| FrameError::TooShort)?);
        Ok(Header {
            kind,
            flags,
            epoch: h[3],
            sender,
            receiver,
            counter,
        })
    }
}

fn read_u48(b: &[u8]) -> u64 {
    b.iter()
        .take(6)
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

fn write_u48(out: &mut [u8], v: u64) {
    out[..6].copy_from_slice(&v.to_be_bytes()[2..]);
}

/// Origin and final destination of a routed data datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub origin: u64,
    /// `BROADCAST` (0) for frames flooded along the origin's broadcast tree.
    pub destination: u64,
}

impl Route {
    pub fn write(&self, out: &mut [u8]) {
        write_u48(&mut out[..6], self.origin);
        write_u48(&mut out[6..12], self.destination);
    }
}

/// A decoded data body: its route (if routed) and its validated frames.
#[derive(Debug, Clone, Copy)]
pub struct DataBody<'a> {
    pub route: Option<Route>,
    frames: &'a [u8],
}

impl<'a> DataBody<'a> {
    /// Validate a (decrypted) data body; every frame is checked before any is returned.
    pub fn parse(body: &'a [u8], routed: bool) -> Result<DataBody<'a>, FrameError> {
        let (route, frames) = if routed {
            let Some(r) = body.get(..ROUTE_LEN) else {
                return Err(FrameError::TooShort);
            };
            let origin = read_u48(&r[..6]);
            let destination = read_u48(&r[6..12]);
            if origin == 0 || origin == destination {
                return Err(FrameError::BadPeer);
            }
            (
                Some(Route {
                    origin,
                    destination,
                }),
                &body[ROUTE_LEN..],
            )
        } else {
            (None, body)
        };
        if frames.is_empty() {
            return Err(FrameError::Empty);
        }
        let mut rest = frames;
        while !rest.is_empty() {
            let Some(prefix) = rest.get(..FRAME_PREFIX_LEN) else {
                return Err(FrameError::BadFrame);
            };
            let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
            if len < MIN_FRAME_LEN || rest.len() < FRAME_PREFIX_LEN + len {
                return Err(FrameError::BadFrame);
            }
            rest = &rest[FRAME_PREFIX_LEN + len..];
        }
        Ok(DataBody { route, frames })
    }

    /// The Ethernet frames, in order.
    pub fn frames(&self) -> Frames<'a> {
        Frames { rest: self.frames }
    }
}

/// Iterator over the frames of a validated data body.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let prefix = self.rest.get(..FRAME_PREFIX_LEN)?;
        let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
        let frame = self.rest.get(FRAME_PREFIX_LEN..FRAME_PREFIX_LEN + len)?;
        self.rest = &self.rest[FRAME_PREFIX_LEN + len..];
        Some(frame)
    }
}

/// Append one frame entry (prefix and bytes) to a body under construction (tests and tools; the
/// send path writes entries in place).
#[cfg(test)]
pub fn push_frame(out: &mut Vec<u8>, frame: &[u8]) -> Result<(), FrameError> {
    if frame.len() < MIN_FRAME_LEN || frame.len() > MAX_FRAME_LEN {
        return Err(FrameError::BadFrame);
    }
    out.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    out.extend_from_slice(frame);
    Ok(())
}

/// PMTU probe/ack body before padding.
pub const PMTU_BODY_LEN: usize = 6;

pub fn parse_heartbeat(body: &[u8]) -> Result<u64, FrameError> {
    let b: [u8; 8] = body.try_into().map_err(|_| FrameError::BadControl)?;
    Ok(u64::from_be_bytes(b))
}

/// A PMTU probe or ack: (probed datagram size, probe id). A probe's body is padded with zeros so
/// the whole datagram is `size` bytes; an ack carries no padding.
pub fn parse_pmtu(body: &[u8], padded: bool) -> Result<(u16, u32), FrameError> {
    let Some(b) = body.get(..PMTU_BODY_LEN) else {
        return Err(FrameError::BadControl);
    };
    let size = u16::from_be_bytes([b[0], b[1]]);
    let id = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
    let pad = &body[PMTU_BODY_LEN..];
    if (!padded && !pad.is_empty()) || pad.iter().any(|&x| x != 0) {
        return Err(FrameError::BadControl);
    }
    Ok((size, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: Kind, flags: u8) -> Header {
        Header {
            kind,
            flags,
            epoch: 7,
            sender: 0x0a0b_0c0d_0e0f,
            receiver: 0x1112_1314_1516,
            counter: 99,
        }
    }

    fn encode(h: &Header, route: Option<Route>, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN];
        h.write(&mut out);
        if let Some(r) = route {
            let mut rb = [0u8; ROUTE_LEN];
            r.write(&mut rb);
            out.extend_from_slice(&rb);
        }
        for f in frames {
            push_frame(&mut out, f).unwrap();
        }
        out
    }

    #[test]
    fn header_round_trip() {
        let h = header(Kind::Data, FLAG_ENCRYPTED | FLAG_AES | FLAG_ROUTED);
        let mut b = [0u8; HEADER_LEN];
        h.write(&mut b);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn rejects_bad_headers() {
        let mut b = [0u8; HEADER_LEN];
        header(Kind::Data, 0).write(&mut b);
        assert_eq!(Header::parse(&b[..23]), Err(FrameError::TooShort));
        let mut v = b;
        v[0] = 2;
        assert_eq!(Header::parse(&v), Err(FrameError::BadVersion));
        let mut v = b;
        v[1] = 9;
        assert_eq!(Header::parse(&v), Err(FrameError::BadKind));
        let mut v = b;
        v[2] = 0x80;
        assert_eq!(Header::parse(&v), Err(FrameError::BadFlags));
        let mut v = b;
        v[2] = FLAG_AES;
        assert_eq!(Header::parse(&v), Err(FrameError::BadFlags));
        let mut v = b;
        v[4..10].fill(0);
        assert_eq!(Header::parse(&v), Err(FrameError::BadPeer));
        let mut v = b;
        let sender = v[4..10].to_vec();
        v[10..16].copy_from_slice(&sender);
        assert_eq!(Header::parse(&v), Err(FrameError::BadPeer));
        let mut hb = [0u8; HEADER_LEN];
        header(Kind::Heartbeat, FLAG_ROUTED).write(&mut hb);
        assert_eq!(Header::parse(&hb), Err(FrameError::BadFlags));
    }

    #[test]
    fn data_body_round_trip_routed_and_direct() {
        let frames = vec![vec![1u8; 14], vec![2u8; 1500], vec![3u8; 60]];
        for route in [
            None,
            Some(Route {
                origin: 5,
                destination: BROADCAST,
            }),
        ] {
            let flags = if route.is_some() { FLAG_ROUTED } else { 0 };
            let h = header(Kind::Data, flags);
            let dg = encode(&h, route, &frames);
            let parsed = Header::parse(&dg).unwrap();
            let body = DataBody::parse(&dg[HEADER_LEN..], parsed.routed()).unwrap();
            assert_eq!(body.route, route);
            assert_eq!(
                body.frames().map(<[u8]>::to_vec).collect::<Vec<_>>(),
                frames
            );
        }
    }

    #[test]
    fn rejects_truncated_or_empty_bodies() {
        let h = header(Kind::Data, 0);
        let dg = encode(&h, None, &[vec![9u8; 100]]);
        let body = &dg[HEADER_LEN..];
        assert!(DataBody::parse(body, false).is_ok());
        assert_eq!(
            DataBody::parse(&body[..body.len() - 1], false).unwrap_err(),
            FrameError::BadFrame
        );
        assert_eq!(DataBody::parse(&[], false).unwrap_err(), FrameError::Empty);
        assert_eq!(
            DataBody::parse(&[0, 13], false).unwrap_err(),
            FrameError::BadFrame
        );
        assert_eq!(
            DataBody::parse(&[0; 11], true).unwrap_err(),
            FrameError::TooShort
        );
        // A trailing partial prefix is malformed, not ignored.
        let mut extra = body.to_vec();
        extra.push(0);
        assert_eq!(
            DataBody::parse(&extra, false).unwrap_err(),
            FrameError::BadFrame
        );
    }

    #[test]
    fn control_bodies() {
        assert_eq!(parse_heartbeat(&42u64.to_be_bytes()), Ok(42));
        assert_eq!(parse_heartbeat(&[0; 7]), Err(FrameError::BadControl));
        let mut probe = vec![0x05, 0xdc, 0, 0, 0, 7];
        assert_eq!(parse_pmtu(&probe, false), Ok((1500, 7)));
        probe.extend_from_slice(&[0; 100]);
        assert_eq!(parse_pmtu(&probe, true), Ok((1500, 7)));
        assert_eq!(parse_pmtu(&probe, false), Err(FrameError::BadControl));
        probe.push(1);
        assert_eq!(parse_pmtu(&probe, true), Err(FrameError::BadControl));
    }

    /// Decode everything that `Header::parse` + `DataBody::parse` accept; never panics.
    fn decode_any(bytes: &[u8]) -> Option<(Header, Vec<Vec<u8>>)> {
        let h = Header::parse(bytes).ok()?;
        let body = &bytes[HEADER_LEN..];
        match h.kind {
            Kind::Data => {
                let b = DataBody::parse(body, h.routed()).ok()?;
                let frames: Vec<Vec<u8>> = b.frames().map(<[u8]>::to_vec).collect();
                // Validated frames are all well-formed.
                assert!(!frames.is_empty());
                assert!(frames.iter().all(|f| f.len() >= MIN_FRAME_LEN));
                Some((h, frames))
            }
            Kind::Heartbeat | Kind::HeartbeatAck => parse_heartbeat(body).ok().map(|_| (h, vec![])),
            Kind::PmtuProbe | Kind::PmtuAck => parse_pmtu(body, h.kind == Kind::PmtuProbe)
                .ok()
                .map(|_| (h, vec![])),
        }
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        (
            1u64..=MAX_PEER,
            1u64..=MAX_PEER,
            any::<u8>(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_filter_map("distinct peers", |(s, r, epoch, counter, routed, aes)| {
                (s != r).then_some(Header {
                    kind: Kind::Data,
                    flags: if routed { FLAG_ROUTED } else { 0 }
                        | if aes { FLAG_ENCRYPTED | FLAG_AES } else { 0 },
                    epoch,
                    sender: s,
                    receiver: r,
                    counter,
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("FRAME_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_any(&bytes);
        }

        #[test]
        fn mutated_valid_datagrams_never_panic(
            h in arb_header(),
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 14..80), 1..4),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in any::<usize>(),
        ) {
            let route = h.routed().then_some(Route { origin: h.sender, destination: BROADCAST });
            let mut dg = encode(&h, route, &frames);
            let (h2, got) = decode_any(&dg).expect("valid datagram decodes");
            prop_assert_eq!(h2, h);
            prop_assert_eq!(got, frames);
            for (i, x) in flips {
                let n = dg.len();
                dg[i % n] ^= x;
            }
            dg.truncate(cut % (dg.len() + 1));
            let _ = decode_any(&dg);
        }
    }
}
