//! Offloads done in userspace: checksum completion, TCP/UDP segmentation of the TAP's super-frames
//! before encapsulation (so no underlay datagram exceeds the path MTU), and TCP coalescing of
//! received segments into super-frames before they are written to the TAP (so the kernel handles
//! one skb per 64 KiB instead of one per segment).
//!
//! The design follows wireguard-go's `tun/offload_linux.go`, on Ethernet frames instead of IP
//! packets. Pure functions over byte buffers: no I/O, and never a panic on malformed input (an
//! unusable frame is an `Err`).

#[cfg(test)]
use std::ops::Range;

/// Length of the `virtio_net_hdr` the TAP prepends (IFF_VNET_HDR, default size).
pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Largest frame we build when coalescing (IP length fields are 16 bits).
const MAX_COALESCED_IP_LEN: usize = 65535;

/// The kernel's `struct virtio_net_hdr` (little endian on the hosts we run on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16le(2),
            gso_size: u16le(4),
            csum_start: u16le(6),
            csum_offset: u16le(8),
        })
    }

    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Why a frame could not be offloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Headers missing, inconsistent with the vnet header, or of an unsupported kind.
    Malformed,
}

// ---------------------------------------------------------------------------------------------
// Checksums (RFC 1071). Summed in native (little-endian) 32-bit words and byte-swapped at the
// end, which gives the same one's-complement sum as big-endian 16-bit words.

/// One's-complement sum of `data` folded to 16 bits, in network byte order value space.
pub fn ones_sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_le_bytes(w);
        acc += (v & 0xffff_ffff) + (v >> 32);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        let v = u64::from_le_bytes(w);
        acc += (v & 0xffff_ffff) + (v >> 32);
    }
    fold(acc).swap_bytes()
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// One's-complement addition of folded sums.
pub fn add_sums(a: u16, b: u16) -> u16 {
    fold(u64::from(a) + u64::from(b))
}

/// Sum of the TCP/UDP pseudo-header for IPv4 (`addrs` = source then destination, 8 bytes) or
/// IPv6 (32 bytes).
pub fn pseudo_sum(addrs: &[u8], proto: u8, l4_len: usize) -> u16 {
    let mut tail = [0u8; 8];
    tail[3] = proto;
    tail[4..8].copy_from_slice(&(l4_len as u32).to_be_bytes());
    add_sums(ones_sum(addrs), ones_sum(&tail))
}

fn get_u16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn put_u16(b: &mut [u8], i: usize, v: u16) {
    b[i..i + 2].copy_from_slice(&v.to_be_bytes());
}

/// Where the L3 and L4 headers of an Ethernet frame are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    v6: bool,
    /// Offset of the L4 header.
    l4: usize,
    proto: u8,
}

impl Layout {
    fn addrs<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        if self.v6 {
            &frame[ETH_LEN + 8..ETH_LEN + 40]
        } else {
            &frame[ETH_LEN + 12..ETH_LEN + 20]
        }
    }
}

/// Parse Ethernet + IPv4/IPv6 far enough to find the L4 header. IPv6 extension headers are
/// trusted to end at `csum_start` when one is given.
fn layout(frame: &[u8], csum_start: Option<usize>) -> Result<Layout, OffloadError> {
    if frame.len() < ETH_LEN + 20 {
        return Err(OffloadError::Malformed);
    }
    match get_u16(frame, 12) {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
            if frame[ETH_LEN] >> 4 != 4 || ihl < 20 || frame.len() < ETH_LEN + ihl {
                return Err(OffloadError::Malformed);
            }
            Ok(Layout {
                v6: false,
                l4: ETH_LEN + ihl,
                proto: frame[ETH_LEN + 9],
            })
        }
        ETHERTYPE_IPV6 => {
            if frame.len() < ETH_LEN + 40 || frame[ETH_LEN] >> 4 != 6 {
                return Err(OffloadError::Malformed);
            }
            let next = frame[ETH_LEN + 6];
            match csum_start {
                Some(s) if s >= ETH_LEN + 40 && s <= frame.len() => {
                    let proto = if next == PROTO_TCP || next == PROTO_UDP {
                        next
                    } else {
                        0
                    };
                    Ok(Layout {
                        v6: true,
                        l4: s,
                        proto,
                    })
                }
                _ => Ok(Layout {
                    v6: true,
                    l4: ETH_LEN + 40,
                    proto: next,
                }),
            }
        }
        _ => Err(OffloadError::Malformed),
    }
}

