//! Guest sessions: processes the VM's agent supervises (see `banger_proto::agent::session`),
//! recorded in the store so they can be listed, shown, stopped and attached to by name after
//! their client, or this daemon, went away.
//!
//! A start records the session as `starting`, then asks the agent to check and launch it; the
//! agent's answer makes it `running`, or `failed` with the launch stage (`cwd`, `command`,
//! `logs`, `spawn`; `agent` when the agent could not be asked). Reads (list, show) refresh
//! the status from the agent; a VM that is not running fails its open sessions with "vm is not
//! running" (lifecycle.rs also does so when it stops one). No lock is held across guest I/O:
//! the store's row is the only shared state, and the VM's own lock is not needed.
//!
//! `attach` and `logs` stream; `crate::http::attach` relays them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use banger_core::error_chain as chain;
use banger_core::session::{apply, default_name, SessionEvent};
use banger_core::time::{format_rfc3339, now_rfc3339};
use banger_core::{SessionRecord, SessionStatus, StdinMode, VmRecord};
use banger_proto::agent::session::{log_path, GuestSessionStatus, SessionOp, SessionStart, SessionState};
use banger_proto::agent::{AgentRequest, AgentResponse, TtySize};
use banger_proto::{SessionList, SessionView, StartSessionRequest};
use banger_store::StoreError;

use crate::agent_conn::{AgentConn, AgentError};
use crate::services::{Fleet, FleetError};

/// What a stopped VM's open sessions become.
pub const VM_NOT_RUNNING: &str = "vm is not running";
/// How long the agent may take to check and launch a session.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to answer a list or a signal.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A `starting` session the agent does not know yet is left alone this long (its start may
/// still be on its way).
const START_GRACE: Duration = Duration::from_secs(60);
/// The longest a stop or kill waits for the session to end.
const MAX_WAIT_SECS: u64 = 120;

/// A session start request that cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum InvalidStart {
    /// No command.
    #[error("a session needs a command; e.g. `banger session start VM -- sleep 60`")]
    NoCommand,
    /// A NUL byte somewhere.
    #[error("the command, arguments, cwd, env and tags must not contain NUL bytes")]
    Nul,
    /// A bad environment variable name.
    #[error("environment variable name '{0}' is empty or holds '='; use KEY=VALUE")]
    EnvName(String),
    /// A tag without a key.
    #[error("a tag needs a key; use KEY=VALUE")]
    TagKey,
    /// A relative working directory.
    #[error("working directory '{0}' is not an absolute path")]
    RelativeCwd(String),
    /// A bad session name.
    #[error("invalid session name")]
    Name(#[source] banger_core::NameError),
    /// A terminal size out of range.
    #[error("{0}")]
    TtySize(String),
    /// A terminal size for a session without a terminal.
    #[error("tty_size is only for a session with stdin 'tty'")]
    TtySizeWithoutTty,
}

