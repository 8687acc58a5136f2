//! Guest sessions: a process in a VM that the guest agent supervises, recorded here so it can be
//! listed, inspected and stopped by name after its client (and even the daemon) went away. The
//! record's status follows a pure state machine, [`apply`]; what is observed in the guest comes
//! in as [`SessionEvent`]s. No I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Exited => "exited",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Starting, Self::Running, Self::Stopping, Self::Exited, Self::Failed]
            .into_iter()
            .find(|v| v.as_str() == s)
    }

    /// Whether nothing can change it any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Exited | Self::Failed)
    }
}

/// What a session's stdin is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdinMode {
    /// /dev/null.
    #[default]
    Closed,
    /// A pipe that one attached client at a time writes to; it stays open across detaches.
    Pipe,
    /// A pseudo-terminal: stdin, stdout and stderr in one; one attached client at a time types
    /// into it and sets its size.
    Tty,
}

impl StdinMode {
    /// The name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Pipe => "pipe",
            Self::Tty => "tty",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "closed" => Some(Self::Closed),
            "pipe" => Some(Self::Pipe),
            "tty" => Some(Self::Tty),
            _ => None,
        }
    }
}

/// A session as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Something observed about a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The guest runs its process.
    Launched {
        /// Guest pid.
        pid: u32,
        /// When it started.
        started_at: String,
    },
    /// The guest could not start it.
    LaunchFailed {
        /// The stage.
        stage: String,
        /// Why.
        message: String,
    },
    /// A stop or kill signal was delivered.
    StopRequested,
    /// Its process ended.
    Exited {
        /// Exit code (128 + signal when a signal ended it).
        code: i32,
        /// The signal, if one ended it.
        signal: Option<i32>,
        /// When, if known.
        ended_at: Option<String>,
    },
    /// It can no longer be running: its VM stopped, or the guest does not know it.
    Lost {
        /// Why, e.g. "vm is not running".
        reason: String,
    },
}

/// Applies `event` to `record` at time `now`; returns whether anything changed. A terminal
/// session never changes again; a `Starting` one cannot be asked to stop (it has no process).
pub fn apply(record: &mut SessionRecord, event: SessionEvent, now: &str) -> bool {
    if record.status.is_terminal() {
        return false;
    }
    let before = record.clone();
    match event {
        SessionEvent::Launched { pid, started_at } => {
            if record.status == SessionStatus::Starting {
                record.status = SessionStatus::Running;
            }
            record.pid = Some(pid);
            if record.started_at.is_none() {
                record.started_at = Some(started_at);
            }
        }
        SessionEvent::LaunchFailed { stage, message } => {
            record.status = SessionStatus::Failed;
            record.launch_stage = Some(stage);
            record.launch_message = Some(message);
            record.ended_at = Some(now.to_owned());
        }
        SessionEvent::StopRequested => {
            if record.status == SessionStatus::Running {
                record.status = SessionStatus::Stopping;
            }
        }
        SessionEvent::Exited { code, signal, ended_at } => {
            record.status = SessionStatus::Exited;
            record.exit_code = Some(code);
            record.exit_signal = signal;
            record.ended_at = Some(ended_at.unwrap_or_else(|| now.to_owned()));
        }
        SessionEvent::Lost { reason } => {
            record.status = SessionStatus::Failed;
            record.error = Some(reason);
            record.ended_at = Some(now.to_owned());
        }
    }
    let changed = *record != before;
    if changed {
        record.updated_at = now.to_owned();
    }
    changed
}

