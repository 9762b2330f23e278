//! `observer-agent probe`: the capability table of this kernel.

use clap::Args;

use crate::{kernel::capabilities, output::Format};

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t, env = "OBSERVER_OUTPUT")]
    pub output: Format,
}

/// Prints the table; returns whether every required capability is there.
pub fn run(args: &ProbeArgs) -> anyhow::Result<bool> {
    let table = capabilities::probe();
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&table)?),
        Format::Human => {
            for c in &table {
                let state = match (c.available, c.required) {
                    (true, _) => "ok",
                    (false, true) => "MISSING",
                    (false, false) => "missing",
                };
                println!("{state:<8} {:<40} {}", c.name, c.detail);
            }
        }
    }
    Ok(capabilities::all_required_available(&table))
}
