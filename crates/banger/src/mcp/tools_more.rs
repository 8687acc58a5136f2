//! The session, port and workspace tools.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use banger_proto::agent::{AgentFailure, Decoder, Frame, FrameKind};
use banger_proto::{ForwardList, ForwardView, SessionStatus, SessionView, StartSessionRequest, StdinMode, VmPorts};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::command::Line;
use super::limits::{self, Encoding, Tail, LOGS_DEFAULT};
use super::tools_sandbox::NameArgs;
use super::{reply, Banger, ToolError};
use crate::client::{api_error, ApiErrorAnswer, Client};
use crate::cmd::segment;

/// How long a session write waits for the daemon to take the bytes and detach.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading a session's log may take.
const LOGS_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SessionStartArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// The program and its arguments
    pub command: Vec<String>,
    /// The session's name, unique in the sandbox [default: the command's name and part of the id]
    pub session: Option<String>,
    /// Absolute working directory in the guest; it must exist [default: /root]
    pub cwd: Option<String>,
    /// Extra environment variables
    pub env: Option<BTreeMap<String, String>>,
    /// Give it a stdin pipe that session_write writes to (otherwise /dev/null) [default: false]
    pub stdin: Option<bool>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SessionLogsArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// The session: name, id or id prefix
    pub session: String,
    /// Read its stderr log instead of stdout [default: false]
    pub stderr: Option<bool>,
    /// The most bytes returned: the end of the log, with a marker giving its whole size when
    /// more was written [default: 262144 (256 KiB), at most 16 MiB]
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SessionWriteArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// The session (started with stdin: true): name, id or id prefix
    pub session: String,
    /// What to write to its stdin (at most 16 MiB once decoded)
    pub data: String,
    /// "utf8" or "base64" [default: utf8]
    pub encoding: Option<Encoding>,
    /// Close its stdin afterwards (end of input) [default: false]
    pub eof: Option<bool>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SessionKillArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// The session: name, id or id prefix
    pub session: String,
    /// Send SIGTERM (a stop) instead of SIGKILL [default: false]
    pub graceful: Option<bool>,
    /// Seconds to wait for it to end [default: 10]
    pub wait_s: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ForwardArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// The port in the guest, 1-65535
    pub guest_port: u16,
    /// The host port to listen on [default: guest_port]
    pub host_port: Option<u16>,
    /// The host address to listen on: 127.0.0.1 (this host only) or 0.0.0.0 (every interface)
    /// [default: 127.0.0.1]
    pub host_addr: Option<std::net::IpAddr>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ImportArgs {
    /// The sandbox (running): name, id or id prefix
    pub name: String,
    /// A host path inside a git repository; it lands in the guest at /root/<repo name>
    pub path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExportArgs {
    /// The sandbox (running): name, id or id prefix
    pub name: String,
    /// The host repository to bring the guest's work into (an absolute host path)
    pub repo: String,
    /// The branch to make [default: banger/<name>]
    pub branch: Option<String>,
    /// Write the guest's uncommitted changes to this host file (absolute) as a git patch
    /// instead of making a branch
    pub patch_file: Option<String>,
    /// The repository's directory in the guest [default: /root/<name of the repository>]
    pub guest_dir: Option<String>,
    /// Replace the branch or patch file if it exists [default: false]
    pub force: Option<bool>,
}

fn session_path(vm: &str, session: &str) -> String {
    format!("/v1/vms/{}/sessions/{}", segment(vm), segment(session))
}

fn session_value(s: &SessionView) -> Value {
    let r = &s.record;
    json!({
        "session": r.name, "id": r.id, "sandbox": s.vm, "status": r.status.as_str(), "pid": r.pid,
        "exit_code": r.exit_code, "stdout_path": s.stdout_path, "stderr_path": s.stderr_path,
    })
}

impl Banger {
    /// Starts a session (for `session_start` and a background `sandbox_exec`); the command
    /// line and the result.
    pub(super) async fn start_session(
        &self,
        vm: &str,
        command: Vec<String>,
        session: Option<String>,
        cwd: Option<String>,
        env: Vec<(String, String)>,
        pipe: bool,
    ) -> (String, Result<Value, ToolError>) {
        let mut line =
            Line::banger(&["session", "start", vm]).opt("--name", session.as_ref()).opt("--cwd", cwd.as_ref());
        for (k, v) in &env {
            line = line.opt("--env", Some(format!("{k}={v}")));
        }
        let line = line.opt("--stdin", pipe.then_some("pipe")).command(&command).text();
        let result = async {
            let mut words = command.into_iter();
            let Some(program) = words.next() else {
                return Err(ToolError::Invalid("command is empty; give the program and its arguments".into()));
            };
            #[allow(clippy::needless_update, reason = "the request grows optional fields that default to off")]
            let req = StartSessionRequest {
                name: session,
                command: program,
                args: words.collect(),
                cwd,
                env: env.into_iter().collect(),
                tags: BTreeMap::new(),
                stdin: if pipe { StdinMode::Pipe } else { StdinMode::Closed },
                ..Default::default()
            };
            let path = format!("/v1/vms/{}/sessions", segment(vm));
            let s: SessionView = self.api().await?.call(Method::POST, &path, Some(&req)).await?;
            if s.record.status == SessionStatus::Failed {
                let r = &s.record;
                return Err(ToolError::Failed(format!(
                    "session '{}' failed to start at stage '{}': {}",
                    r.name,
                    r.launch_stage.as_deref().unwrap_or("launch"),
                    r.launch_message.as_deref().or(r.error.as_deref()).unwrap_or("no reason given")
                )));
            }
            Ok(session_value(&s))
        }
        .await;
        (line, result)
    }
}

/// The last `cap` bytes of a session log and its whole size, read within [`LOGS_TIMEOUT`].
async fn log_tail(client: &Client, path: &str, cap: usize) -> anyhow::Result<Tail> {
    let req =
        Request::get(path).header("host", "bangerd").body(Full::new(Bytes::new())).context("cannot build request")?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut tail = Tail::new(if status.is_success() { cap } else { 64 * 1024 });
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.context("the log stream broke")?.into_data() {
                tail.push(&data);
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::time::timeout(LOGS_TIMEOUT, read).await.map_err(|_| {
        anyhow::anyhow!("reading the log took over {} s; read less with max_bytes", LOGS_TIMEOUT.as_secs())
    })??;
    if !status.is_success() {
        return Err(ApiErrorAnswer { status, body: api_error(status, &tail.into_bytes()) }.into());
    }
    Ok(tail)
}

/// Writes `data` to a pipe session's stdin through the attach stream, then detaches.
pub(super) async fn write_stdin(
    client: &Client,
    vm: &str,
    session: &str,
    data: Vec<u8>,
    eof: bool,
) -> anyhow::Result<()> {
    let path = format!("{}/attach?stdin=true", session_path(vm, session));
    let stream = crate::exec::upgrade(client, &path, "banger-attach").await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut out = Vec::with_capacity(data.len() + 64);
    for chunk in data.chunks(64 * 1024) {
        out.extend(Frame::new(1, FrameKind::Stdin, chunk.to_vec()).encode());
    }
    if eof {
        out.extend(Frame::new(1, FrameKind::Stdin, Vec::new()).encode());
    }
    out.extend(Frame::new(1, FrameKind::Close, Vec::new()).encode());
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&out).await;
        let _ = wr.flush().await;
        wr
    });
    // The log tails and live output that an attach sends are read and dropped; the daemon's
    // `Close` says the session has our bytes and is free for the next attach.
    let done = async {
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while let Some(frame) = decoder.next_frame().context("corrupt attach stream from bangerd")? {
                match frame.kind {
                    FrameKind::Close | FrameKind::Exit => return Ok(()),
                    FrameKind::Error => bail!(frame.parse::<AgentFailure>("error")?.message),
                    _ => {}
                }
            }
            let n = rd.read(&mut buf).await.context("attach stream broke")?;
            if n == 0 {
                bail!("bangerd closed the attach stream before the write was done");
            }
            decoder.push(&buf[..n]);
        }
    };
    let outcome = tokio::time::timeout(WRITE_TIMEOUT, done).await;
    writer.abort();
    outcome.map_err(|_| anyhow::anyhow!("the session did not take the input within {} s", WRITE_TIMEOUT.as_secs()))?
}

