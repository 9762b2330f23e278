//! The HTTP side: GET list / get / watch on `/api/v1/...` and
//! `/apis/<group>/<version>/...`, cluster-wide or per namespace.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::selector::Selector;
use crate::{Control, Event, Kind, Shared};

#[derive(Debug, thiserror::Error)]
#[error("binding the API server double: {0}")]
pub struct ServeError(#[from] std::io::Error);

pub(crate) async fn spawn(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/{*path}", get(handle))
        .with_state(shared);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "API server double stopped");
        }
    });
    Ok((addr, task))
}

fn known_kinds() -> [Kind; 4] {
    [
        Kind::of::<Pod>(),
        Kind::of::<EndpointSlice>(),
        Kind::of::<Node>(),
        Kind::of::<Service>(),
    ]
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    (code, axum::Json(body)).into_response()
}

struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (prefix, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (format!("api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let kind = known_kinds()
        .into_iter()
        .find(|k| k.prefix == prefix && k.plural == plural)?;
    Some(Target {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(t) = parse_path(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        );
    };
    let labels = match Selector::parse(q.get("labelSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let fields = match Selector::parse(q.get("fieldSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let filter = Filter {
        kind: t.kind.clone(),
        namespace: t.namespace.clone(),
        labels,
        fields,
    };
    if let Some(name) = t.name {
        let st = shared.state();
        let key = (
            t.kind.clone(),
            t.namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        return match st.objects.get(&key) {
            Some(v) => axum::Json(v.clone()).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", t.kind.plural),
            ),
        };
    }
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        shared.watches.fetch_add(1, Ordering::Relaxed);
        let opts = WatchOpts {
            from: q.get("resourceVersion").cloned().unwrap_or_default(),
            bookmarks: q.get("allowWatchBookmarks").is_some_and(|b| b == "true"),
            timeout: q
                .get("timeoutSeconds")
                .and_then(|s| s.parse().ok())
                .map_or(Duration::from_secs(1800), Duration::from_secs),
        };
        return watch(shared, filter, opts);
    }
    list(&shared, &filter)
}

struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: Selector,
    fields: Selector,
}

impl Filter {
    fn matches(&self, kind: &Kind, namespace: &str, obj: &Value) -> bool {
        *kind == self.kind
            && self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.matches_labels(obj)
            && self.fields.matches_fields(obj)
    }
}

fn list(shared: &Shared, f: &Filter) -> Response {
    let st = shared.state();
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, ns, _), v)| f.matches(k, ns, v))
        .map(|(_, v)| v)
        .collect();
    axum::Json(json!({
        "kind": format!("{}List", f.kind.kind),
        "apiVersion": f.kind.api_version,
        "metadata": { "resourceVersion": st.rv.to_string() },
        "items": items,
    }))
    .into_response()
}

struct WatchOpts {
    from: String,
    bookmarks: bool,
    timeout: Duration,
}

fn line(typ: &str, object: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({ "type": typ, "object": object })).unwrap_or_default();
    s.push(b'\n');
    Bytes::from(s)
}

fn bookmark(kind: &Kind, rv: u64) -> Bytes {
    line(
        "BOOKMARK",
        &json!({ "kind": kind.kind, "apiVersion": kind.api_version, "metadata": { "resourceVersion": rv.to_string() } }),
    )
}

fn expired(rv: u64, oldest: u64) -> Bytes {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {rv} ({oldest})"),
        "reason": "Expired", "code": 410
    });
    line("ERROR", &status)
}

fn watch(shared: Arc<Shared>, f: Filter, opts: WatchOpts) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    // Under one lock: subscribe, then take the backlog, so nothing falls
    // between the two and nothing is sent twice.
    let (mut live, backlog, mut last_rv) = {
        let st = shared.state();
        let live = shared.events.subscribe();
        let mut backlog = Vec::new();
        let last_rv = match opts.from.as_str() {
            "" | "0" => {
                for ((k, ns, _), v) in &st.objects {
                    if f.matches(k, ns, v) {
                        backlog.push(line("ADDED", v));
                    }
                }
                st.rv
            }
            s => match s.parse::<u64>() {
                Ok(rv) if rv < st.compacted => {
                    backlog.push(expired(rv, st.compacted));
                    u64::MAX
                }
                Ok(rv) => {
                    for e in st.history.iter().filter(|e| e.rv > rv) {
                        if f.matches(&e.kind, &e.namespace, &e.object) {
                            backlog.push(line(e.typ, &e.object));
                        }
                    }
                    st.rv.max(rv)
                }
                Err(_) => {
                    let bad = json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("invalid resourceVersion {s:?}"), "reason": "BadRequest", "code": 400
                    });
                    backlog.push(line("ERROR", &bad));
                    u64::MAX
                }
            },
        };
        (live, backlog, last_rv)
    };
    tokio::spawn(async move {
        for b in backlog {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        if last_rv == u64::MAX {
            return;
        }
        let deadline = tokio::time::sleep(opts.timeout);
        tokio::pin!(deadline);
        loop {
            let msg = tokio::select! {
                m = live.recv() => m,
                () = &mut deadline => {
                    if opts.bookmarks {
                        let _ = tx.send(Ok(bookmark(&f.kind, last_rv))).await;
                    }
                    return;
                }
                () = tx.closed() => return,
            };
            let out = match msg {
                Ok(Control::Event(Event {
                    rv,
                    kind,
                    namespace,
                    typ,
                    object,
                })) => {
                    if rv <= last_rv {
                        continue;
                    }
                    last_rv = rv;
                    if !f.matches(&kind, &namespace, &object) {
                        continue;
                    }
                    line(typ, &object)
                }
                Ok(Control::Bookmark(rv)) if opts.bookmarks => {
                    last_rv = last_rv.max(rv);
                    bookmark(&f.kind, last_rv)
                }
                Ok(Control::Bookmark(_)) => continue,
                Ok(Control::Expire) => {
                    let _ = tx.send(Ok(expired(last_rv, last_rv + 1))).await;
                    return;
                }
                // A disconnect, or this watcher fell behind the broadcast
                // buffer: end the stream; the client resumes from its last
                // resourceVersion.
                Ok(Control::Disconnect) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
