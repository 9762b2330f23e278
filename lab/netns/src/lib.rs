//! Test-only infrastructure shared by every root test: network namespaces
//! and veth links that remove themselves, and the gate that makes root tests
//! mandatory under `cargo xtask test`. Kept apart from the `lab` crate so
//! kernel tests do not depend on the lab's larger machinery.

pub mod netns;
pub mod root;