#[tool_router(router = more_router, vis = "pub(super)")]
impl Banger {
    /// Start a supervised background process (a session) in a sandbox; it outlives this
    /// server. Read its output with session_logs, feed it with session_write, end it with
    /// session_kill.
    #[tool]
    async fn session_start(&self, Parameters(a): Parameters<SessionStartArgs>) -> CallToolResult {
        let env = a.env.unwrap_or_default().into_iter().collect();
        let (line, result) =
            self.start_session(&a.name, a.command, a.session, a.cwd, env, a.stdin.unwrap_or(false)).await;
        reply(line, result)
    }

    /// Read the end of a session's stdout (or stderr) log, with its status.
    #[tool(annotations(read_only_hint = true))]
    async fn session_logs(&self, Parameters(a): Parameters<SessionLogsArgs>) -> CallToolResult {
        let stderr = a.stderr.unwrap_or(false);
        let line = Line::banger(&["session", "logs", &a.name, &a.session]).flag("--stderr", stderr).text();
        let result = async {
            let client = self.api().await?;
            let path = format!("{}/logs?stderr={stderr}&follow=false", session_path(&a.name, &a.session));
            let tail = log_tail(client, &path, limits::limit(a.max_bytes, LOGS_DEFAULT)).await?;
            let s: SessionView = client.get(&session_path(&a.name, &a.session)).await?;
            let (total, truncated) = (tail.total(), tail.truncated());
            let mut value = session_value(&s);
            value["log"] = json!(limits::tail_text(&tail.into_bytes(), total));
            value["log_bytes"] = json!(total);
            value["truncated"] = json!(truncated);
            Ok(value)
        }
        .await;
        reply(line, result)
    }

