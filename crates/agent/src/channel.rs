//! The multiplexed agent channel's primitives: the one [`Writer`] of a host connection, a
//! channel's [`Link`] back to the host, and the [`Route`]s that steer a channel's later frames
//! (stdin, signals, data, acks, close) to the handler serving it.
//!
//! Handlers (exec, files, ports, sessions, tunnels, the workspace import, ...) use this module
//! only; `serve.rs` reads frames and dispatches requests to them. A route names its handler's
//! state through the small traits here ([`Process`], [`Attachment`]), so this module knows no
//! handler.
//!
//! Flow control lives here too: every channel has a [`Credit`] (the host's window, opened by
//! its `Ack`s), and [`Link::send`] of streamed bytes (`Stdout`, `Stderr`, `Data`) waits for it,
//! so a handler that streams blocks — and stops reading its pipe, socket or file — while the
//! host's client is not consuming.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use banger_proto::agent::{
    parse_ack, AgentFailure, Frame, FrameKind, SignalRequest, TtySize, MAX_PAYLOAD, STREAM_CHUNK, WINDOW,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

/// A frame could not be sent: the host it was for has gone.
#[derive(Debug, thiserror::Error)]
#[error("the host connection has gone")]
pub struct Gone;

/// The one writer: the current connection's fd and its generation.
#[derive(Debug, Default)]
pub struct Writer {
    generation: AtomicU64,
    conn: Mutex<Option<Arc<OwnedFd>>>,
}

impl Writer {
    /// Makes `fd` the current connection; returns its generation.
    pub fn attach(&self, fd: Arc<OwnedFd>) -> u64 {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        *conn = Some(fd);
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Forgets the current connection: frames of its generation are dropped from now on.
    pub fn detach(&self) {
        // Bump first: a writer waiting for POLLOUT notices and lets go of the lock.
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        *conn = None;
    }

    fn write(&self, generation: u64, bytes: &[u8]) -> Result<(), Gone> {
        let conn = self.conn.lock().map_err(|_| Gone)?;
        let fd = match conn.as_ref() {
            Some(fd) if self.generation.load(Ordering::SeqCst) == generation => fd,
            _ => return Err(Gone),
        };
        let mut done = 0;
        while done < bytes.len() {
            match nix::unistd::write(fd.as_fd(), &bytes[done..]) {
                Ok(n) => done += n,
                Err(Errno::EAGAIN) => {
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(50u8));
                    let broken = PollFlags::POLLHUP | PollFlags::POLLERR;
                    if fds[0].revents().is_some_and(|r| r.intersects(broken)) {
                        // No host on the port: writes block until one comes, or this
                        // connection is replaced.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if self.generation.load(Ordering::SeqCst) != generation {
                        return Err(Gone);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(_) => return Err(Gone),
            }
        }
        Ok(())
    }
}

/// A running process the host steers through its channel (an exec).
pub trait Process: Send + Sync + fmt::Debug {
    /// A `Signal` frame.
    fn signal(&self, signal: Signal);
    /// The host connection ended: the process must not outlive it.
    fn kill(&self);
    /// A `Resize` frame (a checked size); nothing for a process without a terminal.
    fn resize(&self, size: TtySize);
}

/// The host's end of an attach or a followed log (a session).
pub trait Attachment: Send + Sync + fmt::Debug {
    /// A `Stdin` frame.
    fn stdin(&self, bytes: Vec<u8>);
    /// A `Signal` frame.
    fn signal(&self, signal: Signal);
    /// A `Resize` frame (a checked size); only the stdin holder of a `tty` session may resize.
    fn resize(&self, size: TtySize);
    /// A `Close` frame, or the host connection ended.
    fn close(&self);
}

/// A channel's guest → host window: streamed bytes sent and not yet acknowledged by the host.
#[derive(Debug, Default)]
pub struct Credit {
    state: Mutex<CreditState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct CreditState {
    in_flight: usize,
    closed: bool,
}

impl Credit {
    /// Waits until `n` (at most [`STREAM_CHUNK`]) more bytes fit in the window and takes
    /// them. Once closed (the channel or its connection ended) it no longer waits: it takes
    /// what still fits (output already on its way before a detach still goes) and otherwise
    /// says false.
    pub fn acquire(&self, n: usize) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.closed && state.in_flight + n > WINDOW {
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        if state.in_flight + n > WINDOW {
            return false;
        }
        state.in_flight += n;
        true
    }

    /// The host has consumed `n` bytes.
    pub fn release(&self, n: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.in_flight = state.in_flight.saturating_sub(n);
        self.changed.notify_all();
    }

    /// Wakes a waiting sender for good: nobody will grant credit any more.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.changed.notify_all();
    }
}

/// A connection's channel credits, by channel id.
pub type Credits = Arc<Mutex<HashMap<u32, Arc<Credit>>>>;

/// What the reader does with later frames on a channel.
#[derive(Debug)]
pub enum Route {
    /// A running exec: its control and stdin (when asked for).
    Exec {
        /// Signals and kill.
        control: Arc<dyn Process>,
        /// Host stdin chunks.
        stdin: Option<mpsc::Sender<Vec<u8>>>,
    },
    /// A `write_file` or `unpack` receiving `Data` (dropping the sender abandons it).
    Upload(mpsc::Sender<Vec<u8>>),
    /// A `connect` tunnel: its `Data` (dropping the sender closes its socket).
    Tunnel(mpsc::Sender<Vec<u8>>),
    /// A session attach or followed log: stdin, signals and `Close` (detach) go to it.
    Session(Arc<dyn Attachment>),
}

/// A connection's routes, by channel id.
pub type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// A connection's routes and credits.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Where later frames go.
    pub routes: Routes,
    /// Each open channel's window.
    pub credits: Credits,
}

/// One channel's way back to the host.
#[derive(Debug, Clone)]
pub struct Link {
    writer: Arc<Writer>,
    generation: u64,
    channel: u32,
    table: Table,
    credit: Arc<Credit>,
}

impl Link {
    /// The link of `channel` on the connection of `generation`, for a frame other than a
    /// `Request` (its channel's credit, if it is open).
    pub fn new(writer: Arc<Writer>, generation: u64, channel: u32, table: Table) -> Self {
        let credit = table.credits.lock().unwrap_or_else(PoisonError::into_inner).get(&channel).cloned();
        let credit = credit.unwrap_or_else(|| {
            // Not an open channel: nothing may stream on it.
            let closed = Credit::default();
            closed.close();
            Arc::new(closed)
        });
        Self { writer, generation, channel, table, credit }
    }

