//! Reading tracepoint records.
//!
//! Field offsets differ between kernels, and Rust eBPF gets no CO-RE. When
//! the running kernel's layout is the compiled-in default (the agent checks
//! tracefs and sets a `direct` bit), the fields are loaded straight from the
//! context at constant offsets, as the verifier requires for context access
//! (far cheaper than a helper call per field). Otherwise the record is
//! copied to the stack with one `bpf_probe_read_kernel` and read at the
//! offsets the agent supplied; those variants stay out of line, off the
//! common path.
//!
//! The copy goes to this CPU's slot of `RECORD_COPY`, not to the stack:
//! 6.1's verifier limits the stack of a program and its calls together to
//! 512 bytes and rejected every copied variant with the copy on the stack
//! ("combined stack size of 3 calls is 544"), while 6.18 accepted them.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_probe_read_kernel;
use observer_common::{
    TcpSendResetAddrs, TracepointLayout, WatchKey,
    conn::Transition,
    layout::{ABSENT, DIRECT_RECV_RESET, DIRECT_SEND_RESET, DIRECT_SET_STATE, RECORD_MAX},
    watch::AddrWords,
};

use crate::maps::{RECORD_COPY, layout};

const MAX: usize = RECORD_MAX as usize;
/// `RECORD_COPY` slots.
const COPY_SET_STATE: u32 = 0;
const COPY_SEND_RESET: u32 = 1;
const COPY_RECV_RESET: u32 = 2;
pub const COPY_SLOTS: u32 = 3;
const D: TracepointLayout = TracepointLayout::DEFAULT;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// `sock/inet_sock_set_state`. Read from the context, addresses and ports
/// are zero unless the transition matters: an `Option` would leave them
/// undefined on the other path, and LLVM then copies registers the
/// verifier knows were never written ("!read_ok").
pub struct SetState {
    /// What the caller's `classify` made of the protocol and states.
    pub transition: Transition,
    pub old: i32,
    pub new: i32,
    pub local: AddrWords,
    pub remote: AddrWords,
    pub local_port: u16,
    pub remote_port: u16,
}

/// `tcp/tcp_send_reset`: the RST's sender and receiver.
pub struct SendReset {
    pub state: i32,
    /// `u32::MAX` when the kernel does not report a reason.
    pub reason: u32,
    pub sender: AddrWords,
    pub sender_port: u16,
    pub receiver: AddrWords,
    pub receiver_port: u16,
}

/// `tcp/tcp_receive_reset`.
pub struct ReceiveReset {
    pub local: AddrWords,
    pub remote: AddrWords,
    pub local_port: u16,
    pub remote_port: u16,
}

/// One context load at a constant offset, written as the instruction
/// itself (also used for loads from a record's copy). Left to LLVM, neighbouring loads share one base register
/// (`ctx + 40`, then `+0`, `+8`), and the verifier rejects loads through a
/// modified context pointer; a non-inlined function per load avoided that at
/// the price of a call and a return each, which the kernel's return-stack
/// mitigations (SRSO "safe RET" on this machine's CPUs) make expensive.
macro_rules! ctx_load {
    ($ctx:expr, u64, $offset:expr) => {
        ctx_load!(@ $ctx, u64, "u64", $offset)
    };
    ($ctx:expr, u32, $offset:expr) => {
        ctx_load!(@ $ctx, u32, "u32", $offset)
    };
    ($ctx:expr, u16, $offset:expr) => {
        ctx_load!(@ $ctx, u16, "u16", $offset)
    };
    (@ $ctx:expr, $t:ty, $width:literal, $offset:expr) => {{
        let value: u64;
        unsafe {
            core::arch::asm!(
                concat!("{value} = *(", $width, " *)({ctx} + {offset})"),
                value = out(reg) value,
                ctx = in(reg) $ctx,
                offset = const $offset,
                options(readonly, nostack, preserves_flags),
            );
        }
        value as $t
    }};
}

pub(crate) use ctx_load;

/// An address at an 8-aligned constant offset.
macro_rules! ctx_addr {
    ($ctx:expr, $offset:expr) => {
        [
            ctx_load!($ctx, u64, $offset),
            ctx_load!($ctx, u64, $offset + 8),
        ]
    };
}