/// Why a session could not be started, read or signalled.
#[derive(Debug, thiserror::Error)]
pub enum SessionsError {
    /// The store failed, or has no such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM is not running.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The request is invalid.
    #[error(transparent)]
    Invalid(#[from] InvalidStart),
    /// No such session in the VM.
    #[error("vm '{vm}' has no session '{reference}'; see `banger session list {vm}`")]
    NoSuchSession {
        /// The VM.
        vm: String,
        /// The session asked for.
        reference: String,
    },
    /// The name is taken in the VM.
    #[error("vm '{vm}' already has a session named '{name}'; pick another --name (see `banger session list {vm}`)")]
    NameTaken {
        /// The VM.
        vm: String,
        /// The name.
        name: String,
    },
    /// The session has not started yet.
    #[error("session '{0}' is still starting; try again in a moment")]
    StillStarting(String),
    /// The agent answered something else.
    #[error("unexpected answer from the agent: {0}")]
    UnexpectedAnswer(String),
    /// The agent could not signal it.
    #[error("cannot signal session '{session}'")]
    Signal {
        /// The session.
        session: String,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// The row went away while it was read.
    #[error("the session vanished while it was read")]
    Vanished,
}

/// A store error about a session of `vm`, with the fix.
fn session_failure(e: StoreError, vm: &VmRecord) -> SessionsError {
    match e {
        StoreError::NotFound { kind: "session", reference } => {
            SessionsError::NoSuchSession { vm: vm.name.clone(), reference }
        }
        StoreError::NameTaken { kind: "session", name } => SessionsError::NameTaken { vm: vm.name.clone(), name },
        other => other.into(),
    }
}

/// The view of `record` in `vm`.
pub fn view(vm: &VmRecord, record: SessionRecord) -> SessionView {
    SessionView {
        stdout_path: log_path(&record.id, false),
        stderr_path: log_path(&record.id, true),
        vm: vm.name.clone(),
        record: record.into(),
    }
}

/// `now - ms`, as a timestamp; `None` when the guest's `ms` (which it controls) would put it
/// before 1970, which no session can be (and which the formatter cannot print).
fn ago(now: SystemTime, ms: Option<u64>) -> Option<String> {
    let ms = ms?;
    let at = now.checked_sub(Duration::from_millis(ms)).filter(|at| *at >= SystemTime::UNIX_EPOCH);
    if at.is_none() {
        tracing::warn!(ms_ago = ms, "ignoring a session time from the guest that is before 1970");
    }
    at.map(format_rfc3339)
}

/// What an agent's report of a session means for its record.
pub fn events(state: &SessionState, now: SystemTime) -> Vec<SessionEvent> {
    let mut out = Vec::new();
    if let Some(pid) = state.pid {
        // A start time the guest garbled is known to be no later than now.
        let started_at = state.started_ms_ago.map(|ms| ago(now, Some(ms)).unwrap_or_else(|| format_rfc3339(now)));
        if let Some(started_at) = started_at {
            out.push(SessionEvent::Launched { pid, started_at });
        }
    }
    match state.status {
        GuestSessionStatus::Running => {}
        GuestSessionStatus::Exited => {
            let exit = state.exit.unwrap_or(banger_proto::agent::ExitStatus { code: 255, signal: None });
            out.push(SessionEvent::Exited {
                code: exit.code,
                signal: exit.signal,
                ended_at: ago(now, state.ended_ms_ago),
            });
        }
        GuestSessionStatus::Failed => {
            let (stage, message) = state.failure.as_ref().map_or_else(
                || ("agent".to_owned(), "the agent gave no reason".to_owned()),
                |f| (f.stage.clone(), f.message.clone()),
            );
            out.push(SessionEvent::LaunchFailed { stage, message });
        }
    }
    out
}

/// Applies `events` to `record`; whether it changed.
fn apply_all(record: &mut SessionRecord, events: Vec<SessionEvent>, now: &str) -> bool {
    events.into_iter().fold(false, |changed, e| apply(record, e, now) | changed)
}

/// Checks a start request: (name, argv, env as pairs).
fn check_start(req: &StartSessionRequest, id: &str) -> Result<String, InvalidStart> {
    if req.command.trim().is_empty() {
        return Err(InvalidStart::NoCommand);
    }
    let strings = std::iter::once(&req.command)
        .chain(&req.args)
        .chain(req.cwd.iter())
        .chain(req.env.iter().flat_map(|(k, v)| [k, v]))
        .chain(req.tags.iter().flat_map(|(k, v)| [k, v]));
    if strings.into_iter().any(|s| s.contains('\0')) {
        return Err(InvalidStart::Nul);
    }
    if let Some(bad) = req.env.keys().find(|k| k.is_empty() || k.contains('=')) {
        return Err(InvalidStart::EnvName(bad.clone()));
    }
    if req.tags.keys().any(String::is_empty) {
        return Err(InvalidStart::TagKey);
    }
    if let Some(cwd) = req.cwd.as_deref().filter(|c| !c.starts_with('/')) {
        return Err(InvalidStart::RelativeCwd(cwd.to_owned()));
    }
    if let Some(size) = req.tty_size {
        if req.stdin != banger_proto::StdinMode::Tty {
            return Err(InvalidStart::TtySizeWithoutTty);
        }
        if let Some(why) = size.check() {
            return Err(InvalidStart::TtySize(why));
        }
    }
    match &req.name {
        Some(name) => {
            banger_core::validate_name(name).map_err(InvalidStart::Name)?;
            Ok(name.clone())
        }
        None => Ok(default_name(&req.command, id)),
    }
}

/// The sessions service.
pub struct Sessions {
    fleet: Arc<Fleet>,
}

impl Sessions {
    /// The service over `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet }
    }

    /// The VM `reference` and, when it runs, its agent.
    fn vm_and_agent(&self, reference: &str) -> Result<(VmRecord, Option<Arc<AgentConn>>), SessionsError> {
        let vm = self.fleet.store.find_vm(reference)?;
        let agent = self.fleet.alive(&vm).then(|| self.fleet.agent_for(&vm));
        Ok((vm, agent))
    }

    /// Starts a session in running VM `vm_ref`.
    pub async fn start(&self, vm_ref: &str, req: StartSessionRequest) -> Result<SessionView, SessionsError> {
        let id = banger_core::new_id();
        let name = check_start(&req, &id)?;
        let (vm, agent) = self.vm_and_agent(vm_ref)?;
        let Some(agent) = agent else {
            return Err(FleetError::NotRunning { vm: vm.name }.into());
        };
        let now = now_rfc3339();
        let mut record = SessionRecord {
            id: id.clone(),
            vm_id: vm.id.clone(),
            name,
            command: req.command.clone(),
            args: req.args.clone(),
            cwd: req.cwd.clone(),
            env: req.env.clone(),
            tags: req.tags,
            stdin_mode: req.stdin.into(),
            status: SessionStatus::Starting,
            pid: None,
            exit_code: None,
            exit_signal: None,
            launch_stage: None,
            launch_message: None,
            error: None,
            created_at: now.clone(),
            started_at: None,
            ended_at: None,
            updated_at: now,
        };
        self.fleet.store.insert_session(&record).map_err(|e| session_failure(e, &vm))?;
        let start = SessionStart {
            id,
            argv: std::iter::once(req.command).chain(req.args).collect(),
            env: req.env.into_iter().collect(),
            cwd: req.cwd,
            stdin: StdinMode::from(req.stdin) == StdinMode::Pipe,
            tty: (StdinMode::from(req.stdin) == StdinMode::Tty).then(|| req.tty_size.unwrap_or(TtySize::DEFAULT)),
        };
        let answer = agent.call(&AgentRequest::Session(SessionOp::Start(start)), START_TIMEOUT).await;
        let events = match answer {
            Ok(AgentResponse::Session(state)) => events(&state, SystemTime::now()),
            Ok(other) => vec![SessionEvent::LaunchFailed {
                stage: "agent".into(),
                message: format!("unexpected answer from the agent: {other:?}"),
            }],
            Err(e) => vec![SessionEvent::LaunchFailed { stage: "agent".into(), message: chain(&e) }],
        };
        apply_all(&mut record, events, &now_rfc3339());
        self.fleet.store.update_session(&record)?;
        match &record.launch_stage {
            Some(stage) => tracing::warn!(vm = %vm.name, session = %record.name, stage, "session failed to start"),
            None => tracing::info!(vm = %vm.name, session = %record.name, pid = ?record.pid, "session started"),
        }
        Ok(view(&vm, record))
    }

    /// A VM's sessions, refreshed.
    pub async fn list(&self, vm_ref: &str) -> Result<SessionList, SessionsError> {
        let (vm, agent) = self.vm_and_agent(vm_ref)?;
        let sessions = self.fleet.store.list_sessions(&vm.id)?;
        let sessions = self.refresh(&vm, agent.as_deref(), sessions).await?;
        Ok(SessionList { vm: vm.name.clone(), sessions: sessions.into_iter().map(|s| view(&vm, s)).collect() })
    }

    /// One session, refreshed; with its VM and (when running) agent.
    pub async fn find(
        &self,
        vm_ref: &str,
        session_ref: &str,
    ) -> Result<(VmRecord, Option<Arc<AgentConn>>, SessionRecord), SessionsError> {
        let (vm, agent) = self.vm_and_agent(vm_ref)?;
        let session = self.fleet.store.find_session(&vm.id, session_ref).map_err(|e| session_failure(e, &vm))?;
        let session = self.refresh(&vm, agent.as_deref(), vec![session]).await?.pop();
        let session = session.ok_or(SessionsError::Vanished)?;
        Ok((vm, agent, session))
    }

    /// One session, refreshed.
    pub async fn show(&self, vm_ref: &str, session_ref: &str) -> Result<SessionView, SessionsError> {
        let (vm, _, session) = self.find(vm_ref, session_ref).await?;
        Ok(view(&vm, session))
    }

    /// Signals a session's process group, then waits up to `wait_secs` for it to end.
    pub async fn signal(
        &self,
        vm_ref: &str,
        session_ref: &str,
        signal: i32,
        wait_secs: u64,
    ) -> Result<SessionView, SessionsError> {
        let (vm, agent, mut session) = self.find(vm_ref, session_ref).await?;
        let Some(agent) = agent.filter(|_| !session.status.is_terminal()) else {
            return Ok(view(&vm, session));
        };
        if session.status == SessionStatus::Starting {
            return Err(SessionsError::StillStarting(session.name));
        }
        let request = AgentRequest::Session(SessionOp::Signal { id: session.id.clone(), signal });
        let mut events = vec![SessionEvent::StopRequested];
        match agent.call(&request, CALL_TIMEOUT).await {
            Ok(AgentResponse::Session(state)) => events.extend(self::events(&state, SystemTime::now())),
            Ok(other) => return Err(SessionsError::UnexpectedAnswer(format!("{other:?}"))),
            Err(AgentError::Failed(message)) if message.starts_with("no session") => {
                events = vec![SessionEvent::Lost { reason: message }];
            }
            Err(source) => return Err(SessionsError::Signal { session: session.name, source }),
        }
        // Re-read: a refresh may have recorded its end meanwhile.
        session = self.fleet.store.find_session(&vm.id, &session.id).map_err(|e| session_failure(e, &vm))?;
        if apply_all(&mut session, events, &now_rfc3339()) {
            self.fleet.store.update_session(&session)?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs.min(MAX_WAIT_SECS));
        while !session.status.is_terminal() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (_, _, again) = self.find(&vm.id, &session.id).await?;
            session = again;
        }
        tracing::info!(vm = %vm.name, session = %session.name, signal, status = session.status.as_str(), "session signalled");
        Ok(view(&vm, session))
    }

