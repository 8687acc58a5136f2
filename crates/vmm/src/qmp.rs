//! A small async client for QEMU's machine protocol (QMP) over a unix socket.
//!
//! Protocol: one JSON object per line in each direction. On connect the server sends a greeting
//! `{"QMP": {"version": ..., "capabilities": [...]}}` and accepts only `qmp_capabilities` until
//! that command succeeds. A command is `{"execute": NAME, "arguments": {...}, "id": ID}`; its
//! answer is `{"return": VALUE, "id": ID}` or `{"error": {"class": C, "desc": D}, "id": ID}`.
//! Asynchronous events `{"event": NAME, "data": {...}, "timestamp": {...}}` may arrive at any time,
//! also between a command and its answer; they are kept (the last [`MAX_EVENTS`]) for
//! [`QmpClient::take_events`]. QEMU serves one client per QMP socket at a time.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How many unread events a client keeps.
pub const MAX_EVENTS: usize = 64;

/// What went wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket did not accept a connection.
    #[error("cannot connect to the qmp socket {}; is the vm running?", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("qmp connection failed")]
    Io(#[source] io::Error),
    /// The VMM closed the connection.
    #[error("the vmm closed the qmp connection; it may have exited")]
    Closed,
    /// No answer in time.
    #[error("qmp gave no answer within {timeout:?}; the vmm may be hung, kill it")]
    Timeout {
        /// How long we waited.
        timeout: Duration,
    },
    /// The server said something that is not QMP.
    #[error("unexpected qmp message ({reason}): {message}")]
    Protocol {
        /// What was wrong.
        reason: &'static str,
        /// The offending message (truncated).
        message: String,
    },
    /// The command failed.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (e.g. `GenericError`, `CommandNotFound`).
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// The answer to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    /// Whether vCPUs are running.
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `shutdown`, `prelaunch`, ...).
    pub status: String,
}

/// Where a migration is (`query-migrate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// None was started.
    None,
    /// Under way (`setup`, `active`, `device`, ...).
    Active(String),
    /// Finished.
    Completed,
    /// Failed or cancelled, with QEMU's reason.
    Failed(String),
}

/// Migration bandwidth for state saves, bytes/s (QEMU 7.2 defaults to 128 MiB/s).
pub const MAX_BANDWIDTH: u64 = 64 << 30;

