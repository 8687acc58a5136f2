//! Supervised sessions (protocol in `banger_proto::agent::session`): processes the agent starts
//! and keeps apart from any host connection, so a host that goes away (a killed daemon) leaves
//! them running. Each has a directory `SESSION_DIR/<id>/` with its `stdout` and `stderr` logs.
//!
//! Per session: two pump threads copy its stdout and stderr pipes into the logs and to the
//! attached watchers, one waiter thread records how it ended, and for a `pipe` session one
//! feeder thread writes what the stdin holder sends. A pump writes the log and hands the chunk
//! to the watchers under the session's lock, and an attach reads the logs' tails and registers
//! under the same lock, so a watcher sees the replay and then every later byte, in order and
//! once. Watchers have bounded queues: one that falls behind is dropped (and told so) instead
//! of stalling the process.
//!
//! A `tty` session runs on a pty (`pty.rs`) instead: one pump reads its master into the stdout
//! log, the stdin holder's bytes are typed into the master and its `Resize`s set the size.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use banger_proto::agent::session::{
    self as proto, stage, GuestSessionStatus, SessionOp, SessionStart, SessionState, REPLAY_BYTES, SESSION_DIR,
};
use banger_proto::agent::{AgentResponse, ExitStatus, FrameKind, TtySize};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::channel::{self, Link, Route};
use crate::exec::{self, Command, SpawnError, Stdio};

/// Overrides [`SESSION_DIR`] (for running the agent outside a guest, e.g. in tests).
pub const SESSION_DIR_ENV: &str = "BANGER_SESSION_DIR";
/// Events a watcher may have queued before it counts as fallen behind.
const WATCH_QUEUE: usize = 1024;
/// How long the waiter gives the pipes to drain after the process ended (a background child
/// may hold them open for ever).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How often a `logs --follow` looks for more.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// What a watcher receives.
#[derive(Debug)]
pub enum Event {
    /// Output of the session: `Stdout` or `Stderr`.
    Output(FrameKind, Vec<u8>),
    /// The session ended.
    Exit(ExitStatus),
}

struct Watcher {
    token: u64,
    tx: SyncSender<Event>,
    lagged: Arc<AtomicBool>,
}

struct Inner {
    exit: Option<(ExitStatus, Instant)>,
    logs: [Option<File>; 2],
    log_failed: bool,
    watchers: Vec<Watcher>,
    /// To the feeder thread; `None` once closed (or never, without a stdin pipe).
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    stdin_holder: Option<u64>,
    open_pumps: usize,
    /// The pty's master (a duplicate) while a `tty` session runs, for resizes.
    pty: Option<OwnedFd>,
}

/// One supervised process.
pub struct Session {
    id: String,
    dir: PathBuf,
    pid: Pid,
    started: Instant,
    inner: Mutex<Inner>,
    drained: Condvar,
    /// Whether it runs on a pty.
    tty: bool,
    /// Set by the waiter as soon as the process has been reaped (before the drain).
    reaped: AtomicBool,
}

/// An attach: its queue, its token, and whether it fell behind.
pub struct Attachment {
    /// Replay, then live events.
    pub rx: Receiver<Event>,
    /// Identifies it for detach and stdin.
    pub token: u64,
    /// Set when its queue overflowed and it was dropped.
    pub lagged: Arc<AtomicBool>,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log_path(&self, stderr: bool) -> PathBuf {
        self.dir.join(if stderr { "stderr" } else { "stdout" })
    }

    /// The session's state now.
    pub fn state(&self) -> SessionState {
        let inner = self.lock();
        let ms = |i: Instant| u64::try_from(i.elapsed().as_millis()).unwrap_or(u64::MAX);
        SessionState {
            id: self.id.clone(),
            status: if inner.exit.is_some() { GuestSessionStatus::Exited } else { GuestSessionStatus::Running },
            pid: u32::try_from(self.pid.as_raw()).ok(),
            exit: inner.exit.map(|(status, _)| status),
            failure: None,
            started_ms_ago: Some(ms(self.started)),
            ended_ms_ago: inner.exit.map(|(_, at)| ms(at)),
            stdin_attached: inner.stdin_holder.is_some(),
        }
    }