    /// Brings `sessions` of `vm` up to date: failed when the VM is not running, else as the
    /// agent reports them. When the agent cannot be asked, they are answered as recorded.
    async fn refresh(
        &self,
        vm: &VmRecord,
        agent: Option<&AgentConn>,
        mut sessions: Vec<SessionRecord>,
    ) -> Result<Vec<SessionRecord>, SessionsError> {
        if sessions.iter().all(|s| s.status.is_terminal()) {
            return Ok(sessions);
        }
        let Some(agent) = agent else {
            self.fail_open(&vm.id);
            for s in &mut sessions {
                if let Ok(fresh) = self.fleet.store.find_session(&vm.id, &s.id) {
                    *s = fresh;
                }
            }
            return Ok(sessions);
        };
        let states = match agent.call(&AgentRequest::Session(SessionOp::List), CALL_TIMEOUT).await {
            Ok(AgentResponse::Sessions { sessions }) => sessions,
            Ok(other) => {
                tracing::warn!(vm = %vm.name, answer = ?other, "unexpected answer to a session list");
                return Ok(sessions);
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot refresh sessions from the agent");
                return Ok(sessions);
            }
        };
        let now = SystemTime::now();
        let stamp = format_rfc3339(now);
        for s in sessions.iter_mut().filter(|s| !s.status.is_terminal()) {
            let events = match states.iter().find(|state| state.id == s.id) {
                Some(state) => events(state, now),
                None if s.status == SessionStatus::Starting && banger_core::time::age(&s.created_at) < START_GRACE => {
                    continue
                }
                None => vec![SessionEvent::Lost {
                    reason: "the guest agent does not know this session (did the guest restart?)".into(),
                }],
            };
            if apply_all(s, events, &stamp) {
                self.fleet.store.update_session(s)?;
            }
        }
        Ok(sessions)
    }

