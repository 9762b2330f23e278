//! YAML documents with source positions.
//!
//! Findings must point at a file and line, and `--fix` edits the text in
//! place, so every node keeps where it came from; the typed Kubernetes view
//! is derived from the same tree through JSON.

use saphyr::{LoadableYamlNode, MarkedYaml, Marker, Scalar, YamlData};

/// Byte range and 1-based line of a node in its source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub line: usize,
    /// 0-based column in characters; YAML indentation is what it measures.
    pub col: usize,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    /// Aliases and values the parser could not resolve.
    Other,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub span: Span,
    pub value: Value,
}

#[derive(Debug, thiserror::Error)]
#[error("line {line}, column {col}: {message}")]
pub struct SyntaxError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Parses a stream of `---`-separated documents; empty documents are kept
/// as `Null` so callers can skip them.
pub fn parse_stream(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| SyntaxError {
        line: e.marker().line(),
        col: e.marker().col() + 1,
        message: e.info().to_string(),
    })?;
    let lines = LineIndex::new(text);
    Ok(docs.iter().map(|d| convert(d, &lines)).collect())
}

fn convert(node: &MarkedYaml<'_>, lines: &LineIndex<'_>) -> Node {
    let value = match &node.data {
        YamlData::Value(Scalar::Null) => Value::Null,
        YamlData::Value(Scalar::Boolean(b)) => Value::Bool(*b),
        YamlData::Value(Scalar::Integer(i)) => Value::Int(*i),
        YamlData::Value(Scalar::FloatingPoint(f)) => Value::Float(f.into_inner()),
        YamlData::Value(Scalar::String(s)) => Value::Str(s.to_string()),
        YamlData::Sequence(items) => Value::Seq(items.iter().map(|i| convert(i, lines)).collect()),
        YamlData::Mapping(entries) => Value::Map(
            entries
                .iter()
                .map(|(k, v)| (convert(k, lines), convert(v, lines)))
                .collect(),
        ),
        _ => Value::Other,
    };
    Node {
        span: Span {
            line: node.span.start.line(),
            col: node.span.start.col(),
            start: lines.byte_offset(node.span.start),
            end: lines.byte_offset(node.span.end),
        },
        value,
    }
}

/// The parser counts characters; edits need byte offsets.
struct LineIndex<'t> {
    text: &'t str,
    starts: Vec<usize>,
}

impl<'t> LineIndex<'t> {
    fn new(text: &'t str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { text, starts }
    }

    fn byte_offset(&self, m: Marker) -> usize {
        let Some(&line_start) = self.starts.get(m.line().saturating_sub(1)) else {
            return self.text.len();
        };
        self.text[line_start..]
            .char_indices()
            .nth(m.col())
            .map_or(self.text.len(), |(i, _)| line_start + i)
    }
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key node too: its line is where a field "is" for a reader.
    pub fn entry(&self, key: &str) -> Option<(&Node, &Node)> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    pub fn path(&self, keys: &[&str]) -> Option<&Node> {
        keys.iter().try_fold(self, |n, k| n.get(k))
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn items(&self) -> &[Node] {
        match &self.value {
            Value::Seq(items) => items,
            _ => &[],
        }
    }

    pub fn entries(&self) -> &[(Node, Node)] {
        match &self.value {
            Value::Map(entries) => entries,
            _ => &[],
        }
    }

    /// Block style is what `--fix` can insert lines into; flow style
    /// (`{a: 1}`, `[1]`) starts with its bracket.
    pub fn is_flow(&self, text: &str) -> bool {
        matches!(text[self.span.start..].chars().next(), Some('{' | '['))
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null | Value::Other => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.key_text(), v.to_json()))
                    .collect(),
            ),
        }
    }

    fn key_text(&self) -> String {
        match &self.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Float(f) => f.to_string(),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_lines_and_byte_ranges() {
        let text = "# héllo\n---\nkind: Pod\nspec:\n  containers:\n  - name: \"app\"\n";
        let docs = parse_stream(text).unwrap();
        assert_eq!(docs.len(), 1);
        let (key, _) = docs[0].entry("kind").unwrap();
        assert_eq!(key.span.line, 3);
        let name = &docs[0].path(&["spec", "containers"]).unwrap().items()[0];
        let (nk, nv) = name.entry("name").unwrap();
        assert_eq!((nk.span.line, nk.span.col), (6, 4));
        assert_eq!(&text[nv.span.start..nv.span.end], "\"app\"");
        assert_eq!(nv.as_str(), Some("app"));
    }

    #[test]
    fn syntax_error_has_line() {
        let err = parse_stream("kind: Pod\nspec:\n  a: [1, 2\n").unwrap_err();
        assert!(err.line >= 3, "{err}");
    }

    #[test]
    fn json_view_keeps_types() {
        let docs = parse_stream("a: 1\nb: \"1\"\nc: [true, null]\n").unwrap();
        assert_eq!(
            docs[0].to_json(),
            serde_json::json!({"a": 1, "b": "1", "c": [true, null]})
        );
    }
}
