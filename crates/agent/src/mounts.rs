//! Filesystems of the boot path: the API mounts (/proc, /sys, /dev, /run), kernel modules, the
//! copy-on-write root (read-only base + per-VM ext4 upper, joined by overlayfs), the switch into
//! it, and the read-only remounts before power-off.
//!
//! Layout after [`switch_root`]: `/` is the overlay; the base is at [`BASE_DIR`] and the per-VM
//! disk at [`OVERLAY_DIR`] (its `upper/` and `work/` hold the overlay's state).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};

/// Where the read-only base ends up in the new root.
pub const BASE_DIR: &str = "/run/banger/base";
/// Where the per-VM overlay disk ends up in the new root.
pub const OVERLAY_DIR: &str = "/run/banger/overlay";
const NEW_ROOT: &str = "/newroot";

/// A boot-path filesystem step that failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `mount(2)`.
    #[error("cannot mount {source_name} ({fstype}) on {target}")]
    Mount {
        /// What was mounted.
        source_name: String,
        /// Type, or "move"/"remount".
        fstype: String,
        /// Where.
        target: String,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// `mkdir -p`.
    #[error("cannot create {path}")]
    Mkdir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A device node did not appear.
    #[error("{path} did not appear within {timeout:?}; is the disk attached and its driver loaded?")]
    NoDevice {
        /// The node.
        path: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// chdir/chroot of the switch.
    #[error("cannot switch root: {step}")]
    Switch {
        /// The call.
        step: &'static str,
        /// Why.
        #[source]
        errno: Errno,
    },
}

fn mkdir_p(path: &str) -> Result<(), MountError> {
    std::fs::create_dir_all(path).map_err(|source| MountError::Mkdir { path: path.to_owned(), source })
}

/// `mount -t fstype source target -o data` after `mkdir -p target`.
fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), MountError> {
    mkdir_p(target)?;
    mount(Some(source), target, Some(fstype), flags, data).map_err(|errno| MountError::Mount {
        source_name: source.to_owned(),
        fstype: fstype.to_owned(),
        target: target.to_owned(),
        errno,
    })
}

/// `mount --move from to`.
fn move_mount(from: &str, to: &str) -> Result<(), MountError> {
    mkdir_p(to)?;
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|errno| MountError::Mount {
        source_name: from.to_owned(),
        fstype: "move".to_owned(),
        target: to.to_owned(),
        errno,
    })
}

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm and /run.
pub fn early() -> Result<(), MountError> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", hardened, None)?;
    mount_fs("sysfs", "/sys", "sysfs", hardened, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    )?;
    mount_fs("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    Ok(())
}

/// Loads the modules listed (one absolute path a line) in `list`, in order. A module already
/// loaded is fine; other failures are logged and skipped: a missing driver shows up later as a
/// device that never appears, with a clearer message. Returns how many were loaded.
pub fn load_modules(list: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(list) else {
        log!("no module list at {}; loading none", list.display());
        return 0;
    };
    let mut loaded = 0;
    for path in module_paths(&text) {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) => {
                log!("cannot open module {path}: {e}");
                continue;
            }
        };
        match finit_module(file.as_fd(), c"", ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            Err(Errno::EEXIST) => {}
            Err(e) => log!("cannot load module {path}: {e}"),
        }
    }
    loaded
}

/// Waits until every path in `paths` exists.
pub fn wait_for_devices(paths: &[&str], timeout: Duration) -> Result<(), MountError> {
    let start = Instant::now();
    for path in paths {
        while !Path::new(path).exists() {
            if start.elapsed() > timeout {
                return Err(MountError::NoDevice { path: (*path).to_owned(), timeout });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// Mounts `base` read-only and `overlay` read-write, joins them with overlayfs at /newroot and
/// moves the API mounts and both disks into it.
pub fn overlay_root(base: &str, overlay: &str) -> Result<(), MountError> {
    mount_fs(base, "/mnt/base", "ext4", MsFlags::MS_RDONLY, None)?;
    mount_fs(overlay, "/mnt/overlay", "ext4", MsFlags::empty(), None)?;
    mkdir_p("/mnt/overlay/upper")?;
    mkdir_p("/mnt/overlay/work")?;
    let options = "lowerdir=/mnt/base,upperdir=/mnt/overlay/upper,workdir=/mnt/overlay/work";
    mount_fs("overlay", NEW_ROOT, "overlay", MsFlags::empty(), Some(options))?;
    for api in ["/dev", "/proc", "/sys", "/run"] {
        move_mount(api, &format!("{NEW_ROOT}{api}"))?;
    }
    move_mount("/mnt/base", &format!("{NEW_ROOT}{BASE_DIR}"))?;
    move_mount("/mnt/overlay", &format!("{NEW_ROOT}{OVERLAY_DIR}"))?;
    Ok(())
}

/// Makes /newroot the root: `chdir /newroot; mount --move . /; chroot .; chdir /`. The
/// initramfs stays in memory underneath (it is small).
pub fn switch_root() -> Result<(), MountError> {
    let switch = |step| move |errno| MountError::Switch { step, errno };
    nix::unistd::chdir(NEW_ROOT).map_err(switch("chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(switch("mount --move . /"))?;
    nix::unistd::chroot(".").map_err(switch("chroot"))?;
    nix::unistd::chdir("/").map_err(switch("chdir /"))?;
    Ok(())
}

/// Mounts the work disk (ext4) at `target`.
pub fn mount_work(device: &str, target: &str) -> Result<(), MountError> {
    mount_fs(device, target, "ext4", MsFlags::empty(), None)
}

/// Before power-off: sync and remount the root and the overlay disk read-only, so the disk is
/// clean. Failures are logged: power-off goes ahead regardless.
pub fn quiesce() {
    nix::unistd::sync();
    let remount = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for target in ["/root", "/", OVERLAY_DIR] {
        let is_mount = target != "/root" || is_mount_point(target);
        if is_mount {
            if let Err(e) = mount(None::<&str>, target, None::<&str>, remount, None::<&str>) {
                log!("cannot remount {target} read-only: {e}");
            }
        }
    }
    nix::unistd::sync();
}

fn is_mount_point(path: &str) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    text.lines().any(|line| line.split_whitespace().nth(1) == Some(path))
}

/// The paths of a module list: one a line, blanks and `#` comments skipped.
fn module_paths(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_lists_skip_blanks_and_comments() {
        assert_eq!(module_paths("/a.ko\n\n# c\n /b.ko \n").collect::<Vec<_>>(), ["/a.ko", "/b.ko"]);
    }

    #[test]
    fn waiting_for_devices_times_out_with_the_path() {
        let err = wait_for_devices(&["/nonexistent-dev"], Duration::from_millis(30)).expect_err("absent");
        assert!(err.to_string().starts_with("/nonexistent-dev did not appear"));
        wait_for_devices(&["/"], Duration::from_millis(30)).expect("present");
    }
}