/// Complete a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM) in place: the field at
/// `start + offset` holds the pseudo-header sum; the checksum covers everything from `start`.
pub fn complete_checksum(
    frame: &mut [u8],
    start: usize,
    offset: usize,
) -> Result<(), OffloadError> {
    let field = start.checked_add(offset).ok_or(OffloadError::Malformed)?;
    if field + 2 > frame.len() {
        return Err(OffloadError::Malformed);
    }
    let sum = !ones_sum(&frame[start..]);
    put_u16(frame, field, sum);
    Ok(())
}

/// Outcome of preparing a frame read from the TAP.
pub enum Prepared<'a> {
    /// The frame (checksum completed in place if needed) goes as it is.
    Single(&'a [u8]),
    /// The frame was a super-frame, to be cut into these segments.
    Segmented(Segmenter<'a>),
}

/// Turn one TAP read (`frame` after its vnet header `h`) into wire-ready Ethernet frames.
pub fn prepare<'a>(frame: &'a mut [u8], h: &VnetHdr) -> Result<Prepared<'a>, OffloadError> {
    let csum_start = Some(usize::from(h.csum_start));
    let size = usize::from(h.gso_size);
    match h.gso_type & !GSO_ECN {
        GSO_NONE => {
            if h.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(frame, usize::from(h.csum_start), usize::from(h.csum_offset))?;
            }
            Ok(Prepared::Single(frame))
        }
        GSO_TCPV4 | GSO_TCPV6 => Ok(Prepared::Segmented(Segmenter::tcp(
            frame, size, csum_start,
        )?)),
        GSO_UDP_L4 => Ok(Prepared::Segmented(Segmenter::udp(
            frame, size, csum_start,
        )?)),
        _ => Err(OffloadError::Malformed),
    }
}

/// Fix the IP header of a segment: lengths, IPv4 id and header checksum.
fn fix_ip(seg: &mut [u8], lay: &Layout, index: u16) {
    if lay.v6 {
        let payload = seg.len() - ETH_LEN - 40;
        put_u16(seg, ETH_LEN + 4, payload as u16);
    } else {
        let ip = ETH_LEN;
        put_u16(seg, ip + 2, (seg.len() - ETH_LEN) as u16);
        let id = get_u16(seg, ip + 4).wrapping_add(index);
        put_u16(seg, ip + 4, id);
        put_u16(seg, ip + 10, 0);
        let sum = !ones_sum(&seg[ip..lay.l4]);
        put_u16(seg, ip + 10, sum);
    }
}

/// A TCP or UDP super-frame being cut into segments of at most `size` payload bytes. Each segment
/// is written straight into its destination (the datagram being assembled), with correct IP and
/// L4 headers and checksums.
pub struct Segmenter<'a> {
    frame: &'a [u8],
    lay: Layout,
    hdrs: usize,
    size: usize,
    count: usize,
    /// TCP: first sequence number and flags.
    tcp: Option<(u32, u8)>,
}