/// `path` single-quoted for `/bin/sh` (QEMU runs `exec:` URIs through it). Paths with a quote
/// or a newline are refused rather than escaped.
pub fn shell_quote(path: &Path) -> Result<String, crate::ControlError> {
    let text = path.to_str().filter(|t| !t.contains(['\'', '\n'])).ok_or_else(|| crate::ControlError::SaveFailed {
        path: path.to_owned(),
        reason: "the path contains a quote or a newline, or is not UTF-8".into(),
    })?;
    Ok(format!("'{text}'"))
}

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    greeting: Value,
    events: VecDeque<Value>,
    next_id: u64,
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates capabilities.
    /// `timeout` bounds the connect, the handshake, and later every command's answer.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout { timeout })?
            .map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        let (read, writer) = stream.into_split();
        let mut client = Self {
            reader: BufReader::new(read),
            writer,
            timeout,
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 0,
        };
        let greeting = client.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(protocol("no greeting", &greeting));
        }
        client.greeting = greeting;
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The server's greeting (`{"QMP": {"version": ..., "capabilities": [...]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with optional `arguments` and returns its `return` value. Events that
    /// arrive meanwhile are kept for [`Self::take_events`].
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await.map_err(QmpError::Io)?;
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(message);
                continue;
            }
            // An answer to an earlier command whose wait timed out: not ours.
            if message.get("id").is_some_and(|answer_id| answer_id != &json!(id)) {
                continue;
            }
            // QEMU 7.2 can greet twice when a client connects while it is still starting up
            // (seen once in the guest tests); a greeting is never an answer.
            if message.get("QMP").is_some() {
                tracing::debug!("ignoring a repeated qmp greeting");
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |name| error.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(protocol("neither return, error nor event", &message));
        }
    }

    /// Events received so far and not yet taken, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// `query-status`: whether the guest runs.
    pub async fn query_status(&mut self) -> Result<RunStatus, QmpError> {
        let value = self.execute("query-status", None).await?;
        serde_json::from_value(value.clone()).map_err(|_| protocol("bad query-status answer", &value))
    }

    /// `system_powerdown`: presses the (ACPI) power button. Guests without ACPI ignore it.
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `stop`: pauses the vCPUs.
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resumes the vCPUs.
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `query-migrate`: where the current (outgoing or incoming) migration is.
    pub async fn query_migrate(&mut self) -> Result<MigrationState, QmpError> {
        let value = self.execute("query-migrate", None).await?;
        let status = value.get("status").and_then(Value::as_str).unwrap_or("none");
        Ok(match status {
            "none" => MigrationState::None,
            "completed" => MigrationState::Completed,
            "failed" | "cancelled" => {
                MigrationState::Failed(value.get("error-desc").and_then(Value::as_str).unwrap_or(status).to_owned())
            }
            other => MigrationState::Active(other.to_owned()),
        })
    }

    /// Writes the paused guest's memory and device state to `state_file` through QEMU's
    /// migration to `exec:cat > FILE` (QEMU 7.2 has no `file:` URI), at full speed, and waits
    /// (polling `query-migrate` every `poll`) until it completed, failed, or `timeout` passed.
    /// A running guest is refused: its disks could not be copied consistently with the state.
    /// The guest stays paused (QEMU's run state becomes `postmigrate`; `cont` resumes it).
    pub async fn save_state(
        &mut self,
        state_file: &Path,
        poll: Duration,
        timeout: Duration,
    ) -> Result<(), crate::ControlError> {
        let status = self.query_status().await?;
        if status.running {
            return Err(crate::ControlError::BadRunState { status: status.status, need: "pause it first" });
        }
        if status.status == "postmigrate" {
            // QEMU 7.2 refuses to migrate "a vm that was paused due to previous migration" (a
            // paused guest snapshotted before): run it for a moment to leave that state.
            self.cont().await?;
            self.stop().await?;
        }
        let uri = format!("exec:cat > {}", shell_quote(state_file)?);
        self.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": MAX_BANDWIDTH }))).await?;
        self.execute("migrate", Some(json!({ "uri": uri }))).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.query_migrate().await? {
                MigrationState::Completed => return Ok(()),
                MigrationState::Failed(reason) => {
                    return Err(crate::ControlError::SaveFailed { path: state_file.to_owned(), reason })
                }
                MigrationState::None | MigrationState::Active(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.execute("migrate_cancel", None).await;
                return Err(crate::ControlError::SaveTimeout { path: state_file.to_owned(), timeout });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Waits (polling `query-status` every `poll`) until an incoming migration has loaded:
    /// QEMU leaves `inmigrate` for `paused` (with `-S`) or `running`. Returns the new run state.
    pub async fn wait_incoming(&mut self, poll: Duration, timeout: Duration) -> Result<RunStatus, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.query_status().await?;
            if status.status != "inmigrate" {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout { timeout });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// `quit`: ends QEMU at once (the guest is not asked). A connection closed before the answer
    /// arrives counts as success: QEMU may exit before flushing it.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(error)) if error.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Reads one non-empty line as JSON, within the timeout.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let timeout = self.timeout;
        let mut line = String::new();
        loop {
            line.clear();
            let read = tokio::time::timeout(timeout, self.reader.read_line(&mut line))
                .await
                .map_err(|_| QmpError::Timeout { timeout })?
                .map_err(QmpError::Io)?;
            if read == 0 {
                return Err(QmpError::Closed);
            }
            if !line.trim().is_empty() {
                break;
            }
        }
        let value: Value = serde_json::from_str(line.trim())
            .map_err(|_| QmpError::Protocol { reason: "not json", message: truncated(line.trim()) })?;
        if !value.is_object() {
            return Err(protocol("not an object", &value));
        }
        Ok(value)
    }
}

fn protocol(reason: &'static str, message: &Value) -> QmpError {
    QmpError::Protocol { reason, message: truncated(&message.to_string()) }
}

fn truncated(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A scripted server: for each expected request (matched on `execute`), sends the given
    /// lines, with `$ID` replaced by the request's id. Closes after the script.
    async fn fake_server(listener: UnixListener, script: Vec<(&'static str, Vec<String>)>) -> Vec<Value> {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(format!("{GREETING}\n").as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        for (expected, answers) in script {
            let request: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(request["execute"], expected);
            for answer in answers {
                let answer = answer.replace("$ID", &request["id"].to_string());
                write.write_all(format!("{answer}\n").as_bytes()).await.unwrap();
            }
            seen.push(request);
        }
        seen
    }

    fn ok() -> Vec<String> {
        vec![r#"{"return": {}, "id": $ID}"#.into()]
    }

    const EVENT: &str = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;

    #[tokio::test]
    async fn handshake_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(
            listener,
            vec![
                // QEMU 7.2 may greet again when a client connects early: skipped.
                ("qmp_capabilities", vec![GREETING.into(), r#"{"return": {}, "id": $ID}"#.into()]),
                // An event between the command and its answer, and a stale answer to skip.
                (
                    "query-status",
                    vec![
                        EVENT.into(),
                        r#"{"return": {"status": "old"}, "id": 999}"#.into(),
                        r#"{"return": {"status": "paused", "singlestep": false, "running": false}, "id": $ID}"#.into(),
                    ],
                ),
                (
                    "device_add",
                    vec![r#"{"error": {"class": "GenericError", "desc": "Bus 'x' not found"}, "id": $ID}"#.into()],
                ),
                ("cont", ok()),
                // QEMU may close without answering `quit`.
                ("quit", vec![]),
            ],
        ));

        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(client.greeting()["QMP"]["version"]["qemu"]["major"], 7);
        let status = client.query_status().await.unwrap();
        assert_eq!(status, RunStatus { running: false, status: "paused".into() });
        let events = client.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["event"], "STOP");
        assert!(client.take_events().is_empty());

        let error = client.execute("device_add", Some(json!({"driver": "virtio-net-device"}))).await.unwrap_err();
        match &error {
            QmpError::Command { command, class, desc } => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("device_add", "GenericError", "Bus 'x' not found")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(error.to_string(), "qmp command device_add failed: GenericError: Bus 'x' not found");
        client.cont().await.unwrap();
        client.quit().await.unwrap();

        let seen = server.await.unwrap();
        assert_eq!(seen[2]["arguments"], json!({"driver": "virtio-net-device"}));
        assert!(seen[0].get("arguments").is_none());
        let ids: Vec<_> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
    }

    fn status(status: &str, running: bool) -> Vec<String> {
        vec![format!(r#"{{"return": {{"status": "{status}", "singlestep": false, "running": {running}}}, "id": $ID}}"#)]
    }

    fn migrate_status(status: &str) -> Vec<String> {
        vec![format!(r#"{{"return": {{"status": "{status}"}}, "id": $ID}}"#)]
    }

    #[tokio::test]
    async fn save_state_sets_bandwidth_migrates_to_cat_and_polls_until_completed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(
            listener,
            vec![
                ("qmp_capabilities", ok()),
                ("query-status", status("paused", false)),
                ("migrate-set-parameters", ok()),
                ("migrate", ok()),
                ("query-migrate", migrate_status("setup")),
                ("query-migrate", migrate_status("active")),
                ("query-migrate", migrate_status("completed")),
            ],
        ));
        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).await.unwrap();
        let state = Path::new("/srv/snapshots/01ab/state.bin");
        client.save_state(state, Duration::from_millis(1), Duration::from_secs(5)).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen[2]["arguments"], json!({"max-bandwidth": MAX_BANDWIDTH}));
        assert_eq!(seen[3]["arguments"], json!({"uri": "exec:cat > '/srv/snapshots/01ab/state.bin'"}));
        assert_eq!(seen.len(), 7);
    }

    #[tokio::test]
    async fn save_state_refuses_a_running_guest_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(
            listener,
            vec![
                ("qmp_capabilities", ok()),
                ("query-status", status("running", true)),
                ("query-status", status("postmigrate", false)),
                ("cont", ok()),
                ("stop", ok()),
                ("migrate-set-parameters", ok()),
                ("migrate", ok()),
                (
                    "query-migrate",
                    vec![r#"{"return": {"status": "failed", "error-desc": "No space left"}, "id": $ID}"#.into()],
                ),
            ],
        ));
        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).await.unwrap();
        let state = Path::new("/s/state.bin");
        let running = client.save_state(state, Duration::from_millis(1), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(running, crate::ControlError::BadRunState { .. }), "{running:?}");
        let failed = client.save_state(state, Duration::from_millis(1), Duration::from_secs(5)).await.unwrap_err();
        assert!(failed.to_string().contains("No space left"), "{failed}");
        server.await.unwrap();
        assert!(shell_quote(Path::new("/a'b")).is_err());
        assert_eq!(shell_quote(Path::new("/a b")).unwrap(), "'/a b'");
    }

    #[tokio::test]
    async fn wait_incoming_polls_until_the_state_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(
            listener,
            vec![
                ("qmp_capabilities", ok()),
                ("query-status", status("inmigrate", false)),
                ("query-status", status("inmigrate", false)),
                ("query-status", status("paused", false)),
                ("stop", ok()),
                ("cont", ok()),
            ],
        ));
        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).await.unwrap();
        let loaded = client.wait_incoming(Duration::from_millis(1), Duration::from_secs(5)).await.unwrap();
        assert_eq!(loaded.status, "paused");
        client.stop().await.unwrap();
        client.cont().await.unwrap();
        assert_eq!(server.await.unwrap().len(), 6);
    }

    #[tokio::test]
    async fn rejects_a_server_that_is_not_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"{\"hello\": 1}\n").await.unwrap();
        });
        let error = QmpClient::connect(&path, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(error, QmpError::Protocol { reason: "no greeting", .. }), "{error:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn times_out_and_reports_missing_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let error = QmpClient::connect(&path, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(error, QmpError::Connect { .. }), "{error:?}");

        // A server that accepts and never greets.
        let listener = UnixListener::bind(&path).unwrap();
        let error = QmpClient::connect(&path, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(error, QmpError::Timeout { .. }), "{error:?}");
        drop(listener);
    }

    #[tokio::test]
    async fn capabilities_failure_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(
            listener,
            vec![(
                "qmp_capabilities",
                vec![r#"{"error": {"class": "CommandNotFound", "desc": "nope"}, "id": $ID}"#.into()],
            )],
        ));
        let error = QmpClient::connect(&path, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(error, QmpError::Command { .. }), "{error:?}");
        server.await.unwrap();
    }
}
