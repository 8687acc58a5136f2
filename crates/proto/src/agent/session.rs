//! Guest sessions on the agent channel: processes the agent supervises apart from any host
//! connection, so they outlive the client that started them and the daemon itself. Their
//! stdout and stderr go to log files under [`SESSION_DIR`]`/<id>/`; the agent keeps their state
//! (running, exit status) for as long as it runs.
//!
//! Every session request is an `AgentRequest::Session` carrying a [`SessionOp`]:
//!
//! | op | host → guest after it | guest → host |
//! |---|---|---|
//! | `start` | – | `Response(session)`: `running`, or `failed` with the launch stage |
//! | `list` | – | `Response(sessions)` |
//! | `signal` | – | `Response(session)` (after the signal went to its process group) |
//! | `attach` | `Stdin` (empty = close the session's stdin), `Signal`, `Resize` (a `tty` session's stdin holder), `Close` = detach | `Response(session)`, the logs' tails ([`REPLAY_BYTES`] of stdout, then of stderr), live `Stdout`/`Stderr`, then `Exit` when the session ends, `Close` once detached, or `Error` |
//! | `logs` | `Close` = stop following | `Data` chunks of one log file, then `Response(session)` (`Response(ok)` for a session of an earlier boot, whose logs are still on disk) |
//!
//! An attach that asks for stdin of a `pipe` or `tty` session is exclusive: while it lasts, a second
//! such attach ends with `Error`. Attaches without stdin only watch. A host connection that
//! goes away detaches its attaches; it never ends a session.

use serde::{Deserialize, Serialize};

use super::ExitStatus;

/// Where the agent keeps each session's logs: `SESSION_DIR/<id>/stdout` and `.../stderr`.
pub const SESSION_DIR: &str = "/var/lib/banger/sessions";

/// How much of each log an attach replays before the live output.
pub const REPLAY_BYTES: u64 = 64 * 1024;

/// The launch stages a start can fail at.
pub mod stage {
    /// The session id or request was refused.
    pub const REQUEST: &str = "request";
    /// The working directory does not exist.
    pub const CWD: &str = "cwd";
    /// The command was not found or is not executable.
    pub const COMMAND: &str = "command";
    /// The log directory or files could not be made.
    pub const LOGS: &str = "logs";
    /// fork/exec failed.
    pub const SPAWN: &str = "spawn";
}

/// The path of a session's stdout (or stderr) log in the guest.
pub fn log_path(id: &str, stderr: bool) -> String {
    format!("{SESSION_DIR}/{id}/{}", if stderr { "stderr" } else { "stdout" })
}

/// Whether `id` may name a session (it becomes a directory name): 1-64 of `a-z`, `0-9`, `-`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A session request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum SessionOp {
    /// Check and start a process.
    Start(SessionStart),
    /// Every session the agent knows.
    List,
    /// Send a signal to a session's process group.
    Signal {
        /// The session.
        id: String,
        /// Signal number.
        signal: i32,
    },
    /// Watch a session's output (and feed its stdin).
    Attach {
        /// The session.
        id: String,
        /// Take the session's stdin (exclusive; only for `pipe` and `tty` sessions).
        stdin: bool,
    },
    /// Send one of a session's logs.
    Logs {
        /// The session.
        id: String,
        /// stderr instead of stdout.
        #[serde(default)]
        stderr: bool,
        /// Keep sending what is appended until the session ends.
        #[serde(default)]
        follow: bool,
    },
}

/// What to start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStart {
    /// The session's id (chosen by the host; see [`valid_id`]).
    pub id: String,
    /// Program and arguments; the program is looked up on `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; `/root` when absent. It must exist.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Give the process a stdin pipe that attaches can write to; otherwise /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size instead: its output is the `stdout` log (the
    /// `stderr` log stays empty), the stdin attach types into it and may `Resize` it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<super::TtySize>,
}

/// Where a session is, as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestSessionStatus {
    /// Its process runs.
    Running,
    /// Its process ended (see `exit`).
    Exited,
    /// It never started (see `failure`).
    Failed,
}

/// Why a start failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchFailure {
    /// One of [`stage`].
    pub stage: String,
    /// One line for humans.
    pub message: String,
}

/// A session's state. Times are ages (milliseconds before this answer), so the guest's clock
/// never matters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// The session.
    pub id: String,
    /// Where it is.
    pub status: GuestSessionStatus,
    /// Its process (and process group) id, once started.
    #[serde(default)]
    pub pid: Option<u32>,
    /// How it ended.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// Why it never started.
    #[serde(default)]
    pub failure: Option<LaunchFailure>,
    /// Milliseconds since it started.
    #[serde(default)]
    pub started_ms_ago: Option<u64>,
    /// Milliseconds since it ended.
    #[serde(default)]
    pub ended_ms_ago: Option<u64>,
    /// Whether an attach holds its stdin now.
    #[serde(default)]
    pub stdin_attached: bool,
}

impl SessionState {
    /// A session that failed to start at `stage`.
    pub fn failed(id: &str, stage: &str, message: impl Into<String>) -> Self {
        Self {
            id: id.to_owned(),
            status: GuestSessionStatus::Failed,
            pid: None,
            exit: None,
            failure: Some(LaunchFailure { stage: stage.to_owned(), message: message.into() }),
            started_ms_ago: None,
            ended_ms_ago: None,
            stdin_attached: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentRequest, AgentResponse};

    #[test]
    fn session_requests_nest_in_agent_requests() {
        let start = AgentRequest::Session(SessionOp::Start(SessionStart {
            id: "abc".into(),
            argv: vec!["sleep".into(), "9".into()],
            ..Default::default()
        }));
        let json = serde_json::to_string(&start).expect("json");
        assert!(json.starts_with(r#"{"op":"session","action":"start","id":"abc""#), "{json}");
        assert_eq!(serde_json::from_str::<AgentRequest>(&json).expect("parse"), start);
        let list = serde_json::to_string(&AgentRequest::Session(SessionOp::List)).expect("json");
        assert_eq!(list, r#"{"op":"session","action":"list"}"#);
        let logs: AgentRequest = serde_json::from_str(r#"{"op":"session","action":"logs","id":"x"}"#).expect("parse");
        assert_eq!(logs, AgentRequest::Session(SessionOp::Logs { id: "x".into(), stderr: false, follow: false }));
        let answer = AgentResponse::Session(SessionState::failed("abc", stage::CWD, "no such dir"));
        let json = serde_json::to_string(&answer).expect("json");
        assert!(json.starts_with(r#"{"type":"session","id":"abc","status":"failed""#), "{json}");
        assert_eq!(serde_json::from_str::<AgentResponse>(&json).expect("parse"), answer);
    }

    #[test]
    fn ids_are_safe_directory_names() {
        assert!(valid_id("0123abcd-ef"));
        for bad in ["", "../x", "A", "a/b", ".", &"a".repeat(65)] {
            assert!(!valid_id(bad), "{bad}");
        }
        assert_eq!(log_path("abc", true), "/var/lib/banger/sessions/abc/stderr");
    }
}
