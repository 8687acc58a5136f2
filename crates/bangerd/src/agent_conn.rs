//! The daemon's connection to one VM's agent: a single byte stream (the VMM's agent socket)
//! multiplexed into channels, one per request (see `banger_proto::agent`). A reader task routes
//! incoming frames to their channel; a writer task serialises outgoing ones. When the stream
//! drops, every open channel ends and the next request reconnects (channel ids start again at
//! 1, which is how the agent tells a new connection from an old one).
//!
//! The guest is hostile, so what the reader holds for a channel is bounded (see the protocol's
//! flow control): streamed bytes (`Stdout`, `Stderr`, `Data`) only within the credit the
//! channel granted ([`WINDOW`], reopened by `Ack`s as the channel's consumer takes them),
//! control frames up to [`MAX_PAYLOAD`] per channel, and everything a VM's channels hold
//! together up to [`VM_BUFFER_CAP`]. A frame beyond any of these, or longer than
//! [`MAX_PAYLOAD`], closes its channel: the consumer gets an `Error` naming the breach, the
//! agent a `Close`, the log a warning; other channels go on.
//!
//! The stream is a plain unix socket under QEMU (its virtio-serial chardev). Under Firecracker
//! it is the hybrid vsock socket: after connecting, the daemon sends `CONNECT <port>\n` and
//! waits for `OK <host port>\n` before any frame (Firecracker drops bytes sent earlier, and
//! closes the connection when nothing listens on the guest port yet).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use banger_proto::agent::{
    ack_payload, AgentFailure, AgentRequest, AgentResponse, Decoder, Frame, FrameError, FrameKind, ACK_EVERY,
    MAX_PAYLOAD, WINDOW,
};
use banger_vmm::AgentEndpoint;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Bytes one VM's channels may hold in the daemon together (streamed bytes not yet
/// acknowledged, control frames not yet taken): 64 channels at a full window.
pub const VM_BUFFER_CAP: usize = 64 * WINDOW;

/// How long the VMM may take to answer a hybrid vsock `CONNECT`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest `OK <port>` line accepted.
const HANDSHAKE_MAX_LINE: usize = 64;

/// How long one readiness ping waits for its pong.
const PING_TRY: Duration = Duration::from_millis(700);
/// How long one try of a request sent as a readiness probe waits for its answer.
const WORK_TRY: Duration = Duration::from_secs(10);

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent socket could not be reached.
    #[error("cannot connect to the agent socket {path}")]
    Connect {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hybrid vsock handshake failed.
    #[error("the vsock handshake on {path} failed: {why}")]
    Handshake {
        /// The socket.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The stream dropped while a request was open.
    #[error("the agent connection was lost")]
    Lost,
    /// The agent answered with an error.
    #[error("the agent says: {0}")]
    Failed(String),
    /// The agent answered something unexpected.
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// What the daemon holds for a VM's channels at most (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Streamed bytes a channel may have unacknowledged: the protocol's [`WINDOW`].
    pub window: usize,
    /// Bytes of control frames a channel may have queued.
    pub control: usize,
    /// Bytes all channels of the VM may hold together.
    pub vm_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { window: WINDOW, control: MAX_PAYLOAD, vm_buffer: VM_BUFFER_CAP }
    }
}

/// How a guest broke a channel's bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Breach {
    /// More streamed bytes than the channel's credit.
    #[error("the guest sent {sent} bytes of output with {credit} bytes of credit left (it ignores flow control)")]
    Credit {
        /// The frame's payload.
        sent: usize,
        /// Credit that was left.
        credit: usize,
    },
    /// Too many control frames nobody has taken yet.
    #[error("the guest queued more than {limit} bytes of control frames")]
    Control {
        /// The limit.
        limit: usize,
    },
    /// The VM's channels together hold the cap.
    #[error("the vm's channels hold {held} bytes, and {sent} more would pass the cap of {cap}")]
    VmCap {
        /// Held now.
        held: usize,
        /// The frame's payload.
        sent: usize,
        /// The cap.
        cap: usize,
    },
    /// A frame over the size limit.
    #[error("the guest sent a frame of {len} bytes, over the limit of {max}", max = MAX_PAYLOAD + 5)]
    Oversize {
        /// Its length field.
        len: u32,
    },
}

