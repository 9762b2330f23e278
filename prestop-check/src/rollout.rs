//! Argo Rollouts' `Rollout` (argoproj.io/v1alpha1): a Deployment with a
//! progressive delivery strategy. Its pod template and selector are the
//! core types; the rest of its spec is Argo's and is not read, only named
//! so that a misspelled field is still reported.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RolloutSpec,
    pub status: Option<Value>,
}

/// Fields of Argo Rollouts' v1alpha1 RolloutSpec.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    pub selector: Option<LabelSelector>,
    pub template: Option<PodTemplateSpec>,
    /// A reference to a Deployment whose template the Rollout uses: that
    /// Deployment, where the template lives, is what gets checked.
    pub workload_ref: Option<Value>,
    pub replicas: Option<Value>,
    pub min_ready_seconds: Option<Value>,
    pub revision_history_limit: Option<Value>,
    pub paused: Option<Value>,
    pub progress_deadline_seconds: Option<Value>,
    pub progress_deadline_abort: Option<Value>,
    pub restart_at: Option<Value>,
    pub rollback_window: Option<Value>,
    pub strategy: Option<Value>,
    pub analysis: Option<Value>,
}
