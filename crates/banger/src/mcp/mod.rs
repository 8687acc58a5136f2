//! `banger mcp`: a Model Context Protocol server on stdio (the official SDK, `rmcp`), for coding
//! agents. It is a client of the daemon's API like the rest of the CLI, with the caller's own
//! rights (it starts `bangerd` when nothing answers). stdout carries only MCP JSON-RPC; logs go
//! to stderr.
//!
//! Every tool answers a JSON object (structured content, also given as text) that carries
//! `command_for_user`: the banger command line with which a person sees or repeats the same
//! thing. Output over a limit is cut with a marker that gives the total size (`limits.rs`). A
//! failure is a tool error (`isError: true`) with the daemon's message, which names the fix;
//! so are arguments that do not fit a tool's schema (rmcp names the field, so the model can
//! correct itself). Protocol errors are left for malformed JSON-RPC and unknown tools.

mod command;
mod exec;
mod limits;
mod tools_egress;
mod tools_fs;
mod tools_more;
mod tools_sandbox;

use std::process::ExitCode;

use anyhow::Context as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool_handler, ServerHandler, ServiceExt as _};
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{ApiErrorAnswer, Client};

/// Why a tool failed: what the caller sees, and the daemon's error code when it answered one.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The daemon refused or failed; its message names the fix.
    #[error("{message}")]
    Daemon { code: String, message: String },
    /// The arguments make no sense together (checked before anything is asked of the daemon).
    #[error("{0}")]
    Invalid(String),
    /// Anything else (the daemon cannot be reached, a stream broke), its causes on one line.
    #[error("{0}")]
    Failed(String),
}

impl ToolError {
    fn code(&self) -> &str {
        match self {
            Self::Daemon { code, .. } => code,
            Self::Invalid(_) => "invalid_arguments",
            Self::Failed(_) => "failed",
        }
    }
}

impl From<anyhow::Error> for ToolError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast_ref::<ApiErrorAnswer>() {
            Some(answer) => Self::Daemon { code: answer.body.code.clone(), message: answer.body.message.clone() },
            None => Self::Failed(e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")),
        }
    }
}

/// A tool's outcome as MCP carries it: the value (or the error) with `command_for_user`.
fn reply(command: String, result: Result<Value, ToolError>) -> CallToolResult {
    match result {
        Ok(mut value) => {
            if let Value::Object(fields) = &mut value {
                fields.insert("command_for_user".into(), Value::String(command));
            }
            CallToolResult::structured(value)
        }
        Err(e) => {
            let value = serde_json::json!({ "error": e.to_string(), "code": e.code(), "command_for_user": command });
            let mut result = CallToolResult::structured_error(value);
            result.content = vec![ContentBlock::text(format!("{e}\n(see or retry it with: {command})"))];
            result
        }
    }
}

/// The MCP server: the daemon's client and the tools.
#[derive(Clone)]
pub struct Banger {
    client: Client,
    /// The guests' DNS domain (`vm` unless configured), read once.
    dns_domain: std::sync::Arc<OnceCell<String>>,
    /// Work that must finish even when its call is cancelled or the server stops (a
    /// `sandbox_run`'s clean-up): the server waits for it before it exits.
    tasks: TaskTracker,
    /// Cancelled when the server stops: such work ends early and cleans up.
    stopping: CancellationToken,
    tool_router: ToolRouter<Self>,
}

impl Banger {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            dns_domain: std::sync::Arc::default(),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
            tool_router: Self::sandbox_router() + Self::fs_router() + Self::more_router() + Self::egress_router(),
        }
    }

    /// The daemon's client, once a daemon answers (started when nothing does).
    async fn api(&self) -> Result<&Client, ToolError> {
        // A socket that takes connections is a daemon that answers (it binds once it is ready);
        // a connect costs far less than the health probe, which runs only when none does.
        if tokio::net::UnixStream::connect(&self.client.layout().socket).await.is_err() {
            self.client.ensure_daemon().await?;
        }
        Ok(&self.client)
    }

    /// `NAME.<dns_domain>`.
    async fn dns_name(&self, name: &str) -> String {
        let domain = self
            .dns_domain
            .get_or_try_init(|| async {
                self.client.get::<banger_proto::Config>("/v1/config").await.map(|c| c.dns_domain)
            })
            .await
            .map_or("vm", String::as_str);
        format!("{name}.{domain}")
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Banger {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("banger", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "banger runs disposable Linux microVMs (sandboxes) on this host. Create one with \
                 sandbox_create (or run a single command with sandbox_run), run commands with \
                 sandbox_exec, move files with fs_read/fs_write, and delete it with sandbox_delete. \
                 Every result has command_for_user: show it to the user so they can see or repeat \
                 the same thing with the banger CLI.",
            )
    }
}

