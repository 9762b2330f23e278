//! A small typed netlink layer: raw sockets (libc), message and attribute
//! iteration that returns errors on malformed input instead of panicking,
//! and request building for dumps.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    time::Duration,
};

use thiserror::Error;

pub const NETLINK_NETFILTER: i32 = 12;

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_DUMP: u16 = 0x300;

const NLA_TYPE_MASK: u16 = 0x3fff;

pub const NLMSG_HDRLEN: usize = 16;
/// struct nfgenmsg: family, version, res_id.
pub const NFGENMSG_LEN: usize = 4;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetlinkDecodeError {
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("bad length {len} for {what}")]
    BadLength { what: &'static str, len: usize },
    #[error("attribute {what} missing")]
    Missing { what: &'static str },
    #[error("attribute {what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("kernel reported error {0}")]
    Errno(i32),
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message: header fields and the payload after the header.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub payload: &'a [u8],
}

/// Iterates over the netlink messages in one datagram.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, NetlinkDecodeError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < NLMSG_HDRLEN {
            let have = rest.len();
            rest = &[];
            return Some(Err(NetlinkDecodeError::Truncated {
                what: "nlmsghdr",
                need: NLMSG_HDRLEN,
                have,
            }));
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return Some(Err(NetlinkDecodeError::BadLength {
                what: "nlmsghdr",
                len,
            }));
        }
        let msg = Message {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = &rest[align4(len).min(rest.len())..];
        Some(Ok(msg))
    })
}

/// The errno of an NLMSG_ERROR payload (0 = ACK).
pub fn error_code(payload: &[u8]) -> Result<i32, NetlinkDecodeError> {
    let bytes = payload.get(0..4).ok_or(NetlinkDecodeError::Truncated {
        what: "nlmsgerr",
        need: 4,
        have: payload.len(),
    })?;
    Ok(-i32::from_ne_bytes(bytes.try_into().unwrap_or_default()))
}

#[derive(Debug, Clone, Copy)]
pub struct Attr<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The value as exactly `N` bytes.
    fn array<const N: usize>(&self, what: &'static str) -> Result<[u8; N], NetlinkDecodeError> {
        self.value
            .try_into()
            .map_err(|_| NetlinkDecodeError::BadLength {
                what,
                len: self.value.len(),
            })
    }

    pub fn be_u16(&self, what: &'static str) -> Result<u16, NetlinkDecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    pub fn be_u32(&self, what: &'static str) -> Result<u32, NetlinkDecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    pub fn be_u64(&self, what: &'static str) -> Result<u64, NetlinkDecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// A NUL-terminated (or unterminated) string.
    pub fn str(&self, what: &'static str) -> Result<&'a str, NetlinkDecodeError> {
        let end = self
            .value
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.value.len());
        std::str::from_utf8(&self.value[..end]).map_err(|_| NetlinkDecodeError::NotUtf8 { what })
    }

    pub fn nested(&self) -> impl Iterator<Item = Result<Attr<'a>, NetlinkDecodeError>> + use<'a> {
        attrs(self.value)
    }
}

/// Iterates over the attributes in `buf`.
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = Result<Attr<'_>, NetlinkDecodeError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < 4 {
            let have = rest.len();
            rest = &[];
            return Some(Err(NetlinkDecodeError::Truncated {
                what: "nlattr",
                need: 4,
                have,
            }));
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        if len < 4 || len > rest.len() {
            rest = &[];
            return Some(Err(NetlinkDecodeError::BadLength {
                what: "nlattr",
                len,
            }));
        }
        let attr = Attr {
            kind: u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK,
            value: &rest[4..len],
        };
        rest = &rest[align4(len).min(rest.len())..];
        Some(Ok(attr))
    })
}

/// Builds one request message.
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    pub fn new(kind: u16, flags: u16, seq: u32) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        Request { buf }
    }

    /// Appends a struct nfgenmsg.
    pub fn nfgenmsg(mut self, family: u8) -> Self {
        self.buf.extend_from_slice(&[family, 0, 0, 0]);
        self
    }

    pub fn attr(mut self, kind: u16, value: &[u8]) -> Self {
        push_attr(&mut self.buf, kind, value);
        self
    }

    pub fn attr_str(self, kind: u16, value: &str) -> Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes)
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// Appends one attribute, padded to 4 bytes.
fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

