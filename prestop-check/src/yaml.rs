//! YAML documents with source positions.
//!
//! Findings must point at a file and line, and `--fix` edits the text in
//! place, so every node keeps where it came from; the typed Kubernetes view
//! is derived from the same tree through JSON.
//!
//! Documents are built one at a time from the parser's events, so a large
//! `helm template` output is never held as a tree all at once. Aliases are
//! resolved to a copy of their anchor that keeps the anchor's positions (an
//! edit of a shared value lands once, in the anchor), and merge keys
//! (`<<: *defaults`) are applied, explicit keys winning.

use std::collections::HashMap;

use saphyr::{Marker, Scalar};
use saphyr_parser::{Event, Parser, ScalarStyle, StrInput};

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
    /// Scalars with a tag the core schema does not resolve.
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

impl SyntaxError {
    fn at(m: Marker, message: impl Into<String>) -> Self {
        Self {
            line: m.line(),
            col: m.col() + 1,
            message: message.into(),
        }
    }
}

/// Parses a stream of `---`-separated documents; empty documents are kept
/// as `Null` so callers can skip them.
pub fn parse_stream(text: &str) -> Result<Vec<Node>, SyntaxError> {
    documents(text).collect()
}

/// The documents of `text`, one at a time; iteration ends after an error.
pub fn documents(text: &str) -> Documents<'_> {
    Documents {
        parser: Parser::new_from_str(text),
        lines: LineIndex::new(text),
        done: false,
    }
}

pub struct Documents<'t> {
    parser: Parser<'t, StrInput<'t>>,
    lines: LineIndex<'t>,
    done: bool,
}

impl Iterator for Documents<'_> {
    type Item = Result<Node, SyntaxError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut builder = Builder::default();
        loop {
            let event = match self.parser.next_event() {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(SyntaxError::at(*e.marker(), e.info())));
                }
                None => {
                    self.done = true;
                    return None;
                }
            };
            match event {
                (Event::StreamEnd, _) => {
                    self.done = true;
                    return None;
                }
                (Event::DocumentEnd, span) => {
                    let null = || self.lines.node(span.start, span.start, Value::Null);
                    return Some(Ok(builder.root.unwrap_or_else(null)));
                }
                (event, span) => {
                    if let Err(e) = builder.on(event, span, &self.lines) {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
        }
    }
}

/// Nodes copied through aliases in one document, at most: enough for any
/// manifest, and a stop to exponential alias bombs.
const ALIAS_BUDGET: usize = 1_000_000;

enum Frame {
    Seq {
        anchor: usize,
        start: Marker,
        items: Vec<Node>,
    },
    Map {
        anchor: usize,
        start: Marker,
        entries: Vec<(Node, Node)>,
        /// Values of `<<` keys, applied when the mapping ends.
        merges: Vec<Node>,
        /// The key waiting for its value, and whether it is a merge key.
        key: Option<(Node, bool)>,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    aliased: usize,
}

impl Builder {
    fn on(
        &mut self,
        event: Event<'_>,
        span: saphyr_parser::Span,
        lines: &LineIndex<'_>,
    ) -> Result<(), SyntaxError> {
        match event {
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq {
                anchor,
                start: span.start,
                items: Vec::new(),
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map {
                anchor,
                start: span.start,
                entries: Vec::new(),
                merges: Vec::new(),
                key: None,
            }),
            Event::SequenceEnd => {
                let Some(Frame::Seq {
                    anchor,
                    start,
                    items,
                }) = self.stack.pop()
                else {
                    return Err(SyntaxError::at(span.start, "unbalanced sequence"));
                };
                let node = lines.node(start, span.start, Value::Seq(items));
                self.complete(node, anchor, false, span.start)?;
            }
            Event::MappingEnd => {
                let Some(Frame::Map {
                    anchor,
                    start,
                    mut entries,
                    merges,
                    ..
                }) = self.stack.pop()
                else {
                    return Err(SyntaxError::at(span.start, "unbalanced mapping"));
                };
                merge(&mut entries, merges, span.start)?;
                let node = lines.node(start, span.start, Value::Map(entries));
                self.complete(node, anchor, false, span.start)?;
            }
            Event::Scalar(text, style, anchor, tag) => {
                let merge_key = style == ScalarStyle::Plain && tag.is_none() && text == "<<";
                let value = match Scalar::parse_from_cow_and_metadata(text, style, tag.as_ref()) {
                    Some(Scalar::Null) => Value::Null,
                    Some(Scalar::Boolean(b)) => Value::Bool(b),
                    Some(Scalar::Integer(i)) => Value::Int(i),
                    Some(Scalar::FloatingPoint(f)) => Value::Float(f.into_inner()),
                    Some(Scalar::String(s)) => Value::Str(s.into_owned()),
                    None => Value::Other,
                };
                let node = lines.node(span.start, span.end, value);
                self.complete(node, anchor, merge_key, span.start)?;
            }
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| SyntaxError::at(span.start, "alias of an unknown anchor"))?;
                self.aliased += node.size();
                if self.aliased > ALIAS_BUDGET {
                    return Err(SyntaxError::at(
                        span.start,
                        format!("aliases expand to more than {ALIAS_BUDGET} nodes"),
                    ));
                }
                self.complete(node, 0, false, span.start)?;
            }
            Event::DocumentStart(_) => self.anchors.clear(),
            Event::StreamStart | Event::Nothing | Event::DocumentEnd | Event::StreamEnd => {}
        }
        Ok(())
    }

    /// Places a finished node into its parent (or as the document root).
    fn complete(
        &mut self,
        node: Node,
        anchor: usize,
        merge_key: bool,
        at: Marker,
    ) -> Result<(), SyntaxError> {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                merges,
                key,
                ..
            }) => match key.take() {
                None => *key = Some((node, merge_key)),
                Some((_, true)) => merges.push(node),
                Some((k, false)) => {
                    if entries.iter().any(|(e, _)| e.same_key(&k)) {
                        return Err(SyntaxError::at(
                            at,
                            format!("duplicate key `{}` in mapping", k.key_text()),
                        ));
                    }
                    entries.push((k, node));
                }
            },
        }
        Ok(())
    }
}

