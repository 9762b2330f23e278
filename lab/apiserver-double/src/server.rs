//! The HTTP side: discovery, GET (get, list, watch; as JSON or as a
//! Table), the token and access reviews' POSTs ([`auth`]) and DELETE on `/api/v1/...` and `/apis/<group>/<version>/...`,
//! cluster-wide or per namespace. Every other verb on a served resource is
//! a 405 MethodNotAllowed `Status`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::discovery::{self, Resource};
use crate::selector::Selector;
use crate::table::{self, Include};
use crate::{Control, Event, Kind, Shared, auth, deletion, status};

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
        .route("/{*path}", any(handle))
        .with_state(shared);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "API server double stopped");
        }
    });
    Ok((addr, task))
}

struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(segs: &[&str]) -> Option<Target> {
    let (prefix, rest) = match segs {
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
    let resource = discovery::find(&prefix, plural)?;
    // A cluster-scoped resource has no namespaced path, and a namespaced
    // object is only reachable through its namespace.
    if namespace.is_some() && !resource.namespaced
        || name.is_some() && resource.namespaced && namespace.is_none()
    {
        return None;
    }
    Some(Target {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

/// Whether the `Accept` header asks for aggregated discovery (v2).
fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|t| {
        let params: Vec<&str> = t.split(';').map(str::trim).collect();
        ["g=apidiscovery.k8s.io", "v=v2", "as=APIGroupDiscoveryList"]
            .iter()
            .all(|p| params.contains(p))
    })
}

fn discovery_response(aggregated: bool, doc: Value) -> Response {
    let content_type = if aggregated {
        discovery::AGGREGATED_V2
    } else {
        "application/json"
    };
    ([(header::CONTENT_TYPE, content_type)], axum::Json(doc)).into_response()
}

/// Discovery and `/version`; `None` for any other path.
fn serve_discovery(segs: &[&str], accept: &str, host: &str) -> Option<Response> {
    let aggregated = wants_aggregated(accept);
    let doc = match segs {
        ["version"] => discovery::version(),
        ["api"] if aggregated => discovery::core_aggregated(),
        ["api"] => discovery::core_versions(host),
        ["apis"] if aggregated => discovery::groups_aggregated(),
        ["apis"] => discovery::group_list(),
        ["api", v] => discovery::resource_list("", v).unwrap_or_default(),
        ["apis", g, v] => discovery::resource_list(g, v).unwrap_or_default(),
        _ => return None,
    };
    if doc.is_null() {
        return Some(status::no_route());
    }
    let aggregated = aggregated && matches!(segs, ["api"] | ["apis"]);
    Some(discovery_response(aggregated, doc))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    Path(path): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let header_str = |h| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let accept = header_str(header::ACCEPT);
    if let Some(answer) = serve_discovery(&segs, accept, header_str(header::HOST)) {
        return if method == Method::GET {
            answer
        } else {
            status::failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported on discovery documents"),
                None,
            )
        };
    }
    if method == Method::POST
        && let Some(answer) = auth::route(&shared, &segs, &body)
    {
        return answer;
    }
    let Some(t) = parse_path(&segs) else {
        return status::no_route();
    };
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&method, &t.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        _ => "",
    };
    if !t.resource.allows(verb) {
        let verb = if verb.is_empty() {
            method.as_str()
        } else {
            verb
        };
        return status::method_not_allowed(verb, t.resource);
    }
    let namespace = t.namespace.clone().unwrap_or_default();
    if let (Some(name), "delete") = (&t.name, verb) {
        return deletion::delete(&shared, t.resource, &namespace, name, &q, &body);
    }
    let table = if table::wants_table(accept) {
        match Include::parse(q.get("includeObject").map(String::as_str)) {
            Ok(i) => Some(i),
            Err(e) => return status::bad_request(e),
        }
    } else {
        None
    };
    let kind = t.resource.kind();
    if let Some(name) = t.name {
        let st = shared.state();
        return match st.objects.get(&(kind.clone(), namespace, name.clone())) {
            Some(v) => match table {
                Some(include) => {
                    axum::Json(table::table(&kind.kind, &[v], include, None, true)).into_response()
                }
                None => axum::Json(v.clone()).into_response(),
            },
            None => status::not_found(t.resource, &name),
        };
    }
    let labels = match Selector::parse(q.get("labelSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(e) => return status::bad_request(e),
    };
    let fields = match Selector::parse(q.get("fieldSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(e) => return status::bad_request(e),
    };
    let filter = Filter {
        kind,
        namespace: t.namespace.clone(),
        labels,
        fields,
    };
    if watching {
        shared.watches.fetch_add(1, Ordering::Relaxed);
        let opts = WatchOpts {
            from: q.get("resourceVersion").cloned().unwrap_or_default(),
            bookmarks: q.get("allowWatchBookmarks").is_some_and(|b| b == "true"),
            timeout: q
                .get("timeoutSeconds")
                .and_then(|s| s.parse().ok())
                .map_or(Duration::from_secs(1800), Duration::from_secs),
            table,
        };
        return watch(shared, filter, opts);
    }
    list(&shared, &filter, table)
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

fn list(shared: &Shared, f: &Filter, table: Option<Include>) -> Response {
    let st = shared.state();
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, ns, _), v)| f.matches(k, ns, v))
        .map(|(_, v)| v)
        .collect();
    if let Some(include) = table {
        return axum::Json(table::table(
            &f.kind.kind,
            &items,
            include,
            Some(st.rv),
            true,
        ))
        .into_response();
    }
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
    table: Option<Include>,
}

/// Writes a watch's object events, as JSON objects or as one-row Tables
/// (column definitions with the first only, as the API server does).
struct Render {
    kind: String,
    table: Option<Include>,
    first: bool,
}

impl Render {
    fn event(&mut self, typ: &str, object: &Value) -> Bytes {
        match self.table {
            Some(include) => {
                let t = table::table(&self.kind, &[object], include, None, self.first);
                self.first = false;
                line(typ, &t)
            }
            None => line(typ, object),
        }
    }
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
    let (live, backlog, last_rv, render) = {
        let st = shared.state();
        let live = shared.events.subscribe();
        let mut render = Render {
            kind: f.kind.kind.clone(),
            table: opts.table,
            first: true,
        };
        let (backlog, last_rv) = backlog(&st, &f, &opts.from, &mut render);
        (live, backlog, last_rv, render)
    };
    tokio::spawn(async move {
        for b in backlog {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        if last_rv != u64::MAX {
            follow(&tx, live, last_rv, render, &f, &opts).await;
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

/// What a watch from `from` sees first (the current objects from "" or
/// "0", the history after a resourceVersion, or the error that ends it),
/// and the version it continues from (`u64::MAX`: it ends there).
fn backlog(st: &crate::State, f: &Filter, from: &str, render: &mut Render) -> (Vec<Bytes>, u64) {
    let mut backlog = Vec::new();
    let last_rv = match from {
        "" | "0" => {
            for ((k, ns, _), v) in &st.objects {
                if f.matches(k, ns, v) {
                    backlog.push(render.event("ADDED", v));
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
                        backlog.push(render.event(e.typ, &e.object));
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
    (backlog, last_rv)
}

/// Streams the live changes after `last_rv` until the watch's timeout (a
/// bookmark then, when asked for), a disconnect, an expiry or the client
/// going away.
async fn follow(
    tx: &mpsc::Sender<Result<Bytes, Infallible>>,
    mut live: broadcast::Receiver<Control>,
    mut last_rv: u64,
    mut render: Render,
    f: &Filter,
    opts: &WatchOpts,
) {
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
                render.event(typ, &object)
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
}
