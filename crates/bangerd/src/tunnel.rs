//! The daemon's end of an agent `connect` channel as a byte stream (`AsyncRead + AsyncWrite`),
//! so a TCP tunnel into the guest plugs into `tokio::io::copy_bidirectional` like a socket.
//!
//! Writes become `Data` frames, `shutdown` the empty `Data` (EOF). Reads take the guest's
//! `Data`; its empty `Data` is EOF, its `Error` an I/O error. Dropping the stream before both
//! directions have closed sends `Close`, so the agent drops the guest connection at once.
//!
//! Flow control (see `banger_proto::agent`): writes wait while `WINDOW` bytes are
//! unacknowledged, and reads grant the guest credit only for what the reader has taken
//! (`Channel::consumed`), so neither side buffers more than a window for a slow peer; a guest
//! that sends beyond its credit has the channel closed by `agent_conn` (a reset here). Both
//! halves poll the one channel, so a tunnel must be driven by a single task (as
//! `copy_bidirectional` does), not split across two.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use banger_proto::agent::{parse_ack, AgentFailure, FrameKind, MAX_PAYLOAD, WINDOW};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use banger_proto::agent::{AgentRequest, AgentResponse};

use crate::agent_conn::{AgentConn, AgentError, Channel};

/// How long the agent may take to open a tunnel (its own connect gives up after 5 s).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An open tunnel to a guest port.
pub struct Tunnel {
    channel: Channel,
    /// Received bytes not yet read; the front one from `front_pos`.
    incoming: VecDeque<Vec<u8>>,
    front_pos: usize,
    /// The guest's EOF has arrived.
    read_eof: bool,
    /// The guest's `Error`, not yet reported.
    failure: Option<String>,
    /// The channel ended badly (guest error, lost connection); the agent has forgotten it.
    broken: bool,
    /// The agent connection is gone.
    lost: bool,
    /// Bytes written and not yet acknowledged by the guest.
    in_flight: usize,
    /// Our EOF has been sent.
    write_closed: bool,
}

