//! VMM processes: spawning them in their own session, the one liveness test, signals, reaping,
//! and resource figures from `/proc`.
//!
//! # Process model
//! A VMM is spawned as a direct child of the daemon that calls `setsid()` before `exec`, so it has
//! its own session and process group: no terminal or group signal aimed at the daemon reaches
//! it, and when the daemon dies (even by SIGKILL) the VMM keeps running and is reparented to
//! init, ready to be adopted by the next daemon through its pid and [`is_alive`].
//!
//! A VMM is spawned behind a gate ([`spawn_gated`]): the child is `/bin/sh` waiting on a pipe,
//! and it becomes the VMM (`exec`, same pid) only after the daemon has written its pid to the
//! VM's pidfile. A daemon killed before that takes the pipe's write end with it and the shell
//! exits; one killed after leaves a pidfile that names the VMM, which the next daemon's
//! reconcile adopts or kills. No kill -9 can leave a VMM that no file names.
//!
//! We do not double-fork. A double fork hands reaping to init, but on some hosts PID 1 is not a
//! real init and never reaps (this development machine is one), so exited VMMs would pile up as
//! zombies. Instead the driver that spawned a VMM remembers its pid ([`Children`]) and reaps it
//! as soon as a liveness check sees it gone. A child's pid cannot be reused until its parent
//! reaps it, so reaping only pids we spawned and have not yet reaped never steals another
//! process's exit status. VMMs adopted after a daemon restart are init's children; we never reap
//! those.

use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// How often waits poll `/proc`.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The first pause of [`Children::wait_exit`], doubled up to [`POLL_INTERVAL`]: a VMM told to
/// quit is usually gone within milliseconds.
const FIRST_POLL: Duration = Duration::from_millis(2);

/// Resource use of a VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStats {
    /// CPU time used so far (user + system), in milliseconds.
    pub cpu_time_ms: u64,
    /// Resident memory in KiB.
    pub rss_kib: u64,
}

/// Why [`stats`] has no figures.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// No such process (or a zombie).
    #[error("vmm process {pid} is not running; start the vm first")]
    NotRunning {
        /// The pid.
        pid: u32,
    },
    /// A `/proc` file did not read as expected.
    #[error("cannot parse {}; is /proc mounted?", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
    },
}

/// Whether `pid` is a live (not zombie) process whose command line names `vm_dir`: some argument
/// contains `<vm_dir>/`. The command line check guards against pid reuse.
///
/// This is the one liveness test; drivers add reaping on top (see the module docs).
pub fn is_alive(pid: u32, vm_dir: &Path) -> bool {
    dir_marker(vm_dir).is_some_and(|marker| banger_host::process::pid_alive(pid, &marker))
}

/// `<dir>/`, the string a VMM's command line holds when it belongs to `dir`.
fn dir_marker(dir: &Path) -> Option<String> {
    let text = dir.to_string_lossy();
    let trimmed = text.trim_end_matches('/');
    (!trimmed.is_empty()).then(|| format!("{trimmed}/"))
}

/// Whether a NUL-separated command line has an argument containing `<dir>/`.
#[cfg(test)]
fn cmdline_names_dir(cmdline: &[u8], dir: &Path) -> bool {
    dir_marker(dir).is_some_and(|marker| banger_host::process::cmdline_contains(cmdline, &marker))
}

/// The fields of `/proc/<pid>/stat` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    state: char,
    /// User-mode CPU time in clock ticks.
    utime: u64,
    /// Kernel-mode CPU time in clock ticks.
    stime: u64,
}

/// Parses `/proc/<pid>/stat`. The command name is parenthesised and may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state); utime and stime are fields 14 and 15.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// CPU time and resident memory of `pid`.
pub fn stats(pid: u32) -> Result<VmmStats, StatsError> {
    let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
    let Ok(text) = std::fs::read_to_string(&stat_path) else {
        return Err(StatsError::NotRunning { pid });
    };
    let stat = parse_stat(&text).ok_or(StatsError::Parse { path: stat_path })?;
    if matches!(stat.state, 'Z' | 'X' | 'x') {
        return Err(StatsError::NotRunning { pid });
    }
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&status_path).map_err(|_| StatsError::NotRunning { pid })?;
    let rss_kib = kib_field(&status, "VmRSS").ok_or(StatsError::Parse { path: status_path })?;
    let ticks = stat.utime.saturating_add(stat.stime);
    Ok(VmmStats { cpu_time_ms: ticks.saturating_mul(1000) / clock_ticks_per_second(), rss_kib })
}