    /// The link of a channel a `Request` opens: a fresh window of credit.
    pub fn open(writer: Arc<Writer>, generation: u64, channel: u32, table: Table) -> Self {
        let credit = Arc::new(Credit::default());
        let old = table.credits.lock().unwrap_or_else(PoisonError::into_inner).insert(channel, Arc::clone(&credit));
        if let Some(old) = old {
            old.close();
        }
        Self { writer, generation, channel, table, credit }
    }

    /// Sends raw bytes. Streamed kinds (`Stdout`, `Stderr`, `Data`) go in frames of at most
    /// [`STREAM_CHUNK`], each waiting for the host's credit; others in frames of at most
    /// `MAX_PAYLOAD`. `Gone` when the host went away or closed the channel.
    pub fn send(&self, kind: FrameKind, payload: Vec<u8>) -> Result<(), Gone> {
        if kind.is_credited() {
            if payload.is_empty() {
                return self.writer.write(self.generation, &Frame::new(self.channel, kind, payload).encode());
            }
            for piece in payload.chunks(STREAM_CHUNK) {
                if !self.credit.acquire(piece.len()) {
                    return Err(Gone);
                }
                self.writer.write(self.generation, &Frame::new(self.channel, kind, piece.to_vec()).encode())?;
            }
            return Ok(());
        }
        if payload.len() <= MAX_PAYLOAD {
            return self.writer.write(self.generation, &Frame::new(self.channel, kind, payload).encode());
        }
        for piece in payload.chunks(MAX_PAYLOAD) {
            self.writer.write(self.generation, &Frame::new(self.channel, kind, piece.to_vec()).encode())?;
        }
        Ok(())
    }

    /// Ends the wait of a sender blocked on credit: nobody reads this channel any more.
    pub fn stop_streaming(&self) {
        self.credit.close();
    }

    /// Sends a JSON payload.
    pub fn json(&self, kind: FrameKind, value: &impl serde::Serialize) -> Result<(), Gone> {
        self.writer.write(self.generation, &Frame::json(self.channel, kind, value).encode())
    }

