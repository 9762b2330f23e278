//! Server-side printing: the `meta.k8s.io/v1` Tables kubectl asks for
//! (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`) with the
//! columns the real API server's printers give, including the `-o wide`
//! ones (priority 1).

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// What each row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    /// `PartialObjectMetadata`, the default.
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        match s {
            None | Some("Metadata") => Ok(Self::Metadata),
            Some("None") => Ok(Self::None),
            Some("Object") => Ok(Self::Object),
            Some(other) => Err(format!(
                "includeObject {other:?}: must be None, Metadata or Object"
            )),
        }
    }
}

/// Whether the `Accept` header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|t| {
        let params: Vec<&str> = t.split(';').map(str::trim).collect();
        params.contains(&"as=Table") && params.contains(&"g=meta.k8s.io")
    })
}

struct Column {
    name: &'static str,
    typ: &'static str,
    format: &'static str,
    priority: u8,
    description: &'static str,
}

const fn col(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        typ: "string",
        format: "",
        priority: 0,
        description,
    }
}

const fn wide(name: &'static str, description: &'static str) -> Column {
    Column {
        priority: 1,
        ..col(name, description)
    }
}

const NAME: Column = Column {
    format: "name",
    ..col(
        "Name",
        "Name must be unique within a namespace. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    )
};
const AGE: Column = col(
    "Age",
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);

fn columns(kind: &str) -> Vec<Column> {
    match kind {
        "Pod" => vec![
            NAME,
            col(
                "Ready",
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            wide(
                "IP",
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            ),
            wide(
                "Node",
                "NodeName is a request to schedule this pod onto a specific node.",
            ),
            wide(
                "Nominated Node",
                "nominatedNodeName is set only when this pod preempts other pods on the node.",
            ),
            wide(
                "Readiness Gates",
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ],
        "Node" => vec![
            NAME,
            col("Status", "The status of the node"),
            col("Roles", "The roles of the node"),
            AGE,
            col("Version", "Kubelet Version reported by the node."),
            wide("Internal-IP", "List of internal IPs."),
            wide("External-IP", "List of external IPs."),
        ],
        "Service" => vec![
            NAME,
            col("Type", "type determines how the Service is exposed."),
            col("Cluster-IP", "clusterIP is the IP address of the service."),
            col(
                "External-IP",
                "List of IP addresses for which nodes in the cluster will also accept traffic for this service.",
            ),
            col(
                "Port(s)",
                "The list of ports that are exposed by this service.",
            ),
            AGE,
            wide(
                "Selector",
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ],
        "EndpointSlice" => vec![
            NAME,
            col(
                "AddressType",
                "addressType specifies the type of address carried by this EndpointSlice.",
            ),
            col(
                "Ports",
                "ports specifies the list of network ports exposed by each endpoint in this slice.",
            ),
            col(
                "Endpoints",
                "endpoints is a list of unique endpoints in this slice.",
            ),
            AGE,
        ],
        "Event" => vec![
            col("Last Seen", "Time when this Event was last observed."),
            col("Type", "Type of this event (Normal, Warning)."),
            col(
                "Reason",
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            col("Object", "The object that this event is about."),
            col(
                "Message",
                "A human-readable description of the status of this operation.",
            ),
        ],
        _ => vec![NAME, AGE],
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

/// The elements of the array at `ptr`; none when it is absent.
fn items<'a>(v: &'a Value, ptr: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

/// Kubernetes' `duration.HumanDuration`, as in the Age column.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    let y = d / 365;
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 && s % 60 == 0 => format!("{m}m"),
        _ if m < 10 => format!("{m}m{}s", s % 60),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 && m % 60 == 0 => format!("{h}h"),
        _ if h < 8 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 && h % 24 == 0 => format!("{d}d"),
        _ if h < 192 => format!("{d}d{}h", h % 24),
        _ if y < 2 => format!("{d}d"),
        _ if y < 8 && d % 365 == 0 => format!("{y}y"),
        _ if y < 8 => format!("{y}y{}d", d % 365),
        _ => format!("{y}y"),
    }
}

fn age(v: &Value, ptr: &str, now: i64) -> String {
    match str_at(v, ptr).parse::<Timestamp>() {
        Ok(t) => human_duration(now - t.as_second()),
        Err(_) => "<unknown>".into(),
    }
}

fn pod_cells(p: &Value, now: i64) -> Vec<Value> {
    let containers = items(p, "/spec/containers").count();
    let ready = items(p, "/status/containerStatuses")
        .filter(|s| s["ready"].as_bool() == Some(true))
        .count();
    let restarts: i64 = items(p, "/status/containerStatuses")
        .filter_map(|s| s["restartCount"].as_i64())
        .sum();
    // As the API server's printer: a pod with a deletion timestamp is
    // Terminating whatever its phase.
    let status = if p.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating".to_owned()
    } else {
        match str_at(p, "/status/phase") {
            "" => "Pending".to_owned(),
            phase => phase.to_owned(),
        }
    };
    vec![
        str_at(p, "/metadata/name").into(),
        format!("{ready}/{containers}").into(),
        status.into(),
        restarts.to_string().into(),
        age(p, "/metadata/creationTimestamp", now).into(),
        or_none(str_at(p, "/status/podIP").into()).into(),
        or_none(str_at(p, "/spec/nodeName").into()).into(),
        or_none(str_at(p, "/status/nominatedNodeName").into()).into(),
        "<none>".into(),
    ]
}

fn node_cells(n: &Value, now: i64) -> Vec<Value> {
    let ready = items(n, "/status/conditions")
        .find(|c| c["type"] == "Ready")
        .map_or("Unknown", |c| {
            if c["status"] == "True" {
                "Ready"
            } else {
                "NotReady"
            }
        });
    let addresses = |typ: &str| {
        items(n, "/status/addresses")
            .filter(|a| a["type"] == typ)
            .filter_map(|a| a["address"].as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let roles: Vec<&str> = n
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .collect();
    vec![
        str_at(n, "/metadata/name").into(),
        ready.into(),
        or_none(roles.join(",")).into(),
        age(n, "/metadata/creationTimestamp", now).into(),
        str_at(n, "/status/nodeInfo/kubeletVersion").into(),
        or_none(addresses("InternalIP")).into(),
        or_none(addresses("ExternalIP")).into(),
    ]
}

fn service_cells(s: &Value, now: i64) -> Vec<Value> {
    let ports: Vec<String> = items(s, "/spec/ports")
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                None => format!("{}/{proto}", p["port"]),
            }
        })
        .collect();
    let selector: Vec<String> = s
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let external: Vec<&str> = items(s, "/spec/externalIPs")
        .filter_map(Value::as_str)
        .collect();
    vec![
        str_at(s, "/metadata/name").into(),
        match str_at(s, "/spec/type") {
            "" => "ClusterIP",
            t => t,
        }
        .into(),
        or_none(str_at(s, "/spec/clusterIP").into()).into(),
        or_none(external.join(",")).into(),
        or_none(ports.join(",")).into(),
        age(s, "/metadata/creationTimestamp", now).into(),
        or_none(selector.join(",")).into(),
    ]
}

fn slice_cells(e: &Value, now: i64) -> Vec<Value> {
    let ports: Vec<String> = items(e, "/ports")
        .filter_map(|p| p["port"].as_i64())
        .map(|p| p.to_string())
        .collect();
    let addresses: Vec<&str> = items(e, "/endpoints")
        .filter_map(|ep| ep.pointer("/addresses/0").and_then(Value::as_str))
        .collect();
    // The API server's printer shows at most three, then "+ N more...".
    let mut shown = addresses
        .iter()
        .take(3)
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    if addresses.len() > 3 {
        shown.push_str(&format!(" + {} more...", addresses.len() - 3));
    }
    vec![
        str_at(e, "/metadata/name").into(),
        str_at(e, "/addressType").into(),
        or_none(ports.join(",")).into(),
        or_none(shown).into(),
        age(e, "/metadata/creationTimestamp", now).into(),
    ]
}

fn event_cells(e: &Value, now: i64) -> Vec<Value> {
    vec![
        age(e, "/lastTimestamp", now).into(),
        str_at(e, "/type").into(),
        str_at(e, "/reason").into(),
        format!(
            "{}/{}",
            str_at(e, "/involvedObject/kind").to_lowercase(),
            str_at(e, "/involvedObject/name")
        )
        .into(),
        str_at(e, "/message").into(),
    ]
}

fn cells(obj: &Value, now: i64) -> Vec<Value> {
    match obj["kind"].as_str().unwrap_or_default() {
        "Pod" => pod_cells(obj, now),
        "Node" => node_cells(obj, now),
        "Service" => service_cells(obj, now),
        "EndpointSlice" => slice_cells(obj, now),
        "Event" => event_cells(obj, now),
        _ => vec![
            str_at(obj, "/metadata/name").into(),
            age(obj, "/metadata/creationTimestamp", now).into(),
        ],
    }
}

fn row(obj: &Value, include: Include, now: i64) -> Value {
    let mut row = json!({ "cells": cells(obj, now) });
    match include {
        Include::None => {}
        Include::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            })
        }
        Include::Object => row["object"] = obj.clone(),
    }
    row
}

