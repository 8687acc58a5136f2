//! `banger daemon ...`: the daemon's lifecycle. These never start a daemon implicitly, except
//! `start`.

use std::process::ExitCode;
use std::time::Duration;

use banger_proto::DaemonStatus;
use clap::{Args, Subcommand};
use hyper::Method;

use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Start bangerd in the background (nothing happens if it is already running).
    Start,
    /// Stop bangerd cleanly; running VMs keep running and are adopted by the next daemon.
    Stop,
    /// Say whether bangerd is running, and where its files are. Exits 1 when it is not.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, command: DaemonCommand) -> anyhow::Result<ExitCode> {
    match command {
        DaemonCommand::Start => {
            let (status, started) = client.ensure_daemon().await?;
            if !started {
                eprintln!("bangerd is already running (pid {}); log: {}", status.pid, status.log_file);
            }
        }
        DaemonCommand::Stop => match client.probe().await {
            None => eprintln!("bangerd is not running (no answer on {})", client.layout().socket.display()),
            Some(status) => {
                client.call::<serde_json::Value>(Method::POST, "/v1/daemon/shutdown", None::<&()>).await.ok();
                client.wait_stopped(status.pid, Duration::from_secs(20)).await?;
                eprintln!("stopped bangerd (pid {})", status.pid);
            }
        },
        DaemonCommand::Status(a) => match client.probe().await {
            None => {
                if a.json {
                    output::json(&serde_json::json!({ "running": false, "socket": client.layout().socket }))?;
                } else {
                    println!("bangerd is not running (socket {})", client.layout().socket.display());
                }
                return Ok(ExitCode::FAILURE);
            }
            Some(s) => print_status(&s, a.json)?,
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &DaemonStatus, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(s)?;
        if let Some(map) = v.as_object_mut() {
            map.insert("running".into(), true.into());
        }
        return output::json(&v);
    }
    output::fields(&[
        ("running", format!("yes, pid {}", s.pid)),
        ("version", s.version.clone()),
        ("uptime", banger_core::time::human_duration(Duration::from_secs(s.uptime_secs))),
        ("vms", s.vms.to_string()),
        ("memory", s.rss_kib.map_or_else(|| "-".into(), |k| format!("{:.1} MiB RSS", k as f64 / 1024.0))),
        ("state dir", s.state_dir.clone()),
        ("socket", s.socket.clone()),
        ("log", s.log_file.clone()),
    ])
}