    /// Whether it has ended (its output is then complete in the logs).
    pub fn is_over(&self) -> bool {
        self.lock().exit.is_some()
    }

    /// Output from pump `index` (0 stdout, 1 stderr): into the log, then to the watchers.
    fn output(&self, index: usize, bytes: &[u8]) {
        let mut inner = self.lock();
        let failed = match inner.logs[index].as_mut() {
            Some(file) => file.write_all(bytes).err(),
            None => None,
        };
        if let Some(e) = failed {
            if !inner.log_failed {
                log!("session {}: cannot write its log: {e}", self.id);
                inner.log_failed = true;
            }
        }
        let kind = if index == 0 { FrameKind::Stdout } else { FrameKind::Stderr };
        inner.watchers.retain(|w| match w.tx.try_send(Event::Output(kind, bytes.to_vec())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                w.lagged.store(true, Ordering::SeqCst);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    fn pump_done(&self) {
        let mut inner = self.lock();
        inner.open_pumps = inner.open_pumps.saturating_sub(1);
        self.drained.notify_all();
    }

    /// Records how the process ended, once its output is in (or the grace has passed).
    fn finish(&self, status: ExitStatus) {
        let deadline = Instant::now() + DRAIN_GRACE;
        let mut inner = self.lock();
        while inner.open_pumps > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            inner = self.drained.wait_timeout(inner, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        inner.exit = Some((status, Instant::now()));
        for w in inner.watchers.drain(..) {
            if let Err(TrySendError::Full(_)) = w.tx.try_send(Event::Exit(status)) {
                w.lagged.store(true, Ordering::SeqCst);
            }
        }
        inner.stdin = None;
        inner.stdin_holder = None;
        inner.pty = None;
    }

    /// Registers a watcher: its queue starts with the logs' tails. With `stdin` (and a session
    /// that has a stdin pipe) it also takes the stdin, which only one attach may hold.
    pub fn attach(&self, stdin: bool, token: u64) -> Result<Attachment, String> {
        let mut inner = self.lock();
        let take_stdin = stdin && inner.stdin.is_some();
        if take_stdin && inner.stdin_holder.is_some() {
            return Err("the session's stdin is already attached by another client; detach that one first (Ctrl-] or \
                        close it)"
                .to_owned());
        }
        let (tx, rx) = mpsc::sync_channel(WATCH_QUEUE);
        for (index, kind) in [(0, FrameKind::Stdout), (1, FrameKind::Stderr)] {
            match tail(&self.log_path(index == 1), REPLAY_BYTES) {
                Ok(bytes) if !bytes.is_empty() => {
                    let _ = tx.try_send(Event::Output(kind, bytes));
                }
                Ok(_) => {}
                Err(e) => log!("session {}: cannot replay its log: {e}", self.id),
            }
        }
        let lagged = Arc::new(AtomicBool::new(false));
        let exit = inner.exit;
        match exit {
            Some((status, _)) => {
                let _ = tx.try_send(Event::Exit(status));
            }
            None => inner.watchers.push(Watcher { token, tx, lagged: Arc::clone(&lagged) }),
        }
        if take_stdin {
            inner.stdin_holder = Some(token);
        }
        Ok(Attachment { rx, token, lagged })
    }

    /// Ends attach `token`: no more output, and its hold on stdin goes.
    pub fn detach(&self, token: u64) {
        let mut inner = self.lock();
        inner.watchers.retain(|w| w.token != token);
        if inner.stdin_holder == Some(token) {
            inner.stdin_holder = None;
        }
    }

    /// Stdin from attach `token`, if it holds stdin; empty closes the session's stdin (not a
    /// terminal's: a client's end of input is no end of the session's).
    pub fn write_stdin(&self, token: u64, bytes: Vec<u8>) {
        let mut inner = self.lock();
        if inner.stdin_holder != Some(token) {
            return;
        }
        if bytes.is_empty() && self.tty {
            return;
        }
        if bytes.is_empty() {
            inner.stdin = None;
        } else if let Some(tx) = &inner.stdin {
            let _ = tx.send(bytes);
        }
    }

    /// Sets a `tty` session's window size, if attach `token` holds its stdin.
    pub fn resize(&self, token: u64, size: TtySize) {
        let inner = self.lock();
        if let (Some(master), Some(holder)) = (&inner.pty, inner.stdin_holder) {
            if holder == token {
                if let Err(e) = crate::pty::resize(std::os::fd::AsFd::as_fd(master), size) {
                    log!("session {}: {e}", self.id);
                }
            }
        }
    }

    /// Sends `signal` to the session's process group while it runs.
    pub fn signal(&self, signal: Signal) {
        let inner = self.lock();
        if inner.exit.is_none() {
            let _ = killpg(self.pid, signal);
        }
    }
}

/// The last `max` bytes of `path` (nothing when it does not exist).
fn tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = Vec::new();
    file.take(max).read_to_end(&mut out)?;
    Ok(out)
}

/// Every session of this agent.
pub struct Supervisor {
    dir: PathBuf,
    sessions: Mutex<Vec<Arc<Session>>>,
    next_token: AtomicU64,
}

impl Supervisor {
    /// A supervisor keeping logs under `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, sessions: Mutex::new(Vec::new()), next_token: AtomicU64::new(1) }
    }

    fn sessions(&self) -> MutexGuard<'_, Vec<Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions().iter().find(|s| s.id == id).cloned()
    }

    /// Every session's state, oldest first.
    pub fn list(&self) -> Vec<SessionState> {
        let sessions: Vec<Arc<Session>> = self.sessions().clone();
        sessions.iter().map(|s| s.state()).collect()
    }

    /// A fresh attach token.
    pub fn token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks and starts a session; a failed check or spawn is answered as a `failed` state
    /// naming the stage.
    pub fn start(&self, req: SessionStart) -> SessionState {
        let id = req.id.clone();
        match self.launch(req) {
            Ok(session) => session.state(),
            Err((stage, message)) => SessionState::failed(&id, stage, message),
        }
    }

    fn launch(&self, req: SessionStart) -> Result<Arc<Session>, (&'static str, String)> {
        if !proto::valid_id(&req.id) {
            return Err((stage::REQUEST, format!("'{}' is not a valid session id", req.id)));
        }
        if self.get(&req.id).is_some() {
            return Err((stage::REQUEST, format!("session {} already exists in this guest", req.id)));
        }
        let program = req.argv.first().cloned().ok_or((stage::COMMAND, "no command given".to_owned()))?;
        let env = exec::default_env(&req.env);
        let cwd = PathBuf::from(req.cwd.as_deref().unwrap_or("/root"));
        if !cwd.is_dir() {
            let why = if cwd.exists() { "is not a directory" } else { "does not exist" };
            return Err((stage::CWD, format!("working directory {} {why}", cwd.display())));
        }
        let path_var = env.iter().find(|(k, _)| k == "PATH").map_or(exec::DEFAULT_PATH, |(_, v)| v.as_str());
        exec::resolve(&program, path_var).map_err(|e| (stage::COMMAND, e.to_string()))?;
        let dir = self.dir.join(&req.id);
        let logs_err = |e: std::io::Error| (stage::LOGS, format!("cannot create {}: {e}", dir.display()));
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(logs_err)?;
        let open = |name: &str| {
            OpenOptions::new().create(true).append(true).mode(0o600).open(dir.join(name)).map_err(logs_err)
        };
        let logs = [Some(open("stdout")?), Some(open("stderr")?)];
        let stdin_mode = if req.stdin { Stdio::Pipe } else { Stdio::Null };
        if let Some(why) = req.tty.and_then(TtySize::check) {
            return Err((stage::REQUEST, why));
        }
        let cmd = Command { argv: req.argv, env, cwd, stdio: [stdin_mode, Stdio::Pipe, Stdio::Pipe], tty: req.tty };
        let child = exec::spawn(&cmd).map_err(|e| match e {
            SpawnError::NotFound(_) | SpawnError::NotExecutable(_) => (stage::COMMAND, e.to_string()),
            other => (stage::SPAWN, exec::chain(&other)),
        })?;
        let [mut stdin_fd, mut stdout_fd, stderr_fd] = child.pipes;
        let pty = match child.pty {
            // The master is both: typed into (a duplicate) and read.
            Some(master) => {
                stdin_fd = master.try_clone().ok();
                let resizer = master.try_clone().ok();
                stdout_fd = Some(master);
                resizer
            }
            None => None,
        };
        let tty = pty.is_some();
        let stdin = stdin_fd.and_then(|fd| {
            let (tx, rx) = mpsc::channel();
            spawn_thread("session-stdin", move || feed(fd, &rx)).then_some(tx)
        });
        let session = Arc::new(Session {
            id: req.id,
            dir,
            pid: child.pid,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                exit: None,
                logs,
                log_failed: false,
                watchers: Vec::new(),
                stdin,
                stdin_holder: None,
                open_pumps: 0,
                pty,
            }),
            drained: Condvar::new(),
            tty,
            reaped: AtomicBool::new(false),
        });
        for (index, fd) in [stdout_fd, stderr_fd].into_iter().enumerate() {
            let Some(fd) = fd else { continue };
            let s = Arc::clone(&session);
            s.lock().open_pumps += 1;
            let started = if tty {
                spawn_thread("session-pty", move || {
                    crate::pty::pump(
                        fd,
                        || s.reaped.load(Ordering::SeqCst),
                        |bytes| {
                            s.output(0, bytes);
                            true
                        },
                    );
                    s.pump_done();
                })
            } else {
                spawn_thread("session-pump", move || pump(&s, index, fd))
            };
            if !started {
                session.pump_done();
            }
        }
        let waiter = Arc::clone(&session);
        let exit = child.exit;
        spawn_thread("session-wait", move || {
            let status = exit.recv().unwrap_or(ExitStatus { code: 255, signal: None });
            waiter.reaped.store(true, Ordering::SeqCst);
            waiter.finish(status);
        });
        self.sessions().push(Arc::clone(&session));
        log!("session {} started (pid {})", session.id, session.pid);
        Ok(session)
    }
}

