//! "Too big" answers written back into the TAP, the way a router on the path would answer:
//! ICMPv4 destination unreachable / fragmentation needed (type 3 code 4) for IPv4 packets with DF,
//! ICMPv6 Packet Too Big for IPv6. The answer appears to come from the packet's destination, so
//! the sender's stack lowers its path MTU for exactly that destination.

use super::offload::{add_sums, ones_sum, pseudo_sum};

const ETH_LEN: usize = 14;

/// What to do with a frame that does not fit the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooBig {
    /// Answer with this ICMP frame (built by `answer`).
    Answer,
    /// IPv4 without DF: may be fragmented by us.
    Fragmentable,
    /// Not IP, or an ICMP error itself: drop silently.
    Drop,
}

/// Classify an oversize frame.
pub fn classify(frame: &[u8]) -> TooBig {
    if frame.len() < ETH_LEN + 20 {
        return TooBig::Drop;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let ip = &frame[ETH_LEN..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            // Never answer an ICMP error (type 3, 11, 12...) with another one.
            if ip[9] == 1 && ip.get(ihl).is_some_and(|&t| t != 0 && t != 8) {
                return TooBig::Drop;
            }
            if ip[6] & 0x40 != 0 {
                TooBig::Answer
            } else {
                TooBig::Fragmentable
            }
        }
        0x86dd if frame.len() >= ETH_LEN + 40 => {
            let ip = &frame[ETH_LEN..];
            if ip[6] == 58 && ip.get(40).is_some_and(|&t| t < 128) {
                return TooBig::Drop;
            }
            TooBig::Answer
        }
        _ => TooBig::Drop,
    }
}

/// Build the ICMP answer to `frame` advertising `mtu` (L3), into `out`. Returns false when the
/// frame is not something to answer.
pub fn answer(frame: &[u8], mtu: u16, out: &mut Vec<u8>) -> bool {
    if classify(frame) != TooBig::Answer {
        return false;
    }
    out.clear();
    // Ethernet: back to the sender, from the MAC it sent to.
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..14]);
    let orig = &frame[ETH_LEN..];
    if frame[12] == 0x08 {
        // IPv4: our header + ICMP (8) + the original header and as much as keeps us at 576.
        let quoted = &orig[..orig.len().min(576 - 20 - 8)];
        let total = 20 + 8 + quoted.len();
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[1] = 0xc0;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 1;
        ip[12..16].copy_from_slice(&orig[16..20]);
        ip[16..20].copy_from_slice(&orig[12..16]);
        let c = !ones_sum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&ip);
        let icmp_start = out.len();
        out.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
        out.extend_from_slice(&mtu.to_be_bytes());
        out.extend_from_slice(quoted);
        let c = !ones_sum(&out[icmp_start..]);
        out[icmp_start + 2..icmp_start + 4].copy_from_slice(&c.to_be_bytes());
    } else {
        // IPv6: as much of the original as keeps the answer within the minimum MTU (1280).
        let quoted = &orig[..orig.len().min(1280 - 40 - 8)];
        let plen = 8 + quoted.len();
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
        ip[6] = 58;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&orig[24..40]);
        ip[24..40].copy_from_slice(&orig[8..24]);
        out.extend_from_slice(&ip);
        let icmp_start = out.len();
        out.extend_from_slice(&[2, 0, 0, 0]);
        out.extend_from_slice(&u32::from(mtu).to_be_bytes());
        out.extend_from_slice(quoted);
        let sum = add_sums(
            pseudo_sum(&ip[8..40], 58, plen),
            ones_sum(&out[icmp_start..]),
        );
        out[icmp_start + 2..icmp_start + 4].copy_from_slice(&(!sum).to_be_bytes());
    }
    true
}

/// Split an IPv4 packet without DF into fragments whose IP length is at most `mtu`, each a full
/// Ethernet frame pushed to `out` with its range in `segs` (RFC 791; the receiver's stack
/// reassembles). Returns false if the frame cannot be fragmented.
pub fn fragment_ipv4(
    frame: &[u8],
    mtu: usize,
    out: &mut Vec<u8>,
    segs: &mut Vec<std::ops::Range<usize>>,
) -> bool {
    if frame.len() < ETH_LEN + 20 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total < ihl || total > ip.len() || ip[6] & 0x40 != 0 || mtu < ihl + 8 {
        return false;
    }
    let flags_off = u16::from_be_bytes([ip[6], ip[7]]);
    let base_off = usize::from(flags_off & 0x1fff) * 8;
    let more_after = flags_off & 0x2000 != 0;
    let payload = &ip[ihl..total];
    let step = (mtu - ihl) / 8 * 8;
    let mut off = 0;
    while off < payload.len() {
        let end = (off + step).min(payload.len());
        let last = end == payload.len();
        let start = out.len();
        out.extend_from_slice(&frame[..ETH_LEN]);
        out.extend_from_slice(&ip[..ihl]);
        out.extend_from_slice(&payload[off..end]);
        let h = &mut out[start + ETH_LEN..];
        h[2..4].copy_from_slice(&((ihl + end - off) as u16).to_be_bytes());
        let mf = if last && !more_after { 0 } else { 0x2000 };
        let fo = (((base_off + off) / 8) as u16) | mf;
        h[6..8].copy_from_slice(&fo.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = !ones_sum(&h[..ihl]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        segs.push(start..out.len());
        off = end;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::offload::tests::tcp4_frame;

    #[test]
    fn frag_needed_for_ipv4_df() {
        let frame = tcp4_frame(1, 0x10, &[0u8; 1460], false);
        let mut out = Vec::new();
        assert!(answer(&frame, 1400, &mut out));
        assert_eq!(&out[..6], &frame[6..12]);
        let ip = &out[14..34];
        assert_eq!(ones_sum(ip), 0xffff);
        assert_eq!(&ip[12..16], &frame[14 + 16..14 + 20]);
        let icmp = &out[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1400);
        assert_eq!(ones_sum(icmp), 0xffff);
        assert_eq!(&icmp[8..28], &frame[14..34]);
        assert!(out.len() <= 14 + 576);
    }

    #[test]
    fn fragments_ipv4_without_df() {
        let mut frame = tcp4_frame(1, 0x10, &[5u8; 3000], false);
        frame[14 + 6] = 0; // clear DF
        let c = {
            frame[14 + 10] = 0;
            frame[14 + 11] = 0;
            !ones_sum(&frame[14..34])
        };
        frame[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(classify(&frame), TooBig::Fragmentable);
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        assert!(fragment_ipv4(&frame, 1400, &mut out, &mut segs));
        let mut data = Vec::new();
        for (i, r) in segs.iter().enumerate() {
            let f = &out[r.clone()];
            assert!(f.len() - 14 <= 1400);
            assert_eq!(ones_sum(&f[14..34]), 0xffff);
            let fo = u16::from_be_bytes([f[20], f[21]]);
            assert_eq!(usize::from(fo & 0x1fff) * 8, data.len());
            assert_eq!(fo & 0x2000 != 0, i + 1 < segs.len());
            data.extend_from_slice(&f[34..]);
        }
        assert_eq!(data, frame[34..]);
    }
}
