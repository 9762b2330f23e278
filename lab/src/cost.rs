//! What each part of a running lab costs, so a larger lab can say which
//! part limits it: CPU seconds of the observer (agents, aggregator), of the
//! simulated cluster (pods' servers, nginx, the rule writers kube-proxy
//! runs and the lab's `ip` commands) and of the lab's own work (traffic
//! clients, commit witnesses, the rest of `lab-run`), with the
//! aggregator's peak memory.
//!
//! Read from /proc by a sampling thread: every process descending from
//! this one is classified by its command name, every thread of this
//! process by its thread name ([`CLIENT_THREAD`], [`WITNESS_THREAD`]). A
//! process or thread that ended keeps its last sample; children that ended
//! unseen (a rule writer lives milliseconds) are what this process's
//! reaped-children time holds beyond the children it saw.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::Serialize;

/// Thread name of the traffic clients ([`crate::client::Client`]).
pub const CLIENT_THREAD: &str = "lab-client";
/// Thread name of the commit witnesses ([`crate::witness`]).
pub const WITNESS_THREAD: &str = "lab-witness";

/// How often the processes are sampled: a process or thread loses at most
/// this much of its CPU time when it ends.
const INTERVAL: Duration = Duration::from_millis(500);

/// A part of the lab whose CPU is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Agents,
    Aggregator,
    PodServers,
    Nginx,
    /// kube-proxy's rule writers (nft, iptables-restore), `ip` and every
    /// other short command the lab runs.
    Commands,
    Clients,
    Witnesses,
    /// lab-run's other threads: proxies and kubelet bookkeeping, the API
    /// double, the routers, the polling of the aggregator, this sampler.
    LabRun,
}

impl Part {
    pub const ALL: [Part; 8] = [
        Part::Agents,
        Part::Aggregator,
        Part::PodServers,
        Part::Nginx,
        Part::Commands,
        Part::Clients,
        Part::Witnesses,
        Part::LabRun,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Part::Agents => "agents",
            Part::Aggregator => "aggregator",
            Part::PodServers => "pods' servers",
            Part::Nginx => "nginx",
            Part::Commands => "rule writers and ip commands",
            Part::Clients => "traffic clients",
            Part::Witnesses => "commit witnesses",
            Part::LabRun => "lab-run's own bookkeeping",
        }
    }

    fn of_process(comm: &str) -> Part {
        match comm {
            "observer-agent" => Part::Agents,
            "aggregator" => Part::Aggregator,
            "lab-pod-server" => Part::PodServers,
            "nginx" => Part::Nginx,
            _ => Part::Commands,
        }
    }

    fn of_own_thread(comm: &str) -> Part {
        match comm {
            CLIENT_THREAD => Part::Clients,
            WITNESS_THREAD => Part::Witnesses,
            _ => Part::LabRun,
        }
    }
}

/// The fields of `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) used here.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcStat {
    pub comm: String,
    pub ppid: u32,
    /// User + system CPU of the process (or thread), seconds.
    pub cpu_seconds: f64,
    /// User + system CPU of its children that ended and were waited for.
    pub children_cpu_seconds: f64,
}

impl ProcStat {
    pub fn read(path: &Path) -> Option<ProcStat> {
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }

