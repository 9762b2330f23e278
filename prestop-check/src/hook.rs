//! What a container's preStop hook does before kubelet sends SIGTERM.
//!
//! Only delays that can be read with certainty count; anything else is
//! `Unknown` (never zero), because a hook we misread as zero would produce a
//! false alarm and one we misread as long would hide a real problem.

use k8s_openapi::api::core::v1::Container;
use observer_proto::api::DRAIN_ANSWER_SLACK_SECONDS;

#[derive(Debug, Clone, PartialEq)]
pub enum Hook {
    /// No preStop hook: SIGTERM comes at once.
    None,
    /// `lifecycle.preStop.sleep.seconds`.
    NativeSleep(i64),
    /// An exec hook that sleeps; `editable` when a single literal sleep
    /// argument can be rewritten by `--fix`; `until`, the command where the
    /// app may stop accepting, when sleeps after it were not counted.
    ExecSleep {
        seconds: f64,
        editable: bool,
        until: Option<String>,
    },
    /// `prestop-drain` (the adaptive drain): it waits until the aggregator
    /// answers, at most `max` plus the answer's slack, and sleeps
    /// `fallback` when it gets no answer.
    AdaptiveDrain {
        fallback: f64,
        max: f64,
    },
    Unknown(String),
}

impl Hook {
    pub fn of(container: &Container) -> Hook {
        let Some(handler) = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
        else {
            return Hook::None;
        };
        if let Some(sleep) = &handler.sleep {
            return Hook::NativeSleep(sleep.seconds);
        }
        if let Some(exec) = &handler.exec {
            let command = exec.command.as_deref().unwrap_or_default();
            if command.first().is_some_and(|p| basename(p) == DRAIN) {
                return adaptive_drain(&command[1..]).unwrap_or_else(Hook::Unknown);
            }
            return match exec_delay(command) {
                Ok(Delay {
                    seconds,
                    sleeps,
                    until,
                }) => Hook::ExecSleep {
                    seconds,
                    editable: sleeps == 1,
                    until,
                },
                Err(why) => Hook::Unknown(why),
            };
        }
        if handler.http_get.is_some() {
            return Hook::Unknown("httpGet hook: its duration is whatever the handler does".into());
        }
        Hook::Unknown("preStop handler of an unsupported type".into())
    }

    /// Seconds before SIGTERM that the hook guarantees, when known (the
    /// adaptive drain: its fallback, what it waits when the aggregator
    /// cannot answer).
    pub fn seconds(&self) -> Option<f64> {
        match self {
            Hook::None => Some(0.0),
            Hook::NativeSleep(s) => Some(*s as f64),
            Hook::ExecSleep { seconds, .. } => Some(*seconds),
            Hook::AdaptiveDrain { fallback, .. } => Some(*fallback),
            Hook::Unknown(_) => None,
        }
    }

