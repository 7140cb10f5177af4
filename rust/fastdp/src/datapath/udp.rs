//! The underlay UDP socket (port 6783 by default): batched receive with recvmmsg and UDP GRO,
//! batched send with sendmmsg and UDP GSO, large forced buffers, DF always set (no underlay
//! fragmentation; our own probes find the path MTU).
//!
//! Never blocks: the fd is non-blocking and callers poll. Every `unsafe` block states why it is
//! sound; the raw pointers in the batch structs are refreshed right before each syscall.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::sys::{cvt, getsockopt_int, poll_writable, setsockopt_int};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Socket buffer size asked for (forced past rmem_max/wmem_max when we are root).
const SOCKET_BUFFER: libc::c_int = 8 << 20;
/// Largest GRO'd receive (one UDP datagram can be at most this big anyway).
pub const RECV_BUF: usize = 65536;
/// Most segments one GSO send may carry (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes one GSO send may carry.
pub const MAX_GSO_BYTES: usize = 65000;

/// A socket address in the kernel's form, ready for sendmmsg.
#[derive(Clone, Copy)]
pub struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl std::fmt::Debug for SockAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_std())
    }
}

impl SockAddr {
    /// Convert for a socket of the given family (IPv4 addresses become v4-mapped on IPv6 sockets).
    pub fn new(addr: SocketAddr, v6_socket: bool) -> SockAddr {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid (AF_UNSPEC) value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let addr = match (addr, v6_socket) {
            (SocketAddr::V4(a), true) => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            (a, _) => a,
        };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }

    /// The address as std sees it (v4-mapped IPv6 shown as IPv4).
    pub fn to_std(self) -> Option<SocketAddr> {
        match i32::from(self.storage.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin: libc::sockaddr_in = unsafe {
                    std::ptr::read((&self.storage as *const libc::sockaddr_storage).cast())
                };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6: libc::sockaddr_in6 = unsafe {
                    std::ptr::read((&self.storage as *const libc::sockaddr_storage).cast())
                };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let port = u16::from_be(sin6.sin6_port);
                Some(match ip.to_ipv4_mapped() {
                    Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                    None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, sin6.sin6_scope_id)),
                })
            }
            _ => None,
        }
    }
}

/// The underlay socket.
#[derive(Debug)]
pub struct Udp {
    fd: OwnedFd,
    v6: bool,
    gro: bool,
    port: u16,
}