/// Memory of a VMM process as the host holds it, in KiB. RSS counts every page the process maps,
/// shared ones too (forks of one snapshot share its clean pages; a guest's memory file is shared
/// memory), so summing RSS over VMMs double counts; PSS divides each shared page among its
/// mappers and sums to the host's real use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmMemory {
    /// Resident set (`Rss` of `smaps_rollup`).
    pub rss_kib: u64,
    /// Proportional set (`Pss`): each shared page divided among the processes that map it.
    pub pss_kib: u64,
    /// The part of `Pss` in shared memory (`Pss_Shmem`: a guest's tmpfs memory file).
    pub pss_shmem_kib: u64,
    /// Resident shared memory (`RssShmem` of `status`).
    pub rss_shmem_kib: u64,
    /// What the guest's memory file on `/dev/shm` holds (its allocated blocks), when the VMM
    /// has one open: pages it holds stay in memory even where the VMM has not mapped them.
    pub memory_file_kib: Option<u64>,
    /// What the snapshot memory a fork maps holds (the sealed copy of [`crate::balloon`]), when
    /// the VMM has one open. Every fork of that snapshot maps the same pages: this is shared,
    /// and not part of [`Self::host_kib`] beyond the share the PSS counts.
    pub snapshot_memory_kib: Option<u64>,
}

impl VmmMemory {
    /// The host memory this VMM costs: its PSS, plus what its memory file holds beyond the
    /// part of it the PSS already counts.
    pub fn host_kib(&self) -> u64 {
        let unmapped = self.memory_file_kib.unwrap_or(0).saturating_sub(self.pss_shmem_kib);
        self.pss_kib.saturating_add(unmapped)
    }
}

/// The most bytes read from one `/proc` file of a VMM (a `smaps_rollup` or `status` is ~1 KB).
const PROC_READ_CAP: u64 = 64 * 1024;
/// The most open files looked at for a memory file.
const FD_SCAN_CAP: usize = 4096;

/// The memory figures of `pid` from `/proc/<pid>/smaps_rollup`, `status` and its open files
/// (reads bounded by [`PROC_READ_CAP`] and [`FD_SCAN_CAP`]).
pub fn memory(pid: u32) -> Result<VmmMemory, StatsError> {
    let rollup_path = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
    let rollup = read_capped(&rollup_path).ok_or(StatsError::NotRunning { pid })?;
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = read_capped(&status_path).ok_or(StatsError::NotRunning { pid })?;
    let parse = |path: &Path| StatsError::Parse { path: path.to_owned() };
    let (memory_file_kib, snapshot_memory_kib) = memory_files_kib(pid);
    Ok(VmmMemory {
        rss_kib: kib_field(&rollup, "Rss").ok_or_else(|| parse(&rollup_path))?,
        pss_kib: kib_field(&rollup, "Pss").ok_or_else(|| parse(&rollup_path))?,
        pss_shmem_kib: kib_field(&rollup, "Pss_Shmem").unwrap_or(0),
        rss_shmem_kib: kib_field(&status, "RssShmem").unwrap_or(0),
        memory_file_kib,
        snapshot_memory_kib,
    })
}

fn read_capped(path: &Path) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path).ok()?.take(PROC_READ_CAP).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of a `Name:   123 kB` line (`status`, `smaps_rollup`).
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let value = text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?;
    value.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// Whether an open file's link target is a guest memory file on `/dev/shm` (its name is
/// `banger-mem-<uid>/<vm id>.mem`, " (deleted)" once unlinked).
fn is_guest_memory_file(target: &str) -> bool {
    let target = target.strip_suffix(" (deleted)").unwrap_or(target);
    target.contains("/banger-mem-") && target.ends_with(".mem")
}

