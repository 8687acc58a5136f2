//! `banger config ...`: the configuration in force in the daemon.

use std::process::ExitCode;

use banger_proto::ConfigView;
use clap::{Args, Subcommand};

use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print every key with its value (TOML), and the file it came from.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, command: ConfigCommand) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    let ConfigCommand::Show(a) = command;
    let view: ConfigView = client.get("/v1/config").await?;
    if a.json {
        output::json(&view)?;
    } else {
        let source = view.source.as_deref().unwrap_or("none: every key is a default");
        print!("# source: {source}\n{}", toml::to_string(&view.config).unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}