    fn parse(stat: &str) -> Option<ProcStat> {
        // The command name is in parentheses and may hold spaces or ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        // Fields from the state on: ppid is the 2nd, utime the 12th,
        // stime, cutime and cstime follow.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let number = |i: usize| fields.get(i)?.parse::<f64>().ok();
        let ticks = clock_ticks();
        Some(ProcStat {
            comm,
            ppid: fields.get(1)?.parse().ok()?,
            cpu_seconds: (number(11)? + number(12)?) / ticks,
            children_cpu_seconds: (number(13)? + number(14)?) / ticks,
        })
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Peak resident memory (VmHWM) of a process, MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds by part, cumulative since the sampler started.
pub type CpuByPart = BTreeMap<Part, f64>;

/// CPU by part between two readings of [`Sampler::totals`].
pub fn delta(before: &CpuByPart, after: &CpuByPart) -> CpuByPart {
    after
        .iter()
        .map(|(part, a)| (*part, (a - before.get(part).unwrap_or(&0.0)).max(0.0)))
        .collect()
}

#[derive(Default)]
struct Seen {
    /// Descendant processes: part, parent, last CPU (own + waited-for
    /// children), whether it was there at the last sample.
    processes: HashMap<u32, Process>,
    /// This process's threads: part, last CPU.
    threads: HashMap<u32, (Part, f64)>,
    /// This process: own CPU and its waited-for children's.
    own: f64,
    children: f64,
}

struct Process {
    part: Part,
    ppid: u32,
    cpu: f64,
    alive: bool,
}

impl Seen {
    fn sample(&mut self) {
        let me = std::process::id();
        if let Some(stat) = ProcStat::read(Path::new("/proc/self/stat")) {
            self.own = stat.cpu_seconds;
            self.children = stat.children_cpu_seconds;
        }
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                if let Some(stat) = ProcStat::read(&task.path().join("stat")) {
                    let part = Part::of_own_thread(&stat.comm);
                    self.threads.insert(tid, (part, stat.cpu_seconds));
                }
            }
        }
        let mut all = HashMap::new();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for entry in procs.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some(stat) = ProcStat::read(&entry.path().join("stat")) {
                    all.insert(pid, stat);
                }
            }
        }
        for p in self.processes.values_mut() {
            p.alive = false;
        }
        for (pid, stat) in &all {
            if *pid == me || !descends_from(*pid, me, &all) {
                continue;
            }
            self.processes.insert(
                *pid,
                Process {
                    part: Part::of_process(&stat.comm),
                    ppid: stat.ppid,
                    cpu: stat.cpu_seconds + stat.children_cpu_seconds,
                    alive: true,
                },
            );
        }
    }

    fn totals(&self) -> CpuByPart {
        let mut by: CpuByPart = Part::ALL.iter().map(|p| (*p, 0.0)).collect();
        let me = std::process::id();
        // A process that ended was waited for by its parent, whose
        // children's time now holds it: counted once, in its own part.
        let mut reaped: HashMap<u32, f64> = HashMap::new();
        for p in self.processes.values() {
            *by.entry(p.part).or_default() += p.cpu;
            if !p.alive {
                *reaped.entry(p.ppid).or_default() += p.cpu;
            }
        }
        for (pid, p) in &self.processes {
            if let Some(r) = reaped.get(pid) {
                *by.entry(p.part).or_default() -= r;
            }
        }
        let unseen = self.children - reaped.get(&me).unwrap_or(&0.0);
        *by.entry(Part::Commands).or_default() += unseen.max(0.0);
        let mut threads_elsewhere = 0.0;
        for (part, cpu) in self.threads.values() {
            if *part != Part::LabRun {
                *by.entry(*part).or_default() += cpu;
                threads_elsewhere += cpu;
            }
        }
        *by.entry(Part::LabRun).or_default() += (self.own - threads_elsewhere).max(0.0);
        by
    }
}

/// Whether `pid` has `ancestor` among its parents in `all`.
fn descends_from(pid: u32, ancestor: u32, all: &HashMap<u32, ProcStat>) -> bool {
    let mut at = pid;
    // Bounded: a parent chain is shorter than the process table.
    for _ in 0..all.len() {
        match all.get(&at) {
            Some(stat) if stat.ppid == ancestor => return true,
            Some(stat) if stat.ppid > 1 => at = stat.ppid,
            _ => return false,
        }
    }
    false
}

/// CPU time (ns) the thread `tid` of this process has run: the first field
/// of its schedstat.
pub fn thread_cpu_ns(tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("thread schedstat")
}

/// The thread of this process with that name, as the kernel keeps it (its
/// first 15 bytes; a new thread names itself once it runs: waits up to
/// 2 s for it).
pub fn thread_named(name: &str) -> u32 {
    let name = name.get(..15).unwrap_or(name);
    for _ in 0..200 {
        let found = std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .filter_map(|e| e.ok())
            .find_map(|e| {
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                (comm.trim() == name).then(|| e.file_name().to_str()?.parse().ok())?
            });
        if let Some(tid) = found {
            return tid;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no thread {name}");
}

/// CPU seconds the whole machine has spent (every process, the lab's and
/// any other), from /proc/stat.
pub fn machine_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal: all but idle, iowait.
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| fields.get(*i))
        .sum();
    Some(busy / clock_ticks())
}

/// What the lab's parts cost over its rollouts (`labCost` in report.json).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabCost {
    /// CPU seconds per part, summed over the rollouts.
    pub cpu_seconds: CpuByPart,
    pub rollouts: usize,
    /// Wall-clock seconds of the rollouts.
    pub rollout_seconds: f64,
    /// CPU seconds the whole machine spent meanwhile (other work on a
    /// shared machine included); None where /proc/stat could not be read.
    pub machine_cpu_seconds: Option<f64>,
    pub cores: usize,
    /// The aggregator's peak resident memory at the end, MiB.
    pub aggregator_peak_rss_mib: Option<f64>,
}

