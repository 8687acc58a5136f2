//! `banger snapshot ...` (list, show, delete) and the snapshot verbs of `banger vm` (pause,
//! resume, snapshot, fork).

use std::process::ExitCode;

use banger_core::size::human_mib;
use banger_core::time::{age, human_duration};
use banger_proto::{CreateSnapshotRequest, CreateVmRequest, OperationRecord, SnapshotList, SnapshotView, VmView};
use clap::{Args, Subcommand};
use hyper::Method;

use super::segment;
use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List memory snapshots (warm-start ones included), with the VMs forked from each.
    #[command(visible_alias = "ls")]
    List(JsonArgs),
    /// Show one snapshot (by name, id or id prefix).
    Show(ShowArgs),
    /// Delete snapshots and their files. Refused while VMs forked from one exist.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct JsonArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Name, id or id prefix.
    snapshot: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Names, ids or id prefixes.
    #[arg(required = true)]
    snapshots: Vec<String>,
}

/// `banger vm pause` / `banger vm resume`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Name, id or id prefix.
    vm: String,
    /// Print the VM as JSON.
    #[arg(long)]
    json: bool,
}

/// `banger vm snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The VM: name, id or id prefix. It must be running or paused.
    vm: String,
    /// The snapshot's name, a DNS label [default: VM-YYYYMMDD-HHMMSS]
    #[arg(long)]
    name: Option<String>,
    /// Print the snapshot as JSON (otherwise its name is printed).
    #[arg(long)]
    json: bool,
}

/// `banger vm fork`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The snapshot: name, id or id prefix.
    snapshot: String,
    /// The new VM's name.
    #[arg(long)]
    name: String,
    /// Let the fork reach, and be reached by, other VMs and any host port (refused by default)
    #[arg(long)]
    allow_vm_traffic: bool,
    /// Forward a host port to the fork whenever it runs: [HOST_ADDR:]HOST_PORT:GUEST_PORT. Repeatable.
    #[arg(long, short = 'p', value_name = "SPEC", value_parser = super::forward::parse_forward)]
    publish: Vec<banger_core::PortForward>,
    /// Print the fork as JSON once it runs.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    match command {
        SnapshotCommand::List(a) => list(client, a.json).await,
        SnapshotCommand::Show(a) => {
            let s: SnapshotView = client.get(&format!("/v1/snapshots/{}", segment(&a.snapshot))).await?;
            show(&s, a.json)
        }
        SnapshotCommand::Delete(a) => {
            let mut failed = false;
            for reference in a.snapshots {
                let path = format!("/v1/snapshots/{}", segment(&reference));
                match client.call::<SnapshotView>(Method::DELETE, &path, None::<&()>).await {
                    Ok(s) => println!("{}", s.record.name),
                    Err(e) => {
                        eprintln!("banger: cannot delete snapshot {reference}: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}

/// `banger vm pause` (`resume` false) or `banger vm resume`.
pub async fn pause(client: &Client, a: PauseArgs, resume: bool) -> anyhow::Result<ExitCode> {
    let verb = if resume { "resume" } else { "pause" };
    let vm: VmView = client.call(Method::POST, &format!("/v1/vms/{}/{verb}", segment(&a.vm)), None::<&()>).await?;
    if a.json {
        output::json(&vm)?;
    } else {
        eprintln!("{} is {}", vm.record.name, vm.record.state.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

/// `banger vm snapshot`.
pub async fn snapshot(client: &Client, a: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let req = CreateSnapshotRequest { name: a.name };
    let s: SnapshotView =
        client.call(Method::POST, &format!("/v1/vms/{}/snapshot", segment(&a.vm)), Some(&req)).await?;
    if a.json {
        output::json(&s)?;
    } else {
        println!("{}", s.record.name);
        eprintln!(
            "snapshot {} of {} taken in {:.1}s ({:.1} MiB)",
            s.record.name,
            s.record.source_vm_name,
            started.elapsed().as_secs_f64(),
            s.record.size_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `banger vm fork`: a new VM started from a snapshot.
pub async fn fork(client: &Client, a: ForkArgs) -> anyhow::Result<ExitCode> {
    let req = CreateVmRequest {
        name: a.name.clone(),
        from_snapshot: Some(a.snapshot),
        start: true,
        allow_vm_traffic: a.allow_vm_traffic.then_some(true),
        git_identity: super::ssh::git_identity(),
        publish: a.publish.into_iter().map(Into::into).collect(),
        ..Default::default()
    };
    let op: OperationRecord = client.call(Method::POST, "/v1/vms", Some(&req)).await?;
    crate::progress::follow(client, op).await?;
    super::forward::warn_failed(client, &a.name).await;
    let vm: VmView = client.get(&format!("/v1/vms/{}", segment(&a.name))).await?;
    if a.json {
        output::json(&vm)?;
    } else {
        eprintln!("{} is running", vm.record.name);
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let list: SnapshotList = client.get("/v1/snapshots").await?;
    if json {
        output::json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list
        .snapshots
        .iter()
        .map(|s| {
            let r = &s.record;
            vec![
                r.name.clone(),
                r.source_vm_name.clone(),
                r.image.clone(),
                r.vcpus.to_string(),
                human_mib(r.memory_mib),
                format!("{:.1} MiB", r.size_bytes as f64 / (1024.0 * 1024.0)),
                if s.forks.is_empty() { "-".into() } else { s.forks.join(",") },
                format!("{} ago", human_duration(age(&r.created_at))),
            ]
        })
        .collect();
    output::table(&["NAME", "SOURCE", "IMAGE", "CPUS", "MEMORY", "SIZE", "FORKS", "CREATED"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

fn show(s: &SnapshotView, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        output::json(s)?;
        return Ok(ExitCode::SUCCESS);
    }
    let r = &s.record;
    output::fields(&[
        ("name", r.name.clone()),
        ("id", r.id.clone()),
        ("source", format!("{} ({})", r.source_vm_name, r.source_vm_id)),
        ("image", r.image.clone()),
        ("kernel", r.kernel.clone()),
        ("cpus", r.vcpus.to_string()),
        ("memory", human_mib(r.memory_mib)),
        ("disk", human_mib(r.disk_mib)),
        ("vmm", r.vmm.to_string()),
        ("network", r.network.to_string()),
        ("size", format!("{:.1} MiB", r.size_bytes as f64 / (1024.0 * 1024.0))),
        ("warm start", r.warm_key.clone().unwrap_or_else(|| "-".into())),
        ("forks", if s.forks.is_empty() { "-".into() } else { s.forks.join(", ") }),
        ("dir", r.dir.clone()),
        ("created", r.created_at.clone()),
    ])?;
    Ok(ExitCode::SUCCESS)
}
