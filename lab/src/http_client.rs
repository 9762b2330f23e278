//! The one HTTP client of the lab, its tests and the benches, for the
//! aggregator's API, the agents' health endpoints and the API double:
//! hyper's client (chunked bodies, any head or body size, keep-alive),
//! connecting either from the caller's namespace or from inside a lab
//! namespace. Only the pods' traffic keeps the lab's own HTTP code
//! ([`crate::http`]), where failures must be classified byte by byte.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Uri, body::Incoming};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::net::TcpStream;

use crate::netns;

/// How long a request may take in all (connect, send, read the body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum HttpClientError {
    #[error("GET {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("GET {url}: status {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url}: the answer is not the JSON expected: {reason}: {body}")]
    Json {
        url: String,
        reason: String,
        body: String,
    },
}

/// A response, whatever its status.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Where the client's sockets are made.
#[derive(Clone, Debug)]
struct Connector {
    /// `None`: the caller's namespace.
    netns: Option<Arc<PathBuf>>,
}

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let netns = self.netns.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
            let addr: std::net::SocketAddr = addr.parse().map_err(|_| {
                std::io::Error::other(format!("{addr} is not an IP address and port"))
            })?;
            let stream = match netns {
                Some(netns) => connect_in(&netns, addr).await?,
                None => TcpStream::connect(addr).await?,
            };
            Ok(TokioIo::new(stream))
        })
    }
}

/// Connects to `addr` from inside the namespace at `netns`: the socket is
/// made on a short-lived thread there (a pooled thread would stay in the
/// namespace), then used from the caller's runtime.
pub async fn connect_in(netns: &Path, addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let netns = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let stream = netns::enter(&netns)
            .and_then(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)));
        let _ = tx.send(stream);
    });
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("connect thread ended"))??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<Connector, Empty<Bytes>>,
    /// Sent as `authorization: Bearer ...` with every request.
    bearer: Option<Bearer>,
}

/// A bearer token that may be replaced while clients send it, as the
/// kubelet renews a projected ServiceAccount token before it expires.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Arc<std::sync::RwLock<String>>);

impl Bearer {
    pub fn new(token: &str) -> Self {
        Self(Arc::new(std::sync::RwLock::new(token.to_owned())))
    }

    /// Every client holding this bearer sends `token` from now on.
    pub fn set(&self, token: &str) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = token.to_owned();
    }

    pub fn get(&self) -> String {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::with(Connector { netns: None })
    }
}

impl HttpClient {
    /// A client whose connections are made from the namespace at `netns`
    /// (e.g. `/run/netns/NAME`).
    pub fn in_netns(netns: &Path) -> Self {
        Self::with(Connector {
            netns: Some(Arc::new(netns.to_owned())),
        })
    }

    fn with(connector: Connector) -> Self {
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            bearer: None,
        }
    }

    /// The same client, sending `token` as a bearer token.
    pub fn with_bearer(self, token: &str) -> Self {
        self.with_shared_bearer(&Bearer::new(token))
    }

    /// The same client, sending whatever token `bearer` holds at each request.
    pub fn with_shared_bearer(mut self, bearer: &Bearer) -> Self {
        self.bearer = Some(bearer.clone());
        self
    }

    /// GET `url` (e.g. `http://127.0.0.1:8080/v1/deletions`), whatever the
    /// status.
    pub async fn get(&self, url: &str) -> Result<Response, HttpClientError> {
        let failed = |reason: String| HttpClientError::Request {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|e| failed(format!("bad URL: {e}")))?;
        let mut request = hyper::Request::get(uri);
        if let Some(bearer) = &self.bearer {
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", bearer.get()),
            );
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| failed(format!("bad request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| failed(error_chain(&e)))?;
            read(response).await.map_err(|e| failed(error_chain(&e)))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| failed(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }

    /// GET `url`; the body of a 2xx answer, else an error with the status
    /// and body.
    pub async fn get_ok(&self, url: &str) -> Result<Response, HttpClientError> {
        let response = self.get(url).await?;
        if !(200..300).contains(&response.status) {
            return Err(HttpClientError::Status {
                url: url.to_owned(),
                status: response.status,
                body: response.text(),
            });
        }
        Ok(response)
    }

    /// [`HttpClient::get`] for synchronous callers (tests driving
    /// third-party tools from plain threads): runs on a thread of its own,
    /// so it works inside and outside a Tokio runtime alike.
    pub fn get_blocking(&self, url: &str) -> Result<Response, HttpClientError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| HttpClientError::Request {
                            url: url.to_owned(),
                            reason: format!("no runtime for the request: {e}"),
                        })?
                        .block_on(self.get(url))
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// GET `url` and decode a 2xx answer's JSON body.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T, HttpClientError> {
        let response = self.get_ok(url).await?;
        serde_json::from_slice(&response.body).map_err(|e| HttpClientError::Json {
            url: url.to_owned(),
            reason: e.to_string(),
            body: response.text(),
        })
    }
}

async fn read(response: hyper::Response<Incoming>) -> Result<Response, hyper::Error> {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Response {
        status,
        content_type,
        body,
    })
}

/// An error with its sources, as one line (hyper's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering one request with `answer`, on loopback.
    async fn serve_once(answer: &'static [u8]) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(answer).await.unwrap();
            s.shutdown().await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn reads_chunked_bodies_larger_than_the_old_limits() {
        // 100 KiB in chunks, and a head past 16 KiB: the hand-written
        // reader refused both.
        let chunk = "x".repeat(1024);
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Big: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
            "h".repeat(20_000)
        );
        for _ in 0..100 {
            answer.push_str(&format!("400\r\n{chunk}\r\n"));
        }
        answer.push_str("0\r\n\r\n");
        let addr = serve_once(Box::leak(answer.into_boxed_str()).as_bytes()).await;
        let r = HttpClient::default()
            .get_ok(&format!("http://{addr}/big"))
            .await
            .unwrap();
        assert_eq!(r.body.len(), 100 * 1024);
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
    }

    #[tokio::test]
    async fn an_error_status_names_the_url_the_status_and_the_body() {
        let addr = serve_once(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nno route\n",
        )
        .await;
        let url = format!("http://{addr}/v1/nothing");
        let e = HttpClient::default().get_ok(&url).await.unwrap_err();
        assert_eq!(e.to_string(), format!("GET {url}: status 404: no route\n"));
    }

    #[tokio::test]
    async fn bad_json_and_refused_connections_are_errors_that_say_so() {
        let addr =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope!")
                .await;
        let e = HttpClient::default()
            .get_json::<serde_json::Value>(&format!("http://{addr}/"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, HttpClientError::Json { ref body, .. } if body == "nope!"),
            "{e}"
        );
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = HttpClient::default()
            .get(&format!("http://{closed}/"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }

    #[test]
    fn a_blocking_get_works_from_a_plain_thread() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let addr = runtime.block_on(serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        ));
        let r = HttpClient::default()
            .get_blocking(&format!("http://{addr}/"))
            .unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    }
}
