//! Workspaces: a host git repository imported into a running guest (a tar stream the CLI
//! builds, unpacked by the agent's `unpack`), and the guest's work brought back (a git bundle
//! or a patch, made by `git` in the guest through `exec`). The stream protocol between the CLI
//! and the daemon is in `banger_proto::workspace`.
//!
//! Locks: the VM lock is held only to check that the VM runs and to take what the guest I/O
//! needs (its agent connection); the I/O itself runs under the VM's workspace lock
//! (`Workspace::locks`), never together with the VM lock. So `stop`, `delete` and
//! `restart` never wait behind a large import, while two imports or exports of one VM still
//! run one at a time (their streams never interleave, and an export never sees half an
//! import). A stop during an import ends it: the agent connection drops and the client gets an
//! error frame.

use std::sync::Arc;
use std::time::Instant;

use banger_core::ObservedState;
use banger_proto::agent::{
    parse_ack, AgentFailure, AgentRequest, AgentResponse, Decoder, ExecRequest, ExitStatus, Frame, FrameKind,
    SignalRequest,
};
use banger_proto::workspace::{
    export_too_large, ExportKind, WorkspaceExportQuery, WorkspaceExported, WorkspaceImported, DEFAULT_EXPORT_MAX_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::agent_conn::AgentConn;
use crate::locks::NamedLocks;
use crate::services::{Fleet, FleetError};

/// Why a workspace stream cannot begin (failures once it runs are sent to the client in-band,
/// as the stream's final `Error` frame).
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The store failed, or has no such VM.
    #[error(transparent)]
    Store(#[from] banger_store::StoreError),
    /// The VM is not running.
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

/// Bytes of an import the daemon lets be unacknowledged by the agent. Bounds what sits in
/// buffers between here and the guest, so a `shutdown` on the same connection is not queued
/// behind much of a large import.
pub const UNPACK_WINDOW: usize = 4 * 1024 * 1024;
// The agent acknowledges in steps of `TUNNEL_ACK_EVERY`: a window must hold several.
const _: () = assert!(banger_proto::agent::TUNNEL_ACK_EVERY * 4 <= UNPACK_WINDOW);
/// Guest stderr kept for an export's error message.
const STDERR_KEEP: usize = 8 * 1024;

/// Exit code of the export scripts when there is no repository at the directory.
const NO_REPO: i32 = 3;
/// Exit code of the export scripts when there is nothing to bring back.
const NOTHING_NEW: i32 = 4;

/// Checks `$1` is a repository with commits, and `cd`s there.
const ENTER_REPO: &str = r#"set -e
dir=$1
if ! cd "$dir" 2>/dev/null || [ "$(git rev-parse --show-toplevel 2>/dev/null)" != "$(pwd -P)" ]; then
  echo "no git repository at $dir" >&2; exit 3
fi
"#;

/// A bundle of `HEAD` without what the host's `$2` already holds (when the guest has it).
const BUNDLE_SCRIPT: &str = r#"basis=$2
if ! git rev-parse -q --verify HEAD >/dev/null; then
  echo "the repository at $dir has no commits yet; commit there first" >&2; exit 4
fi
if [ -n "$basis" ] && git cat-file -e "$basis^{commit}" 2>/dev/null; then
  if git merge-base --is-ancestor HEAD "$basis"; then
    echo "no new commits at $dir: the guest's HEAD is already in the host's history; commit there first" >&2
    exit 4
  fi
  exec git bundle create - HEAD "^$basis"
fi
exec git bundle create - HEAD
"#;

/// The uncommitted changes against `HEAD` (the empty tree when there is none), untracked files
/// included through a throw-away index with them added as intent-to-add. Renames off and the
/// `a/`/`b/` prefixes fixed whatever the guest's config says: the host's check
/// (`banger::workspace::patch`) refuses other forms.
const PATCH_SCRIPT: &str = r#"idx=$(mktemp)
trap 'rm -f "$idx"' EXIT
real=$(git rev-parse --git-path index)
if [ -f "$real" ]; then cp "$real" "$idx"; else rm -f "$idx"; fi
export GIT_INDEX_FILE="$idx"
git add -A -N .
if git rev-parse -q --verify HEAD >/dev/null; then base=HEAD; else base=$(git hash-object -t tree /dev/null); fi
git -c core.quotepath=on diff --binary --no-color --no-ext-diff --no-textconv --no-renames \
  --src-prefix=a/ --dst-prefix=b/ "$base"
"#;

/// What guest I/O on a VM needs, taken under its VM lock.
pub struct Target {
    /// The VM's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its agent connection.
    pub agent: Arc<AgentConn>,
    /// Its VM dir (where its disk slots are).
    pub vm_dir: std::path::PathBuf,
    /// Its VMM.
    pub vmm: banger_core::config::VmmKind,
    /// Its VMM's control socket.
    pub control: Option<std::path::PathBuf>,
}

/// The workspace service.
pub struct Workspace {
    fleet: Arc<Fleet>,
    /// Per-VM workspace locks, held across an import's or export's guest I/O.
    locks: NamedLocks,
}

impl Workspace {
    /// The service over `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet, locks: NamedLocks::default() }
    }

    /// Forgets the workspace lock of deleted VM `id`.
    pub fn forget(&self, id: &str) {
        self.locks.forget(id);
    }

    /// Under `reference`'s VM lock: checks that it runs and takes what the guest I/O needs.
    /// The lock is released on return.
    pub async fn target(&self, reference: &str) -> Result<Target, WorkspaceError> {
        let id = self.fleet.store.find_vm(reference)?.id;
        let _guard = self.fleet.locks.lock(&id).await;
        let vm = self.fleet.store.find_vm(&id)?;
        if !self.fleet.alive(&vm) || vm.state != ObservedState::Running {
            return Err(FleetError::NotRunning { vm: vm.name }.into());
        }
        let control = self.fleet.handles.get(&vm).and_then(|h| h.control_socket).map(std::path::PathBuf::from);
        Ok(Target {
            id: vm.id.clone(),
            name: vm.name.clone(),
            agent: self.fleet.agent_for(&vm),
            vm_dir: vm.vm_dir.clone().into(),
            vmm: vm.spec.vmm,
            control,
        })
    }

    /// Whether `target` still runs (it may have been stopped while we waited for its
    /// workspace lock).
    fn still_running(&self, target: &Target) -> Result<(), String> {
        let vm = self.fleet.store.find_vm(&target.id).map_err(|e| e.to_string())?;
        if self.fleet.alive(&vm) && vm.state == ObservedState::Running {
            Ok(())
        } else {
            Err(format!("vm '{}' stopped before the workspace stream began", target.name))
        }
    }

    /// Relays an import from the client stream `io` into `dir` of `target` under its workspace
    /// lock, then sends the client the final frame.
    pub async fn import_into(&self, io: &mut (impl AsyncRead + AsyncWrite + Unpin), target: &Target, dir: &str) {
        let _ws = self.locks.lock(&target.id).await;
        let started = Instant::now();
        let outcome = match self.still_running(target) {
            Ok(()) => relay_import(io, &target.agent, dir).await,
            Err(e) => Err(e),
        };
        let frame = match outcome {
            Ok((entries, bytes)) => {
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::info!(vm = %target.name, dir, entries, bytes, elapsed_ms, "workspace imported");
                let done = WorkspaceImported { vm: target.name.clone(), dir: dir.to_owned(), entries, bytes };
                Frame::json(1, FrameKind::Response, &done)
            }
            Err(message) => {
                tracing::warn!(vm = %target.name, dir, error = %message, "workspace import failed");
                let mut message = format!("importing into {}:{dir} failed: {message}", target.name);
                if message.contains("No space left on device") {
                    message.push_str(&format!(
                        "; give the vm a larger work disk (`banger vm stop {0}`, `banger vm set {0} --disk SIZE`)",
                        target.name
                    ));
                }
                Frame::json(1, FrameKind::Error, &AgentFailure { message })
            }
        };
        let _ = io.write_all(&frame.encode()).await;
        let _ = io.shutdown().await;
    }

    /// Relays an export of `target` to the client stream `io` under its workspace lock, then
    /// sends the client the final frame.
    pub async fn export_from(&self, io: &mut (impl AsyncWrite + Unpin), target: &Target, q: &WorkspaceExportQuery) {
        let _ws = self.locks.lock(&target.id).await;
        let outcome = match self.still_running(target) {
            Ok(()) => relay_export(io, target, q).await,
            Err(e) => Err(e),
        };
        let frame = match outcome {
            Ok(bytes) => {
                let done = WorkspaceExported { vm: target.name.clone(), dir: q.dir.clone(), bytes };
                Frame::json(1, FrameKind::Response, &done)
            }
            Err(message) => {
                tracing::warn!(vm = %target.name, dir = %q.dir, error = %message, "workspace export failed");
                Frame::json(1, FrameKind::Error, &AgentFailure { message })
            }
        };
        let _ = io.write_all(&frame.encode()).await;
        let _ = io.shutdown().await;
    }
}

/// Client → agent: `Data` frames forwarded while fewer than [`UNPACK_WINDOW`] bytes are
/// unacknowledged; the agent's `Unpacked` (entries, bytes) or its error ends it.
async fn relay_import(io: &mut (impl AsyncRead + Unpin), agent: &AgentConn, dir: &str) -> Result<(u64, u64), String> {
    let mut channel = agent.open(&AgentRequest::Unpack { dir: dir.to_owned() }).await.map_err(|e| e.to_string())?;
    let lost = || "the agent connection was lost (did the vm stop?)".to_owned();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut in_flight = 0usize;
    let mut sent_end = false;
    loop {
        while !sent_end && in_flight < UNPACK_WINDOW {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    let _ = channel.send(FrameKind::Close, Vec::new());
                    return Err(format!("corrupt stream from the client: {e}"));
                }
            };
            if frame.kind != FrameKind::Data {
                let _ = channel.send(FrameKind::Close, Vec::new());
                return Err(format!("unexpected {:?} frame from the client", frame.kind));
            }
            sent_end = frame.payload.is_empty();
            in_flight += frame.payload.len();
            channel.send(FrameKind::Data, frame.payload).map_err(|_| lost())?;
        }
        let want_more = !sent_end && in_flight < UNPACK_WINDOW;
        tokio::select! {
            read = io.read(&mut buf), if want_more => match read {
                Ok(n) if n > 0 => decoder.push(&buf[..n]),
                _ => {
                    let _ = channel.send(FrameKind::Close, Vec::new());
                    return Err("the client went away before the end of the stream".into());
                }
            },
            frame = channel.recv() => {
                let frame = frame.ok_or_else(lost)?;
                match frame.kind {
                    FrameKind::Ack => in_flight = in_flight.saturating_sub(parse_ack(&frame.payload).unwrap_or(0)),
                    FrameKind::Response => {
                        return match frame.parse::<AgentResponse>("response") {
                            Ok(AgentResponse::Unpacked { entries, bytes }) => Ok((entries, bytes)),
                            Ok(other) => Err(format!("unexpected answer from the agent: {other:?}")),
                            Err(e) => Err(e.to_string()),
                        };
                    }
                    FrameKind::Error => {
                        return Err(frame.parse::<AgentFailure>("error").map_or_else(|e| e.to_string(), |f| f.message));
                    }
                    other => tracing::debug!(kind = ?other, "ignoring a frame on an unpack channel"),
                }
            }
        }
    }
}