/// One attribute on its own, for tests that build what the kernel sends.
#[cfg(test)]
pub fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    push_attr(&mut buf, kind, value);
    buf
}

/// A netlink socket bound in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Socket {
    pub fn open(protocol: i32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        })?;
        // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
        let sock = Socket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        // SAFETY: zeroed sockaddr_nl is a valid "kernel assigns the port id" address.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        cvt(unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        })?;
        Ok(sock)
    }

    fn setsockopt<T>(&self, level: i32, name: i32, value: &T) -> io::Result<()> {
        // SAFETY: value points to a live T of the size passed.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as u32,
            )
        })
        .map(drop)
    }

    pub fn join_group(&self, group: u32) -> io::Result<()> {
        self.setsockopt(libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, &group)
    }

    /// Grows the receive buffer so bursts (a kube-proxy sync of thousands of
    /// rules) do not overflow it; root may exceed rmem_max.
    pub fn set_recv_buffer(&self, bytes: i32) -> io::Result<()> {
        self.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes)
            .or_else(|_| self.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes))
    }

    /// The receive buffer's size as the kernel accounts it (twice what
    /// was set: the kernel's share for its bookkeeping included).
    pub fn recv_buffer(&self) -> io::Result<i32> {
        let mut value: i32 = 0;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: value and len are live and len is value's size.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw mut value).cast(),
                &raw mut len,
            )
        })?;
        Ok(value)
    }

    /// Doubles the receive buffer, up to `max` bytes (as set, not as
    /// accounted); the new size, or `None` when it is at `max` already.
    pub fn grow_recv_buffer(&self, max: i32) -> io::Result<Option<i32>> {
        let set = self.recv_buffer()? / 2;
        let next = set.saturating_mul(2).min(max);
        if next <= set {
            return Ok(None);
        }
        self.set_recv_buffer(next)?;
        Ok(Some(next))
    }

    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        self.setsockopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
    }

    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl addresses the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and addr are valid for the lengths passed.
        cvt(unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) as libc::c_int
        })
        .map(drop)
    }

    /// Receives one datagram into `buf`, returning its length.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_with(buf, 0)
    }

    /// [`Socket::recv`] without waiting: EAGAIN when nothing is queued.
    pub fn recv_nowait(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_with(buf, libc::MSG_DONTWAIT)
    }

    fn recv_with(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trips_through_the_parsers() {
        let msg = Request::new(0x0a01, NLM_F_REQUEST | NLM_F_DUMP, 7)
            .nfgenmsg(2)
            .attr_str(1, "kube-proxy")
            .finish();
        let parsed: Vec<_> = messages(&msg).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].kind, 0x0a01);
        let attrs: Vec<_> = attrs(&parsed[0].payload[NFGENMSG_LEN..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(attrs[0].kind, 1);
        assert_eq!(attrs[0].str("name").unwrap(), "kube-proxy");
    }

    #[test]
    fn the_receive_buffer_doubles_up_to_its_limit() {
        let sock = Socket::open(libc::NETLINK_NETFILTER).unwrap();
        sock.set_recv_buffer(64 << 10).unwrap();
        assert_eq!(sock.recv_buffer().unwrap(), 128 << 10, "accounted twice");
        assert_eq!(sock.grow_recv_buffer(200 << 10).unwrap(), Some(128 << 10));
        assert_eq!(sock.grow_recv_buffer(200 << 10).unwrap(), Some(200 << 10));
        assert_eq!(sock.grow_recv_buffer(200 << 10).unwrap(), None);
        assert_eq!(sock.recv_buffer().unwrap(), 400 << 10);
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(matches!(
            messages(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).next(),
            Some(Err(NetlinkDecodeError::BadLength { .. }))
        ));
        assert!(matches!(
            attrs(&[200, 0, 1, 0]).next(),
            Some(Err(NetlinkDecodeError::BadLength { .. }))
        ));
        assert!(matches!(
            attrs(&[8, 0]).next(),
            Some(Err(NetlinkDecodeError::Truncated { .. }))
        ));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for msg in messages(&bytes).flatten() {
                for attr in attrs(msg.payload).flatten() {
                    let _ = attr.nested().count();
                }
            }
            for attr in attrs(&bytes).flatten() {
                let _ = attr.str("x");
                let _ = attr.be_u32("x");
                let _ = attr.be_u64("x");
            }
        }
    }
}
