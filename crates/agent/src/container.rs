//! Container processes (the containerd shim's tasks). A process enters one of two roots, both
//! ext4 images made on the host:
//! - the VM's container disk (`banger.container=` on the kernel command line: a task VM, or a
//!   pod's sandbox), mounted once at [`ROOT`];
//! - a pod container's root ([`ContainerExec::root`]): a disk the host attached to the running
//!   VM in a spare slot and had mounted at a directory under [`ContainerExec::ROOTS_DIR`] (the
//!   workspace attach path, `disks.rs`); checked to be such a mount point.
//!
//! Each process enters its root in the forked child, before exec: a private mount namespace,
//! `/proc`, `/sys`, `/dev` and `/dev/pts` mounted inside the root (in that namespace only, so
//! the guest's own tree holds nothing but the root's mount and the host can unmount a pod
//! container's disk at its Delete), `pivot_root` into it (the old root detached, so nothing of
//! the guest's own tree stays reachable; `chroot` only when the kernel refuses the pivot), then
//! the OCI spec's user and groups. Processes of one VM share its network namespace: a pod's
//! containers see each other on `localhost`. Everything else (stdio, pty, signals, exit status,
//! flow control) is the plain exec path's.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use banger_proto::agent::ContainerExec;
use nix::mount::{mount, MsFlags};

/// Where the VM's own container disk is mounted in the guest.
pub const ROOT: &str = "/run/banger/container/rootfs";

/// Why a container process could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The VM was made without a container disk.
    #[error("this vm has no container disk (it was not created by the containerd shim)")]
    NoDisk,
    /// The root asked for is not a pod container's directory.
    #[error("{0} is not a container root (a directory under {dir})", dir = ContainerExec::ROOTS_DIR)]
    BadRoot(String),
    /// Nothing is mounted at the root asked for.
    #[error("no disk is mounted at {0}: the container's root was not attached (or was already detached)")]
    NotMounted(String),
    /// Mounting the disk failed.
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
    /// Too many supplementary groups.
    #[error("{0} supplementary groups; the most taken is {max}", max = ContainerExec::MAX_GROUPS)]
    Groups(usize),
    /// A NUL byte in a path.
    #[error("a path holds a NUL byte")]
    Nul,
}

/// Whether [`ROOT`] is mounted (once per boot; later execs join it).
static PREPARED: Mutex<bool> = Mutex::new(false);

/// The container disk's device, from the kernel command line.
fn device() -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline.split_whitespace().find_map(|w| w.strip_prefix("banger.container=")).map(str::to_owned)
}

/// Mounts the VM's container disk at [`ROOT`], once.
fn prepare_vm_root() -> Result<(), ContainerError> {
    let mut prepared = PREPARED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if *prepared {
        return Ok(());
    }
    let dev = device().ok_or(ContainerError::NoDisk)?;
    crate::mounts::wait_for_devices(&[&dev], Duration::from_secs(10))?;
    mkdir(ROOT)?;
    mount_one(Some(dev.as_str()), ROOT, Some("ext4"), MsFlags::MS_NOATIME)?;
    *prepared = true;
    Ok(())
}

/// The root `spec` enters, ready: the VM's container disk (mounted on first use) or a pod
/// container's attached disk (it must be mounted at its directory).
fn prepare(spec: &ContainerExec) -> Result<String, ContainerError> {
    let Some(root) = &spec.root else {
        prepare_vm_root()?;
        return Ok(ROOT.to_owned());
    };
    if !ContainerExec::valid_root(root) {
        return Err(ContainerError::BadRoot(root.clone()));
    }
    if !is_mount_point(Path::new(root)) {
        return Err(ContainerError::NotMounted(root.clone()));
    }
    Ok(root.clone())
}

/// Whether `dir` is a directory with another file system than its parent's.
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(meta), Some(parent)) = (std::fs::symlink_metadata(dir), dir.parent()) else { return false };
    meta.is_dir() && std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev())
}

fn mkdir(path: &str) -> Result<(), ContainerError> {
    std::fs::create_dir_all(path)
        .map_err(|source| crate::mounts::MountError::Mkdir { path: path.to_owned(), source }.into())
}