/// One channel's accounting, shared by the reader and the [`Channel`].
#[derive(Debug, Default)]
struct Flow {
    /// Streamed bytes received and not yet acknowledged.
    in_flight: AtomicUsize,
    /// Control bytes queued and not yet taken.
    control: AtomicUsize,
    /// Everything this channel counts in the VM's total.
    held: AtomicUsize,
}

struct Slot {
    tx: mpsc::UnboundedSender<Frame>,
    flow: Arc<Flow>,
}

/// One connection's channels: routes, the VM's total and the next channel id.
struct Mux {
    routes: Mutex<HashMap<u32, Slot>>,
    held: AtomicUsize,
    next: AtomicU32,
    limits: Limits,
    /// The socket, for logs.
    label: String,
}

impl Mux {
    fn routes(&self) -> MutexGuard<'_, HashMap<u32, Slot>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` bytes of `flow` are no longer held.
    fn release(&self, flow: &Flow, n: usize) {
        let n = sub(&flow.held, n);
        sub(&self.held, n);
    }

    /// Routes one frame from the guest; a breach closes its channel (returned, so the caller
    /// can tell the agent).
    fn deliver(&self, frame: Frame) -> Option<(u32, Breach)> {
        let routes = self.routes();
        let slot = routes.get(&frame.channel)?;
        let len = frame.payload.len();
        let flow = &slot.flow;
        let limits = &self.limits;
        let breach = if frame.kind.is_credited() {
            let in_flight = flow.in_flight.load(Ordering::SeqCst);
            (in_flight + len > limits.window)
                .then(|| Breach::Credit { sent: len, credit: limits.window.saturating_sub(in_flight) })
        } else {
            (flow.control.load(Ordering::SeqCst) + len > limits.control)
                .then_some(Breach::Control { limit: limits.control })
        };
        let held = self.held.load(Ordering::SeqCst);
        let breach = breach.or_else(|| {
            (held + len > limits.vm_buffer).then_some(Breach::VmCap { held, sent: len, cap: limits.vm_buffer })
        });
        if let Some(breach) = breach {
            let channel = frame.channel;
            drop(routes);
            self.close(channel, &breach);
            return Some((channel, breach));
        }
        if frame.kind.is_credited() {
            flow.in_flight.fetch_add(len, Ordering::SeqCst);
        } else {
            flow.control.fetch_add(len, Ordering::SeqCst);
        }
        flow.held.fetch_add(len, Ordering::SeqCst);
        self.held.fetch_add(len, Ordering::SeqCst);
        if slot.tx.send(frame).is_err() {
            // The channel is being dropped; its drop releases what it held.
        }
        None
    }

    /// Ends `channel` for breaking its bounds: its consumer gets an `Error` saying so.
    fn close(&self, channel: u32, breach: &Breach) {
        let Some(slot) = self.routes().remove(&channel) else { return };
        tracing::warn!(agent = %self.label, channel, error = %breach, "closing an agent channel that broke its bounds");
        let message = format!("{breach}; banger closed the channel");
        let _ = slot.tx.send(Frame::json(channel, FrameKind::Error, &AgentFailure { message }));
    }
}

/// `counter -= n`, never below zero; returns what was taken.
fn sub(counter: &AtomicUsize, n: usize) -> usize {
    let before = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_sub(n)));
    before.map_or(0, |v| v.min(n))
}

struct Live {
    writer: mpsc::UnboundedSender<Frame>,
    mux: Arc<Mux>,
    dead: Arc<AtomicBool>,
}

impl Live {
    fn is_open(&self) -> bool {
        !self.dead.load(Ordering::SeqCst) && !self.writer.is_closed()
    }
}

/// One VM's agent connection.
pub struct AgentConn {
    endpoint: AgentEndpoint,
    live: tokio::sync::Mutex<Option<Live>>,
    limits: Limits,
    /// The current connection's channels (a leaf lock: never held across an await).
    current: Mutex<Option<Arc<Mux>>>,
}

/// One open request.
///
/// Streamed frames (`Stdout`, `Stderr`, `Data`) taken with [`Channel::recv`] count as consumed
/// as they are taken, which grants the guest credit for as much again. A consumer that hands
/// the bytes on to a slower client calls [`Channel::manual_credit`] first and then
/// [`Channel::consumed`] as its client takes them, so credit follows the client.
pub struct Channel {
    id: u32,
    rx: mpsc::UnboundedReceiver<Frame>,
    writer: mpsc::UnboundedSender<Frame>,
    mux: Arc<Mux>,
    flow: Arc<Flow>,
    manual: bool,
    /// Consumed and not yet acknowledged.
    unacked: usize,
}

