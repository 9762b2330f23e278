//! Connection events from the `CONN_EVENTS` ring buffer, decoded into
//! [`Observation`]s with wall-clock times.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use observer_common::{CloseHow, ConnEvent, ConnEventKind, conn::RESET_REASON_UNKNOWN};
use observer_proto::{CloseKind, Observation};
use thiserror::Error;
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::conn_ring::ConnRing;
use crate::clock::WallClock;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConnEventDecodeError {
    #[error("connection event of {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("ring record of {got} bytes, not a whole number of {event}-byte events")]
    Record { got: usize, event: usize },
    #[error("unknown connection event kind {0}")]
    Kind(u8),
    #[error("unknown close kind {0}")]
    Close(u8),
}

/// Turns raw ring buffer records into observations.
pub struct ConnDecoder {
    clock: WallClock,
    reset_reasons: HashMap<u32, String>,
}

impl ConnDecoder {
    pub fn new(clock: WallClock, reset_reasons: HashMap<u32, String>) -> Self {
        ConnDecoder {
            clock,
            reset_reasons,
        }
    }

    /// The events of one ring record (a CPU's batch, or a single event).
    pub fn decode_record<'a>(
        &'a mut self,
        record: &'a [u8],
    ) -> Result<
        impl Iterator<Item = Result<Observation, ConnEventDecodeError>> + 'a,
        ConnEventDecodeError,
    > {
        let event = std::mem::size_of::<ConnEvent>();
        if record.is_empty() || !record.len().is_multiple_of(event) {
            return Err(ConnEventDecodeError::Record {
                got: record.len(),
                event,
            });
        }
        Ok(record.chunks_exact(event).map(|e| self.decode(e)))
    }

    pub fn decode(&mut self, bytes: &[u8]) -> Result<Observation, ConnEventDecodeError> {
        let expected = std::mem::size_of::<ConnEvent>();
        if bytes.len() < expected {
            return Err(ConnEventDecodeError::Size {
                got: bytes.len(),
                expected,
            });
        }
        // SAFETY: ConnEvent is plain old data and `bytes` holds at least one;
        // ring buffer records are only 8-byte aligned, hence unaligned.
        let event: ConnEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind =
            ConnEventKind::from_u8(event.kind).ok_or(ConnEventDecodeError::Kind(event.kind))?;
        let close = match CloseHow::from_u8(event.close_how)
            .ok_or(ConnEventDecodeError::Close(event.close_how))?
        {
            CloseHow::None => None,
            CloseHow::EndpointFin => Some(CloseKind::EndpointFin),
            CloseHow::PeerFin => Some(CloseKind::PeerFin),
            CloseHow::Reset => Some(CloseKind::Reset),
        };
        let reason = (kind == ConnEventKind::ResetSent && event.reason != RESET_REASON_UNKNOWN)
            .then(|| {
                self.reset_reasons
                    .get(&event.reason)
                    .cloned()
                    .unwrap_or_else(|| format!("reason_{}", event.reason))
            });
        let conn = observer_proto::ConnEvent {
            src: SocketAddr::new(ip_from_key(event.peer_addr), event.peer_port),
            dst: SocketAddr::new(ip_from_key(event.endpoint_addr), event.endpoint_port),
            time: self.clock.to_unix_nanos(event.ktime_ns),
            close,
            reason,
        };
        Ok(match kind {
            ConnEventKind::Accepted => Observation::Accepted(conn),
            ConnEventKind::Connected => Observation::Connected(conn),
            ConnEventKind::Closed => Observation::Closed(conn),
            ConnEventKind::ResetSent => Observation::ResetSent(conn),
            ConnEventKind::ResetReceived => Observation::ResetReceived(conn),
        })
    }
}