impl Udp {
    /// Bind `bind:port` (port 0 picks one), with forced large buffers, DF and GRO where supported.
    pub fn bind(bind: IpAddr, port: u16) -> io::Result<Udp> {
        let v6 = bind.is_ipv6();
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: socket takes no pointers; a non-negative result is a new fd we own.
        let raw = cvt(unsafe {
            libc::socket(
                family,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: `raw` was just returned by socket and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = fd.as_raw_fd();
        if v6 {
            setsockopt_int(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
        }
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(s, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                setsockopt_int(s, libc::SOL_SOCKET, plain, SOCKET_BUFFER)?;
            }
        }
        // DF on every datagram, without the kernel's PMTU cache refusing our probes.
        setsockopt_int(
            s,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )?;
        if v6 {
            setsockopt_int(
                s,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IP_PMTUDISC_PROBE,
            )?;
        }
        let gro = setsockopt_int(s, SOL_UDP, UDP_GRO, 1).is_ok();
        let addr = SockAddr::new(SocketAddr::new(bind, port), v6);
        // SAFETY: `addr.storage` holds a sockaddr of `addr.len` bytes.
        cvt(unsafe {
            libc::bind(
                s,
                (&addr.storage as *const libc::sockaddr_storage).cast(),
                addr.len,
            )
        })?;
        // SAFETY: sockaddr_storage is plain data.
        let mut bound: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `bound`.
        cvt(unsafe {
            libc::getsockname(
                s,
                (&mut bound as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        })?;
        let port = SockAddr {
            storage: bound,
            len,
        }
        .to_std()
        .map_or(port, |a| a.port());
        Ok(Udp { fd, v6, gro, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_v6(&self) -> bool {
        self.v6
    }

    pub fn gro(&self) -> bool {
        self.gro
    }

    /// The receive buffer the kernel granted (for stats).
    pub fn rcvbuf(&self) -> usize {
        getsockopt_int(self.fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(0) as usize
    }

    /// Receive up to `batch.capacity()` messages without blocking; `Ok(0)` when none waits.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.prepare();
        // SAFETY: `prepare` pointed every mmsghdr at live buffers owned by `batch`, which is
        // borrowed mutably for the call; the kernel writes within the given lengths.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                batch.hdrs.as_mut_ptr(),
                batch.hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let n = n as usize;
        for i in 0..n {
            batch.lens[i] = batch.hdrs[i].msg_len as usize;
            batch.gro_size[i] = batch.parse_gro(i);
            batch.from[i] = SockAddr {
                storage: batch.names[i],
                len: batch.hdrs[i].msg_hdr.msg_namelen,
            };
        }
        Ok(n)
    }

    /// Send every item (GSO items as one super-datagram each), waiting briefly when the socket
    /// buffer is full. `on_error(index, error)` is told about each item that could not be sent.
    pub fn send_batch(
        &self,
        scratch: &mut SendScratch,
        items: &[Outgoing<'_>],
        on_error: &mut dyn FnMut(usize, &io::Error),
    ) {
        let mut next = 0;
        let mut stalls = 0;
        while next < items.len() {
            let chunk = &items[next..items.len().min(next + 64)];
            scratch.prepare(chunk);
            // SAFETY: `prepare` pointed each mmsghdr at the item's data, address and control
            // buffer, all alive (borrowed) for the call; the kernel only reads them.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    scratch.hdrs.as_mut_ptr(),
                    chunk.len() as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                next += r as usize;
                stalls = 0;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) if stalls < 50 => {
                    stalls += 1;
                    poll_writable(self.fd.as_raw_fd(), Duration::from_millis(5));
                }
                Some(libc::EINTR) => {}
                _ => {
                    on_error(next, &e);
                    next += 1;
                }
            }
        }
    }
}

impl AsRawFd for Udp {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One message to send: `data` to `addr`; `segment` > 0 makes it a UDP GSO super-datagram cut
/// into datagrams of that size (the last may be shorter).
pub struct Outgoing<'a> {
    pub addr: &'a SockAddr,
    pub data: &'a [u8],
    pub segment: u16,
}

/// Control-message room for one `UDP_SEGMENT` (u16) or `UDP_GRO` (int), 8-byte aligned.
type Cmsg = [u64; 4];

/// Reusable arrays for sendmmsg.
#[derive(Default)]
pub struct SendScratch {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<Cmsg>,
}

// SAFETY: the raw pointers inside are only dangling scratch between calls; they are rewritten by
// `prepare` before every use, on whichever thread owns the value.
unsafe impl Send for SendScratch {}

impl SendScratch {
    fn prepare(&mut self, items: &[Outgoing<'_>]) {
        self.hdrs.clear();
        self.iovs.clear();
        self.ctrl.clear();
        self.iovs.extend(items.iter().map(|it| libc::iovec {
            iov_base: it.data.as_ptr() as *mut libc::c_void,
            iov_len: it.data.len(),
        }));
        self.ctrl.resize(items.len(), [0; 4]);
        for (i, it) in items.iter().enumerate() {
            // SAFETY: msghdr is plain data; zero is a valid starting value.
            let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
            m.msg_name = (&it.addr.storage as *const libc::sockaddr_storage) as *mut libc::c_void;
            m.msg_namelen = it.addr.len;
            m.msg_iov = &mut self.iovs[i];
            m.msg_iovlen = 1;
            if it.segment > 0 {
                let ctrl = &mut self.ctrl[i];
                m.msg_control = ctrl.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                m.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
                // SAFETY: `m` points at `ctrl`, which has room for CMSG_SPACE(2) bytes, so the
                // first header and its 2 data bytes are in bounds.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&m);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), it.segment);
                }
            }
            self.hdrs.push(libc::mmsghdr {
                msg_hdr: m,
                msg_len: 0,
            });
        }
    }
}

/// Reusable buffers for recvmmsg: `capacity` messages of up to 64 KiB each.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<Cmsg>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Bytes received in message i.
    pub lens: Vec<usize>,
    /// GRO segment size of message i (0: a single datagram).
    pub gro_size: Vec<usize>,
    /// Source address of message i.
    pub from: Vec<SockAddr>,
}

// SAFETY: see SendScratch; pointers are rewritten by `prepare` before every recvmmsg.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(capacity: usize) -> RecvBatch {
        // SAFETY: plain data, zero is valid.
        let zero_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        RecvBatch {
            bufs: (0..capacity).map(|_| vec![0u8; RECV_BUF]).collect(),
            names: vec![zero_name; capacity],
            ctrl: vec![[0; 4]; capacity],
            iovs: Vec::with_capacity(capacity),
            hdrs: Vec::with_capacity(capacity),
            lens: vec![0; capacity],
            gro_size: vec![0; capacity],
            from: vec![
                SockAddr {
                    storage: zero_name,
                    len: 0
                };
                capacity
            ],
        }
    }

    /// Message i's bytes (mutable: decryption happens in place).
    pub fn message(&mut self, i: usize) -> &mut [u8] {
        let n = self.lens[i];
        &mut self.bufs[i][..n]
    }

    fn prepare(&mut self) {
        self.iovs.clear();
        self.hdrs.clear();
        for b in &mut self.bufs {
            self.iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            });
        }
        for i in 0..self.bufs.len() {
            // SAFETY: msghdr is plain data; zero is a valid starting value.
            let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
            m.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            m.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_iov = &mut self.iovs[i];
            m.msg_iovlen = 1;
            m.msg_control = self.ctrl[i].as_mut_ptr().cast();
            m.msg_controllen = std::mem::size_of::<Cmsg>();
            self.hdrs.push(libc::mmsghdr {
                msg_hdr: m,
                msg_len: 0,
            });
        }
    }

    fn parse_gro(&self, i: usize) -> usize {
        let m = &self.hdrs[i].msg_hdr;
        // SAFETY: the kernel filled msg_control/msg_controllen of this header; the CMSG_* macros
        // stay within msg_controllen, and UDP_GRO's payload is one int.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(m);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    return v.max(0) as usize;
                }
                c = libc::CMSG_NXTHDR(m, c);
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trips() {
        for (a, v6) in [
            ("10.1.2.3:6783", false),
            ("10.1.2.3:6783", true),
            ("[fd00::1]:6783", true),
        ] {
            let sa: SocketAddr = a.parse().unwrap();
            assert_eq!(SockAddr::new(sa, v6).to_std(), Some(sa));
        }
    }

    #[test]
    fn loopback_gso_send_and_gro_receive() {
        let a = Udp::bind("127.0.0.1".parse().unwrap(), 0).unwrap();
        let b = Udp::bind("127.0.0.1".parse().unwrap(), 0).unwrap();
        let to = SockAddr::new(
            SocketAddr::new("127.0.0.1".parse().unwrap(), b.port()),
            false,
        );
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let single = [7u8; 100];
        let items = [
            Outgoing {
                addr: &to,
                data: &data,
                segment: 1200,
            },
            Outgoing {
                addr: &to,
                data: &single,
                segment: 0,
            },
        ];
        let mut errors = 0;
        a.send_batch(&mut SendScratch::default(), &items, &mut |_, _| errors += 1);
        assert_eq!(errors, 0);
        std::thread::sleep(Duration::from_millis(50));
        let mut batch = RecvBatch::new(8);
        let mut got = Vec::new();
        for _ in 0..10 {
            let n = b.recv_batch(&mut batch).unwrap();
            for i in 0..n {
                let seg = if batch.gro_size[i] > 0 {
                    batch.gro_size[i]
                } else {
                    batch.lens[i]
                };
                let m = batch.message(i).to_vec();
                got.extend(m.chunks(seg).map(<[u8]>::to_vec));
            }
            if n == 0 {
                break;
            }
        }
        let mut want: Vec<Vec<u8>> = data.chunks(1200).map(<[u8]>::to_vec).collect();
        want.push(single.to_vec());
        assert_eq!(got, want);
    }
}
