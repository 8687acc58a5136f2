//! Running commands: `PATH` lookup, a `CLONE_VFORK` child (a fork to enter a container) that
//! execs in a new session with piped stdio, and the one reaper that `waitpid(-1)`s every child
//! (and, as PID 1, every orphan) and routes each exit status by pid to whoever spawned it.
//!
//! With a `tty` the child's stdio is the slave of a new pty (`pty.rs`), its controlling
//! terminal, and its output one stream read from the master.
//!
//! `std::process::Command` is not used: on a failed exec it `waitpid`s the child itself, which
//! races with the reaper. Here a failed exec makes the child `_exit(127)` after writing its
//! errno to a close-on-exec pipe, and the reaper collects it like any other child.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd as _, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use banger_proto::agent::{AgentResponse, ExecRequest, ExitStatus, FrameKind, TtySize};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{access, AccessFlags, Pid};

use crate::channel::{self, Link};

/// `PATH` when the request gives none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a command did not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Nothing by that name on `PATH` (or at that path).
    #[error("{0}: command not found")]
    NotFound(String),
    /// Found, but not an executable file.
    #[error("{0}: permission denied")]
    NotExecutable(String),
    /// `execve` itself failed.
    #[error("{program}: cannot execute: {errno}")]
    Exec {
        /// The resolved program.
        program: String,
        /// What `execve` said.
        errno: Errno,
    },
    /// An argument or variable with a NUL byte.
    #[error("argument or environment contains a NUL byte")]
    Nul,
    /// No argv at all.
    #[error("empty argv")]
    Empty,
    /// The pty could not be made.
    #[error("cannot give the command a terminal")]
    Pty(#[source] crate::pty::PtyError),
    /// `pipe2`, `open` or `fork` failed.
    #[error("cannot {what}")]
    Sys {
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        errno: Errno,
    },
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl SpawnError {
    /// The shell's exit code for this failure: 127 not found, 126 not runnable.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NotFound(_) => 127,
            Self::Exec { errno: Errno::ENOENT, .. } => 127,
            _ => 126,
        }
    }
}

/// Where a child's standard stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// /dev/null.
    Null,
    /// A pipe whose other end the caller gets.
    Pipe,
    /// The agent's own fd.
    Inherit,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Command {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when it does not exist.
    pub cwd: PathBuf,
    /// stdin, stdout, stderr (ignored with `tty`).
    pub stdio: [Stdio; 3],
    /// Run on a new pty of this size: stdin, stdout and stderr are its slave.
    pub tty: Option<TtySize>,
}

impl Command {
    /// `argv` with the default environment, cwd `/`, all stdio inherited.
    pub fn new(argv: &[&str]) -> Self {
        Self {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: default_env(&[]),
            cwd: PathBuf::from("/"),
            stdio: [Stdio::Inherit; 3],
            tty: None,
        }
    }
}

/// The default environment with `extra` laid over it.
pub fn default_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [("PATH", DEFAULT_PATH), ("HOME", "/root"), ("TERM", "xterm-256color")]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (key, value) in extra {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => env.push((key.clone(), value.clone())),
        }
    }
    env
}

/// A started child.
#[derive(Debug)]
pub struct Child {
    /// Its pid, also its process group and session id.
    pub pid: Pid,
    /// Our ends of the pipes asked for, in stdio order.
    pub pipes: [Option<OwnedFd>; 3],
    /// The pty's master, with `tty`.
    pub pty: Option<OwnedFd>,
    /// Receives its exit status once reaped.
    pub exit: mpsc::Receiver<ExitStatus>,
}

/// Finds `program` the way a shell does: as given when it has a `/`, else on `path`.
pub fn resolve(program: &str, path: &str) -> Result<PathBuf, SpawnError> {
    let runnable = |p: &Path| p.is_file() && access(p, AccessFlags::X_OK).is_ok();
    if program.contains('/') {
        let p = Path::new(program);
        return if runnable(p) {
            Ok(p.to_owned())
        } else if p.exists() {
            Err(SpawnError::NotExecutable(program.to_owned()))
        } else {
            Err(SpawnError::NotFound(program.to_owned()))
        };
    }
    let mut found_other = false;
    if !program.is_empty() {
        for dir in path.split(':') {
            let candidate = Path::new(if dir.is_empty() { "." } else { dir }).join(program);
            if runnable(&candidate) {
                return Ok(candidate);
            }
            found_other |= candidate.is_file();
        }
    }
    Err(if found_other {
        SpawnError::NotExecutable(program.to_owned())
    } else {
        SpawnError::NotFound(program.to_owned())
    })
}

