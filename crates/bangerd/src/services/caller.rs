//! Who is asking: the API caller's user, read from the socket's peer credentials, and the two
//! things a `socket_group` member must not get through the root daemon: host files its own user
//! cannot read (`image register` opens the file as the caller) and host ports below
//! `net.ipv4.ip_unprivileged_port_start` (a forward binds them as root). Everything else the API
//! offers, a caller who can open the socket may do (docs/security.md).

use std::fs::File;
use std::path::Path;

/// Why a caller was refused.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    /// The caller's own user cannot open the file.
    #[error("cannot open {path} as uid {uid}: {source}; register a file your user can read")]
    Open {
        /// The file.
        path: String,
        /// The caller's uid.
        uid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The caller may not bind a privileged port through the daemon.
    #[error("host port {port} is privileged (below {limit}) and only root may forward it; pick a port >= {limit}")]
    PrivilegedPort {
        /// The port asked for.
        port: u16,
        /// The first unprivileged port.
        limit: u16,
    },
}

/// The user behind an API request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

impl Caller {
    /// A caller whose credentials could not be read: trusted with nothing extra.
    pub const UNKNOWN: Self = Self { uid: u32::MAX, gid: u32::MAX };

    /// The daemon's own user (tests that drive services directly).
    #[cfg(test)]
    pub fn daemon() -> Self {
        Self { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw() }
    }

    /// Whether the caller holds the daemon's own powers: root, or the user the daemon runs as.
    pub fn is_trusted(&self) -> bool {
        self.uid == 0 || self.uid == nix::unistd::geteuid().as_raw()
    }

    /// Refuses a host port the caller could not bind itself.
    pub fn check_port(&self, port: u16) -> Result<(), CallerError> {
        let limit = unprivileged_port_start();
        if port < limit && !self.is_trusted() {
            return Err(CallerError::PrivilegedPort { port, limit });
        }
        Ok(())
    }

    /// Opens `path` for reading with the caller's file-system identity, so the kernel decides
    /// as it would for the caller: a file the caller cannot read is refused even though the
    /// daemon is root.
    pub fn open_readable(&self, path: &Path) -> Result<File, CallerError> {
        let fail = |source| CallerError::Open { path: path.display().to_string(), uid: self.uid, source };
        if self.is_trusted() {
            return File::open(path).map_err(fail);
        }
        let (uid, gid, path_buf) = (self.uid, self.gid, path.to_owned());
        // A thread of its own: the fs ids and groups set below are per thread in the kernel and
        // end with it, so no other thread of the daemon ever runs with them.
        let opened = std::thread::spawn(move || open_as(uid, gid, &path_buf))
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread opening the file panicked")));
        opened.map_err(fail)
    }
}

/// `net.ipv4.ip_unprivileged_port_start` (1024 when it cannot be read).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Opens `path` on this thread after taking `uid`'s groups, `gid` and `uid` as its file-system
/// identity. Raw syscalls on purpose: glibc's `setgroups` changes every thread of the process.
fn open_as(uid: u32, gid: u32, path: &Path) -> std::io::Result<File> {
    let groups = supplementary_groups(uid, gid);
    // SAFETY: setgroups reads `groups.len()` gid_t values from a live Vec; as a raw syscall it
    // changes only this thread's credentials.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: setfsgid/setfsuid take plain ids and change only this thread's fs identity.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
    }
    // SAFETY: as above; with an invalid id they return the current one, which tells whether
    // the switch took.
    let now = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) };
    if now != i64::from(uid) {
        return Err(std::io::Error::other(format!("cannot take uid {uid} to open the file")));
    }
    File::open(path)
}

/// The groups `uid` belongs to (its primary `gid` included).
fn supplementary_groups(uid: u32, gid: u32) -> Vec<libc::gid_t> {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
    let mut groups = user
        .and_then(|u| {
            let name = std::ffi::CString::new(u.name).ok()?;
            nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok()
        })
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect::<Vec<_>>())
        .unwrap_or_default();
    if !groups.contains(&gid) {
        groups.push(gid);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_daemon_user_is_trusted_and_unknown_is_not() {
        assert!(Caller::daemon().is_trusted());
        assert!(!Caller::UNKNOWN.is_trusted());
        assert!(Caller::daemon().check_port(80).is_ok());
        assert!(Caller::UNKNOWN.check_port(unprivileged_port_start()).is_ok());
        if unprivileged_port_start() > 80 {
            let e = Caller::UNKNOWN.check_port(80).expect_err("privileged");
            assert!(e.to_string().contains("only root may forward it"), "{e}");
        }
    }

    #[test]
    fn another_user_cannot_open_a_private_file_through_the_daemon() {
        if !nix::unistd::geteuid().is_root() {
            return; // only root can take another user's identity; the daemon runs as root
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let private = dir.path().join("private");
        std::fs::write(&private, b"secret").expect("write");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let public = dir.path().join("public");
        std::fs::write(&public, b"open").expect("write");
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let nobody = Caller { uid: 65534, gid: 65534 };
        let e = nobody.open_readable(&private).expect_err("refused");
        assert!(e.to_string().contains("as uid 65534"), "{e}");
        assert!(nobody.open_readable(&public).is_ok());
        assert!(Caller::daemon().open_readable(&private).is_ok());
        // The daemon's own threads keep their identity.
        assert!(File::open(&private).is_ok());
    }
}
