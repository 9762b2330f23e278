//! Reading tracepoint records.
//!
//! Field offsets differ between kernels, and Rust eBPF gets no CO-RE. When
//! the running kernel's layout is the compiled-in default (the agent checks
//! tracefs and sets a `direct` bit), the fields are loaded straight from the
//! context at constant offsets, as the verifier requires for context access
//! (about 100 ns cheaper per invocation on the reference machine than a
//! helper call). Otherwise the record is copied to the stack with one
//! `bpf_probe_read_kernel` and read at the offsets the agent supplied.
//!
//! Each variant is its own non-inlined function: if LLVM could see both, it
//! would merge their loads into one through a selected pointer, which the
//! verifier rejects for the context ("dereference of modified ctx ptr").

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_probe_read_kernel;
use observer_common::{
    TcpSendResetAddrs, TracepointLayout, WatchKey,
    layout::{ABSENT, DIRECT_RECV_RESET, DIRECT_SEND_RESET, DIRECT_SET_STATE, RECORD_MAX},
};

use crate::maps::layout;

const MAX: usize = RECORD_MAX as usize;
const D: TracepointLayout = TracepointLayout::DEFAULT;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// `sock/inet_sock_set_state`.
pub struct SetState {
    pub old: i32,
    pub new: i32,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// `tcp/tcp_send_reset`: the RST's sender and receiver.
pub struct SendReset {
    pub state: i32,
    /// `u32::MAX` when the kernel does not report a reason.
    pub reason: u32,
    pub sender: [u8; 16],
    pub sender_port: u16,
    pub receiver: [u8; 16],
    pub receiver_port: u16,
}

/// `tcp/tcp_receive_reset`.
pub struct ReceiveReset {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// One context load at a constant offset. Not inlined: inside a larger
/// function LLVM shares one base register between neighbouring loads
/// (`ctx + 40`, then `+0`, `+8`), and the verifier rejects loads through a
/// modified context pointer.
#[inline(never)]
fn at<T, const OFFSET: usize>(ctx: *mut c_void) -> T {
    unsafe { core::ptr::read_volatile(ctx.cast::<u8>().add(OFFSET).cast::<T>()) }
}

#[inline(always)]
fn addr(words: [u64; 2]) -> [u8; 16] {
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}

/// A record copied to the stack.
#[repr(C, align(8))]
struct Copy {
    bytes: [u8; MAX],
}

impl Copy {
    #[inline(always)]
    fn load(ctx: *mut c_void, size: u16) -> Result<Copy, i64> {
        let mut copy = Copy { bytes: [0u8; MAX] };
        let size = (size as u32).min(RECORD_MAX as u32);
        let ret = unsafe { bpf_probe_read_kernel(copy.bytes.as_mut_ptr().cast(), size, ctx) };
        if ret != 0 {
            return Err(ret);
        }
        Ok(copy)
    }

    #[inline(always)]
    fn get<T>(&self, offset: u16) -> Result<T, i64> {
        let offset = offset as usize;
        if offset + core::mem::size_of::<T>() > MAX {
            return Err(-1);
        }
        Ok(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(offset).cast::<T>()) })
    }

    /// An address and port stored as `sockaddr_in`/`sockaddr_in6`.
    #[inline(always)]
    fn sockaddr(&self, offset: u16) -> Result<([u8; 16], u16), i64> {
        let family: u16 = self.get(offset)?;
        let port = u16::from_be(self.get(offset + 2)?);
        match family {
            AF_INET => Ok((WatchKey::from_v4(self.get(offset + 4)?).addr, port)),
            AF_INET6 => Ok((self.get(offset + 8)?, port)),
            _ => Err(-1),
        }
    }
}

/// The record, if `relevant(protocol, old, new)`: the addresses are read
/// only for transitions that can matter, most are not.
#[inline(always)]
pub fn set_state(
    ctx: *mut c_void,
    relevant: impl Fn(u16, i32, i32) -> bool,
) -> Result<Option<SetState>, i64> {
    if layout!(direct) & DIRECT_SET_STATE != 0 {
        Ok(set_state_direct(ctx, relevant))
    } else {
        set_state_copied(ctx, relevant)
    }
}

#[inline(never)]
fn set_state_direct(
    ctx: *mut c_void,
    relevant: impl Fn(u16, i32, i32) -> bool,
) -> Option<SetState> {
    let protocol = at::<_, { D.set_state_protocol as usize }>(ctx);
    let old = at::<_, { D.set_state_oldstate as usize }>(ctx);
    let new = at::<_, { D.set_state_newstate as usize }>(ctx);
    if !relevant(protocol, old, new) {
        return None;
    }
    Some(SetState {
        old,
        new,
        local: addr(at::<_, { D.set_state_saddr_v6 as usize }>(ctx)),
        remote: addr(at::<_, { D.set_state_daddr_v6 as usize }>(ctx)),
        local_port: at::<_, { D.set_state_sport as usize }>(ctx),
        remote_port: at::<_, { D.set_state_dport as usize }>(ctx),
    })
}

