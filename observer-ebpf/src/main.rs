#![no_std]
#![no_main]
// Inline assembly for context loads at constant offsets (src/record.rs).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod cilium;
mod conn;
mod delivery;
mod flows;
mod maps;
mod record;
mod ruleset;
mod stamp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_ktime_get_ns and the ring buffer helpers need it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
