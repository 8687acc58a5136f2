//! Where banger keeps its files. As root: state in `/var/lib/banger`, runtime files in
//! `/run/banger`. As a normal user: `$XDG_DATA_HOME/banger` and `$XDG_RUNTIME_DIR/banger`.
//! `--state-dir`/`BANGER_STATE_DIR` and `--socket`/`BANGER_SOCKET` override both, so that
//! tests can run isolated daemons side by side.

use std::path::{Path, PathBuf};

/// Every path the daemon and the CLI agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Durable state: the database, VM and image directories, the log.
    pub state_dir: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
}

impl Layout {
    /// Resolves the layout from explicit overrides (flags or environment, already merged by
    /// the caller) and the defaults for the current user.
    pub fn resolve(state_dir: Option<PathBuf>, socket: Option<PathBuf>) -> Self {
        let is_root = nix::unistd::geteuid().is_root();
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = env("HOME").unwrap_or_else(|| PathBuf::from("/tmp"));
        let state_dir = state_dir.unwrap_or_else(|| {
            if is_root {
                PathBuf::from("/var/lib/banger")
            } else {
                env("XDG_DATA_HOME").unwrap_or_else(|| home.join(".local/share")).join("banger")
            }
        });
        let socket = socket.unwrap_or_else(|| {
            if is_root {
                PathBuf::from("/run/banger/bangerd.sock")
            } else {
                env("XDG_RUNTIME_DIR").map_or_else(|| state_dir.join("run"), |d| d.join("banger")).join("bangerd.sock")
            }
        });
        Self { state_dir: absolute(state_dir), socket: absolute(socket) }
    }

    /// The SQLite database.
    pub fn db(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }

    /// The daemon's log file.
    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("bangerd.log")
    }

    /// The lock file that admits one daemon per state directory.
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("bangerd.lock")
    }

    /// Directory holding one directory per VM.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// A VM's directory.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }

    /// Config files, most specific first: the state directory's, then the system one.
    pub fn config_candidates(&self) -> [PathBuf; 2] {
        [self.state_dir.join("config.toml"), PathBuf::from("/etc/banger/config.toml")]
    }
}

fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        return p;
    }
    std::env::current_dir().map_or(p.clone(), |cwd| cwd.join(p))
}

/// Makes `dir` (and parents) with `mode`, saying clearly when it cannot.
pub fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_and_paths_derive_from_the_state_dir() {
        let l = Layout::resolve(Some("/srv/b".into()), Some("/srv/b.sock".into()));
        assert_eq!(l.state_dir, PathBuf::from("/srv/b"));
        assert_eq!(l.socket, PathBuf::from("/srv/b.sock"));
        assert_eq!(l.db(), PathBuf::from("/srv/b/banger.db"));
        assert_eq!(l.vm_dir("ab"), PathBuf::from("/srv/b/vms/ab"));
        assert_eq!(l.config_candidates()[0], PathBuf::from("/srv/b/config.toml"));
    }

    #[test]
    fn relative_overrides_become_absolute() {
        let l = Layout::resolve(Some("rel".into()), None);
        assert!(l.state_dir.is_absolute());
        assert!(l.socket.is_absolute());
    }
}