    /// Fails VM `vm_id`'s open sessions: it is not running (any more).
    pub fn fail_open(&self, vm_id: &str) {
        match self.fleet.store.fail_active_sessions(vm_id, VM_NOT_RUNNING, &now_rfc3339()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(vm_id, sessions = n, "sessions failed: {VM_NOT_RUNNING}"),
            Err(e) => tracing::error!(vm_id, error = %chain(&e), "cannot mark the vm's sessions failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::agent::session::LaunchFailure;
    use banger_proto::agent::ExitStatus;

    fn state(status: GuestSessionStatus) -> SessionState {
        SessionState {
            id: "s".into(),
            status,
            pid: Some(42),
            exit: None,
            failure: None,
            started_ms_ago: Some(5000),
            ended_ms_ago: None,
            stdin_attached: false,
        }
    }

    #[test]
    fn agent_reports_become_events_with_host_times() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let running = events(&state(GuestSessionStatus::Running), now);
        assert_eq!(running, [SessionEvent::Launched { pid: 42, started_at: "1970-01-12T13:46:35.000Z".into() }]);
        let mut exited = state(GuestSessionStatus::Exited);
        exited.exit = Some(ExitStatus { code: 143, signal: Some(15) });
        exited.ended_ms_ago = Some(1000);
        let evs = events(&exited, now);
        assert_eq!(
            evs[1],
            SessionEvent::Exited { code: 143, signal: Some(15), ended_at: Some("1970-01-12T13:46:39.000Z".into()) }
        );
        let failed = SessionState::failed("s", "cwd", "working directory /x does not exist");
        assert_eq!(
            events(&failed, now),
            [SessionEvent::LaunchFailed { stage: "cwd".into(), message: "working directory /x does not exist".into() }]
        );
        let mut odd = state(GuestSessionStatus::Failed);
        odd.pid = None;
        odd.failure = None::<LaunchFailure>;
        assert!(matches!(&events(&odd, now)[..], [SessionEvent::LaunchFailed { stage, .. }] if stage == "agent"));
    }

    #[test]
    fn guest_times_before_1970_do_not_panic_and_are_not_believed() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut liar = state(GuestSessionStatus::Exited);
        liar.exit = Some(ExitStatus { code: 0, signal: None });
        for ms in [u64::MAX, 1_000_000_001, 1_000_000_000_000] {
            liar.started_ms_ago = Some(ms);
            liar.ended_ms_ago = Some(ms);
            let evs = events(&liar, now);
            assert_eq!(
                evs,
                [
                    SessionEvent::Launched { pid: 42, started_at: format_rfc3339(now) },
                    SessionEvent::Exited { code: 0, signal: None, ended_at: None },
                ],
                "{ms} ms ago"
            );
        }
        // Exactly the epoch is still a time.
        liar.ended_ms_ago = Some(1_000_000_000);
        assert!(
            matches!(&events(&liar, now)[1], SessionEvent::Exited { ended_at: Some(at), .. } if at == "1970-01-01T00:00:00.000Z")
        );
    }

    #[test]
    fn start_requests_are_checked() {
        let ok = StartSessionRequest { command: "/usr/bin/python3.11".into(), ..Default::default() };
        assert_eq!(check_start(&ok, "abcdef0123456789").expect("ok"), "python3-11-abcdef");
        let named = StartSessionRequest { name: Some("web".into()), command: "sleep".into(), ..Default::default() };
        assert_eq!(check_start(&named, "abcdef0123456789").expect("ok"), "web");
        let cases: Vec<(StartSessionRequest, &str)> = vec![
            (StartSessionRequest { command: " ".into(), ..Default::default() }, "needs a command"),
            (
                StartSessionRequest { name: Some("Web!".into()), command: "x".into(), ..Default::default() },
                "invalid session name",
            ),
            (
                StartSessionRequest { command: "x".into(), cwd: Some("srv".into()), ..Default::default() },
                "not an absolute path",
            ),
            (
                StartSessionRequest {
                    command: "x".into(),
                    env: [("A=B".to_owned(), "1".to_owned())].into(),
                    ..Default::default()
                },
                "holds '='",
            ),
            (StartSessionRequest { command: "x\0y".into(), ..Default::default() }, "NUL"),
            (
                StartSessionRequest {
                    command: "x".into(),
                    stdin: banger_proto::StdinMode::Tty,
                    tty_size: Some(TtySize { rows: 0, cols: 80 }),
                    ..Default::default()
                },
                "out of range",
            ),
            (
                StartSessionRequest { command: "x".into(), tty_size: Some(TtySize::DEFAULT), ..Default::default() },
                "only for a session with stdin 'tty'",
            ),
            (
                StartSessionRequest {
                    command: "x".into(),
                    tags: [(String::new(), "1".to_owned())].into(),
                    ..Default::default()
                },
                "tag needs a key",
            ),
        ];
        for (req, expected) in cases {
            let err = check_start(&req, "abcdef0123456789").expect_err("refused");
            assert!(banger_core::error_chain(&err).contains(expected), "{expected}: {err}");
        }
    }
}
