//! Tracepoint formats from tracefs: field offsets and symbolic value names
//! of the running kernel, which the eBPF programs need because they get no
//! CO-RE relocations.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use observer_common::{
    TcpSendResetAddrs, TracepointLayout,
    layout::{ABSENT, DIRECT_RECV_RESET, DIRECT_SEND_RESET, DIRECT_SET_STATE, RECORD_MAX},
};
use thiserror::Error;

const MOUNT_POINTS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted at {MOUNT_POINTS:?} and mounting it at /sys/kernel/tracing failed: {0} (mount it, or give the agent CAP_SYS_ADMIN once)"
    )]
    NotMounted(nix::Error),
    #[error("cannot read tracepoint format {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {event} has no field {field} on this kernel")]
    MissingField { event: String, field: &'static str },
    #[error(
        "tracepoint {event}: its record is {size} bytes, more than the {max} the programs copy"
    )]
    RecordTooLarge {
        event: String,
        size: usize,
        max: u16,
    },
    #[error(
        "tracepoint {event}: field {field} has offset {offset}, beyond what the programs can address"
    )]
    OffsetTooLarge {
        event: String,
        field: &'static str,
        offset: usize,
    },
}

/// A tracefs mount.
#[derive(Clone, Debug)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs, mounting it at /sys/kernel/tracing when it is not mounted
    /// (minimal hosts and some container runtimes leave it unmounted).
    pub fn find_or_mount() -> Result<Self, TracefsError> {
        if let Some(found) = Self::find() {
            return Ok(found);
        }
        let target = Path::new(MOUNT_POINTS[0]);
        nix::mount::mount(
            Some("tracefs"),
            target,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(TracefsError::NotMounted)?;
        tracing::info!(path = %target.display(), "mounted tracefs");
        Ok(Tracefs {
            root: target.to_path_buf(),
        })
    }

    pub fn find() -> Option<Self> {
        MOUNT_POINTS
            .iter()
            .map(Path::new)
            .find(|p| p.join("events").is_dir())
            .map(|p| Tracefs {
                root: p.to_path_buf(),
            })
    }

    fn event_dir(&self, category: &str, name: &str) -> PathBuf {
        self.root.join("events").join(category).join(name)
    }

    pub fn event_exists(&self, category: &str, name: &str) -> bool {
        self.event_dir(category, name).is_dir()
    }

    /// The tracepoint's id, which `perf_event_open` takes.
    pub fn event_id(&self, category: &str, name: &str) -> Result<u64, TracefsError> {
        let path = self.event_dir(category, name).join("id");
        let read = |path: &Path| -> std::io::Result<u64> {
            std::fs::read_to_string(path)?
                .trim()
                .parse()
                .map_err(std::io::Error::other)
        };
        read(&path).map_err(|source| TracefsError::Read { path, source })
    }

    pub fn format(&self, category: &str, name: &str) -> Result<EventFormat, TracefsError> {
        let path = self.event_dir(category, name).join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(EventFormat::parse(&format!("{category}/{name}"), &text))
    }
}

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

/// The parsed `format` file of one tracepoint.
#[derive(Clone, Debug, Default)]
pub struct EventFormat {
    pub event: String,
    pub fields: HashMap<String, Field>,
    print_fmt: String,
}

impl EventFormat {
    pub fn parse(event: &str, text: &str) -> Self {
        let mut fields = HashMap::new();
        let mut print_fmt = String::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("print fmt:") {
                print_fmt = rest.to_owned();
                continue;
            }
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut parts = rest.split(';').map(str::trim);
            let (Some(decl), Some(offset), Some(size)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            // `__u8 saddr[28]` -> `saddr`
            let Some(name) = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .map(|n| n.split('[').next().unwrap_or(n))
            else {
                continue;
            };
            let number = |s: &str, key: &str| s.strip_prefix(key).and_then(|v| v.parse().ok());
            if let (Some(offset), Some(size)) = (number(offset, "offset:"), number(size, "size:")) {
                fields.insert(name.to_owned(), Field { offset, size });
            }
        }
        EventFormat {
            event: event.to_owned(),
            fields,
            print_fmt,
        }
    }