/// Runs the export script in the guest and relays its stdout as `Data`; returns the bytes sent.
async fn relay_export(
    io: &mut (impl AsyncWrite + Unpin),
    target: &Target,
    q: &WorkspaceExportQuery,
) -> Result<u64, String> {
    let script = match q.kind {
        ExportKind::Bundle => format!("{ENTER_REPO}{BUNDLE_SCRIPT}"),
        ExportKind::Patch => format!("{ENTER_REPO}{PATCH_SCRIPT}"),
    };
    let argv = ["sh", "-c", &script, "banger-export", &q.dir, q.basis.as_deref().unwrap_or("")];
    let request = AgentRequest::Exec(ExecRequest {
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        env: vec![("LC_ALL".into(), "C".into()), ("GIT_TERMINAL_PROMPT".into(), "0".into())],
        cwd: Some("/".into()),
        stdin: false,
        tty: None,
        container: None,
    });
    let lost = || "the agent connection was lost (did the vm stop?)".to_owned();
    let mut channel = target.agent.open(&request).await.map_err(|e| e.to_string())?;
    let mut stderr = Vec::new();
    let mut bytes = 0u64;
    let cap = q.max_bytes.unwrap_or(DEFAULT_EXPORT_MAX_BYTES);
    let kill = || serde_json::to_vec(&SignalRequest { signal: 9 }).unwrap_or_default();
    loop {
        let frame = channel.recv().await.ok_or_else(lost)?;
        match frame.kind {
            FrameKind::Stdout if !frame.payload.is_empty() => {
                bytes = bytes.saturating_add(frame.payload.len() as u64);
                if bytes > cap {
                    // Checked before the frame is relayed: the client never gets more than the cap.
                    let _ = channel.send(FrameKind::Signal, kill());
                    tracing::warn!(vm = %target.name, cap, "workspace export over its cap");
                    return Err(export_too_large(&target.name, cap));
                }
                let out = Frame::new(1, FrameKind::Data, frame.payload);
                if io.write_all(&out.encode()).await.is_err() {
                    // Nobody reads on: end the command.
                    let _ = channel.send(FrameKind::Signal, kill());
                    return Err("the client went away".into());
                }
            }
            FrameKind::Stderr => {
                let room = STDERR_KEEP.saturating_sub(stderr.len());
                stderr.extend_from_slice(&frame.payload[..frame.payload.len().min(room)]);
            }
            FrameKind::Exit => {
                let status: ExitStatus = frame.parse("exit").map_err(|e| e.to_string())?;
                return match status.code {
                    0 => Ok(bytes),
                    code => Err(export_failure(&target.name, code, &String::from_utf8_lossy(&stderr))),
                };
            }
            FrameKind::Error => {
                return Err(frame.parse::<AgentFailure>("error").map_or_else(|e| e.to_string(), |f| f.message));
            }
            _ => {}
        }
    }
}

/// One line for a failed export script, naming the fix where there is one.
fn export_failure(vm: &str, code: i32, stderr: &str) -> String {
    let said = stderr.trim().lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
    match code {
        NO_REPO => format!(
            "vm '{vm}': {said}; import one with `banger workspace prepare {vm}`, or name the guest directory with --path"
        ),
        NOTHING_NEW => format!("vm '{vm}': {said}"),
        127 => format!("vm '{vm}' has no git; use an image that has it (e.g. --image debian-bookworm)"),
        _ if said.is_empty() => format!("git in vm '{vm}' failed (exit {code})"),
        _ => format!("git in vm '{vm}' failed (exit {code}): {said}"),
    }
}

#[path = "workspace_attach.rs"]
pub mod attach;

#[cfg(test)]
#[path = "workspace_tests.rs"]
mod tests;
