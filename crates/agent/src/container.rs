//! Container processes (the containerd shim's tasks): the VM's container disk (`banger.container=`
//! on the kernel command line, an ext4 image of the container's root made on the host) is mounted
//! once at [`ROOT`] with `/proc`, `/sys` and `/dev` inside it; each process then enters it in
//! the forked child, before exec: a private mount namespace, `pivot_root` into [`ROOT`] (the old
//! root detached, so nothing of the guest's own tree stays reachable; `chroot` only when the
//! kernel refuses the pivot), then the OCI spec's user and groups. Everything else (stdio, pty,
//! signals, exit status, flow control) is the plain exec path's.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use banger_proto::agent::ContainerExec;
use nix::mount::{mount, MsFlags};

/// Where the container's root is mounted in the guest.
pub const ROOT: &str = "/run/banger/container/rootfs";

/// Why a container process could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The VM was made without a container disk.
    #[error("this vm has no container disk (it was not created by the containerd shim)")]
    NoDisk,
    /// Mounting the disk or its API filesystems failed.
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

/// Mounts the container disk at [`ROOT`] and `/proc`, `/sys`, `/dev` (and `/dev/pts`) inside it,
/// once.
pub fn prepare() -> Result<(), ContainerError> {
    let mut prepared = PREPARED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if *prepared {
        return Ok(());
    }
    let dev = device().ok_or(ContainerError::NoDisk)?;
    crate::mounts::wait_for_devices(&[&dev], Duration::from_secs(10))?;
    mkdir(ROOT)?;
    mount_one(Some(dev.as_str()), ROOT, Some("ext4"), MsFlags::MS_NOATIME)?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for (fstype, dir, flags) in [
        ("proc", "proc", nosuid),
        ("sysfs", "sys", nosuid | MsFlags::MS_RDONLY),
        ("devtmpfs", "dev", MsFlags::MS_NOSUID),
    ] {
        let target = format!("{ROOT}/{dir}");
        mkdir(&target)?;
        mount_one(Some(fstype), &target, Some(fstype), flags)?;
    }
    let pts = format!("{ROOT}/dev/pts");
    mkdir(&pts)?;
    // The guest's own devpts, so the agent's ptys are the container's /dev/pts/N too.
    mount_one(Some("/dev/pts"), &pts, None, MsFlags::MS_BIND)?;
    *prepared = true;
    Ok(())
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

/// What the forked child needs to enter the container, made before the fork (the child only
/// makes syscalls on it).
#[derive(Debug)]
pub struct Entry {
    root: CString,
    dot: CString,
    slash: CString,
    /// Where the program may be, in the container's tree, in `PATH` order.
    programs: Vec<CString>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl Entry {
    /// The entry for `spec`, running `program` (looked up on `path` inside the container when it
    /// has no `/`).
    pub fn new(spec: &ContainerExec, program: &str, path: &str) -> Result<Self, ContainerError> {
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
        Ok(Self {
            root: c(ROOT.as_bytes())?,
            dot: c(b".")?,
            slash: c(b"/")?,
            programs,
            uid: spec.uid,
            gid: spec.gid,
            groups: spec.groups.clone(),
        })
    }
}

/// Enters the container in a freshly forked child: private mounts, pivot into [`ROOT`], the
/// user. On failure, the errno.
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
        let spec = ContainerExec { uid: 1, gid: 2, groups: vec![3] };
        let e = Entry::new(&spec, "sh", "/usr/bin:/bin").expect("entry");
        let names: Vec<_> = e.programs.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["/usr/bin/sh", "/bin/sh"]);
        let e = Entry::new(&spec, "/bin/true", "/usr/bin").expect("entry");
        assert_eq!(e.programs.len(), 1);
        let many = ContainerExec { groups: vec![0; ContainerExec::MAX_GROUPS + 1], ..spec };
        assert!(matches!(Entry::new(&many, "sh", "/bin"), Err(ContainerError::Groups(_))));
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
