//! The shim's side of bangerd's API: JSON calls over the daemon's unix socket, and the
//! `banger-exec` upgrade that carries a process's frames. The shim never starts the daemon:
//! containerd's node runs it (`BANGER_SOCKET`, or the default socket of the user).

use std::path::PathBuf;
use std::time::Duration;

use banger_proto::{ApiError, CreateVmRequest, OpState, OperationRecord};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Why a call to bangerd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("cannot reach bangerd at {socket}; is it running (`banger daemon start`) and is BANGER_SOCKET right?")]
    Connect {
        /// The socket.
        socket: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("request to bangerd failed")]
    Http(#[from] hyper::Error),
    /// A request could not be built.
    #[error("cannot build a request to bangerd")]
    Build(#[from] hyper::http::Error),
    /// bangerd refused.
    #[error("bangerd answered {status}: {message}")]
    Refused {
        /// The status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
    /// The answer was not what the API documents.
    #[error("cannot decode bangerd's answer")]
    Decode(#[from] serde_json::Error),
    /// A create or start operation ended without success.
    #[error("vm {vm}: {error}")]
    Operation {
        /// The VM.
        vm: String,
        /// The operation's error.
        error: String,
    },
}

impl ClientError {
    /// Whether bangerd said the VM does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// A client of one bangerd.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// The largest JSON answer read.
const MAX_ANSWER: usize = 4 << 20;

impl Client {
    /// The daemon at `BANGER_SOCKET`, else the default socket of this user.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("BANGER_SOCKET").filter(|s| !s.is_empty()).map(PathBuf::from);
        let state = std::env::var_os("BANGER_STATE_DIR").filter(|s| !s.is_empty()).map(PathBuf::from);
        Self { socket: banger_core::Layout::resolve(state, socket).socket }
    }

    /// The socket it talks to.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect { socket: self.socket.display().to_string(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender.send_request(req).await?)
    }

    /// `method path` with an optional JSON body; the JSON answer.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let mut req = Request::builder().method(method).uri(path).header("host", "bangerd");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let resp = self.send(req.body(Full::new(Bytes::from(body.unwrap_or_default())))?).await?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        let bytes = read_body(resp).await;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Creates and starts a VM; returns once it runs (its agent answered).
    pub async fn create_vm(&self, req: &CreateVmRequest) -> Result<(), ClientError> {
        let op: OperationRecord = self.call(Method::POST, "/v1/vms", Some(serde_json::to_vec(req)?)).await?;
        self.finish(&req.name, op).await
    }

    /// Follows operation `op` to its end.
    async fn finish(&self, vm: &str, mut op: OperationRecord) -> Result<(), ClientError> {
        loop {
            match op.state {
                OpState::Succeeded => return Ok(()),
                OpState::Running => {}
                _ => {
                    let error = op.error.unwrap_or_else(|| format!("the operation ended {:?}", op.state));
                    return Err(ClientError::Operation { vm: vm.to_owned(), error });
                }
            }
            let path = format!("/v1/operations/{}?wait_ms=10000&stages={}", op.id, op.stages.len());
            op = self.call(Method::GET, &path, None).await?;
        }
    }

    /// Stops (forced: the task's process is gone or being killed) and deletes VM `vm`; a VM
    /// already gone is fine.
    pub async fn remove_vm(&self, vm: &str) -> Result<(), ClientError> {
        let stop = self.call::<serde_json::Value>(Method::POST, &format!("/v1/vms/{vm}/stop?force=true"), None).await;
        match stop {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => log::warn!("stopping vm {vm}: {e}"),
        }
        match self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/vms/{vm}"), None).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens an exec stream to VM `vm`'s agent (`POST /v1/vms/{vm}/exec`, `Upgrade: banger-exec`).
    pub async fn exec_stream(&self, vm: &str) -> Result<TokioIo<Upgraded>, ClientError> {
        let req = Request::post(format!("/v1/vms/{vm}/exec"))
            .header("host", "bangerd")
            .header("connection", "upgrade")
            .header("upgrade", "banger-exec")
            .body(Full::new(Bytes::new()))?;
        let resp = self.send(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(refusal(resp).await);
        }
        Ok(TokioIo::new(hyper::upgrade::on(resp).await?))
    }
}

/// An answer's body, at most [`MAX_ANSWER`] bytes (empty when longer or broken).
async fn read_body(resp: hyper::Response<hyper::body::Incoming>) -> Bytes {
    http_body_util::Limited::new(resp.into_body(), MAX_ANSWER).collect().await.map(|b| b.to_bytes()).unwrap_or_default()
}

/// bangerd's refusal: its status and `{code, message}`'s message (or the raw text).
async fn refusal(resp: hyper::Response<hyper::body::Incoming>) -> ClientError {
    let status = resp.status();
    let bytes = read_body(resp).await;
    let message = serde_json::from_slice::<ApiError>(&bytes)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
    ClientError::Refused { status, message }
}

/// How long a VM may take to boot before the task's create fails (TCG guests are slow).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
