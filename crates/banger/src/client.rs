//! The CLI's side of the API: HTTP/1.1 over the daemon's unix socket, and starting `bangerd`
//! in the background when nothing answers.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use banger_core::Layout;
use banger_proto::{ApiError, DaemonStatus};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

/// An error answer from the daemon.
#[derive(Debug, thiserror::Error)]
#[error("{}", .body.message)]
pub struct ApiErrorAnswer {
    /// HTTP status.
    pub status: StatusCode,
    /// The daemon's error body.
    pub body: ApiError,
}

/// The daemon's error body of a `status` answer, or one made of the raw text when it sent none.
pub fn api_error(status: StatusCode, bytes: &[u8]) -> ApiError {
    serde_json::from_slice::<ApiError>(bytes).unwrap_or_else(|_| ApiError {
        code: "http".into(),
        message: format!("bangerd answered {status}: {}", String::from_utf8_lossy(bytes)),
    })
}

/// A client bound to one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    layout: Layout,
}

impl Client {
    pub fn new(layout: Layout) -> Self {
        Self { layout }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    async fn connect(&self) -> std::io::Result<UnixStream> {
        UnixStream::connect(&self.layout.socket).await
    }

    /// Sends `req` on a connection of its own and returns the response head, its body still
    /// to read. The connection serves upgrades, so a `101` answer can become a stream.
    pub async fn request(&self, req: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>> {
        self.request_with(req).await
    }

    /// [`Client::request`] with any body, e.g. a streamed upload.
    pub async fn request_with<B>(&self, req: Request<B>) -> anyhow::Result<Response<Incoming>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self
            .connect()
            .await
            .with_context(|| format!("cannot reach bangerd at {}", self.layout.socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("http handshake with bangerd failed")?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender.send_request(req).await.context("request to bangerd failed")
    }

    /// Sends one request; returns the status and raw body.
    async fn send(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = Request::builder().method(method).uri(path).header("host", "bangerd");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).context("cannot build request")?;
        let resp = self.request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.context("cannot read bangerd's answer")?.to_bytes();
        Ok((status, bytes))
    }

    /// Sends a request and decodes a JSON answer, turning error answers into [`ApiErrorAnswer`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let body = body.map(serde_json::to_vec).transpose().context("cannot encode request")?;
        let (status, bytes) = self.send(method, path, body).await?;
        if !status.is_success() {
            return Err(ApiErrorAnswer { status, body: api_error(status, &bytes) }.into());
        }
        serde_json::from_slice(&bytes).with_context(|| format!("cannot decode bangerd's answer to {path}"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `GET path`: the answer's raw JSON body, error answers turned into [`ApiErrorAnswer`].
    pub async fn get_raw(&self, path: &str) -> anyhow::Result<Bytes> {
        let (status, bytes) = self.send(Method::GET, path, None).await?;
        if !status.is_success() {
            return Err(ApiErrorAnswer { status, body: api_error(status, &bytes) }.into());
        }
        Ok(bytes)
    }

    /// The daemon's status, or `None` when nothing answers on the socket.
    pub async fn probe(&self) -> Option<DaemonStatus> {
        self.get("/v1/health").await.ok()
    }

    /// Makes sure a daemon answers, starting one if needed. Returns its status and whether it
    /// was started now.
    pub async fn ensure_daemon(&self) -> anyhow::Result<(DaemonStatus, bool)> {
        if let Some(status) = self.probe().await {
            return Ok((status, false));
        }
        let status = self.start_daemon().await?;
        Ok((status, true))
    }

    /// Starts `bangerd` in the background and waits until it answers.
    pub async fn start_daemon(&self) -> anyhow::Result<DaemonStatus> {
        let exe = bangerd_path()?;
        let mut child = tokio::process::Command::new(&exe)
            .arg("--state-dir")
            .arg(&self.layout.state_dir)
            .arg("--socket")
            .arg(&self.layout.socket)
            .arg("--detached")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at this terminal must not stop the daemon.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(exit) = child.try_wait().context("cannot watch bangerd")? {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    use tokio::io::AsyncReadExt as _;
                    let _ = pipe.read_to_string(&mut stderr).await;
                }
                let why = stderr.trim().trim_start_matches("bangerd: ");
                bail!("bangerd could not start ({exit}): {why}");
            }
            if let Some(status) = self.probe().await {
                eprintln!("started bangerd (pid {}); log: {}", status.pid, status.log_file);
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "bangerd did not answer on {} within 15 s; see its log {}",
                    self.layout.socket.display(),
                    self.layout.log_file().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the socket stops answering and the daemon with `pid` has exited.
    pub async fn wait_stopped(&self, pid: u32, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while pid_alive(pid) || self.connect().await.is_ok() {
            if Instant::now() > deadline {
                bail!("bangerd (pid {pid}) did not stop within {} s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }
}

/// Whether `pid` is a live process (a zombie is dead): the same test as the daemon's
/// `banger_host::process::pid_alive` without a marker, kept here so the CLI links no host crate.
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name, which may itself hold spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x"))
}

/// Where `bangerd` is: `$BANGER_BANGERD`, beside this executable, or on `PATH`.
fn bangerd_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("BANGER_BANGERD").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join("bangerd")));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("bangerd"))
        .find(|p| p.is_file())
        .context("bangerd not found beside banger or on PATH; install it (see README) or set BANGER_BANGERD")
}