fn spawn_thread(name: &str, work: impl FnOnce() + Send + 'static) -> bool {
    match std::thread::Builder::new().name(name.to_owned()).spawn(work) {
        Ok(_) => true,
        Err(e) => {
            log!("cannot start a {name} thread: {e}");
            false
        }
    }
}

fn pump(session: &Session, index: usize, fd: OwnedFd) {
    let mut pipe = File::from(fd);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => session.output(index, &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    session.pump_done();
}

fn feed(fd: OwnedFd, chunks: &Receiver<Vec<u8>>) {
    let mut pipe = File::from(fd);
    for chunk in chunks {
        if pipe.write_all(&chunk).is_err() {
            return;
        }
    }
}

/// The agent's supervisor, keeping logs under [`SESSION_DIR`] (or `$BANGER_SESSION_DIR`).
pub fn supervisor() -> &'static Supervisor {
    static SUPERVISOR: OnceLock<Supervisor> = OnceLock::new();
    SUPERVISOR.get_or_init(|| {
        let dir = std::env::var_os(SESSION_DIR_ENV)
            .filter(|d| !d.is_empty())
            .map_or_else(|| SESSION_DIR.into(), PathBuf::from);
        Supervisor::new(dir)
    })
}

/// The host's end of an attach or a followed log: what the serving thread routes to it.
#[derive(Default)]
pub struct Control {
    closed: AtomicBool,
    attach: Option<(Arc<Session>, u64)>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("closed", &self.is_closed())
            .field("session", &self.attach.as_ref().map(|(s, token)| (s.id.as_str(), *token)))
            .finish()
    }
}

