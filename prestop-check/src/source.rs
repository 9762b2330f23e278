//! Reading manifests from files, directories and stdin.
//!
//! A repository holds more than rendered manifests: Helm charts and
//! Kustomize trees are recognised and named (checking them raw would check
//! something the cluster never sees), symlinks that lead back to a
//! directory already read are followed once, and every file that is not
//! text is reported, not just the first.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One input's text, kept for positions and `--fix`.
#[derive(Debug)]
pub struct SourceFile {
    /// The file `--fix` may write; `None` for stdin and rendered output.
    pub path: Option<PathBuf>,
    /// How findings name it.
    pub name: String,
    pub text: String,
}

impl SourceFile {
    pub fn display(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputProblem {
    #[error("cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not a text manifest: {why}")]
    NotText { path: String, why: String },
    #[error(
        "a Helm chart (Chart.yaml), not manifests: render it with \
         `helm template RELEASE {path}` and check the output"
    )]
    HelmChart { path: String },
    #[error(
        "a Kustomize directory ({file}): its files are not what the cluster \
         gets; render it with `kubectl kustomize {path}` and check the output, \
         or pass --kustomize to have kubectl render it"
    )]
    Kustomization { path: String, file: String },
    #[error("`kubectl kustomize {path}` failed: {message}")]
    Render { path: String, message: String },
    #[error("leads to {target}, a directory already read; not read again (symlink loop?)")]
    AlreadyRead { path: String, target: String },
}

impl InputProblem {
    pub fn path(&self) -> &str {
        match self {
            Self::Read { path, .. }
            | Self::NotText { path, .. }
            | Self::HelmChart { path }
            | Self::Kustomization { path, .. }
            | Self::Render { path, .. }
            | Self::AlreadyRead { path, .. } => path,
        }
    }

    /// Only a directory reached twice loses nothing: it was read once.
    pub fn is_error(&self) -> bool {
        !matches!(self, Self::AlreadyRead { .. })
    }
}

#[derive(Debug, Default)]
pub struct Inputs {
    pub files: Vec<SourceFile>,
    pub problems: Vec<InputProblem>,
    /// Files in walked directories whose extension is not a manifest's.
    pub skipped: usize,
}

const EXTENSIONS: &[&str] = &["yaml", "yml", "json"];
const KUSTOMIZATION: &[&str] = &["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// How directories are read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Walk {
    /// Render Kustomize directories with `kubectl kustomize`.
    pub kustomize: bool,
}

/// `-` means stdin, as does an empty list. Directories are walked
/// recursively for YAML and JSON files (extension in any case), in name
/// order so output is stable.
pub fn read_inputs(paths: &[PathBuf], walk: Walk) -> Inputs {
    let mut reader = Reader {
        walk,
        inputs: Inputs::default(),
        seen_dirs: HashSet::new(),
        seen_files: HashSet::new(),
    };
    if paths.is_empty() {
        reader.stdin();
    }
    for path in paths {
        if path.as_os_str() == "-" {
            reader.stdin();
        } else {
            reader.path(path);
        }
    }
    reader.inputs
}

struct Reader {
    walk: Walk,
    inputs: Inputs,
    /// (device, inode) of every directory and file read, so a symlink
    /// cycle or a second link to the same tree is read once.
    seen_dirs: HashSet<(u64, u64)>,
    seen_files: HashSet<(u64, u64)>,
}

impl Reader {
    fn stdin(&mut self) {
        let mut bytes = Vec::new();
        match std::io::stdin().read_to_end(&mut bytes) {
            Ok(_) => self.add(None, "<stdin>".into(), bytes),
            Err(source) => self.inputs.problems.push(InputProblem::Read {
                path: "<stdin>".into(),
                source,
            }),
        }
    }

    fn path(&mut self, path: &Path) {
        let shown = path.display().to_string();
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(source) => {
                return self.inputs.problems.push(InputProblem::Read {
                    path: shown,
                    source,
                });
            }
        };
        if meta.is_dir() {
            self.dir(path, (meta.dev(), meta.ino()));
        } else if self.seen_files.insert((meta.dev(), meta.ino())) {
            match std::fs::read(path) {
                Ok(bytes) => self.add(Some(path.to_path_buf()), shown, bytes),
                Err(source) => self.inputs.problems.push(InputProblem::Read {
                    path: shown,
                    source,
                }),
            }
        }
    }

    fn dir(&mut self, path: &Path, id: (u64, u64)) {
        let shown = path.display().to_string();
        if !self.seen_dirs.insert(id) {
            let target = std::fs::canonicalize(path)
                .map_or_else(|_| shown.clone(), |p| p.display().to_string());
            self.inputs.problems.push(InputProblem::AlreadyRead {
                path: shown,
                target,
            });
            return;
        }
        if path.join("Chart.yaml").is_file() {
            self.inputs
                .problems
                .push(InputProblem::HelmChart { path: shown });
            return;
        }
        if let Some(file) = KUSTOMIZATION.iter().find(|f| path.join(f).is_file()) {
            if self.walk.kustomize {
                self.kustomize(path);
            } else {
                self.inputs.problems.push(InputProblem::Kustomization {
                    path: shown,
                    file: file.to_string(),
                });
            }
            return;
        }
        let entries = std::fs::read_dir(path).and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<Vec<_>, _>>()
        });
        let mut entries = match entries {
            Ok(entries) => entries,
            Err(source) => {
                return self.inputs.problems.push(InputProblem::Read {
                    path: shown,
                    source,
                });
            }
        };
        entries.sort();
        for entry in entries {
            let wanted = entry
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)));
            if wanted || entry.is_dir() {
                self.path(&entry);
            } else {
                self.inputs.skipped += 1;
            }
        }
    }

    fn kustomize(&mut self, path: &Path) {
        let shown = path.display().to_string();
        let render = |message: String| InputProblem::Render {
            path: shown.clone(),
            message,
        };
        match Command::new("kubectl").arg("kustomize").arg(path).output() {
            Ok(out) if out.status.success() => {
                self.add(None, format!("{shown} (kubectl kustomize)"), out.stdout)
            }
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
                self.inputs
                    .problems
                    .push(render(format!("{}: {stderr}", out.status)));
            }
            Err(e) => self
                .inputs
                .problems
                .push(render(format!("cannot run kubectl: {e}"))),
        }
    }

    fn add(&mut self, path: Option<PathBuf>, name: String, bytes: Vec<u8>) {
        match text(bytes) {
            Ok(text) => self.inputs.files.push(SourceFile { path, name, text }),
            Err(why) => self
                .inputs
                .problems
                .push(InputProblem::NotText { path: name, why }),
        }
    }
}

/// YAML and JSON manifests are UTF-8 text without NUL bytes.
fn text(bytes: Vec<u8>) -> Result<String, String> {
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(format!("binary data (a NUL byte at offset {at})"));
    }
    String::from_utf8(bytes)
        .map_err(|e| format!("not UTF-8 (byte offset {})", e.utf8_error().valid_up_to()))
}
