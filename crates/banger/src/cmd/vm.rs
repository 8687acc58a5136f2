//! `banger vm ...`: VM records.

use std::process::ExitCode;

use banger_core::size::human_mib;
use banger_core::time::{age, human_duration};
use banger_proto::{CreateVmRequest, UpdateVmRequest, VmList, VmView};
use clap::{Args, Subcommand};
use hyper::Method;

use super::{parse_size, segment};
use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Record a new VM. Its name is a DNS label: 1-63 of a-z, 0-9 and '-', no dash at either end.
    Create(CreateArgs),
    /// List VMs.
    #[command(visible_alias = "ls")]
    List(JsonFlag),
    /// Show one VM (by name, id or id prefix).
    Show(ShowArgs),
    /// Change a stopped VM's resources, image or kernel.
    Set(SetArgs),
    /// Delete stopped VMs and their disks.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name.
    name: String,
    /// Root filesystem image [default: the config's default_image]
    #[arg(long)]
    image: Option<String>,
    /// Kernel [default: the config's default_kernel]
    #[arg(long)]
    kernel: Option<String>,
    /// Virtual CPUs [default: the config's default_vcpus]
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory, e.g. 512M or 2G [default: the config's default_memory_mib]
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Work disk size, e.g. 4G [default: the config's default_disk_mib]
    #[arg(long, value_parser = parse_size)]
    disk: Option<u64>,
    /// Print the new VM as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Name, id or id prefix.
    vm: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Name, id or id prefix.
    vm: String,
    /// New image.
    #[arg(long)]
    image: Option<String>,
    /// New kernel.
    #[arg(long)]
    kernel: Option<String>,
    /// New number of virtual CPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// New memory size, e.g. 1G.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// New work disk size (grow only), e.g. 8G.
    #[arg(long, value_parser = parse_size)]
    disk: Option<u64>,
    /// Print the changed VM as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Names, ids or id prefixes.
    #[arg(required = true)]
    vms: Vec<String>,
}

pub async fn run(client: &Client, command: VmCommand) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    match command {
        VmCommand::Create(a) => create(client, a).await,
        VmCommand::List(a) => list(client, a.json).await,
        VmCommand::Show(a) => {
            let vm: VmView = client.get(&format!("/v1/vms/{}", segment(&a.vm))).await?;
            show(&vm, a.json)
        }
        VmCommand::Set(a) => {
            let req = UpdateVmRequest {
                image: a.image,
                kernel: a.kernel,
                vcpus: a.cpus,
                memory_mib: a.memory,
                disk_mib: a.disk,
            };
            let vm: VmView = client.call(Method::PATCH, &format!("/v1/vms/{}", segment(&a.vm)), Some(&req)).await?;
            show(&vm, a.json)
        }
        VmCommand::Delete(a) => delete(client, a).await,
    }
}

async fn create(client: &Client, a: CreateArgs) -> anyhow::Result<ExitCode> {
    let req = CreateVmRequest {
        name: a.name,
        image: a.image,
        kernel: a.kernel,
        vcpus: a.cpus,
        memory_mib: a.memory,
        disk_mib: a.disk,
    };
    let op: banger_core::OperationRecord = client.call(Method::POST, "/v1/vms", Some(&req)).await?;
    let done = crate::progress::follow(client, op).await?;
    let id = done.result_id.unwrap_or(req.name);
    let vm: VmView = client.get(&format!("/v1/vms/{}", segment(&id))).await?;
    show(&vm, a.json)
}

async fn list(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let list: VmList = client.get("/v1/vms").await?;
    if json {
        output::json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list
        .vms
        .iter()
        .map(|v| {
            let r = &v.record;
            vec![
                r.name.clone(),
                r.id.clone(),
                r.state.as_str().to_owned(),
                r.spec.image.clone(),
                r.spec.vcpus.to_string(),
                human_mib(r.spec.memory_mib),
                human_mib(r.spec.disk_mib),
                r.guest_ip.clone().unwrap_or_else(|| "-".into()),
                format!("{} ago", human_duration(age(&r.created_at))),
            ]
        })
        .collect();
    output::table(&["NAME", "ID", "STATE", "IMAGE", "CPUS", "MEMORY", "DISK", "IP", "CREATED"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

fn show(vm: &VmView, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        output::json(vm)?;
        return Ok(ExitCode::SUCCESS);
    }
    let r = &vm.record;
    output::fields(&[
        ("name", r.name.clone()),
        ("id", r.id.clone()),
        ("state", format!("{} (wants {})", r.state.as_str(), r.desired_state.as_str())),
        ("alive", vm.alive.to_string()),
        ("image", r.spec.image.clone()),
        ("kernel", r.spec.kernel.clone()),
        ("cpus", r.spec.vcpus.to_string()),
        ("memory", human_mib(r.spec.memory_mib)),
        ("disk", human_mib(r.spec.disk_mib)),
        ("ip", r.guest_ip.clone().unwrap_or_else(|| "-".into())),
        ("dir", vm.paths.dir.clone()),
        ("created", r.created_at.clone()),
        ("updated", r.updated_at.clone()),
        ("last error", r.last_error.clone().unwrap_or_else(|| "-".into())),
    ])?;
    Ok(ExitCode::SUCCESS)
}

async fn delete(client: &Client, a: DeleteArgs) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for reference in a.vms {
        match client.call::<VmView>(Method::DELETE, &format!("/v1/vms/{}", segment(&reference)), None::<&()>).await {
            Ok(vm) => println!("{}", vm.record.name),
            Err(e) => {
                eprintln!("banger: cannot delete {reference}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
