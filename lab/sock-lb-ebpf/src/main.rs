//! The lab's `cilium` node routes new connections as Cilium's socket-LB
//! does (`bpf/bpf_sock.c`, `__sock4_xlate_fwd`): at connect(), the
//! destination is looked up as a frontend's master (slot 0) in
//! `cilium_lb4_services_v2`, a backend slot `(random % count) + 1` is
//! picked, its backend id is resolved in `cilium_lb4_backends_v3`, and the
//! socket's destination is rewritten to the backend. Layouts: observer-common
//! `cilium.rs` (Cilium's main branch after 1.19).
//!
//! The maps are the lab's pinned ones (the loader reuses them by path); the
//! program only reads them. Only sockets of the node's network namespace
//! (its cookie, set by the loader) are touched.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32},
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};

/// `lb4_key`: be32 address, be16 dport, u16 backend_slot, u8 proto,
/// u8 scope, u8 pad[2].
type ServiceKey = [u8; 12];
/// `lb4_service`: u32 backend_id, u16 count, be16 rev_nat_index, u8 flags,
/// u8 flags2, u16 qcount (the inactive tail past `count`).
type ServiceValue = [u8; 12];
/// `lb4_backend`: be32 address, be16 port, u8 proto, u8 flags,
/// u16 cluster_id, u8 zone, u8 pad.
type BackendValue = [u8; 12];

/// Sizes only: the loader replaces both maps with the lab's pinned ones.
#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(65_536, 1);
#[map]
static BACKENDS: HashMap<u32, BackendValue> = HashMap::with_max_entries(65_536, 1);

/// The node's network namespace cookie, set at load.
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;

/// connect() goes on with the (possibly rewritten) destination.
const ALLOW: i32 = 1;
/// connect() fails: a frontend without backends, as Cilium's
/// `-EHOSTUNREACH` (a cgroup program can only refuse).
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sock_lb_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer the kernel passes to this program type.
    unsafe { connect4(ctx) }
}

#[inline(always)]
unsafe fn connect4(ctx: SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: the global is written once at load; volatile keeps the
    // compiler from folding the zero it has here.
    let cookie = unsafe { core::ptr::read_volatile(&NETNS_COOKIE) };
    if unsafe { bpf_get_netns_cookie(addr.cast()) } != cookie {
        return ALLOW;
    }
    let (ip, port, protocol) = unsafe { ((*addr).user_ip4, (*addr).user_port, (*addr).protocol) };
    let mut key: ServiceKey = [0; 12];
    key[..4].copy_from_slice(&ip.to_ne_bytes());
    // user_port holds the network-order port in its low 16 bits.
    key[4..6].copy_from_slice(&(port as u16).to_ne_bytes());
    key[8] = protocol as u8;
    // A frontend for this protocol, else one for any protocol (0), as
    // Cilium's lb4_lookup_service falls back.
    let master = match unsafe { SERVICES.get(key) } {
        Some(master) => master,
        None => {
            key[8] = 0;
            match unsafe { SERVICES.get(key) } {
                Some(master) => master,
                None => return ALLOW,
            }
        }
    };
    // With no active backend left, Cilium's control plane counts the
    // terminating ones in; the datapath only ever picks within `count`.
    let count = u16::from_ne_bytes([master[4], master[5]]);
    if count == 0 {
        return REFUSE;
    }
    let slot = (unsafe { bpf_get_prandom_u32() } % count as u32) as u16 + 1;
    key[6..8].copy_from_slice(&slot.to_ne_bytes());
    let Some(entry) = (unsafe { SERVICES.get(key) }) else {
        return REFUSE;
    };
    let backend_id = u32::from_ne_bytes([entry[0], entry[1], entry[2], entry[3]]);
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }) else {
        return REFUSE;
    };
    unsafe {
        (*addr).user_ip4 = u32::from_ne_bytes([backend[0], backend[1], backend[2], backend[3]]);
        (*addr).user_port = u16::from_ne_bytes([backend[4], backend[5]]) as u32;
    }
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
