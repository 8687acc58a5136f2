//! Merging a stopped VM's root — the read-only base image under the overlay disk's `upper/`
//! layer — into one directory tree, so that it can become a new image.
//!
//! Both ext4 files are loop-mounted read-only (`noload`: no journal replay, nothing written;
//! `nodev,nosuid,noexec`: nothing in them is opened as a device or run with their privileges),
//! then stacked as two *lower* layers of a read-only overlayfs mount (with the same flags), so
//! the kernel applies the overlay's whiteouts and opaque directories exactly as the guest saw
//! them. Everything is unmounted again, also when the caller's work fails. Mounting sits
//! behind [`Mounter`].
//!
//! The overlay disk is guest-written, and the host kernel's ext4 driver is not hardened against
//! crafted images: before anything is mounted, `e2fsck -fn` (read-only, in user space) checks
//! it in full, and a disk with any error, or a journal left to replay, is refused.

use std::path::{Path, PathBuf};

/// Mount options of every promote mount.
pub const MOUNT_FLAGS: &str = "ro,nodev,nosuid,noexec";

/// Mount operations, behind a trait so the merge logic is tested with a recording fake.
pub trait Mounter {
    /// Checks the unmounted ext4 file `image` read-only (`e2fsck -fn`).
    fn check_image(&self, image: &Path) -> Result<crate::seed::FsckReport, MountError>;
    /// Mounts the ext4 file `image` read-only at `target` through a loop device.
    fn mount_image_ro(&self, image: &Path, target: &Path) -> Result<(), MountError>;
    /// Mounts a read-only overlayfs of `lower` layers (top first) at `target`.
    fn mount_overlay_ro(&self, lower: &[&Path], target: &Path) -> Result<(), MountError>;
    /// Unmounts `target` (its loop device, if any, is released with it).
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
}

/// A mount command failed.
#[derive(Debug, thiserror::Error)]
#[error("{command} failed: {detail}")]
pub struct MountError {
    /// The command, for the message.
    pub command: String,
    /// What it said.
    pub detail: String,
}

/// Why a merge failed.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError<E: std::error::Error + 'static> {
    /// Preparing the mount points failed.
    #[error("cannot prepare {path}")]
    Prepare {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A mount failed (run as root; the files must be clean ext4 images).
    #[error("cannot mount the vm's disks; promote needs root and clean ext4 images")]
    Mount(#[source] MountError),
    /// The overlay disk could not be checked.
    #[error("cannot check the vm's overlay disk {} before mounting it", disk.display())]
    Check {
        /// The disk.
        disk: PathBuf,
        /// Why.
        #[source]
        source: MountError,
    },
    /// The overlay disk failed its check: nothing was mounted.
    #[error(
        "the vm's overlay disk {} is not a clean ext4 file system (e2fsck -fn: {detail}); nothing was mounted; \
         start the vm and stop it cleanly (`banger vm stop`, not --force), then promote again",
        disk.display()
    )]
    Unclean {
        /// The disk.
        disk: PathBuf,
        /// The end of what `e2fsck` said.
        detail: String,
    },
    /// The caller's work on the merged tree failed.
    #[error(transparent)]
    Work(E),
}

/// The real mounter: `mount(8)` and `umount(8)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemMounter;

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), MountError> {
    let command = format!("{program} {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| MountError { command: command.clone(), detail: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MountError { command, detail: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
    }
}

impl Mounter for SystemMounter {
    fn check_image(&self, image: &Path) -> Result<crate::seed::FsckReport, MountError> {
        use crate::seed::SeedTools as _;
        crate::seed::SystemSeedTools.e2fsck_ro(image).map_err(|e| MountError {
            command: format!("e2fsck -fn {}", image.display()),
            detail: banger_core::error_chain(&e),
        })
    }

    fn mount_image_ro(&self, image: &Path, target: &Path) -> Result<(), MountError> {
        let options = format!("{MOUNT_FLAGS},loop,noload");
        run(
            "mount",
            &["-t".as_ref(), "ext4".as_ref(), "-o".as_ref(), options.as_ref(), image.as_os_str(), target.as_os_str()],
        )
    }

    fn mount_overlay_ro(&self, lower: &[&Path], target: &Path) -> Result<(), MountError> {
        let layers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        let options = format!("{MOUNT_FLAGS},lowerdir={}", layers.join(":"));
        run(
            "mount",
            &[
                "-t".as_ref(),
                "overlay".as_ref(),
                "overlay".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                target.as_os_str(),
            ],
        )
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        run("umount", &[target.as_os_str()])
    }
}

/// Unmounts what was mounted, in reverse order, when dropped.
struct Mounted<'a> {
    mounter: &'a dyn Mounter,
    targets: Vec<PathBuf>,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        for target in self.targets.iter().rev() {
            if let Err(e) = self.mounter.unmount(target) {
                tracing::error!(target = %target.display(), error = %e, "cannot unmount after promote");
            }
        }
    }
}

