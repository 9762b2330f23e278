//! Equality-based label and field selectors (`a=b`, `a==b`, `a!=b`, `a`,
//! `!a`), the forms the aggregator and kube-proxy-style clients use.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Req>);

impl Selector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Req::NotExists(k.trim().into())
            } else if part.contains([' ', '(']) {
                return Err(format!(
                    "unsupported selector {part:?} (set-based selectors are not implemented)"
                ));
            } else {
                Req::Exists(part.into())
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Matches against a lookup of keys (label names or field paths).
    pub fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
            // Kubernetes: `a!=b` also matches objects without `a`.
            Req::Ne(k, v) => get(k).as_deref() != Some(v.as_str()),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }

    pub fn matches_labels(&self, obj: &Value) -> bool {
        self.matches(|k| {
            obj.pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
    }

    /// Field paths such as `metadata.name` or `spec.nodeName`.
    pub fn matches_fields(&self, obj: &Value) -> bool {
        self.matches(|k| {
            let ptr = format!("/{}", k.replace('.', "/"));
            match obj.pointer(&ptr) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Null) | None => Some(String::new()),
                Some(v) => Some(v.to_string()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_and_field_selectors() {
        let pod = json!({"metadata": {"name": "p", "labels": {"app": "web", "tier": "fe"}}, "spec": {"nodeName": "n1"}});
        let m = |s: &str| Selector::parse(s).unwrap().matches_labels(&pod);
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("missing!=x"));
        assert!(m("!missing"));
        assert!(!m("tier=be"));
        assert!(m(""));
        let f = |s: &str| Selector::parse(s).unwrap().matches_fields(&pod);
        assert!(f("spec.nodeName=n1"));
        assert!(f("metadata.name!=q"));
        assert!(!f("spec.nodeName=n2"));
        assert!(f("spec.missing="));
        assert!(Selector::parse("app in (a,b)").is_err());
    }
}