    pub fn field(&self, name: &'static str) -> Result<Field, TracefsError> {
        self.fields
            .get(name)
            .copied()
            .ok_or_else(|| TracefsError::MissingField {
                event: self.event.clone(),
                field: name,
            })
    }

    fn offset(&self, name: &'static str) -> Result<u16, TracefsError> {
        let field = self.field(name)?;
        u16::try_from(field.offset)
            .ok()
            .filter(|o| *o != ABSENT)
            .ok_or_else(|| TracefsError::OffsetTooLarge {
                event: self.event.clone(),
                field: name,
                offset: field.offset,
            })
    }

    fn optional_offset(&self, name: &'static str) -> Result<u16, TracefsError> {
        if self.fields.contains_key(name) {
            self.offset(name)
        } else {
            Ok(ABSENT)
        }
    }

    /// Size of the record: the end of its last field.
    fn record_size(&self) -> Result<u16, TracefsError> {
        let size = self
            .fields
            .values()
            .map(|f| f.offset + f.size)
            .max()
            .unwrap_or(0);
        u16::try_from(size)
            .ok()
            .filter(|s| *s <= RECORD_MAX)
            .ok_or_else(|| TracefsError::RecordTooLarge {
                event: self.event.clone(),
                size,
                max: RECORD_MAX,
            })
    }

    /// The value names of `__print_symbolic(REC->field, { 0, "NAME" }, ...)` in
    /// the print format, e.g. the kernel's `sk_rst_reason` names.
    pub fn symbols(&self, field: &str) -> HashMap<u32, String> {
        let marker = format!("__print_symbolic(REC->{field},");
        let Some(start) = self.print_fmt.find(&marker) else {
            return HashMap::new();
        };
        let body = &self.print_fmt[start + marker.len()..];
        let end = body.find(')').unwrap_or(body.len());
        body[..end]
            .split('{')
            .filter_map(|pair| {
                let pair = pair
                    .trim()
                    .trim_end_matches(',')
                    .trim()
                    .trim_end_matches('}');
                let (value, name) = pair.split_once(',')?;
                let value = value.trim().parse::<u32>().ok()?;
                let name = name.trim().trim_matches('"');
                Some((value, name.to_ascii_lowercase()))
            })
            .collect()
    }
}

/// A tracepoint a connection program attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTracepoint {
    pub category: &'static str,
    pub name: &'static str,
    /// The program's name in the eBPF object.
    pub program: &'static str,
    /// The program's bit in [`TracepointLayout::direct`], set when this
    /// kernel's record layout is the one compiled in.
    pub direct_bit: u8,
}

/// The tracepoints of the connection programs, in the order
/// [`conn_layout`] takes their formats.
pub const CONN_TRACEPOINTS: [ConnTracepoint; 3] = [
    ConnTracepoint {
        category: "sock",
        name: "inet_sock_set_state",
        program: "inet_sock_set_state",
        direct_bit: DIRECT_SET_STATE,
    },
    ConnTracepoint {
        category: "tcp",
        name: "tcp_send_reset",
        program: "tcp_send_reset",
        direct_bit: DIRECT_SEND_RESET,
    },
    ConnTracepoint {
        category: "tcp",
        name: "tcp_receive_reset",
        program: "tcp_receive_reset",
        direct_bit: DIRECT_RECV_RESET,
    },
];