/// The allocated sizes, in KiB, of the guest memory file and of the sealed snapshot memory
/// `pid` has open (one scan of its open files).
fn memory_files_kib(pid: u32) -> (Option<u64>, Option<u64>) {
    use std::os::unix::fs::MetadataExt as _;
    // The link's target is the open file itself, so this works after it is unlinked.
    let kib = |fd: &Path| std::fs::metadata(fd).ok().map(|m| m.blocks().saturating_mul(512) / 1024);
    let (mut file, mut snapshot) = (None, None);
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return (file, snapshot) };
    for entry in entries.take(FD_SCAN_CAP).flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        let target = target.to_string_lossy();
        if file.is_none() && is_guest_memory_file(&target) {
            file = kib(&entry.path());
        } else if snapshot.is_none() && crate::balloon::is_snapshot_memory(&target) {
            snapshot = kib(&entry.path());
        }
        if file.is_some() && snapshot.is_some() {
            break;
        }
    }
    (file, snapshot)
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/<pid>/stat` CPU times.
fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions and touches no memory of ours.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Reads a pidfile (a decimal pid, as QEMU's `-pidfile` writes).
pub fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|&pid| pid > 0)
}

/// Spawns `command` as a child in a session of its own and returns its pid. The child is not
/// waited for: track it in [`Children`].
#[cfg(test)]
pub(crate) fn spawn_in_own_session(command: &mut Command) -> io::Result<u32> {
    // SAFETY: the hook runs in the forked child before exec and only calls setsid(2), which is
    // async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    // Dropping `Child` neither kills nor waits; `Children` reaps it.
    Ok(command.spawn()?.id())
}

/// The shell line a gated VMM starts as: it waits for one line on fd 3, then becomes the VMM
/// (`exec`, so the pid stays the same); if fd 3 ends first, the daemon died before it recorded
/// the pid, and no VMM is started.
const GATE: &str = "read -r go <&3 || exit 111; exec 3<&-; exec \"$0\" \"$@\"";

/// The exit code of a gated child whose gate closed unopened (the `exit 111` in [`GATE`]).
#[cfg(test)]
pub(crate) const GATE_CLOSED: i32 = 111;

/// A VMM spawned behind a gate, not yet running: see [`spawn_gated`].
#[derive(Debug)]
pub(crate) struct Gated {
    /// The child's pid, which the VMM keeps once the gate opens.
    pub pid: u32,
    gate: std::os::fd::OwnedFd,
}

/// Spawns `program` with the arguments `configure` adds, in its own session, behind a gate:
/// the child is a shell that waits until [`Gated::record`] has written its pid to the VM's
/// pidfile, then execs the VMM in its place. So a VMM never runs unless its pid was recorded
/// first, wherever the daemon is killed: before the pid is written, the gate's write end dies
/// with the daemon and the shell exits ([`GATE_CLOSED`]); after, the next daemon finds the VMM
/// by its pidfile even when QEMU has not written its own yet. `configure` sets the arguments,
/// working directory and stdio (not the program).
pub(crate) fn spawn_gated(program: &Path, configure: impl FnOnce(&mut Command)) -> io::Result<Gated> {
    use std::os::fd::AsRawFd;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(GATE).arg(program);
    configure(&mut command);
    let read_fd = read.as_raw_fd();
    // SAFETY: the hook runs in the forked child before exec and calls only dup2(2), fcntl(2),
    // sched_setscheduler(2) and setsid(2), which are async-signal-safe and allocate nothing.
    // `read` outlives the spawn, so `read_fd` is open in the child.
    unsafe {
        command.pre_exec(move || {
            // `SCHED_BATCH`: a VMM's threads are CPU-bound (under TCG, wholly), so the host's
            // scheduler lets each run out its slice instead of preempting it at every wakeup
            // of another. With more guests than cores that is fewer switches and warmer caches:
            // 8 cold boots at once on 2 cores took ~5 % less time in alternated rounds. Fair
            // shares are unchanged, and a lone VMM runs as before. The policy is inherited by
            // the VMM's threads; a refusal leaves the default policy.
            let param = nix::libc::sched_param { sched_priority: 0 };
            let _ = nix::libc::sched_setscheduler(0, nix::libc::SCHED_BATCH, &param);
            if read_fd == 3 {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if nix::libc::fcntl(3, nix::libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            } else if nix::libc::dup2(read_fd, 3) == -1 {
                return Err(io::Error::last_os_error());
            }
            nix::unistd::setsid().map(drop).map_err(io::Error::from)
        });
    }
    // Dropping `Child` neither kills nor waits; `Children` reaps it.
    let pid = command.spawn()?.id();
    drop(read);
    Ok(Gated { pid, gate: write })
}

impl Gated {
    /// Writes the pid to `pidfile`, then opens the gate: the VMM starts. If the pid cannot be
    /// written the gate is dropped unopened, so the child ends without starting the VMM.
    pub(crate) fn record(self, pidfile: &Path) -> io::Result<u32> {
        std::fs::write(pidfile, format!("{}\n", self.pid))?;
        // A failed write means the child is gone already; the launch's liveness check reports it.
        if let Err(e) = nix::unistd::write(&self.gate, b"go\n") {
            tracing::debug!(pid = self.pid, error = %e, "the gated child was gone before its gate opened");
        }
        Ok(self.pid)
    }
}

/// Sends SIGKILL to `pid` if [`is_alive`] says it is the VMM of `vm_dir`. Returns whether a
/// signal was sent.
pub fn kill(pid: u32, vm_dir: &Path) -> Result<bool, Errno> {
    if !is_alive(pid, vm_dir) {
        return Ok(false);
    }
    let Some(target) = to_pid(pid) else {
        return Ok(false);
    };
    match signal::kill(target, Signal::SIGKILL) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(errno) => Err(errno),
    }
}

fn to_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().filter(|&p| p > 0).map(Pid::from_raw)
}

/// How a reaped child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExitReport(String);

impl std::fmt::Display for ExitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many exit reports of reaped children are kept for [`Children::reap`] to hand out.
const KEPT_REPORTS: usize = 64;

/// The VMM children a driver spawned (see the module docs). A child we spawned is judged alive
/// through its pid alone, with `waitpid`: until we reap it its pid cannot be reused, and its
/// command line is no evidence (between fork and exec it still reads as the daemon's). Only
/// processes we did not spawn (adopted after a restart) are judged by their command line.
#[derive(Debug, Default)]
pub(crate) struct Children {
    state: Mutex<ChildState>,
}

#[derive(Debug, Default)]
struct ChildState {
    /// Spawned and not reaped.
    running: HashSet<u32>,
    /// Reaped, with how they ended, until [`Children::reap`] hands the report out (the newest
    /// few only).
    exited: std::collections::VecDeque<(u32, ExitReport)>,
}

impl Children {
    /// Spawns a VMM behind its gate ([`spawn_gated`]), tracks it, records its pid in `pidfile`
    /// and lets it run. A pid that cannot be recorded ends the child unstarted.
    pub(crate) async fn spawn_recorded(
        &self,
        program: &Path,
        configure: impl FnOnce(&mut Command),
        pidfile: &Path,
    ) -> Result<u32, crate::LaunchError> {
        let gated = spawn_gated(program, configure)
            .map_err(|source| crate::LaunchError::Spawn { binary: program.to_owned(), source })?;
        let pid = gated.pid;
        self.track(pid);
        if let Err(source) = gated.record(pidfile) {
            // The gate closed unopened: the child ends by itself; reap it.
            let _ = self.reap_within(pid, Duration::from_secs(1)).await;
            return Err(crate::LaunchError::Prepare { path: pidfile.to_owned(), source });
        }
        Ok(pid)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ChildState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers a freshly spawned child.
    pub(crate) fn track(&self, pid: u32) {
        let mut state = self.state();
        state.exited.retain(|(p, _)| *p != pid);
        state.running.insert(pid);
    }

    /// How many children run (spawned, not reaped).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.state().running.len()
    }

    /// Whether child `pid` of ours runs (reaping it if it has exited); `None` when it is not a
    /// child of ours.
    fn poll(&self, pid: u32) -> Option<bool> {
        let mut state = self.state();
        if state.exited.iter().any(|(p, _)| *p == pid) {
            return Some(false);
        }
        if !state.running.contains(&pid) {
            return None;
        }
        let report = match to_pid(pid).map(|p| waitpid(p, Some(WaitPidFlag::WNOHANG))) {
            Some(Ok(WaitStatus::StillAlive)) => return Some(true),
            Some(Ok(WaitStatus::Exited(_, code))) => ExitReport(format!("exit status {code}")),
            Some(Ok(WaitStatus::Signaled(_, sig, _))) => ExitReport(format!("killed by {sig}")),
            // Stopped or continued: it still runs.
            Some(Ok(_)) => return Some(true),
            // Someone else reaped it (e.g. a SIGCHLD handler set to SIG_IGN), or no such pid.
            Some(Err(_)) | None => ExitReport("exit status unknown".into()),
        };
        state.running.remove(&pid);
        if state.exited.len() >= KEPT_REPORTS {
            state.exited.pop_front();
        }
        state.exited.push_back((pid, report));
        Some(false)
    }

    /// Reaps `pid` if it is one of ours and has exited; returns how it ended (once).
    pub(crate) fn reap(&self, pid: u32) -> Option<ExitReport> {
        if self.poll(pid) != Some(false) {
            return None;
        }
        let mut state = self.state();
        let at = state.exited.iter().position(|(p, _)| *p == pid)?;
        state.exited.remove(at).map(|(_, report)| report)
    }

    /// SIGKILLs `pid` if it is one of ours and waits for it (blocking; it dies at once).
    pub(crate) fn kill_and_reap(&self, pid: u32) {
        if !self.state().running.remove(&pid) {
            return;
        }
        if let Some(target) = to_pid(pid) {
            // Unreaped, so the pid is still ours even if it already exited.
            let _ = signal::kill(target, Signal::SIGKILL);
            let _ = waitpid(target, None);
        }
    }

    /// SIGKILLs `pid` if it is a child of ours not yet reaped (its pid cannot have been reused,
    /// so its command line need not be checked: it reads empty while the child execs). Returns
    /// whether it was ours.
    pub(crate) fn kill_child(&self, pid: u32) -> bool {
        let state = self.state();
        match to_pid(pid).filter(|_| state.running.contains(&pid)) {
            Some(target) => {
                let _ = signal::kill(target, Signal::SIGKILL);
                true
            }
            None => false,
        }
    }

    /// The one liveness test for a driver: a child of ours by `waitpid` (reaping it when it has
    /// exited), any other process by [`is_alive`] (pid and command line).
    pub(crate) fn is_alive(&self, pid: u32, vm_dir: &Path) -> bool {
        match self.poll(pid) {
            Some(alive) => alive,
            None => is_alive(pid, vm_dir),
        }
    }

    fn is_tracked(&self, pid: u32) -> bool {
        self.state().running.contains(&pid)
    }

    /// Waits up to `timeout` for the VMM `pid` of `vm_dir` to be gone; returns whether it is.
    /// A child of ours counts as gone once reaped: while it exits, its command line reads empty
    /// before it turns zombie.
    pub(crate) async fn wait_exit(&self, pid: u32, vm_dir: &Path, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = FIRST_POLL;
        loop {
            let alive = self.is_alive(pid, vm_dir);
            if !alive && !self.is_tracked(pid) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return !alive;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_INTERVAL);
        }
    }

    /// Waits up to `timeout` for our exited child `pid` to be reaped; returns how it ended.
    pub(crate) async fn reap_within(&self, pid: u32, timeout: Duration) -> Option<ExitReport> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(report) = self.reap(pid) {
                return Some(report);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// The last `max_lines` lines of the file at `path` (at most its last 8 KiB), for error messages.
pub(crate) fn tail_lines(path: &Path, max_lines: usize) -> String {
    const MAX_BYTES: u64 = 8 * 1024;
    let read = || -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let text = read().unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(max_lines)..].join("\n");
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

/// The first `name` on `PATH` (or `name` itself if it holds a `/`), if it is an executable file.
pub(crate) fn find_program(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if name.components().count() > 1 || name.is_absolute() {
        return executable(name).then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| executable(candidate))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let line = "4242 (qemu) (x y)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 3 0 100 1 2";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat, ProcStat { state: 'S', utime: 250, stime: 75 });
        assert_eq!(parse_stat("12 (x) Z 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_rss() {
        assert_eq!(kib_field("Name:\tqemu\nVmRSS:\t  123456 kB\nThreads: 3\n", "VmRSS"), Some(123_456));
        assert_eq!(kib_field("Name:\tkthreadd\n", "VmRSS"), None);
    }

    #[test]
    fn cmdline_must_name_the_dir() {
        let cmdline = b"qemu-system-x86_64\0-qmp\0unix:/var/vms/ab/qmp.sock,server=on\0";
        assert!(cmdline_names_dir(cmdline, Path::new("/var/vms/ab")));
        assert!(cmdline_names_dir(cmdline, Path::new("/var/vms/ab/")));
        // A prefix of another VM's dir is not a match.
        assert!(!cmdline_names_dir(cmdline, Path::new("/var/vms/a")));
        assert!(!cmdline_names_dir(cmdline, Path::new("/")));
        assert!(!cmdline_names_dir(b"", Path::new("/var/vms/ab")));
    }

    #[test]
    fn memory_fields_and_the_host_figure() {
        let rollup = "55c2-7ffe ---p 00000000 00:00 0  [rollup]\nRss:   1744 kB\nPss:   242 kB\nPss_Shmem:  100 kB\n";
        assert_eq!(kib_field(rollup, "Rss"), Some(1744));
        assert_eq!(kib_field(rollup, "Pss"), Some(242));
        assert_eq!(kib_field(rollup, "Pss_Shmem"), Some(100));
        assert_eq!(kib_field(rollup, "Pss_Anon"), None);
        let m = VmmMemory { pss_kib: 242, pss_shmem_kib: 100, memory_file_kib: Some(300), ..Default::default() };
        assert_eq!(m.host_kib(), 242 + 200, "file pages the VMM does not map are added");
        let m = VmmMemory { pss_kib: 242, pss_shmem_kib: 100, memory_file_kib: Some(50), ..Default::default() };
        assert_eq!(m.host_kib(), 242);
        assert!(is_guest_memory_file("/dev/shm/banger-mem-0/0123.mem (deleted)"));
        assert!(is_guest_memory_file("/dev/shm/banger-mem-1000/abc.mem"));
        assert!(!is_guest_memory_file("/var/lib/banger/snapshots/s/state.mem"));
    }

    #[test]
    fn memory_of_this_process() {
        let m = memory(std::process::id()).expect("memory");
        assert!(m.rss_kib > 0 && m.pss_kib > 0 && m.pss_kib <= m.rss_kib);
        assert_eq!(m.memory_file_kib, None);
    }

    #[test]
    fn stats_of_this_process() {
        let stats = stats(std::process::id()).unwrap();
        assert!(stats.rss_kib > 0);
        assert!(matches!(super::stats(u32::MAX), Err(StatsError::NotRunning { .. })));
    }

    #[test]
    fn pidfile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.pid");
        std::fs::write(&path, "1234\n").unwrap();
        assert_eq!(read_pidfile(&path), Some(1234));
        std::fs::write(&path, "x").unwrap();
        assert_eq!(read_pidfile(&path), None);
        assert_eq!(read_pidfile(&dir.path().join("none")), None);
    }

    #[test]
    fn finds_programs() {
        assert!(find_program(Path::new("sh")).is_some());
        assert!(find_program(Path::new("/bin/sh")).is_some());
        assert!(find_program(Path::new("surely-not-a-program-banger")).is_none());
        assert!(find_program(Path::new("/nonexistent/sh")).is_none());
    }

    #[test]
    fn tails_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("err");
        std::fs::write(&path, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(tail_lines(&path, 2), "c\nd");
        assert_eq!(tail_lines(&path, 10), "a\nb\nc\nd");
        assert_eq!(tail_lines(&dir.path().join("none"), 3), "(empty)");
    }

    #[tokio::test]
    async fn spawned_child_lives_in_its_own_session_and_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let marker = format!("{}/marker", vm_dir.display());
        std::fs::write(&marker, "").unwrap();
        // `tail -f` leaves no grandchild behind when killed, and its command line names the dir.
        let mut command = Command::new("sh");
        command.args(["-c", "exec tail -f \"$0\"", &marker]).stdin(Stdio::null()).stdout(Stdio::null());
        let pid = spawn_in_own_session(&mut command).unwrap();
        let children = Children::default();
        children.track(pid);

        assert!(children.is_alive(pid, &vm_dir));
        // The free `is_alive`/`kill` judge by command line (for processes we did not spawn), and
        // while the shell execs `tail` the kernel shows an empty one: wait until it names the dir.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_alive(pid, &vm_dir) {
            assert!(std::time::Instant::now() < deadline, "the child's command line never named its dir");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!is_alive(pid, dir.path().join("other").as_path()));
        let sid = nix::unistd::getsid(to_pid(pid)).unwrap();
        assert_eq!(sid.as_raw(), i32::try_from(pid).unwrap(), "child leads its own session");

        assert!(kill(pid, &vm_dir).unwrap());
        assert!(children.wait_exit(pid, &vm_dir, Duration::from_secs(5)).await);
        // Reaped: no zombie left, and the pid is forgotten.
        assert!(!Path::new(&format!("/proc/{pid}")).exists() || !is_alive(pid, &vm_dir));
        assert_eq!(children.tracked(), 0);
        assert!(!kill(pid, &vm_dir).unwrap());
    }

    /// Waits (5 s at most) for `path` to exist.
    fn wait_for_file(path: &Path) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    #[test]
    fn a_gated_vmm_runs_only_after_its_pid_is_recorded_and_keeps_that_pid() {
        let dir = tempfile::tempdir().unwrap();
        let (out, pidfile) = (dir.path().join("out"), dir.path().join("vmm.pid"));
        // The "VMM" writes its own pid, then waits to be killed.
        let gated = spawn_gated(Path::new("/bin/sh"), |c| {
            c.args(["-c", "echo $$ > out.tmp && mv out.tmp out && exec sleep 30"]).current_dir(dir.path());
        })
        .unwrap();
        let pid = gated.pid;
        let children = Children::default();
        children.track(pid);
        // Behind the gate the child lives, but nothing of the VMM ran.
        assert!(children.is_alive(pid, dir.path()));
        assert!(!out.exists(), "the VMM ran before its gate opened");
        assert_eq!(gated.record(&pidfile).unwrap(), pid);
        assert_eq!(read_pidfile(&pidfile), Some(pid), "recorded before the VMM ran");
        assert!(wait_for_file(&out), "the VMM did not run once its gate opened");
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), pid.to_string(), "exec kept the pid");
        assert!(children.kill_child(pid));
    }

    #[test]
    fn a_vmm_runs_under_the_batch_policy() {
        let gated = spawn_gated(Path::new("/bin/sh"), |c| {
            c.args(["-c", "exit 0"]);
        })
        .unwrap();
        let pid = gated.pid;
        // SAFETY: sched_getscheduler only reads the policy of a process (our gated child).
        let policy = unsafe { nix::libc::sched_getscheduler(pid as nix::libc::pid_t) };
        assert_eq!(policy, nix::libc::SCHED_BATCH);
        drop(gated);
        waitpid(to_pid(pid).unwrap(), None).unwrap();
    }

    #[test]
    fn a_gate_closed_unopened_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let gated = spawn_gated(Path::new("/bin/sh"), |c| {
            c.args(["-c", "echo ran > out"]).current_dir(dir.path());
        })
        .unwrap();
        let pid = gated.pid;
        // As when the daemon is killed before it recorded the pid: the write end goes away.
        drop(gated);
        let status = waitpid(to_pid(pid).unwrap(), None).unwrap();
        assert_eq!(status, WaitStatus::Exited(to_pid(pid).unwrap(), GATE_CLOSED));
        assert!(!out.exists(), "the VMM ran although its gate never opened");
    }

    #[test]
    fn a_child_is_alive_by_its_pid_whatever_its_command_line_says() {
        let dir = tempfile::tempdir().unwrap();
        // Its command line never names the dir: as a child between fork and exec looks.
        let mut command = Command::new("sleep");
        command.arg("30").stdin(Stdio::null()).stdout(Stdio::null());
        let pid = spawn_in_own_session(&mut command).unwrap();
        let children = Children::default();
        children.track(pid);
        assert!(!is_alive(pid, dir.path()), "the marker test alone would call it dead");
        assert!(children.is_alive(pid, dir.path()), "a child of ours is alive until waitpid says otherwise");
        assert!(children.kill_child(pid));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while children.is_alive(pid, dir.path()) {
            assert!(std::time::Instant::now() < deadline, "child did not die");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(children.tracked(), 0, "reaped by the liveness test");
        assert_eq!(children.reap(pid), Some(ExitReport("killed by SIGKILL".into())), "its report is kept once");
        assert_eq!(children.reap(pid), None);
    }

    #[test]
    fn zombies_are_dead_and_reaped_with_their_status() {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("{}/marker", dir.path().display());
        let mut command = Command::new("sh");
        command.args(["-c", "exit 3", &marker]);
        let pid = spawn_in_own_session(&mut command).unwrap();
        let children = Children::default();
        children.track(pid);
        // Wait for the exit without reaping: the child becomes a zombie.
        let proc_stat = format!("/proc/{pid}/stat");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&proc_stat).ok().as_deref().and_then(parse_stat).map(|s| s.state) != Some('Z') {
            assert!(std::time::Instant::now() < deadline, "child did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!is_alive(pid, dir.path()), "a zombie is dead");
        assert_eq!(children.reap(pid), Some(ExitReport("exit status 3".into())));
        assert!(!Path::new(&proc_stat).exists());
    }
}
