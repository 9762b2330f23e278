//! What runs in the guest: the kernel-facing root tests, built on the host
//! (they run from the host's target directory over 9p), and the shell
//! script init.sh runs in the chroot to run them one by one.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use lab_netns::root::{EXPECT_KPROBES_ENV, REQUIRE_ROOT_ENV};

use crate::cmd;

/// One program run in the guest.
#[derive(Debug)]
pub struct GuestTest {
    pub name: String,
    /// Working directory (cargo runs a crate's tests in its directory).
    pub dir: PathBuf,
    pub argv: Vec<String>,
}

/// One observer-agent test target run in the guest.
struct GuestTarget {
    target: &'static str,
    /// Only this test runs (exact name), else every test not skipped.
    only: Option<&'static str>,
    /// Tests skipped there.
    skip: &'static [&'static str],
    /// Print the tests' output (their measurements) on the console.
    show_output: bool,
}

/// The observer-agent test targets run in the guest. Under TCG the guest's
/// CPUs are ~20 times slower than the host's, so only tests without timing
/// bounds run; those skipped here run on the host kernel only (README
/// "Kernels tested").
const AGENT_TESTS: &[GuestTarget] = &[
    // Loading, attaching and the destination-side events.
    GuestTarget {
        target: "conn_events",
        only: None,
        // A blocked reader woken within 200 ms bounds: timing.
        skip: &["wake_a_blocked_reader_once_per_pass_of_the_mark"],
        show_output: false,
    },
    // The ruleset commit kprobes: chosen and attached where the kernel has
    // kprobes, each commit's kernel time against its write and its netlink
    // notification (orderings, printed deltas). (dataplane_rules and
    // dataplane_flows hold each detector to 5 ms of a witnessed commit: the
    // guest missed that by up to 203 ms.)
    GuestTarget {
        target: "dataplane_commit_kprobe",
        only: None,
        skip: &[],
        show_output: true,
    },
    // The netlink stamps against the commit kprobe, every core busy (the
    // printed distribution is in docs/benchmarks.md); the file's other
    // tests hold stamps to a witness within 1 ms: timing.
    GuestTarget {
        target: "kernel_stamps",
        only: Some(
            "where_kprobes_exist_each_stamp_follows_its_commit_kprobe_idle_and_with_every_core_busy",
        ),
        skip: &[],
        show_output: true,
    },
];

/// Builds the agent and the guest's test programs; returns how to run each.
pub fn build() -> Result<Vec<GuestTest>> {
    let root = cmd::workspace_root();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(&root)
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(["-p", "observer-agent"]);
    for t in AGENT_TESTS {
        cargo.args(["--test", t.target]);
    }
    eprintln!("+ {}", cmd::describe(&cargo));
    let out = cargo
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{}`", cmd::describe(&cargo)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", cmd::describe(&cargo), out.status);
    }
    let artifacts = executables(&String::from_utf8_lossy(&out.stdout))?;
    let find = |target: &str, test: bool| {
        artifacts
            .iter()
            .find(|a| a.target == target && a.test == test)
            .map(|a| a.executable.clone())
            .with_context(|| format!("cargo built no executable for {target} (test: {test})"))
    };
    let agent_dir = root.join("observer-agent");
    // The integration tests' build builds the package's binary too.
    let mut tests = vec![GuestTest {
        name: "observer-agent probe".into(),
        dir: agent_dir.clone(),
        argv: vec![find("observer-agent", false)?, "probe".into()],
    }];
    for t in AGENT_TESTS {
        let mut argv = vec![find(t.target, true)?, "--test-threads=1".into()];
        if let Some(only) = t.only {
            argv.extend([only.into(), "--exact".into()]);
        }
        for skip in t.skip {
            argv.extend(["--skip".into(), (*skip).into()]);
        }
        if t.show_output {
            argv.push("--nocapture".into());
        }
        tests.push(GuestTest {
            name: format!("observer-agent --test {}", t.target),
            dir: agent_dir.clone(),
            argv,
        });
    }
    Ok(tests)
}

/// An executable cargo built.
struct Artifact {
    target: String,
    /// A test harness (else the target's own binary).
    test: bool,
    executable: String,
}

/// The executables of cargo's `compiler-artifact` messages.
fn executables(messages: &str) -> Result<Vec<Artifact>> {
    let mut found = Vec::new();
    for line in messages.lines().filter(|l| l.starts_with('{')) {
        let msg: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo message {line:?}"))?;
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(target), Some(executable)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            found.push(Artifact {
                target: target.to_owned(),
                test: msg["profile"]["test"] == true,
                executable: executable.to_owned(),
            });
        }
    }
    Ok(found)
}

/// Marks each program's end on the console: `XTASK-VM-TEST <code> <name>`.
const RESULT_MARKER: &str = "XTASK-VM-TEST ";

/// The script init.sh runs in the chroot.
pub fn script(tests: &[GuestTest]) -> String {
    let mut s = format!(
        "# Written by cargo xtask test (xtask/src/vm/guest.rs) for one guest run.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export HOME=/tmp {REQUIRE_ROOT_ENV}=1\n\
         # Debian's kernels have kprobes: the commit kprobe tests require them.\n\
         export {EXPECT_KPROBES_ENV}=1\n\
         echo \"guest kernel $(uname -r), $(nproc) CPUs\"\n\
         failed=0\n"
    );
    for t in tests {
        let argv: Vec<String> = t.argv.iter().map(|a| quote(a)).collect();
        s.push_str(&format!(
            "echo {start}\n(cd {dir} && {argv})\nrc=$?\necho \"{RESULT_MARKER}$rc\" {name}\n[ $rc -eq 0 ] || failed=$((failed + 1))\n",
            start = quote(&format!("=== {}", t.name)),
            dir = quote(&t.dir.to_string_lossy()),
            argv = argv.join(" "),
            name = quote(&t.name),
        ));
    }
    s.push_str("exit $failed\n");
    s
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One program's result as the guest printed it.
#[derive(Debug, PartialEq, Eq)]
pub struct GuestResult {
    pub name: String,
    pub code: i32,
}

pub fn results(console: &[String]) -> Vec<GuestResult> {
    console
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix(RESULT_MARKER)?;
            let (code, name) = rest.split_once(' ')?;
            Some(GuestResult {
                name: name.to_owned(),
                code: code.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script, run by sh here, reports each program's exit code on the
    /// lines `results` reads, and fails with the count of failures.
    #[test]
    fn script_results_round_trip_through_sh() {
        let dir = std::env::temp_dir();
        let tests = [
            GuestTest {
                name: "passes".into(),
                dir: dir.clone(),
                argv: vec!["true".into()],
            },
            GuestTest {
                name: "it's failing".into(),
                dir,
                argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
            },
        ];
        let out = Command::new("sh")
            .arg("-c")
            .arg(script(&tests))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            results(&lines),
            [
                GuestResult {
                    name: "passes".into(),
                    code: 0
                },
                GuestResult {
                    name: "it's failing".into(),
                    code: 3
                },
            ]
        );
    }
}