    /// Write to the stdin of a session started with stdin: true (and close it with eof).
    #[tool]
    async fn session_write(&self, Parameters(a): Parameters<SessionWriteArgs>) -> CallToolResult {
        let line = Line::banger(&["session", "attach", &a.name, &a.session]).text();
        let result = async {
            let data = a.encoding.unwrap_or_default().decode(&a.data).map_err(ToolError::Invalid)?;
            let written = data.len();
            write_stdin(self.api().await?, &a.name, &a.session, data, a.eof.unwrap_or(false)).await?;
            Ok(json!({ "session": a.session, "bytes_written": written, "eof": a.eof.unwrap_or(false) }))
        }
        .await;
        reply(line, result)
    }

    /// End a session: SIGKILL to its process group (SIGTERM with graceful), then wait for it.
    #[tool(annotations(destructive_hint = true))]
    async fn session_kill(&self, Parameters(a): Parameters<SessionKillArgs>) -> CallToolResult {
        let verb = if a.graceful == Some(true) { "stop" } else { "kill" };
        let wait = a.wait_s.unwrap_or(10);
        let line = Line::banger(&["session", verb, &a.name, &a.session]).opt("--timeout", a.wait_s).text();
        let result = async {
            let path = format!("{}/{verb}?wait_secs={wait}", session_path(&a.name, &a.session));
            let s: SessionView = self.api().await?.call(Method::POST, &path, None::<&()>).await?;
            Ok(session_value(&s))
        }
        .await;
        reply(line, result)
    }