    /// The longest the hook can delay SIGTERM, when known: what the grace
    /// period must hold.
    pub fn longest(&self) -> Option<f64> {
        match self {
            Hook::AdaptiveDrain { fallback, max } => {
                Some((max + DRAIN_ANSWER_SLACK_SECONDS as f64).max(*fallback))
            }
            _ => self.seconds(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Hook::None => "no preStop hook (0s)".into(),
            Hook::NativeSleep(s) => format!("preStop sleep {s}s"),
            Hook::ExecSleep {
                seconds,
                until: None,
                ..
            } => format!("preStop exec sleep {}s", fmt_secs(*seconds)),
            Hook::ExecSleep {
                seconds,
                until: Some(why),
                ..
            } => format!(
                "preStop exec sleep {}s, up to where {why} (later sleeps do not delay it)",
                fmt_secs(*seconds)
            ),
            Hook::AdaptiveDrain { fallback, max } => format!(
                "preStop adaptive drain (prestop-drain: at most {}s, {}s without an answer)",
                fmt_secs(*max),
                fmt_secs(*fallback)
            ),
            Hook::Unknown(why) => format!("preStop of unknown duration ({why})"),
        }
    }
}

pub fn fmt_secs(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

const SHELLS: &[&str] = &["sh", "bash", "ash", "dash", "ksh", "zsh"];
/// Commands that cannot stop the app from accepting: the delay runs on
/// through them.
const HARMLESS: &[&str] = &[
    "echo", "printf", "true", ":", "date", "logger", "rm", "touch", "sync",
];
/// Commands that stop or signal the app: the delay it experiences ends
/// where they run, whatever sleeps follow.
const STOPPERS: &[&str] = &["kill", "killall", "pkill", "killall5"];

/// Whether `program` is a shell: an image that runs one has `sleep` too.
pub fn is_shell(program: &str) -> bool {
    SHELLS.contains(&basename(program))
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

/// The adaptive drain's binary.
const DRAIN: &str = "prestop-drain";
/// `prestop-drain --max` when the hook does not set it.
const DRAIN_DEFAULT_MAX: f64 = 60.0;

/// The adaptive drain's bounds from its arguments: `--fallback` must be
/// there (its environment fallback cannot be read from the hook).
fn adaptive_drain(args: &[String]) -> Result<Hook, String> {
    let mut fallback = None;
    let mut max = DRAIN_DEFAULT_MAX;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg.as_str(), None),
        };
        let mut value = |flag: &str| {
            inline
                .or_else(|| args.next().map(String::as_str))
                .ok_or_else(|| format!("{DRAIN} {flag} without a value"))
                .and_then(|v| {
                    humantime::parse_duration(v)
                        .map(|d| d.as_secs_f64())
                        .map_err(|e| format!("{DRAIN} {flag} {v:?}: {e}"))
                })
        };
        match flag {
            "--fallback" => fallback = Some(value(flag)?),
            "--max" => max = value(flag)?,
            "--copy-to" => {
                return Err(format!(
                    "{DRAIN} --copy-to installs the binary, it does not wait"
                ));
            }
            _ => {}
        }
    }
    let fallback = fallback.ok_or_else(|| {
        format!("{DRAIN} without --fallback: what it sleeps without an answer is not in the hook")
    })?;
    Ok(Hook::AdaptiveDrain { fallback, max })
}

/// How long an exec hook keeps the app accepting.
#[derive(Debug, PartialEq)]
struct Delay {
    seconds: f64,
    /// Sleep commands counted.
    sleeps: usize,
    /// Why counting stopped before the end of the script.
    until: Option<String>,
}

fn exec_delay(command: &[String]) -> Result<Delay, String> {
    let Some(program) = command.first() else {
        return Err("exec hook without a command".into());
    };
    let name = basename(program);
    if name == "sleep" {
        return sleep_args(command[1..].iter().map(String::as_str)).map(|seconds| Delay {
            seconds,
            sleeps: 1,
            until: None,
        });
    }
    if name == "busybox" {
        return exec_delay(&command[1..]);
    }
    if SHELLS.contains(&name) {
        let mut args = command[1..].iter();
        for arg in args.by_ref() {
            if !arg.starts_with('-') {
                return Err(format!("{name} runs a script file `{arg}`"));
            }
            if arg.len() > 1 && !arg.starts_with("--") && arg.contains('c') {
                let script = args
                    .next()
                    .ok_or_else(|| format!("{name} -c without a script"))?;
                return script_delay(script);
            }
        }
        return Err(format!("{name} without -c"));
    }
    Err(format!("exec hook runs `{program}`, not a sleep"))
}

/// One command of a preStop script, as the app experiences it.
enum Step {
    Sleep(f64),
    Harmless,
    /// Stops the app from accepting, or may: a command this cannot read.
    Stops(String),
}

fn step<'a>(first: &'a str, mut args: impl Iterator<Item = &'a str>) -> Result<Step, String> {
    let name = basename(first);
    let has = |words: &[&str], arg: Option<&str>| arg.is_some_and(|a| words.contains(&a));
    Ok(match name {
        "sleep" => Step::Sleep(sleep_args(args.map(|w| w.trim_matches(['"', '\''])))?),
        _ if HARMLESS.contains(&name) => Step::Harmless,
        // `nginx -s reload` re-reads the configuration and keeps accepting.
        "nginx" if args.next() == Some("-s") && has(&["reload", "reopen"], args.next()) => {
            Step::Harmless
        }
        _ if STOPPERS.contains(&name) => Step::Stops(format!("`{name}` signals the app")),
        "nginx" | "apachectl" | "apache2ctl" | "httpd" => {
            Step::Stops(format!("`{name}` may stop the server"))
        }
        _ => Step::Stops(format!("`{name}` cannot be read and may stop the app")),
    })
}

