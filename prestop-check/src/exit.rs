//! Exit codes; each condition a pipeline may want to treat differently has
//! its own. Documented in docs/ci-check.md and `--help`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exit {
    Ok = 0,
    /// A preStop delay below the recommendation, or a grace period too short.
    Findings = 1,
    /// Bad flags or arguments (clap's own code).
    Usage = 2,
    /// A manifest could not be read, parsed or deserialised.
    Unparsable = 3,
    /// The aggregator could not be reached or answered an error.
    AggregatorUnreachable = 4,
    /// Only low-confidence (or no) recommendations, with
    /// `--low-confidence fail`.
    LowConfidence = 5,
    /// `--fix` could not write a manifest back, or `--metrics-file` could
    /// not be written: the requested output is missing or incomplete.
    WriteFailed = 6,
    /// No routed container was found, with `--fail-if-nothing-checked`.
    NothingChecked = 7,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

pub const HELP: &str = "Exit codes:
  0  no findings (warnings may have been printed)
  1  findings: a preStop delay below the recommendation, or a grace period
     that cannot hold preStop plus --drain-seconds; with --fail-on-startup,
     a routed container without readinessProbe or new pods measured
     refusing connections after ready
  2  usage error (also with --offline-ok)
  3  a manifest could not be read or parsed (file and line are printed)
  4  the aggregator was unreachable or answered an error (--offline-ok: warn, 0)
  5  a recommendation used was low confidence or had no samples, with
     --low-confidence fail (shortfalls against it are then warnings)
  6  a file could not be written: a manifest --fix rewrote, or the
     --metrics-file (the path and the OS error are printed; wins over 1 and 5)
  7  nothing was checked (no container a Service routes to), with
     --fail-if-nothing-checked (without it: a warning, exit 0)";