/// Builds the layout the programs read from the tracepoint formats. A reset
/// tracepoint this kernel lacks keeps the default offsets: its program is not
/// attached, so they are never used.
pub fn conn_layout(
    set_state: &EventFormat,
    send_reset: Option<&EventFormat>,
    receive_reset: Option<&EventFormat>,
) -> Result<TracepointLayout, TracefsError> {
    let mut layout = TracepointLayout {
        set_state_oldstate: set_state.offset("oldstate")?,
        set_state_newstate: set_state.offset("newstate")?,
        set_state_sport: set_state.offset("sport")?,
        set_state_dport: set_state.offset("dport")?,
        set_state_protocol: set_state.offset("protocol")?,
        set_state_saddr_v6: set_state.offset("saddr_v6")?,
        set_state_daddr_v6: set_state.offset("daddr_v6")?,
        set_state_size: set_state.record_size()?,
        ..TracepointLayout::DEFAULT
    };
    if let Some(f) = send_reset {
        read_send_reset(&mut layout, f)?;
    }
    if let Some(f) = receive_reset {
        layout.recv_reset_size = f.record_size()?;
        layout.recv_reset_sport = f.offset("sport")?;
        layout.recv_reset_dport = f.offset("dport")?;
        layout.recv_reset_saddr_v6 = f.offset("saddr_v6")?;
        layout.recv_reset_daddr_v6 = f.offset("daddr_v6")?;
    }
    layout.direct |= compiled_in_records(&layout, send_reset.is_some(), receive_reset.is_some());
    Ok(layout)
}

/// The `tcp/tcp_send_reset` fields: since 6.10 the addresses are a
/// sockaddr_in/sockaddr_in6 each, before that IPv6 fields and ports.
fn read_send_reset(layout: &mut TracepointLayout, f: &EventFormat) -> Result<(), TracefsError> {
    layout.send_reset_size = f.record_size()?;
    layout.send_reset_state = f.offset("state")?;
    layout.send_reset_reason = f.optional_offset("reason")?;
    if f.fields.get("saddr").is_some_and(|field| field.size >= 16) {
        layout.send_reset_addrs = TcpSendResetAddrs::Sockaddr as u8;
        layout.send_reset_saddr = f.offset("saddr")?;
        layout.send_reset_daddr = f.offset("daddr")?;
        layout.send_reset_sport = ABSENT;
        layout.send_reset_dport = ABSENT;
    } else {
        layout.send_reset_addrs = TcpSendResetAddrs::V6Fields as u8;
        layout.send_reset_saddr = f.offset("saddr_v6")?;
        layout.send_reset_daddr = f.offset("daddr_v6")?;
        layout.send_reset_sport = f.offset("sport")?;
        layout.send_reset_dport = f.offset("dport")?;
    }
    Ok(())
}

/// The `DIRECT_*` bits of the tracepoints (those present) whose fields sit
/// where the programs were compiled to read them in place.
fn compiled_in_records(layout: &TracepointLayout, send_reset: bool, receive_reset: bool) -> u8 {
    let d = TracepointLayout::DEFAULT;
    let mut direct = 0;
    if (
        layout.set_state_oldstate,
        layout.set_state_newstate,
        layout.set_state_sport,
        layout.set_state_dport,
        layout.set_state_protocol,
        layout.set_state_saddr_v6,
        layout.set_state_daddr_v6,
    ) == (
        d.set_state_oldstate,
        d.set_state_newstate,
        d.set_state_sport,
        d.set_state_dport,
        d.set_state_protocol,
        d.set_state_saddr_v6,
        d.set_state_daddr_v6,
    ) {
        direct |= DIRECT_SET_STATE;
    }
    if send_reset
        && (
            layout.send_reset_addrs,
            layout.send_reset_state,
            layout.send_reset_reason,
            layout.send_reset_saddr,
            layout.send_reset_daddr,
        ) == (
            d.send_reset_addrs,
            d.send_reset_state,
            d.send_reset_reason,
            d.send_reset_saddr,
            d.send_reset_daddr,
        )
    {
        direct |= DIRECT_SEND_RESET;
    }
    if receive_reset
        && (
            layout.recv_reset_sport,
            layout.recv_reset_dport,
            layout.recv_reset_saddr_v6,
            layout.recv_reset_daddr_v6,
        ) == (
            d.recv_reset_sport,
            d.recv_reset_dport,
            d.recv_reset_saddr_v6,
            d.recv_reset_daddr_v6,
        )
    {
        direct |= DIRECT_RECV_RESET;
    }
    direct
}

#[cfg(test)]
mod tests {
    use super::*;

