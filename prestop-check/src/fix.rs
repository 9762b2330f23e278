//! `--fix` and the ready patches: surgical edits of the manifest text at the
//! located nodes, so comments, key order, quoting and layout survive.

use crate::check::{Change, HookStyle};
use crate::hook::Hook;
use crate::workload::Workload;
use crate::yaml::Node;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub start: usize,
    pub end: usize,
    pub text: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FixError {
    #[error("{object} container {container}: {reason}; apply the patch by hand")]
    Container {
        object: String,
        container: String,
        reason: String,
    },
    #[error("{object}: {reason}; apply the patch by hand")]
    Workload { object: String, reason: String },
}

/// A strategic-merge patch in YAML, for `kubectl patch` or a Kustomize
/// patch file; containers merge by name.
pub fn patch_text(w: &Workload, change: &Change, style: HookStyle) -> String {
    let mut out = String::new();
    let mut indent = 0;
    for key in w.pod_spec_path {
        out += &format!("{:indent$}{key}:\n", "");
        indent += 2;
    }
    if let Some(grace) = change.grace_seconds {
        out += &format!("{:indent$}terminationGracePeriodSeconds: {grace}\n", "");
    }
    if !change.pre_stop.is_empty() {
        out += &format!("{:indent$}containers:\n", "");
        for (name, seconds) in &change.pre_stop {
            out += &format!("{:indent$}- name: {name}\n", "");
            out += &lifecycle_block(indent + 2, *seconds, style);
        }
    }
    out
}

/// [`patch_text`] as JSON, for `kubectl patch -p` and admission messages.
pub fn patch_json(w: &Workload, change: &Change, style: HookStyle) -> serde_json::Value {
    let mut spec = serde_json::Map::new();
    if let Some(grace) = change.grace_seconds {
        spec.insert("terminationGracePeriodSeconds".into(), grace.into());
    }
    if !change.pre_stop.is_empty() {
        let containers = change
            .pre_stop
            .iter()
            .map(|(name, seconds)| {
                serde_json::json!({"name": name, "lifecycle": {"preStop": pre_stop_handler(*seconds, style)}})
            })
            .collect();
        spec.insert("containers".into(), serde_json::Value::Array(containers));
    }
    w.pod_spec_path.iter().rev().fold(
        serde_json::Value::Object(spec),
        |inner, key| serde_json::json!({ *key: inner }),
    )
}

/// The preStop handler that delays SIGTERM by `seconds`.
pub fn pre_stop_handler(seconds: u64, style: HookStyle) -> serde_json::Value {
    match style {
        HookStyle::Sleep => serde_json::json!({"sleep": {"seconds": seconds}}),
        HookStyle::Exec => {
            serde_json::json!({"exec": {"command": ["sleep", seconds.to_string()]}})
        }
    }
}

fn lifecycle_block(indent: usize, seconds: u64, style: HookStyle) -> String {
    format!(
        "{:indent$}lifecycle:\n{}",
        "",
        pre_stop_block(indent + 2, seconds, style)
    )
}

fn pre_stop_block(indent: usize, seconds: u64, style: HookStyle) -> String {
    let i = indent;
    match style {
        HookStyle::Sleep => format!(
            "{:i$}preStop:\n{:i$}  sleep:\n{:i$}    seconds: {seconds}\n",
            "", "", ""
        ),
        HookStyle::Exec => format!(
            "{:i$}preStop:\n{:i$}  exec:\n{:i$}    command: [\"sleep\", \"{seconds}\"]\n",
            "", "", ""
        ),
    }
}

