//! The OpenAPI 3 document served at /openapi.json, written by hand next to
//! the handlers; a test checks it names exactly the routes the router serves.

use serde_json::{Value, json};

pub fn document() -> Value {
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "prestop aggregator",
            "version": "1",
            "description": "Measured endpoint-propagation latency and the preStop delay it calls for."
        },
        "paths": paths(),
        "components": {
            "securitySchemes": { "kubernetesToken": {
                "type": "http", "scheme": "bearer",
                "description": "A Kubernetes token for the aggregator's audience (--token-audience), checked with TokenReview and a SubjectAccessReview for get on deletions (recommendations) of observer.prestop.dev"
            }, "podToken": {
                "type": "http", "scheme": "bearer",
                "description": "The pod's projected ServiceAccount token for the aggregator's audience; TokenReview names the pod it is bound to, which may ask about itself only"
            } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } },
                "Recommendation": recommendation(),
                "Deletion": deletion(),
                "DeletionSummary": deletion_summary(),
                "DeletionList": deletion_list(),
                "NodeMeasurement": node_measurement(),
                "Coverage": coverage(),
                "Router": router(),
                "RouterMeasurement": router_measurement(),
                "RouterKindSummary": router_kind_summary(),
                "DrainAnswer": drain_answer()
            }
        }
    });
    crate::startup::openapi::add_to(&mut doc);
    doc
}