/// How long the server waits at exit for clean-ups (a `sandbox_run`'s stop and delete).
const CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves MCP on stdin/stdout until the client closes stdin (or SIGINT/SIGTERM), then waits
/// for the clean-ups of unfinished calls.
pub async fn serve(client: Client) -> anyhow::Result<ExitCode> {
    // Logs (the SDK's too) go to stderr: stdout is the protocol's.
    let filter = tracing_subscriber::EnvFilter::try_from_env("BANGER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    // Start the daemon now if none answers, so the first tool call does not wait for it; a
    // failure is each tool's to report.
    if let Err(e) = client.ensure_daemon().await {
        tracing::warn!("bangerd is not answering yet: {e:#}");
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let banger = Banger::new(client);
    let (tasks, stopping) = (banger.tasks.clone(), banger.stopping.clone());
    let served = async {
        let service = banger
            .serve(rmcp::transport::io::stdio_pipes())
            .await
            .context("the MCP client did not initialize the session")?;
        service.waiting().await.context("the MCP service failed")
    };
    let outcome = tokio::select! {
        r = served => r.map(drop),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    };
    // Unfinished calls end now; what they made temporarily is removed before we exit.
    stopping.cancel();
    tasks.close();
    if tokio::time::timeout(CLEANUP_TIMEOUT, tasks.wait()).await.is_err() {
        tracing::warn!("clean-ups did not finish within {} s; see `banger vm list`", CLEANUP_TIMEOUT.as_secs());
    }
    outcome.map(|()| ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_errors_carry_command_for_user() {
        let ok = reply("banger vm list".into(), Ok(serde_json::json!({ "sandboxes": [] })));
        assert_eq!(ok.is_error, Some(false));
        let value = ok.structured_content.expect("structured");
        assert_eq!(value["command_for_user"], "banger vm list");
        let err = reply(
            "banger vm exec nope -- true".into(),
            Err(ToolError::Daemon { code: "not_found".into(), message: "vm 'nope' not found".into() }),
        );
        assert_eq!(err.is_error, Some(true));
        let value = err.structured_content.clone().expect("structured");
        assert_eq!(value["error"], "vm 'nope' not found");
        assert_eq!(value["code"], "not_found");
        assert_eq!(value["command_for_user"], "banger vm exec nope -- true");
        let text = serde_json::to_value(&err.content).expect("json");
        assert!(text.to_string().contains("vm 'nope' not found"), "{text}");
    }

    #[test]
    fn daemon_answers_keep_their_code_and_message() {
        let answer = ApiErrorAnswer {
            status: hyper::StatusCode::NOT_FOUND,
            body: banger_proto::ApiError { code: "not_found".into(), message: "vm 'x' not found".into() },
        };
        let e = ToolError::from(anyhow::Error::new(answer).context("ignored context"));
        assert!(matches!(&e, ToolError::Daemon { code, .. } if code == "not_found"), "{e:?}");
        let other = ToolError::from(anyhow::anyhow!("root").context("outer"));
        assert_eq!(other.to_string(), "outer: root");
    }

    /// The tools, their descriptions and input schemas, as an MCP client lists them.
    #[test]
    fn the_tool_list_is_as_reviewed() {
        let layout = banger_core::Layout::resolve(Some("/nonexistent".into()), Some("/nonexistent.sock".into()));
        let server = Banger::new(Client::new(layout));
        let mut tools = server.tool_router.list_all();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        let listed: Vec<Value> = tools
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "description": t.description,
                    "inputSchema": Value::Object(t.input_schema.as_ref().clone()),
                })
            })
            .collect();
        insta::assert_json_snapshot!("mcp_tools", listed);
    }
}