/// The edits for one workload's change against its file's `text`, where
/// `object` is the workload's node.
pub fn edits(
    text: &str,
    w: &Workload,
    object: &Node,
    change: &Change,
    style: HookStyle,
) -> Result<Vec<Edit>, FixError> {
    let mut out = Vec::new();
    for (name, seconds) in &change.pre_stop {
        let fail = |reason: &str| FixError::Container {
            object: w.object(),
            container: name.clone(),
            reason: reason.to_string(),
        };
        let node = w
            .container_node(object, name)
            .ok_or_else(|| fail("container not found"))?;
        let typed = w
            .pod_spec
            .containers
            .iter()
            .find(|c| &c.name == name)
            .ok_or_else(|| fail("container not found"))?;
        out.push(
            container_edit(text, node, &Hook::of(typed), *seconds, style).map_err(|r| fail(&r))?,
        );
    }
    if let Some(grace) = change.grace_seconds {
        let fail = |reason: &str| FixError::Workload {
            object: w.object(),
            reason: reason.to_string(),
        };
        let spec = w.pod_spec_node(object).ok_or_else(|| fail("no pod spec"))?;
        if spec.is_flow(text) {
            return Err(fail("the pod spec is written in flow style"));
        }
        if let Some(value) = spec.get("terminationGracePeriodSeconds") {
            out.push(replace_scalar(text, value, &grace.to_string()));
        } else {
            let (key, _) = spec
                .entry("containers")
                .ok_or_else(|| fail("no containers"))?;
            out.push(insert_line_before(
                key,
                format!(
                    "{:i$}terminationGracePeriodSeconds: {grace}\n",
                    "",
                    i = key.span.col
                ),
            ));
        }
    }
    Ok(out)
}

fn container_edit(
    text: &str,
    node: &Node,
    hook: &Hook,
    seconds: u64,
    style: HookStyle,
) -> Result<Edit, String> {
    if node.is_flow(text) {
        return Err("the container is written in flow style".into());
    }
    let pre_stop = node.path(&["lifecycle", "preStop"]);
    match hook {
        Hook::NativeSleep(_) => {
            let value = pre_stop
                .and_then(|p| p.path(&["sleep", "seconds"]))
                .ok_or("sleep.seconds not found")?;
            Ok(replace_scalar(text, value, &seconds.to_string()))
        }
        Hook::ExecSleep { editable: true, .. } => {
            let command = pre_stop
                .and_then(|p| p.path(&["exec", "command"]))
                .ok_or("exec.command not found")?;
            exec_edit(text, command, seconds)
        }
        Hook::ExecSleep { .. } => Err("the exec hook sleeps more than once".into()),
        Hook::AdaptiveDrain { .. } => {
            Err("the adaptive drain's --fallback is below the recommendation: raise it".into())
        }
        Hook::Unknown(why) => Err(why.clone()),
        Hook::None => {
            if let Some(lifecycle) = node.get("lifecycle") {
                let (first, _) = lifecycle
                    .entries()
                    .first()
                    .filter(|_| !lifecycle.is_flow(text))
                    .ok_or("lifecycle is empty or in flow style")?;
                return Ok(insert_line_before(
                    first,
                    pre_stop_block(first.span.col, seconds, style),
                ));
            }
            let (key, value) = node.entry("name").ok_or("container without a name")?;
            Ok(insert_after_line_of(
                text,
                value,
                lifecycle_block(key.span.col, seconds, style),
            ))
        }
    }
}

/// Rewrites the one literal sleep duration inside the command, whichever
/// form it has (argument list or shell script).
fn exec_edit(text: &str, command: &Node, seconds: u64) -> Result<Edit, String> {
    let items = command.items();
    let sleep_at = items.iter().position(|i| {
        i.as_str()
            .is_some_and(|s| s.rsplit('/').next() == Some("sleep"))
    });
    if let Some(at) = sleep_at {
        let [arg] = &items[at + 1..] else {
            return Err("sleep has several arguments".into());
        };
        return Ok(replace_scalar(text, arg, &seconds.to_string()));
    }
    let script = items.last().ok_or("empty command")?;
    let source = &text[script.span.start..script.span.end];
    let (start, end) = sleep_argument(source).ok_or("cannot locate the sleep argument")?;
    Ok(Edit {
        start: script.span.start + start,
        end: script.span.start + end,
        text: seconds.to_string(),
    })
}