fn cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| SpawnError::Sys { what: "create a pipe", errno })
}

/// The exit status as the protocol reports it.
fn exit_status(status: WaitStatus) -> Option<(Pid, ExitStatus)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, ExitStatus { code, signal: None })),
        WaitStatus::Signaled(pid, signal, _) => {
            let n = signal as i32;
            Some((pid, ExitStatus { code: 128 + n, signal: Some(n) }))
        }
        _ => None,
    }
}

/// The process-wide reaper: pid → where its status goes.
#[derive(Debug, Default)]
struct Reaper {
    state: Mutex<ReaperState>,
    spawned: Condvar,
}

#[derive(Debug, Default)]
struct ReaperState {
    routes: HashMap<i32, mpsc::Sender<ExitStatus>>,
    spawns: u64,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(Reaper::default)
}

/// Starts the reaper thread. Call once, after any `fork` that keeps running Rust code.
pub fn start_reaper() {
    let spawn = std::thread::Builder::new().name("reaper".into()).spawn(reap_forever);
    if let Err(e) = spawn {
        log!("cannot start the reaper thread: {e}");
    }
}

fn reap_forever() {
    let reaper = reaper();
    loop {
        let spawns = reaper.state.lock().map(|s| s.spawns).unwrap_or(0);
        match waitpid(Pid::from_raw(-1), None) {
            Ok(status) => {
                if let Some((pid, exit)) = exit_status(status) {
                    // Spawns insert their route while holding this lock across fork, so a
                    // child reaped at once still finds its route here.
                    let route = reaper.state.lock().ok().and_then(|mut s| s.routes.remove(&pid.as_raw()));
                    if let Some(route) = route {
                        let _ = route.send(exit);
                    }
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => {
                // No children: sleep until the next spawn; time out now and then to collect
                // orphans handed to PID 1 meanwhile.
                if let Ok(state) = reaper.state.lock() {
                    if state.spawns == spawns {
                        let _ = reaper.spawned.wait_timeout(state, Duration::from_secs(1));
                    }
                }
            }
        }
    }
}

/// Resolves `cmd` and starts it in its own session ([`vfork_exec`]). The child is reaped by the reaper
/// thread; its status arrives on [`Child::exit`].
pub fn spawn(cmd: &Command) -> Result<Child, SpawnError> {
    spawn_in(cmd, None)
}

/// [`spawn`], in a container when `container` is given: the program is then looked up on
/// `PATH` inside the container's root, by the child (`container.rs`).
pub fn spawn_in(cmd: &Command, container: Option<&crate::container::Entry>) -> Result<Child, SpawnError> {
    let first = cmd.argv.first().ok_or(SpawnError::Empty)?;
    let path_var = cmd.env.iter().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program = match container {
        Some(_) => PathBuf::from(first),
        None => resolve(first, path_var)?,
    };
    let program_c = cstring(program.as_os_str().as_bytes())?;
    let argv: Vec<CString> = cmd.argv.iter().map(|a| cstring(a.as_bytes())).collect::<Result<_, _>>()?;
    let env: Vec<CString> =
        cmd.env.iter().map(|(k, v)| cstring(format!("{k}={v}").as_bytes())).collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let cwd = cstring(cmd.cwd.as_os_str().as_bytes())?;
    let root = cstring(b"/")?;

    // Child ends (dup2'd onto 0, 1, 2) and our ends.
    let mut child_fds: [Option<OwnedFd>; 3] = [None, None, None];
    let mut ours: [Option<OwnedFd>; 3] = [None, None, None];
    for (i, mode) in cmd.stdio.iter().enumerate() {
        match mode {
            Stdio::Inherit => {}
            Stdio::Null => {
                let flags = if i == 0 { nix::fcntl::OFlag::O_RDONLY } else { nix::fcntl::OFlag::O_WRONLY };
                let fd =
                    nix::fcntl::open("/dev/null", flags | nix::fcntl::OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
                        .map_err(|errno| SpawnError::Sys { what: "open /dev/null", errno })?;
                // SAFETY: `open` just returned this fd and nothing else owns it.
                child_fds[i] = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            Stdio::Pipe => {
                let (read, write) = pipe()?;
                if i == 0 {
                    child_fds[i] = Some(read);
                    ours[i] = Some(write);
                } else {
                    child_fds[i] = Some(write);
                    ours[i] = Some(read);
                }
            }
        }
    }
    let pty = match cmd.tty {
        Some(size) => Some(crate::pty::open(size).map_err(SpawnError::Pty)?),
        None => None,
    };
    let child_raw: [i32; 3] = match &pty {
        Some((_, slave)) => [slave.as_raw_fd(); 3],
        None => [0, 1, 2].map(|i| child_fds[i].as_ref().map_or(-1, |fd| fd.as_raw_fd())),
    };
    let ctty = pty.is_some();
    let (err_read, err_write) = pipe()?;
    let err_write_raw = err_write.as_raw_fd();

    let (tx, rx) = mpsc::channel();
    let reaper = reaper();
    let pid = {
        // Held across the spawn so the reaper cannot look up this pid before its route exists.
        let mut state =
            reaper.state.lock().map_err(|_| SpawnError::Sys { what: "lock the reaper", errno: Errno::EDEADLK })?;
        let child = ChildExec {
            program: program_c.as_ptr(),
            argv: &argv_ptrs,
            env: &env_ptrs,
            cwd: &cwd,
            root: &root,
            io: ChildIo { stdio: child_raw, ctty, err_fd: err_write_raw, container },
        };
        let pid = match container {
            // Entering a container (mounts, pivot_root) runs in a forked child of its own.
            Some(_) => fork_exec(&child),
            None => vfork_exec(&child),
        };
        if pid < 0 {
            return Err(SpawnError::Sys { what: "fork", errno: Errno::last() });
        }
        state.routes.insert(pid, tx);
        state.spawns += 1;
        reaper.spawned.notify_all();
        pid
    };
    drop(child_fds);
    drop(err_write);
    // Only the child holds the slave now: its last close ends the master's reads.
    let pty = pty.map(|(master, _slave)| master);

    // The child closes its copy on a successful exec (EOF here) or writes its errno.
    let mut errno_bytes = [0u8; 4];
    let mut got = 0;
    let mut err_file = std::fs::File::from(err_read);
    while got < 4 {
        match err_file.read(&mut errno_bytes[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got == 4 {
        // The child has `_exit`ed (or will): the reaper collects it; nobody waits for it.
        let _ = rx.recv_timeout(Duration::from_secs(1));
        return Err(SpawnError::Exec {
            program: program.display().to_string(),
            errno: Errno::from_raw(i32::from_ne_bytes(errno_bytes)),
        });
    }
    Ok(Child { pid: Pid::from_raw(pid), pipes: ours, pty, exit: rx })
}

/// What the child of a spawn runs: everything prepared before the fork or clone.
struct ChildExec<'a> {
    program: *const libc::c_char,
    argv: &'a [*const libc::c_char],
    env: &'a [*const libc::c_char],
    cwd: &'a CString,
    root: &'a CString,
    io: ChildIo<'a>,
}

/// The child's stack for [`vfork_exec`]: it only makes syscalls before `execve`.
const VFORK_STACK: usize = 64 * 1024;

/// `fork`s a child that runs `child`; returns its pid (-1 on failure, with `errno` set).
fn fork_exec(child: &ChildExec<'_>) -> libc::pid_t {
    // SAFETY: the child only makes async-signal-safe calls (setsid, sigprocmask, signal,
    // dup2, chdir, execve, write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above; every pointer refers to a live, NUL-terminated buffer.
        unsafe { exec_child(child) }
    }
    pid
}

/// Starts a child that shares this process's memory until its `execve` (`CLONE_VM |
/// CLONE_VFORK`, as `posix_spawn` does): no page tables are copied and the agent takes no
/// copy-on-write faults afterwards, which under TCG is most of what a fork costs. This thread
/// waits until the child has exec'd or exited. Returns its pid (-1 on failure, `errno` set).
fn vfork_exec(child: &ChildExec<'_>) -> libc::pid_t {
    extern "C" fn run(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `ChildExec` that `vfork_exec` keeps alive (its thread is
        // suspended until this child execs or exits); the child only makes syscalls.
        unsafe { exec_child(&*arg.cast::<ChildExec<'_>>()) }
    }
    let mut stack = vec![0u8; VFORK_STACK];
    // The stack grows down: the child starts at its 16-byte aligned top.
    let top = {
        let end = stack.as_mut_ptr_range().end as usize;
        (end & !15) as *mut libc::c_void
    };
    // Every signal is blocked across the clone: no handler of the agent may run on the child's
    // stack in the shared memory. The child resets every handler before it unblocks them.
    // SAFETY: sigset_t is plain data, initialised by sigfillset before use; pthread_sigmask
    // only swaps this thread's mask.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        // SAFETY: `top` is the top of a live, writable stack owned by this frame; `child`
        // outlives the call, which returns only once the child exec'd or exited.
        let pid = libc::clone(
            run,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(child).cast_mut().cast(),
        );
        let saved = *libc::__errno_location();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        *libc::__errno_location() = saved;
        pid
    };
    drop(stack);
    pid
}

/// The forked child's fds: stdin, stdout, stderr (-1 = inherit), whether stdin becomes the
/// controlling terminal, and where a failed exec's errno goes.
#[derive(Clone, Copy)]
struct ChildIo<'a> {
    stdio: [i32; 3],
    ctty: bool,
    err_fd: i32,
    container: Option<&'a crate::container::Entry>,
}

/// The forked child: new session, default signals, stdio (with `ctty`, stdin becomes the
/// controlling terminal), cwd, exec. Never returns.
///
/// # Safety
/// Only call in a freshly forked child, with NUL-terminated pointer arrays.
unsafe fn exec_child(child: &ChildExec<'_>) -> ! {
    let ChildExec { program, argv, env, cwd, root, io } = child;
    let (program, ChildIo { stdio, ctty, err_fd, container }) = (*program, *io);
    // SAFETY: plain syscalls on values owned by this child (which shares no stack with a
    // running thread); the caller guarantees the pointer arrays are NUL-terminated.
    unsafe {
        libc::setsid();
        // The agent ignores SIGPIPE (Rust's runtime does); commands expect the default. Reset
        // before unblocking: a signal must not reach one of the agent's handlers here.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for (target, fd) in (0..).zip(stdio) {
            if fd >= 0 {
                libc::dup2(fd, target);
            }
        }
        if ctty {
            // The new session's controlling terminal: its line discipline signals the
            // foreground group (Ctrl-C, Ctrl-Z) and its window size changes send SIGWINCH.
            libc::ioctl(0, libc::TIOCSCTTY, 0);
        }
        if let Some(entry) = container {
            if let Err(errno) = crate::container::enter(entry) {
                let bytes = errno.to_ne_bytes();
                libc::write(err_fd, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(126)
            }
        }
        if libc::chdir(cwd.as_ptr()) != 0 {
            libc::chdir(root.as_ptr());
        }
        let errno = match container {
            Some(entry) => crate::container::exec(entry, argv, env),
            None => {
                libc::execve(program, argv.as_ptr(), env.as_ptr());
                *libc::__errno_location()
            }
        };
        let bytes = errno.to_ne_bytes();
        libc::write(err_fd, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// Starts the reaper once per test binary (every test that spawns needs it).
#[cfg(test)]
pub fn start_reaper_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(start_reaper);
}

/// Runs `cmd` to completion (stdio as given) and returns how it ended.
pub fn run(cmd: &Command) -> Result<ExitStatus, SpawnError> {
    let child = spawn(cmd)?;
    child.exit.recv().map_err(|_| SpawnError::Sys { what: "wait for the child", errno: Errno::ECHILD })
}

/// Control over a running exec session: signals go to its process group; signals asked for
/// before it started are delivered once it has.
#[derive(Debug, Default)]
pub struct ExecControl {
    state: Mutex<ControlState>,
}

#[derive(Debug, Default)]
struct ControlState {
    pgid: Option<Pid>,
    pending: Vec<Signal>,
    killed: bool,
    /// The pty's master (a duplicate), with `tty`: for resizes and its foreground job.
    pty: Option<OwnedFd>,
    /// A resize that came before the start.
    size: Option<TtySize>,
}

impl ExecControl {
    /// Records the started process group (and its pty) and delivers what was asked meanwhile.
    pub fn started(&self, pgid: Pid, pty: Option<OwnedFd>) {
        if let Ok(mut state) = self.state.lock() {
            state.pgid = Some(pgid);
            state.pty = pty;
            let pending = state.size.take();
            if let (Some(master), Some(size)) = (&state.pty, pending) {
                let _ = crate::pty::resize(master.as_fd(), size);
            }
            if state.killed {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            for signal in std::mem::take(&mut state.pending) {
                let _ = killpg(pgid, signal);
            }
        }
    }

    /// Sends `signal` to the whole command.
    pub fn signal(&self, signal: Signal) {
        if let Ok(mut state) = self.state.lock() {
            match state.pgid {
                Some(pgid) => {
                    let _ = killpg(pgid, signal);
                }
                None => state.pending.push(signal),
            }
        }
    }

    /// SIGKILLs the process group, now or as soon as it exists (with a pty, also the job in
    /// its foreground: a shell runs each job in a group of its own).
    pub fn kill(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.killed = true;
            if let Some(job) = state.pty.as_ref().and_then(|m| crate::pty::foreground(m.as_fd())) {
                let _ = killpg(job, Signal::SIGKILL);
            }
            if let Some(pgid) = state.pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
        }
    }

    /// Sets the pty's window size (nothing without a pty; once started, if asked before).
    pub fn resize(&self, size: TtySize) {
        if let Ok(mut state) = self.state.lock() {
            match &state.pty {
                Some(master) => {
                    if let Err(e) = crate::pty::resize(master.as_fd(), size) {
                        log!("cannot resize an exec's terminal: {e}");
                    }
                }
                None if state.pgid.is_none() => state.size = Some(size),
                None => {}
            }
        }
    }
}

impl channel::Process for ExecControl {
    fn signal(&self, signal: Signal) {
        ExecControl::signal(self, signal);
    }

    fn kill(&self) {
        ExecControl::kill(self);
    }

    fn resize(&self, size: TtySize) {
        ExecControl::resize(self, size);
    }
}

/// Serves one `exec` channel: starts the command, forwards stdin, streams stdout and stderr,
/// and sends `Exit` once both pipes are at EOF and the process has been reaped.
pub fn session(link: Link, req: ExecRequest, control: Arc<ExecControl>, stdin: Option<mpsc::Receiver<Vec<u8>>>) {
    let container = match container_entry(&req) {
        Ok(entry) => entry,
        Err(e) => {
            link.fail(&chain(&e));
            return link.finish();
        }
    };
    // The image's user, working directory and environment are the defaults (a container's
    // come whole from its spec).
    let (argv, env, default_cwd) = match &container {
        Some(_) => (req.argv, crate::container::environment(&req.env), PathBuf::from("/")),
        None => crate::services::exec_defaults(crate::services::image_meta(), req.argv, &req.env),
    };
    let cwd = match &req.cwd {
        Some(dir) if container.is_some() => PathBuf::from(dir),
        Some(dir) if !Path::new(dir).is_dir() => {
            link.fail(&format!("working directory {dir} does not exist"));
            return link.finish();
        }
        Some(dir) => PathBuf::from(dir),
        None => default_cwd,
    };
    let stdin_mode = if req.stdin { Stdio::Pipe } else { Stdio::Null };
    let tty = req.tty.filter(|size| size.check().is_none());
    if req.tty.is_some() && tty.is_none() {
        link.fail("the terminal size is out of range");
        return link.finish();
    }
    let stdio = [stdin_mode, Stdio::Pipe, Stdio::Pipe];
    let cmd = Command { argv, env, cwd, stdio, tty };
    let child = match spawn_in(&cmd, container.as_ref()) {
        Ok(child) => child,
        Err(e @ (SpawnError::Nul | SpawnError::Empty | SpawnError::Sys { .. } | SpawnError::Pty(_))) => {
            link.fail(&chain(&e));
            return link.finish();
        }
        Err(e) => {
            let _ = link.send(FrameKind::Stderr, format!("banger-agent: {e}\n").into_bytes());
            let _ = link.json(FrameKind::Exit, &ExitStatus { code: e.exit_code(), signal: None });
            return link.finish();
        }
    };
    let master = child.pty;
    control.started(child.pid, master.as_ref().and_then(|m| m.try_clone().ok()));
    let pid = u32::try_from(child.pid.as_raw()).unwrap_or_default();
    let _ = link.json(FrameKind::Response, &AgentResponse::Started { pid });
    if let Some(master) = master {
        return tty_session(&link, master, child.exit, stdin);
    }
    let [stdin_fd, stdout_fd, stderr_fd] = child.pipes;
    if let (Some(fd), Some(rx)) = (stdin_fd, stdin) {
        let spawned = std::thread::Builder::new().name("stdin".into()).spawn(move || feed(fd, &rx));
        if let Err(e) = spawned {
            log!("cannot start a stdin thread: {e}");
        }
    }
    let mut pumps = Vec::new();
    for (fd, kind) in [(stdout_fd, FrameKind::Stdout), (stderr_fd, FrameKind::Stderr)] {
        let Some(fd) = fd else { continue };
        let link = link.clone();
        match std::thread::Builder::new().name("pump".into()).spawn(move || pump(fd, &link, kind)) {
            Ok(handle) => pumps.push(handle),
            Err(e) => log!("cannot start an output thread: {e}"),
        }
    }
    let status = child.exit.recv();
    for pump in pumps {
        let _ = pump.join();
    }
    match status {
        Ok(status) => {
            let _ = link.json(FrameKind::Exit, &status);
        }
        Err(_) => link.fail("the command's exit status was lost"),
    }
    link.finish();
}

/// A container request's entry (its root mounted first), or `None` for a plain exec.
fn container_entry(req: &ExecRequest) -> Result<Option<crate::container::Entry>, crate::container::ContainerError> {
    let Some(spec) = &req.container else { return Ok(None) };
    let path = req.env.iter().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program = req.argv.first().map_or("", String::as_str);
    crate::container::Entry::new(spec, program, path).map(Some)
}

/// The rest of a `tty` exec: host stdin is typed into the master, the master's output streams
/// as `Stdout` (read to its end, bounded after the exit), then `Exit`.
fn tty_session(link: &Link, master: OwnedFd, exit: mpsc::Receiver<ExitStatus>, stdin: Option<mpsc::Receiver<Vec<u8>>>) {
    if let Some(rx) = stdin {
        match master.try_clone() {
            Ok(fd) => {
                // An empty chunk (the host's EOF) ends the typing; the terminal stays.
                if let Err(e) = std::thread::Builder::new().name("tty-stdin".into()).spawn(move || feed(fd, &rx)) {
                    log!("cannot start a stdin thread: {e}");
                }
            }
            Err(e) => log!("cannot duplicate a pty master: {e}"),
        }
    }
    let status: Arc<Mutex<Option<Result<ExitStatus, mpsc::RecvError>>>> = Arc::default();
    let waiter = {
        let status = Arc::clone(&status);
        std::thread::Builder::new().name("tty-wait".into()).spawn(move || {
            let got = exit.recv();
            if let Ok(mut slot) = status.lock() {
                *slot = Some(got);
            }
        })
    };
    if let Err(e) = &waiter {
        log!("cannot start a waiter thread: {e}");
    }
    let exited = || status.lock().map_or(true, |s| s.is_some());
    let mut connected = true;
    crate::pty::pump(master, exited, |bytes| {
        if connected {
            connected = link.send(FrameKind::Stdout, bytes.to_vec()).is_ok();
        }
        // After the host has gone, keep reading (and dropping) so the command never blocks.
        true
    });
    if let Ok(waiter) = waiter {
        let _ = waiter.join();
    }
    let status = status.lock().ok().and_then(|mut s| s.take());
    match status {
        Some(Ok(status)) => {
            let _ = link.json(FrameKind::Exit, &status);
        }
        _ => link.fail("the command's exit status was lost"),
    }
    link.finish();
}

/// Copies host stdin chunks into the command; an empty chunk closes its stdin.
fn feed(fd: OwnedFd, chunks: &mpsc::Receiver<Vec<u8>>) {
    let mut pipe = std::fs::File::from(fd);
    for chunk in chunks {
        if chunk.is_empty() || pipe.write_all(&chunk).is_err() {
            return;
        }
    }
}

/// Streams one output pipe to the host until EOF. While the host grants no credit `send`
/// waits, so the pipe is not read and a command that writes faster than the host's client
/// reads blocks on it. After the host has gone (or closed the channel) it keeps reading (and
/// dropping) so the command never blocks on a full pipe.
fn pump(fd: OwnedFd, link: &Link, kind: FrameKind) {
    let mut pipe = std::fs::File::from(fd);
    let mut buf = vec![0u8; 64 * 1024];
    let mut connected = true;
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if connected {
                    connected = link.send(kind, buf[..n].to_vec()).is_ok();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn resolve_follows_path_and_reports_shell_codes() {
        assert_eq!(resolve("sh", DEFAULT_PATH).expect("sh").file_name(), Some(OsStr::new("sh")));
        let err = resolve("no-such-command-xyz", DEFAULT_PATH).expect_err("missing");
        assert_eq!(err.exit_code(), 127);
        assert_eq!(err.to_string(), "no-such-command-xyz: command not found");
        let err = resolve("/etc/passwd", DEFAULT_PATH).expect_err("not executable");
        assert_eq!(err.exit_code(), 126);
        let err = resolve("passwd", "/etc").expect_err("not executable on PATH");
        assert_eq!(err.exit_code(), 126);
    }

    #[test]
    fn extra_env_overrides_defaults() {
        let env = default_env(&[("TERM".into(), "dumb".into()), ("X".into(), "1".into())]);
        assert!(env.contains(&("TERM".into(), "dumb".into())));
        assert!(env.contains(&("X".into(), "1".into())));
        assert!(env.contains(&("HOME".into(), "/root".into())));
    }

    #[test]
    fn spawn_runs_and_the_reaper_routes_statuses() {
        start_reaper_once();
        let mut cmd = Command::new(&["sh", "-c", "exit 3"]);
        cmd.stdio = [Stdio::Null; 3];
        assert_eq!(run(&cmd).expect("run"), ExitStatus { code: 3, signal: None });
        let mut cmd = Command::new(&["sh", "-c", "kill -TERM $$"]);
        cmd.stdio = [Stdio::Null; 3];
        assert_eq!(run(&cmd).expect("run"), ExitStatus { code: 143, signal: Some(15) });
    }

    fn start_reaper_once() {
        start_reaper_for_tests();
    }

    /// Reads `master` until `needle` has come (or panics at the deadline); what came so far.
    fn read_until(master: &std::fs::File, seen: &mut Vec<u8>, needle: &str) {
        use std::os::fd::AsFd as _;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(seen).contains(needle) {
            assert!(std::time::Instant::now() < deadline, "no {needle:?} in {:?}", String::from_utf8_lossy(seen));
            let mut fds = [nix::poll::PollFd::new(master.as_fd(), nix::poll::PollFlags::POLLIN)];
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8)).unwrap_or(0) == 0 {
                continue;
            }
            match (&*master).read(&mut buf) {
                Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                other => panic!("the pty ended early ({other:?}): {:?}", String::from_utf8_lossy(seen)),
            }
        }
    }

    #[test]
    fn a_tty_command_gets_a_controlling_terminal_of_its_size_and_ctrl_c_signals_it() {
        start_reaper_once();
        let script = "tty; stty size; test -t 0 && test -t 2 && echo all-a-tty; \
                      trap 'echo got-int; exit 5' INT; echo ready; while :; do sleep 0.1; done";
        let mut cmd = Command::new(&["sh", "-c", script]);
        cmd.tty = Some(TtySize { rows: 33, cols: 101 });
        let child = spawn(&cmd).expect("spawn");
        assert!(child.pipes.iter().all(Option::is_none), "no pipes with a tty");
        let master = std::fs::File::from(child.pty.expect("a pty"));
        let mut seen = Vec::new();
        read_until(&master, &mut seen, "ready");
        let text = String::from_utf8_lossy(&seen).into_owned();
        assert!(text.starts_with("/dev/pts/"), "{text}");
        assert!(text.contains("33 101\r\n") && text.contains("all-a-tty"), "{text}");
        // Ctrl-C is a byte: the line discipline turns it into SIGINT for the foreground group.
        (&master).write_all(b"\x03").expect("type Ctrl-C");
        read_until(&master, &mut seen, "got-int");
        let status = child.exit.recv_timeout(Duration::from_secs(20)).expect("it ends");
        assert_eq!(status, ExitStatus { code: 5, signal: None });
    }
}
