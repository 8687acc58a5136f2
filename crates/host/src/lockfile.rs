//! One daemon per state directory: an exclusive `flock` on `bangerd.lock`, held for the
//! daemon's life. The kernel drops the lock when the process dies, even on `kill -9`, so a
//! stale lock file never blocks a new daemon. The file holds the owner's pid for messages.
//!
//! The kernel drops it when the last thread of the process has exited, though, which can lag the
//! signal: a killed daemon's main thread is a zombie at once while a thread in a blocking call
//! still holds the open files. [`acquire_waiting`] waits (with a deadline) for such a holder.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// The held lock; dropping it releases the lock.
pub struct DaemonLock {
    _lock: Flock<File>,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error("another bangerd (pid {pid}) already serves state dir {state_dir}; stop it with `banger daemon stop` or pick another --state-dir")]
    Held {
        /// The holder's pid, as written in the file (0 if unreadable).
        pid: u32,
        /// The state directory.
        state_dir: String,
    },
    /// The lock file could not be opened.
    #[error("cannot open lock file {path}")]
    Io {
        /// The lock file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Takes the daemon lock at `path` without waiting and writes our pid into it.
pub fn acquire(path: &Path, state_dir: &Path) -> Result<DaemonLock, LockError> {
    let io = |source| LockError::Io { path: path.display().to_string(), source };
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0).map_err(io)?;
            lock.rewind().map_err(io)?;
            writeln!(lock, "{}", std::process::id()).map_err(io)?;
            lock.sync_all().map_err(io)?;
            Ok(DaemonLock { _lock: lock })
        }
        Err((mut file, _)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Err(LockError::Held { pid: text.trim().parse().unwrap_or(0), state_dir: state_dir.display().to_string() })
        }
    }
}

/// [`acquire`], waiting up to `grace` while the holder named in the file is exiting or gone (a
/// killed daemon whose last threads still hold the lock); a live holder is refused at once.
pub fn acquire_waiting(path: &Path, state_dir: &Path, grace: Duration) -> Result<DaemonLock, LockError> {
    let deadline = Instant::now() + grace;
    loop {
        match acquire(path, state_dir) {
            Err(LockError::Held { pid, .. }) if Instant::now() < deadline && exiting(pid) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Whether process `pid` is gone or exiting (its main thread a zombie); `false` for pid 0 (the
/// file named no one).
fn exiting(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// The pid written in the lock file at `path`, if any.
pub fn holder_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_drops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bangerd.lock");
        let first = acquire(&path, dir.path()).expect("first");
        assert_eq!(holder_pid(&path), Some(std::process::id()));
        let second = acquire(&path, dir.path());
        assert!(matches!(second, Err(LockError::Held { .. })));
        drop(first);
        acquire(&path, dir.path()).expect("after release");
    }

    #[test]
    fn a_live_holder_is_refused_at_once_and_a_gone_one_is_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bangerd.lock");
        let held = acquire(&path, dir.path()).expect("first");
        // The file names us: alive, so no wait even with a long grace.
        let started = Instant::now();
        let refused = acquire_waiting(&path, dir.path(), Duration::from_secs(30));
        assert!(matches!(refused, Err(LockError::Held { .. })));
        assert!(started.elapsed() < Duration::from_secs(5), "a live holder is not waited for");
        // The file names a process that has exited, whose lock is still held a moment longer
        // (here by us, released from another thread): the lock is taken once it is free.
        let mut gone = std::process::Command::new("true").spawn().expect("spawn true");
        let gone_pid = gone.id();
        gone.wait().expect("reap true");
        std::fs::write(&path, format!("{gone_pid}\n")).expect("name the gone holder");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        acquire_waiting(&path, dir.path(), Duration::from_secs(30)).expect("taken after the holder let go");
        releaser.join().expect("releaser");
        assert_eq!(holder_pid(&path), Some(std::process::id()));
    }
}