/// The sleeps up to the first command that stops (or may stop) the app:
/// `sleep 5 && kill -TERM 1 && sleep 30` delays SIGTERM by 35 s, but the
/// app stops accepting after 5.
fn script_delay(script: &str) -> Result<Delay, String> {
    let control = ["||", "|", "&", "`", "$(", "(", ")", "{", "}"];
    let flattened = script.replace("&&", "\n");
    if let Some(c) = control.iter().find(|c| flattened.contains(*c)) {
        return Err(format!("shell script uses `{c}`"));
    }
    let mut total = 0.0;
    let mut sleeps = 0;
    let mut until = None;
    for command in flattened.split(['\n', ';']) {
        let command = command.split('#').next().unwrap_or_default();
        let mut words = command.split_whitespace().peekable();
        if words.peek() == Some(&"exec") {
            words.next();
        }
        let Some(first) = words.next() else { continue };
        let keyword = ["if", "then", "while", "for", "until", "do", "case", "trap"];
        if keyword.contains(&first) {
            return Err(format!("shell script uses `{first}`"));
        }
        match step(first, words)? {
            Step::Sleep(seconds) => {
                total += seconds;
                sleeps += 1;
            }
            Step::Harmless => {}
            Step::Stops(why) if sleeps == 0 => {
                return Err(format!("{why} before any sleep"));
            }
            Step::Stops(why) => {
                until = Some(why);
                break;
            }
        }
    }
    if sleeps == 0 {
        return Err("shell script without a sleep".into());
    }
    Ok(Delay {
        seconds: total,
        sleeps,
        until,
    })
}

