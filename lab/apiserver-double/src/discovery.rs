//! Discovery as the real API server serves it: `/api` and `/apis` in both
//! the aggregated form (apidiscovery.k8s.io/v2, what kubectl 1.26+ and
//! kube-rs ask for first) and the legacy one (`APIVersions`,
//! `APIGroupList`), and the per-group-version `APIResourceList`s. The
//! documents list the resources the double holds, with the verbs it serves.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, APIVersions, GroupVersionForDiscovery,
    ObjectMeta, ServerAddressByClientCIDR,
};
use kube::core::discovery::v2::{
    APIGroupDiscovery, APIGroupDiscoveryList, APIResourceDiscovery, APIVersionDiscovery,
    GroupVersionKind,
};
use serde::Serialize;
use serde_json::Value;

use crate::Kind;

/// The media type of the aggregated discovery documents; a client that
/// accepts it gets them, any other gets the legacy form.
pub const AGGREGATED_V2: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

const READ: &[&str] = &["get", "list", "watch"];
/// Pods can also be deleted: the lab's kubelet carries a deletion out.
const READ_DELETE: &[&str] = &["delete", "get", "list", "watch"];

/// One resource type the double serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub verbs: &'static [&'static str],
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
}

/// Every resource type the double serves, as the real API server
/// describes them (names, short names, categories, scope).
pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        verbs: READ_DELETE,
        short_names: &["po"],
        categories: &["all"],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        verbs: READ,
        short_names: &["svc"],
        categories: &["all"],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        verbs: READ,
        short_names: &["no"],
        categories: &[],
    },
    Resource {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        verbs: READ,
        short_names: &["ev"],
        categories: &[],
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        verbs: READ,
        short_names: &[],
        categories: &[],
    },
];

impl Resource {
    pub fn group_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        let prefix = if self.group.is_empty() {
            format!("api/{}", self.version)
        } else {
            format!("apis/{}/{}", self.group, self.version)
        };
        Kind {
            prefix,
            plural: self.plural.into(),
            api_version: self.group_version(),
            kind: self.kind.into(),
        }
    }

    pub fn allows(&self, verb: &str) -> bool {
        self.verbs.contains(&verb)
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn legacy(&self) -> APIResource {
        APIResource {
            name: self.plural.into(),
            singular_name: self.singular.into(),
            namespaced: self.namespaced,
            kind: self.kind.into(),
            verbs: Self::strings(self.verbs),
            short_names: (!self.short_names.is_empty()).then(|| Self::strings(self.short_names)),
            categories: (!self.categories.is_empty()).then(|| Self::strings(self.categories)),
            ..Default::default()
        }
    }

    fn aggregated(&self) -> APIResourceDiscovery {
        APIResourceDiscovery {
            resource: Some(self.plural.into()),
            response_kind: Some(GroupVersionKind {
                group: Some(self.group.into()),
                version: Some(self.version.into()),
                kind: Some(self.kind.into()),
            }),
            scope: Some(
                if self.namespaced {
                    "Namespaced"
                } else {
                    "Cluster"
                }
                .into(),
            ),
            singular_resource: Some(self.singular.into()),
            verbs: Self::strings(self.verbs),
            short_names: Self::strings(self.short_names),
            categories: Self::strings(self.categories),
            subresources: Vec::new(),
        }
    }
}

/// The resource served at `prefix` (`api/v1`, `apis/<group>/<version>`)
/// under `plural`.
pub fn find(prefix: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.plural == plural && r.kind().prefix == prefix)
}

/// Adds the `apiVersion` and `kind` a Kubernetes decoder needs to find the
/// type (the discovery types of kube-core and some of k8s-openapi's do not
/// serialize them).
fn typed(api_version: &str, kind: &str, body: impl Serialize) -> Value {
    let mut v = serde_json::to_value(body).unwrap_or_default();
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    v
}

/// Named groups with their versions, in the order of [`RESOURCES`].
fn named_groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) if !versions.contains(&r.version) => versions.push(r.version),
            Some(_) => {}
            None => groups.push((r.group, vec![r.version])),
        }
    }
    groups
}