#[inline(never)]
fn set_state_copied(
    ctx: *mut c_void,
    relevant: impl Fn(u16, i32, i32) -> bool,
) -> Result<Option<SetState>, i64> {
    let r = Copy::load(ctx, layout!(set_state_size))?;
    let protocol = r.get(layout!(set_state_protocol))?;
    let old = r.get(layout!(set_state_oldstate))?;
    let new = r.get(layout!(set_state_newstate))?;
    if !relevant(protocol, old, new) {
        return Ok(None);
    }
    Ok(Some(SetState {
        old,
        new,
        local: r.get(layout!(set_state_saddr_v6))?,
        remote: r.get(layout!(set_state_daddr_v6))?,
        local_port: r.get(layout!(set_state_sport))?,
        remote_port: r.get(layout!(set_state_dport))?,
    }))
}

#[inline(always)]
pub fn send_reset(ctx: *mut c_void) -> Result<SendReset, i64> {
    if layout!(direct) & DIRECT_SEND_RESET != 0 {
        send_reset_direct(ctx)
    } else {
        send_reset_copied(ctx)
    }
}

/// The default layout stores both addresses as sockaddr_in/sockaddr_in6.
#[inline(never)]
fn send_reset_direct(ctx: *mut c_void) -> Result<SendReset, i64> {
    const S: usize = D.send_reset_saddr as usize;
    const R: usize = D.send_reset_daddr as usize;
    let (sender, sender_port) = sockaddr_direct::<S, { S + 2 }, { S + 4 }, { S + 8 }>(ctx)?;
    let (receiver, receiver_port) = sockaddr_direct::<R, { R + 2 }, { R + 4 }, { R + 8 }>(ctx)?;
    Ok(SendReset {
        state: at::<_, { D.send_reset_state as usize }>(ctx),
        reason: at::<_, { D.send_reset_reason as usize }>(ctx),
        sender,
        sender_port,
        receiver,
        receiver_port,
    })
}

#[inline(always)]
fn sockaddr_direct<const FAMILY: usize, const PORT: usize, const V4: usize, const V6: usize>(
    ctx: *mut c_void,
) -> Result<([u8; 16], u16), i64> {
    let family: u16 = at::<_, FAMILY>(ctx);
    let port = u16::from_be(at::<u16, PORT>(ctx));
    match family {
        AF_INET => Ok((
            WatchKey::from_v4(at::<u32, V4>(ctx).to_ne_bytes()).addr,
            port,
        )),
        // sin6_addr is only 4-byte aligned in the record.
        AF_INET6 => Ok((
            unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(at::<_, V6>(ctx)) },
            port,
        )),
        _ => Err(-1),
    }
}

#[inline(never)]
fn send_reset_copied(ctx: *mut c_void) -> Result<SendReset, i64> {
    let r = Copy::load(ctx, layout!(send_reset_size))?;
    let ((sender, sender_port), (receiver, receiver_port)) =
        if layout!(send_reset_addrs) == TcpSendResetAddrs::Sockaddr as u8 {
            (
                r.sockaddr(layout!(send_reset_saddr))?,
                r.sockaddr(layout!(send_reset_daddr))?,
            )
        } else {
            (
                (
                    r.get(layout!(send_reset_saddr))?,
                    r.get(layout!(send_reset_sport))?,
                ),
                (
                    r.get(layout!(send_reset_daddr))?,
                    r.get(layout!(send_reset_dport))?,
                ),
            )
        };
    let reason_offset = layout!(send_reset_reason);
    Ok(SendReset {
        state: r.get(layout!(send_reset_state))?,
        reason: if reason_offset == ABSENT {
            u32::MAX
        } else {
            r.get(reason_offset)?
        },
        sender,
        sender_port,
        receiver,
        receiver_port,
    })
}

#[inline(always)]
pub fn receive_reset(ctx: *mut c_void) -> Result<ReceiveReset, i64> {
    if layout!(direct) & DIRECT_RECV_RESET != 0 {
        Ok(receive_reset_direct(ctx))
    } else {
        receive_reset_copied(ctx)
    }
}

/// The addresses are only 2-byte aligned in this record, and the verifier
/// rejects misaligned context loads: read them in 16-bit words.
#[inline(never)]
fn receive_reset_direct(ctx: *mut c_void) -> ReceiveReset {
    let words = |w: [u16; 8]| unsafe { core::mem::transmute::<[u16; 8], [u8; 16]>(w) };
    ReceiveReset {
        local: words(at::<_, { D.recv_reset_saddr_v6 as usize }>(ctx)),
        remote: words(at::<_, { D.recv_reset_daddr_v6 as usize }>(ctx)),
        local_port: at::<_, { D.recv_reset_sport as usize }>(ctx),
        remote_port: at::<_, { D.recv_reset_dport as usize }>(ctx),
    }
}

#[inline(never)]
fn receive_reset_copied(ctx: *mut c_void) -> Result<ReceiveReset, i64> {
    let r = Copy::load(ctx, layout!(recv_reset_size))?;
    Ok(ReceiveReset {
        local: r.get(layout!(recv_reset_saddr_v6))?,
        remote: r.get(layout!(recv_reset_daddr_v6))?,
        local_port: r.get(layout!(recv_reset_sport))?,
        remote_port: r.get(layout!(recv_reset_dport))?,
    })
}