impl<'a> Segmenter<'a> {
    pub fn tcp(
        frame: &'a [u8],
        mss: usize,
        csum_start: Option<usize>,
    ) -> Result<Segmenter<'a>, OffloadError> {
        let lay = layout(frame, csum_start)?;
        if lay.proto != PROTO_TCP || mss == 0 || frame.len() < lay.l4 + 20 {
            return Err(OffloadError::Malformed);
        }
        let t = lay.l4;
        let thl = usize::from(frame[t + 12] >> 4) * 4;
        let hdrs = t + thl;
        if thl < 20 || frame.len() < hdrs {
            return Err(OffloadError::Malformed);
        }
        let seq = u32::from_be_bytes([frame[t + 4], frame[t + 5], frame[t + 6], frame[t + 7]]);
        let count = (frame.len() - hdrs).div_ceil(mss).max(1);
        Ok(Segmenter {
            frame,
            lay,
            hdrs,
            size: mss,
            count,
            tcp: Some((seq, frame[t + 13])),
        })
    }

    pub fn udp(
        frame: &'a [u8],
        size: usize,
        csum_start: Option<usize>,
    ) -> Result<Segmenter<'a>, OffloadError> {
        let lay = layout(frame, csum_start)?;
        let hdrs = lay.l4 + 8;
        if lay.proto != PROTO_UDP || size == 0 || frame.len() < hdrs {
            return Err(OffloadError::Malformed);
        }
        let count = (frame.len() - hdrs).div_ceil(size).max(1);
        Ok(Segmenter {
            frame,
            lay,
            hdrs,
            size,
            count,
            tcp: None,
        })
    }

    /// How many segments.
    pub fn count(&self) -> usize {
        self.count
    }

    fn chunk(&self, i: usize) -> &'a [u8] {
        let payload = &self.frame[self.hdrs..];
        &payload[(i * self.size).min(payload.len())..((i + 1) * self.size).min(payload.len())]
    }

    /// Length of segment `i` (a whole Ethernet frame).
    pub fn len(&self, i: usize) -> usize {
        self.hdrs + self.chunk(i).len()
    }

    /// Write segment `i` into `seg`, which must be exactly `len(i)` bytes.
    pub fn write(&self, i: usize, seg: &mut [u8]) {
        let chunk = self.chunk(i);
        seg[..self.hdrs].copy_from_slice(&self.frame[..self.hdrs]);
        seg[self.hdrs..].copy_from_slice(chunk);
        let lay = &self.lay;
        fix_ip(seg, lay, i as u16);
        let t = lay.l4;
        let l4_len = seg.len() - t;
        match self.tcp {
            Some((seq, flags)) => {
                seg[t + 4..t + 8]
                    .copy_from_slice(&seq.wrapping_add((i * self.size) as u32).to_be_bytes());
                let mut f = flags;
                if i + 1 < self.count {
                    f &= !(TCP_FIN | TCP_PSH);
                }
                if i > 0 {
                    f &= !TCP_CWR;
                }
                seg[t + 13] = f;
                put_u16(seg, t + 16, 0);
                let sum = !add_sums(
                    pseudo_sum(lay.addrs(seg), PROTO_TCP, l4_len),
                    ones_sum(&seg[t..]),
                );
                put_u16(seg, t + 16, sum);
            }
            None => {
                put_u16(seg, t + 4, l4_len as u16);
                put_u16(seg, t + 6, 0);
                let mut sum = !add_sums(
                    pseudo_sum(lay.addrs(seg), PROTO_UDP, l4_len),
                    ones_sum(&seg[t..]),
                );
                if sum == 0 {
                    sum = 0xffff;
                }
                put_u16(seg, t + 6, sum);
            }
        }
    }

    /// Append every segment to `out`, recording their ranges.
    #[cfg(test)]
    pub fn write_all(&self, out: &mut Vec<u8>, segs: &mut Vec<Range<usize>>) {
        for i in 0..self.count {
            let start = out.len();
            out.resize(start + self.len(i), 0);
            self.write(i, &mut out[start..]);
            segs.push(start..out.len());
        }
    }
}

/// Split a TCP super-frame into segments of at most `mss` payload bytes, into `out`.
#[cfg(test)]
pub fn segment_tcp(
    frame: &[u8],
    mss: usize,
    csum_start: Option<usize>,
    out: &mut Vec<u8>,
    segs: &mut Vec<Range<usize>>,
) -> Result<(), OffloadError> {
    Segmenter::tcp(frame, mss, csum_start)?.write_all(out, segs);
    Ok(())
}