/// Byte range of the duration after the first `sleep` command in a
/// script. The hook is editable when it counts one sleep, and the sleeps it
/// counts come first (the delay ends at the first command that stops the
/// app), so the first is the one to change.
fn sleep_argument(source: &str) -> Option<(usize, usize)> {
    let (at, _) = source
        .match_indices("sleep")
        .find(|(i, _)| starts_command(&source[..*i]))?;
    let rest = &source[at + "sleep".len()..];
    let skip = rest.len() - rest.trim_start_matches([' ', '\t', '"', '\'']).len();
    let arg = &rest[skip..];
    let len = arg
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 's' | 'm' | 'h' | 'd')))
        .unwrap_or(arg.len());
    (len > 0).then(|| {
        let start = at + "sleep".len() + skip;
        (start, start + len)
    })
}

/// Whether a `sleep` after `before` is a command, not a word in one
/// (`echo going to sleep`): only `exec` or a directory (`/bin/`) may stand
/// between it and the previous separator or quote.
fn starts_command(before: &str) -> bool {
    let segment = before
        .rsplit(['\n', ';', '&', '"', '\'', '|'])
        .next()
        .unwrap_or_default();
    let attached = !segment.ends_with(char::is_whitespace);
    match segment.split_whitespace().collect::<Vec<_>>()[..] {
        [] | ["exec"] => true,
        [dir] | ["exec", dir] => attached && dir.ends_with('/'),
        _ => false,
    }
}

/// Keeps the scalar's quoting style.
fn replace_scalar(text: &str, node: &Node, value: &str) -> Edit {
    let source = &text[node.span.start..node.span.end];
    let replacement = match source.chars().next() {
        Some(q @ ('"' | '\'')) => format!("{q}{value}{q}"),
        _ => value.to_string(),
    };
    Edit {
        start: node.span.start,
        end: node.span.end,
        text: replacement,
    }
}

/// Block-style keys are preceded on their line by spaces only.
fn insert_line_before(key: &Node, text: String) -> Edit {
    let start = key.span.start - key.span.col;
    Edit {
        start,
        end: start,
        text,
    }
}

fn insert_after_line_of(text: &str, node: &Node, insert: String) -> Edit {
    let start = text[node.span.end..]
        .find('\n')
        .map_or(text.len(), |i| node.span.end + i + 1);
    let insert = if start == text.len() && !text.ends_with('\n') {
        format!("\n{insert}")
    } else {
        insert
    };
    Edit {
        start,
        end: start,
        text: insert,
    }
}