fn version_discovery(group: &str, version: &str) -> APIVersionDiscovery {
    APIVersionDiscovery {
        version: Some(version.into()),
        resources: RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .map(Resource::aggregated)
            .collect(),
        freshness: Some("Current".into()),
    }
}

fn aggregated_list(items: Vec<APIGroupDiscovery>) -> Value {
    typed(
        "apidiscovery.k8s.io/v2",
        "APIGroupDiscoveryList",
        APIGroupDiscoveryList {
            metadata: Some(Default::default()),
            items,
        },
    )
}

/// `GET /api` with the aggregated media type: the core group.
pub fn core_aggregated() -> Value {
    aggregated_list(vec![APIGroupDiscovery {
        metadata: Some(ObjectMeta::default()),
        versions: vec![version_discovery("", "v1")],
    }])
}

/// `GET /apis` with the aggregated media type: every named group.
pub fn groups_aggregated() -> Value {
    aggregated_list(
        named_groups()
            .into_iter()
            .map(|(group, versions)| APIGroupDiscovery {
                metadata: Some(ObjectMeta {
                    name: Some(group.into()),
                    ..Default::default()
                }),
                versions: versions
                    .into_iter()
                    .map(|v| version_discovery(group, v))
                    .collect(),
            })
            .collect(),
    )
}

/// `GET /api`, legacy form. `server` is the address clients reach the
/// double at (`host:port`).
pub fn core_versions(server: &str) -> Value {
    typed(
        "v1",
        "APIVersions",
        APIVersions {
            versions: vec!["v1".into()],
            server_address_by_client_cidrs: vec![ServerAddressByClientCIDR {
                client_cidr: "0.0.0.0/0".into(),
                server_address: server.into(),
            }],
        },
    )
}

/// `GET /apis`, legacy form.
pub fn group_list() -> Value {
    let groups = named_groups()
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<GroupVersionForDiscovery> = versions
                .into_iter()
                .map(|v| GroupVersionForDiscovery {
                    group_version: format!("{group}/{v}"),
                    version: v.into(),
                })
                .collect();
            APIGroup {
                name: group.into(),
                preferred_version: versions.first().cloned(),
                versions,
                ..Default::default()
            }
        })
        .collect();
    typed("v1", "APIGroupList", APIGroupList { groups })
}

/// `GET /api/<version>` or `GET /apis/<group>/<version>`; `None` for a
/// group version the double does not serve.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<APIResource> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(Resource::legacy)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(typed(
        "v1",
        "APIResourceList",
        APIResourceList {
            group_version,
            resources,
        },
    ))
}