/// Split a UDP super-frame (UDP GSO, `VIRTIO_NET_HDR_GSO_UDP_L4`) into datagrams of `size` payload.
#[cfg(test)]
pub fn segment_udp(
    frame: &[u8],
    size: usize,
    csum_start: Option<usize>,
    out: &mut Vec<u8>,
    segs: &mut Vec<Range<usize>>,
) -> Result<(), OffloadError> {
    Segmenter::udp(frame, size, csum_start)?.write_all(out, segs);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Receive-side TCP coalescing.

/// What identifies segments that may be merged: addresses, ports and the ack number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    addrs: [u8; 32],
    ports: [u8; 4],
    ack: u32,
    v6: bool,
}

struct Item {
    key: FlowKey,
    /// VNET_HDR_LEN bytes of room, then the frame being built.
    buf: Vec<u8>,
    l4: usize,
    hdrs: usize,
    next_seq: u32,
    gso_size: usize,
    segments: usize,
    closed: bool,
}

/// Merges in-order TCP segments of the same flow into super-frames for a TAP opened with
/// IFF_VNET_HDR and TSO offloads; everything else passes through untouched, in order per flow.
#[derive(Default)]
pub struct Coalescer {
    items: Vec<Item>,
    spare: Vec<Vec<u8>>,
    /// Frames that were merged into an earlier one (for stats).
    pub merged: u64,
}

/// How many flows one batch tracks at once.
const MAX_ITEMS: usize = 16;

struct TcpView {
    lay: Layout,
    key: FlowKey,
    hdrs: usize,
    seq: u32,
    flags: u8,
    payload_len: usize,
}

fn tcp_view(frame: &[u8]) -> Option<TcpView> {
    let lay = layout(frame, None).ok()?;
    if lay.proto != PROTO_TCP || frame.len() < lay.l4 + 20 {
        return None;
    }
    if !lay.v6 {
        let ip = ETH_LEN;
        // No IP options, not a fragment, and the frame is exactly the IP packet (no padding).
        if lay.l4 != ip + 20
            || get_u16(frame, ip + 6) & 0x3fff != 0
            || usize::from(get_u16(frame, ip + 2)) != frame.len() - ip
        {
            return None;
        }
    } else if usize::from(get_u16(frame, ETH_LEN + 4)) != frame.len() - ETH_LEN - 40 {
        return None;
    }
    let t = lay.l4;
    let thl = usize::from(frame[t + 12] >> 4) * 4;
    if thl < 20 || frame.len() < t + thl {
        return None;
    }
    let flags = frame[t + 13];
    let mut addrs = [0u8; 32];
    let a = lay.addrs(frame);
    addrs[..a.len()].copy_from_slice(a);
    let mut ports = [0u8; 4];
    ports.copy_from_slice(&frame[t..t + 4]);
    let ack = u32::from_be_bytes([frame[t + 8], frame[t + 9], frame[t + 10], frame[t + 11]]);
    let seq = u32::from_be_bytes([frame[t + 4], frame[t + 5], frame[t + 6], frame[t + 7]]);
    Some(TcpView {
        lay,
        key: FlowKey {
            addrs,
            ports,
            ack,
            v6: lay.v6,
        },
        hdrs: t + thl,
        seq,
        flags,
        payload_len: frame.len() - t - thl,
    })
}

