//! A tracepoint record copied to the stack with one helper call.
//!
//! Field offsets come from the agent at load time, so the programs cannot
//! read the context with the constant offsets direct access needs; one
//! `bpf_probe_read_kernel` of the whole record, then plain stack loads, costs
//! a fraction of one helper call per field.

use aya_ebpf::{helpers::generated::bpf_probe_read_kernel, programs::TracePointContext, EbpfContext};
use observer_common::layout::RECORD_MAX;

const MAX: usize = RECORD_MAX as usize;

#[repr(C, align(8))]
pub struct Record {
    bytes: [u8; MAX],
}

impl Record {
    #[inline(always)]
    pub fn load(ctx: &TracePointContext, size: u16) -> Result<Record, i64> {
        let mut record = Record { bytes: [0u8; MAX] };
        let size = (size as u32).min(RECORD_MAX as u32);
        let ret = unsafe { bpf_probe_read_kernel(record.bytes.as_mut_ptr().cast(), size, ctx.as_ptr()) };
        if ret != 0 {
            return Err(ret);
        }
        Ok(record)
    }

    #[inline(always)]
    pub fn get<T: Copy>(&self, offset: u16) -> Result<T, i64> {
        let offset = offset as usize;
        if offset + core::mem::size_of::<T>() > MAX {
            return Err(-1);
        }
        Ok(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(offset).cast::<T>()) })
    }
}