/// `GET /version`: the kubectl dispatcher of some distributions picks
/// its binary by the server's minor version.
pub fn version() -> Value {
    serde_json::json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-lab",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23",
        "compiler": "gc",
        "platform": "linux/amd64",
        "emulationMajor": "1",
        "emulationMinor": "32",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource<'a>(list: &'a APIResourceList, name: &str) -> &'a APIResource {
        list.resources
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{name} missing from {}", list.group_version))
    }

    #[test]
    fn core_resource_list_has_kubectl_names_verbs_and_scope() {
        let v = resource_list("", "v1").expect("core v1");
        assert_eq!(v["kind"], "APIResourceList");
        assert_eq!(v["apiVersion"], "v1");
        let list: APIResourceList = serde_json::from_value(v).unwrap();
        assert_eq!(list.group_version, "v1");
        let pods = resource(&list, "pods");
        assert_eq!(pods.kind, "Pod");
        assert_eq!(pods.singular_name, "pod");
        assert!(pods.namespaced);
        assert_eq!(pods.short_names.as_deref(), Some(&["po".to_string()][..]));
        assert_eq!(pods.categories.as_deref(), Some(&["all".to_string()][..]));
        for verb in ["get", "list", "watch", "delete"] {
            assert!(pods.verbs.iter().any(|v| v == verb), "pods lack {verb}");
        }
        let nodes = resource(&list, "nodes");
        assert!(!nodes.namespaced);
        assert_eq!(nodes.short_names.as_deref(), Some(&["no".to_string()][..]));
        assert!(!nodes.verbs.iter().any(|v| v == "delete"));
        let services = resource(&list, "services");
        assert_eq!(
            services.short_names.as_deref(),
            Some(&["svc".to_string()][..])
        );
        assert!(services.namespaced);
        assert!(resource_list("", "v2").is_none());
    }

    #[test]
    fn named_group_documents_agree() {
        let v = resource_list("discovery.k8s.io", "v1").expect("discovery.k8s.io/v1");
        let list: APIResourceList = serde_json::from_value(v).unwrap();
        assert_eq!(list.group_version, "discovery.k8s.io/v1");
        let slices = resource(&list, "endpointslices");
        assert_eq!(slices.kind, "EndpointSlice");
        assert!(slices.namespaced);
        assert_eq!(slices.verbs, ["get", "list", "watch"]);

        let v = group_list();
        assert_eq!(v["kind"], "APIGroupList");
        let groups: APIGroupList = serde_json::from_value(v).unwrap();
        assert_eq!(groups.groups.len(), 1);
        let g = &groups.groups[0];
        assert_eq!(g.name, "discovery.k8s.io");
        assert_eq!(g.versions[0].group_version, "discovery.k8s.io/v1");
        assert_eq!(g.preferred_version.as_ref(), Some(&g.versions[0]));

        let v = core_versions("127.0.0.1:6443");
        assert_eq!(v["kind"], "APIVersions");
        let core: APIVersions = serde_json::from_value(v).unwrap();
        assert_eq!(core.versions, ["v1"]);
    }

    #[test]
    fn aggregated_documents_carry_type_scope_and_response_kind() {
        let v = core_aggregated();
        assert_eq!(v["kind"], "APIGroupDiscoveryList");
        assert_eq!(v["apiVersion"], "apidiscovery.k8s.io/v2");
        let core: APIGroupDiscoveryList = serde_json::from_value(v).unwrap();
        assert_eq!(core.items.len(), 1);
        let group = &core.items[0];
        assert_eq!(
            group.metadata.as_ref().and_then(|m| m.name.as_deref()),
            None
        );
        let v1 = &group.versions[0];
        assert_eq!(v1.version.as_deref(), Some("v1"));
        assert_eq!(v1.freshness.as_deref(), Some("Current"));
        let pods = v1
            .resources
            .iter()
            .find(|r| r.resource.as_deref() == Some("pods"))
            .expect("pods");
        assert_eq!(pods.scope.as_deref(), Some("Namespaced"));
        assert_eq!(pods.singular_resource.as_deref(), Some("pod"));
        assert_eq!(pods.short_names, ["po"]);
        let kind = pods.response_kind.as_ref().expect("responseKind");
        assert_eq!(
            (
                kind.group.as_deref(),
                kind.version.as_deref(),
                kind.kind.as_deref()
            ),
            (Some(""), Some("v1"), Some("Pod"))
        );
        let nodes = v1
            .resources
            .iter()
            .find(|r| r.resource.as_deref() == Some("nodes"))
            .expect("nodes");
        assert_eq!(nodes.scope.as_deref(), Some("Cluster"));

        let named: APIGroupDiscoveryList = serde_json::from_value(groups_aggregated()).unwrap();
        let names: Vec<_> = named
            .items
            .iter()
            .map(|g| g.metadata.as_ref().and_then(|m| m.name.clone()))
            .collect();
        assert_eq!(names, [Some("discovery.k8s.io".to_string())]);
        let slices = &named.items[0].versions[0].resources[0];
        assert_eq!(slices.resource.as_deref(), Some("endpointslices"));
        assert_eq!(
            slices
                .response_kind
                .as_ref()
                .and_then(|k| k.group.as_deref()),
            Some("discovery.k8s.io")
        );
    }

    #[test]
    fn every_resource_is_found_by_its_path() {
        for r in RESOURCES {
            let found = find(&r.kind().prefix, r.plural).expect("found");
            assert_eq!(found, r);
        }
        assert!(find("api/v1", "deployments").is_none());
        assert!(find("apis/discovery.k8s.io/v1", "pods").is_none());
    }
}
