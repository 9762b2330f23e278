//! The double against the real kube client: list, watch, bookmarks, 410 and
//! graceful deletion semantics.

use std::time::Duration;

use apiserver_double::ApiServerDouble;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, ObjectMeta, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};

fn pod(ns: &str, name: &str, app: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some([("app".to_string(), app.to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn next<S: futures::Stream + Unpin>(s: &mut S) -> S::Item {
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("stream stalled")
        .expect("stream ended")
}

#[tokio::test]
async fn list_get_and_selectors() {
    let d = ApiServerDouble::start().await.unwrap();
    d.create(&pod("a", "p1", "web")).unwrap();
    d.create(&pod("a", "p2", "db")).unwrap();
    d.create(&pod("b", "p3", "web")).unwrap();
    assert!(d.create(&pod("a", "p1", "web")).is_err());
    let client = d.client().unwrap();
    let all: Api<Pod> = Api::all(client.clone());
    let l = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(l.items.len(), 3);
    assert_eq!(
        l.metadata.resource_version.as_deref(),
        Some(d.resource_version().to_string().as_str())
    );
    let web = all
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(web.items.len(), 2);
    let by_name = all
        .list(&ListParams::default().fields("metadata.name=p2"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let ns_a: Api<Pod> = Api::namespaced(client.clone(), "a");
    assert_eq!(
        ns_a.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
    let p1 = ns_a.get("p1").await.unwrap();
    assert!(p1.metadata.uid.is_some());
    assert!(ns_a.get("nope").await.is_err());
    let nodes: Api<Node> = Api::all(client);
    assert!(
        nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn graceful_delete_sets_timestamps_then_finishes() {
    let d = ApiServerDouble::start().await.unwrap();
    d.create(&pod("a", "p1", "web")).unwrap();
    let before = k8s_openapi::jiff::Timestamp::now().as_second();
    d.delete::<Pod>("a", "p1", 30).unwrap();
    let p: Pod = d.get("a", "p1").unwrap();
    let ts = p.metadata.deletion_timestamp.unwrap().0.as_second();
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
    assert!(
        (before + 30..=before + 31).contains(&ts),
        "{ts} vs {before}"
    );
    // A shorter grace keeps the request time: new deadline = start + 5.
    d.delete::<Pod>("a", "p1", 5).unwrap();
    let p: Pod = d.get("a", "p1").unwrap();
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(5));
    assert_eq!(
        p.metadata.deletion_timestamp.unwrap().0.as_second(),
        ts - 25
    );
    d.finish_deletion::<Pod>("a", "p1").unwrap();
    assert!(d.get::<Pod>("a", "p1").is_none());
}

#[tokio::test]
async fn raw_watch_resumes_bookmarks_and_expires() {
    let d = ApiServerDouble::start().await.unwrap();
    let api: Api<Pod> = Api::all(d.client().unwrap());
    d.create(&pod("a", "p1", "web")).unwrap();
    let rv = d.resource_version().to_string();
    d.create(&pod("a", "p2", "web")).unwrap();
    // Resuming from rv replays only what came after it.
    let mut s = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut s).await.unwrap() {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("p2")),
        e => panic!("{e:?}"),
    }
    d.delete::<Pod>("a", "p2", 10).unwrap();
    match next(&mut s).await.unwrap() {
        WatchEvent::Modified(p) => assert!(p.metadata.deletion_timestamp.is_some()),
        e => panic!("{e:?}"),
    }
    d.bookmark();
    match next(&mut s).await.unwrap() {
        WatchEvent::Bookmark(b) => assert_eq!(
            b.metadata.resource_version,
            d.resource_version().to_string()
        ),
        e => panic!("{e:?}"),
    }
    d.finish_deletion::<Pod>("a", "p2").unwrap();
    assert!(matches!(
        next(&mut s).await.unwrap(),
        WatchEvent::Deleted(_)
    ));
    d.compact();
    let mut old = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut old).await.unwrap() {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        e => panic!("{e:?}"),
    }
}

#[tokio::test]
async fn kube_watcher_relists_after_410_and_reconnects() {
    let d = ApiServerDouble::start().await.unwrap();
    d.create(&pod("a", "p1", "web")).unwrap();
    let api: Api<Pod> = Api::all(d.client().unwrap());
    let mut w = watcher::watcher(api, watcher::Config::default()).boxed();
    assert!(matches!(next(&mut w).await.unwrap(), Event::Init));
    assert!(matches!(next(&mut w).await.unwrap(), Event::InitApply(_)));
    assert!(matches!(next(&mut w).await.unwrap(), Event::InitDone));

    // The watcher opens its watch when polled; poll it while waiting.
    let poll_until_watching = async |w: &mut _, n: u64| {
        for _ in 0..100 {
            if d.watch_requests() >= n {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), StreamExt::next(w)).await;
        }
        panic!("watch {n} never started");
    };
    poll_until_watching(&mut w, 1).await;

    // A dropped connection: the watcher resumes from its resourceVersion and
    // sees exactly the events it missed.
    d.disconnect_watches();
    d.create(&pod("a", "p2", "web")).unwrap();
    match next(&mut w).await.unwrap() {
        Event::Apply(p) => assert_eq!(p.metadata.name.as_deref(), Some("p2")),
        e => panic!("{e:?}"),
    }
    assert_eq!(d.watch_requests(), 2);

    // History compacted while disconnected: 410, then a full relist.
    d.disconnect_watches();
    d.create(&pod("a", "p3", "web")).unwrap();
    d.compact();
    let mut relisted = Vec::new();
    loop {
        match next(&mut w).await {
            Err(_) => continue, // the 410 surfaces as an error event
            Ok(Event::Init) => relisted.clear(),
            Ok(Event::InitApply(p)) => relisted.push(p.metadata.name.unwrap()),
            Ok(Event::InitDone) => break,
            Ok(e) => panic!("{e:?}"),
        }
    }
    relisted.sort();
    assert_eq!(relisted, ["p1", "p2", "p3"]);
    assert_eq!(d.watch_requests(), 3);
}

#[tokio::test]
async fn generated_kubeconfig_reaches_the_double() {
    let d = ApiServerDouble::start().await.unwrap();
    d.create(&pod("a", "p1", "web")).unwrap();
    let kc = kube::config::Kubeconfig::from_yaml(&d.kubeconfig_yaml()).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(cfg).unwrap();
    let pods: Api<Pod> = Api::all(client);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}
