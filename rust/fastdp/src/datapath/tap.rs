//! The TAP device: the datapath's port on the `weave` bridge.
//!
//! Opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and offloads (checksum, TSO4/6, TSO-ECN and,
//! where the kernel has it, USO4/6), so the kernel hands over 64 KiB super-frames with partial
//! checksums and accepts coalesced ones. Non-persistent: the device disappears when the datapath
//! closes its fd. Attaching it to the bridge, its MTU and link state are the router's job.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::sys::{cvt, cvt_size};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;

/// An open TAP device (non-blocking fd).
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    offloads: u32,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Create (or attach to) the TAP device `name` in the calling thread's network namespace.
    pub fn open(name: &str) -> io::Result<Tap> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?}"),
            ));
        }
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: `path` is a valid NUL-terminated string; a non-negative result is a new fd.
        let raw = cvt(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `raw` was just returned by open and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its layout and size (40).
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) })?;
        let name = req
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        let base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        let mut offloads = 0;
        for candidate in [
            base | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6,
            base | TUN_F_TSO_ECN,
            base,
            TUN_F_CSUM,
        ] {
            // SAFETY: TUNSETOFFLOAD takes an unsigned long by value.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, candidate as libc::c_ulong) }
                == 0
            {
                offloads = candidate;
                break;
            }
        }
        Ok(Tap { fd, name, offloads })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TUN_F_* offloads the kernel accepted.
    pub fn offloads(&self) -> u32 {
        self.offloads
    }

    /// Read one frame (vnet header first); `WouldBlock` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into the live buffer.
        cvt_size(unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    /// Write one frame as `hdr` (the vnet header, possibly empty when `frame` starts with it)
    /// followed by `frame`.
    pub fn write(&self, hdr: &[u8], frame: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point into live slices for the duration of the call; the kernel only
        // reads from them.
        cvt_size(unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
