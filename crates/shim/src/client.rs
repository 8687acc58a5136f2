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
    /// The root image could not be read.
    #[error("cannot read the container's root image {path}")]
    Image {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The stream broke or bangerd's final frame was not an answer.
    #[error("the disk stream to vm {vm} broke: {message}")]
    Stream {
        /// The VM.
        vm: String,
        /// What happened.
        message: String,
    },
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
        self.upgrade(&format!("/v1/vms/{vm}/exec"), "banger-exec").await
    }

    /// `POST path` upgraded to `protocol`.
    async fn upgrade(&self, path: &str, protocol: &str) -> Result<TokioIo<Upgraded>, ClientError> {
        let req = Request::post(path)
            .header("host", "bangerd")
            .header("connection", "upgrade")
            .header("upgrade", protocol)
            .body(Full::new(Bytes::new()))?;
        let resp = self.send(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(refusal(resp).await);
        }
        Ok(TokioIo::new(hyper::upgrade::on(resp).await?))
    }

    /// Attaches the ext4 image `image` to running VM `vm` in a free spare disk slot, mounted
    /// at guest directory `dir`: the workspace disk import (`disk_bytes`), which streams the
    /// image's non-zero pieces; bangerd writes them into the slot and never mounts or reads
    /// them. A VM with no free slot is refused with 409.
    pub async fn attach_disk(&self, vm: &str, dir: &str, image: &std::path::Path) -> Result<(), ClientError> {
        use banger_proto::agent::{AgentFailure, Decoder, Frame, FrameKind};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let image_err = |source| ClientError::Image { path: image.display().to_string(), source };
        let file = std::fs::File::open(image).map_err(image_err)?;
        let size = file.metadata().map_err(image_err)?.len();
        let path = format!("/v1/vms/{vm}/workspace/import?dir={dir}&disk_bytes={size}");
        let io = self.upgrade(&path, banger_proto::workspace::WORKSPACE_PROTOCOL).await?;
        let (mut rd, mut wr) = tokio::io::split(io);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let reader = tokio::task::spawn_blocking(move || image_pieces(&file, size, &tx));
        let broke = |message: String| ClientError::Stream { vm: vm.to_owned(), message };
        while let Some(piece) = rx.recv().await {
            wr.write_all(&Frame::new(1, FrameKind::Data, piece).encode()).await.map_err(|e| broke(e.to_string()))?;
        }
        reader.await.map_err(|e| broke(e.to_string()))?.map_err(image_err)?;
        let end = Frame::new(1, FrameKind::Data, Vec::new()).encode();
        wr.write_all(&end).await.and(wr.flush().await).map_err(|e| broke(e.to_string()))?;
        // The final frame: bangerd's (a trusted peer), still read within a frame's bound.
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match decoder.next_frame().map_err(|e| broke(e.to_string()))? {
                Some(f) if f.kind == FrameKind::Response => return Ok(()),
                Some(f) if f.kind == FrameKind::Error => {
                    let failure: AgentFailure = f.parse("error").map_err(|e| broke(e.to_string()))?;
                    return Err(ClientError::Operation { vm: vm.to_owned(), error: failure.message });
                }
                Some(_) => {}
                None => match rd.read(&mut buf).await {
                    Ok(n) if n > 0 => decoder.push(&buf[..n]),
                    _ => return Err(broke("bangerd closed the stream without an answer".into())),
                },
            }
        }
    }

    /// Detaches the disk attached at guest directory `dir` of VM `vm` (unmounted, its slot
    /// emptied); a VM or disk already gone is fine.
    pub async fn detach_disk(&self, vm: &str, dir: &str) -> Result<(), ClientError> {
        let req = Request::delete(format!("/v1/vms/{vm}/workspace/disk?dir={dir}"))
            .header("host", "bangerd")
            .body(Full::new(Bytes::new()))?;
        let resp = self.send(req).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        match refusal(resp).await {
            e if e.is_not_found() => Ok(()),
            e => Err(e),
        }
    }
}

/// Sends the non-zero pieces of `file` (`size` bytes) to `tx` as disk `Data` payloads: a
/// little-endian offset, then at most a frame's worth of bytes. Holes (`SEEK_DATA`) and
/// all-zero pieces are left out: the slot reads them as zeros.
fn image_pieces(file: &std::fs::File, size: u64, tx: &tokio::sync::mpsc::Sender<Vec<u8>>) -> std::io::Result<()> {
    use banger_proto::workspace::DISK_OFFSET_BYTES;
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::FileExt as _;
    let chunk = banger_proto::agent::MAX_PAYLOAD - DISK_OFFSET_BYTES;
    let mut offset = 0u64;
    while offset < size {
        let at = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a descriptor `file` owns; no memory is passed.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        let Ok(data) = u64::try_from(data) else {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data past `offset`.
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(()) } else { Err(e) };
        };
        if data >= size {
            return Ok(());
        }
        let len = usize::try_from((size - data).min(chunk as u64)).map_err(std::io::Error::other)?;
        let mut piece = vec![0u8; DISK_OFFSET_BYTES + len];
        piece[..DISK_OFFSET_BYTES].copy_from_slice(&data.to_le_bytes());
        file.read_exact_at(&mut piece[DISK_OFFSET_BYTES..], data)?;
        if piece[DISK_OFFSET_BYTES..].iter().any(|&b| b != 0) && tx.blocking_send(piece).is_err() {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the disk stream ended"));
        }
        offset = data + len as u64;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_goes_as_its_non_zero_pieces_at_their_offsets() {
        use std::os::unix::fs::FileExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let file = std::fs::File::create(&path).expect("create");
        let size = 8u64 << 20;
        file.set_len(size).expect("size");
        file.write_all_at(b"head", 0).expect("write");
        file.write_all_at(&vec![0u8; 4096], 2 << 20).expect("zeros");
        file.write_all_at(b"tail", size - 4).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        image_pieces(&file, size, &tx).expect("pieces");
        drop(tx);
        let mut image = vec![0u8; usize::try_from(size).expect("size")];
        let mut sent = 0;
        while let Ok(piece) = rx.try_recv() {
            assert!(piece.len() <= banger_proto::agent::MAX_PAYLOAD);
            let at = usize::try_from(u64::from_le_bytes(piece[..8].try_into().expect("offset"))).expect("at");
            image[at..at + piece.len() - 8].copy_from_slice(&piece[8..]);
            sent += piece.len() - 8;
        }
        assert_eq!(&image[..4], b"head");
        assert_eq!(&image[image.len() - 4..], b"tail");
        assert!(sent < 4 << 20, "holes and zeros are left out ({sent} bytes sent)");
    }
}