impl Tunnel {
    /// Opens a TCP tunnel through `conn` to `port` on the guest's loopback, as a byte stream:
    /// EOF and errors cross in both directions. A port nothing listens on gives
    /// [`AgentError::Failed`] with "connection refused on guest port N".
    pub async fn connect(conn: &AgentConn, port: u16) -> Result<Self, AgentError> {
        let mut channel = conn.open(&AgentRequest::Connect { port }).await?;
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, channel.response())
            .await
            .map_err(|_| AgentError::Timeout(CONNECT_TIMEOUT))??;
        match answer {
            AgentResponse::Connected { .. } => {
                channel.manual_credit();
                Ok(Self::new(channel))
            }
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    fn new(channel: Channel) -> Self {
        Self {
            channel,
            incoming: VecDeque::new(),
            front_pos: 0,
            read_eof: false,
            failure: None,
            broken: false,
            lost: false,
            in_flight: 0,
            write_closed: false,
        }
    }

    /// Takes every frame that has arrived. Leaves the task registered for the next one unless
    /// the connection is gone.
    fn drain(&mut self, cx: &mut Context<'_>) {
        while !self.lost {
            let frame = match self.channel.poll_recv(cx) {
                Poll::Pending => return,
                Poll::Ready(None) => {
                    self.lost = true;
                    self.broken = true;
                    return;
                }
                Poll::Ready(Some(frame)) => frame,
            };
            match frame.kind {
                FrameKind::Data if frame.payload.is_empty() => self.read_eof = true,
                FrameKind::Data => self.incoming.push_back(frame.payload),
                FrameKind::Ack => {
                    self.in_flight = self.in_flight.saturating_sub(parse_ack(&frame.payload).unwrap_or(0))
                }
                FrameKind::Error => {
                    self.broken = true;
                    let message = frame.parse::<AgentFailure>("error").map_or_else(|e| e.to_string(), |f| f.message);
                    self.failure = Some(message);
                }
                // Nothing else belongs on a tunnel channel.
                other => tracing::debug!(kind = ?other, "ignoring a frame on a tunnel"),
            }
        }
    }

    /// Copies buffered bytes into `buf`; grants the guest credit for them (in batches).
    fn take(&mut self, buf: &mut ReadBuf<'_>) {
        let mut taken = 0;
        while buf.remaining() > 0 {
            let Some(front) = self.incoming.front() else { break };
            let n = buf.remaining().min(front.len() - self.front_pos);
            buf.put_slice(&front[self.front_pos..self.front_pos + n]);
            self.front_pos += n;
            taken += n;
            if self.front_pos == front.len() {
                self.incoming.pop_front();
                self.front_pos = 0;
            }
        }
        if !self.broken {
            self.channel.consumed(taken);
        }
    }
}

fn lost() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the agent connection was lost (did the vm stop?)")
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.drain(cx);
        if !this.incoming.is_empty() {
            this.take(buf);
            return Poll::Ready(Ok(()));
        }
        if let Some(message) = this.failure.take() {
            this.read_eof = true;
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, message)));
        }
        if this.read_eof {
            return Poll::Ready(Ok(()));
        }
        if this.lost {
            return Poll::Ready(Err(lost()));
        }
        Poll::Pending
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.write_closed || self.broken {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the tunnel is closed for writing")));
        }
        // An empty `Data` would mean EOF.
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.drain(cx);
        if self.lost {
            return Poll::Ready(Err(lost()));
        }
        let room = WINDOW.saturating_sub(self.in_flight);
        if room == 0 {
            // `drain` left the task registered: the guest's next `Ack` wakes it.
            return Poll::Pending;
        }
        let n = buf.len().min(room).min(MAX_PAYLOAD);
        self.channel.send(FrameKind::Data, buf[..n].to_vec()).map_err(|_| lost())?;
        self.in_flight += n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed && !self.broken {
            self.write_closed = true;
            self.channel.send(FrameKind::Data, Vec::new()).map_err(|_| lost())?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let finished = self.read_eof && self.write_closed;
        if !(self.broken || finished) {
            let _ = self.channel.send(FrameKind::Close, Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use banger_proto::agent::{ack_payload, AgentRequest, AgentResponse, Frame, TUNNEL_WINDOW};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::UnixListener;
    use tokio::sync::mpsc;

    use crate::agent_conn::{AgentConn, AgentError, FrameReader};

    /// Ports of the fake agent's `connect`.
    const REFUSED: u16 = 1;
    const FAILS: u16 = 2;
    /// Counts the host's bytes and acknowledges them only 300 ms after a full window.
    const SLOW_ACKS: u16 = 3;
    /// Sends three windows, honouring the host's acks, then EOF.
    const BULK: u16 = 4;
    /// A hostile guest: ignores credit and sends maximal frames.
    const FLOOD: u16 = 5;

    struct Fake {
        closes: mpsc::UnboundedReceiver<u32>,
        received: Arc<AtomicUsize>,
        conn: AgentConn,
        _dir: tempfile::TempDir,
    }

    /// A fake agent. Any port but the ones above echoes `Data` upper-cased and answers the
    /// host's EOF with its own. `Close` frames are reported on `closes`.
    async fn fake_agent(listener: UnixListener, closes: mpsc::UnboundedSender<u32>, received: Arc<AtomicUsize>) {
        let Ok((stream, _)) = listener.accept().await else { return };
        let (mut rd, mut wr) = stream.into_split();
        let (out, mut outgoing) = mpsc::unbounded_channel::<Frame>();
        tokio::spawn(async move {
            while let Some(f) = outgoing.recv().await {
                if wr.write_all(&f.encode()).await.is_err() {
                    return;
                }
            }
        });
        let mut ports: HashMap<u32, u16> = HashMap::new();
        // BULK channels: bytes still to send, bytes in flight.
        let mut bulk: HashMap<u32, (usize, usize)> = HashMap::new();
        let send_bulk = |channel: u32, state: &mut (usize, usize)| {
            while state.0 > 0 && state.1 < TUNNEL_WINDOW {
                let n = state.0.min(64 * 1024);
                let _ = out.send(Frame::new(channel, FrameKind::Data, vec![b'x'; n]));
                state.0 -= n;
                state.1 += n;
            }
            if state.0 == 0 {
                let _ = out.send(Frame::new(channel, FrameKind::Data, Vec::new()));
            }
        };
        let mut frames = FrameReader::new(&mut rd);
        while let Some(f) = frames.next().await {
            let ch = f.channel;
            let fail = |m: &str| Frame::json(ch, FrameKind::Error, &AgentFailure { message: m.into() });
            let port = ports.get(&ch).copied();
            match (f.kind, f.parse::<AgentRequest>("request")) {
                (FrameKind::Request, Ok(AgentRequest::Connect { port: REFUSED })) => {
                    let _ = out.send(fail("connection refused on guest port 1"));
                }
                (FrameKind::Request, Ok(AgentRequest::Connect { port })) => {
                    ports.insert(ch, port);
                    let ok = AgentResponse::Connected { address: format!("127.0.0.1:{port}") };
                    let _ = out.send(Frame::json(ch, FrameKind::Response, &ok));
                    if port == FAILS {
                        let _ = out.send(Frame::new(ch, FrameKind::Data, b"partial".to_vec()));
                        let _ = out.send(fail("the connection to guest port 2 failed: connection reset by peer"));
                    }
                    if port == FLOOD {
                        for _ in 0..4 {
                            let _ = out.send(Frame::new(ch, FrameKind::Data, vec![b'f'; MAX_PAYLOAD]));
                        }
                    }
                    if port == BULK {
                        let state = bulk.entry(ch).or_insert((3 * TUNNEL_WINDOW, 0));
                        send_bulk(ch, state);
                    }
                }
                (FrameKind::Ack, _) => {
                    if let (Some(state), Some(n)) = (bulk.get_mut(&ch), parse_ack(&f.payload)) {
                        state.1 -= n;
                        send_bulk(ch, state);
                    }
                }
                (FrameKind::Data, _) if port == Some(SLOW_ACKS) => {
                    let before = received.fetch_add(f.payload.len(), Ordering::SeqCst);
                    let total = before + f.payload.len();
                    if total / TUNNEL_WINDOW > before / TUNNEL_WINDOW {
                        let out = out.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            let _ = out.send(Frame::new(ch, FrameKind::Ack, ack_payload(TUNNEL_WINDOW)));
                        });
                    }
                }
                (FrameKind::Data, _) => {
                    let _ = out.send(Frame::new(ch, FrameKind::Data, f.payload.to_ascii_uppercase()));
                }
                (FrameKind::Close, _) => {
                    let _ = closes.send(ch);
                }
                _ => {}
            }
        }
    }

    async fn setup() -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (tx, closes) = mpsc::unbounded_channel();
        let received = Arc::new(AtomicUsize::new(0));
        tokio::spawn(fake_agent(listener, tx, received.clone()));
        Fake { closes, received, conn: AgentConn::new(path), _dir: dir }
    }

    #[tokio::test]
    async fn a_tunnel_is_a_byte_stream_with_eof_both_ways() {
        let mut fake = setup().await;
        let mut t = Tunnel::connect(&fake.conn, 8000).await.expect("connect");
        t.write_all(b"hello ").await.expect("write");
        t.write_all(b"world").await.expect("write");
        t.shutdown().await.expect("eof");
        assert!(t.write_all(b"more").await.is_err(), "no writes after shutdown");
        let mut back = String::new();
        t.read_to_string(&mut back).await.expect("read to the guest's eof");
        assert_eq!(back, "HELLO WORLD");
        drop(t);
        let close = tokio::time::timeout(Duration::from_millis(200), fake.closes.recv()).await;
        assert!(close.is_err(), "a tunnel closed both ways sends no Close: {close:?}");
    }

    #[tokio::test]
    async fn refusals_and_failures_arrive_as_errors_and_drops_send_close() {
        let mut fake = setup().await;
        let err = Tunnel::connect(&fake.conn, REFUSED).await.err().expect("refused");
        assert!(matches!(&err, AgentError::Failed(m) if m == "connection refused on guest port 1"), "{err}");

        let mut t = Tunnel::connect(&fake.conn, FAILS).await.expect("connect");
        let mut buf = [0u8; 7];
        t.read_exact(&mut buf).await.expect("the bytes before the failure");
        assert_eq!(&buf, b"partial");
        let err = t.read(&mut buf).await.expect_err("the failure");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("connection reset by peer"), "{err}");
        assert!(t.write_all(b"x").await.is_err(), "a failed tunnel takes no more bytes");
        drop(t);

        let t = Tunnel::connect(&fake.conn, 8000).await.expect("connect");
        drop(t);
        let closed = tokio::time::timeout(Duration::from_secs(5), fake.closes.recv()).await.expect("a Close frame");
        assert!(closed.is_some());
        assert!(fake.closes.try_recv().is_err(), "the failed tunnel sent no Close");
    }

    #[tokio::test]
    async fn writes_wait_for_the_guests_acks() {
        let fake = setup().await;
        let mut t = Tunnel::connect(&fake.conn, SLOW_ACKS).await.expect("connect");
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            t.write_all(&vec![7u8; 2 * TUNNEL_WINDOW]).await.expect("write");
            t
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(fake.received.load(Ordering::SeqCst), TUNNEL_WINDOW, "one window, then a wait");
        let _t = writer.await.expect("join");
        assert!(start.elapsed() >= Duration::from_millis(300), "the second window waited for the ack");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(fake.received.load(Ordering::SeqCst), 2 * TUNNEL_WINDOW);
    }

    #[tokio::test]
    async fn reads_acknowledge_so_a_windowed_sender_gets_everything_across() {
        let fake = setup().await;
        let mut t = Tunnel::connect(&fake.conn, BULK).await.expect("connect");
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut got)).await;
        read.expect("the sender was never stuck waiting for acks").expect("read");
        assert_eq!(got.len(), 3 * TUNNEL_WINDOW);
    }

    #[tokio::test]
    async fn a_guest_that_ignores_credit_gets_its_tunnel_closed() {
        let mut fake = setup().await;
        let mut flood = Tunnel::connect(&fake.conn, FLOOD).await.expect("connect");
        let mut got = Vec::new();
        let err = flood.read_to_end(&mut got).await.expect_err("the channel is closed");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("ignores flow control"), "{err}");
        assert!(got.is_empty(), "a frame over the window is not delivered");
        let closed = tokio::time::timeout(Duration::from_secs(5), fake.closes.recv()).await.expect("a Close frame");
        assert!(closed.is_some(), "the agent is told to stop");
        drop(flood);
        assert_eq!(fake.conn.buffered(), 0, "nothing stays held for the closed channel");
        // The connection and its other channels go on.
        let mut t = Tunnel::connect(&fake.conn, 8000).await.expect("connect after");
        t.write_all(b"still here").await.expect("write");
        t.shutdown().await.expect("eof");
        let mut echo = Vec::new();
        t.read_to_end(&mut echo).await.expect("read");
        assert_eq!(echo, b"STILL HERE");
    }
}