/// 16 bytes at a constant offset 6 past a multiple of 8, as two words: each
/// load must be aligned to its size, so the bytes come as 2 + 8 + 4 + 2
/// (little-endian: earlier bytes are the low ones).
macro_rules! words_6_past_8 {
    ($ctx:expr, $offset:expr) => {{
        const _: () = assert!($offset % 8 == 6);
        let head = ctx_load!($ctx, u16, $offset) as u64;
        let middle = ctx_load!($ctx, u64, $offset + 2);
        let next = ctx_load!($ctx, u32, $offset + 10) as u64;
        let tail = ctx_load!($ctx, u16, $offset + 14) as u64;
        [head | middle << 16, middle >> 48 | next << 16 | tail << 48]
    }};
}

/// A `sockaddr_in`/`sockaddr_in6` at a constant offset of the context.
macro_rules! sockaddr_direct {
    ($ctx:expr, $offset:expr) => {{
        let family = ctx_load!($ctx, u16, $offset);
        let port = u16::from_be(ctx_load!($ctx, u16, $offset + 2));
        match family {
            AF_INET => Ok((WatchKey::v4_words(ctx_load!($ctx, u32, $offset + 4)), port)),
            // sin6_addr is only 4-byte aligned in the record (little-endian:
            // the earlier half is the low one).
            AF_INET6 => Ok((
                [
                    ctx_load!($ctx, u32, $offset + 8) as u64
                        | (ctx_load!($ctx, u32, $offset + 12) as u64) << 32,
                    ctx_load!($ctx, u32, $offset + 16) as u64
                        | (ctx_load!($ctx, u32, $offset + 20) as u64) << 32,
                ],
                port,
            )),
            _ => Err(-1),
        }
    }};
}

/// A copied record.
#[repr(C, align(8))]
pub struct RecordCopy {
    bytes: [u8; MAX],
}

impl RecordCopy {
    /// Copies `size` bytes of the record into this CPU's slot `slot` (one
    /// per tracepoint). Tracepoint programs do not nest on one CPU (the
    /// kernel skips one that would run inside another), so a slot holds one
    /// record at a time.
    #[inline(always)]
    fn load(slot: u32, ctx: *mut c_void, size: u16) -> Result<&'static RecordCopy, i64> {
        let copy = RECORD_COPY.get_ptr_mut(slot).ok_or(-1i64)?;
        let size = (size as u32).min(RECORD_MAX as u32);
        unsafe {
            let ret = bpf_probe_read_kernel((*copy).bytes.as_mut_ptr().cast(), size, ctx);
            if ret != 0 {
                return Err(ret);
            }
            Ok(&*copy)
        }
    }

    #[inline(always)]
    fn get<T: Field>(&self, offset: u16) -> Result<T, i64> {
        let offset = offset as usize;
        if offset + T::SIZE > MAX {
            return Err(-1);
        }
        Ok(unsafe { T::read(self.bytes.as_ptr().add(offset)) })
    }

    /// An address and port stored as `sockaddr_in`/`sockaddr_in6`.
    #[inline(always)]
    fn sockaddr(&self, offset: u16) -> Result<(AddrWords, u16), i64> {
        let family: u16 = self.get(offset)?;
        let port = u16::from_be(self.get(offset + 2)?);
        match family {
            AF_INET => Ok((WatchKey::v4_words(self.get(offset + 4)?), port)),
            AF_INET6 => Ok((self.get(offset + 8)?, port)),
            _ => Err(-1),
        }
    }
}

/// A field of a copied record, read where the agent's offset says in one
/// load per word. `read_unaligned` made LLVM (which assumes BPF needs
/// aligned loads) load byte by byte and spill the bytes, which took the
/// copied variants past 6.1's stack limit; the verifier allows unaligned
/// loads from map values on the CPUs that do them (x86-64, arm64).
trait Field: Sized {
    const SIZE: usize;
    /// # Safety
    /// `p` points to `SIZE` readable bytes.
    unsafe fn read(p: *const u8) -> Self;
}

impl Field for u16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn read(p: *const u8) -> Self {
        ctx_load!(p, u16, 0)
    }
}

impl Field for u32 {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn read(p: *const u8) -> Self {
        ctx_load!(p, u32, 0)
    }
}

impl Field for i32 {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn read(p: *const u8) -> Self {
        ctx_load!(p, u32, 0) as i32
    }
}

impl Field for AddrWords {
    const SIZE: usize = 16;
    #[inline(always)]
    unsafe fn read(p: *const u8) -> Self {
        [ctx_load!(p, u64, 0), ctx_load!(p, u64, 8)]
    }
}

