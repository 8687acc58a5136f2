//! Where banger keeps its files. As root: state in `/var/lib/banger`, runtime files in
//! `/run/banger`. As a normal user: `$XDG_DATA_HOME/banger` and `$XDG_RUNTIME_DIR/banger`.
//! `--state-dir`/`BANGER_STATE_DIR` and `--socket`/`BANGER_SOCKET` override both, so that
//! tests can run isolated daemons side by side.
//!
//! Pure path arithmetic ([`Layout::resolve_in`]) over what the defaults depend on ([`LayoutEnv`]).
//! [`Layout::resolve`] is the one place in this crate that reads the process environment (the
//! effective uid, `HOME`, `XDG_*` and the current directory); it creates nothing. Making the
//! directories is the host's job (`banger_host::paths::ensure_dir`).

use std::path::PathBuf;

/// Every path the daemon and the CLI agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Durable state: the database, VM and image directories, the log.
    pub state_dir: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
}

/// What the default paths depend on: who runs banger and its environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayoutEnv {
    /// The effective user is root.
    pub is_root: bool,
    /// `$HOME` (unset or empty: `None`).
    pub home: Option<PathBuf>,
    /// `$XDG_DATA_HOME`.
    pub xdg_data_home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// The current directory, against which relative overrides are taken.
    pub cwd: Option<PathBuf>,
}

impl LayoutEnv {
    /// This process's: its effective uid, environment and current directory.
    pub fn current() -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self {
            // SAFETY: geteuid takes no arguments, touches no memory of ours and cannot fail.
            is_root: unsafe { libc::geteuid() } == 0,
            home: env("HOME"),
            xdg_data_home: env("XDG_DATA_HOME"),
            xdg_runtime_dir: env("XDG_RUNTIME_DIR"),
            cwd: std::env::current_dir().ok(),
        }
    }
}

impl Layout {
    /// Resolves the layout from explicit overrides (flags or environment, already merged by
    /// the caller) and the defaults for the current user ([`LayoutEnv::current`]).
    pub fn resolve(state_dir: Option<PathBuf>, socket: Option<PathBuf>) -> Self {
        Self::resolve_in(state_dir, socket, &LayoutEnv::current())
    }

    /// [`Self::resolve`] against a given environment.
    pub fn resolve_in(state_dir: Option<PathBuf>, socket: Option<PathBuf>, env: &LayoutEnv) -> Self {
        let home = env.home.clone().unwrap_or_else(|| PathBuf::from("/tmp"));
        let state_dir = state_dir.unwrap_or_else(|| {
            if env.is_root {
                PathBuf::from("/var/lib/banger")
            } else {
                env.xdg_data_home.clone().unwrap_or_else(|| home.join(".local/share")).join("banger")
            }
        });
        let socket = socket.unwrap_or_else(|| {
            if env.is_root {
                PathBuf::from("/run/banger/bangerd.sock")
            } else {
                env.xdg_runtime_dir
                    .as_ref()
                    .map_or_else(|| state_dir.join("run"), |d| d.join("banger"))
                    .join("bangerd.sock")
            }
        });
        let absolute = |p: PathBuf| match &env.cwd {
            Some(cwd) if !p.is_absolute() => cwd.join(p),
            _ => p,
        };
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
        let env = LayoutEnv { cwd: Some("/work".into()), ..LayoutEnv::default() };
        let l = Layout::resolve_in(Some("rel".into()), Some("s.sock".into()), &env);
        assert_eq!(l.state_dir, PathBuf::from("/work/rel"));
        assert_eq!(l.socket, PathBuf::from("/work/s.sock"));
    }

    #[test]
    fn defaults_follow_the_user() {
        let root = LayoutEnv { is_root: true, home: Some("/root".into()), ..LayoutEnv::default() };
        let l = Layout::resolve_in(None, None, &root);
        assert_eq!(l.state_dir, PathBuf::from("/var/lib/banger"));
        assert_eq!(l.socket, PathBuf::from("/run/banger/bangerd.sock"));

        let user = LayoutEnv {
            home: Some("/home/u".into()),
            xdg_runtime_dir: Some("/run/user/1000".into()),
            ..LayoutEnv::default()
        };
        let l = Layout::resolve_in(None, None, &user);
        assert_eq!(l.state_dir, PathBuf::from("/home/u/.local/share/banger"));
        assert_eq!(l.socket, PathBuf::from("/run/user/1000/banger/bangerd.sock"));

        let bare = LayoutEnv { xdg_data_home: Some("/d".into()), ..LayoutEnv::default() };
        let l = Layout::resolve_in(None, None, &bare);
        assert_eq!(l.state_dir, PathBuf::from("/d/banger"));
        assert_eq!(l.socket, PathBuf::from("/d/banger/run/bangerd.sock"));
    }
}