/// IPv4-mapped addresses become IPv4.
pub fn ip_from_key(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// Reads the ring buffer until `tx` closes, sending every decoded event.
/// Undecodable records and failed flushes are logged and counted, never
/// fatal.
pub async fn forward(
    ring: ConnRing,
    mut decoder: ConnDecoder,
    tx: mpsc::Sender<Observation>,
) -> std::io::Result<()> {
    // SAFETY: the ring owns its map fd and keeps it open until dropped,
    // which happens only with the AsyncFd.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut undecodable: u64 = 0;
    let mut failed_flushes: u64 = 0;
    // The programs wake this reader only when the unread bytes pass a mark
    // (a wakeup per event would cost more than the event), once per pass:
    // drain it on a timer too, every DRAIN_INTERVAL while events come and
    // backing off to DRAIN_IDLE_INTERVAL while none do (an idle agent then
    // wakes 5 times a second, not 100).
    let mut pause = DRAIN_INTERVAL;
    loop {
        tokio::select! {
            ready = fd.readable() => ready?.clear_ready(),
            () = tokio::time::sleep(pause) => {}
        }
        let ring = fd.get_mut();
        let flushed = match ring.flush_batches() {
            Ok(cpus) => cpus,
            Err(e) => {
                // The events stay queued for the next flush.
                failed_flushes += 1;
                tracing::warn!(error = %e, failed_flushes, "could not flush the per-CPU event batches");
                0
            }
        };
        let mut records = 0;
        while let Some(record) = ring.next_record() {
            records += 1;
            let events: Vec<_> = match decoder.decode_record(&record) {
                Ok(events) => events.collect(),
                Err(e) => vec![Err(e)],
            };
            drop(record);
            for event in events {
                match event {
                    Ok(observation) => {
                        if tx.send(observation).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        undecodable += 1;
                        tracing::warn!(error = %e, undecodable, "dropped an undecodable connection event");
                    }
                }
            }
        }
        pause = next_pause(pause, flushed > 0 || records > 0);
    }
}

/// Longest time an event waits in the ring buffer before the agent reads it
/// while events come. Event times come from the kernel, so this delays
/// reporting, not accuracy.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// The same after a quiet spell: the first event after it waits up to this
/// long, about one report flush (`report::ReportConfig::flush_interval`).
pub const DRAIN_IDLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// The pause before the next drain: short again as soon as one found
/// something, doubling up to [`DRAIN_IDLE_INTERVAL`] while they find nothing.
fn next_pause(pause: std::time::Duration, found: bool) -> std::time::Duration {
    if found {
        DRAIN_INTERVAL
    } else {
        (pause * 2).min(DRAIN_IDLE_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use observer_common::WatchKey;

    use super::*;

    #[test]
    fn the_drain_backs_off_while_idle_and_returns_at_the_first_event() {
        let mut pause = DRAIN_INTERVAL;
        let mut pauses = vec![];
        for _ in 0..6 {
            pause = next_pause(pause, false);
            pauses.push(pause.as_millis());
        }
        assert_eq!(pauses, [20, 40, 80, 160, 200, 200]);
        assert_eq!(next_pause(pause, true), DRAIN_INTERVAL);
    }

    fn raw(event: &ConnEvent) -> Vec<u8> {
        // SAFETY: ConnEvent is repr(C) plain old data.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const ConnEvent).cast::<u8>(),
                std::mem::size_of::<ConnEvent>(),
            )
        }
        .to_vec()
    }

    fn event(kind: ConnEventKind, close: CloseHow, reason: u32) -> ConnEvent {
        ConnEvent {
            ktime_ns: 1_000,
            endpoint_addr: WatchKey::from_v4([10, 0, 0, 1]).addr,
            peer_addr: WatchKey::from_v4([10, 0, 0, 2]).addr,
            endpoint_port: 8080,
            peer_port: 40000,
            kind: kind as u8,
            close_how: close as u8,
            old_state: 1,
            new_state: 7,
            reason,
            _pad: 0,
        }
    }

    fn decoder() -> ConnDecoder {
        ConnDecoder::new(
            WallClock::new(),
            HashMap::from([(1, "no_socket".to_owned())]),
        )
    }

    #[test]
    fn decodes_a_refused_connection() {
        let obs = decoder()
            .decode(&raw(&event(ConnEventKind::ResetSent, CloseHow::None, 1)))
            .unwrap();
        let Observation::ResetSent(conn) = obs else {
            panic!("wrong kind: {obs:?}")
        };
        assert_eq!(conn.dst, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(conn.src, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(conn.reason.as_deref(), Some("no_socket"));
        let json = serde_json::to_value(Observation::ResetSent(conn)).unwrap();
        assert_eq!(json["kind"], "reset_sent");
        assert_eq!(json["dst"], "10.0.0.1:8080");
        assert_eq!(json["reason"], "no_socket");
        assert!(json["time_unix_nano"].as_u64().unwrap() > 1_600_000_000_000_000_000);
    }

    #[test]
    fn unknown_reason_values_keep_their_number() {
        let obs = decoder()
            .decode(&raw(&event(ConnEventKind::ResetSent, CloseHow::None, 99)))
            .unwrap();
        let Observation::ResetSent(conn) = obs else {
            panic!()
        };
        assert_eq!(conn.reason.as_deref(), Some("reason_99"));
    }

    #[test]
    fn close_kinds() {
        let obs = decoder()
            .decode(&raw(&event(
                ConnEventKind::Closed,
                CloseHow::Reset,
                RESET_REASON_UNKNOWN,
            )))
            .unwrap();
        let Observation::Closed(conn) = obs else {
            panic!()
        };
        assert_eq!(conn.close, Some(CloseKind::Reset));
        assert_eq!(conn.reason, None);
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let mut d = decoder();
        assert_eq!(
            d.decode(&[0u8; 8]),
            Err(ConnEventDecodeError::Size {
                got: 8,
                expected: 56
            })
        );
        let mut bad = event(ConnEventKind::Accepted, CloseHow::None, 0);
        bad.kind = 42;
        assert_eq!(d.decode(&raw(&bad)), Err(ConnEventDecodeError::Kind(42)));
        bad.kind = ConnEventKind::Closed as u8;
        bad.close_how = 9;
        assert_eq!(d.decode(&raw(&bad)), Err(ConnEventDecodeError::Close(9)));
    }

    #[test]
    fn a_batch_record_holds_its_events_back_to_back() {
        let mut d = decoder();
        let mut record = raw(&event(ConnEventKind::Accepted, CloseHow::None, 0));
        record.extend(raw(&event(ConnEventKind::Closed, CloseHow::PeerFin, 0)));
        record.extend(raw(&event(ConnEventKind::ResetSent, CloseHow::None, 1)));
        let kinds: Vec<&str> = d
            .decode_record(&record)
            .unwrap()
            .map(|o| match o.unwrap() {
                Observation::Accepted(_) => "accepted",
                Observation::Closed(_) => "closed",
                Observation::ResetSent(_) => "reset_sent",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["accepted", "closed", "reset_sent"]);

        // A bad event spoils only itself.
        let mut bad = event(ConnEventKind::Accepted, CloseHow::None, 0);
        bad.kind = 42;
        record.extend(raw(&bad));
        let results: Vec<_> = d.decode_record(&record).unwrap().collect();
        assert_eq!(results.len(), 4);
        assert!(results[..3].iter().all(Result::is_ok));
        assert_eq!(results[3], Err(ConnEventDecodeError::Kind(42)));
    }

    #[test]
    fn records_that_are_not_whole_events_are_rejected() {
        let mut d = decoder();
        for len in [0, 55, 57, 111] {
            assert_eq!(
                d.decode_record(&vec![0u8; len]).err(),
                Some(ConnEventDecodeError::Record {
                    got: len,
                    event: 56
                }),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        assert_eq!(
            ip_from_key(WatchKey::from_v4([1, 2, 3, 4]).addr),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(ip_from_key(v6.octets()), IpAddr::V6(v6));
    }
}