impl Control {
    /// Host stdin for the attached session.
    pub fn stdin(&self, bytes: Vec<u8>) {
        if let Some((session, token)) = &self.attach {
            session.write_stdin(*token, bytes);
        }
    }

    /// A signal for the attached session.
    pub fn signal(&self, signal: Signal) {
        if let Some((session, _)) = &self.attach {
            session.signal(signal);
        }
    }

    /// A window size from the attach (applied if it holds a `tty` session's stdin).
    pub fn resize(&self, size: TtySize) {
        if let Some((session, token)) = &self.attach {
            session.resize(*token, size);
        }
    }

    /// The host detached (or went away): stop at once, and let go of stdin.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some((session, token)) = &self.attach {
            session.detach(*token);
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

impl channel::Attachment for Control {
    fn stdin(&self, bytes: Vec<u8>) {
        Control::stdin(self, bytes);
    }

    fn signal(&self, signal: Signal) {
        Control::signal(self, signal);
    }

    fn resize(&self, size: TtySize) {
        Control::resize(self, size);
    }

    fn close(&self) {
        Control::close(self);
    }
}

/// Serves one `session` request.
pub fn request(op: SessionOp, link: Link) {
    let sup = supervisor();
    let unknown = |link: &Link, id: &str| {
        link.fail(&format!("no session {id} in this guest (did the guest restart?)"));
        link.finish();
    };
    match op {
        SessionOp::Start(req) => crate::channel::spawn_channel(link, "session-start", move |link| {
            let state = sup.start(req);
            let _ = link.json(FrameKind::Response, &AgentResponse::Session(state));
            link.finish();
        }),
        SessionOp::List => {
            let _ = link.json(FrameKind::Response, &AgentResponse::Sessions { sessions: sup.list() });
            link.finish();
        }
        SessionOp::Signal { id, signal } => {
            let Some(session) = sup.get(&id) else { return unknown(&link, &id) };
            match Signal::try_from(signal) {
                Ok(signal) => {
                    session.signal(signal);
                    let _ = link.json(FrameKind::Response, &AgentResponse::Session(session.state()));
                }
                Err(_) => link.fail(&format!("unknown signal {signal}")),
            }
            link.finish();
        }
        SessionOp::Attach { id, stdin } => {
            let Some(session) = sup.get(&id) else { return unknown(&link, &id) };
            match session.attach(stdin, sup.token()) {
                Ok(attachment) => {
                    let control = Arc::new(Control {
                        closed: AtomicBool::new(false),
                        attach: Some((Arc::clone(&session), attachment.token)),
                    });
                    link.route(Route::Session(Arc::<Control>::clone(&control)));
                    crate::channel::spawn_channel(link, "session-attach", move |link| {
                        relay(&link, &session, &attachment, &control);
                        link.finish();
                    });
                }
                Err(message) => {
                    link.fail(&message);
                    link.finish();
                }
            }
        }
        SessionOp::Logs { id, stderr, follow } => {
            let Some(session) = sup.get(&id) else {
                // A session of an earlier boot: its logs are still on the overlay disk.
                let path = sup.dir.join(&id).join(if stderr { "stderr" } else { "stdout" });
                if !proto::valid_id(&id) || !path.is_file() {
                    return unknown(&link, &id);
                }
                return crate::channel::spawn_channel(link, "session-logs", move |link| {
                    if send_file(&link, &path) {
                        let _ = link.json(FrameKind::Response, &AgentResponse::Ok);
                    }
                    link.finish();
                });
            };
            let control = Arc::new(Control::default());
            link.route(Route::Session(Arc::<Control>::clone(&control)));
            crate::channel::spawn_channel(link, "session-logs", move |link| {
                send_log(&link, &session, stderr, follow, &control);
                link.finish();
            });
        }
    }
}

/// Streams an attach to the host: the state, the replay, live output, then `Exit`, `Close`
/// (detached) or `Error` (fell behind).
fn relay(link: &Link, session: &Session, attachment: &Attachment, control: &Control) {
    let _ = link.json(FrameKind::Response, &AgentResponse::Session(session.state()));
    loop {
        match attachment.rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Event::Output(kind, bytes)) => {
                if link.send(kind, bytes).is_err() {
                    // Out of credit after a detach: say so, as the protocol promises.
                    if control.is_closed() {
                        let _ = link.send(FrameKind::Close, Vec::new());
                    }
                    break;
                }
            }
            Ok(Event::Exit(status)) => {
                let _ = link.json(FrameKind::Exit, &status);
                break;
            }
            Err(RecvTimeoutError::Timeout) if !control.is_closed() => {}
            Err(_) => {
                if attachment.lagged.load(Ordering::SeqCst) {
                    link.fail("this client fell behind the session's output and was detached; attach again (`banger session logs` has everything)");
                } else {
                    let _ = link.send(FrameKind::Close, Vec::new());
                }
                break;
            }
        }
    }
    session.detach(attachment.token);
}

