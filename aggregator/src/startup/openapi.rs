//! The OpenAPI part of `GET /v1/startup`, added to the document of
//! `crate::openapi`; a test checks the schemas list every field.

use serde_json::{Map, Value, json};

use crate::openapi::{param, refused, router_properties};

/// Adds the path and its schemas to `doc`.
pub fn add_to(doc: &mut Value) {
    doc["paths"]["/v1/startup"] = path();
    for (name, schema) in schemas() {
        doc["components"]["schemas"][name] = schema;
    }
}

fn path() -> Value {
    json!({ "get": {
        "summary": "New pods' startup: refusals after ready per workload (findings), addition propagation per node and router kind, the newest startups",
        "security": [{ "kubernetesToken": [] }],
        "parameters": [
            param("namespace", "string", "Only this namespace"),
            param("service", "string", "Only pods of this service; needs namespace"),
            param("workload", "string", "Only this workload, namespace/owner"),
            param("limit", "integer", "Newest startups listed in pods (0..1000, default 20)")
        ],
        "responses": {
            "200": { "description": "Startup report", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/StartupReport" } } } },
            "400": refused("Bad parameter"),
            "401": refused("No token, or one the API server refuses"),
            "403": refused("RBAC does not allow get deletions.observer.prestop.dev"),
            "503": refused("TokenReview or SubjectAccessReview unavailable")
        }
    }})
}

fn schema(properties: Value) -> Value {
    json!({ "type": "object", "properties": properties })
}

fn list(of: &str) -> Value {
    json!({ "type": "array", "items": { "$ref": format!("#/components/schemas/{of}") } })
}

fn schemas() -> Vec<(&'static str, Value)> {
    let seconds = json!({ "type": "number", "nullable": true });
    let time = json!({ "type": "integer", "format": "int64", "nullable": true });
    let count = json!({ "type": "integer" });
    let text = json!({ "type": "string" });
    let texts = json!({ "type": "array", "items": { "type": "string" } });
    let nullable_text = json!({ "type": "string", "nullable": true });
    let mut router_startup = router_properties();
    router_startup.extend(Map::from_iter([
        ("firstConnectionUnixNanos".to_owned(), time.clone()),
        ("firstConnectionSeconds".to_owned(), seconds.clone()),
        ("connections".to_owned(), count.clone()),
        ("refusedConnections".to_owned(), count.clone()),
    ]));
    vec![
        (
            "StartupReport",
            schema(json!({
                "cluster": text, "namespace": nullable_text, "service": nullable_text, "workload": nullable_text,
                "windowSeconds": { "type": "number", "description": "How long after T_ready refusals count" },
                "newPods": count,
                "findings": list("StartupFinding"),
                "rolloutFindings": list("RolloutFinding"),
                "workloads": list("WorkloadStartup"),
                "byNode": list("PropagationSummary"),
                "byRouterKind": list("PropagationSummary"),
                "pods": list("StartupRecord")
            })),
        ),
        (
            "StartupFinding",
            schema(json!({
                "namespace": text, "workload": text, "services": texts,
                "newPods": count, "podsRefusing": count, "refusedConnections": count,
                "refusingForSeconds": { "type": "number", "description": "The latest refusal after T_ready" },
                "routers": list("Router"),
                "message": text
            })),
        ),
        (
            "RolloutFinding",
            schema(json!({
                "namespace": text, "workload": text,
                "newPods": { "type": "integer", "description": "New pods followed by an old pod's deletion within their window" },
                "podsAffected": { "type": "integer", "description": "Of them, those some node was not routing to yet at that deletion" },
                "maxNodesAffected": count,
                "message": text
            })),
        ),
        (
            "WorkloadStartup",
            schema(json!({
                "namespace": text, "workload": text, "services": texts,
                "newPods": count, "podsRefusing": count, "refusedConnections": count, "resetConnections": count,
                "additionP50Seconds": seconds, "additionP99Seconds": seconds,
                "readyToFirstAcceptedP50Seconds": seconds, "readyToFirstAcceptedP99Seconds": seconds
            })),
        ),
        (
            "PropagationSummary",
            schema(json!({
                "node": nullable_text,
                "kind": { "type": "string", "nullable": true, "enum": ["node", "workload", "external", null] },
                "samples": count,
                "notAdded": { "type": "integer", "description": "Startups in which the node had not started routing by the window's end" },
                "p50Seconds": seconds, "p99Seconds": seconds, "maxSeconds": seconds
            })),
        ),
        (
            "StartupRecord",
            schema(json!({
                "podUid": text, "namespace": text, "podName": text, "workload": text, "services": texts,
                "podIp": text, "hostNode": nullable_text,
                "readyUnixNanos": { "type": "integer", "format": "int64", "description": "T_ready: the aggregator's receipt of the EndpointSlice change that showed the endpoint ready" },
                "podReadyConditionUnixNanos": time,
                "windowSeconds": { "type": "number" },
                "nodes": list("NodeAddition"),
                "routers": list("RouterStartup"),
                "refusedConnections": count, "resetConnections": count,
                "firstAcceptedUnixNanos": time,
                "readyToFirstAcceptedSeconds": seconds,
                "lastRefusalSeconds": seconds,
                "oldPodDeletedSeconds": { "type": "number", "nullable": true, "description": "The first deletion of an old pod of the workload after T_ready, seconds after it" },
                "nodesNotRoutingAtOldDeletion": { "type": "integer", "description": "Expected nodes not routing to this pod yet at that deletion" }
            })),
        ),
        (
            "NodeAddition",
            schema(json!({
                "node": text,
                "rulesAddedUnixNanos": time,
                "propagationSeconds": { "type": "number", "nullable": true, "description": "T_added(n) - T_ready; negative when the node's dataplane selected the endpoint before the aggregator saw it ready" },
                "errorSeconds": seconds,
                "clockUncertaintySeconds": { "type": "number", "nullable": true, "description": "The clock-uncertainty part of errorSeconds" },
                "notAdded": { "type": "boolean" }
            })),
        ),
        (
            "RouterStartup",
            json!({ "type": "object", "properties": router_startup }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use observer_proto::api::startup::{
        NodeAddition, PropagationSummary, RolloutFinding, RouterStartup, StartupFinding,
        StartupRecord, StartupReport, WorkloadStartup,
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

    #[test]
    fn the_schemas_list_every_field_the_answer_has() {
        let documented: std::collections::BTreeMap<&str, BTreeSet<String>> = schemas()
            .into_iter()
            .map(|(name, s)| {
                (
                    name,
                    s["properties"]
                        .as_object()
                        .unwrap()
                        .keys()
                        .cloned()
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            documented["StartupReport"],
            fields(StartupReport::default())
        );
        assert_eq!(
            documented["StartupFinding"],
            fields(StartupFinding::default())
        );
        assert_eq!(
            documented["RolloutFinding"],
            fields(RolloutFinding::default())
        );
        assert_eq!(
            documented["WorkloadStartup"],
            fields(WorkloadStartup::default())
        );
        assert_eq!(
            documented["PropagationSummary"],
            fields(PropagationSummary::default())
        );
        assert_eq!(
            documented["StartupRecord"],
            fields(StartupRecord::default())
        );
        assert_eq!(documented["NodeAddition"], fields(NodeAddition::default()));
        assert_eq!(
            documented["RouterStartup"],
            fields(RouterStartup::default())
        );
    }

    #[test]
    fn the_document_has_the_path_and_every_schema_it_refers_to() {
        let doc = crate::openapi::document();
        assert!(doc["paths"]["/v1/startup"]["get"].is_object());
        for (name, _) in schemas() {
            assert!(doc["components"]["schemas"][name].is_object(), "{name}");
        }
        assert!(doc["components"]["schemas"]["Router"].is_object());
    }
}
