//! The Nodes, Pods and EndpointSlices tests put into the double, shaped as
//! the kubelet and the EndpointSlice controller write them (the fields the
//! aggregator reads).

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeSpec, NodeStatus, ObjectReference, Pod, PodSpec, PodStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A node with its InternalIP and pod CIDR: the aggregator's Node list
/// (only listed nodes are expected to report, and may).
pub fn node(name: &str, ip: &str, cidr: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(cidr.into()),
            pod_cidrs: Some(vec![cidr.into()]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                address: ip.into(),
                type_: "InternalIP".into(),
            }]),
            ..Default::default()
        }),
    }
}

/// A running pod with its IP, scheduled on `node`.
pub fn pod(namespace: &str, name: &str, ip: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            ..Default::default()
        }),
    }
}

/// The slice of Service `service` listing the given (pod, ready,
/// terminating) endpoints on TCP port 8080. `serving` follows Kubernetes:
/// ready, or terminating and still passing its probe (taken as true).
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    endpoints: &[(&Pod, bool, bool)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-abcde")),
            namespace: Some(namespace.into()),
            labels: Some(
                [(
                    "kubernetes.io/service-name".to_string(),
                    service.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: endpoints
            .iter()
            .map(|(pod, ready, terminating)| Endpoint {
                addresses: pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.clone())
                    .into_iter()
                    .collect(),
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    serving: Some(*ready || *terminating),
                    terminating: Some(*terminating),
                }),
                node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    namespace: pod.metadata.namespace.clone(),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}
