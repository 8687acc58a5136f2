//! Firecracker's jailer: its command line and the chroot banger lays out for it.
//!
//! The jailer makes `<chroot_base>/<exec file name>/<id>/root`, creates `/dev/kvm` and
//! `/dev/net/tun` in it, copies Firecracker in, chroots, drops to `uid:gid` (in the cgroups it
//! is given) and execs Firecracker in the same process, so the pid banger spawned stays the
//! VMM's. Every path Firecracker sees is inside the chroot; banger mirrors the VM directory
//! there (`<root>/<vm dir>/`) so that Firecracker's paths read like the host's:
//!
//! - the kernel, initramfs, disks, console log, log and metrics file are **hard-linked** into
//!   the mirror under fixed names (`vmlinux`, `initrd`, `drive0`..., same inode: writes land in
//!   the VM's own files), and the writable ones are chowned to `uid:gid`. Hard links need the
//!   chroot base on the state dir's filesystem;
//! - Firecracker binds its API and vsock sockets at `<vm dir>/NAME` in its view; the host's
//!   `<vm dir>/NAME` is a symlink into the chroot, so the daemon connects as without a jail, and
//!   the VMM's command line still names `<vm dir>/`, which is what liveness checks look for;
//! - `<vm dir>/jail` links to the jail directory, so it can be removed once the VMM is gone.
//!
//! File effects go through [`JailFs`] ([`LinuxJailFs`], or [`FakeJailFs`] in tests).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Name of the link in the VM directory that points at its jail directory.
pub const JAIL_LINK: &str = "jail";

/// How to run Firecracker under the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerOptions {
    /// The jailer binary (a path, or a name on `PATH`).
    pub binary: PathBuf,
    /// The uid Firecracker runs as.
    pub uid: u32,
    /// The gid Firecracker runs as.
    pub gid: u32,
    /// Where jails are made.
    pub chroot_base: PathBuf,
    /// cgroup version (1 or 2).
    pub cgroup_version: u32,
    /// `FILE=VALUE` cgroup settings.
    pub cgroups: Vec<String>,
}

/// Why a jail could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The VM id cannot be a jailer id.
    #[error("vm id {id:?} cannot be a jailer id (1-64 letters, digits and '-')")]
    BadId {
        /// The id.
        id: String,
    },
    /// A hard link across filesystems.
    #[error(
        "cannot hard-link {} into the jail under {}: they are on different filesystems; set \
         jailer_chroot_base to a directory on the state dir's filesystem",
        from.display(), chroot_base.display()
    )]
    CrossDevice {
        /// The file.
        from: PathBuf,
        /// The chroot base.
        chroot_base: PathBuf,
    },
    /// Any other file operation.
    #[error("cannot {what} {}; is the daemon running as root?", path.display())]
    Io {
        /// What was done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A file to hard-link into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailLink {
    /// The host file.
    pub host: PathBuf,
    /// Its name in the mirrored VM directory.
    pub name: String,
    /// Whether Firecracker writes it (then it is chowned to the jail's user).
    pub writable: bool,
}

/// One VM's jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// `<chroot_base>/<exec file name>/<id>`: what is removed afterwards.
    pub dir: PathBuf,
    /// `<dir>/root`: Firecracker's `/`.
    pub root: PathBuf,
    /// The VM directory, mirrored at `<root>/<vm_dir>`.
    pub vm_dir: PathBuf,
    /// The jailer id.
    pub id: String,
}

impl Jail {
    /// The jail of VM `id` (whose directory is `vm_dir`) for Firecracker at `exec_file`.
    pub fn new(options: &JailerOptions, exec_file: &Path, id: &str, vm_dir: &Path) -> Result<Self, JailError> {
        let id_ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !id_ok {
            return Err(JailError::BadId { id: id.to_owned() });
        }
        let exec_name = exec_file.file_name().map_or_else(|| OsString::from("firecracker"), ToOwned::to_owned);
        let dir = options.chroot_base.join(exec_name).join(id);
        Ok(Self { root: dir.join("root"), dir, vm_dir: vm_dir.to_owned(), id: id.to_owned() })
    }

    /// Where a path of Firecracker's view lives on the host.
    pub fn host_path(&self, inside: &Path) -> PathBuf {
        let relative = inside.strip_prefix("/").unwrap_or(inside);
        self.root.join(relative)
    }

    /// Firecracker's view of the file called `name` in the mirrored VM directory.
    pub fn fc_path(&self, name: &str) -> PathBuf {
        self.vm_dir.join(name)
    }

