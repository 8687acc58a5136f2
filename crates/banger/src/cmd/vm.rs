//! `banger vm ...`: VM records.

use std::process::ExitCode;

use anyhow::Context as _;
use banger_core::size::human_mib;
use banger_core::time::{age, human_duration};
use banger_proto::{
    CreateVmRequest, OperationRecord, StartVmRequest, UpdateVmRequest, VmLogs, VmPorts, VmStats, VmView,
};
use clap::{Args, Subcommand};
use hyper::Method;

use super::{parse_size, segment};
use crate::client::Client;
use crate::exec::ExecOptions;
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
    /// Delete stopped VMs and their disks (`--force` stops running ones first).
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Boot a VM and wait until its agent answers.
    Start(StartArgs),
    /// Stop a VM: gracefully through its agent, then the VMM, then a kill.
    Stop(StopArgs),
    /// Stop then start a VM.
    Restart(StartArgs),
    /// Run a command in a running VM; exits with the command's exit code (128 + N when signal N
    /// ended it). `-it` gives it an interactive terminal: `banger vm exec -it VM -- bash`.
    Exec(ExecArgs),
    /// Create a VM, boot it, run a command in it, then stop it (and delete it with --rm).
    /// Exits with the command's exit code. For a shell, ask for a terminal as with Docker:
    /// `banger vm run --rm -it -- bash`.
    Run(RunArgs),
    /// Print a VM's serial console log.
    Logs(LogsArgs),
    /// Show a VM's resource use: VMM CPU time, its host memory (RSS, PSS, memory file) and
    /// the guest's own view of its memory
    Stats(StatsArgs),
    /// List the ports listening in a running VM (from its agent).
    Ports(StatsArgs),
    /// Log in to a running VM with the system `ssh` (as root, with banger's key and the VM's
    /// pinned host key), or run a command there. Exits with ssh's exit code; needs the VM to
    /// have a network address (see `banger vm exec` otherwise).
    Ssh(super::ssh::SshArgs),
    /// Forward host ports to a VM: add, list (the default) or remove. Forwards are kept with
    /// the VM and listen on the host whenever it runs.
    Forward(super::forward::ForwardArgs),
    /// A VM's egress policy (show, set; in force at once on a running VM) and its denial log.
    Network(super::network::NetworkArgs),
    /// Pause a running VM's vCPUs (it keeps its memory, processes and connections).
    Pause(super::snapshot::PauseArgs),
    /// Resume a paused VM and set its clock to the host's.
    Resume(super::snapshot::PauseArgs),
    /// Take a memory snapshot of a running or paused VM: memory, device state and disks, from one
    /// instant (the guest is paused meanwhile). Prints the snapshot's name.
    Snapshot(super::snapshot::SnapshotArgs),
    /// Start a new VM from a memory snapshot, with its own name, MAC, address, hostname, ssh host
    /// key and machine id, and the snapshot's memory and disks (same as `vm create
    /// --from-snapshot S NAME` + `vm start NAME`).
    Fork(super::snapshot::ForkArgs),
    /// Copy files and directory trees between the host and a running VM (`VM:/path`; `-` for a
    /// tar stream), keeping modes and symlinks.
    Cp(super::cp::CpArgs),
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Name, id or id prefix.
    vm: String,
    /// Do not ask the guest to shut down: end the VMM at once (disks may be left unclean).
    #[arg(long, short = 'f')]
    force: bool,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Name, id or id prefix.
    vm: String,
    /// Print the VM as JSON once it runs.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Name, id or id prefix.
    vm: String,
    #[command(flatten)]
    command: CommandArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM's name [default: run-<random>]
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    spec: SpecArgs,
    /// Delete the VM when the command ends.
    #[arg(long)]
    rm: bool,
    /// Import a git repository (default: the current directory's) into the guest at
    /// /root/<repo name> before the command runs, and run the command there unless --workdir
    /// says otherwise; see `banger workspace prepare`.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = ".")]
    workspace: Option<std::path::PathBuf>,
    #[command(flatten)]
    command: CommandArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Name, id or id prefix.
    vm: String,
    /// Only the last N lines.
    #[arg(long, short = 'n')]
    tail: Option<usize>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Name, id or id prefix.
    vm: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What a new VM is made of.
