//! `densepred print-config CONFIG`: the config after `_base_` merging and `--set` overrides.

use anyhow::Result;
use clap::Parser;
use densepred_engine::runner::RunConfig;
use std::path::PathBuf;

/// Print the resolved config.
#[derive(Parser)]
pub struct Args {
    /// Config file.
    pub config: PathBuf,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(a: Args) -> Result<()> {
    // Validates every key against the typed config before printing.
    let (_, table) = RunConfig::load(&a.config, &a.overrides)?;
    print!("{}", toml::to_string_pretty(&table)?);
    Ok(())
}
