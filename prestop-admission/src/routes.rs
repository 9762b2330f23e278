//! Which Services route to a workload: every Service with a selector, kept
//! current by a watch, so "routed" means what it means for prestop-check (a
//! Service in the namespace selects the pod template's labels).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use prestop_check::workload::{RoutingService, Workload};

type Key = (String, String);

#[derive(Clone, Default)]
pub struct Routes {
    inner: Arc<RwLock<State>>,
}

#[derive(Default)]
struct State {
    services: HashMap<Key, RoutingService>,
    /// A relist's objects, swapped in when it ends.
    relist: Option<HashMap<Key, RoutingService>>,
    synced: bool,
}

fn key(svc: &Service) -> Key {
    (
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

impl Routes {
    /// Routes that are known complete from the start (tests, benchmarks).
    pub fn of(services: impl IntoIterator<Item = RoutingService>) -> Self {
        let routes = Self::default();
        {
            let mut s = routes.write();
            s.services = services
                .into_iter()
                .map(|r| ((r.namespace.clone(), r.name.clone()), r))
                .collect();
            s.synced = true;
        }
        routes
    }

    /// The Services selecting `w`'s pods.
    pub fn services_for(&self, w: &Workload) -> Vec<RoutingService> {
        self.read()
            .services
            .values()
            .filter(|s| s.selects(w))
            .cloned()
            .collect()
    }

    /// Every routing Service, for the recommendation refresh.
    pub fn all(&self) -> Vec<(String, String)> {
        self.read().services.keys().cloned().collect()
    }

    /// Whether the first list has completed.
    pub fn synced(&self) -> bool {
        self.read().synced
    }

    /// Applies one watch event; Services without a selector are dropped.
    pub fn apply(&self, event: Event<Service>) {
        let mut s = self.write();
        match event {
            Event::Apply(svc) => {
                let k = key(&svc);
                match RoutingService::of(svc, &k.0) {
                    Some(r) => s.services.insert(k, r),
                    None => s.services.remove(&k),
                };
            }
            Event::Delete(svc) => {
                s.services.remove(&key(&svc));
            }
            Event::Init => s.relist = Some(HashMap::new()),
            Event::InitApply(svc) => {
                let k = key(&svc);
                if let (Some(relist), Some(r)) = (s.relist.as_mut(), RoutingService::of(svc, &k.0))
                {
                    relist.insert(k, r);
                }
            }
            Event::InitDone => {
                if let Some(relist) = s.relist.take() {
                    s.services = relist;
                }
                s.synced = true;
            }
        }
    }

    /// Watches Services until the stream ends (it retries with backoff).
    pub async fn watch(&self, client: Client) {
        let mut events = std::pin::pin!(
            watcher::watcher(Api::<Service>::all(client), watcher::Config::default())
                .default_backoff()
        );
        while let Some(event) = events.next().await {
            match event {
                Ok(e) => self.apply(e),
                Err(e) => tracing::warn!(error = %e, "watching Services"),
            }
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, app: Option<&str>) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": app.map(|a| serde_json::json!({"app": a})), "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[test]
    fn a_relist_replaces_what_was_known_and_selectorless_services_route_nothing() {
        let routes = Routes::default();
        assert!(!routes.synced());
        routes.apply(Event::Apply(service("old", Some("web"))));
        routes.apply(Event::Init);
        routes.apply(Event::InitApply(service("web", Some("web"))));
        routes.apply(Event::InitApply(service("external", None)));
        assert_eq!(routes.all().len(), 1, "the relist is not in force yet");
        routes.apply(Event::InitDone);
        assert!(routes.synced());
        assert_eq!(routes.all(), [("shop".to_string(), "web".to_string())]);
        routes.apply(Event::Apply(service("web", None)));
        assert!(routes.all().is_empty(), "a selector removed stops routing");
    }
}
