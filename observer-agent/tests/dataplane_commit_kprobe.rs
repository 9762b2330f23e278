//! Root-only: the ruleset commit kprobes pass the verifier on this kernel;
//! attaching them works where the kernel has kprobes and is otherwise
//! reported per probe, not fatal.

use std::path::Path;

use lab::root::root_or_skip;
use lab_netns::netns::NetNs;
use observer_agent::{
    dataplane::commit_kprobe,
    kernel::{Kernel, LoadOptions},
};

#[test]
fn commit_kprobes_load_and_report_attach_failures() {
    if !root_or_skip("commit_kprobes_load_and_report_attach_failures") {
        return;
    }
    // Where nf_tables and x_tables are modules (Debian's kernels), their
    // functions exist once a dataplane used them: list both rulesets, as
    // kube-proxy does, in a namespace of the test's own.
    let ns = NetNs::create("commitprobe").expect("netns");
    ns.sh("nft list tables && iptables-legacy -w -t nat -S >/dev/null")
        .expect("nft and iptables-legacy list their rulesets");
    let mut kernel = Kernel::load(LoadOptions::default()).expect("eBPF loads");
    let setup = commit_kprobe::load(kernel.ebpf_mut()).expect("probes pass the verifier");
    let functions: Vec<&str> = setup.statuses.iter().map(|s| s.function).collect();
    assert_eq!(functions, ["nf_tables_commit", "xt_replace_table"]);
    let kprobes = Path::new("/sys/bus/event_source/devices/kprobe").exists();
    for status in &setup.statuses {
        assert_eq!(status.attached, kprobes, "{status:?}");
        assert!(!status.detail.is_empty());
    }
    assert_eq!(setup.kprobe.is_some(), kprobes);
}