/// GNU and busybox `sleep` add up several arguments, each with an optional
/// s/m/h/d suffix.
fn sleep_args<'a>(args: impl Iterator<Item = &'a str>) -> Result<f64, String> {
    let mut total = 0.0;
    let mut any = false;
    for arg in args {
        let (number, unit) = match arg.char_indices().last() {
            Some((i, 's')) => (&arg[..i], 1.0),
            Some((i, 'm')) => (&arg[..i], 60.0),
            Some((i, 'h')) => (&arg[..i], 3600.0),
            Some((i, 'd')) => (&arg[..i], 86400.0),
            _ => (arg, 1.0),
        };
        let value: f64 = number
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("sleep argument `{arg}` is not a literal duration"))?;
        total += value * unit;
        any = true;
    }
    if !any {
        return Err("sleep without an argument".into());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(cmd: &[&str]) -> Result<(f64, usize), String> {
        exec_delay(&cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .map(|d| (d.seconds, d.sleeps))
    }

    #[test]
    fn recognises_common_sleep_forms() {
        assert_eq!(exec(&["sleep", "5"]), Ok((5.0, 1)));
        assert_eq!(exec(&["/bin/sleep", "5s"]), Ok((5.0, 1)));
        assert_eq!(exec(&["/usr/bin/sleep", "1m"]), Ok((60.0, 1)));
        assert_eq!(exec(&["sleep", "1", "2.5"]), Ok((3.5, 1)));
        assert_eq!(exec(&["busybox", "sleep", "3"]), Ok((3.0, 1)));
        assert_eq!(exec(&["sh", "-c", "sleep 5"]), Ok((5.0, 1)));
        assert_eq!(
            exec(&["/bin/bash", "-ec", "sleep 7 && nginx -s quit"]),
            Ok((7.0, 1))
        );
        assert_eq!(
            exec(&["sh", "-c", "echo draining; sleep '4'\nkill 1"]),
            Ok((4.0, 1))
        );
        assert_eq!(exec(&["sh", "-c", "sleep 2; sleep 3"]), Ok((5.0, 2)));
        assert_eq!(
            exec(&["sh", "-c", "rm /tmp/online && sleep 20"]),
            Ok((20.0, 1))
        );
        assert_eq!(
            exec(&["sh", "-c", "exec sleep 9 # wait for kube-proxy"]),
            Ok((9.0, 1))
        );
    }

    #[test]
    fn the_delay_ends_at_the_first_command_that_stops_the_app() {
        assert_eq!(
            exec(&["sh", "-c", "sleep 5 && kill -TERM 1 && sleep 30"]),
            Ok((5.0, 1))
        );
        let nginx = "sleep 10 && nginx -s reload && sleep 1 && nginx -s quit && sleep 5";
        assert_eq!(exec(&["sh", "-c", nginx]), Ok((11.0, 2)));
        assert_eq!(
            exec(&["sh", "-c", "sleep 3; apachectl graceful-stop; sleep 9"]),
            Ok((3.0, 1))
        );
        assert_eq!(
            exec(&["sh", "-c", "sleep 4\n/drain.sh\nsleep 60"]),
            Ok((4.0, 1))
        );
    }

    #[test]
    fn a_delay_cut_short_says_where() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "app",
            "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "sleep 5; kill 1; sleep 30"]}}}
        }))
        .unwrap();
        assert_eq!(
            Hook::of(&c).describe(),
            "preStop exec sleep 5s, up to where `kill` signals the app (later sleeps do not delay it)"
        );
    }

    #[test]
    fn anything_else_is_unknown_not_zero() {
        for cmd in [
            &["sleep", "$(DELAY)"][..],
            &["sleep", "infinity"],
            &["sleep"],
            &["nginx", "-s", "quit"],
            &["sh", "/drain.sh"],
            &["sh", "-c", "nginx -s quit; sleep 5"],
            &["sh", "-c", "sleep 5 || true"],
            &["sh", "-c", "while true; do sleep 1; done"],
            &["sh", "-c", "sleep $DELAY"],
            &["sh", "-c", "echo hi"],
            &[],
        ] {
            assert!(exec(cmd).is_err(), "{cmd:?} should be unknown");
        }
    }

    fn hook(cmd: &[&str]) -> Hook {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "app",
            "lifecycle": {"preStop": {"exec": {"command": cmd}}}
        }))
        .unwrap();
        Hook::of(&c)
    }

    #[test]
    fn the_adaptive_drain_guarantees_its_fallback_and_lasts_at_most_max_plus_slack() {
        let injected = hook(&[
            "/opt/prestop-drain/prestop-drain",
            "--aggregator",
            "http://aggregator:8080",
            "--token-file",
            "/var/run/secrets/prestop/token",
            "--fallback",
            "9s",
            "--max",
            "60s",
        ]);
        assert_eq!(
            injected,
            Hook::AdaptiveDrain {
                fallback: 9.0,
                max: 60.0
            }
        );
        assert_eq!(injected.seconds(), Some(9.0));
        assert_eq!(
            injected.longest(),
            Some(60.0 + DRAIN_ANSWER_SLACK_SECONDS as f64)
        );
        // `--flag=value`, the default max, a fallback above max + slack.
        let long = hook(&["prestop-drain", "--fallback=2m"]);
        assert_eq!((long.seconds(), long.longest()), (Some(120.0), Some(120.0)));
        assert_eq!(
            long.describe(),
            "preStop adaptive drain (prestop-drain: at most 60s, 120s without an answer)"
        );
    }

    #[test]
    fn an_adaptive_drain_that_cannot_be_read_is_unknown() {
        for cmd in [
            &["prestop-drain", "--max", "30s"][..],
            &["prestop-drain", "--fallback"],
            &["prestop-drain", "--fallback", "soon"],
            &[
                "prestop-drain",
                "--copy-to",
                "/opt/prestop-drain/prestop-drain",
            ],
        ] {
            assert!(
                matches!(hook(cmd), Hook::Unknown(_)),
                "{cmd:?}: {:?}",
                hook(cmd)
            );
        }
    }
}
