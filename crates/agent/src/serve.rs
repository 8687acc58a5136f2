//! Serving the host over the agent channel (framing and messages in `banger_proto::agent`; the
//! channel primitives in [`crate::channel`]). This is the one module that knows every handler.
//!
//! One reader (the serving thread) decodes frames and dispatches them; requests that take time
//! run on their own threads and answer through a shared [`Writer`], which writes whole frames
//! one at a time. Each host connection has a generation: frames of an older connection are
//! dropped, never written into a newer one.
//!
//! On a virtio-serial port the host's absence looks like this: `poll` reports POLLHUP and
//! `read` returns 0 until a client connects to QEMU's socket. So the agent polls until POLLHUP
//! clears, serves, and on `read() == 0` kills the connection's processes, forgets its state and
//! waits for the next host. A quick reconnect can hide the HUP entirely, so a request on a channel
//! id that this connection already used (hosts number from 1 on each connection) also starts a
//! new connection. Writes also block while no host is connected, hence the
//! non-blocking fd and the generation check while waiting for POLLOUT.
//!
//! Under Firecracker there is no virtio-serial port but a virtio vsock device: the agent then
//! listens on vsock port [`AGENT_VSOCK_PORT`] and serves one host connection at a time (the host
//! reaches it through Firecracker's hybrid socket with `CONNECT <port>`). [`find_transport`]
//! picks whichever of the two the VM has.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use banger_proto::agent::{
    AgentRequest, AgentResponse, Decoder, Frame, FrameError, FrameKind, AGENT_PORT_NAME, AGENT_VSOCK_PORT,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::channel::{self, spawn_channel, Link, Route, Table, Writer};
use crate::exec::{self, ExecControl};
use crate::{files, fsops, ports, session, tunnel, workspace};

/// Where to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A character device (the virtio-serial port), kept open across host connections.
    Port(PathBuf),
    /// Listen on a unix socket and serve one client at a time.
    Listen(PathBuf),
    /// Connect to a unix socket and serve that one connection.
    Connect(PathBuf),
    /// Listen on this vsock port (any CID) and serve one host at a time.
    Vsock(u32),
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The host asked for `shutdown` (already answered).
    Shutdown,
    /// The only connection closed (`Transport::Connect`).
    Closed,
}

/// Serving could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The port or socket could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// What.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `accept` failed.
    #[error("cannot accept a host connection")]
    Accept(#[source] std::io::Error),
    /// `poll` or `read` failed in a way that will not pass.
    #[error("cannot read the agent channel")]
    Read(#[source] Errno),
    /// The virtio-serial port never showed up.
    #[error("no virtio-serial port named '{AGENT_PORT_NAME}' within {0:?} (is virtio_console loaded?)")]
    NoPort(Duration),
    /// Neither the port nor a vsock device showed up.
    #[error(
        "no virtio-serial port named '{AGENT_PORT_NAME}' and no virtio vsock device within {0:?} \
         (are virtio_console and vmw_vsock_virtio_transport loaded?)"
    )]
    NoTransport(Duration),
    /// The vsock listener could not be set up.
    #[error("cannot listen on vsock port {port}")]
    Vsock {
        /// The port.
        port: u32,
        /// Why.
        #[source]
        source: Errno,
    },
}

