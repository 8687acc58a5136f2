//! One task process (the init process or an exec) running in the task's VM: its exec stream to
//! bangerd, relayed to and from containerd's stdio FIFOs, and its exit status.
//!
//! Output is written to the FIFOs as it arrives and only then read further from bangerd, so a
//! reader that stops reading holds the guest process back through bangerd's credit window
//! (docs/security.md, "flow control") instead of growing the shim; a reader that went away
//! (EPIPE) makes the rest of the output be dropped, never buffered.

use std::sync::Mutex;
use std::time::SystemTime;

use banger_proto::agent::{
    AgentFailure, AgentRequest, AgentResponse, Decoder, ExecRequest, ExitStatus, Frame, FrameKind, SignalRequest,
    TtySize,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use crate::client::{Client, ClientError};
use crate::spec;

/// Why a process could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// bangerd refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A FIFO could not be opened.
    #[error("cannot open the stdio fifo {path}")]
    Fifo {
        /// The FIFO.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The stream broke or the agent refused before the process started.
    #[error("the process did not start: {0}")]
    NotStarted(String),
}

/// How a process ended: its status (128 + signal when killed) and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// containerd's exit status.
    pub status: u32,
    /// When it was seen.
    pub at: SystemTime,
}

/// Where a process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Made, not started.
    Created,
    /// Running with this guest pid.
    Running(u32),
    /// Ended.
    Exited(Exit),
}

/// A task process.
#[derive(Debug)]
pub struct Process {
    /// containerd's FIFOs (empty = none).
    pub stdio: [String; 3],
    /// Its OCI process.
    pub spec: spec::Process,
    /// Frames to the running process (signals, resizes, stdin EOF).
    frames: Mutex<Option<mpsc::UnboundedSender<Frame>>>,
    status: watch::Sender<Status>,
}

impl Process {
    /// A process not yet started.
    pub fn new(stdio: [String; 3], spec: spec::Process) -> Self {
        Self { stdio, spec, frames: Mutex::new(None), status: watch::Sender::new(Status::Created) }
    }

    /// Where it stands now.
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// Waits for its exit.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.status.subscribe();
        loop {
            if let Status::Exited(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return Exit { status: 255, at: SystemTime::now() };
            }
        }
    }

    /// Marks it ended (e.g. its VM was removed) unless it already is.
    pub fn mark_exited(&self, status: u32) {
        self.status.send_if_modified(|s| match s {
            Status::Exited(_) => false,
            _ => {
                *s = Status::Exited(Exit { status, at: SystemTime::now() });
                true
            }
        });
    }

    /// Starts it in VM `vm`; returns its guest pid once the agent started it. `on_exit` runs
    /// once it has ended (the shim publishes the exit event).
    pub async fn start(
        self: &std::sync::Arc<Self>,
        client: &Client,
        vm: &str,
        on_exit: impl FnOnce(Exit) + Send + 'static,
    ) -> Result<u32, ProcessError> {
        let stream = client.exec_stream(vm).await?;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let tty = self.spec.terminal.then_some(TtySize { rows: 24, cols: 80 });
        let request = AgentRequest::Exec(ExecRequest {
            argv: self.spec.args.clone(),
            env: self.spec.env_pairs(),
            cwd: Some(self.spec.cwd()),
            stdin: !self.stdio[0].is_empty(),
            tty,
            container: Some(self.spec.container()),
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        tx.send(Frame::json(1, FrameKind::Request, &request)).ok();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame.encode()).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
        });
        // The agent's first answer: started, or why not.
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        let pid = loop {
            match decoder.next_frame().map_err(|e| ProcessError::NotStarted(e.to_string()))? {
                Some(f) if f.kind == FrameKind::Response => match f.parse::<AgentResponse>("response") {
                    Ok(AgentResponse::Started { pid }) => break pid,
                    Ok(other) => return Err(ProcessError::NotStarted(format!("unexpected answer {other:?}"))),
                    Err(e) => return Err(ProcessError::NotStarted(e.to_string())),
                },
                Some(f) if f.kind == FrameKind::Error => {
                    let failure: AgentFailure =
                        f.parse("error").map_err(|e| ProcessError::NotStarted(e.to_string()))?;
                    return Err(ProcessError::NotStarted(failure.message));
                }
                Some(f) if f.kind == FrameKind::Exit => {
                    // A program that was not found exits 127 before it "started": report it
                    // as the process's exit, as runc's init would.
                    let status: ExitStatus = f.parse("exit").map_err(|e| ProcessError::NotStarted(e.to_string()))?;
                    return Err(ProcessError::NotStarted(format!(
                        "the program could not be run (exit {})",
                        status.code
                    )));
                }
                Some(_) => {}
                None => {
                    let n = rd.read(&mut buf).await.map_err(|e| ProcessError::NotStarted(e.to_string()))?;
                    if n == 0 {
                        return Err(ProcessError::NotStarted("bangerd closed the exec stream".into()));
                    }
                    decoder.push(&buf[..n]);
                }
            }
        };
        let [stdin, stdout, stderr] = &self.stdio;
        let out = open_writer(stdout).await?;
        let err = if self.spec.terminal { None } else { open_writer(stderr).await? };
        if !stdin.is_empty() {
            let receiver = pipe::OpenOptions::new()
                .open_receiver(stdin)
                .map_err(|source| ProcessError::Fifo { path: stdin.clone(), source })?;
            tokio::spawn(feed_stdin(receiver, tx.clone()));
        }
        if let Ok(mut slot) = self.frames.lock() {
            *slot = Some(tx);
        }
        self.status.send_replace(Status::Running(pid));
        let this = self.clone();
        tokio::spawn(async move {
            let status = relay(&mut rd, decoder, out, err).await;
            if let Ok(mut slot) = this.frames.lock() {
                slot.take();
            }
            this.mark_exited(status);
            if let Status::Exited(exit) = this.status() {
                on_exit(exit);
            }
        });
        Ok(pid)
    }

    fn send(&self, frame: Frame) -> bool {
        self.frames.lock().ok().and_then(|s| s.as_ref().map(|tx| tx.send(frame).is_ok())).unwrap_or(false)
    }

    /// Sends `signal` to it; false when it is not running.
    pub fn signal(&self, signal: i32) -> bool {
        self.send(Frame::json(1, FrameKind::Signal, &SignalRequest { signal }))
    }

    /// Resizes its terminal.
    pub fn resize(&self, cols: u32, rows: u32) -> bool {
        let size = TtySize {
            rows: u16::try_from(rows).unwrap_or(u16::MAX).clamp(1, TtySize::MAX),
            cols: u16::try_from(cols).unwrap_or(u16::MAX).clamp(1, TtySize::MAX),
        };
        self.send(Frame::json(1, FrameKind::Resize, &size))
    }

    /// Closes its stdin.
    pub fn close_stdin(&self) -> bool {
        self.send(Frame::new(1, FrameKind::Stdin, Vec::new()))
    }
}

