//! The kernel side of the agent: loading the eBPF object, the map of watched
//! addresses, and the destination-side connection events.

pub mod capabilities;
pub mod conn_events;
pub mod conn_ring;
pub mod loader;
pub mod tracefs;

pub use loader::{
    Delivery, HookStatus, Kernel, KernelError, LoadOptions, MissingInObject, Stats, program_mut,
    take_map,
};