    // Formats as printed by kernel 6.18 (trimmed print fmt).
    const SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\", REC->family
";
    const SEND_RESET_610: &str = "name: tcp_send_reset
format:
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;
\tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;

print fmt: \"state=%s reason=%s\", REC->state ? __print_symbolic(REC->state, { TCP_ESTABLISHED, \"TCP_ESTABLISHED\" }) : \"UNKNOWN\", __print_symbolic(REC->reason, { 0, \"NOT_SPECIFIED\" }, { 1, \"NO_SOCKET\" }, { 11, \"TCP_ABORT_ON_CLOSE\" }, { 12, \"TCP_ABORT_ON_LINGER\" })
";
    // Before 6.10: no reason, separate v4/v6 fields.
    const SEND_RESET_OLD: &str = "name: tcp_send_reset
format:
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;
";
    const RECEIVE_RESET: &str = "name: tcp_receive_reset
format:
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 sport;\toffset:16;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:18;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:20;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:22;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:26;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:30;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:46;\tsize:16;\tsigned:0;
\tfield:__u64 sock_cookie;\toffset:64;\tsize:8;\tsigned:0;
";

    fn layout(send_reset: &str) -> Result<TracepointLayout, TracefsError> {
        conn_layout(
            &EventFormat::parse("sock/inet_sock_set_state", SET_STATE),
            Some(&EventFormat::parse("tcp/tcp_send_reset", send_reset)),
            Some(&EventFormat::parse("tcp/tcp_receive_reset", RECEIVE_RESET)),
        )
    }

    #[test]
    fn parses_fields_with_arrays_and_pointers() {
        let f = EventFormat::parse("sock/inet_sock_set_state", SET_STATE);
        assert_eq!(f.field("skaddr").unwrap(), Field { offset: 8, size: 8 });
        assert_eq!(
            f.field("saddr_v6").unwrap(),
            Field {
                offset: 40,
                size: 16
            }
        );
        assert!(matches!(
            f.field("reason"),
            Err(TracefsError::MissingField {
                field: "reason",
                ..
            })
        ));
    }

    #[test]
    fn layout_of_kernel_6_10_and_later_is_read_directly() {
        let layout = layout(SEND_RESET_610).unwrap();
        assert_eq!(
            layout.direct,
            DIRECT_SET_STATE | DIRECT_SEND_RESET | DIRECT_RECV_RESET
        );
        assert_eq!(
            TracepointLayout {
                direct: 0,
                ..layout
            },
            TracepointLayout::DEFAULT
        );
    }

    #[test]
    fn layout_of_older_kernels_uses_v6_fields_and_no_reason() {
        let layout = layout(SEND_RESET_OLD).unwrap();
        assert_eq!(layout.send_reset_addrs, TcpSendResetAddrs::V6Fields as u8);
        assert_eq!(layout.send_reset_reason, ABSENT);
        assert_eq!(layout.send_reset_saddr, 40);
        assert_eq!(layout.send_reset_sport, 28);
        assert_eq!(layout.send_reset_size, 72);
        // Only the reset record differs from the default: the others stay direct.
        assert_eq!(layout.direct, DIRECT_SET_STATE | DIRECT_RECV_RESET);
    }

    #[test]
    fn missing_field_is_a_clear_error() {
        let broken = EventFormat::parse("sock/inet_sock_set_state", "format:\n");
        let err = conn_layout(&broken, None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracepoint sock/inet_sock_set_state has no field oldstate on this kernel"
        );
    }

    #[test]
    fn missing_reset_tracepoints_keep_default_offsets() {
        let set_state = EventFormat::parse("sock/inet_sock_set_state", SET_STATE);
        let layout = conn_layout(&set_state, None, None).unwrap();
        assert_eq!(layout.direct, DIRECT_SET_STATE);
        assert_eq!(
            TracepointLayout {
                direct: 0,
                ..layout
            },
            TracepointLayout::DEFAULT
        );
    }

    #[test]
    fn reads_reset_reason_names_from_print_fmt() {
        let f = EventFormat::parse("tcp/tcp_send_reset", SEND_RESET_610);
        let names = f.symbols("reason");
        assert_eq!(names.get(&1).map(String::as_str), Some("no_socket"));
        assert_eq!(
            names.get(&12).map(String::as_str),
            Some("tcp_abort_on_linger")
        );
        assert_eq!(names.len(), 4);
    }
}