/// The record; addresses are read from the context only if
/// `classify(protocol, old, new)` matters: most transitions do not.
#[inline(always)]
pub fn set_state(
    ctx: *mut c_void,
    classify: impl Fn(u16, i32, i32) -> Transition,
) -> Result<SetState, i64> {
    if layout!(direct) & DIRECT_SET_STATE != 0 {
        Ok(set_state_direct(ctx, classify))
    } else {
        let (protocol, mut rec) = set_state_copied(ctx)?;
        rec.transition = classify(protocol, rec.old, rec.new);
        Ok(rec)
    }
}

#[inline(always)]
fn set_state_direct(ctx: *mut c_void, classify: impl Fn(u16, i32, i32) -> Transition) -> SetState {
    let protocol = ctx_load!(ctx, u16, D.set_state_protocol as usize);
    let old = ctx_load!(ctx, u32, D.set_state_oldstate as usize) as i32;
    let new = ctx_load!(ctx, u32, D.set_state_newstate as usize) as i32;
    let transition = classify(protocol, old, new);
    if !transition.matters() {
        return SetState::ignored(transition, old, new);
    }
    SetState {
        transition,
        old,
        new,
        local: ctx_addr!(ctx, D.set_state_saddr_v6 as usize),
        remote: ctx_addr!(ctx, D.set_state_daddr_v6 as usize),
        local_port: ctx_load!(ctx, u16, D.set_state_sport as usize),
        remote_port: ctx_load!(ctx, u16, D.set_state_dport as usize),
    }
}

/// Reads the whole record: addresses cost nothing more once it is copied.
#[inline(never)]
fn set_state_copied(ctx: *mut c_void) -> Result<(u16, SetState), i64> {
    let r = RecordCopy::load(COPY_SET_STATE, ctx, layout!(set_state_size))?;
    Ok((
        r.get(layout!(set_state_protocol))?,
        SetState {
            transition: Transition::IGNORED,
            old: r.get(layout!(set_state_oldstate))?,
            new: r.get(layout!(set_state_newstate))?,
            local: r.get(layout!(set_state_saddr_v6))?,
            remote: r.get(layout!(set_state_daddr_v6))?,
            local_port: r.get(layout!(set_state_sport))?,
            remote_port: r.get(layout!(set_state_dport))?,
        },
    ))
}

impl SetState {
    #[inline(always)]
    fn ignored(transition: Transition, old: i32, new: i32) -> SetState {
        SetState {
            transition,
            old,
            new,
            local: [0; 2],
            remote: [0; 2],
            local_port: 0,
            remote_port: 0,
        }
    }
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
#[inline(always)]
fn send_reset_direct(ctx: *mut c_void) -> Result<SendReset, i64> {
    let (sender, sender_port) = sockaddr_direct!(ctx, D.send_reset_saddr as usize)?;
    let (receiver, receiver_port) = sockaddr_direct!(ctx, D.send_reset_daddr as usize)?;
    Ok(SendReset {
        state: ctx_load!(ctx, u32, D.send_reset_state as usize) as i32,
        reason: ctx_load!(ctx, u32, D.send_reset_reason as usize),
        sender,
        sender_port,
        receiver,
        receiver_port,
    })
}

#[inline(never)]
fn send_reset_copied(ctx: *mut c_void) -> Result<SendReset, i64> {
    let r = RecordCopy::load(COPY_SEND_RESET, ctx, layout!(send_reset_size))?;
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
/// rejects misaligned context loads.
#[inline(always)]
fn receive_reset_direct(ctx: *mut c_void) -> ReceiveReset {
    ReceiveReset {
        local: words_6_past_8!(ctx, D.recv_reset_saddr_v6 as usize),
        remote: words_6_past_8!(ctx, D.recv_reset_daddr_v6 as usize),
        local_port: ctx_load!(ctx, u16, D.recv_reset_sport as usize),
        remote_port: ctx_load!(ctx, u16, D.recv_reset_dport as usize),
    }
}

#[inline(never)]
fn receive_reset_copied(ctx: *mut c_void) -> Result<ReceiveReset, i64> {
    let r = RecordCopy::load(COPY_RECV_RESET, ctx, layout!(recv_reset_size))?;
    Ok(ReceiveReset {
        local: r.get(layout!(recv_reset_saddr_v6))?,
        remote: r.get(layout!(recv_reset_daddr_v6))?,
        local_port: r.get(layout!(recv_reset_sport))?,
        remote_port: r.get(layout!(recv_reset_dport))?,
    })
}
