//! `observer-agent probe`: the capability table of this kernel.

use clap::Args;

use super::cilium_args::CiliumArgs;
use crate::{
    kernel::capabilities::{self, Capability},
    output::Format,
};

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t, env = "OBSERVER_OUTPUT")]
    pub output: Format,
    #[command(flatten)]
    pub cilium: CiliumArgs,
}

/// Prints the table and, for each missing capability, what it costs;
/// returns whether every required capability is there (the exit code).
pub fn run(args: &ProbeArgs) -> anyhow::Result<bool> {
    let table = capabilities::probe(&args.cilium.options());
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&table)?),
        Format::Human => print!("{}", human(&table)),
    }
    Ok(capabilities::all_required_available(&table))
}

/// One line per capability; a missing one gets a second line saying what
/// the user loses, and a closing line says whether the node can run.
fn human(table: &[Capability]) -> String {
    let mut out = String::new();
    for c in table {
        let state = match (c.available, c.required) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "missing",
        };
        out.push_str(&format!("{state:<8} {:<40} {}\n", c.name, c.detail));
        if !c.available {
            out.push_str(&format!("{:<8} {:<40} costs: {}\n", "", "", c.cost));
        }
    }
    let missing: Vec<&str> = capabilities::missing_required(table)
        .map(|c| c.name.as_str())
        .collect();
    if missing.is_empty() {
        out.push_str("every required capability is available\n");
    } else {
        out.push_str(&format!(
            "required capabilities missing: {} (the agent reports not ready on this node)\n",
            missing.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, available: bool, required: bool) -> Capability {
        Capability {
            name: name.into(),
            available,
            detail: "why".into(),
            required,
            cost: "what is lost",
        }
    }

    #[test]
    fn missing_rows_say_what_they_cost_and_required_ones_are_named() {
        let table = [
            row("tracepoint/sock/inet_sock_set_state", true, true),
            row("tracepoint/tcp/tcp_send_reset", false, true),
            row("pmu/kprobe", false, false),
        ];
        let text = human(&table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[1].starts_with("MISSING  tracepoint/tcp/tcp_send_reset"));
        assert!(lines[2].trim_start().starts_with("costs: what is lost"));
        assert!(lines[3].starts_with("missing  pmu/kprobe"));
        assert_eq!(
            lines[5],
            "required capabilities missing: tracepoint/tcp/tcp_send_reset (the agent reports not ready on this node)"
        );
        assert!(!capabilities::all_required_available(&table));
    }
}