impl LabCost {
    /// Adds one rollout: its CPU by part, wall time and the machine's CPU.
    pub fn add(&mut self, cpu: &CpuByPart, seconds: f64, machine: Option<f64>) {
        for (part, c) in cpu {
            *self.cpu_seconds.entry(*part).or_default() += c;
        }
        self.rollout_seconds += seconds;
        self.machine_cpu_seconds = if self.rollouts == 0 {
            machine
        } else {
            self.machine_cpu_seconds.zip(machine).map(|(a, b)| a + b)
        };
        self.rollouts += 1;
        self.cores = std::thread::available_parallelism().map_or(1, usize::from);
    }

    /// The parts, most expensive first.
    pub fn ranked(&self) -> Vec<(Part, f64)> {
        let mut parts: Vec<_> = self.cpu_seconds.iter().map(|(p, c)| (*p, *c)).collect();
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        parts
    }

    /// The text `cargo xtask lab` prints.
    pub fn write_text(&self, out: &mut String) {
        use std::fmt::Write as _;
        let lab: f64 = self.cpu_seconds.values().sum();
        let capacity = self.rollout_seconds * self.cores as f64;
        let _ = write!(
            out,
            "\nCost of the lab's parts over the rollouts ({:.0} s, {} cores: {capacity:.0} core-seconds): {lab:.1} s CPU",
            self.rollout_seconds, self.cores
        );
        if let Some(machine) = self.machine_cpu_seconds {
            let _ = write!(
                out,
                "; the machine spent {machine:.1} s ({:.0} % of its capacity, other work included)",
                100.0 * machine / capacity.max(f64::EPSILON)
            );
        }
        let _ = writeln!(out);
        for (part, cpu) in self.ranked() {
            let _ = writeln!(
                out,
                "  {:<30} {cpu:>7.1} s  {:>5.2} cores",
                part.describe(),
                cpu / self.rollout_seconds.max(f64::EPSILON)
            );
        }
        if let Some(mib) = self.aggregator_peak_rss_mib {
            let _ = writeln!(out, "  aggregator peak memory {mib:.0} MiB");
        }
    }
}

/// Samples the lab's processes until dropped.
pub struct Sampler {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    pub fn start() -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, flag) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("lab-cost".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    s.lock().expect("cost lock").sample();
                    std::thread::sleep(INTERVAL);
                }
            })
            .ok();
        Sampler { seen, stop, thread }
    }

    /// CPU by part so far (sampled now).
    pub fn totals(&self) -> CpuByPart {
        let mut seen = self.seen.lock().expect("cost lock");
        seen.sample();
        seen.totals()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_name_holds_parentheses_and_spaces() {
        let ticks = clock_ticks();
        let line =
            "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 50 30 20 20 0 3 0 1 2 3";
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!(stat.comm, "a (b) c");
        assert_eq!(stat.ppid, 17);
        assert!((stat.cpu_seconds - 300.0 / ticks).abs() < 1e-9);
        assert!((stat.children_cpu_seconds - 50.0 / ticks).abs() < 1e-9);
        assert_eq!(ProcStat::parse("garbage"), None);
    }

    #[test]
    fn counts_a_child_that_ran_and_ended_once_in_its_part() {
        let mut sampler = Seen::default();
        sampler.sample();
        let before = sampler.totals();
        // A short command that burns CPU and is waited for: it is never
        // seen alive, so the time lands in the commands' part.
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        sampler.sample();
        let spent = delta(&before, &sampler.totals());
        assert!(spent[&Part::Commands] > 0.05, "{spent:?}");
        assert!(spent[&Part::Agents] == 0.0, "{spent:?}");
    }

    /// CPU time of the calling thread.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec to write into.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn burn(cpu: Duration) {
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - start < cpu {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn counts_a_named_thread_in_its_part_after_it_ended() {
        let mut sampler = Seen::default();
        sampler.sample();
        let before = sampler.totals();
        let (halfway_tx, halfway) = std::sync::mpsc::channel();
        let (go_on, go_on_rx) = std::sync::mpsc::channel::<()>();
        let client = std::thread::Builder::new()
            .name(CLIENT_THREAD.into())
            .spawn(move || {
                burn(Duration::from_millis(300));
                halfway_tx.send(()).unwrap();
                go_on_rx.recv().unwrap();
            })
            .unwrap();
        halfway.recv().unwrap();
        sampler.sample();
        go_on.send(()).unwrap();
        client.join().unwrap();
        sampler.sample();
        let spent = delta(&before, &sampler.totals());
        // Seen alive once, then gone: its last sample stays in its part.
        assert!(spent[&Part::Clients] >= 0.28, "{spent:?}");
    }
}
