//! Firecracker's HTTP API on its unix socket, and the request bodies banger sends.
//!
//! Protocol (Firecracker v1.16, `firecracker-api-v1.16.1.yaml`): HTTP/1.1 with JSON bodies on a
//! unix socket. A configuration call or action answers `204 No Content`; a refused one answers
//! `400` (or another error status) with `{"fault_message": "..."}`. Firecracker refuses unknown
//! fields, so bodies carry only the fields the spec defines and leave optional ones out rather
//! than sending `null`. One request per connection keeps the client free of connection state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

/// Default time one API call may take.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket did not accept a connection.
    #[error("cannot connect to the firecracker api socket {}; is the vm running?", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (Firecracker closed the connection, or it is not HTTP).
    #[error("firecracker api call {call} failed; the vmm may have exited")]
    Http {
        /// `METHOD /path`.
        call: String,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// No answer in time.
    #[error("firecracker gave no answer to {call} within {timeout:?}; the vmm may be hung, kill it")]
    Timeout {
        /// `METHOD /path`.
        call: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Firecracker refused the call and said why.
    #[error("firecracker refused {call} ({status}): {fault_message}")]
    Fault {
        /// `METHOD /path`.
        call: String,
        /// The HTTP status.
        status: u16,
        /// Firecracker's `fault_message`.
        fault_message: String,
    },
    /// An answer that is not what the API defines.
    #[error("unexpected answer to {call} ({status}): {body}")]
    Unexpected {
        /// `METHOD /path`.
        call: String,
        /// The HTTP status.
        status: u16,
        /// The body (truncated).
        body: String,
    },
}

impl ApiError {
    /// Firecracker's own message when it refused the call.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            Self::Fault { fault_message, .. } => Some(fault_message),
            _ => None,
        }
    }

    /// Whether the socket was not there or refused the connection (the VMM is not listening).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// A client of one Firecracker API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client of the API socket at `socket`; each call may take up to `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self { socket: socket.into(), timeout }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `PUT path` with a JSON body; `Ok` on 204.
    pub async fn put(&self, path: &str, body: &impl Serialize) -> Result<(), ApiError> {
        self.no_content(Method::PUT, path, body).await
    }

    /// `PATCH path` with a JSON body; `Ok` on 204.
    pub async fn patch(&self, path: &str, body: &impl Serialize) -> Result<(), ApiError> {
        self.no_content(Method::PATCH, path, body).await
    }

    /// `GET /`: the instance's id, state and Firecracker version.
    pub async fn instance_info(&self) -> Result<InstanceInfo, ApiError> {
        let call = "GET /".to_owned();
        let (status, body) = self.send(Method::GET, "/", None).await?;
        if status != 200 {
            return Err(error_answer(call, status, &body));
        }
        serde_json::from_slice(&body).map_err(|_| ApiError::Unexpected { call, status, body: excerpt(&body) })
    }

    /// `PUT /actions` with `action`.
    pub async fn action(&self, action: ActionType) -> Result<(), ApiError> {
        self.put("/actions", &Action { action_type: action }).await
    }

    async fn no_content(&self, method: Method, path: &str, body: &impl Serialize) -> Result<(), ApiError> {
        let call = format!("{method} {path}");
        let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Unexpected {
            call: call.clone(),
            status: 0,
            body: format!("cannot encode the request: {e}"),
        })?;
        let (status, answer) = self.send(method, path, Some(bytes)).await?;
        if status == 204 || status == 200 {
            return Ok(());
        }
        Err(error_answer(call, status, &answer))
    }

    async fn send(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Bytes), ApiError> {
        let call = format!("{method} {path}");
        let exchange = async {
            let stream = UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect { path: self.socket.clone(), source })?;
            let http = |source| ApiError::Http { call: call.clone(), source };
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut request = Request::builder().method(method).uri(path).header("host", "localhost");
            request = request.header("accept", "application/json");
            if body.is_some() {
                request = request.header("content-type", "application/json");
            }
            let request = request.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| {
                ApiError::Unexpected { call: call.clone(), status: 0, body: format!("cannot build the request: {e}") }
            })?;
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await.map_err(http)?.to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout { call: call.clone(), timeout: self.timeout })?
    }
}

/// The error for a non-success answer: Firecracker's `fault_message` when the body has one.
fn error_answer(call: String, status: u16, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<FaultBody>(body) {
        Ok(FaultBody { fault_message: Some(fault_message) }) => ApiError::Fault { call, status, fault_message },
        _ => ApiError::Unexpected { call, status, body: excerpt(body) },
    }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// An error answer's body (`Error` in the spec).
#[derive(Debug, Deserialize)]
struct FaultBody {
    fault_message: Option<String>,
}

/// `GET /` (`InstanceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name (`Firecracker`).
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// Firecracker's version.
    pub vmm_version: String,
}

/// `PUT /actions` (`InstanceActionInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Action {
    /// The action.
    pub action_type: ActionType,
}

/// The actions banger uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard controller.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