/// Where output goes.
type Output = Box<dyn AsyncWrite + Unpin + Send>;

/// Opens an output for writing: containerd's FIFO (without blocking; `None` when nobody reads
/// it, the process's output there is then dropped; write-only, so a reader that goes away later
/// is seen as EPIPE and never holds the process back) or a `file://` log. `None` when
/// containerd gave none.
async fn open_writer(path: &str) -> Result<Option<Output>, ProcessError> {
    let fail = |source| ProcessError::Fifo { path: path.to_owned(), source };
    if path.is_empty() {
        return Ok(None);
    }
    if let Some(file) = path.strip_prefix("file://") {
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(file).await.map_err(fail)?;
        return Ok(Some(Box::new(file)));
    }
    match pipe::OpenOptions::new().open_sender(path) {
        Ok(sender) => Ok(Some(Box::new(sender))),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            log::warn!("nobody reads {path}; the process's output there is dropped");
            Ok(None)
        }
        Err(source) => Err(fail(source)),
    }
}

/// Copies the stdin FIFO into `Stdin` frames until its writer closes it (then an empty frame,
/// EOF). At most one 64 KiB chunk is read ahead of the stream.
async fn feed_stdin(mut fifo: pipe::Receiver, tx: mpsc::UnboundedSender<Frame>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match fifo.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = tx.send(Frame::new(1, FrameKind::Stdin, Vec::new()));
                return;
            }
            Ok(n) => {
                if tx.send(Frame::new(1, FrameKind::Stdin, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

/// Relays output frames to the FIFOs until the exit; returns containerd's exit status (255
/// when the stream broke without one).
async fn relay(
    rd: &mut (impl AsyncRead + Unpin),
    mut decoder: Decoder,
    mut out: Option<Output>,
    mut err: Option<Output>,
) -> u32 {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("corrupt exec stream: {e}");
                    return 255;
                }
            };
            match frame.kind {
                FrameKind::Stdout => write_or_drop(&mut out, &frame.payload).await,
                FrameKind::Stderr => write_or_drop(&mut err, &frame.payload).await,
                FrameKind::Exit => {
                    return frame.parse::<ExitStatus>("exit").map_or(255, |s| u32::try_from(s.code).unwrap_or(255));
                }
                FrameKind::Error => {
                    let message = frame.parse::<AgentFailure>("error").map(|f| f.message).unwrap_or_default();
                    log::warn!("the process failed: {message}");
                    return 255;
                }
                _ => {}
            }
        }
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return 255,
            Ok(n) => decoder.push(&buf[..n]),
        }
    }
}

async fn write_or_drop(w: &mut Option<Output>, bytes: &[u8]) {
    if let Some(pipe) = w {
        if pipe.write_all(bytes).await.is_err() {
            // The reader went away (EPIPE): drop the rest rather than keep it.
            *w = None;
        }
    }
}
