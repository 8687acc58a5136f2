//! The sandbox tools: create, run, list, show, stop, delete, exec, snapshot and fork.

use std::collections::BTreeMap;
use std::time::Duration;

use banger_proto::{CreateSnapshotRequest, CreateVmRequest, OperationRecord, SnapshotView, VmList, VmView};
use hyper::Method;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::command::{self, Line};
use super::limits::{self, EXEC_OUTPUT_DEFAULT};
use super::{exec, reply, Banger, ToolError};
use crate::cmd::segment;

/// The longest a command may run by default, and at most.
const EXEC_TIMEOUT_DEFAULT: u64 = 300;
const EXEC_TIMEOUT_MAX: u64 = 3600;

/// A size: MiB as a number, or text with a unit.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Size {
    /// MiB.
    Mib(u64),
    /// With a unit: `512M`, `2G` (a bare number is MiB).
    Text(String),
}

impl Size {
    fn mib(&self) -> Result<u64, ToolError> {
        match self {
            Self::Mib(n) => Ok(*n),
            Self::Text(t) => banger_core::size::parse_mib(t).map_err(|e| ToolError::Invalid(e.to_string())),
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Mib(n) => format!("{n}M"),
            Self::Text(t) => t.clone(),
        }
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateArgs {
    /// The sandbox's name, a DNS label (1-63 of a-z, 0-9, '-') [default: sandbox-<random>]
    pub name: Option<String>,
    /// Root filesystem image (see `banger image list`) [default: the daemon's default_image]
    pub image: Option<String>,
    /// Virtual CPUs [default: the daemon's default_vcpus]
    pub cpus: Option<u32>,
    /// Memory: MiB, or a size such as "512M" or "2G" [default: the daemon's default_memory_mib]
    pub memory: Option<Size>,
    /// Work disk (/root): MiB, or a size such as "4G" [default: the daemon's default_disk_mib]
    pub disk: Option<Size>,
    /// Give it a network interface (false: reachable through exec and files only) [default: true]
    pub network: Option<bool>,
    /// A host path inside a git repository to import into the sandbox at /root/<repo name>
    /// once it runs (tracked files, uncommitted changes and .git)
    pub workspace: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RunArgs {
    /// Root filesystem image [default: the daemon's default_image]
    pub image: Option<String>,
    /// The program and its arguments (no shell: use ["sh", "-c", "..."] for one)
    pub command: Vec<String>,
    /// Seconds the command may run before it is killed [default: 300, at most 3600]
    pub timeout_s: Option<u64>,
    /// Bytes of each of stdout and stderr returned; the rest is counted and cut with a marker
    /// [default: 262144 (256 KiB), at most 16 MiB]
    pub max_output_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct NameArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct StopArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// End the VM at once without asking the guest to shut down [default: false]
    pub force: Option<bool>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct DeleteArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// Stop a running sandbox first (at once: its disks are about to go) [default: true]
    pub force: Option<bool>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExecArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// The program and its arguments (no shell: use ["sh", "-c", "..."] for one)
    pub command: Vec<String>,
    /// Absolute working directory in the guest [default: /root]
    pub cwd: Option<String>,
    /// Extra environment variables
    pub env: Option<BTreeMap<String, String>>,
    /// Text for the command's stdin, then end of input [default: stdin is /dev/null]
    pub stdin: Option<String>,
    /// Seconds the command may run before it is killed [default: 300, at most 3600]
    pub timeout_s: Option<u64>,
    /// Start it as a background session instead and return the session's name at once (read
    /// its output with session_logs, stop it with session_kill) [default: false]
    pub background: Option<bool>,
    /// Bytes of each of stdout and stderr returned; the rest is counted and cut with a marker
    /// [default: 262144 (256 KiB), at most 16 MiB]
    pub max_output_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SnapshotArgs {
    /// The sandbox (running or paused): name, id or id prefix
    pub name: String,
    /// The snapshot's name, a DNS label [default: NAME-YYYYMMDD-HHMMSS]
    pub snapshot_name: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ForkArgs {
    /// The sandbox to fork (running or paused): name, id or id prefix; a memory snapshot of it
    /// is taken now unless `snapshot` names one
    pub name: String,
    /// The new sandbox's name [default: NAME-fork-<random>]
    pub new_name: Option<String>,
    /// Fork from this existing memory snapshot instead of taking one
    pub snapshot: Option<String>,
}

fn short_id() -> String {
    banger_core::new_id().chars().take(8).collect()
}

impl Banger {
    /// Creates and boots `req` (its `start` set), following the operation; the running VM and
    /// the warnings of its stages.
    async fn create_running(&self, req: &CreateVmRequest) -> Result<(VmView, Vec<String>), ToolError> {
        let op: OperationRecord = self.api().await?.call(Method::POST, "/v1/vms", Some(req)).await?;
        self.until_running(req, op).await
    }

    /// Follows a create's operation to its end; the running VM and its stages' warnings.
    async fn until_running(
        &self,
        req: &CreateVmRequest,
        op: OperationRecord,
    ) -> Result<(VmView, Vec<String>), ToolError> {
        let client = &self.client;
        let done = crate::progress::follow(client, op).await?;
        let warnings = done.stages.iter().flat_map(|s| s.warnings.iter().cloned()).collect();
        let id = done.result_id.unwrap_or_else(|| req.name.clone());
        let vm: VmView = client.get(&format!("/v1/vms/{}", segment(&id))).await?;
        Ok((vm, warnings))
    }

    /// `{name, ip, dns_name, state}` of a VM.
    async fn summary(&self, vm: &VmView) -> Value {
        let r = &vm.record;
        json!({
            "name": r.name,
            "id": r.id,
            "state": r.state.as_str(),
            "ip": r.guest_ip,
            "dns_name": self.dns_name(&r.name).await,
        })
    }

    /// `sandbox_run`: create, run, and delete whatever happened (also when the server stops).
    async fn run_once(&self, a: RunArgs, cancel: CancellationToken) -> Result<Value, ToolError> {
        let spec = exec_spec(a.command, Vec::new(), None, None, a.timeout_s, a.max_output_bytes)?;
        let name = format!("run-{}", short_id());
        let req = CreateVmRequest {
            name: name.clone(),
            image: a.image,
            start: true,
            warm_start: true,
            git_identity: crate::cmd::ssh::git_identity(),
            ..Default::default()
        };
        // The create is asked for outside the cancellable part, so that its operation is known:
        // the VM's row is made by that operation after the answer.
        let op: OperationRecord = self.api().await?.call(Method::POST, "/v1/vms", Some(&req)).await?;
        let op_id = op.id.clone();
        let work = async {
            self.until_running(&req, op).await?;
            Ok::<_, ToolError>(exec::run(&self.client, &name, spec).await?)
        };
        let ran = tokio::select! {
            r = work => r,
            () = cancel.cancelled() => {
                // A create still running is cancelled and waited for, so its VM can be found.
                let path = format!("/v1/operations/{}/cancel", segment(&op_id));
                let _ = self.client.call::<OperationRecord>(Method::POST, &path, None::<&()>).await;
                if let Ok(op) = self.client.get::<OperationRecord>(&format!("/v1/operations/{}", segment(&op_id))).await {
                    let _ = crate::progress::follow(&self.client, op).await;
                }
                Err(ToolError::Failed(format!("the run was cancelled (the call, or banger mcp stopped); sandbox {name} was deleted")))
            }
        };
        // Whatever happened, leave nothing behind.
        let exists = self.client.get::<VmView>(&format!("/v1/vms/{}", segment(&name))).await.is_ok();
        let cleaned = if exists { self.remove_vm(&name).await.map(drop) } else { Ok(()) };
        let outcome = ran?;
        cleaned?;
        let mut value = exec_result(&outcome);
        value["name"] = json!(name);
        Ok(value)
    }

    /// Stops (at once) and deletes a VM.
    async fn remove_vm(&self, name: &str) -> Result<VmView, ToolError> {
        let client = self.api().await?;
        crate::cmd::vm::stop(client, name, true).await?;
        Ok(client.call::<VmView>(Method::DELETE, &format!("/v1/vms/{}", segment(name)), None::<&()>).await?)
    }
}

/// An exec's outcome as a tool result.
fn exec_result(o: &exec::Outcome) -> Value {
    json!({
        "exit_code": o.exit_code,
        "stdout": limits::text(o.stdout.bytes(), o.stdout.total()),
        "stderr": limits::text(o.stderr.bytes(), o.stderr.total()),
        "truncated": o.stdout.truncated() || o.stderr.truncated(),
        "stdout_bytes": o.stdout.total(),
        "stderr_bytes": o.stderr.total(),
        "timed_out": o.timed_out,
    })
}

fn exec_spec(
    command: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: Option<String>,
    timeout_s: Option<u64>,
    max_output_bytes: Option<u64>,
) -> Result<exec::Spec, ToolError> {
    if command.is_empty() {
        return Err(ToolError::Invalid(
            "command is empty; give the program and its arguments, e.g. [\"ls\", \"-l\"]".into(),
        ));
    }
    Ok(exec::Spec {
        argv: command,
        env,
        cwd,
        stdin: stdin.map(String::into_bytes),
        timeout: Duration::from_secs(timeout_s.unwrap_or(EXEC_TIMEOUT_DEFAULT).clamp(1, EXEC_TIMEOUT_MAX)),
        limit: limits::limit(max_output_bytes, EXEC_OUTPUT_DEFAULT),
    })
}

#[tool_router(router = sandbox_router, vis = "pub(super)")]
impl Banger {
    /// Create a sandbox (a microVM), boot it and wait until it is ready; returns its name, IP
    /// address and DNS name (NAME.vm, resolvable from other sandboxes).
    #[tool]
    async fn sandbox_create(&self, Parameters(a): Parameters<CreateArgs>) -> CallToolResult {
        let name = a.name.clone().unwrap_or_else(|| format!("sandbox-{}", short_id()));
        let line = Line::banger(&["vm", "create", &name])
            .opt("--image", a.image.as_ref())
            .opt("--cpus", a.cpus)
            .opt("--memory", a.memory.as_ref().map(Size::text))
            .opt("--disk", a.disk.as_ref().map(Size::text))
            .flag("--no-network", a.network == Some(false));
        // `vm create` boots only with --workspace; otherwise a start follows.
        let line = match &a.workspace {
            Some(path) => line.opt("--workspace", Some(path)).text(),
            None => format!("{} && {}", line.text(), Line::banger(&["vm", "start", &name]).text()),
        };
        let result = async {
            let req = CreateVmRequest {
                name: name.clone(),
                image: a.image,
                vcpus: a.cpus,
                memory_mib: a.memory.as_ref().map(Size::mib).transpose()?,
                disk_mib: a.disk.as_ref().map(Size::mib).transpose()?,
                start: true,
                network: a.network.filter(|n| !n),
                git_identity: crate::cmd::ssh::git_identity(),
                ..Default::default()
            };
            // The repository is found before anything is created.
            let repo = a.workspace.as_deref().map(|p| crate::cmd::workspace::discover(Some(p.as_ref()))).transpose()?;
            let (vm, warnings) = self.create_running(&req).await?;
            let mut value = self.summary(&vm).await;
            value["warnings"] = json!(warnings);
            if let Some(repo) = &repo {
                let report = crate::cmd::workspace::import_into_new(self.api().await?, &vm.record.name, repo).await?;
                value["workspace"] = serde_json::to_value(&report).map_err(|e| ToolError::Failed(e.to_string()))?;
            }
            Ok(value)
        }
        .await;
        reply(line, result)
    }

    /// Run one command in a new sandbox and delete the sandbox afterwards (like `banger vm run
    /// --rm`); returns the exit code and output.
    #[tool]
    async fn sandbox_run(&self, Parameters(a): Parameters<RunArgs>) -> CallToolResult {
        let line = Line::banger(&["vm", "run", "--rm"]).opt("--image", a.image.as_ref()).command(&a.command).text();
        // Its own task, which a cancelled call (this future dropped: the guard cancels the
        // token) or a stopping server ends early, still deleting the sandbox.
        let cancel = self.stopping.child_token();
        let guard = cancel.clone().drop_guard();
        let this = self.clone();
        let result = match self.tasks.spawn(async move { this.run_once(a, cancel).await }).await {
            Ok(result) => result,
            Err(e) => Err(ToolError::Failed(format!("the run failed: {e}"))),
        };
        guard.disarm();
        reply(line, result)
    }

    /// List the sandboxes with their state, image, size and address.
    #[tool(annotations(read_only_hint = true))]
    async fn sandbox_list(&self) -> CallToolResult {
        let result = async {
            let list: VmList = self.api().await?.get("/v1/vms").await?;
            let suffix = self.dns_name("").await;
            let vms: Vec<Value> = list
                .vms
                .iter()
                .map(|v| {
                    let r = &v.record;
                    json!({
                        "name": r.name, "id": r.id, "state": r.state.as_str(), "image": r.spec.image,
                        "cpus": r.spec.vcpus, "memory_mib": r.spec.memory_mib, "disk_mib": r.spec.disk_mib,
                        "ip": r.guest_ip, "dns_name": format!("{}{suffix}", r.name), "created_at": r.created_at,
                    })
                })
                .collect();
            Ok(json!({ "sandboxes": vms }))
        }
        .await;
        reply(Line::banger(&["vm", "list"]).text(), result)
    }

    /// Show one sandbox in full: spec, state, address, paths, last error.
    #[tool(annotations(read_only_hint = true))]
    async fn sandbox_show(&self, Parameters(a): Parameters<NameArgs>) -> CallToolResult {
        let result = async {
            let vm: VmView = self.api().await?.get(&format!("/v1/vms/{}", segment(&a.name))).await?;
            let mut value = serde_json::to_value(&vm).map_err(|e| ToolError::Failed(e.to_string()))?;
            value["dns_name"] = json!(self.dns_name(&vm.record.name).await);
            Ok(value)
        }
        .await;
        reply(Line::banger(&["vm", "show", &a.name, "--json"]).text(), result)
    }

    /// Stop a sandbox (gracefully through its agent unless `force`); its disks are kept.
    #[tool]
    async fn sandbox_stop(&self, Parameters(a): Parameters<StopArgs>) -> CallToolResult {
        let force = a.force.unwrap_or(false);
        let result = async {
            let vm = crate::cmd::vm::stop(self.api().await?, &a.name, force).await?;
            Ok(json!({ "name": vm.record.name, "state": vm.record.state.as_str() }))
        }
        .await;
        reply(Line::banger(&["vm", "stop", &a.name]).flag("--force", force).text(), result)
    }

    /// Delete a sandbox and its disks (stopping it first unless `force` is false).
    #[tool(annotations(destructive_hint = true))]
    async fn sandbox_delete(&self, Parameters(a): Parameters<DeleteArgs>) -> CallToolResult {
        let force = a.force.unwrap_or(true);
        let result = async {
            let vm = if force {
                self.remove_vm(&a.name).await?
            } else {
                let path = format!("/v1/vms/{}", segment(&a.name));
                self.api().await?.call::<VmView>(Method::DELETE, &path, None::<&()>).await?
            };
            Ok(json!({ "name": vm.record.name, "deleted": true }))
        }
        .await;
        reply(Line::banger(&["vm", "delete"]).flag("--force", force).args([&a.name]).text(), result)
    }

    /// Run a command in a running sandbox and wait for it: exit code, stdout and stderr (each
    /// cut at max_output_bytes with a marker giving the total). With `background`, start it as
    /// a session and return at once.
    #[tool]
    async fn sandbox_exec(&self, Parameters(a): Parameters<ExecArgs>) -> CallToolResult {
        let env: Vec<(String, String)> = a.env.clone().unwrap_or_default().into_iter().collect();
        if a.background == Some(true) {
            let (line, mut result) = self.start_session(&a.name, a.command, None, a.cwd, env, a.stdin.is_some()).await;
            // The session's stdin gets the text, then its end.
            if let (Ok(session), Some(text)) = (&result, a.stdin) {
                let id = session["id"].as_str().unwrap_or_default().to_owned();
                if let Err(e) =
                    super::tools_more::write_stdin(&self.client, &a.name, &id, text.into_bytes(), true).await
                {
                    result = Err(e.into());
                }
            }
            return reply(line, result);
        }
        let line = command::exec(&a.name, &a.command, a.cwd.as_deref(), &env, a.stdin.is_some());
        let result = async {
            let spec = exec_spec(a.command, env, a.cwd, a.stdin, a.timeout_s, a.max_output_bytes)?;
            let outcome = exec::run(self.api().await?, &a.name, spec).await?;
            Ok(exec_result(&outcome))
        }
        .await;
        reply(line, result)
    }

    /// Take a memory snapshot of a running sandbox (memory, devices and disks from one instant;
    /// the guest pauses meanwhile). Fork it with sandbox_fork.
    #[tool]
    async fn sandbox_snapshot(&self, Parameters(a): Parameters<SnapshotArgs>) -> CallToolResult {
        let line = Line::banger(&["vm", "snapshot", &a.name]).opt("--name", a.snapshot_name.as_ref());
        let result = async {
            let req = CreateSnapshotRequest { name: a.snapshot_name };
            let path = format!("/v1/vms/{}/snapshot", segment(&a.name));
            let s: SnapshotView = self.api().await?.call(Method::POST, &path, Some(&req)).await?;
            Ok(json!({ "snapshot": s.record.name, "source": s.record.source_vm_name, "size_bytes": s.record.size_bytes }))
        }
        .await;
        reply(line.text(), result)
    }

    /// Fork a sandbox: start a new one from a memory snapshot of it (taken now unless
    /// `snapshot` names one), with the same memory, processes and disks but its own name,
    /// address and identity.
    #[tool]
    async fn sandbox_fork(&self, Parameters(a): Parameters<ForkArgs>) -> CallToolResult {
        let new_name = a.new_name.clone().unwrap_or_else(|| format!("{}-fork-{}", a.name, &short_id()[..4]));
        let snapshot = a.snapshot.clone().unwrap_or_else(|| format!("{}-{}", a.name, short_id()));
        let fork = Line::banger(&["vm", "fork", &snapshot, "--name", &new_name]).text();
        let line = match a.snapshot {
            Some(_) => fork,
            None => format!("{} && {fork}", Line::banger(&["vm", "snapshot", &a.name, "--name", &snapshot]).text()),
        };
        let result = async {
            if a.snapshot.is_none() {
                let req = CreateSnapshotRequest { name: Some(snapshot.clone()) };
                let path = format!("/v1/vms/{}/snapshot", segment(&a.name));
                self.api().await?.call::<SnapshotView>(Method::POST, &path, Some(&req)).await?;
            }
            let req = CreateVmRequest {
                name: new_name.clone(),
                from_snapshot: Some(snapshot.clone()),
                start: true,
                git_identity: crate::cmd::ssh::git_identity(),
                ..Default::default()
            };
            let (vm, warnings) = self.create_running(&req).await?;
            let mut value = self.summary(&vm).await;
            value["snapshot"] = json!(snapshot);
            value["warnings"] = json!(warnings);
            Ok(value)
        }
        .await;
        reply(line, result)
    }
}
