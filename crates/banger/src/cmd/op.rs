//! `banger op ...`: asynchronous operations.

use std::process::ExitCode;
use std::time::Duration;

use banger_core::time::human_duration;
use banger_proto::{OperationList, OperationRecord};
use clap::{Args, Subcommand};
use hyper::Method;

use super::segment;
use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum OpCommand {
    /// List kept operations, oldest first.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one operation's stages (by id or id prefix).
    Show(ShowArgs),
    /// Cancel a running operation; it stops at its next stage and undoes its work.
    Cancel(CancelArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Id or id prefix.
    op: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Id or id prefix.
    op: String,
}

fn ms(ms: u64) -> String {
    human_duration(Duration::from_millis(ms))
}

pub async fn run(client: &Client, command: OpCommand) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    match command {
        OpCommand::List(a) => {
            let list: OperationList = client.get("/v1/operations").await?;
            if a.json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .operations
                    .iter()
                    .map(|o| {
                        vec![
                            o.id.clone(),
                            o.kind.clone(),
                            o.target.clone(),
                            o.state.as_str().to_owned(),
                            o.current_stage().or(o.stages.last().map(|s| s.name.as_str())).unwrap_or("-").to_owned(),
                            ms(o.elapsed_ms),
                            o.created_at.clone(),
                        ]
                    })
                    .collect();
                output::table(&["ID", "KIND", "TARGET", "STATE", "STAGE", "ELAPSED", "STARTED"], &rows)?;
            }
        }
        OpCommand::Show(a) => {
            let op: OperationRecord = client.get(&format!("/v1/operations/{}", segment(&a.op))).await?;
            if a.json {
                output::json(&op)?;
            } else {
                output::fields(&[
                    ("id", op.id.clone()),
                    ("kind", op.kind.clone()),
                    ("target", op.target.clone()),
                    ("state", op.state.as_str().to_owned()),
                    ("elapsed", ms(op.elapsed_ms)),
                    ("error", op.error.clone().unwrap_or_else(|| "-".into())),
                    ("result", op.result_id.clone().unwrap_or_else(|| "-".into())),
                ])?;
                let rows: Vec<Vec<String>> = op
                    .stages
                    .iter()
                    .map(|s| vec![s.name.clone(), format!("{:?}", s.state).to_lowercase(), ms(s.elapsed_ms)])
                    .collect();
                println!();
                output::table(&["STAGE", "STATE", "ELAPSED"], &rows)?;
            }
        }
        OpCommand::Cancel(a) => {
            let op: OperationRecord =
                client.call(Method::POST, &format!("/v1/operations/{}/cancel", segment(&a.op)), None::<&()>).await?;
            eprintln!("cancellation requested for {} {} {}", op.id, op.kind, op.target);
        }
    }
    Ok(ExitCode::SUCCESS)
}
