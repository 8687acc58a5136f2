//! `banger doctor`: prints the daemon's host checks (`GET /v1/doctor`), including what the VMM
//! selection picks there (`vmm`).
//!
//! The checks run in bangerd, not here: the daemon runs the VMMs, with its own user, config and
//! state dir, so its view is the one that counts, and the CLI links no host code. Like every
//! command, doctor starts bangerd when nothing answers; when it cannot start, that error already
//! names the cause and the fix.

use std::process::ExitCode;

use banger_proto::{DoctorReport, DoctorStatus};
use clap::Args;

use crate::client::Client;
use crate::output;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: DoctorArgs) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    let report: DoctorReport = client.get("/v1/doctor").await?;
    let failed = report.checks.iter().any(|c| c.status == DoctorStatus::Fail);
    if args.json {
        // Through a `Value`, so keys print sorted, as they always have.
        output::json(&serde_json::to_value(&report)?)?;
    } else {
        let width = report.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &report.checks {
            let fix = c.fix.as_deref().map(|f| format!(" — fix: {f}")).unwrap_or_default();
            println!("{:<4}  {:<width$}  {}{fix}", c.status.as_str(), c.name, c.detail);
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