impl Channel {
    /// Sends a frame on this channel.
    pub fn send(&self, kind: FrameKind, payload: Vec<u8>) -> Result<(), AgentError> {
        self.writer.send(Frame::new(self.id, kind, payload)).map_err(|_| AgentError::Lost)
    }

    /// The channel's id on its connection.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next frame for this channel, or `None` when the connection dropped.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.took(&frame);
        Some(frame)
    }

    /// [`Channel::recv`] for hand-written futures and streams.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Frame>> {
        let polled = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(Some(frame)) = &polled {
            self.took(frame);
        }
        polled
    }

    /// From now on streamed bytes count as consumed only when [`Channel::consumed`] says so.
    pub fn manual_credit(&mut self) {
        self.manual = true;
    }

    /// The consumer's client has taken `n` streamed bytes: grant the guest as much again (in
    /// steps of [`ACK_EVERY`]).
    pub fn consumed(&mut self, n: usize) {
        self.unacked += n;
        if self.unacked >= ACK_EVERY {
            let n = std::mem::take(&mut self.unacked);
            // Released before the `Ack` leaves: the guest cannot send into the new credit
            // before the reader knows of it.
            sub(&self.flow.in_flight, n);
            self.mux.release(&self.flow, n);
            let _ = self.send(FrameKind::Ack, ack_payload(n));
        }
    }

    fn took(&mut self, frame: &Frame) {
        let len = frame.payload.len();
        if frame.kind.is_credited() {
            if !self.manual {
                self.consumed(len);
            }
        } else {
            let len = sub(&self.flow.control, len);
            self.mux.release(&self.flow, len);
        }
    }

    /// Waits for the channel's final JSON response.
    pub async fn response(&mut self) -> Result<AgentResponse, AgentError> {
        loop {
            let frame = self.recv().await.ok_or(AgentError::Lost)?;
            match frame.kind {
                FrameKind::Response => {
                    return frame.parse("response").map_err(|e| AgentError::Unexpected(e.to_string()));
                }
                FrameKind::Error => {
                    let f: AgentFailure = frame.parse("error").map_err(|e| AgentError::Unexpected(e.to_string()))?;
                    return Err(AgentError::Failed(f.message));
                }
                // Streams (file data, output) belong to callers that read frames themselves.
                _ => continue,
            }
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // Once the route is gone the reader adds nothing more: what is left is released.
        self.mux.routes().remove(&self.id);
        let held = self.flow.held.swap(0, Ordering::SeqCst);
        sub(&self.mux.held, held);
    }
}

/// Sends `CONNECT <port>\n` on a fresh hybrid vsock connection and reads the answer a byte at
/// a time (so no agent byte is consumed), until `OK <host port>\n`.
async fn hybrid_handshake(stream: &mut UnixStream, path: &Path, port: u32) -> Result<(), AgentError> {
    let failed = |why: String| AgentError::Handshake { path: path.display().to_string(), why };
    let exchange = async {
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(|e| failed(e.to_string()))?;
        let mut line = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(0) => {
                    return Err(failed(format!(
                        "the vmm closed the connection (is the agent listening on vsock port {port} yet?)"
                    )))
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() < HANDSHAKE_MAX_LINE => line.push(byte[0]),
                Ok(_) => return Err(failed("the answer is not an `OK <port>` line".into())),
                Err(e) => return Err(failed(e.to_string())),
            }
        }
        let line = String::from_utf8_lossy(&line);
        match line.trim_end_matches('\r').strip_prefix("OK ") {
            Some(host_port) if host_port.trim().parse::<u32>().is_ok() => Ok(()),
            _ => Err(failed(format!("expected `OK <port>`, got {line:?}"))),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| failed(format!("no answer to CONNECT within {HANDSHAKE_TIMEOUT:?}")))?
}

impl AgentConn {
    /// A connection to an agent whose stream is the unix socket `socket`.
    #[cfg(test)]
    pub fn new(socket: std::path::PathBuf) -> Self {
        Self::with_endpoint(AgentEndpoint::Unix(socket))
    }

    /// A connection to the agent at `endpoint` (as the VM's driver reports it).
    pub fn with_endpoint(endpoint: AgentEndpoint) -> Self {
        Self::with_limits(endpoint, Limits::default())
    }