/// Finds `/dev/vportNpM` whose name is [`AGENT_PORT_NAME`], waiting up to `timeout`.
pub fn find_port(timeout: Duration) -> Result<PathBuf, ServeError> {
    let start = Instant::now();
    loop {
        if let Some(dev) = port_by_name(Path::new("/sys/class/virtio-ports"), AGENT_PORT_NAME) {
            let path = Path::new("/dev").join(dev);
            if path.exists() {
                return Ok(path);
            }
        }
        if start.elapsed() > timeout {
            return Err(ServeError::NoPort(timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where to serve the host: the virtio-serial port named [`AGENT_PORT_NAME`] (QEMU) or, when the
/// VM has a virtio vsock device and no such port (Firecracker), vsock port [`AGENT_VSOCK_PORT`];
/// waits up to `timeout` for either.
pub fn find_transport(timeout: Duration) -> Result<Transport, ServeError> {
    let start = Instant::now();
    loop {
        if let Some(transport) =
            transport_in(Path::new("/sys/class/virtio-ports"), Path::new("/sys/bus/virtio/devices"), Path::new("/dev"))
        {
            return Ok(transport);
        }
        if start.elapsed() > timeout {
            return Err(ServeError::NoTransport(timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One look for a transport: the named port (whose device node exists) wins over vsock.
fn transport_in(ports: &Path, virtio_bus: &Path, dev: &Path) -> Option<Transport> {
    if let Some(port) = port_by_name(ports, AGENT_PORT_NAME).map(|name| dev.join(name)) {
        if port.exists() {
            return Some(Transport::Port(port));
        }
    }
    has_vsock_device(virtio_bus).then_some(Transport::Vsock(AGENT_VSOCK_PORT))
}

/// Virtio device id of a vsock device (`/sys/bus/virtio/devices/*/device`).
const VIRTIO_ID_VSOCK: &str = "0x0013";

/// Whether a virtio vsock device is there with its driver bound.
fn has_vsock_device(virtio_bus: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(virtio_bus) else { return false };
    entries.flatten().any(|entry| {
        let id = std::fs::read_to_string(entry.path().join("device")).unwrap_or_default();
        id.trim() == VIRTIO_ID_VSOCK && entry.path().join("driver").exists()
    })
}

/// A listening vsock socket on `port` for any CID (non-blocking accepts are not needed: one
/// host at a time).
fn vsock_listener(port: u32) -> Result<OwnedFd, ServeError> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
    let fail = |source| ServeError::Vsock { port, source };
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(fail)?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).map_err(fail)?;
    listen(&fd, Backlog::new(1).map_err(fail)?).map_err(fail)?;
    Ok(fd)
}

/// Accepts one vsock connection, non-blocking for [`connection`].
fn vsock_accept(listener: &OwnedFd, port: u32) -> Result<Arc<OwnedFd>, ServeError> {
    use nix::sys::socket::{accept4, SockFlag};
    loop {
        match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
            // SAFETY: accept4 just returned this fd and nothing else owns it.
            Ok(fd) => return Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })),
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(source) => return Err(ServeError::Vsock { port, source }),
        }
    }
}

fn port_by_name(class: &Path, name: &str) -> Option<String> {
    std::fs::read_dir(class).ok()?.flatten().find_map(|entry| {
        let found = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (found.trim() == name).then(|| entry.file_name().to_string_lossy().into_owned())
    })
}

/// Serves until the host asks for `shutdown` (or, for `Connect`, until the connection ends).
pub fn serve(transport: &Transport) -> Result<Outcome, ServeError> {
    let writer = Arc::new(Writer::default());
    match transport {
        Transport::Port(path) => {
            let flags = nix::fcntl::OFlag::O_RDWR
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_CLOEXEC
                | nix::fcntl::OFlag::O_NOCTTY;
            let fd = nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty())
                .map_err(|e| ServeError::Open { path: path.clone(), source: e.into() })?;
            // SAFETY: `open` just returned this fd and nothing else owns it.
            let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
            loop {
                wait_for_host(&fd)?;
                log!("host connected on {}", path.display());
                if connection(&writer, Arc::clone(&fd))? == Outcome::Shutdown {
                    return Ok(Outcome::Shutdown);
                }
                log!("host disconnected; its processes were killed");
            }
        }
        Transport::Listen(path) => {
            let _ = std::fs::remove_file(path);
            let listener =
                UnixListener::bind(path).map_err(|source| ServeError::Open { path: path.clone(), source })?;
            loop {
                let (stream, _) = listener.accept().map_err(ServeError::Accept)?;
                if connection(&writer, stream_fd(stream, path)?)? == Outcome::Shutdown {
                    let _ = std::fs::remove_file(path);
                    return Ok(Outcome::Shutdown);
                }
            }
        }
        Transport::Connect(path) => {
            let stream = UnixStream::connect(path).map_err(|source| ServeError::Open { path: path.clone(), source })?;
            connection(&writer, stream_fd(stream, path)?)
        }
        Transport::Vsock(port) => {
            let listener = vsock_listener(*port)?;
            loop {
                let fd = vsock_accept(&listener, *port)?;
                log!("host connected on vsock port {port}");
                if connection(&writer, fd)? == Outcome::Shutdown {
                    return Ok(Outcome::Shutdown);
                }
                log!("host disconnected; its processes were killed");
            }
        }
    }
}

fn stream_fd(stream: UnixStream, path: &Path) -> Result<Arc<OwnedFd>, ServeError> {
    stream.set_nonblocking(true).map_err(|source| ServeError::Open { path: path.to_owned(), source })?;
    Ok(Arc::new(OwnedFd::from(stream)))
}

/// Polls until POLLHUP clears, i.e. a host is connected to the port.
fn wait_for_host(fd: &OwnedFd) -> Result<(), ServeError> {
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ServeError::Read(e)),
        }
        if !fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Serves one host connection until it ends or asks for `shutdown`.
fn connection(writer: &Arc<Writer>, fd: Arc<OwnedFd>) -> Result<Outcome, ServeError> {
    let mut generation = writer.attach(Arc::clone(&fd));
    let mut table = Table::default();
    // Highest channel id a request has opened on this connection (see `reconnected`).
    let mut highest = 0u32;
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 256 * 1024];
    let outcome = 'conn: loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => break Err(ServeError::Read(e)),
        }
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => break Ok(Outcome::Closed),
            Ok(n) => decoder.push(&buf[..n]),
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => {
                log!("reading the agent channel failed: {e}; dropping the connection");
                break Ok(Outcome::Closed);
            }
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let restarted = frame.kind == FrameKind::Request && reconnected(frame.channel, &mut highest);
                    if restarted {
                        end_connection(writer, &table);
                        generation = writer.attach(Arc::clone(&fd));
                        table = Table::default();
                    }
                    let link = if frame.kind == FrameKind::Request {
                        Link::open(Arc::clone(writer), generation, frame.channel, table.clone())
                    } else {
                        Link::new(Arc::clone(writer), generation, frame.channel, table.clone())
                    };
                    if dispatch(frame, link) {
                        break 'conn Ok(Outcome::Shutdown);
                    }
                    // Logged once the request is on its way: console lines are slow under TCG.
                    if restarted {
                        log!("host reconnected (channel ids restarted); killed the old connection's processes");
                    }
                }
                Ok(None) => break,
                Err(e @ FrameError::Oversize { .. }) => {
                    // Skipped by the decoder; the stream is still in step.
                    log!("bad frame from the host: {e}; ignored");
                }
                Err(e) => {
                    // The stream is out of step; tell the host on channel 0 and start afresh.
                    log!("bad frame from the host: {e}; resetting the decoder");
                    let link = Link::new(Arc::clone(writer), generation, 0, table.clone());
                    link.fail(&format!("bad frame: {e}"));
                    decoder = Decoder::default();
                    break;
                }
            }
        }
    };
    end_connection(writer, &table);
    outcome
}

