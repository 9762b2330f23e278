//! Gate for tests that need root.
//!
//! Run through `cargo xtask test` (CI), such a test fails when not root, so a
//! missing privilege can never pass silently; run through a plain
//! `cargo test` as a normal user it is skipped with a message.

/// Set by `cargo xtask test`.
pub const REQUIRE_ROOT_ENV: &str = "OBSERVER_REQUIRE_ROOT_TESTS";

pub fn is_root() -> bool {
    nix_free_geteuid() == 0
}

fn nix_free_geteuid() -> u32 {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() }
}

/// Returns true when the calling test may proceed; false when it should
/// return early (skipped). Panics when root is required but missing.
#[must_use]
pub fn root_or_skip(test: &str) -> bool {
    is_root()
        || skip(
            test,
            "needs root (eBPF, network namespaces); run `sudo cargo xtask test`",
        )
}

/// For a test that cannot run here, for `why` (a hook this kernel lacks):
/// prints the reason and returns false (the test returns early, skipped),
/// or panics where the root tests are required, so that a missing hook
/// can never pass silently there.
#[must_use]
pub fn skip(test: &str, why: &str) -> bool {
    if std::env::var_os(REQUIRE_ROOT_ENV).is_some() {
        panic!("{test}: {why}, and {REQUIRE_ROOT_ENV} is set");
    }
    eprintln!("skipped {test}: {why}");
    false
}

/// Set to `1` by `cargo xtask test` in a guest whose kernel has kprobes
/// (Debian's): the ruleset commit tests then require the kprobe timing
/// instead of inferring it from the kernel they run on.
pub const EXPECT_KPROBES_ENV: &str = "OBSERVER_EXPECT_KPROBES";

/// Whether the root tests must find kprobes attachable: what the test runner
/// says, else whether this kernel has the perf kprobe PMU.
pub fn expect_kprobes() -> bool {
    match std::env::var(EXPECT_KPROBES_ENV) {
        Ok(v) => v == "1",
        Err(_) => std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists(),
    }
}