/// Whether the headers of `frame` match the item's first segment everywhere that must not differ
/// (IP TOS/TTL/flags or traffic class/flow label/hop limit, TCP window and options).
fn headers_match(item: &Item, frame: &[u8], v: &TcpView) -> bool {
    let first = &item.buf[VNET_HDR_LEN..];
    if v.hdrs != item.hdrs {
        return false;
    }
    let ip = ETH_LEN;
    let ip_same = if v.lay.v6 {
        first[ip..ip + 4] == frame[ip..ip + 4] && first[ip + 7] == frame[ip + 7]
    } else {
        first[ip + 1] == frame[ip + 1]
            && first[ip + 6] == frame[ip + 6]
            && first[ip + 8] == frame[ip + 8]
    };
    let t = item.l4;
    ip_same
        && first[..ETH_LEN] == frame[..ETH_LEN]
        && first[t + 14..t + 16] == frame[t + 14..t + 16]
        && first[t + 20..v.hdrs] == frame[t + 20..v.hdrs]
}

impl Coalescer {
    /// Offer one received frame; frames that cannot be merged are handed to `write` at once (or
    /// after flushing their own flow, to keep per-flow order). `write` gets vnet header + frame.
    pub fn push<W: FnMut(&[u8], &[u8])>(&mut self, frame: &[u8], write: &mut W) {
        let Some(v) = tcp_view(frame) else {
            write(&plain_vnet_hdr(), frame);
            return;
        };
        if v.payload_len == 0 || v.flags & !(TCP_ACK | TCP_PSH) != 0 || v.flags & TCP_ACK == 0 {
            // Pure ACKs, SYN/FIN/RST/URG/ECN-marked segments: flush the flow's pending data first
            // (order), then pass through.
            self.flush_key(&v.key, write);
            write(&plain_vnet_hdr(), frame);
            return;
        }
        if let Some(i) = self
            .items
            .iter()
            .position(|it| it.key == v.key && !it.closed)
        {
            let it = &self.items[i];
            let ip_len = it.buf.len() - VNET_HDR_LEN - ETH_LEN + v.payload_len;
            let fits = ip_len <= MAX_COALESCED_IP_LEN;
            if v.seq == it.next_seq
                && v.payload_len <= it.gso_size
                && fits
                && headers_match(it, frame, &v)
            {
                let it = &mut self.items[i];
                it.buf.extend_from_slice(&frame[v.hdrs..]);
                it.next_seq = it.next_seq.wrapping_add(v.payload_len as u32);
                it.segments += 1;
                self.merged += 1;
                if v.flags & TCP_PSH != 0 {
                    let t = VNET_HDR_LEN + it.l4;
                    it.buf[t + 13] |= TCP_PSH;
                    it.closed = true;
                }
                if v.payload_len < it.gso_size {
                    it.closed = true;
                }
                return;
            }
            let old = self.items.remove(i);
            self.emit(old, write);
        }
        if self.items.len() >= MAX_ITEMS {
            let old = self.items.remove(0);
            self.emit(old, write);
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(&[0u8; VNET_HDR_LEN]);
        buf.extend_from_slice(frame);
        self.items.push(Item {
            key: v.key,
            buf,
            l4: v.lay.l4,
            hdrs: v.hdrs,
            next_seq: v.seq.wrapping_add(v.payload_len as u32),
            gso_size: v.payload_len,
            segments: 1,
            closed: v.flags & TCP_PSH != 0,
        });
    }

    fn flush_key<W: FnMut(&[u8], &[u8])>(&mut self, key: &FlowKey, write: &mut W) {
        while let Some(i) = self
            .items
            .iter()
            .position(|it| it.key.addrs == key.addrs && it.key.ports == key.ports)
        {
            let old = self.items.remove(i);
            self.emit(old, write);
        }
    }

    /// Write out everything pending (end of a receive batch).
    pub fn flush<W: FnMut(&[u8], &[u8])>(&mut self, write: &mut W) {
        for it in std::mem::take(&mut self.items) {
            self.emit(it, write);
        }
    }

    fn emit<W: FnMut(&[u8], &[u8])>(&mut self, mut it: Item, write: &mut W) {
        if it.segments == 1 {
            write(&plain_vnet_hdr(), &it.buf[VNET_HDR_LEN..]);
        } else {
            let (hdr, frame) = it.buf.split_at_mut(VNET_HDR_LEN);
            let lay = Layout {
                v6: it.key.v6,
                l4: it.l4,
                proto: PROTO_TCP,
            };
            if lay.v6 {
                let payload = frame.len() - ETH_LEN - 40;
                put_u16(frame, ETH_LEN + 4, payload as u16);
            } else {
                put_u16(frame, ETH_LEN + 2, (frame.len() - ETH_LEN) as u16);
                put_u16(frame, ETH_LEN + 10, 0);
                let sum = !ones_sum(&frame[ETH_LEN..lay.l4]);
                put_u16(frame, ETH_LEN + 10, sum);
            }
            let l4_len = frame.len() - lay.l4;
            // Partial checksum: the pseudo-header sum, not complemented; the kernel finishes it.
            let partial = pseudo_sum(lay.addrs(frame), PROTO_TCP, l4_len);
            put_u16(frame, lay.l4 + 16, partial);
            VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if lay.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: it.hdrs as u16,
                gso_size: it.gso_size as u16,
                csum_start: lay.l4 as u16,
                csum_offset: 16,
            }
            .write(hdr);
            write(&[], &it.buf);
        }
        it.buf.clear();
        if self.spare.len() < MAX_ITEMS {
            self.spare.push(std::mem::take(&mut it.buf));
        }
    }
}

