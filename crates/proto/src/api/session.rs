//! A guest session's record on the wire, with the conversions between it and the model
//! (`banger_core::session`). The session requests and views are in `session_api`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Recorded; the guest has not confirmed the launch yet.
    Starting,
    /// Its process runs in the guest.
    Running,
    /// A stop or kill signal was sent; it has not ended yet.
    Stopping,
    /// Its process ended; see `exit_code` and `exit_signal`.
    Exited,
    /// It never started (see `launch_stage`, `launch_message`) or was lost (see `error`).
    Failed,
}

impl SessionStatus {
    /// The name as sent and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Exited => "exited",
            Self::Failed => "failed",
        }
    }

    /// Whether nothing can change it any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Exited | Self::Failed)
    }
}

/// What a session's stdin is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StdinMode {
    /// /dev/null.
    #[default]
    Closed,
    /// A pipe that one attached client at a time writes to; it stays open across detaches.
    Pipe,
    /// A pseudo-terminal: stdin, stdout and stderr in one (the `stdout` log); one attached
    /// client at a time types into it and sets its size.
    Tty,
}

impl StdinMode {
    /// The name as sent and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Pipe => "pipe",
            Self::Tty => "tty",
        }
    }
}

/// A session as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionRecord {
    /// 16 hex digits.
    pub id: String,
    /// The VM it runs in.
    pub vm_id: String,
    /// Unique within its VM.
    pub name: String,
    /// The program.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Working directory in the guest (`/root` when none).
    pub cwd: Option<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Free-form labels.
    pub tags: BTreeMap<String, String>,
    /// What its stdin is.
    pub stdin_mode: StdinMode,
    /// Where it is.
    pub status: SessionStatus,
    /// Its guest process id, once started.
    pub pid: Option<u32>,
    /// Exit code once exited; 128 + N when signal N ended it (143 for SIGTERM, 137 for SIGKILL).
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub exit_signal: Option<i32>,
    /// The launch stage that failed: `cwd`, `command`, `logs`, `spawn`, `request` or `agent`.
    pub launch_stage: Option<String>,
    /// Why that stage failed.
    pub launch_message: Option<String>,
    /// Why a started session was lost, e.g. "vm is not running".
    pub error: Option<String>,
    /// When it was recorded (RFC 3339).
    pub created_at: String,
    /// When its process started.
    pub started_at: Option<String>,
    /// When it ended or failed.
    pub ended_at: Option<String>,
    /// When this record last changed.
    pub updated_at: String,
}

impl From<banger_core::SessionStatus> for SessionStatus {
    fn from(s: banger_core::SessionStatus) -> Self {
        use banger_core::SessionStatus as M;
        match s {
            M::Starting => Self::Starting,
            M::Running => Self::Running,
            M::Stopping => Self::Stopping,
            M::Exited => Self::Exited,
            M::Failed => Self::Failed,
        }
    }
}

impl From<banger_core::StdinMode> for StdinMode {
    fn from(m: banger_core::StdinMode) -> Self {
        match m {
            banger_core::StdinMode::Closed => Self::Closed,
            banger_core::StdinMode::Pipe => Self::Pipe,
            banger_core::StdinMode::Tty => Self::Tty,
        }
    }
}

impl From<StdinMode> for banger_core::StdinMode {
    fn from(m: StdinMode) -> Self {
        match m {
            StdinMode::Closed => Self::Closed,
            StdinMode::Pipe => Self::Pipe,
            StdinMode::Tty => Self::Tty,
        }
    }
}

impl From<banger_core::SessionRecord> for SessionRecord {
    fn from(r: banger_core::SessionRecord) -> Self {
        let banger_core::SessionRecord {
            id,
            vm_id,
            name,
            command,
            args,
            cwd,
            env,
            tags,
            stdin_mode,
            status,
            pid,
            exit_code,
            exit_signal,
            launch_stage,
            launch_message,
            error,
            created_at,
            started_at,
            ended_at,
            updated_at,
        } = r;
        Self {
            id,
            vm_id,
            name,
            command,
            args,
            cwd,
            env,
            tags,
            stdin_mode: stdin_mode.into(),
            status: status.into(),
            pid,
            exit_code,
            exit_signal,
            launch_stage,
            launch_message,
            error,
            created_at,
            started_at,
            ended_at,
            updated_at,
        }
    }
}
