//! Read-only facts about the host that `doctor` and VMM selection rely on, behind a trait so
//! that their logic is tested against a recording fake.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Read-only questions about the host.
pub trait HostProbe {
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` can be opened for reading and writing.
    fn openable_rw(&self, path: &Path) -> bool;
    /// The first `name` on `PATH` (plus the sbin directories), if any.
    fn find_program(&self, name: &str) -> Option<PathBuf>;
    /// Bytes available to unprivileged users on the filesystem holding `path` (or its nearest
    /// existing ancestor).
    fn free_bytes(&self, path: &Path) -> Option<u64>;
    /// Permission bits and group id of `path`.
    fn mode_and_gid(&self, path: &Path) -> Option<(u32, u32)>;
}

/// The real host.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxProbe;

fn nearest_existing(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

impl HostProbe for LinuxProbe {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn openable_rw(&self, path: &Path) -> bool {
        std::fs::OpenOptions::new().read(true).write(true).open(path).is_ok()
    }

    fn find_program(&self, name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    }

    fn free_bytes(&self, path: &Path) -> Option<u64> {
        let stat = nix::sys::statvfs::statvfs(nearest_existing(path)?).ok()?;
        Some(stat.blocks_available().saturating_mul(stat.fragment_size()))
    }

    fn mode_and_gid(&self, path: &Path) -> Option<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.mode() & 0o7777, meta.gid()))
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A question the fake was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCall {
    /// [`HostProbe::exists`].
    Exists(PathBuf),
    /// [`HostProbe::openable_rw`].
    OpenableRw(PathBuf),
    /// [`HostProbe::find_program`].
    FindProgram(String),
    /// [`HostProbe::free_bytes`].
    FreeBytes(PathBuf),
    /// [`HostProbe::mode_and_gid`].
    ModeAndGid(PathBuf),
}

/// A host described by data, recording every question asked of it.
#[derive(Debug, Default)]
pub struct FakeProbe {
    /// Paths that exist.
    pub paths: HashSet<PathBuf>,
    /// Paths that open read-write.
    pub rw: HashSet<PathBuf>,
    /// Programs and where they are.
    pub programs: HashMap<String, PathBuf>,
    /// Free bytes reported for any path.
    pub free: Option<u64>,
    /// Mode and gid per path.
    pub modes: HashMap<PathBuf, (u32, u32)>,
    /// Every question, in order.
    pub calls: RefCell<Vec<ProbeCall>>,
}

impl HostProbe for FakeProbe {
    fn exists(&self, path: &Path) -> bool {
        self.calls.borrow_mut().push(ProbeCall::Exists(path.into()));
        self.paths.contains(path)
    }

    fn openable_rw(&self, path: &Path) -> bool {
        self.calls.borrow_mut().push(ProbeCall::OpenableRw(path.into()));
        self.rw.contains(path)
    }

    fn find_program(&self, name: &str) -> Option<PathBuf> {
        self.calls.borrow_mut().push(ProbeCall::FindProgram(name.into()));
        self.programs.get(name).cloned()
    }

    fn free_bytes(&self, path: &Path) -> Option<u64> {
        self.calls.borrow_mut().push(ProbeCall::FreeBytes(path.into()));
        self.free
    }

    fn mode_and_gid(&self, path: &Path) -> Option<(u32, u32)> {
        self.calls.borrow_mut().push(ProbeCall::ModeAndGid(path.into()));
        self.modes.get(path).copied()
    }
}
