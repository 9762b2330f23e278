//! Printing observations for people (default) or scripts (`--output json`,
//! one JSON object per line).

use std::{
    io::{self, Write},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::ValueEnum;
use serde::Serialize;

use crate::{
    endpoint_record::EndpointRecord,
    kernel::{HookStatus, Stats},
    observation::{ConnObservation, Observation, RulesChange, UnixNanos},
};

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

    /// One watched endpoint's record (printed when `observe` stops): JSON
    /// `kind: endpoint_record` with the record's fields.
    pub fn endpoint_record(&mut self, record: &EndpointRecord) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let mut line = serde_json::to_value(record).map_err(io::Error::other)?;
                if let Some(fields) = line.as_object_mut() {
                    fields.insert("kind".into(), "endpoint_record".into());
                }
                writeln!(self.out, "{line}")?;
            }
            Format::Human => writeln!(self.out, "{}", human_record(record))?,
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
    let conn = |kind: &str, c: &ConnObservation| {
        let mut line = format!(
            "{} {kind:<14} {} -> {}",
            rfc3339(c.time_unix_nano),
            c.src,
            c.dst
        );
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
            rfc3339(r.time_unix_nano),
            r.endpoint,
            serde_plain(&r.detector),
            r.precision_ns / 1_000
        )
    };
    match obs {
        Observation::Accepted(c) => conn("accepted", c),
        Observation::Connected(c) => conn("connected", c),
        Observation::Closed(c) => conn("closed", c),
        Observation::ResetSent(c) => conn("reset_sent", c),
        Observation::ResetReceived(c) => conn("reset_received", c),
        Observation::RulesRemoved(r) => rules("rules_removed", r),
        Observation::RulesAdded(r) => rules("rules_added", r),
        Observation::NewFlow(f) => format!(
            "{} {:<14} {} -> {} (to {})",
            rfc3339(f.time_unix_nano),
            "new_flow",
            f.src,
            f.dst,
            f.original_dst
        ),
    }
}

fn human_record(r: &EndpointRecord) -> String {
    let time = |t: Option<UnixNanos>| t.map_or_else(|| "-".to_owned(), rfc3339);
    let mut line = format!(
        "endpoint_record {} first_seen_in_rules={}{} rules_removed={}",
        r.endpoint,
        time(r.first_seen_in_rules_unix_nano),
        if r.in_rules_at_agent_start {
            " (already at agent start)"
        } else {
            ""
        },
        time(r.rules_removed_unix_nano),
    );
    if let (Some(detector), Some(precision)) =
        (&r.rules_removed_detector, r.rules_removed_precision_ns)
    {
        line.push_str(&format!(
            " ({} precision={}us)",
            serde_plain(detector),
            precision / 1_000
        ));
    }
    line.push_str(&format!(
        " late_flows={} since {} last_new_flow={}",
        r.late_flows,
        rfc3339(r.deletion_started_unix_nano),
        time(r.last_new_flow_unix_nano),
    ));
    if let Some(src) = r.last_new_flow_src {
        line.push_str(&format!(" from {src}"));
    }
    if !r.late_sources.is_empty() {
        let sources: Vec<String> = r
            .late_sources
            .iter()
            .map(|(ip, n)| format!("{ip}={n}"))
            .collect();
        line.push_str(&format!(" sources: {}", sources.join(",")));
    }
    line
}

/// A unit enum's serde name (`endpoint_fin`), for the human format.
fn serde_plain<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub fn rfc3339(unix_nanos: UnixNanos) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(unix_nanos)).to_string()
}

pub fn now_unix_nanos() -> UnixNanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as UnixNanos)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::CloseKind;

    fn closed() -> Observation {
        Observation::Closed(ConnObservation {
            src: "10.0.0.2:40000".parse().unwrap(),
            dst: "10.0.0.1:80".parse().unwrap(),
            time_unix_nano: 1_700_000_000_123_456_789,
            close: Some(CloseKind::EndpointFin),
            reason: None,
            old_state: Some("established"),
            new_state: Some("fin_wait1"),
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

    fn record() -> EndpointRecord {
        use crate::{dataplane::RulesPresence, endpoint_record::EndpointRecords};
        let ep = "10.180.0.2:8080".parse().unwrap();
        let mut records = EndpointRecords::new();
        let presence = RulesPresence {
            first_seen_unix_nano: 1_700_000_000_000_000_000,
            at_start: true,
            selected: true,
        };
        records.watch(ep, 1_700_000_001_000_000_000, Some(presence));
        records.observe(&Observation::NewFlow(crate::observation::NewFlow {
            src: "10.244.1.5:40000".parse().unwrap(),
            dst: ep,
            original_dst: "172.30.0.10:80".parse().unwrap(),
            time_unix_nano: 1_700_000_001_500_000_000,
        }));
        records.observe(&Observation::RulesRemoved(RulesChange {
            endpoint: ep,
            detector: crate::observation::Detector::Nftables,
            time_unix_nano: 1_700_000_002_000_000_000,
            precision_ns: 1_000_000,
        }));
        records.get(&ep).unwrap().clone()
    }

    #[test]
    fn endpoint_records_print_as_one_line() {
        let mut out = Vec::new();
        Printer::new(Format::Json, &mut out)
            .endpoint_record(&record())
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["kind"], "endpoint_record");
        assert_eq!(v["endpoint"], "10.180.0.2:8080");
        assert_eq!(
            v["first_seen_in_rules_unix_nano"],
            1_700_000_000_000_000_000u64
        );
        assert_eq!(v["rules_removed_unix_nano"], 1_700_000_002_000_000_000u64);
        assert_eq!(v["late_flows"], 1);

        let mut out = Vec::new();
        Printer::new(Format::Human, &mut out)
            .endpoint_record(&record())
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "endpoint_record 10.180.0.2:8080 first_seen_in_rules=2023-11-14T22:13:20.000000000Z (already at agent start) \
             rules_removed=2023-11-14T22:13:22.000000000Z (nftables precision=1000us) late_flows=1 since 2023-11-14T22:13:21.000000000Z \
             last_new_flow=2023-11-14T22:13:21.500000000Z from 10.244.1.5:40000 sources: 10.244.1.5=1\n"
        );
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
    }
}
