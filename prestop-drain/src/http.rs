//! Just enough HTTP/1.1 for one GET to the aggregator: a plain TCP
//! connection with a deadline, `Connection: close`, the answer read to its
//! end (Content-Length, chunked, or end of stream). No TLS: the
//! aggregator's HTTP API is plain HTTP inside the cluster, and a static
//! binary without a TLS stack stays small.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Largest answer read (a drain answer is under 2 KiB).
const MAX_RESPONSE: usize = 1 << 20;

/// `http://host[:port][/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl {
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (`""` at the root).
    pub prefix: String,
}

impl std::str::FromStr for BaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            format!("{s:?}: only http:// URLs (the aggregator's HTTP API is plain HTTP)")
        })?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal's colons sit inside brackets.
            Some((h, p)) if !p.contains(']') => (
                h,
                p.parse()
                    .map_err(|_| format!("{s:?}: port {p:?} is not a number"))?,
            ),
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// GETs `path_and_query` below `base` with a bearer token; the connection
/// must be made within `connect` and the whole answer arrive by `deadline`.
pub fn get(
    base: &BaseUrl,
    path_and_query: &str,
    token: &str,
    connect: Duration,
    deadline: Instant,
) -> Result<Response> {
    let mut stream = connect_any(base, connect)?;
    // An IPv6 literal goes back into its brackets.
    let host = if base.host.contains(':') {
        format!("[{}]", base.host)
    } else {
        base.host.clone()
    };
    let request = format!(
        "GET {}{path_and_query} HTTP/1.1\r\nHost: {host}:{}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\nUser-Agent: prestop-drain/{}\r\nConnection: close\r\n\r\n",
        base.prefix,
        base.port,
        env!("CARGO_PKG_VERSION")
    );
    stream
        .set_write_timeout(Some(connect))
        .context("setting the write timeout")?;
    stream
        .write_all(request.as_bytes())
        .context("sending the request")?;
    let raw = read_all(&mut stream, deadline)?;
    parse(&raw)
}

fn connect_any(base: &BaseUrl, timeout: Duration) -> Result<TcpStream> {
    let addrs: Vec<_> = (base.host.as_str(), base.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", base.host))?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some((addr, e)),
        }
    }
    match last {
        Some((addr, e)) => Err(e).with_context(|| format!("connecting to {addr}")),
        None => bail!("{} resolves to no address", base.host),
    }
}

fn read_all(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no complete answer by the deadline");
        }
        stream
            .set_read_timeout(Some(left))
            .context("setting the read timeout")?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no complete answer by the deadline")
            }
            Err(e) => return Err(e).context("reading the answer"),
        };
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > MAX_RESPONSE {
            bail!("the answer is larger than {MAX_RESPONSE} bytes");
        }
    }
}

/// Status and body of a complete HTTP/1.1 response.
fn parse(raw: &[u8]) -> Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the answer ended inside its headers")?;
    let head = std::str::from_utf8(&raw[..end]).context("the answer's headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let body = &raw[end + 4..];
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(body)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .with_context(|| format!("bad Content-Length {len:?}"))?;
        body.get(..len)
            .with_context(|| format!("the body ended after {} of {len} bytes", body.len()))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk's size line is cut")?;
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .context("bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).context("a chunk is cut")?);
        body = body.get(size + 2..).context("a chunk is cut")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let u: BaseUrl = "http://prestop-aggregator.prestop-system.svc:8080/"
            .parse()
            .unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("prestop-aggregator.prestop-system.svc", 8080, "")
        );
        let u: BaseUrl = "http://[::1]/api".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("::1", 80, "/api")
        );
        for bad in ["https://a:8080", "a:8080", "http://:80", "http://a:port"] {
            assert!(bad.parse::<BaseUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_by_length_chunks_and_end_of_stream() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}trailing").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = parse(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (403, &b"abcde"[..]));
        let r = parse(b"HTTP/1.1 200 OK\r\n\r\nall").unwrap();
        assert_eq!(r.body, b"all");
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nHost").is_err());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("web-1.a_b~"), "web-1.a_b~");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
    }
}
