//! The real kubectl drives the lab: it lists and describes the lab's pods,
//! watches them and the EndpointSlice, and a pod it deletes goes the
//! rollouts' way (preStop, SIGTERM, terminating endpoint, every node's
//! proxy) and is measured by the agents and recorded by the aggregator.

mod common;

use std::time::Duration;

use apiserver_double::kubectl::Kubectl;
use serde_json::Value;

use lab::{
    api::{NAMESPACE, PodTermination, SERVICE},
    scenario::LabConfig,
    server::ShutdownMode,
};

/// Whether the endpoint `ip` is terminating in a line of the custom
/// columns `IP,IP,...  BOOL,BOOL,...`.
fn terminating(line: &str, ip: &str) -> Option<bool> {
    let (ips, flags) = line.split_once(char::is_whitespace)?;
    let i = ips.split(',').position(|a| a == ip)?;
    flags.trim().split(',').nth(i)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_deletes_a_lab_pod_and_the_aggregator_measures_it() {
    if !lab::root::root_or_skip("kubectl_deletes_a_lab_pod_and_the_aggregator_measures_it") {
        return;
    }
    let _serial = common::SERIAL.lock().await;
    let dir = common::work_dir("kubectl");
    let completion = Duration::from_secs(5);
    // A preStop long enough that a forced deletion visibly cuts it short.
    let termination = PodTermination {
        pre_stop: Duration::from_secs(3),
        grace: Duration::from_secs(5),
    };
    let (lab, observer) = common::start_in(
        &dir,
        LabConfig {
            termination,
            ..common::lab_config("100ms..400ms", ShutdownMode::Graceful, 5)
        },
        completion,
    )
    .await;
    // Where the API listens: inside the control-plane namespace.
    let kubectl = Kubectl::new(
        observer.api().kubeconfig().to_owned(),
        dir.join("kubectl-cache"),
    )
    .in_netns(lab.cluster.control_plane.name());

    // get -o json parses and lists exactly the lab's pods.
    let list: Value = serde_json::from_str(
        &kubectl
            .ok(&["get", "pods", "-o", "json"])
            .await
            .expect("kubectl"),
    )
    .expect("kubectl get pods -o json is JSON");
    let mut listed: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    listed.sort_unstable();
    let records = lab.kubelet().records();
    let mut running: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    running.sort_unstable();
    assert_eq!(listed, running);
    let victim = &records[0];

    let wide = kubectl
        .ok(&["get", "pods", "-o", "wide"])
        .await
        .expect("kubectl");
    assert!(
        wide.lines().any(|l| l.starts_with(&victim.name)
            && l.contains("1/1")
            && l.contains("Running")
            && l.contains(&victim.ip.to_string())
            && l.contains(&victim.node)),
        "{wide}"
    );
    let described = kubectl
        .ok(&["describe", "pod", &victim.name])
        .await
        .expect("kubectl");
    for want in [victim.name.as_str(), &victim.ip.to_string(), &victim.node] {
        assert!(
            described.contains(want),
            "describe lacks {want}:\n{described}"
        );
    }

    let mut pod_lines = kubectl
        .watch(&["get", "pods", "-w", "--output-watch-events"])
        .expect("get pods -w");
    let mut slice_lines = kubectl.watch(&[
        "get",
        "endpointslices",
        "-w",
        "-o",
        "custom-columns=IP:.endpoints[*].addresses[0],TERMINATING:.endpoints[*].conditions.terminating",
    ])
    .expect("get endpointslices -w");
    let ip = victim.ip.to_string();
    assert!(
        pod_lines
            .until(Duration::from_secs(20), |l| l.contains(&victim.name))
            .await
            .is_some(),
        "get -w never listed {}",
        victim.name
    );
    assert!(
        slice_lines
            .until(Duration::from_secs(20), |l| {
                terminating(l, &ip) == Some(false)
            })
            .await
            .is_some(),
        "the EndpointSlice watch never showed {ip} serving"
    );

    let deleted = kubectl
        .ok(&["delete", "pod", &victim.name, "--grace-period=3"])
        .await
        .expect("kubectl");
    assert!(
        deleted.contains(&format!("pod \"{}\" deleted", victim.name)),
        "{deleted}"
    );
    // kubectl waits until the pod is gone: by then its endpoint was
    // terminating and the kubelet ran the preStop and SIGTERM.
    assert!(
        !lab.kubelet()
            .records()
            .iter()
            .any(|r| r.name == victim.name),
        "{} still runs",
        victim.name
    );
    assert!(
        pod_lines
            .until(Duration::from_secs(10), |l| l.starts_with("MODIFIED")
                && l.contains(&victim.name)
                && l.contains("Terminating"))
            .await
            .is_some(),
        "get -w never showed {} Terminating",
        victim.name
    );
    assert!(
        pod_lines
            .until(Duration::from_secs(10), |l| l.starts_with("DELETED")
                && l.contains(&victim.name))
            .await
            .is_some(),
        "get -w never showed {} deleted",
        victim.name
    );
    assert!(
        slice_lines
            .until(Duration::from_secs(10), |l| {
                terminating(l, &ip) == Some(true)
            })
            .await
            .is_some(),
        "the EndpointSlice watch never showed {ip} terminating"
    );

    // Measured on every node and recorded within the completion time.
    let deadline = tokio::time::Instant::now() + completion + Duration::from_secs(10);
    let record = loop {
        let records = observer
            .aggregator
            .deletions(NAMESPACE, SERVICE)
            .await
            .expect("deletions");
        if let Some(r) = records.into_iter().find(|r| r.pod_uid == victim.uid) {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the aggregator never recorded {}",
            victim.name
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(record.pod_name, victim.name);
    assert!(record.complete, "{record:?}");
    assert!(record.missing_nodes.is_empty(), "{record:?}");
    assert_eq!(record.nodes.len(), lab.cluster.nodes.len(), "{record:?}");
    for node in &record.nodes {
        let latency = node.latency_seconds.expect("a latency per node");
        // The injected delay is 100..400 ms after the endpoint turned
        // terminating.
        assert!((0.05..2.0).contains(&latency), "{node:?}");
    }

    // Errors as the API server words them.
    let missing = kubectl
        .run(&["get", "pod", &victim.name])
        .await
        .expect("kubectl");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains(&format!(
            "Error from server (NotFound): pods \"{}\" not found",
            victim.name
        )),
        "{stderr}"
    );
    let other = &records[1].name;
    let label = kubectl
        .run(&["label", "pod", other, "tier=web"])
        .await
        .expect("kubectl");
    assert!(!label.status.success());
    let stderr = String::from_utf8_lossy(&label.stderr);
    assert!(
        stderr.contains("Error from server (MethodNotAllowed): patch is not supported"),
        "{stderr}"
    );

    // A second, forced deletion cuts a running termination short: the
    // kill comes at once, not after the 3 s preStop sleep.
    let last = &records[2].name;
    kubectl
        .ok(&["delete", "pod", last, "--wait=false"])
        .await
        .expect("kubectl");
    assert!(lab.kubelet().terminating().contains(last));
    let forced = std::time::Instant::now();
    kubectl
        .ok(&["delete", "pod", last, "--grace-period=0", "--force"])
        .await
        .expect("kubectl");
    while lab.kubelet().terminating().contains(last) {
        assert!(
            forced.elapsed() < Duration::from_millis(1500),
            "{last} still terminating {:?} after a forced deletion",
            forced.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    common::stop(observer, lab).await;
}