/// Applies the edits, last first so earlier offsets hold. A value shared
/// through a YAML anchor is edited once however many workloads use it;
/// different edits of one place are refused rather than stacked. Inserted
/// lines take the file's line endings.
pub fn apply(text: &str, mut edits: Vec<Edit>) -> Result<String, String> {
    edits.sort_by(|a, b| (a.start, a.end, &a.text).cmp(&(b.start, b.end, &b.text)));
    edits.dedup();
    if let Some(pair) = edits
        .windows(2)
        .find(|p| p[1].start < p[0].end || p[1].start == p[0].start)
    {
        let line = text[..pair[0].start].matches('\n').count() + 1;
        return Err(format!(
            "line {line} needs two different edits ({:?} and {:?}): it is shared through a \
             YAML anchor by workloads that need different values",
            pair[0].text.trim(),
            pair[1].text.trim()
        ));
    }
    let crlf = text.contains("\r\n");
    let mut out = text.to_string();
    for e in edits.into_iter().rev() {
        let insert = if crlf {
            e.text.replace('\n', "\r\n")
        } else {
            e.text
        };
        out.replace_range(e.start..e.end, &insert);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceFile;
    use crate::workload::Inventory;

    /// The first workload of `text` and its node.
    fn workload(text: &str) -> (Workload, Node) {
        let file = SourceFile {
            path: None,
            name: "test".into(),
            text: text.into(),
        };
        let (inventory, errors) = Inventory::collect(&[file], "default");
        assert!(errors.is_empty(), "{errors:?}");
        let w = inventory.workloads.into_iter().next().unwrap();
        let node = crate::yaml::parse_stream(text).unwrap().remove(0);
        (w, node)
    }

    fn change(seconds: u64, grace: Option<i64>) -> Change {
        Change {
            workload: 0,
            pre_stop: vec![("app".into(), seconds)],
            grace_seconds: grace,
        }
    }

    #[test]
    fn inserts_an_exec_sleep_and_a_grace_period() {
        let text = "kind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: app # main\n    image: a\n";
        let (w, node) = workload(text);
        let out = apply(
            text,
            edits(text, &w, &node, &change(7, Some(12)), HookStyle::Exec).unwrap(),
        )
        .unwrap();
        assert_eq!(
            out,
            "kind: Pod\nmetadata: {name: p}\nspec:\n  terminationGracePeriodSeconds: 12\n  containers:\n  \
             - name: app # main\n    lifecycle:\n      preStop:\n        exec:\n          \
             command: [\"sleep\", \"7\"]\n    image: a\n"
        );
        assert!(
            matches!(Hook::of(&workload(&out).0.pod_spec.containers[0]), Hook::ExecSleep { seconds, .. } if seconds == 7.0)
        );
    }

    #[test]
    fn the_json_patch_says_what_the_yaml_patch_says() {
        let text = "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: d}\nspec:\n  selector: {}\n  template:\n    spec:\n      containers:\n      - name: app\n";
        let (w, _) = workload(text);
        let json = patch_json(&w, &change(7, Some(12)), HookStyle::Exec);
        let yaml: serde_json::Value =
            crate::yaml::parse_stream(&patch_text(&w, &change(7, Some(12)), HookStyle::Exec))
                .unwrap()
                .remove(0)
                .to_json();
        assert_eq!(json, yaml);
        assert_eq!(
            json["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"],
            serde_json::json!(["sleep", "7"])
        );
    }

    #[test]
    fn flow_style_containers_are_left_alone() {
        let text = "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n";
        let (w, node) = workload(text);
        let err = edits(text, &w, &node, &change(7, None), HookStyle::Sleep).unwrap_err();
        assert!(err.to_string().contains("flow style"), "{err}");
    }

    #[test]
    fn finds_the_first_sleep_command_in_scripts() {
        let s = "\"sleep 5 && nginx -s quit\"";
        assert_eq!(sleep_argument(s).map(|(a, b)| &s[a..b]), Some("5"));
        let s = "|\n  echo bye; /bin/sleep '12s'\n";
        assert_eq!(sleep_argument(s).map(|(a, b)| &s[a..b]), Some("12s"));
        let s = "sleep 1; kill 1; sleep 2";
        assert_eq!(sleep_argument(s).map(|(a, b)| &s[a..b]), Some("1"));
        let s = "echo going to sleep; exec sleep 9";
        assert_eq!(sleep_argument(s).map(|(a, b)| &s[a..b]), Some("9"));
    }

    #[test]
    fn edits_apply_back_to_front() {
        let text = "a: 1\nb: 2\n";
        let out = apply(
            text,
            vec![
                Edit {
                    start: 3,
                    end: 4,
                    text: "10".into(),
                },
                Edit {
                    start: 8,
                    end: 9,
                    text: "20".into(),
                },
            ],
        );
        assert_eq!(out.unwrap(), "a: 10\nb: 20\n");
    }

    #[test]
    fn a_shared_place_is_edited_once_and_conflicts_are_refused() {
        let edit = |text: &str| Edit {
            start: 3,
            end: 4,
            text: text.into(),
        };
        assert_eq!(
            apply("a: 1\n", vec![edit("9"), edit("9")]).unwrap(),
            "a: 9\n"
        );
        let err = apply("a: 1\n", vec![edit("9"), edit("8")]).unwrap_err();
        assert!(err.contains("YAML anchor"), "{err}");
    }

    #[test]
    fn inserted_lines_take_crlf_endings() {
        let edit = Edit {
            start: 6,
            end: 6,
            text: "b:\n  c: 1\n".into(),
        };
        assert_eq!(
            apply("a: 1\r\n", vec![edit]).unwrap(),
            "a: 1\r\nb:\r\n  c: 1\r\n"
        );
    }
}