    /// A connection that holds at most `limits` for its channels.
    pub fn with_limits(endpoint: AgentEndpoint, limits: Limits) -> Self {
        Self { endpoint, live: tokio::sync::Mutex::new(None), limits, current: Mutex::new(None) }
    }

    /// Bytes the current connection's channels hold in the daemon (0 without one).
    pub fn buffered(&self) -> usize {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().map_or(0, |mux| mux.held.load(Ordering::SeqCst))
    }

    async fn open_stream(&self) -> Result<UnixStream, AgentError> {
        let (path, port) = match &self.endpoint {
            AgentEndpoint::Unix(path) => (path, None),
            AgentEndpoint::HybridVsock { path, port } => (path, Some(*port)),
        };
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|source| AgentError::Connect { path: path.display().to_string(), source })?;
        if let Some(port) = port {
            hybrid_handshake(&mut stream, path, port).await?;
        }
        Ok(stream)
    }

    async fn connect(&self) -> Result<Live, AgentError> {
        let stream = self.open_stream().await?;
        let (mut rd, mut wr) = stream.into_split();
        let label = match &self.endpoint {
            AgentEndpoint::Unix(path) | AgentEndpoint::HybridVsock { path, .. } => path.display().to_string(),
        };
        let mux = Arc::new(Mux {
            routes: Mutex::default(),
            held: AtomicUsize::new(0),
            next: AtomicU32::new(1),
            limits: self.limits,
            label,
        });
        let (writer, mut outgoing) = mpsc::unbounded_channel::<Frame>();
        tokio::spawn(async move {
            while let Some(frame) = outgoing.recv().await {
                if wr.write_all(&frame.encode()).await.is_err() {
                    break;
                }
            }
        });
        let reader_mux = Arc::clone(&mux);
        let reader_writer = writer.clone();
        let dead = Arc::new(AtomicBool::new(false));
        let reader_dead = dead.clone();
        tokio::spawn(async move {
            let mut decoder = Decoder::default();
            let mut buf = vec![0u8; 64 * 1024];
            'read: loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                loop {
                    let closed = match decoder.next_frame() {
                        Ok(Some(frame)) => reader_mux.deliver(frame),
                        Ok(None) => break,
                        Err(FrameError::Oversize { channel, len }) => {
                            let breach = Breach::Oversize { len };
                            reader_mux.close(channel, &breach);
                            Some((channel, breach))
                        }
                        Err(e) => {
                            tracing::warn!(agent = %reader_mux.label, error = %e, "agent stream is corrupt; dropping the connection");
                            break 'read;
                        }
                    };
                    if let Some((channel, _)) = closed {
                        // Tell the agent to stop: it ends the channel's stream (an exec's command).
                        let _ = reader_writer.send(Frame::new(channel, FrameKind::Close, Vec::new()));
                    }
                }
            }
            // Ending every route tells each open channel that the connection is gone; the flag
            // makes the next request reconnect.
            reader_dead.store(true, Ordering::SeqCst);
            reader_mux.routes().clear();
        });
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&mux));
        Ok(Live { writer, mux, dead })
    }

    /// Opens a channel with `request`, connecting first when needed.
    pub async fn open(&self, request: &AgentRequest) -> Result<Channel, AgentError> {
        let (writer, mux) = {
            let mut live = self.live.lock().await;
            if !live.as_ref().is_some_and(Live::is_open) {
                *live = Some(self.connect().await?);
            }
            let l = live.as_ref().ok_or(AgentError::Lost)?;
            (l.writer.clone(), Arc::clone(&l.mux))
        };
        // Ids count per connection: a reconnect starts again at 1.
        let id = mux.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow::default());
        mux.routes().insert(id, Slot { tx, flow: Arc::clone(&flow) });
        let channel = Channel { id, rx, writer, mux, flow, manual: false, unacked: 0 };
        channel.send(FrameKind::Request, serde_json::to_vec(request).unwrap_or_default())?;
        Ok(channel)
    }

    /// Forgets the current connection (e.g. after the VMM stopped).
    pub async fn reset(&self) {
        *self.live.lock().await = None;
    }

    /// One request with a single JSON answer.
    pub async fn call(&self, request: &AgentRequest, timeout: Duration) -> Result<AgentResponse, AgentError> {
        let mut channel = self.open(request).await?;
        tokio::time::timeout(timeout, channel.response()).await.map_err(|_| AgentError::Timeout(timeout))?
    }

    /// Sends `request` until the agent answers it (`Pong` to a ping, `Ok` otherwise) or
    /// `timeout` passes; `gave_up` is asked between tries (e.g. "has the VMM died?") and ends
    /// the wait early with its reason. A ping is the readiness check; another request makes
    /// readiness and that request one round trip (a restored fork's new identity). An error
    /// the agent reports ends the wait at once. The request must be safe to apply twice: an
    /// answer lost to a dropped connection means it is sent again.
    pub async fn wait_answer(
        &self,
        request: &AgentRequest,
        timeout: Duration,
        mut gave_up: impl FnMut() -> Option<String>,
    ) -> Result<AgentResponse, String> {
        let deadline = Instant::now() + timeout;
        // A ping is answered at once by a listening agent; real work may take a while on a
        // loaded host, and must not be cut short into a loop of retries.
        let per_try = if matches!(request, AgentRequest::Ping) { PING_TRY } else { timeout.min(WORK_TRY) };
        loop {
            if let Some(reason) = gave_up() {
                return Err(reason);
            }
            let last = match self.call(request, per_try).await {
                Ok(answer @ (AgentResponse::Pong { .. } | AgentResponse::Ok)) => return Ok(answer),
                Err(AgentError::Failed(why)) => return Err(format!("the agent says: {why}")),
                Ok(other) => format!("unexpected answer {other:?}"),
                Err(e) => {
                    tracing::debug!(error = %e, "the agent did not answer yet");
                    if !matches!(e, AgentError::Timeout(_)) {
                        self.reset().await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    e.to_string()
                }
            };
            if Instant::now() > deadline {
                return Err(format!("the guest agent did not become ready within {} s ({last})", timeout.as_secs()));
            }
        }
    }
}