impl std::fmt::Display for ActionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::InstanceStart => "InstanceStart",
            Self::SendCtrlAltDel => "SendCtrlAltDel",
            Self::FlushMetrics => "FlushMetrics",
        })
    }
}

/// `PUT /logger` (`Logger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Logger {
    /// The log file.
    pub log_path: String,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    pub level: &'static str,
    /// Print the level on each line.
    pub show_level: bool,
    /// Print the source file and line on each line.
    pub show_log_origin: bool,
}

/// `PUT /metrics` (`Metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// The file metrics are flushed to, one JSON object per line.
    pub metrics_path: String,
}

/// `PUT /serial` (`SerialDevice`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Serial {
    /// The file the guest's serial console is written to.
    pub serial_out_path: String,
}

/// `PUT /machine-config` (`MachineConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineConfig {
    /// vCPUs (1 to 32).
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading in the guest.
    pub smt: bool,
}

/// `PUT /boot-source` (`BootSource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootSource {
    /// The ELF `vmlinux`.
    pub kernel_image_path: String,
    /// The initramfs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line.
    pub boot_args: String,
}

/// `PUT /drives/{drive_id}` (`Drive`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drive {
    /// The drive id (also in the path).
    pub drive_id: String,
    /// The raw disk image.
    pub path_on_host: String,
    /// Whether the kernel should mount it as `/` (banger's init mounts the root itself).
    pub is_root_device: bool,
    /// Whether the guest may only read it.
    pub is_read_only: bool,
    /// `Writeback` honours the guest's flushes; `Unsafe` ignores them.
    pub cache_type: &'static str,
}

/// `PUT /network-interfaces/{iface_id}` (`NetworkInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInterface {
    /// The interface id (also in the path).
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// The guest MAC address.
    pub guest_mac: String,
}

/// `PUT /vsock` (`Vsock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// The hybrid vsock unix socket Firecracker listens on.
    pub uds_path: String,
}

/// `PUT /balloon` (`Balloon`): a balloon that never inflates (a target of 0 MiB) and only
/// reports the guest's free pages, which Firecracker gives back to the host (`madvise`, never a
/// write to a snapshot's memory file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Balloon {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Whether the balloon deflates when the guest runs short.
    pub deflate_on_oom: bool,
    /// Whether the guest reports its free pages.
    pub free_page_reporting: bool,
}

/// `PATCH /vm` (`Vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VmState {
    /// The state asked for.
    pub state: VmRunState,
}

/// The states `PATCH /vm` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmRunState {
    /// vCPUs stopped.
    Paused,
    /// vCPUs running.
    Resumed,
}

/// `PUT /snapshot/create` (`SnapshotCreateParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotCreate {
    /// `Full` (every page) or `Diff`.
    pub snapshot_type: &'static str,
    /// The VM state file.
    pub snapshot_path: String,
    /// The guest memory file.
    pub mem_file_path: String,
}

/// `PUT /snapshot/load` (`SnapshotLoadParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotLoad {
    /// The VM state file.
    pub snapshot_path: String,
    /// Where the guest memory comes from.
    pub mem_backend: MemoryBackend,
    /// Resume the VM once loaded.
    pub resume_vm: bool,
    /// TAP devices that replace the snapshot's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// The hybrid vsock socket that replaces the snapshot's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryBackend {
    /// `File` (or `Uffd`).
    pub backend_type: &'static str,
    /// The memory file.
    pub backend_path: String,
}

/// `NetworkOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new TAP device.
    pub host_dev_name: String,
}

/// `VsockOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockOverride {
    /// The new hybrid vsock socket.
    pub uds_path: String,
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn bodies_leave_out_absent_fields() {
        let boot = BootSource { kernel_image_path: "/k".into(), initrd_path: None, boot_args: "x".into() };
        assert_eq!(serde_json::to_string(&boot).unwrap(), r#"{"kernel_image_path":"/k","boot_args":"x"}"#);
        let action = Action { action_type: ActionType::InstanceStart };
        assert_eq!(serde_json::to_string(&action).unwrap(), r#"{"action_type":"InstanceStart"}"#);
        let state = VmState { state: VmRunState::Paused };
        assert_eq!(serde_json::to_string(&state).unwrap(), r#"{"state":"Paused"}"#);
    }

    #[test]
    fn error_answers_carry_the_fault_message() {
        let error = error_answer("PUT /actions".into(), 400, br#"{"fault_message":"Invalid Elf magic number"}"#);
        assert_eq!(error.fault_message(), Some("Invalid Elf magic number"));
        assert_eq!(error.to_string(), "firecracker refused PUT /actions (400): Invalid Elf magic number");
        let error = error_answer("PUT /actions".into(), 500, b"<html>");
        assert!(matches!(error, ApiError::Unexpected { status: 500, .. }), "{error:?}");
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let client = ApiClient::new(dir.path().join("none.sock"), Duration::from_secs(1));
        let error = client.action(ActionType::FlushMetrics).await.unwrap_err();
        assert!(error.is_connect(), "{error:?}");
    }
}