#[derive(Debug, Args)]
pub struct SpecArgs {
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
    /// VMM: auto, qemu or firecracker [default: the daemon's, from the config's `vmm`]
    #[arg(long)]
    vmm: Option<banger_core::config::VmmChoice>,
    /// No NIC: the VM is reachable through the agent channel only (exec, forwards)
    #[arg(long, conflicts_with = "allow_vm_traffic")]
    no_network: bool,
    /// Let the VM reach, and be reached by, other VMs and any host port (refused by default)
    #[arg(long)]
    allow_vm_traffic: bool,
    /// Forward a host port to the VM whenever it runs: [HOST_ADDR:]HOST_PORT:GUEST_PORT, e.g.
    /// 8080:80 (HOST_ADDR defaults to 127.0.0.1; 0.0.0.0 is every interface). Repeatable.
    #[arg(long, short = 'p', value_name = "SPEC", value_parser = super::forward::parse_forward)]
    publish: Vec<banger_core::PortForward>,
    /// Start from this memory snapshot instead of booting (a fork: its image, kernel, CPUs,
    /// memory and disks are the snapshot's). See `banger snapshot list`.
    #[arg(long, value_name = "SNAPSHOT")]
    from_snapshot: Option<String>,
    #[command(flatten)]
    egress: super::network::EgressArgs,
}

impl SpecArgs {
    fn request(self, name: String, start: bool) -> CreateVmRequest {
        CreateVmRequest {
            name,
            image: self.image,
            kernel: self.kernel,
            vcpus: self.cpus,
            memory_mib: self.memory,
            disk_mib: self.disk,
            start,
            vmm: self.vmm.map(Into::into),
            network: self.no_network.then_some(false),
            allow_vm_traffic: self.allow_vm_traffic.then_some(true),
            git_identity: super::ssh::git_identity(),
            publish: self.publish.into_iter().map(Into::into).collect(),
            from_snapshot: self.from_snapshot,
            warm_start: false,
            egress: self.egress.policy(),
            container_disk: None,
        }
    }
}