fn mount_one(source: Option<&str>, target: &str, fstype: Option<&str>, flags: MsFlags) -> Result<(), ContainerError> {
    mount(source, target, fstype, flags, None::<&str>).map_err(|errno| {
        crate::mounts::MountError::Mount {
            source_name: source.unwrap_or("none").to_owned(),
            fstype: fstype.unwrap_or("bind").to_owned(),
            target: target.to_owned(),
            errno,
        }
        .into()
    })
}

/// One mount the child makes inside the root before the pivot.
#[derive(Debug)]
struct ApiMount {
    source: CString,
    target: CString,
    fstype: Option<CString>,
    flags: libc::c_ulong,
}

/// What the forked child needs to enter the container, made before the fork (the child only
/// makes syscalls on it).
#[derive(Debug)]
pub struct Entry {
    root: CString,
    dot: CString,
    slash: CString,
    /// `/proc`, `/sys`, `/dev`, `/dev/pts` inside the root, in mount order.
    mounts: Vec<ApiMount>,
    /// Where the program may be, in the container's tree, in `PATH` order.
    programs: Vec<CString>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl Entry {
    /// The entry for `spec`, running `program` (looked up on `path` inside the container when it
    /// has no `/`); its root is made ready first.
    pub fn new(spec: &ContainerExec, program: &str, path: &str) -> Result<Self, ContainerError> {
        let root = prepare(spec)?;
        Self::at(&root, spec, program, path)
    }

    /// The entry into `root` (already mounted); the mount points inside it are made.
    fn at(root: &str, spec: &ContainerExec, program: &str, path: &str) -> Result<Self, ContainerError> {
        if spec.groups.len() > ContainerExec::MAX_GROUPS {
            return Err(ContainerError::Groups(spec.groups.len()));
        }
        let c = |s: &[u8]| CString::new(s).map_err(|_| ContainerError::Nul);
        let programs = if program.contains('/') || program.is_empty() {
            vec![c(program.as_bytes())?]
        } else {
            path.split(':')
                .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(program))
                .map(|p| c(p.as_os_str().as_bytes()))
                .collect::<Result<_, _>>()?
        };
        let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let mut mounts = Vec::new();
        for (source, dir, fstype, flags) in [
            ("proc", "proc", Some("proc"), nosuid),
            ("sysfs", "sys", Some("sysfs"), nosuid | libc::MS_RDONLY),
            ("devtmpfs", "dev", Some("devtmpfs"), libc::MS_NOSUID),
            // The guest's own devpts, so the agent's ptys are the container's /dev/pts/N too
            // (its directory is in the devtmpfs mounted just before).
            ("/dev/pts", "dev/pts", None, libc::MS_BIND),
        ] {
            let target = format!("{root}/{dir}");
            if fstype.is_some() {
                mkdir(&target)?;
            }
            mounts.push(ApiMount {
                source: c(source.as_bytes())?,
                target: c(target.as_bytes())?,
                fstype: fstype.map(|f| c(f.as_bytes())).transpose()?,
                flags,
            });
        }
        Ok(Self {
            root: c(root.as_bytes())?,
            dot: c(b".")?,
            slash: c(b"/")?,
            mounts,
            programs,
            uid: spec.uid,
            gid: spec.gid,
            groups: spec.groups.clone(),
        })
    }
}

/// Enters the container in a freshly forked child: private mounts, the API file systems inside
/// the root, pivot into it, the user. On failure, the errno.
///
/// # Safety
/// Only in a freshly forked, single-threaded child; makes async-signal-safe syscalls only.
pub unsafe fn enter(e: &Entry) -> Result<(), i32> {
    // SAFETY: plain syscalls on NUL-terminated buffers made before the fork.
    unsafe {
        let errno = || *libc::__errno_location();
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(errno());
        }
        // Nothing the child mounts or unmounts propagates back to the guest.
        if libc::mount(
            std::ptr::null(),
            e.slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(errno());
        }
        for m in &e.mounts {
            let fstype = m.fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr());
            if libc::mount(m.source.as_ptr(), m.target.as_ptr(), fstype, m.flags, std::ptr::null()) != 0 {
                return Err(errno());
            }
        }
        if libc::chdir(e.root.as_ptr()) != 0 {
            return Err(errno());
        }
        if libc::syscall(libc::SYS_pivot_root, e.dot.as_ptr(), e.dot.as_ptr()) == 0 {
            // The old root is stacked under the new one at "."; detach it.
            if libc::umount2(e.dot.as_ptr(), libc::MNT_DETACH) != 0 {
                return Err(errno());
            }
        } else if libc::chroot(e.dot.as_ptr()) != 0 {
            return Err(errno());
        }
        if libc::chdir(e.slash.as_ptr()) != 0 {
            return Err(errno());
        }
        if libc::setgroups(e.groups.len(), e.groups.as_ptr()) != 0
            || libc::setgid(e.gid) != 0
            || libc::setuid(e.uid) != 0
        {
            return Err(errno());
        }
        Ok(())
    }
}