/// The vnet header for a frame whose checksums were verified end to end (AEAD or UDP checksum
/// on the underlay, full checksums computed by the sender).
pub fn plain_vnet_hdr() -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    VnetHdr {
        flags: F_DATA_VALID,
        ..VnetHdr::default()
    }
    .write(&mut h);
    h
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reference checksum: big-endian 16-bit words, straight from RFC 1071.
    fn reference_sum(data: &[u8]) -> u32 {
        let mut s: u32 = 0;
        for pair in data.chunks(2) {
            let w = (u32::from(pair[0]) << 8) | u32::from(*pair.get(1).unwrap_or(&0));
            s += w;
            s = (s & 0xffff) + (s >> 16);
        }
        s
    }

    fn reference_checksum(parts: &[&[u8]]) -> u16 {
        let all: Vec<u8> = parts.concat();
        !(reference_sum(&all) as u16)
    }

    /// A TCP/IPv4 frame with `payload`, optional TCP options (timestamps), correct checksums.
    pub(crate) fn tcp4_frame(seq: u32, flags: u8, payload: &[u8], with_options: bool) -> Vec<u8> {
        let opts: &[u8] = if with_options {
            &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]
        } else {
            &[]
        };
        let thl = 20 + opts.len();
        let mut f = vec![0u8; ETH_LEN];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = 20 + thl + payload.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let c = reference_checksum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&777u32.to_be_bytes());
        tcp[12] = ((thl / 4) as u8) << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&1000u16.to_be_bytes());
        tcp.extend_from_slice(opts);
        let pseudo = [
            &ip[12..20],
            &[0, PROTO_TCP],
            &((thl + payload.len()) as u16).to_be_bytes()[..],
        ]
        .concat();
        let c = reference_checksum(&[&pseudo, &tcp, payload]);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        [f, ip, tcp, payload.to_vec()].concat()
    }

    fn tcp6_frame(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_LEN];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip[6] = PROTO_TCP;
        ip[7] = 64;
        ip[8] = 0xfd;
        ip[23] = 1;
        ip[24] = 0xfd;
        ip[39] = 2;
        let mut tcp = vec![0u8; 20];
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        let pseudo = [
            &ip[8..40],
            &[0, 0, 0, PROTO_TCP][..],
            &((20 + payload.len()) as u32).to_be_bytes()[..],
        ]
        .concat();
        let c = reference_checksum(&[&pseudo, &tcp, payload]);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        [f, ip, tcp, payload.to_vec()].concat()
    }

    fn verify_tcp4(seg: &[u8]) {
        let ip = &seg[ETH_LEN..ETH_LEN + 20];
        assert_eq!(reference_sum(ip), 0xffff, "IPv4 header checksum");
        assert_eq!(usize::from(get_u16(ip, 2)), seg.len() - ETH_LEN);
        let tcp = &seg[ETH_LEN + 20..];
        let pseudo = [
            &ip[12..20],
            &[0, PROTO_TCP],
            &(tcp.len() as u16).to_be_bytes()[..],
        ]
        .concat();
        assert_eq!(
            reference_sum(&[&pseudo[..], tcp].concat()),
            0xffff,
            "TCP checksum"
        );
    }

    #[test]
    fn ones_sum_matches_reference_on_all_lengths() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in 0..data.len() {
            let want = reference_sum(&data[..n]) as u16;
            let got = ones_sum(&data[..n]);
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(
                got == want || (got == 0 && want == 0xffff) || (got == 0xffff && want == 0),
                "n={n}"
            );
        }
    }

    #[test]
    fn tso_super_frame_is_segmented_with_correct_checksums() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for with_options in [false, true] {
            let mss = if with_options { 1436 } else { 1448 };
            let frame = tcp4_frame(
                1_000_000,
                TCP_ACK | TCP_PSH | TCP_CWR,
                &payload,
                with_options,
            );
            let (mut out, mut segs) = (Vec::new(), Vec::new());
            segment_tcp(&frame, mss, Some(ETH_LEN + 20), &mut out, &mut segs).unwrap();
            assert_eq!(segs.len(), payload.len().div_ceil(mss));
            let mut reassembled = Vec::new();
            for (i, r) in segs.iter().enumerate() {
                let seg = &out[r.clone()];
                verify_tcp4(seg);
                let thl = usize::from(seg[ETH_LEN + 20 + 12] >> 4) * 4;
                let data = &seg[ETH_LEN + 20 + thl..];
                assert!(data.len() <= mss);
                assert_eq!(
                    get_u16(seg, ETH_LEN + 4),
                    0x1234u16.wrapping_add(i as u16),
                    "IP id increments"
                );
                let seq = u32::from_be_bytes(seg[ETH_LEN + 24..ETH_LEN + 28].try_into().unwrap());
                assert_eq!(seq, 1_000_000 + (i * mss) as u32);
                let flags = seg[ETH_LEN + 33];
                assert_eq!(
                    flags & TCP_PSH != 0,
                    i + 1 == segs.len(),
                    "PSH only on the last"
                );
                assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
                assert_eq!(seg[..ETH_LEN], frame[..ETH_LEN]);
                reassembled.extend_from_slice(data);
            }
            assert_eq!(reassembled, payload);
        }
    }

    #[test]
    fn tso6_segments_have_correct_checksums() {
        let payload = vec![0xabu8; 5000];
        let frame = tcp6_frame(5, TCP_ACK, &payload);
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        segment_tcp(&frame, 1400, Some(ETH_LEN + 40), &mut out, &mut segs).unwrap();
        assert_eq!(segs.len(), 4);
        for r in &segs {
            let seg = &out[r.clone()];
            let ip = &seg[ETH_LEN..ETH_LEN + 40];
            let tcp = &seg[ETH_LEN + 40..];
            assert_eq!(usize::from(get_u16(ip, 4)), tcp.len());
            let pseudo = [
                &ip[8..40],
                &[0, 0, 0, PROTO_TCP][..],
                &(tcp.len() as u32).to_be_bytes()[..],
            ]
            .concat();
            assert_eq!(reference_sum(&[&pseudo[..], tcp].concat()), 0xffff);
        }
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut frame = tcp4_frame(1, TCP_ACK, b"hello, checksum", false);
        let good = frame.clone();
        // What the kernel hands over with NEEDS_CSUM: the pseudo-header sum in the field.
        let t = ETH_LEN + 20;
        let l4_len = frame.len() - t;
        let partial = pseudo_sum(&frame[ETH_LEN + 12..ETH_LEN + 20], PROTO_TCP, l4_len);
        put_u16(&mut frame, t + 16, partial);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: t as u16,
            csum_offset: 16,
            ..Default::default()
        };
        assert!(matches!(prepare(&mut frame, &h), Ok(Prepared::Single(_))));
        assert_eq!(frame, good);
    }

    #[test]
    fn malformed_super_frames_are_rejected_not_panicked_on() {
        let frame = tcp4_frame(1, TCP_ACK, &[1; 3000], false);
        for cut in 0..60 {
            let (mut out, mut segs) = (Vec::new(), Vec::new());
            let _ = segment_tcp(&frame[..cut], 1000, Some(34), &mut out, &mut segs);
            let _ = segment_udp(&frame[..cut], 1000, Some(34), &mut out, &mut segs);
            let mut f = frame[..cut].to_vec();
            let h = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 60000,
                csum_offset: 16,
                ..Default::default()
            };
            assert!(prepare(&mut f, &h).is_err());
        }
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        assert!(segment_tcp(&frame, 0, None, &mut out, &mut segs).is_err());
    }

    fn collect(c: &mut Coalescer, frames: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        let mut got = Vec::new();
        let mut w = |h: &[u8], f: &[u8]| {
            let all = [h, f].concat();
            got.push((VnetHdr::parse(&all).unwrap(), all[VNET_HDR_LEN..].to_vec()));
        };
        for f in frames {
            c.push(f, &mut w);
        }
        c.flush(&mut w);
        got
    }

    #[test]
    fn in_order_segments_coalesce_into_one_super_frame() {
        let payload: Vec<u8> = (0..6000u32).map(|i| (i % 253) as u8).collect();
        let big = tcp4_frame(42, TCP_ACK | TCP_PSH, &payload, true);
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        segment_tcp(&big, 1436, Some(34), &mut out, &mut segs).unwrap();
        let frames: Vec<Vec<u8>> = segs.iter().map(|r| out[r.clone()].to_vec()).collect();
        let mut c = Coalescer::default();
        let got = collect(&mut c, &frames);
        assert_eq!(got.len(), 1);
        let (h, f) = &got[0];
        assert_eq!(h.gso_type, GSO_TCPV4);
        assert_eq!(h.gso_size, 1436);
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert_eq!(usize::from(h.csum_start), 34);
        assert_eq!(usize::from(h.hdr_len), 34 + 32);
        assert_eq!(&f[34 + 32..], &payload[..]);
        assert_eq!(f[34 + 13], TCP_ACK | TCP_PSH);
        // Finishing the partial checksum the way the kernel would gives a valid segment.
        let mut done = f.clone();
        complete_checksum(&mut done, 34, 16).unwrap();
        verify_tcp4(&done);
    }

    #[test]
    fn gaps_flags_and_other_flows_are_not_merged() {
        let a = tcp4_frame(0, TCP_ACK, &[1; 100], false);
        let gap = tcp4_frame(150, TCP_ACK, &[2; 100], false);
        let fin = tcp4_frame(250, TCP_ACK | TCP_FIN, &[3; 100], false);
        let udp_like = vec![0u8; 60];
        let mut c = Coalescer::default();
        let got = collect(
            &mut c,
            &[a.clone(), gap.clone(), fin.clone(), udp_like.clone()],
        );
        let frames: Vec<Vec<u8>> = got.iter().map(|(_, f)| f.clone()).collect();
        assert_eq!(frames.len(), 4);
        assert!(
            frames.contains(&a)
                && frames.contains(&gap)
                && frames.contains(&fin)
                && frames.contains(&udp_like)
        );
        assert!(got
            .iter()
            .all(|(h, _)| h.gso_type == GSO_NONE && h.flags == F_DATA_VALID));
        // Per flow, order is kept: a before gap before fin.
        let pos = |x: &Vec<u8>| frames.iter().position(|f| f == x).unwrap();
        assert!(pos(&a) < pos(&gap) && pos(&gap) < pos(&fin));
    }
}