/// A default session name from its command and id: the program's base name made a valid name,
/// then the id's first 6 digits, e.g. `python3-11-3fa2c1` for `/usr/bin/python3.11`.
pub fn default_name(command: &str, id: &str) -> String {
    let base = command.rsplit('/').next().unwrap_or(command).to_ascii_lowercase();
    let mut stem: String =
        base.chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' }).collect();
    stem.truncate(40);
    let stem = stem.trim_matches('-');
    let stem = if stem.is_empty() { "session" } else { stem };
    format!("{stem}-{}", &id[..id.len().min(6)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SessionRecord {
        SessionRecord {
            id: "0123456789abcdef".into(),
            vm_id: "fedcba9876543210".into(),
            name: "web".into(),
            command: "sleep".into(),
            args: vec!["60".into()],
            cwd: None,
            env: BTreeMap::new(),
            tags: BTreeMap::new(),
            stdin_mode: StdinMode::Closed,
            status: SessionStatus::Starting,
            pid: None,
            exit_code: None,
            exit_signal: None,
            launch_stage: None,
            launch_message: None,
            error: None,
            created_at: "t0".into(),
            started_at: None,
            ended_at: None,
            updated_at: "t0".into(),
        }
    }

    #[test]
    fn a_session_runs_is_stopped_and_exits() {
        let mut r = record();
        assert!(!apply(&mut r, SessionEvent::StopRequested, "t1"), "nothing to stop while starting");
        assert!(apply(&mut r, SessionEvent::Launched { pid: 42, started_at: "t1".into() }, "t1"));
        assert_eq!((r.status, r.pid, r.started_at.as_deref()), (SessionStatus::Running, Some(42), Some("t1")));
        assert!(!apply(&mut r, SessionEvent::Launched { pid: 42, started_at: "t9".into() }, "t2"), "no change");
        assert_eq!(r.started_at.as_deref(), Some("t1"), "the first start time stays");
        assert!(apply(&mut r, SessionEvent::StopRequested, "t3"));
        assert_eq!(r.status, SessionStatus::Stopping);
        assert!(!apply(&mut r, SessionEvent::Launched { pid: 42, started_at: "t1".into() }, "t4"), "still stopping");
        assert_eq!(r.status, SessionStatus::Stopping);
        let exit = SessionEvent::Exited { code: 143, signal: Some(15), ended_at: Some("t5".into()) };
        assert!(apply(&mut r, exit, "t6"));
        assert_eq!((r.status, r.exit_code, r.exit_signal), (SessionStatus::Exited, Some(143), Some(15)));
        assert_eq!((r.ended_at.as_deref(), r.updated_at.as_str()), (Some("t5"), "t6"));
        // Terminal: nothing moves it.
        assert!(!apply(&mut r, SessionEvent::Lost { reason: "vm is not running".into() }, "t7"));
        assert_eq!(r.error, None);
    }

    #[test]
    fn launch_failures_and_losses_are_failed_with_their_reason() {
        let mut r = record();
        let failed = SessionEvent::LaunchFailed { stage: "cwd".into(), message: "/nope does not exist".into() };
        assert!(apply(&mut r, failed, "t1"));
        assert_eq!(r.status, SessionStatus::Failed);
        assert_eq!((r.launch_stage.as_deref(), r.ended_at.as_deref()), (Some("cwd"), Some("t1")));
        let mut r = record();
        apply(&mut r, SessionEvent::Launched { pid: 7, started_at: "t1".into() }, "t1");
        assert!(apply(&mut r, SessionEvent::Lost { reason: "vm is not running".into() }, "t2"));
        assert_eq!((r.status, r.error.as_deref()), (SessionStatus::Failed, Some("vm is not running")));
        assert_eq!(r.launch_stage, None);
    }

    #[test]
    fn names_and_parsing() {
        assert_eq!(default_name("/usr/bin/python3.11", "3fa2c1d4e5f60718"), "python3-11-3fa2c1");
        assert_eq!(default_name("./_", "abcdef0123456789"), "session-abcdef");
        assert!(crate::validate_name(&default_name(&"X".repeat(100), "abcdef0123456789")).is_ok());
        for s in [SessionStatus::Starting, SessionStatus::Running, SessionStatus::Stopping, SessionStatus::Exited] {
            assert_eq!(SessionStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(SessionStatus::parse("failed"), Some(SessionStatus::Failed));
        assert_eq!(StdinMode::parse("pipe"), Some(StdinMode::Pipe));
        assert_eq!(StdinMode::parse(StdinMode::Tty.as_str()), Some(StdinMode::Tty));
        assert_eq!(StdinMode::parse("open"), None);
    }
}