    /// The jailer's arguments (without the program name): jail options, then `--` and
    /// Firecracker's own arguments.
    pub fn command_line(
        &self,
        options: &JailerOptions,
        exec_file: &Path,
        firecracker_args: &[OsString],
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            self.id.clone().into(),
            "--exec-file".into(),
            exec_file.into(),
            "--uid".into(),
            options.uid.to_string().into(),
            "--gid".into(),
            options.gid.to_string().into(),
            "--chroot-base-dir".into(),
            options.chroot_base.clone().into(),
            "--cgroup-version".into(),
            options.cgroup_version.to_string().into(),
        ];
        for cgroup in &options.cgroups {
            args.push("--cgroup".into());
            args.push(cgroup.into());
        }
        args.push("--".into());
        args.extend(firecracker_args.iter().cloned());
        args
    }

    /// Lays out the jail: a fresh mirror of the VM directory owned by the jail's user, the
    /// `links` hard-linked into it, a host symlink for each of `sockets` (paths in the VM
    /// directory that Firecracker binds), and the `<vm dir>/jail` link.
    pub fn prepare(
        &self,
        options: &JailerOptions,
        links: &[JailLink],
        sockets: &[PathBuf],
        fs: &dyn JailFs,
    ) -> Result<(), JailError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| JailError::Io { what, path, source }
        };
        fs.remove_dir_all(&self.dir).map_err(io("remove the stale jail", &self.dir))?;
        let mirror = self.host_path(&self.vm_dir);
        fs.create_dir_all(&mirror).map_err(io("create", &mirror))?;
        fs.chown(&mirror, options.uid, options.gid).map_err(io("chown", &mirror))?;
        for link in links {
            let target = mirror.join(&link.name);
            fs.hard_link(&link.host, &target).map_err(|source| {
                if source.raw_os_error() == Some(nix::libc::EXDEV) {
                    JailError::CrossDevice { from: link.host.clone(), chroot_base: options.chroot_base.clone() }
                } else {
                    JailError::Io { what: "hard-link into the jail", path: link.host.clone(), source }
                }
            })?;
            if link.writable {
                fs.chown(&target, options.uid, options.gid).map_err(io("chown", &target))?;
            }
        }
        for socket in sockets {
            fs.remove_file(socket).map_err(io("remove", socket))?;
            fs.symlink(&self.host_path(socket), socket).map_err(io("link", socket))?;
        }
        let link = self.vm_dir.join(JAIL_LINK);
        fs.remove_file(&link).map_err(io("remove", &link))?;
        fs.symlink(&self.dir, &link).map_err(io("link", &link))?;
        Ok(())
    }
}

/// Removes the jail `<vm_dir>/jail` points at (only if it is under `chroot_base`) and the link.
pub fn remove_jail(vm_dir: &Path, chroot_base: &Path, fs: &dyn JailFs) -> Result<(), JailError> {
    let link = vm_dir.join(JAIL_LINK);
    let Some(dir) = fs.read_link(&link) else { return Ok(()) };
    if dir.starts_with(chroot_base) && dir != chroot_base {
        fs.remove_dir_all(&dir).map_err(|source| JailError::Io {
            what: "remove the jail",
            path: dir.clone(),
            source,
        })?;
    }
    fs.remove_file(&link).map_err(|source| JailError::Io { what: "remove", path: link.clone(), source })
}

/// The file effects of making and removing a jail. Removals of missing files succeed.
pub trait JailFs: Send + Sync {
    /// `rm -rf`.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// `mkdir -p`.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// `ln from to`.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// `chown uid:gid` (not following a final symlink does not matter here: none is chowned).
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    /// `ln -s target link`.
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    /// `rm -f`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// The target of a symlink, if `path` is one.
    fn read_link(&self, path: &Path) -> Option<PathBuf>;
}

fn missing_ok(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxJailFs;

impl JailFs for LinuxJailFs {
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        missing_ok(std::fs::remove_dir_all(path))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        missing_ok(std::fs::remove_file(path))
    }

    fn read_link(&self, path: &Path) -> Option<PathBuf> {
        std::fs::read_link(path).ok()
    }
}

