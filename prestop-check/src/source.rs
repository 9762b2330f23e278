//! Reading manifests from files, directories and stdin.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::yaml::{self, Node};

/// One input file's text, kept for positions and `--fix`.
#[derive(Debug)]
pub struct SourceFile {
    /// `None` for stdin.
    pub path: Option<PathBuf>,
    pub text: String,
}

impl SourceFile {
    pub fn display(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "<stdin>".to_string(), |p| p.display().to_string())
    }
}

#[derive(Debug)]
pub struct Document {
    pub file: usize,
    pub node: Node,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct ParseError {
    pub file: usize,
    pub error: yaml::SyntaxError,
}

const EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// `-` means stdin, as does an empty list. Directories are walked
/// recursively for YAML and JSON files, in name order so output is stable.
pub fn read_inputs(paths: &[PathBuf]) -> Result<Vec<SourceFile>, SourceError> {
    if paths.is_empty() {
        return Ok(vec![read_stdin()?]);
    }
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            files.push(read_stdin()?);
        } else {
            walk(path, &mut files)?;
        }
    }
    Ok(files)
}

fn read_stdin() -> Result<SourceFile, SourceError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|source| SourceError::Read {
            path: "<stdin>".into(),
            source,
        })?;
    Ok(SourceFile { path: None, text })
}

fn walk(path: &Path, files: &mut Vec<SourceFile>) -> Result<(), SourceError> {
    let err = |source| SourceError::Read {
        path: path.display().to_string(),
        source,
    };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(err)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        entries.sort();
        for entry in entries {
            let wanted = entry
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e));
            if entry.is_dir() || wanted {
                walk(&entry, files)?;
            }
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(err)?;
    files.push(SourceFile {
        path: Some(path.to_path_buf()),
        text,
    });
    Ok(())
}

pub fn parse_all(files: &[SourceFile]) -> (Vec<Document>, Vec<ParseError>) {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (file, source) in files.iter().enumerate() {
        match yaml::parse_stream(&source.text) {
            Ok(nodes) => docs.extend(nodes.into_iter().map(|node| Document { file, node })),
            Err(error) => errors.push(ParseError { file, error }),
        }
    }
    (docs, errors)
}
