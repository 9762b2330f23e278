//! The small part of HTTP/1.1 the pods' traffic speaks: bodiless
//! requests, responses with `Content-Length`, persistent connections,
//! `Connection: close`. Real clients (`hey`, `wrk`, `ab`, curl) work against
//! it. It stays hand-written because the pods' server and the lab's traffic
//! clients model shutdown byte by byte (when a keep-alive connection is
//! closed, which request a reset hit, a refusal against a timeout); every
//! other HTTP exchange of the lab, its tests and the benches goes through
//! [`crate::http_client`].

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request or response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response body a lab client accepts.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("message head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A parsed message head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Request: method; response: status code.
    pub first: String,
    /// Request: path; response: reason.
    pub second: String,
    pub content_length: usize,
    /// Whether the peer asked to close the connection after this message.
    pub close: bool,
}

/// Finds the end of a message head in `buf` (index after `\r\n\r\n`).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a head. `request` selects `METHOD PATH HTTP/1.x` over
/// `HTTP/1.x CODE REASON`.
pub fn parse_head(raw: &[u8], request: bool) -> Result<Head, HttpError> {
    let text = std::str::from_utf8(raw).map_err(|_| HttpError::Malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let start = lines.next().ok_or(HttpError::Malformed("empty"))?;
    let mut parts = start.splitn(3, ' ');
    let (a, b, c) = (
        parts.next().unwrap_or_default(),
        parts.next().ok_or(HttpError::Malformed("start line"))?,
        parts.next().unwrap_or_default(),
    );
    let (first, second, version) = if request { (a, b, c) } else { (b, c, a) };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not HTTP/1.x"));
    }
    // HTTP/1.0 closes unless asked otherwise; HTTP/1.1 keeps alive.
    let mut close = version == "HTTP/1.0";
    let mut content_length = 0;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header line"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| HttpError::Malformed("content-length"))?;
        } else if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed("transfer-encoding unsupported"));
        }
    }
    Ok(Head {
        first: first.to_owned(),
        second: second.to_owned(),
        content_length,
        close,
    })
}

/// Outcome of waiting for the next message on a connection.
#[derive(Debug)]
pub enum Next {
    Message(Head, Vec<u8>),
    /// The peer closed cleanly between messages.
    Closed,
}

/// A connection's read side with the bytes received but not yet consumed.
/// [`Reader::next`] is cancel-safe: cancelled, it keeps what it had read.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    /// Whether part of a next message has already arrived.
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Reads the next message (head and body).
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
        request: bool,
    ) -> Result<Next, HttpError> {
        loop {
            if let Some(end) = head_end(&self.buf) {
                let head = parse_head(&self.buf[..end - 4], request)?;
                if head.content_length > MAX_BODY {
                    return Err(HttpError::TooLarge);
                }
                if self.buf.len() >= end + head.content_length {
                    let body = self.buf[end..end + head.content_length].to_vec();
                    self.buf.drain(..end + head.content_length);
                    return Ok(Next::Message(head, body));
                }
            } else if self.buf.len() > MAX_HEAD {
                return Err(HttpError::TooLarge);
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(Next::Closed);
                }
                return Err(HttpError::Malformed("connection closed mid-message"));
            }
        }
    }
}

/// A complete response.
pub fn response(status: u16, reason: &str, body: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A bodiless GET.
pub fn get(host: &str, path: &str, close: bool) -> Vec<u8> {
    let connection = if close { "close" } else { "keep-alive" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_and_response_heads() {
        let req = parse_head(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close", true).unwrap();
        assert_eq!(
            (req.first.as_str(), req.second.as_str(), req.close),
            ("GET", "/x", true)
        );
        let res = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5", false).unwrap();
        assert_eq!(
            (res.first.as_str(), res.content_length, res.close),
            ("200", 5, false)
        );
        let old = parse_head(b"GET / HTTP/1.0", true).unwrap();
        assert!(old.close);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b""[..],
            b"GET",
            b"GET / SPDY/3",
            b"GET / HTTP/1.1\r\nnocolon",
            b"\xff\xfe",
        ] {
            assert!(parse_head(bad, true).is_err(), "{bad:?}");
        }
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x", false).is_err());
    }

    #[tokio::test]
    async fn reads_pipelined_messages_and_clean_close() {
        let data = [
            response(200, "OK", "a", false),
            response(200, "OK", "bc", true),
        ]
        .concat();
        let mut stream = &data[..];
        let mut reader = Reader::default();
        let Next::Message(h, body) = reader.next(&mut stream, false).await.unwrap() else {
            panic!("expected a message");
        };
        assert_eq!(
            (h.first.as_str(), body.as_slice(), h.close),
            ("200", &b"a"[..], false)
        );
        let Next::Message(h, body) = reader.next(&mut stream, false).await.unwrap() else {
            panic!("expected a message");
        };
        assert_eq!((body.as_slice(), h.close), (&b"bc"[..], true));
        assert!(matches!(
            reader.next(&mut stream, false).await.unwrap(),
            Next::Closed
        ));
    }

    #[tokio::test]
    async fn truncated_message_is_an_error() {
        let mut stream = &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"[..];
        assert!(Reader::default().next(&mut stream, false).await.is_err());
    }
}
