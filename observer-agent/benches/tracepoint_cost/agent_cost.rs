//! `agent` mode: the agent's cost on a busy node, side by side. The same
//! bounded connection storm runs with the agent off and with the agent on
//! (the release `observer-agent observe` binary in the server's namespace,
//! watching the storm's destination among a few other addresses, its
//! source side on: nf_tables and conntrack sockets with their stamp
//! filters), alternating in one run. Per round: the connection rate of
//! each, and the agent's CPU (utime + stime of its process, all threads)
//! during the storm above its idle rate, per 10k connections; the idle
//! rate is measured over a quiet [`IDLE_SAMPLE`] before each storm, and
//! the agent-off storm waits as long first (the previous agent's teardown
//! and the machine's other work settle alike). The eBPF
//! programs' own time is spent in the storm's threads: it shows in the
//! rate, not in the agent's CPU.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use lab_netns::netns::NetNs;

use super::storm;

/// Other watched addresses (terminating pods elsewhere), for a realistic set.
const OTHER_WATCHED: [&str; 4] = ["10.209.1.1", "10.209.1.2", "10.209.1.3", "10.209.1.4"];
/// Time the agent gets to load its programs and read the rulesets.
const AGENT_START: Duration = Duration::from_secs(2);
/// Long enough for the process's 10 ms CPU ticks to resolve 0.2% of a core.
const IDLE_SAMPLE: Duration = Duration::from_secs(5);

/// The agent process; killed when dropped.
struct Agent(Child);

impl Agent {
    fn start(ns: &NetNs, watched: IpAddr) -> anyhow::Result<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_observer-agent"));
        cmd.arg("--netns").arg(ns.path()).arg("observe");
        cmd.arg("--watch-endpoint")
            .arg(SocketAddr::new(watched, 80).to_string());
        for ip in OTHER_WATCHED {
            cmd.args(["--watch-endpoint", &format!("{ip}:8080")]);
        }
        cmd.args(["--output", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let agent = Agent(cmd.spawn().context("starting observer-agent")?);
        std::thread::sleep(AGENT_START);
        Ok(agent)
    }

    /// CPU time of the process so far (all threads).
    fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id()))?;
        // Fields after the command's closing parenthesis; utime and stime
        // are the 14th and 15th of the whole line.
        let rest = stat.rsplit_once(')').context("/proc stat format")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One storm: connections made and per second.
fn timed_storm(
    server: &NetNs,
    client: &NetNs,
    ip: IpAddr,
    count: usize,
) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    let made = storm(server, client, ip, count)?;
    Ok((made, started.elapsed()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(
    server: &NetNs,
    client: &NetNs,
    watched: IpAddr,
    connections: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let (mut off, mut on, mut ratio, mut per_10k, mut idle) =
        (vec![], vec![], vec![], vec![], vec![]);
    println!(
        "| round | off: conn/s | on: conn/s | on / off | agent CPU per 10k connections above idle (s) | agent idle CPU (% of a core) |"
    );
    println!("|---|---|---|---|---|---|");
    for round in 1..=rounds {
        std::thread::sleep(AGENT_START + IDLE_SAMPLE);
        let (made, took) = timed_storm(server, client, watched, connections)?;
        let rate_off = made as f64 / took.as_secs_f64();
        let agent = Agent::start(server, watched)?;
        let idle_from = agent.cpu()?;
        std::thread::sleep(IDLE_SAMPLE);
        let idle_share = (agent.cpu()? - idle_from).as_secs_f64() / IDLE_SAMPLE.as_secs_f64();
        let cpu_from = agent.cpu()?;
        let (made_on, took_on) = timed_storm(server, client, watched, connections)?;
        let cpu = (agent.cpu()? - cpu_from).as_secs_f64();
        drop(agent);
        let rate_on = made_on as f64 / took_on.as_secs_f64();
        let above = (cpu - idle_share * took_on.as_secs_f64()).max(0.0);
        let cost = above / made_on as f64 * 10_000.0;
        println!(
            "| {round} | {rate_off:.0} | {rate_on:.0} | {:.3} | {cost:.3} | {:.2} |",
            rate_on / rate_off,
            idle_share * 100.0
        );
        off.push(rate_off);
        on.push(rate_on);
        ratio.push(rate_on / rate_off);
        per_10k.push(cost);
        idle.push(idle_share * 100.0);
    }
    println!(
        "| median | {:.0} | {:.0} | {:.3} | {:.3} | {:.2} |",
        median(&mut off),
        median(&mut on),
        median(&mut ratio),
        median(&mut per_10k),
        median(&mut idle)
    );
    Ok(())
}