/// A JSON error answer (the `Error` schema) described by `desc`.
pub(crate) fn refused(desc: &str) -> Value {
    json!({ "description": desc, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// An optional query parameter.
pub(crate) fn param(name: &str, ty: &str, desc: &str) -> Value {
    json!({ "name": name, "in": "query", "required": false, "schema": { "type": ty }, "description": desc })
}

fn paths() -> Value {
    let error = json!({ "$ref": "#/components/schemas/Error" });
    let bad_request = json!({
        "description": "Bad parameter",
        "content": { "application/json": { "schema": error } }
    });
    let text = |desc: &str| json!({ "description": desc, "content": { "text/plain": { "schema": { "type": "string" } } } });
    json!({
        "/v1/recommendations": { "get": {
            "summary": "Recommended preStop delay for the cluster, a namespace or a service",
            "parameters": [
                param("namespace", "string", "Namespace; absent means cluster-wide"),
                param("service", "string", "Service name; needs namespace"),
                param("quantile", "number", "Quantile of full-propagation latency to cover, in (0,1); default from --quantile"),
                param("confidence", "number", "Confidence of the upper bound, in (0,1); default from --confidence"),
                param("excludeExternal", "boolean", "true: each deletion's latency over its node and workload routers only, external routers (no node, no pod) left out; default false")
            ],
            "responses": {
                "200": { "description": "Recommendation", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Recommendation" } } } },
                "400": bad_request
            }
        }},
        "/v1/deletions": { "get": {
            "summary": "Finished deletions, newest first, one summary each; pages with a continue token",
            "security": [{ "kubernetesToken": [] }],
            "parameters": [
                param("namespace", "string", "Only this namespace"),
                param("service", "string", "Only pods of this service; needs namespace"),
                param("node", "string", "Only deletions this node reported on (or was missing from)"),
                param("outcome", "string", "complete or incomplete"),
                param("sinceSeconds", "integer", "Only deletions finished in the last N seconds"),
                param("limit", "integer", "At most this many per page (1..1000, default 100)"),
                param("continue", "string", "The previous page's continue token: the next (older) page, with the same filters. No deletion is skipped or repeated across pages while new ones are stored; new ones are on a new first page")
            ],
            "responses": {
                "200": { "description": "One page", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/DeletionList" } } } },
                "400": bad_request,
                "401": refused("No token, or one the API server refuses"),
                "403": refused("RBAC does not allow get deletions.observer.prestop.dev"),
                "503": refused("TokenReview or SubjectAccessReview unavailable")
            }
        }},
        "/v1/deletions/{podUid}": { "get": {
            "summary": "One finished deletion with its per-node and per-router detail, optionally filtered",
            "security": [{ "kubernetesToken": [] }],
            "parameters": [
                { "name": "podUid", "in": "path", "required": true, "schema": { "type": "string" } },
                param("slowest", "integer", "Only the N slowest nodes and routers (still routing first, then by latency plus error, those without a latency last), slowest first"),
                param("node", "string", "Only this node (and the routers running on it)"),
                param("class", "string", "Only nodes and routers of this class: measured, stillRouting or unknown")
            ],
            "responses": {
                "200": { "description": "The deletion", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Deletion" } } } },
                "400": bad_request,
                "404": { "description": "No finished deletion of this pod UID", "content": { "application/json": { "schema": error } } },
                "401": refused("No token, or one the API server refuses"),
                "403": refused("RBAC does not allow get deletions.observer.prestop.dev"),
                "503": refused("TokenReview or SubjectAccessReview unavailable")
            }
        }},
        "/v1/drain": drain_path(),
        "/healthz": { "get": { "summary": "Liveness", "responses": { "200": text("Alive") } } },
        "/readyz": { "get": { "summary": "Readiness: store reachable, Kubernetes watchers synced",
            "responses": { "200": text("Ready"), "503": text("Not ready, with the reason") } } },
        "/metrics": { "get": { "summary": "Prometheus metrics (OpenMetrics text)", "responses": { "200": text("Metrics") } } },
        "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3 document" } } } }
    })
}

/// `observer_proto::api::Recommendation`.
fn recommendation() -> Value {
    json!({
        "type": "object",
        "required": ["scope", "preStopSeconds", "quantile", "confidence", "marginSeconds", "samples",
            "samplesNeeded", "windowSeconds", "observedP50Seconds", "observedP99Seconds",
            "observedMaxSeconds", "lowConfidence", "atLeast", "censored", "coverage", "maxErrorSeconds",
            "reason", "limitingRouter", "byRouterKind", "lifecycle", "keepAlive"],
        "properties": {
            "scope": { "type": "object", "required": ["cluster", "namespace", "service"], "properties": {
                "cluster": { "type": "string" },
                "namespace": { "type": "string", "nullable": true },
                "service": { "type": "string", "nullable": true }
            }},
            "preStopSeconds": { "type": "integer", "nullable": true, "description": "null when there are no samples at all" },
            "quantile": { "type": "number" },
            "confidence": { "type": "number" },
            "marginSeconds": { "type": "number" },
            "samples": { "type": "integer", "description": "Complete deletions in the window" },
            "samplesNeeded": { "type": "integer", "description": "More samples needed for a full-confidence bound; 0 when enough" },
            "windowSeconds": { "type": "integer" },
            "observedP50Seconds": { "type": "number", "nullable": true },
            "observedP99Seconds": { "type": "number", "nullable": true },
            "observedMaxSeconds": { "type": "number", "nullable": true },
            "lowConfidence": { "type": "boolean" },
            "atLeast": { "type": "boolean", "description": "Deletions still routed at the completion timeout rank above every measured one and set the answer: preStopSeconds is only what the delay must at least be" },
            "censored": { "type": "integer", "description": "Deletions in the window with a node still routing at the completion timeout (counted in samples)" },
            "coverage": { "$ref": "#/components/schemas/Coverage" },
            "maxErrorSeconds": { "type": "number", "nullable": true, "description": "Largest error (clock, detector, T0 lag) added to a sample before the bound" },
            "reason": { "type": "string" },
            "limitingRouter": { "allOf": [{ "$ref": "#/components/schemas/Router" }], "nullable": true,
                "description": "The router whose latency set the value" },
            "byRouterKind": { "type": "array", "items": { "$ref": "#/components/schemas/RouterKindSummary" } },
            "lifecycle": { "type": "object", "nullable": true, "properties": {
                "preStop": { "type": "object", "properties": {
                    "sleep": { "type": "object", "properties": { "seconds": { "type": "integer" } } }
                }}
            }},
            "keepAlive": { "type": "object", "required": ["abortedConnections", "finding"], "properties": {
                "abortedConnections": { "type": "integer" },
                "finding": { "type": "string", "nullable": true }
            }}
        }
    })
}

/// `observer_proto::api::DeletionRecord`.
fn deletion() -> Value {
    json!({
        "type": "object",
        "properties": {
            "podUid": { "type": "string" },
            "namespace": { "type": "string" },
            "podName": { "type": "string" },
            "services": { "type": "array", "items": { "type": "string" } },
            "podIp": { "type": "string" },
            "hostNode": { "type": "string", "nullable": true },
            "deletionStartUnixNanos": { "type": "integer", "format": "int64" },
            "apiDeletionStartUnixNanos": { "type": "integer", "format": "int64", "nullable": true },
            "gracePeriodSeconds": { "type": "integer", "nullable": true },
            "controlPlaneSeconds": { "type": "number", "nullable": true },
            "complete": { "type": "boolean" },
            "propagationSeconds": { "type": "number", "nullable": true, "description": "Largest latency over the nodes; null when censored" },
            "propagationUpperSeconds": { "type": "number", "nullable": true, "description": "Largest latency plus its error: what the bound uses" },
            "censored": { "type": "boolean", "description": "A node was still routing at the completion timeout" },
            "censoredAfterSeconds": { "type": "number", "nullable": true, "description": "When censored: the propagation exceeds this (finish - T0)" },
            "t0LagBoundSeconds": { "type": "number", "nullable": true, "description": "Receipt of the deletion minus the API's whole-second start: bounds how late T0 is" },
            "coverage": { "$ref": "#/components/schemas/Coverage" },
            "finishedUnixNanos": { "type": "integer", "format": "int64" },
            "nodes": { "type": "array", "items": { "$ref": "#/components/schemas/NodeMeasurement" } },
            "routers": { "type": "array", "items": { "$ref": "#/components/schemas/RouterMeasurement" },
                "description": "Every router that sent the pod new connections after T0, and every expected node" },
            "limitingRouter": { "allOf": [{ "$ref": "#/components/schemas/Router" }], "nullable": true },
            "missingNodes": { "type": "array", "items": { "type": "string" } }
        }
    })
}

/// `observer_proto::api::DeletionList`.
fn deletion_list() -> Value {
    json!({
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": { "type": "array", "items": { "$ref": "#/components/schemas/DeletionSummary" } },
            "continue": { "type": "string", "description": "Token for the next (older) page; absent on the last page" }
        }
    })
}

/// `observer_proto::api::DeletionSummary`.
fn deletion_summary() -> Value {
    json!({
        "type": "object",
        "properties": {
            "podUid": { "type": "string", "description": "GET /v1/deletions/{podUid} has the detail" },
            "namespace": { "type": "string" },
            "podName": { "type": "string" },
            "services": { "type": "array", "items": { "type": "string" } },
            "hostNode": { "type": "string", "nullable": true },
            "deletionStartUnixNanos": { "type": "integer", "format": "int64" },
            "finishedUnixNanos": { "type": "integer", "format": "int64" },
            "complete": { "type": "boolean" },
            "censored": { "type": "boolean" },
            "propagationSeconds": { "type": "number", "nullable": true },
            "propagationUpperSeconds": { "type": "number", "nullable": true },
            "limitingNode": { "type": "string", "nullable": true, "description": "The expected node with the largest latency plus error" },
            "limitingRouter": { "allOf": [{ "$ref": "#/components/schemas/Router" }], "nullable": true },
            "coverage": { "$ref": "#/components/schemas/Coverage" }
        }
    })
}

/// `observer_proto::api::NodeMeasurement`.
fn node_measurement() -> Value {
    json!({
        "type": "object",
        "properties": {
            "node": { "type": "string" },
            "rulesRemovedUnixNanos": { "type": "integer", "format": "int64", "nullable": true },
            "lastConnectionUnixNanos": { "type": "integer", "format": "int64", "nullable": true },
            "latencySeconds": { "type": "number", "nullable": true },
            "mode": { "type": "string", "nullable": true, "enum": ["nftables", "iptables_nft", "iptables_legacy", "cilium", "traffic", null],
                "description": "The detector that saw the rules removal, or traffic when only connections were seen" },
            "detectorPrecisionSeconds": { "type": "number", "nullable": true,
                "description": "Upper bound of the error of rulesRemovedUnixNanos as the node's detector timed it" },
            "clockUncertaintySeconds": { "type": "number", "nullable": true },
            "removedBeforeAgentStartUnixNanos": { "type": "integer", "format": "int64", "nullable": true,
                "description": "Its agent started after the deletion and found the endpoint no longer selected then: removed before, when unknown (class unknown)" },
            "class": { "type": "string", "nullable": true, "enum": ["measured", "stillRouting", "unknown", null],
                "description": "For an expected node: its removal was seen, it still routed at the timeout (agent healthy), or nothing is known (agent absent, restarted, losing events)" },
            "errorSeconds": { "type": "number", "nullable": true, "description": "Clock uncertainty + detector precision + T0 lag bound, added to latencySeconds for the bound" },
            "lateConnections": { "type": "integer" },
            "refusedConnections": { "type": "integer" },
            "abortedConnections": { "type": "integer" }
        }
    })
}

/// `observer_proto::api::Coverage`.
fn coverage() -> Value {
    json!({
        "type": "object",
        "properties": {
            "expected": { "type": "integer" },
            "measured": { "type": "integer" },
            "stillRouting": { "type": "integer" },
            "unknown": { "type": "integer" },
            "ratio": { "type": "number", "nullable": true, "description": "measured / expected" }
        }
    })
}

const ROUTER_KIND: &str = "node, workload (a pod connecting to pod IPs: ingress, client-side balancer) or external (neither a node nor a pod)";

/// `observer_proto::api::RouterRef`.
fn router() -> Value {
    json!({
        "type": "object",
        "properties": router_properties()
    })
}

pub(crate) fn router_properties() -> serde_json::Map<String, Value> {
    let v = json!({
        "kind": { "type": "string", "enum": ["node", "workload", "external"], "description": ROUTER_KIND },
        "name": { "type": "string", "description": "The node; namespace/owner for a workload; the source address for an external router" },
        "node": { "type": "string", "nullable": true, "description": "The node the router runs on" }
    });
    v.as_object().cloned().unwrap_or_default()
}

/// `observer_proto::api::RouterMeasurement`: a router's name flattened in.
fn router_measurement() -> Value {
    let mut properties = router_properties();
    let more = json!({
        "lastConnectionUnixNanos": { "type": "integer", "format": "int64", "nullable": true },
        "latencySeconds": { "type": "number", "nullable": true },
        "errorSeconds": { "type": "number", "nullable": true },
        "class": { "type": "string", "nullable": true, "enum": ["measured", "stillRouting", "unknown", null] },
        "lateConnections": { "type": "integer" },
        "refusedConnections": { "type": "integer" }
    });
    if let Value::Object(more) = more {
        properties.extend(more);
    }
    json!({ "type": "object", "properties": properties })
}

/// `observer_proto::api::RouterKindSummary`.
fn router_kind_summary() -> Value {
    json!({
        "type": "object",
        "properties": {
            "kind": { "type": "string", "enum": ["node", "workload", "external"] },
            "samples": { "type": "integer" },
            "observedP50Seconds": { "type": "number", "nullable": true },
            "observedP99Seconds": { "type": "number", "nullable": true },
            "observedMaxSeconds": { "type": "number", "nullable": true }
        }
    })
}

/// `GET /v1/drain`: the adaptive drain's long-poll (`crate::drain`).
fn drain_path() -> Value {
    let error = json!({ "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let with = |desc: &str| {
        let mut r = error.clone();
        r["description"] = desc.into();
        r
    };
    let param = |name: &str, ty: &str, desc: &str| json!({ "name": name, "in": "query", "required": true, "schema": { "type": ty }, "description": desc });
    json!({ "get": {
        "summary": "Waits until every expected node removed the pod and no router sent it a new connection for its quiet period, or max; for the pod's own preStop hook (prestop-drain)",
        "security": [{ "podToken": [] }],
        "parameters": [
            param("namespace", "string", "The pod's namespace (the token's)"),
            param("pod", "string", "The pod's name (the token's pod)"),
            param("max", "number", "Longest wait, seconds (> 0); lowered to --max-drain-seconds")
        ],
        "responses": {
            "200": { "description": "Drained, or max reached (outcome says which)", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/DrainAnswer" } } } },
            "400": with("Bad or missing parameter"),
            "401": with("No token, or one the API server refuses"),
            "403": with("Not a pod's token, or another pod's"),
            "429": with("--max-drain-waits requests wait already"),
            "503": with("TokenReview unavailable, or no deletions tracked by this server")
        }
    }})
}

/// `observer_proto::api::DrainAnswer`.
fn drain_answer() -> Value {
    json!({
        "type": "object",
        "required": ["outcome", "waitedSeconds", "sinceDeletionSeconds", "nodesExpected", "nodesRemoved",
            "missingNodes", "quietSeconds", "lastConnectionSecondsAgo", "limitingRouter", "reason"],
        "properties": {
            "outcome": { "type": "string", "enum": ["drained", "timeout"] },
            "waitedSeconds": { "type": "number", "description": "How long the request waited" },
            "sinceDeletionSeconds": { "type": "number", "nullable": true, "description": "From T0 to the answer; null when no deletion of the pod was seen" },
            "nodesExpected": { "type": "integer" },
            "nodesRemoved": { "type": "integer" },
            "missingNodes": { "type": "array", "items": { "type": "string" }, "description": "Expected nodes without a reported removal (at most 20)" },
            "quietSeconds": { "type": "number", "description": "The longest quiet period a router needed: ln(1/--drain-miss-probability) of its measured connection intervals, within --drain-min-quiet..--drain-max-quiet" },
            "lastConnectionSecondsAgo": { "type": "number", "nullable": true },
            "limitingRouter": { "allOf": [{ "$ref": "#/components/schemas/Router" }], "nullable": true, "description": "Drained: the condition met last; timeout: one still unmet" },
            "reason": { "type": "string" }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use observer_proto::api::{
        Coverage, DeletionList, DeletionRecord, DeletionSummary, NodeMeasurement, Recommendation,
        RouterKindSummary, RouterMeasurement, RouterRef,
    };
    use serde::Serialize;

    use super::*;

    fn fields(v: impl Serialize) -> BTreeSet<String> {
        serde_json::to_value(v)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    fn documented(schema: &Value) -> BTreeSet<String> {
        schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn the_schemas_list_every_field_the_answers_have() {
        assert_eq!(
            documented(&recommendation()),
            fields(Recommendation::default())
        );
        assert_eq!(documented(&deletion()), fields(DeletionRecord::default()));
        assert_eq!(
            documented(&deletion_summary()),
            fields(DeletionSummary::default())
        );
        let page = DeletionList {
            items: Vec::new(),
            continue_token: Some(String::new()),
        };
        assert_eq!(documented(&deletion_list()), fields(page));
        assert_eq!(
            documented(&node_measurement()),
            fields(NodeMeasurement::default())
        );
        assert_eq!(documented(&coverage()), fields(Coverage::default()));
        assert_eq!(documented(&router()), fields(RouterRef::default()));
        assert_eq!(
            documented(&router_measurement()),
            fields(RouterMeasurement::default())
        );
        assert_eq!(
            documented(&router_kind_summary()),
            fields(RouterKindSummary::default())
        );
    }
}