/// One recorded [`JailFs`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailCall {
    /// [`JailFs::remove_dir_all`].
    RemoveDirAll(PathBuf),
    /// [`JailFs::create_dir_all`].
    CreateDirAll(PathBuf),
    /// [`JailFs::hard_link`].
    HardLink(PathBuf, PathBuf),
    /// [`JailFs::chown`].
    Chown(PathBuf, u32, u32),
    /// [`JailFs::symlink`] (target, link).
    Symlink(PathBuf, PathBuf),
    /// [`JailFs::remove_file`].
    RemoveFile(PathBuf),
}

/// A [`JailFs`] that records calls and touches nothing. `links` answers `read_link`;
/// `fail_links_with` makes every hard link fail with that errno.
#[derive(Debug, Default)]
pub struct FakeJailFs {
    /// The calls, in order.
    pub calls: Mutex<Vec<JailCall>>,
    /// Symlinks `read_link` knows.
    pub links: Vec<(PathBuf, PathBuf)>,
    /// An errno for every hard link.
    pub fail_links_with: Option<i32>,
}

impl FakeJailFs {
    fn record(&self, call: JailCall) {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).push(call);
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<JailCall> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl JailFs for FakeJailFs {
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.record(JailCall::RemoveDirAll(path.to_owned()));
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.record(JailCall::CreateDirAll(path.to_owned()));
        Ok(())
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.record(JailCall::HardLink(from.to_owned(), to.to_owned()));
        match self.fail_links_with {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        self.record(JailCall::Chown(path.to_owned(), uid, gid));
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.record(JailCall::Symlink(target.to_owned(), link.to_owned()));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.record(JailCall::RemoveFile(path.to_owned()));
        Ok(())
    }

    fn read_link(&self, path: &Path) -> Option<PathBuf> {
        self.links.iter().find(|(link, _)| link == path).map(|(_, target)| target.clone())
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use JailCall::*;

    fn options() -> JailerOptions {
        JailerOptions {
            binary: "jailer".into(),
            uid: 900,
            gid: 901,
            chroot_base: "/srv/jailer".into(),
            cgroup_version: 2,
            cgroups: vec!["cpu.max=50000 100000".into(), "memory.max=1073741824".into()],
        }
    }

    fn jail() -> Jail {
        Jail::new(
            &options(),
            Path::new("/usr/local/bin/firecracker"),
            "0123abcd",
            Path::new("/var/lib/banger/vms/0123abcd"),
        )
        .unwrap()
    }

    #[test]
    fn layout_and_paths() {
        let jail = jail();
        assert_eq!(jail.dir, Path::new("/srv/jailer/firecracker/0123abcd"));
        assert_eq!(jail.root, Path::new("/srv/jailer/firecracker/0123abcd/root"));
        assert_eq!(jail.fc_path("vmlinux"), Path::new("/var/lib/banger/vms/0123abcd/vmlinux"));
        assert_eq!(
            jail.host_path(Path::new("/var/lib/banger/vms/0123abcd/qmp.sock")),
            Path::new("/srv/jailer/firecracker/0123abcd/root/var/lib/banger/vms/0123abcd/qmp.sock")
        );
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            let error = Jail::new(&options(), Path::new("firecracker"), bad, Path::new("/v")).unwrap_err();
            assert!(matches!(error, JailError::BadId { .. }), "{bad:?}");
        }
    }

    #[test]
    fn command_line() {
        let jail = jail();
        let fc_args: Vec<OsString> = vec!["--api-sock".into(), "/var/lib/banger/vms/0123abcd/qmp.sock".into()];
        let args: Vec<String> = jail
            .command_line(&options(), Path::new("/usr/local/bin/firecracker"), &fc_args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--id",
                "0123abcd",
                "--exec-file",
                "/usr/local/bin/firecracker",
                "--uid",
                "900",
                "--gid",
                "901",
                "--chroot-base-dir",
                "/srv/jailer",
                "--cgroup-version",
                "2",
                "--cgroup",
                "cpu.max=50000 100000",
                "--cgroup",
                "memory.max=1073741824",
                "--",
                "--api-sock",
                "/var/lib/banger/vms/0123abcd/qmp.sock",
            ]
        );
    }