/// Mounts `base` under `overlay_disk`'s `upper/` layer below `work_dir` and runs `work` on the
/// merged tree; unmounts everything afterwards. An overlay disk without `upper/` (a VM that never
/// booted) gives the base alone.
pub fn with_merged_root<T, E: std::error::Error + 'static>(
    mounter: &dyn Mounter,
    base: &Path,
    overlay_disk: &Path,
    work_dir: &Path,
    work: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, PromoteError<E>> {
    let dirs = ["base", "overlay", "merged"].map(|d| work_dir.join(d));
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|source| PromoteError::Prepare { path: d.clone(), source })?;
    }
    let [base_dir, overlay_dir, merged_dir] = dirs;
    // The guest wrote the overlay disk: check it in user space before the kernel parses it.
    let report = mounter
        .check_image(overlay_disk)
        .map_err(|source| PromoteError::Check { disk: overlay_disk.to_owned(), source })?;
    if !report.clean {
        return Err(PromoteError::Unclean { disk: overlay_disk.to_owned(), detail: report.first_problem() });
    }
    let mut mounted = Mounted { mounter, targets: Vec::new() };
    mounter.mount_image_ro(base, &base_dir).map_err(PromoteError::Mount)?;
    mounted.targets.push(base_dir.clone());
    mounter.mount_image_ro(overlay_disk, &overlay_dir).map_err(PromoteError::Mount)?;
    mounted.targets.push(overlay_dir.clone());
    let upper = overlay_dir.join("upper");
    let root = if upper.is_dir() {
        mounter.mount_overlay_ro(&[&upper, &base_dir], &merged_dir).map_err(PromoteError::Mount)?;
        mounted.targets.push(merged_dir.clone());
        merged_dir
    } else {
        base_dir
    };
    let result = work(&root).map_err(PromoteError::Work);
    drop(mounted);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Check(PathBuf),
        Image(PathBuf, PathBuf),
        Overlay(Vec<PathBuf>, PathBuf),
        Unmount(PathBuf),
    }

    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<Call>>,
        fail_overlay: bool,
        make_upper: bool,
        unclean: bool,
    }

    impl Mounter for Fake {
        fn check_image(&self, image: &Path) -> Result<crate::seed::FsckReport, MountError> {
            self.calls.borrow_mut().push(Call::Check(image.into()));
            let output_head =
                if self.unclean { "Pass 1: Checking inodes\nInode 12 has illegal block(s).  Clear? no\n" } else { "" };
            Ok(crate::seed::FsckReport { clean: !self.unclean, output_head: output_head.into() })
        }
        fn mount_image_ro(&self, image: &Path, target: &Path) -> Result<(), MountError> {
            if self.make_upper && image.ends_with("ovl.ext4") {
                std::fs::create_dir_all(target.join("upper")).expect("upper");
            }
            self.calls.borrow_mut().push(Call::Image(image.into(), target.into()));
            Ok(())
        }
        fn mount_overlay_ro(&self, lower: &[&Path], target: &Path) -> Result<(), MountError> {
            self.calls.borrow_mut().push(Call::Overlay(lower.iter().map(|p| p.to_path_buf()).collect(), target.into()));
            if self.fail_overlay {
                return Err(MountError { command: "mount".into(), detail: "nope".into() });
            }
            Ok(())
        }
        fn unmount(&self, target: &Path) -> Result<(), MountError> {
            self.calls.borrow_mut().push(Call::Unmount(target.into()));
            Ok(())
        }
    }

    #[test]
    fn merges_upper_over_base_and_unmounts_in_reverse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Fake { make_upper: true, ..Default::default() };
        let w = dir.path();
        let seen = with_merged_root(&fake, Path::new("/i/base.ext4"), Path::new("/v/ovl.ext4"), w, |root| {
            Ok::<_, std::io::Error>(root.to_path_buf())
        })
        .expect("merge");
        assert_eq!(seen, w.join("merged"));
        assert_eq!(
            *fake.calls.borrow(),
            vec![
                Call::Check("/v/ovl.ext4".into()),
                Call::Image("/i/base.ext4".into(), w.join("base")),
                Call::Image("/v/ovl.ext4".into(), w.join("overlay")),
                Call::Overlay(vec![w.join("overlay/upper"), w.join("base")], w.join("merged")),
                Call::Unmount(w.join("merged")),
                Call::Unmount(w.join("overlay")),
                Call::Unmount(w.join("base")),
            ]
        );
    }

    #[test]
    fn a_never_booted_vm_gives_the_base_and_failures_still_unmount() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Fake::default();
        let w = dir.path();
        let seen = with_merged_root(&fake, Path::new("/b"), Path::new("/o"), w, |root| {
            Ok::<_, std::io::Error>(root.to_path_buf())
        })
        .expect("merge");
        assert_eq!(seen, w.join("base"));

        let failing = Fake { make_upper: true, fail_overlay: true, ..Default::default() };
        let err =
            with_merged_root(&failing, Path::new("/b"), Path::new("/v/ovl.ext4"), w, |_| Ok::<_, std::io::Error>(()));
        assert!(matches!(err, Err(PromoteError::Mount(_))));
        let calls = failing.calls.borrow();
        assert_eq!(calls.iter().filter(|c| matches!(c, Call::Unmount(_))).count(), 2, "both loop mounts released");
    }

    #[test]
    fn an_unclean_overlay_disk_is_refused_before_anything_is_mounted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Fake { unclean: true, make_upper: true, ..Default::default() };
        let err = with_merged_root(&fake, Path::new("/b"), Path::new("/v/ovl.ext4"), dir.path(), |_| {
            Ok::<_, std::io::Error>(())
        })
        .expect_err("refused");
        assert_eq!(*fake.calls.borrow(), vec![Call::Check("/v/ovl.ext4".into())], "nothing mounted");
        let message = err.to_string();
        assert!(message.contains("/v/ovl.ext4 is not a clean ext4 file system"), "{message}");
        assert!(message.contains("(e2fsck -fn: Inode 12 has illegal block(s))"), "{message}");
        assert!(message.contains("stop it cleanly"), "{message}");
    }
}
