//! One daemon per state directory: an exclusive `flock` on `bangerd.lock`, held for the
//! daemon's life. The kernel drops the lock when the process dies, even on `kill -9`, so a
//! stale lock file never blocks a new daemon. The file holds the owner's pid for messages.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

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
}