    /// Ends the channel with an `Error` frame.
    pub fn fail(&self, message: &str) {
        let _ = self.json(FrameKind::Error, &AgentFailure { message: message.to_owned() });
    }

    /// Routes the channel's later frames to `route`.
    pub fn route(&self, route: Route) {
        if let Ok(mut routes) = self.table.routes.lock() {
            routes.insert(self.channel, route);
        }
    }

    /// Forgets the channel's route: later frames on it are ignored.
    pub fn finish(&self) {
        if let Ok(mut routes) = self.table.routes.lock() {
            routes.remove(&self.channel);
        }
        let mut credits = self.table.credits.lock().unwrap_or_else(PoisonError::into_inner);
        if credits.get(&self.channel).is_some_and(|c| Arc::ptr_eq(c, &self.credit)) {
            credits.remove(&self.channel);
        }
        self.credit.close();
    }

    /// Delivers a frame other than a `Request` to the route of its channel (`frame.channel`,
    /// which is this link's).
    pub fn deliver(&self, frame: Frame) {
        match frame.kind {
            FrameKind::Stdin => {
                let mut routes = self.table.routes.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(Route::Session(control)) = routes.get(&frame.channel) {
                    control.stdin(frame.payload);
                } else if let Some(Route::Exec { stdin: slot @ Some(_), .. }) = routes.get_mut(&frame.channel) {
                    let eof = frame.payload.is_empty();
                    if let Some(tx) = slot.as_ref() {
                        let _ = tx.send(frame.payload);
                    }
                    if eof {
                        *slot = None;
                    }
                }
            }
            FrameKind::Signal => match frame.parse::<SignalRequest>("signal") {
                Ok(request) => {
                    let routes = self.table.routes.lock().unwrap_or_else(PoisonError::into_inner);
                    let signal = Signal::try_from(request.signal);
                    match (routes.get(&frame.channel), signal) {
                        (Some(Route::Exec { control, .. }), Ok(signal)) => control.signal(signal),
                        (Some(Route::Session(control)), Ok(signal)) => control.signal(signal),
                        (_, Err(_)) => log!("ignoring unknown signal {}", request.signal),
                        _ => {}
                    }
                }
                Err(e) => log!("ignoring a bad signal frame: {e}"),
            },
            FrameKind::Resize => match TtySize::parse_resize(&frame.payload) {
                Ok(size) => {
                    let routes = self.table.routes.lock().unwrap_or_else(PoisonError::into_inner);
                    match routes.get(&frame.channel) {
                        Some(Route::Exec { control, .. }) => control.resize(size),
                        Some(Route::Session(control)) => control.resize(size),
                        _ => {}
                    }
                }
                Err(e) => log!("ignoring a resize on channel {}: {e}", frame.channel),
            },
            FrameKind::Data => {
                let routes = self.table.routes.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(Route::Upload(tx) | Route::Tunnel(tx)) = routes.get(&frame.channel) {
                    let _ = tx.send(frame.payload);
                }
            }
            FrameKind::Close => {
                let mut routes = self.table.routes.lock().unwrap_or_else(PoisonError::into_inner);
                match routes.get(&frame.channel) {
                    // Dropping the sender tells the tunnel to close its socket, an upload to stop.
                    Some(Route::Tunnel(..) | Route::Upload(_)) => {
                        routes.remove(&frame.channel);
                    }
                    // The channel's thread notices, says `Close` and forgets the route.
                    Some(Route::Session(control)) => control.close(),
                    // The host will read no more of it (it may have closed the channel for
                    // breaking flow control): the command ends.
                    Some(Route::Exec { control, .. }) => control.kill(),
                    _ => {}
                }
                drop(routes);
                // A sender waiting for credit stops waiting: none will come.
                self.credit.close();
            }
            FrameKind::Ack => match parse_ack(&frame.payload) {
                Some(n) => self.credit.release(n),
                None => log!("ignoring a bad ack on channel {}", frame.channel),
            },
            other => log!("ignoring a {other:?} frame from the host on channel {}", frame.channel),
        }
    }
}

/// Forgets every route of an ended connection: SIGKILLs the processes it started and ends its
/// attaches (sessions outlive connections).
pub fn hang_up(table: &Table) {
    let credits: Vec<Arc<Credit>> =
        table.credits.lock().map(|mut c| c.drain().map(|(_, credit)| credit).collect()).unwrap_or_default();
    for credit in credits {
        credit.close();
    }
    let routes: Vec<Route> =
        table.routes.lock().map(|mut r| r.drain().map(|(_, route)| route).collect()).unwrap_or_default();
    for route in routes {
        match route {
            Route::Exec { control, .. } => control.kill(),
            // Sessions outlive connections: only their attaches end.
            Route::Session(control) => control.close(),
            Route::Upload(_) | Route::Tunnel(..) => {}
        }
    }
}

/// Runs `work` for the channel on a thread of its own (or fails the channel).
pub fn spawn_channel(link: Link, name: &str, work: impl FnOnce(Link) + Send + 'static) {
    let theirs = link.clone();
    if let Err(e) = std::thread::Builder::new().name(name.to_owned()).spawn(move || work(theirs)) {
        link.fail(&format!("cannot start a thread: {e}"));
        link.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::agent::{ack_payload, Decoder};
    use std::io::Read as _;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn credit_holds_a_sender_to_the_window_until_released_or_closed() {
        let credit = Arc::new(Credit::default());
        assert!(credit.acquire(WINDOW - 10));
        let waiter = {
            let credit = Arc::clone(&credit);
            std::thread::spawn(move || credit.acquire(100))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "100 more bytes do not fit");
        credit.release(STREAM_CHUNK);
        assert!(waiter.join().expect("join"), "released");
        let blocked = {
            let credit = Arc::clone(&credit);
            std::thread::spawn(move || credit.acquire(STREAM_CHUNK))
        };
        std::thread::sleep(Duration::from_millis(50));
        credit.close();
        assert!(!blocked.join().expect("join"), "closing ends the wait");
        assert!(!credit.acquire(STREAM_CHUNK), "a closed window does not wait");
    }

    /// Reads frames from `peer` until `want` payload bytes have come (or `deadline`).
    fn read_until(peer: &mut UnixStream, decoder: &mut Decoder, want: usize, deadline: Instant) -> usize {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < want && Instant::now() < deadline {
            match peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => decoder.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
            while let Ok(Some(frame)) = decoder.next_frame() {
                assert!(frame.payload.len() <= STREAM_CHUNK, "streamed frames are at most a chunk");
                got += frame.payload.len();
            }
        }
        got
    }

    #[test]
    fn a_stream_stops_at_the_window_and_goes_on_with_acks_or_ends_on_close() {
        let (ours, mut peer) = UnixStream::pair().expect("pair");
        peer.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        let writer = Arc::new(Writer::default());
        let generation = writer.attach(Arc::new(OwnedFd::from(ours)));
        let table = Table::default();
        let link = Link::open(Arc::clone(&writer), generation, 5, table.clone());
        let sender = {
            let link = link.clone();
            std::thread::spawn(move || link.send(FrameKind::Stdout, vec![1u8; 3 * WINDOW]).is_ok())
        };
        let mut decoder = Decoder::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(read_until(&mut peer, &mut decoder, WINDOW, deadline), WINDOW);
        // No credit: nothing more comes until the host acknowledges.
        assert_eq!(read_until(&mut peer, &mut decoder, 1, Instant::now() + Duration::from_millis(200)), 0);
        let ack = |n| {
            Link::new(Arc::clone(&writer), generation, 5, table.clone()).deliver(Frame::new(
                5,
                FrameKind::Ack,
                ack_payload(n),
            ))
        };
        ack(WINDOW);
        assert_eq!(read_until(&mut peer, &mut decoder, WINDOW, deadline), WINDOW);
        // The host closes the channel: the blocked sender gives up.
        Link::new(Arc::clone(&writer), generation, 5, table.clone()).deliver(Frame::new(
            5,
            FrameKind::Close,
            Vec::new(),
        ));
        assert!(!sender.join().expect("join"), "a closed channel ends the stream");
        // Control frames need no credit.
        link.json(FrameKind::Exit, &banger_proto::agent::ExitStatus { code: 0, signal: None }).expect("exit");
        // A hang-up closes every window.
        let other = Link::open(Arc::clone(&writer), generation, 6, table.clone());
        other.send(FrameKind::Data, vec![0u8; 1000]).expect("within the window");
        hang_up(&table);
        assert!(other.send(FrameKind::Data, vec![0u8; WINDOW]).is_err(), "no wait for credit after a hang-up");
    }
}