#[cfg(test)]
#[path = "agent_conn_tests.rs"]
mod hostile_tests;

/// The frames a fake agent reads from the daemon, for tests.
#[cfg(test)]
pub(crate) struct FrameReader<R> {
    rd: R,
    decoder: Decoder,
    buf: Vec<u8>,
}

#[cfg(test)]
impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(rd: R) -> Self {
        Self { rd, decoder: Decoder::default(), buf: vec![0u8; 64 * 1024] }
    }

    /// The next frame; `None` at EOF or on a bad stream.
    pub(crate) async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.decoder.next_frame().ok()? {
                return Some(frame);
            }
            match self.rd.read(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.push(&self.buf[..n]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::agent::ExitStatus;
    use tokio::net::UnixListener;

    /// A fake agent that answers pings and echoes exec stdin to stdout.
    async fn fake_agent(listener: UnixListener, accept: usize) {
        for _ in 0..accept {
            let Ok((stream, _)) = listener.accept().await else { return };
            fake_agent_stream(stream).await;
        }
    }

    /// Serves one fake agent connection.
    async fn fake_agent_stream(stream: UnixStream) {
        {
            let (mut rd, mut wr) = stream.into_split();
            let mut d = Decoder::default();
            let mut buf = vec![0u8; 4096];
            'conn: while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                d.push(&buf[..n]);
                while let Ok(Some(f)) = d.next_frame() {
                    let reply = match f.kind {
                        FrameKind::Request => match f.parse::<AgentRequest>("req") {
                            Ok(AgentRequest::Ping) => Some(Frame::json(
                                f.channel,
                                FrameKind::Response,
                                &AgentResponse::Pong { version: "t".into(), uptime_ms: 1, kernel: "k".into() },
                            )),
                            Ok(AgentRequest::Shutdown) => break 'conn,
                            _ => Some(Frame::json(f.channel, FrameKind::Response, &AgentResponse::Started { pid: 1 })),
                        },
                        FrameKind::Stdin if f.payload.is_empty() => {
                            Some(Frame::json(f.channel, FrameKind::Exit, &ExitStatus { code: 3, signal: None }))
                        }
                        FrameKind::Stdin => Some(Frame::new(f.channel, FrameKind::Stdout, f.payload.clone())),
                        _ => None,
                    };
                    if let Some(r) = reply {
                        if wr.write_all(&r.encode()).await.is_err() {
                            break 'conn;
                        }
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn channels_multiplex_and_reconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(fake_agent(listener, 2));
        let conn = AgentConn::new(path);
        let pong = conn.wait_answer(&AgentRequest::Ping, Duration::from_secs(5), || None).await.expect("ready");
        assert!(matches!(pong, AgentResponse::Pong { .. }));

        let exec = AgentRequest::Exec(Default::default());
        let mut a = conn.open(&exec).await.expect("a");
        let mut b = conn.open(&exec).await.expect("b");
        assert!(matches!(a.response().await, Ok(AgentResponse::Started { .. })));
        assert!(matches!(b.response().await, Ok(AgentResponse::Started { .. })));
        b.send(FrameKind::Stdin, b"bee".to_vec()).expect("b stdin");
        a.send(FrameKind::Stdin, b"ay".to_vec()).expect("a stdin");
        assert_eq!(a.recv().await.map(|f| f.payload), Some(b"ay".to_vec()));
        assert_eq!(b.recv().await.map(|f| f.payload), Some(b"bee".to_vec()));
        a.send(FrameKind::Stdin, Vec::new()).expect("eof");
        let exit: ExitStatus = a.recv().await.expect("exit").parse("exit").expect("json");
        assert_eq!(exit.code, 3);

        // The fake drops the stream on shutdown: open channels end, the next call reconnects.
        let _ = conn.open(&AgentRequest::Shutdown).await.expect("shutdown");
        assert!(b.recv().await.is_none(), "open channels end when the stream drops");
        // Channel ids start again at 1 on the new connection (how the agent tells a new host
        // connection from the old one).
        let mut first = conn.open(&AgentRequest::Ping).await.expect("reconnect");
        assert_eq!(first.id(), 1, "ids restart on a reconnect");
        let again = first.response().await;
        assert!(matches!(again, Ok(AgentResponse::Pong { .. })), "{again:?}");
        assert_eq!(conn.open(&AgentRequest::Ping).await.expect("second").id(), 2);
    }

    /// A fake Firecracker hybrid vsock socket: answers `CONNECT 1024` with `OK <n>` and then
    /// hands the stream to the fake agent; any other port gets the connection closed.
    async fn fake_hybrid(listener: UnixListener, accepts: usize) {
        for _ in 0..accepts {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(fake_hybrid_connection(stream));
        }
    }

    async fn fake_hybrid_connection(mut stream: UnixStream) {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).await.is_ok_and(|n| n == 1) && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        if line == b"CONNECT 1024" && stream.write_all(b"OK 1073741824\n").await.is_ok() {
            fake_agent_stream(stream).await;
        }
    }

    #[tokio::test]
    async fn hybrid_vsock_handshake_then_frames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(fake_hybrid(listener, 3));
        let conn = AgentConn::with_endpoint(AgentEndpoint::HybridVsock { path: path.clone(), port: 1024 });
        let pong = conn.call(&AgentRequest::Ping, Duration::from_secs(5)).await;
        assert!(matches!(pong, Ok(AgentResponse::Pong { .. })), "{pong:?}");

        // A port nothing answers on: the VMM closes the connection, and the error says so.
        let wrong = AgentConn::with_endpoint(AgentEndpoint::HybridVsock { path, port: 7 });
        let error = wrong.call(&AgentRequest::Ping, Duration::from_secs(5)).await.err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains("vsock handshake") && e.contains("vsock port 7")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn hybrid_vsock_refuses_a_bad_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"NOPE\n").await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let conn = AgentConn::with_endpoint(AgentEndpoint::HybridVsock { path, port: 1024 });
        let error = conn.open(&AgentRequest::Ping).await.err().map(|e| e.to_string());
        assert!(error.as_deref().is_some_and(|e| e.contains("expected `OK <port>`, got \"NOPE\"")), "{error:?}");
    }

    #[tokio::test]
    async fn wait_ready_reports_why_it_gave_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = AgentConn::new(dir.path().join("missing.sock"));
        let err =
            conn.wait_answer(&AgentRequest::Ping, Duration::from_millis(300), || None).await.expect_err("no agent");
        assert!(err.contains("did not become ready") && err.contains("cannot connect"), "{err}");
        let err = conn
            .wait_answer(&AgentRequest::Ping, Duration::from_secs(5), || Some("the vmm exited".into()))
            .await
            .expect_err("gave up");
        assert_eq!(err, "the vmm exited");
    }
}