/// A command to run in a guest.
#[derive(Debug, Args)]
pub struct CommandArgs {
    /// Working directory in the guest [default: /root]
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(long, short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Do not forward stdin (the command reads /dev/null).
    #[arg(long, short = 'n')]
    no_stdin: bool,
    /// Forward stdin to the command. It is the default without -t; with -t (`-it`) what you type
    /// goes to the guest's terminal.
    #[arg(long, short = 'i', conflicts_with = "no_stdin")]
    interactive: bool,
    /// Give the command a terminal: a guest pty of this terminal's size that follows its resizes,
    /// stdout and stderr in one stream. With -i (`-it`) this terminal goes raw until banger ends
    /// (restored however it ends): every key, Ctrl-C and Ctrl-Z included, goes to the guest, and
    /// stdin must be a terminal. With -t alone nothing is typed into it (as Docker's -t). Never
    /// implied: like Docker, `-- bash` without -it runs bash on pipes.
    #[arg(long, short = 't')]
    tty: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

impl CommandArgs {
    fn options(self, forward_interrupt: bool) -> ExecOptions {
        // Docker's rule: -t alone opens no input; without -t stdin is forwarded unless -n.
        let stdin = if self.tty { self.interactive } else { !self.no_stdin };
        ExecOptions { argv: self.command, env: self.env, cwd: self.workdir, stdin, tty: self.tty, forward_interrupt }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name.
    name: String,
    #[command(flatten)]
    spec: SpecArgs,
    /// Boot the new VM and import a git repository (default: the current directory's) at
    /// /root/<repo name> once it is ready; see `banger workspace prepare`.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = ".")]
    workspace: Option<std::path::PathBuf>,
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
    /// Stop running VMs first (at once, without asking the guest: their disks are about to go).
    #[arg(short, long)]
    force: bool,
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
        VmCommand::Start(a) => {
            let op = start(client, &a.vm).await?;
            crate::progress::follow(client, op).await?;
            super::forward::warn_failed(client, &a.vm).await;
            let vm: VmView = client.get(&format!("/v1/vms/{}", segment(&a.vm))).await?;
            if a.json {
                output::json(&vm)?;
            } else {
                eprintln!("{} is running", vm.record.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Stop(a) => {
            let vm = stop(client, &a.vm, a.force).await?;
            eprintln!("{} is {}", vm.record.name, vm.record.state.as_str());
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Restart(a) => {
            stop(client, &a.vm, false).await?;
            let op = start(client, &a.vm).await?;
            crate::progress::follow(client, op).await?;
            super::forward::warn_failed(client, &a.vm).await;
            eprintln!("{} is running", a.vm);
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Exec(a) => {
            let code = crate::exec::exec(client, &a.vm, a.command.options(true)).await?;
            Ok(exit_code(code))
        }
        VmCommand::Run(a) => run_command(client, a).await,
        VmCommand::Ssh(a) => super::ssh::vm_ssh(client, a).await,
        VmCommand::Forward(a) => super::forward::run(client, a).await,
        VmCommand::Network(a) => super::network::run(client, a).await,
        VmCommand::Pause(a) => super::snapshot::pause(client, a, false).await,
        VmCommand::Resume(a) => super::snapshot::pause(client, a, true).await,
        VmCommand::Snapshot(a) => super::snapshot::snapshot(client, a).await,
        VmCommand::Fork(a) => super::snapshot::fork(client, a).await,
        VmCommand::Cp(a) => super::cp::run(client, a).await,
        VmCommand::Logs(a) => {
            let path = match a.tail {
                Some(n) => format!("/v1/vms/{}/logs?tail={n}", segment(&a.vm)),
                None => format!("/v1/vms/{}/logs", segment(&a.vm)),
            };
            let logs: VmLogs = client.get(&path).await?;
            print!("{}", logs.text);
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Ports(a) => {
            let ports: VmPorts = client.get(&format!("/v1/vms/{}/ports", segment(&a.vm))).await?;
            if a.json {
                output::json(&ports)?;
            } else {
                let rows: Vec<Vec<String>> =
                    ports.ports.iter().map(|p| vec![p.proto.clone(), p.address.clone(), p.port.to_string()]).collect();
                output::table(&["PROTO", "ADDRESS", "PORT"], &rows)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Stats(a) => {
            let stats: VmStats = client.get(&format!("/v1/vms/{}/stats", segment(&a.vm))).await?;
            if a.json {
                output::json(&stats)?;
            } else {
                let opt = |v: Option<u64>, f: &dyn Fn(u64) -> String| v.map_or_else(|| "-".to_owned(), f);
                let mut fields = vec![
                    ("name", stats.name.clone()),
                    ("running", stats.running.to_string()),
                    ("pid", stats.pid.map_or_else(|| "-".into(), |p| p.to_string())),
                    ("cpu time", opt(stats.cpu_time_ms, &|ms| human_duration(std::time::Duration::from_millis(ms)))),
                    ("memory (VMM)", vmm_memory(&stats)),
                    ("host memory", opt(stats.host_memory_kib, &|k| format!("{} (PSS + memory file)", mib(k)))),
                    ("guest memory", guest_memory(&stats)),
                    ("uptime", opt(stats.uptime_secs, &|s| human_duration(std::time::Duration::from_secs(s)))),
                ];
                for (name, value) in stats.vmm_metrics.iter().flatten() {
                    fields.push((name.as_str(), value.to_string()));
                }
                output::fields(&fields)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `RSS, PSS, memory file, not held` of a VMM, what is known of it.
fn vmm_memory(stats: &VmStats) -> String {
    let parts: Vec<String> = [
        ("RSS", stats.rss_kib),
        ("PSS", stats.pss_kib),
        ("memory file", stats.memory_file_kib),
        ("snapshot memory (shared by its forks)", stats.snapshot_memory_kib),
        ("not held (returned or untouched)", stats.memory_returned_kib),
    ]
    .into_iter()
    .filter_map(|(name, kib)| kib.map(|k| format!("{} {name}", mib(k))))
    .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The guest's own view: available of total.
fn guest_memory(stats: &VmStats) -> String {
    match (stats.guest_mem_available_kib, stats.guest_mem_total_kib) {
        (Some(available), Some(total)) => format!("{} available of {}", mib(available), mib(total)),
        _ => "-".to_owned(),
    }
}

/// The process exit code for a guest command's exit code.
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}

/// Asks for a boot, sending the caller's git identity along.
async fn start(client: &Client, vm: &str) -> anyhow::Result<OperationRecord> {
    let req = StartVmRequest { git_identity: super::ssh::git_identity() };
    client.call(Method::POST, &format!("/v1/vms/{}/start", segment(vm)), Some(&req)).await
}

pub(crate) async fn stop(client: &Client, vm: &str, force: bool) -> anyhow::Result<VmView> {
    let query = if force { "?force=true" } else { "" };
    client.call(Method::POST, &format!("/v1/vms/{}/stop{query}", segment(vm)), None::<&()>).await
}

async fn run_command(client: &Client, a: RunArgs) -> anyhow::Result<ExitCode> {
    let name = a.name.clone().unwrap_or_else(|| format!("run-{}", &banger_core::new_id()[..8]));
    let repo = super::workspace::prepare_flag(a.workspace.as_deref())?;
    // With the config's `warm_start`, a run may start from the warm-start snapshot.
    let req = CreateVmRequest { warm_start: true, ..a.spec.request(name.clone(), true) };
    let mut opts = a.command.options(false);
    if opts.tty && opts.stdin && !crate::tty::stdin_is_terminal() {
        // Before a VM is made for nothing.
        return Err(crate::tty::TtyError::NotATerminal.into());
    }
    if let (Some(repo), None) = (&repo, &opts.cwd) {
        opts.cwd = Some(repo.guest_dir());
    }
    let work = async {
        let op: OperationRecord = client.call(Method::POST, "/v1/vms", Some(&req)).await?;
        crate::progress::follow(client, op).await?;
        super::forward::warn_failed(client, &name).await;
        if let Some(repo) = &repo {
            super::workspace::import(client, &name, repo).await?;
        }
        crate::exec::exec(client, &name, opts).await
    };
    let outcome = tokio::select! {
        r = work => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    // Whatever happened, leave nothing running (and nothing at all with --rm).
    let cleanup = async {
        let exists = client.get::<VmView>(&format!("/v1/vms/{}", segment(&name))).await.is_ok();
        if !exists {
            return Ok::<(), anyhow::Error>(());
        }
        // A VM about to be deleted needs no clean shutdown.
        stop(client, &name, a.rm).await?;
        if a.rm {
            client.call::<VmView>(Method::DELETE, &format!("/v1/vms/{}", segment(&name)), None::<&()>).await?;
        }
        Ok(())
    };
    let cleaned = cleanup.await;
    match outcome {
        None => {
            cleaned?;
            eprintln!("interrupted; vm {name} {}", if a.rm { "deleted" } else { "stopped" });
            Ok(ExitCode::from(130))
        }
        Some(Err(e)) => {
            if let Err(c) = cleaned {
                eprintln!("banger: cleaning up {name} failed too: {c:#}");
            }
            Err(e)
        }
        Some(Ok(code)) => {
            cleaned?;
            Ok(exit_code(code))
        }
    }
}

async fn create(client: &Client, a: CreateArgs) -> anyhow::Result<ExitCode> {
    // A workspace needs a running guest: such a create boots the VM.
    let repo = super::workspace::prepare_flag(a.workspace.as_deref())?;
    let req = a.spec.request(a.name, repo.is_some());
    let op: OperationRecord = client.call(Method::POST, "/v1/vms", Some(&req)).await?;
    let done = crate::progress::follow(client, op).await?;
    let id = done.result_id.unwrap_or_else(|| req.name.clone());
    if let Some(repo) = &repo {
        super::workspace::import_into_new(client, &req.name, repo).await?;
    }
    let vm: VmView = client.get(&format!("/v1/vms/{}", segment(&id))).await?;
    let shown = show(&vm, a.json)?;
    if !a.json {
        for f in &req.publish {
            eprintln!("forward {} listens whenever {} runs", f.describe(&vm.record.name), vm.record.name);
        }
    }
    Ok(shown)
}

async fn list(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let raw = client.get_raw("/v1/vms").await?;
    if json {
        output::json_bytes(&raw)?;
        return Ok(ExitCode::SUCCESS);
    }
    let list: ListRows = serde_json::from_slice(&raw).context("cannot decode bangerd's answer to /v1/vms")?;
    let rows: Vec<Vec<String>> = list
        .vms
        .into_iter()
        .map(|r| {
            vec![
                r.name,
                r.id,
                r.state.as_str().to_owned(),
                r.image,
                r.vcpus.to_string(),
                human_mib(r.memory_mib),
                human_mib(r.disk_mib),
                r.guest_ip.unwrap_or_else(|| "-".into()),
                format!("{} ago", human_duration(age(&r.created_at))),
            ]
        })
        .collect();
    output::table(&["NAME", "ID", "STATE", "IMAGE", "CPUS", "MEMORY", "DISK", "IP", "CREATED"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

/// `GET /v1/vms` as the table reads it: only the columns it shows. A [`VmView`] nests two
/// flattened structs, which serde decodes through an intermediate buffer per VM; with 1,000 VMs
/// that alone cost milliseconds.
#[derive(serde::Deserialize)]
struct ListRows {
    vms: Vec<ListRow>,
}

#[derive(serde::Deserialize)]
struct ListRow {
    name: String,
    id: String,
    state: banger_proto::ObservedState,
    image: String,
    vcpus: u32,
    memory_mib: u64,
    disk_mib: u64,
    guest_ip: Option<String>,
    created_at: String,
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
        ("egress", vm.egress.as_ref().map_or_else(|| "-".into(), egress_line)),
        ("dir", vm.paths.dir.clone()),
        ("created", r.created_at.clone()),
        ("updated", r.updated_at.clone()),
        ("last error", r.last_error.clone().unwrap_or_else(|| "-".into())),
    ])?;
    Ok(ExitCode::SUCCESS)
}

fn egress_line(p: &banger_proto::EgressPolicy) -> String {
    let model = p.to_model().map(|m| m.to_string());
    model.unwrap_or_else(|_| format!("{:?}", p.mode))
}

async fn delete(client: &Client, a: DeleteArgs) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for reference in a.vms {
        if a.force {
            if let Err(e) = stop(client, &reference, true).await {
                eprintln!("banger: cannot stop {reference}: {e}");
                failed = true;
                continue;
            }
        }
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
