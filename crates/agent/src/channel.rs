//! The multiplexed agent channel's primitives: the one [`Writer`] of a host connection, a
//! channel's [`Link`] back to the host, and the [`Route`]s that steer a channel's later frames
//! (stdin, signals, data, acks, close) to the handler serving it.
//!
//! Handlers (exec, files, ports, sessions, tunnels, the workspace import, ...) use this module
//! only; `serve.rs` reads frames and dispatches requests to them. A route names its handler's
//! state through the small traits here ([`Process`], [`Attachment`], [`Window`]), so this
//! module knows no handler.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use banger_proto::agent::{parse_ack, AgentFailure, Frame, FrameKind, SignalRequest, MAX_PAYLOAD};
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
}

/// The host's end of an attach or a followed log (a session).
pub trait Attachment: Send + Sync + fmt::Debug {
    /// A `Stdin` frame.
    fn stdin(&self, bytes: Vec<u8>);
    /// A `Signal` frame.
    fn signal(&self, signal: Signal);
    /// A `Close` frame, or the host connection ended.
    fn close(&self);
}

/// The guest → host window of a channel, opened by the host's `Ack`s (a tunnel).
pub trait Window: Send + Sync + fmt::Debug {
    /// The host has consumed `n` bytes.
    fn release(&self, n: usize);
}

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
    /// A `connect` tunnel: its `Data` (dropping the sender closes its socket) and the window
    /// its `Ack`s open.
    Tunnel(mpsc::Sender<Vec<u8>>, Arc<dyn Window>),
    /// A session attach or followed log: stdin, signals and `Close` (detach) go to it.
    Session(Arc<dyn Attachment>),
}

/// A connection's routes, by channel id.
pub type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// One channel's way back to the host.
#[derive(Debug, Clone)]
pub struct Link {
    writer: Arc<Writer>,
    generation: u64,
    channel: u32,
    routes: Routes,
}

impl Link {
    /// The link of `channel` on the connection of `generation`.
    pub fn new(writer: Arc<Writer>, generation: u64, channel: u32, routes: Routes) -> Self {
        Self { writer, generation, channel, routes }
    }

    /// Sends raw bytes, split into frames of at most `MAX_PAYLOAD`.
    pub fn send(&self, kind: FrameKind, payload: Vec<u8>) -> Result<(), Gone> {
        if payload.len() <= MAX_PAYLOAD {
            return self.writer.write(self.generation, &Frame::new(self.channel, kind, payload).encode());
        }
        for piece in payload.chunks(MAX_PAYLOAD) {
            self.writer.write(self.generation, &Frame::new(self.channel, kind, piece.to_vec()).encode())?;
        }
        Ok(())
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
        if let Ok(mut routes) = self.routes.lock() {
            routes.insert(self.channel, route);
        }
    }

    /// Forgets the channel's route: later frames on it are ignored.
    pub fn finish(&self) {
        if let Ok(mut routes) = self.routes.lock() {
            routes.remove(&self.channel);
        }
    }

    /// Delivers a frame other than a `Request` to the route of its channel (`frame.channel`,
    /// which is this link's).
    pub fn deliver(&self, frame: Frame) {
        match frame.kind {
            FrameKind::Stdin => {
                let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
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
                    let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
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
            FrameKind::Data => {
                let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(Route::Upload(tx) | Route::Tunnel(tx, _)) = routes.get(&frame.channel) {
                    let _ = tx.send(frame.payload);
                }
            }
            FrameKind::Close => {
                let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
                match routes.get(&frame.channel) {
                    // Dropping the sender tells the tunnel to close its socket, an upload to stop.
                    Some(Route::Tunnel(..) | Route::Upload(_)) => {
                        routes.remove(&frame.channel);
                    }
                    // The channel's thread notices, says `Close` and forgets the route.
                    Some(Route::Session(control)) => control.close(),
                    _ => {}
                }
            }
            FrameKind::Ack => {
                let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
                if let (Some(Route::Tunnel(_, credit)), Some(n)) =
                    (routes.get(&frame.channel), parse_ack(&frame.payload))
                {
                    credit.release(n);
                }
            }
            other => log!("ignoring a {other:?} frame from the host on channel {}", frame.channel),
        }
    }
}

/// Forgets every route of an ended connection: SIGKILLs the processes it started and ends its
/// attaches (sessions outlive connections).
pub fn hang_up(routes: &Routes) {
    let routes: Vec<Route> = routes.lock().map(|mut r| r.drain().map(|(_, route)| route).collect()).unwrap_or_default();
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