    /// Forward a host port to a port in a sandbox (kept with the sandbox; it listens whenever
    /// the sandbox runs).
    #[tool]
    async fn port_forward(&self, Parameters(a): Parameters<ForwardArgs>) -> CallToolResult {
        let host_port = a.host_port.unwrap_or(a.guest_port);
        let spec = match a.host_addr {
            Some(addr) => format!("{}:{}", std::net::SocketAddr::new(addr, host_port), a.guest_port),
            None => format!("{host_port}:{}", a.guest_port),
        };
        let line = Line::banger(&["vm", "forward", &a.name, &spec]).text();
        let result = async {
            let forward = banger_proto::PortForward {
                host_addr: a.host_addr.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
                host_port,
                guest_port: a.guest_port,
                protocol: Default::default(),
            };
            let path = format!("/v1/vms/{}/forwards", segment(&a.name));
            let v: ForwardView = self.api().await?.call(Method::POST, &path, Some(&forward)).await?;
            Ok(json!({ "forward": v.forward.describe(&v.vm), "state": v.state.as_str(), "error": v.error }))
        }
        .await;
        reply(line, result)
    }

    /// List a sandbox's port forwards, and the ports listening in it when it runs.
    #[tool(annotations(read_only_hint = true))]
    async fn port_list(&self, Parameters(a): Parameters<NameArgs>) -> CallToolResult {
        let line = Line::banger(&["vm", "forward", &a.name, "--list"]).text();
        let result = async {
            let client = self.api().await?;
            let list: ForwardList = client.get(&format!("/v1/vms/{}/forwards", segment(&a.name))).await?;
            let forwards: Vec<Value> = list
                .forwards
                .iter()
                .map(|f| json!({ "forward": f.forward.describe(&f.vm), "state": f.state.as_str(), "error": f.error }))
                .collect();
            // Only a running guest can say what listens; a stopped one lists none.
            let listening = client.get::<VmPorts>(&format!("/v1/vms/{}/ports", segment(&a.name))).await.ok();
            Ok(json!({ "sandbox": list.vm, "forwards": forwards, "listening": listening.map(|p| p.ports) }))
        }
        .await;
        reply(line, result)
    }

    /// Import a host git repository into a running sandbox at /root/<repo name>: tracked
    /// files, uncommitted changes and .git.
    #[tool]
    async fn workspace_import(&self, Parameters(a): Parameters<ImportArgs>) -> CallToolResult {
        let line = Line::banger(&["workspace", "prepare", &a.name, &a.path]).text();
        let result = async {
            let repo = crate::cmd::workspace::discover(Some(a.path.as_ref()))?;
            let report = crate::cmd::workspace::import(self.api().await?, &a.name, &repo).await?;
            serde_json::to_value(&report).map_err(|e| ToolError::Failed(e.to_string()))
        }
        .await;
        reply(line, result)
    }

    /// Bring a sandbox's work back into a host git repository: its new commits as a branch
    /// (default banger/<name>), or its uncommitted changes as a patch file. Everything the
    /// guest sends is checked first; the host's checked-out branch is never touched.
    #[tool]
    async fn workspace_export(&self, Parameters(a): Parameters<ExportArgs>) -> CallToolResult {
        let force = a.force.unwrap_or(false);
        let export = Line::banger(&["workspace", "export", &a.name])
            .opt("--branch", a.branch.as_ref())
            .opt("--patch", a.patch_file.as_ref())
            .opt("--path", a.guest_dir.as_ref())
            .flag("--force", force);
        let line = format!("cd {} && {}", super::command::quote(&a.repo), export.text());
        let result = async {
            if let Some(file) = a.patch_file.as_deref().filter(|f| !f.starts_with('/')) {
                return Err(ToolError::Invalid(format!("patch_file '{file}' is not an absolute host path")));
            }
            let repo = crate::cmd::workspace::discover(Some(a.repo.as_ref()))?;
            let args = crate::cmd::workspace::ExportArgs {
                vm: a.name.clone(),
                branch: a.branch,
                force,
                path: a.guest_dir,
                patch: a.patch_file.map(PathBuf::from),
                max_size: None,
                json: true,
            };
            let report = crate::cmd::workspace::export_from(self.api().await?, &repo, args).await?;
            serde_json::to_value(&report).map_err(|e| ToolError::Failed(e.to_string()))
        }
        .await;
        reply(line, result)
    }
}
