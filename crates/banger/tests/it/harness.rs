//! A per-test banger installation: its own state dir and socket, the real binaries, and a
//! daemon that is stopped when the test ends, pass or fail.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub socket: PathBuf,
    /// The private network namespace the daemon (started by the CLI) and its VMs live in.
    pub netns: Option<String>,
}

/// Prefix of the network namespaces tests make: `bgt-<test pid>-<n>`.
pub const NETNS_PREFIX: &str = "bgt-";

/// Deletes test namespaces whose test process is gone (a run killed before its clean-up).
pub fn sweep_stale_netns() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(NETNS_PREFIX).and_then(|r| r.split('-').next()?.parse::<u32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            delete_netns(&name);
        }
    }
}

/// Kills every process in namespace `name` (the daemon, VMMs), then deletes it.
pub fn delete_netns(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

pub fn banger_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

pub fn bangerd_exe() -> PathBuf {
    let p = banger_exe().with_file_name("bangerd");
    assert!(p.is_file(), "{} is missing: build the workspace first (`cargo build --workspace --bins`)", p.display());
    p
}

/// Finished command: status, stdout, stderr.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }

    #[track_caller]
    pub fn fails(self, code: i32, stderr_has: &str) -> Self {
        assert_eq!(self.code, code, "exit code\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert!(self.stderr.contains(stderr_has), "stderr lacks {stderr_has:?}: {}", self.stderr);
        assert_eq!(
            self.stderr.trim().lines().filter(|l| l.starts_with("banger:")).count(),
            1,
            "one error line: {}",
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails_plain(self, code: i32) -> Self {
        assert_eq!(self.code, code, "exit code\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("banger-it-").tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let socket = dir.path().join("run/bangerd.sock");
        Self { dir, state, socket, netns: None }
    }

    /// An env whose daemon and VMs run in a private network namespace of their own (with only
    /// `lo`, up): nothing they do on the network reaches the host's namespace or outside.
    pub fn new_in_netns() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("{NETNS_PREFIX}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let ok = Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        assert!(ok, "cannot create network namespace {name}: the real-guest tier needs root and iproute2");
        let up = Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]).status();
        assert!(up.is_ok_and(|s| s.success()), "cannot bring lo up in {name}");
        let mut env = Self::new();
        env.netns = Some(name);
        env
    }

    /// Moves the calling thread (and the threads it spawns from now on) into this env's network
    /// namespace, so that plain sockets of the test reach the daemon's listeners and guests.
    pub fn enter_netns(&self) {
        let Some(ns) = &self.netns else { return };
        let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the test namespace");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
    }

    /// `program args...` run inside this env's namespace (or directly without one).
    pub fn in_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// An env on given paths (not removed on drop; the daemon is still stopped).
    pub fn at(state: PathBuf, socket: PathBuf) -> Self {
        let dir = tempfile::Builder::new().prefix("banger-it-").tempdir().expect("tempdir");
        Self { dir, state, socket, netns: None }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.in_netns(banger_exe());
        c.args(args)
            .env("BANGER_STATE_DIR", &self.state)
            .env("BANGER_SOCKET", &self.socket)
            .env("BANGER_BANGERD", bangerd_exe())
            .env_remove("BANGER_LOG");
        c
    }

    pub fn banger(&self, args: &[&str]) -> Run {
        Run::from(self.cmd(args).output().expect("run banger"))
    }

    /// Runs `bangerd` in the foreground with this env's paths (for tests of the daemon itself).
    pub fn bangerd(&self) -> Command {
        let mut c = self.in_netns(bangerd_exe());
        c.arg("--state-dir").arg(&self.state).arg("--socket").arg(&self.socket);
        c
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.state.join("bangerd.lock")).ok()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// Sends raw bytes on the API socket and returns the status code and body.
    pub fn raw(&self, request: &str) -> (u16, String) {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(request.as_bytes()).expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (code, body)
    }

    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.raw(&format!(
            "{method} {path} HTTP/1.1\r\nHost: bangerd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z")))
        .unwrap_or(false)
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_alive(pid.as_raw().unsigned_abs()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(ns) = &self.netns {
            delete_netns(ns);
        }
    }
}