/// A Table of `objects` of `kind`. The API server sends the column
/// definitions once per response: with every list, and with the first
/// event of a watch only (`with_columns`).
pub fn table(
    kind: &str,
    objects: &[&Value],
    include: Include,
    resource_version: Option<u64>,
    with_columns: bool,
) -> Value {
    let now = Timestamp::now().as_second();
    let columns: Vec<Value> = if with_columns {
        columns(kind)
            .iter()
            .map(|c| {
                json!({
                    "name": c.name, "type": c.typ, "format": c.format,
                    "description": c.description, "priority": c.priority,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut metadata = json!({});
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = rv.to_string().into();
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns,
        "rows": objects.iter().map(|o| row(o, include, now)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        for (s, want) in [
            (5, "5s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (9 * 3600, "9h"),
            (50 * 3600, "2d2h"),
            (10 * 86_400, "10d"),
            (-5, "<invalid>"),
        ] {
            assert_eq!(human_duration(s), want, "{s} s");
        }
    }

    #[test]
    fn accept_header_for_tables() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
        assert!(!wants_table(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
        ));
    }

    #[test]
    fn terminating_pod_row_and_wide_columns() {
        let pod = json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "web-0", "creationTimestamp": "2026-01-01T00:00:00Z",
                          "deletionTimestamp": "2026-01-01T00:01:00Z"},
            "spec": {"nodeName": "node-1", "containers": [{"name": "web"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.2",
                        "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0}]},
        });
        let t = table("Pod", &[&pod], Include::Metadata, Some(7), true);
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["metadata"]["resourceVersion"], "7");
        let cols = t["columnDefinitions"].as_array().unwrap();
        assert_eq!(cols[0]["name"], "Name");
        assert_eq!(cols[5]["name"], "IP");
        assert_eq!(cols[5]["priority"], 1);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web-0");
        assert_eq!(cells[1], "1/1");
        assert_eq!(cells[2], "Terminating");
        assert_eq!(cells[5], "10.244.1.2");
        assert_eq!(cells[6], "node-1");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "web-0");
        let later = table("Pod", &[&pod], Include::Object, None, false);
        assert!(later["columnDefinitions"].as_array().unwrap().is_empty());
        assert_eq!(later["rows"][0]["object"]["kind"], "Pod");
    }
}