/// Whether a request on `channel` means a new host connection. A host never reuses a channel
/// id on one connection and numbers from 1, so an id at or below the highest seen means the
/// host reconnected. This catches a reconnect the port did not show: when the old client goes
/// and a new one comes quickly, the guest can process QEMU's "closed" and "open" messages
/// together and `read` never returns 0.
fn reconnected(channel: u32, highest: &mut u32) -> bool {
    let restarted = channel <= *highest;
    *highest = if restarted { channel } else { channel.max(*highest) };
    restarted
}

/// Stops writing for the connection and SIGKILLs the processes it started.
fn end_connection(writer: &Writer, table: &Table) {
    writer.detach();
    channel::hang_up(table);
}

/// Handles one frame; true when the host asked for `shutdown` (answered already).
fn dispatch(frame: Frame, link: Link) -> bool {
    if frame.kind != FrameKind::Request {
        link.deliver(frame);
        return false;
    }
    let request: AgentRequest = match frame.parse("request") {
        Ok(request) => request,
        Err(e) => {
            link.fail(&e.to_string());
            return false;
        }
    };
    request_frame(request, link)
}

fn request_frame(request: AgentRequest, link: Link) -> bool {
    match request {
        AgentRequest::Ping => {
            let _ = link.json(FrameKind::Response, &pong());
        }
        AgentRequest::Ports => {
            let _ = link
                .json(FrameKind::Response, &AgentResponse::Ports { ports: ports::listening(Path::new("/proc/net")) });
        }
        AgentRequest::Shutdown => {
            let _ = link.json(FrameKind::Response, &AgentResponse::Ok);
            return true;
        }
        AgentRequest::Exec(request) => {
            let control = Arc::new(ExecControl::default());
            let (tx, rx) = if request.stdin {
                let (tx, rx) = mpsc::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            link.route(Route::Exec { control: Arc::<ExecControl>::clone(&control), stdin: tx });
            spawn_channel(link, "exec", move |link| exec::session(link, request, control, rx));
        }
        AgentRequest::Connect { port } => {
            let (tx, rx) = mpsc::channel();
            link.route(Route::Tunnel(tx));
            spawn_channel(link, "connect", move |link| tunnel::session(link, port, rx));
        }
        AgentRequest::Session(op) => session::request(op, link),
        // Served inline: it is brief, and a restored fork's first request, whose thread start
        // would cost it a fresh translation of the clone path under TCG.
        AgentRequest::Reidentify(identity) => crate::identity::serve(&link, &identity),
        AgentRequest::ScrubFreeMemory => spawn_channel(link, "scrub", |link| crate::memory::serve_scrub(&link)),
        AgentRequest::ReadFile { path } => spawn_channel(link, "read_file", move |link| files::read_file(&link, &path)),
        AgentRequest::WriteFile { path, mode } => {
            let (tx, rx) = mpsc::channel();
            link.route(Route::Upload(tx));
            spawn_channel(link, "write_file", move |link| files::write_file(&link, &path, mode, &rx));
        }
        AgentRequest::Unpack { dir } => {
            let (tx, rx) = mpsc::channel();
            link.route(Route::Upload(tx));
            spawn_channel(link, "unpack", move |link| workspace::session(&link, &dir, &rx));
        }
        AgentRequest::Write { path, mode, parents } => {
            let (tx, rx) = mpsc::channel();
            link.route(Route::Upload(tx));
            spawn_channel(link, "write", move |link| fsops::serve_write(&link, &path, mode, parents, &rx));
        }
        AgentRequest::MountDisk { serial, dir } => {
            spawn_channel(link, "mount_disk", move |link| crate::disks::serve_mount(&link, &serial, &dir));
        }
        AgentRequest::UnmountDisk { dir } => {
            spawn_channel(link, "unmount_disk", move |link| crate::disks::serve_unmount(&link, &dir));
        }
        request @ (AgentRequest::Stat { .. }
        | AgentRequest::List { .. }
        | AgentRequest::Mkdir { .. }
        | AgentRequest::Remove { .. }
        | AgentRequest::Read { .. }
        | AgentRequest::Pack { .. }) => spawn_channel(link, "fs", move |link| fsops::serve(&link, request)),
    }
    false
}

/// The answer to `ping`.
fn pong() -> AgentResponse {
    let uptime = std::fs::read_to_string("/proc/uptime").ok();
    // "12345.67 ..." → milliseconds, without float casts.
    let millis = uptime.as_deref().and_then(|u| u.split_whitespace().next()).and_then(|s| {
        let (secs, frac) = s.split_once('.').unwrap_or((s, "0"));
        let frac = format!("{frac:0<3}");
        Some(secs.parse::<u64>().ok()? * 1000 + frac.get(..3)?.parse::<u64>().ok()?)
    });
    AgentResponse::Pong {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_ms: millis.unwrap_or(0),
        kernel: nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_found_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (port, name) in [("vport0p0", "other"), ("vport0p1", "banger.agent\n")] {
            std::fs::create_dir(dir.path().join(port)).expect("mkdir");
            std::fs::write(dir.path().join(port).join("name"), name).expect("write");
        }
        assert_eq!(port_by_name(dir.path(), AGENT_PORT_NAME).as_deref(), Some("vport0p1"));
        assert_eq!(port_by_name(dir.path(), "nope"), None);
    }

    /// A fake sysfs: a virtio-ports class dir, a virtio bus and a /dev.
    fn fake_sys(port: Option<&str>, vsock: Option<bool>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["ports", "bus", "dev"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        if let Some(name) = port {
            std::fs::create_dir(dir.path().join("ports/vport0p1")).expect("mkdir");
            std::fs::write(dir.path().join("ports/vport0p1/name"), format!("{name}\n")).expect("write");
            std::fs::write(dir.path().join("dev/vport0p1"), "").expect("node");
        }
        std::fs::create_dir(dir.path().join("bus/virtio0")).expect("mkdir");
        std::fs::write(dir.path().join("bus/virtio0/device"), "0x0002\n").expect("write");
        if let Some(bound) = vsock {
            std::fs::create_dir(dir.path().join("bus/virtio1")).expect("mkdir");
            std::fs::write(dir.path().join("bus/virtio1/device"), "0x0013\n").expect("write");
            if bound {
                std::fs::create_dir(dir.path().join("bus/virtio1/driver")).expect("mkdir");
            }
        }
        dir
    }

    fn look(dir: &tempfile::TempDir) -> Option<Transport> {
        transport_in(&dir.path().join("ports"), &dir.path().join("bus"), &dir.path().join("dev"))
    }

    #[test]
    fn transport_is_the_port_else_vsock() {
        let qemu = fake_sys(Some(AGENT_PORT_NAME), None);
        assert_eq!(look(&qemu), Some(Transport::Port(qemu.path().join("dev/vport0p1"))));
        let firecracker = fake_sys(None, Some(true));
        assert_eq!(look(&firecracker), Some(Transport::Vsock(1024)));
        // The named port wins when both are there.
        let both = fake_sys(Some(AGENT_PORT_NAME), Some(true));
        assert!(matches!(look(&both), Some(Transport::Port(_))));
        // A vsock device without its driver, or another port's name: nothing yet.
        assert_eq!(look(&fake_sys(None, Some(false))), None);
        assert_eq!(look(&fake_sys(Some("other"), None)), None);
    }

    /// The vsock listener binds on this host's kernel (AF_VSOCK needs no device to listen).
    #[test]
    fn vsock_listener_binds_and_refuses_a_taken_port() {
        let port = 40_000 + std::process::id() % 20_000;
        let listener = vsock_listener(port).expect("listen on vsock");
        let error = vsock_listener(port).expect_err("the port is taken");
        assert!(matches!(error, ServeError::Vsock { source: Errno::EADDRINUSE, .. }), "{error:?}");
        assert_eq!(error.to_string(), format!("cannot listen on vsock port {port}"));
        drop(listener);
    }

    #[test]
    fn restarted_channel_ids_mean_a_new_connection() {
        let mut highest = 0;
        assert!(!reconnected(1, &mut highest));
        assert!(!reconnected(2, &mut highest));
        assert!(!reconnected(5, &mut highest));
        assert!(reconnected(1, &mut highest));
        assert!(!reconnected(2, &mut highest));
        assert!(reconnected(2, &mut highest));
    }

    #[test]
    fn pong_reports_this_kernel() {
        let AgentResponse::Pong { version, kernel, .. } = pong() else { panic!("not a pong") };
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert!(!kernel.is_empty());
    }
}
