//! Printing observations for people (default) or scripts (`--output json`,
//! one JSON object per line).

use std::{
    io::{self, Write},
    time::SystemTime,
};

use clap::ValueEnum;
use observer_proto::{ConnEvent, Observation, RulesChange, UnixNanos};
use serde::Serialize;

use crate::kernel::{HookStatus, Stats};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Human,
    Json,
}

pub struct Printer<W: Write> {
    format: Format,
    out: W,
}

#[derive(Serialize)]
struct HookLine<'a> {
    name: &'a str,
    attached: bool,
    detail: &'a str,
}

impl<W: Write> Printer<W> {
    pub fn new(format: Format, out: W) -> Self {
        Printer { format, out }
    }

    /// First line: what is attached and watched. Scripts wait for it before
    /// generating traffic.
    pub fn started(
        &mut self,
        now: UnixNanos,
        hooks: &[HookStatus],
        watched: &[String],
    ) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let hooks: Vec<HookLine> = hooks
                    .iter()
                    .map(|h| HookLine {
                        name: &h.name,
                        attached: h.attached,
                        detail: &h.detail,
                    })
                    .collect();
                let line = serde_json::json!({
                    "kind": "started",
                    "time_unix_nano": now,
                    "hooks": hooks,
                    "watched": watched,
                });
                writeln!(self.out, "{line}")?;
            }
            Format::Human => {
                writeln!(
                    self.out,
                    "{} observing {}",
                    rfc3339(now),
                    watched.join(", ")
                )?;
                for h in hooks {
                    let state = if h.attached {
                        "attached"
                    } else {
                        "UNAVAILABLE"
                    };
                    writeln!(self.out, "  {state:<11} {} ({})", h.name, h.detail)?;
                }
            }
        }
        self.out.flush()
    }

    pub fn observation(&mut self, obs: &Observation) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, obs).map_err(io::Error::other)?;
                writeln!(self.out)?;
            }
            Format::Human => writeln!(self.out, "{}", human(obs))?,
        }
        self.out.flush()
    }

    /// Last line: the kernel's counters.
    pub fn stopped(&mut self, now: UnixNanos, stats: Stats) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let line = serde_json::json!({
                    "kind": "stopped",
                    "time_unix_nano": now,
                    "events_emitted": stats.emitted,
                    "events_lost": stats.lost,
                    "events_filtered": stats.filtered,
                });
                writeln!(self.out, "{line}")?;
            }
            Format::Human => writeln!(
                self.out,
                "{} stopped: {} events, {} lost (ring buffer full), {} filtered in the kernel",
                rfc3339(now),
                stats.emitted,
                stats.lost,
                stats.filtered
            )?,
        }
        self.out.flush()
    }
}

fn human(obs: &Observation) -> String {
    let conn = |kind: &str, c: &ConnEvent| {
        let mut line = format!("{} {kind:<14} {} -> {}", rfc3339(c.time), c.src, c.dst);
        if let Some(close) = c.close {
            line.push_str(&format!(" close={}", serde_plain(&close)));
        }
        if let Some(reason) = &c.reason {
            line.push_str(&format!(" reason={reason}"));
        }
        line
    };
    let rules = |kind: &str, r: &RulesChange| {
        format!(
            "{} {kind:<14} {} detector={} precision={}us",
            rfc3339(r.time),
            r.endpoint,
            r.detector,
            r.precision_ns / 1_000
        )
    };
    let kind = obs.kind_name();
    match obs {
        Observation::Accepted(c)
        | Observation::Connected(c)
        | Observation::Closed(c)
        | Observation::ResetSent(c)
        | Observation::ResetReceived(c) => conn(kind, c),
        Observation::RulesRemoved(r)
        | Observation::RulesAdded(r)
        | Observation::RemovedBeforeStart(r) => rules(kind, r),
        Observation::NewFlow(f) => format!(
            "{} {kind:<14} {} -> {} (to {})",
            rfc3339(f.time),
            f.src,
            f.dst,
            f.original_dst
        ),
    }
}

/// A unit enum's serde name (`endpoint_fin`), for the human format.
fn serde_plain<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub fn rfc3339(time: UnixNanos) -> String {
    humantime::format_rfc3339_nanos(SystemTime::from(time)).to_string()
}

#[cfg(test)]
mod tests {
    use observer_proto::{CloseKind, Detector, NewFlow};

    use super::*;

    fn closed() -> Observation {
        Observation::Closed(ConnEvent {
            src: "10.0.0.2:40000".parse().unwrap(),
            dst: "10.0.0.1:80".parse().unwrap(),
            time: UnixNanos::from_nanos(1_700_000_000_123_456_789),
            close: Some(CloseKind::EndpointFin),
            reason: None,
        })
    }

    #[test]
    fn json_lines_have_the_documented_fields() {
        let mut out = Vec::new();
        Printer::new(Format::Json, &mut out)
            .observation(&closed())
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["kind"], "closed");
        assert_eq!(v["src"], "10.0.0.2:40000");
        assert_eq!(v["dst"], "10.0.0.1:80");
        assert_eq!(v["time_unix_nano"], 1_700_000_000_123_456_789u64);
        assert_eq!(v["close"], "endpoint_fin");
        assert!(v.get("reason").is_none());
    }

    #[test]
    fn human_lines_read_well() {
        let mut out = Vec::new();
        Printer::new(Format::Human, &mut out)
            .observation(&closed())
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2023-11-14T22:13:20.123456789Z closed         10.0.0.2:40000 -> 10.0.0.1:80 close=endpoint_fin\n"
        );
        let time = UnixNanos::from_nanos(1_700_000_002_000_000_000);
        let mut out = Vec::new();
        let mut printer = Printer::new(Format::Human, &mut out);
        printer
            .observation(&Observation::RulesRemoved(RulesChange {
                endpoint: "10.180.0.2:8080".parse().unwrap(),
                detector: Detector::IptablesNft,
                time,
                precision_ns: 1_500_000,
            }))
            .unwrap();
        printer
            .observation(&Observation::NewFlow(NewFlow {
                src: "10.244.1.5:40000".parse().unwrap(),
                dst: "10.180.0.2:8080".parse().unwrap(),
                original_dst: "172.30.0.10:80".parse().unwrap(),
                time,
            }))
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2023-11-14T22:13:22.000000000Z rules_removed  10.180.0.2:8080 detector=iptables_nft precision=1500us\n\
             2023-11-14T22:13:22.000000000Z new_flow       10.244.1.5:40000 -> 10.180.0.2:8080 (to 172.30.0.10:80)\n"
        );
    }
}