    #[test]
    fn prepare_links_files_chowns_writable_ones_and_links_sockets() {
        let jail = jail();
        let fs = FakeJailFs::default();
        let links = [
            JailLink { host: "/k/vmlinux".into(), name: "vmlinux".into(), writable: false },
            JailLink {
                host: "/var/lib/banger/vms/0123abcd/overlay.ext4".into(),
                name: "drive1".into(),
                writable: true,
            },
        ];
        let socket = PathBuf::from("/var/lib/banger/vms/0123abcd/qmp.sock");
        jail.prepare(&options(), &links, std::slice::from_ref(&socket), &fs).unwrap();
        let mirror = PathBuf::from("/srv/jailer/firecracker/0123abcd/root/var/lib/banger/vms/0123abcd");
        assert_eq!(
            fs.calls(),
            [
                RemoveDirAll("/srv/jailer/firecracker/0123abcd".into()),
                CreateDirAll(mirror.clone()),
                Chown(mirror.clone(), 900, 901),
                HardLink("/k/vmlinux".into(), mirror.join("vmlinux")),
                HardLink("/var/lib/banger/vms/0123abcd/overlay.ext4".into(), mirror.join("drive1")),
                Chown(mirror.join("drive1"), 900, 901),
                RemoveFile(socket.clone()),
                Symlink(mirror.join("qmp.sock"), socket),
                RemoveFile("/var/lib/banger/vms/0123abcd/jail".into()),
                Symlink("/srv/jailer/firecracker/0123abcd".into(), "/var/lib/banger/vms/0123abcd/jail".into()),
            ]
        );
    }

    #[test]
    fn cross_device_links_name_the_fix() {
        let fs = FakeJailFs { fail_links_with: Some(nix::libc::EXDEV), ..Default::default() };
        let links = [JailLink { host: "/k/vmlinux".into(), name: "vmlinux".into(), writable: false }];
        let error = jail().prepare(&options(), &links, &[], &fs).unwrap_err();
        assert!(
            error.to_string().contains("set jailer_chroot_base to a directory on the state dir's filesystem"),
            "{error}"
        );
    }

    #[test]
    fn removal_stays_under_the_chroot_base() {
        let vm_dir = Path::new("/var/lib/banger/vms/0123abcd");
        let fs = FakeJailFs {
            links: vec![(vm_dir.join("jail"), "/srv/jailer/firecracker/0123abcd".into())],
            ..Default::default()
        };
        remove_jail(vm_dir, Path::new("/srv/jailer"), &fs).unwrap();
        assert_eq!(
            fs.calls(),
            [RemoveDirAll("/srv/jailer/firecracker/0123abcd".into()), RemoveFile(vm_dir.join("jail"))]
        );
        let fs = FakeJailFs { links: vec![(vm_dir.join("jail"), "/etc".into())], ..Default::default() };
        remove_jail(vm_dir, Path::new("/srv/jailer"), &fs).unwrap();
        assert_eq!(fs.calls(), [RemoveFile(vm_dir.join("jail"))], "a link out of the base is never followed");
        let fs = FakeJailFs::default();
        remove_jail(vm_dir, Path::new("/srv/jailer"), &fs).unwrap();
        assert!(fs.calls().is_empty());
    }

    /// The real file system: links share the inode, so Firecracker's writes land in the VM's
    /// own files, and the socket symlink resolves into the jail.
    #[test]
    fn real_layout_shares_inodes() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let vm_dir = tmp.path().join("vms/abc");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let disk = vm_dir.join("overlay.ext4");
        std::fs::write(&disk, b"disk").unwrap();
        let me = nix::unistd::Uid::current().as_raw();
        let group = nix::unistd::Gid::current().as_raw();
        let opts = JailerOptions { uid: me, gid: group, chroot_base: tmp.path().join("jail"), ..options() };
        let jail = Jail::new(&opts, Path::new("/usr/bin/firecracker"), "abc", &vm_dir).unwrap();
        let links = [JailLink { host: disk.clone(), name: "drive1".into(), writable: true }];
        let socket = vm_dir.join("qmp.sock");
        jail.prepare(&opts, &links, std::slice::from_ref(&socket), &LinuxJailFs).unwrap();
        let inside = jail.host_path(&jail.fc_path("drive1"));
        assert_eq!(std::fs::metadata(&inside).unwrap().ino(), std::fs::metadata(&disk).unwrap().ino());
        assert_eq!(std::fs::read_link(&socket).unwrap(), jail.host_path(&socket));
        // Again, over a stale jail: the old one is replaced.
        jail.prepare(&opts, &links, std::slice::from_ref(&socket), &LinuxJailFs).unwrap();
        remove_jail(&vm_dir, &opts.chroot_base, &LinuxJailFs).unwrap();
        assert!(!jail.dir.exists());
        assert!(disk.exists(), "the VM's own files stay");
        assert!(!vm_dir.join(JAIL_LINK).exists());
    }
}