/// Sends a whole file in `Data` frames; false (after `Error`) when it cannot be read.
fn send_file(link: &Link, path: &Path) -> bool {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            link.fail(&format!("cannot read {}: {e}", path.display()));
            return false;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                if link.send(FrameKind::Data, buf[..n].to_vec()).is_err() {
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                link.fail(&format!("cannot read {}: {e}", path.display()));
                return false;
            }
        }
    }
}

/// Sends a log file in `Data` frames, following it until the session ends when asked, then
/// the session's state.
fn send_log(link: &Link, session: &Session, stderr: bool, follow: bool, control: &Control) {
    let path = session.log_path(stderr);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return link.fail(&format!("cannot read {}: {e}", path.display())),
    };
    let mut buf = vec![0u8; 64 * 1024];
    // Whether the session had ended before the last read to EOF began.
    let mut last_pass = !follow;
    loop {
        match file.read(&mut buf) {
            Ok(0) if last_pass => break,
            Ok(0) => {
                if control.is_closed() {
                    return;
                }
                last_pass = session.is_over();
                if !last_pass {
                    std::thread::sleep(FOLLOW_POLL);
                }
            }
            Ok(n) => {
                if link.send(FrameKind::Data, buf[..n].to_vec()).is_err() || control.is_closed() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return link.fail(&format!("cannot read {}: {e}", path.display())),
        }
    }
    let _ = link.json(FrameKind::Response, &AgentResponse::Session(session.state()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supervisor_in(dir: &Path) -> Supervisor {
        exec::start_reaper_for_tests();
        Supervisor::new(dir.to_owned())
    }

    fn start(sup: &Supervisor, id: &str, argv: &[&str], stdin: bool) -> SessionState {
        sup.start(SessionStart {
            id: id.into(),
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            cwd: Some("/".into()),
            stdin,
            ..Default::default()
        })
    }

    fn wait_over(sup: &Supervisor, id: &str) -> SessionState {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = sup.get(id).expect("known").state();
            if state.status == GuestSessionStatus::Exited {
                return state;
            }
            assert!(Instant::now() < deadline, "session {id} did not end: {state:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The next output event, or panics after a while.
    fn next_output(rx: &Receiver<Event>) -> (FrameKind, Vec<u8>) {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Output(kind, bytes)) => (kind, bytes),
            other => panic!("expected output, got {other:?}"),
        }
    }

    #[test]
    fn output_goes_to_the_logs_and_the_exit_is_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sup = supervisor_in(dir.path());
        let state = start(&sup, "s1", &["sh", "-c", "echo out; echo err >&2; exit 3"], false);
        // A quick command may be over by the time the answer is made.
        assert_ne!(state.status, GuestSessionStatus::Failed, "{state:?}");
        assert!(state.pid.is_some_and(|p| p > 1));
        let over = wait_over(&sup, "s1");
        assert_eq!(over.exit, Some(ExitStatus { code: 3, signal: None }));
        assert!(over.ended_ms_ago.is_some() && over.started_ms_ago >= over.ended_ms_ago);
        assert_eq!(std::fs::read_to_string(dir.path().join("s1/stdout")).expect("stdout"), "out\n");
        assert_eq!(std::fs::read_to_string(dir.path().join("s1/stderr")).expect("stderr"), "err\n");
        assert_eq!(sup.list().len(), 1);
    }

    #[test]
    fn failed_checks_name_their_stage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sup = supervisor_in(dir.path());
        let missing = start(&sup, "s1", &["no-such-command-xyz"], false);
        assert_eq!(missing.status, GuestSessionStatus::Failed);
        let failure = missing.failure.expect("failure");
        assert_eq!(
            (failure.stage.as_str(), failure.message.as_str()),
            ("command", "no-such-command-xyz: command not found")
        );
        let bad_cwd = sup.start(SessionStart {
            id: "s2".into(),
            argv: vec!["true".into()],
            cwd: Some("/no/such/dir".into()),
            ..Default::default()
        });
        let failure = bad_cwd.failure.expect("failure");
        assert_eq!(failure.stage, "cwd");
        assert!(failure.message.contains("/no/such/dir does not exist"), "{}", failure.message);
        let bad_id = start(&sup, "../etc", &["true"], false);
        assert_eq!(bad_id.failure.map(|f| f.stage).as_deref(), Some("request"));
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, "not a dir").expect("write");
        let sup = Supervisor::new(not_a_dir);
        let no_logs = start(&sup, "s3", &["true"], false);
        assert_eq!(no_logs.failure.map(|f| f.stage).as_deref(), Some("logs"));
        assert!(sup.list().is_empty(), "failed starts are not kept");
    }

    #[test]
    fn term_ends_the_process_group_with_143() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sup = supervisor_in(dir.path());
        // The shell's child sleeps in the same process group: it must go too.
        start(&sup, "s1", &["sh", "-c", "sleep 60 & wait"], false);
        let session = sup.get("s1").expect("known");
        session.signal(Signal::SIGTERM);
        let over = wait_over(&sup, "s1");
        assert_eq!(over.exit, Some(ExitStatus { code: 143, signal: Some(15) }));
    }

    #[test]
    fn stdin_attach_is_exclusive_and_reattach_replays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sup = supervisor_in(dir.path());
        start(&sup, "s1", &["sh", "-c", "while read line; do echo got:$line; done; echo bye"], true);
        let session = sup.get("s1").expect("known");
        let first = session.attach(true, sup.token()).expect("first attach");
        assert!(session.state().stdin_attached);
        let refused = session.attach(true, sup.token()).err().unwrap_or_default();
        assert!(refused.contains("already attached"), "{refused}");
        let watcher = session.attach(false, sup.token()).expect("a watcher without stdin is fine");
        session.write_stdin(watcher.token, b"ignored\n".to_vec());
        session.write_stdin(first.token, b"one\n".to_vec());
        assert_eq!(next_output(&first.rx), (FrameKind::Stdout, b"got:one\n".to_vec()));
        assert_eq!(next_output(&watcher.rx), (FrameKind::Stdout, b"got:one\n".to_vec()));
        session.detach(first.token);
        session.detach(watcher.token);
        assert!(!session.state().stdin_attached);

        let second = session.attach(true, sup.token()).expect("reattach");
        assert_eq!(next_output(&second.rx), (FrameKind::Stdout, b"got:one\n".to_vec()), "the log's tail first");
        session.write_stdin(second.token, b"two\n".to_vec());
        assert_eq!(next_output(&second.rx), (FrameKind::Stdout, b"got:two\n".to_vec()));
        session.write_stdin(second.token, Vec::new());
        assert_eq!(next_output(&second.rx), (FrameKind::Stdout, b"bye\n".to_vec()));
        match second.rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Exit(status)) => assert_eq!(status.code, 0),
            other => panic!("expected the exit, got {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(dir.path().join("s1/stdout")).expect("log"), "got:one\ngot:two\nbye\n");
        // An ended session still replays, then reports its exit at once.
        let late = session.attach(true, sup.token()).expect("attach after the end");
        assert!(matches!(late.rx.recv_timeout(Duration::from_secs(1)), Ok(Event::Output(FrameKind::Stdout, _))));
        assert!(matches!(late.rx.recv_timeout(Duration::from_secs(1)), Ok(Event::Exit(_))));
    }

    #[test]
    fn a_watcher_that_falls_behind_is_dropped_not_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sup = supervisor_in(dir.path());
        start(&sup, "s1", &["sleep", "60"], false);
        let session = sup.get("s1").expect("known");
        let slow = session.attach(false, sup.token()).expect("attach");
        let keeping_up = session.attach(false, sup.token()).expect("attach");
        for _ in 0..=WATCH_QUEUE {
            session.output(0, b"x");
            while keeping_up.rx.try_recv().is_ok() {}
        }
        assert!(slow.lagged.load(Ordering::SeqCst));
        assert!(!keeping_up.lagged.load(Ordering::SeqCst));
        assert_eq!(slow.rx.try_iter().count(), WATCH_QUEUE, "what was queued is still delivered");
        assert!(slow.rx.recv_timeout(Duration::from_millis(10)).is_err(), "then it is cut off");
        let log = std::fs::read(dir.path().join("s1/stdout")).expect("log");
        assert_eq!(log.len(), WATCH_QUEUE + 1, "the log has everything");
        session.signal(Signal::SIGKILL);
        assert_eq!(wait_over(&sup, "s1").exit, Some(ExitStatus { code: 137, signal: Some(9) }));
        assert!(matches!(keeping_up.rx.recv_timeout(Duration::from_secs(5)), Ok(Event::Exit(_))));
    }
}