/// Execs the entry's program with `argv` and `env`, trying each `PATH` candidate as `execvpe`
/// does. Returns only on failure, with the errno that tells most (not-found unless a candidate
/// existed and failed otherwise).
///
/// # Safety
/// As [`enter`]; `argv` and `env` are NULL-terminated arrays of live C strings.
pub unsafe fn exec(e: &Entry, argv: &[*const libc::c_char], env: &[*const libc::c_char]) -> i32 {
    let mut best = libc::ENOENT;
    for program in &e.programs {
        // SAFETY: as above.
        let err = unsafe {
            libc::execve(program.as_ptr(), argv.as_ptr(), env.as_ptr());
            *libc::__errno_location()
        };
        if err != libc::ENOENT && err != libc::ENOTDIR {
            best = err;
        }
    }
    best
}

/// The environment of a container process: exactly the spec's, with a default `PATH` when it
/// has none.
pub fn environment(env: &[(String, String)]) -> Vec<(String, String)> {
    let mut all = env.to_vec();
    if !all.iter().any(|(k, _)| k == "PATH") {
        all.push(("PATH".into(), crate::exec::DEFAULT_PATH.into()));
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_looked_up_on_the_containers_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_str().expect("utf-8");
        let spec = ContainerExec { uid: 1, gid: 2, groups: vec![3], root: None };
        let e = Entry::at(root, &spec, "sh", "/usr/bin:/bin").expect("entry");
        let names: Vec<_> = e.programs.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["/usr/bin/sh", "/bin/sh"]);
        let e = Entry::at(root, &spec, "/bin/true", "/usr/bin").expect("entry");
        assert_eq!(e.programs.len(), 1);
        let targets: Vec<_> = e.mounts.iter().map(|m| m.target.to_string_lossy().into_owned()).collect();
        assert_eq!(targets, ["proc", "sys", "dev", "dev/pts"].map(|d| format!("{root}/{d}")));
        assert!(tmp.path().join("proc").is_dir() && tmp.path().join("dev").is_dir(), "mount points made");
        let many = ContainerExec { groups: vec![0; ContainerExec::MAX_GROUPS + 1], ..spec };
        assert!(matches!(Entry::at(root, &many, "sh", "/bin"), Err(ContainerError::Groups(_))));
    }

    #[test]
    fn a_pod_containers_root_must_be_a_mounted_container_directory() {
        let spec = |root: &str| ContainerExec { root: Some(root.to_owned()), ..ContainerExec::default() };
        let err = Entry::new(&spec("/etc"), "sh", "/bin").expect_err("not a container root");
        assert!(matches!(err, ContainerError::BadRoot(_)), "{err}");
        let unmounted = ContainerExec::root_dir("never-attached");
        let err = Entry::new(&spec(&unmounted), "sh", "/bin").expect_err("nothing mounted");
        assert!(matches!(err, ContainerError::NotMounted(_)), "{err}");
        assert!(!is_mount_point(Path::new("/nonexistent/x")));
        assert!(is_mount_point(Path::new("/proc")));
    }

    #[test]
    fn the_environment_is_the_specs_with_a_path() {
        let env = environment(&[("A".into(), "b".into())]);
        assert_eq!(env[0], ("A".into(), "b".into()));
        assert!(env.iter().any(|(k, _)| k == "PATH"));
        let env = environment(&[("PATH".into(), "/x".into())]);
        assert_eq!(env, [("PATH".to_owned(), "/x".to_owned())]);
    }
}