/// YAML merge keys: the merged mappings' entries the mapping does not set
/// itself, earlier sources winning over later ones.
fn merge(
    entries: &mut Vec<(Node, Node)>,
    sources: Vec<Node>,
    at: Marker,
) -> Result<(), SyntaxError> {
    for source in sources {
        let maps = match source.value {
            Value::Map(_) => vec![source],
            Value::Seq(items) => items,
            _ => Vec::new(),
        };
        for map in maps {
            let Value::Map(merged) = map.value else {
                return Err(SyntaxError::at(
                    at,
                    "a merge key (`<<`) takes a mapping or a list of mappings",
                ));
            };
            for (k, v) in merged {
                if !entries.iter().any(|(e, _)| e.same_key(&k)) {
                    entries.push((k, v));
                }
            }
        }
    }
    Ok(())
}

/// The parser counts characters; edits need byte offsets.
struct LineIndex<'t> {
    text: &'t str,
    starts: Vec<usize>,
    /// Characters are bytes: the parser's character index is the offset.
    ascii: bool,
}

impl<'t> LineIndex<'t> {
    fn new(text: &'t str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            text,
            starts,
            ascii: text.is_ascii(),
        }
    }

    fn node(&self, start: Marker, end: Marker, value: Value) -> Node {
        Node {
            span: Span {
                line: start.line(),
                col: start.col(),
                start: self.byte_offset(start),
                end: self.byte_offset(end),
            },
            value,
        }
    }

    fn byte_offset(&self, m: Marker) -> usize {
        if self.ascii {
            return m.index().min(self.text.len());
        }
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

    fn same_key(&self, other: &Node) -> bool {
        self.key_text() == other.key_text()
    }

    /// Nodes in this tree, for the alias budget.
    fn size(&self) -> usize {
        1 + match &self.value {
            Value::Seq(items) => items.iter().map(Node::size).sum(),
            Value::Map(entries) => entries.iter().map(|(k, v)| k.size() + v.size()).sum(),
            _ => 0,
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
    fn aliases_keep_the_anchors_positions_and_merge_keys_apply() {
        let text = "a: &x\n  n: 1\n  m: 2\nb: *x\nc:\n  <<: *x\n  m: 3\n";
        let doc = &parse_stream(text).unwrap()[0];
        let n = |key: &str| doc.path(&[key, "n"]).unwrap().span;
        // The alias and the merged entry are the anchor's own nodes: an edit
        // lands once, in the anchor.
        assert_eq!(n("b"), n("a"));
        assert_eq!(n("c"), n("a"));
        assert_eq!(
            doc.to_json(),
            serde_json::json!({"a": {"n": 1, "m": 2}, "b": {"n": 1, "m": 2}, "c": {"m": 3, "n": 1}})
        );
        let err = parse_stream("a: &x [1]\nb:\n  <<: *x\n").unwrap_err();
        assert!(err.message.contains("merge key"), "{err}");
    }

    #[test]
    fn alias_bombs_stop_at_the_budget() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text += &format!("a{i}: &a{i} [{refs}]\n");
        }
        let err = parse_stream(&text).unwrap_err();
        assert!(err.message.contains("aliases expand"), "{err}");
    }

    #[test]
    fn documents_come_one_at_a_time_until_an_error() {
        let mut docs = documents("a: 1\n---\nb: [\n---\nc: 3\n");
        assert!(docs.next().unwrap().is_ok());
        assert!(docs.next().unwrap().is_err());
        assert!(docs.next().is_none());
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
