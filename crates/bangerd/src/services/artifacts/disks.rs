//! A VM's writable disks: the root overlay (a sparse ext4 the guest's overlayfs writes into)
//! and the work disk mounted at /root, cloned from its image's work seed and grown to the VM's
//! `--disk`. Seeds are built once per image, lazily (so images made before seeds existed get
//! one on first use), under the image's seed lock.
//!
//! A work disk the guest has used is guest-written: before `resize2fs` grows it, a read-only
//! `e2fsck -fn` checks it in full, and a disk with errors (or a journal left to replay by a
//! guest that did not stop cleanly) is not grown: the start goes on at the old size with a
//! warning, and a later start after a clean stop grows it.

use std::path::{Path, PathBuf};

use banger_core::{ImageRecord, VmRecord};
use banger_image::rootfs::BuiltImage;
use banger_image::seed::{self, ResizeRequest, SeedTools, SystemSeedTools};

use super::{Artifacts, ArtifactsError};

/// Why a VM's disk could not be made or grown.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file operation failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `mkfs.ext4` could not run.
    #[error("cannot run mkfs.ext4; install it with `apt-get install e2fsprogs`")]
    NoMkfs(#[source] std::io::Error),
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
    /// The file system could not be grown.
    #[error("cannot grow the work disk's filesystem")]
    Resize(#[source] banger_image::seed::SeedToolError),
    /// The file system could not be checked before a grow.
    #[error("cannot check the work disk's filesystem before growing it")]
    Check(#[source] banger_image::seed::SeedToolError),
    /// The seed could not be built or cloned.
    #[error("cannot {what}")]
    Seed {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: seed::SeedError,
    },
}

/// The disks a boot needs.
pub struct VmDisks {
    /// Root overlay disk.
    pub overlay: PathBuf,
    /// Work disk (/root).
    pub work: PathBuf,
    /// What the operation should tell: a grow that was skipped.
    pub warnings: Vec<String>,
}

impl Artifacts {
    /// Makes the VM's overlay and work disks when missing, and grows the work disk when `--disk`
    /// grew since.
    pub async fn provision_disks(
        &self,
        vm: &VmRecord,
        image: &ImageRecord,
        built: &BuiltImage,
    ) -> Result<VmDisks, ArtifactsError> {
        let paths = vm.paths();
        let mut disks = VmDisks {
            overlay: PathBuf::from(&paths.overlay_disk),
            work: PathBuf::from(&paths.work_disk),
            warnings: Vec::new(),
        };
        let seed = if disks.work.exists() { None } else { Some(self.ensure_seed(image, built).await?) };
        let (overlay, work, overlay_mib, disk_mib) =
            (disks.overlay.clone(), disks.work.clone(), self.fleet.config.overlay_mib, vm.spec.disk_mib);
        let skipped = tokio::task::spawn_blocking(move || -> Result<Option<String>, DiskError> {
            if !overlay.exists() {
                make_ext4(&overlay, overlay_mib)?;
            }
            match seed {
                Some(seed) => {
                    let report = seed::clone_work_disk(&SystemSeedTools, &seed, &work, disk_mib)
                        .map_err(|source| DiskError::Seed { what: "clone the work disk".into(), source })?;
                    tracing::debug!(method = ?report.method, elapsed = ?report.elapsed, "work disk cloned");
                    Ok(None)
                }
                None => grow(&SystemSeedTools, &work, disk_mib),
            }
        })
        .await??;
        if let Some(warning) = skipped {
            tracing::warn!(vm = %vm.name, %warning, "work disk not grown");
            disks.warnings.push(warning);
        }
        Ok(disks)
    }

    /// The work seed of `image`, built from its /etc/skel on first use.
    pub async fn ensure_seed(&self, image: &ImageRecord, built: &BuiltImage) -> Result<PathBuf, ArtifactsError> {
        let path = built.dir.join(format!("work-seed-v{}.ext4", seed::SEED_FORMAT_VERSION));
        if path.exists() {
            return Ok(path);
        }
        let _guard = self.locks.lock(&format!("seed:{}", image.name)).await;
        if !path.exists() {
            let (rootfs, out) = (built.path.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                seed::build_seed_from_image(&SystemSeedTools, &rootfs, &out, seed::DEFAULT_SEED_SIZE_MIB)
            })
            .await?
            .map_err(|source| DiskError::Seed {
                what: format!("build the work seed of image '{}'", image.name),
                source,
            })?;
            self.fleet.store.set_image_seed(&image.name, &path.display().to_string())?;
            tracing::info!(image = %image.name, seed = %path.display(), "work seed built");
        }
        Ok(path)
    }
}

/// Grows the work disk file and its filesystem to `size_mib` if it is smaller (never shrinks).
/// The disk is guest-written: it is grown only after a clean `e2fsck -fn`; otherwise nothing is
/// changed and the returned warning says why and what to do.
fn grow(tools: &dyn SeedTools, work: &Path, size_mib: u64) -> Result<Option<String>, DiskError> {
    let io = |what: &'static str| move |source| DiskError::Io { what, path: work.to_owned(), source };
    let want = size_mib * 1024 * 1024;
    let have = std::fs::metadata(work).map_err(io("stat"))?.len();
    if have >= want {
        return Ok(None);
    }
    let report = tools.e2fsck_ro(work).map_err(DiskError::Check)?;
    if !report.clean {
        let problem = report.first_problem();
        return Ok(Some(format!(
            "the work disk was not grown to {size_mib} MiB: `e2fsck -fn` found its file system unclean ({problem}); \
             stop the vm cleanly (`banger vm stop`, not --force) and start it again to grow it"
        )));
    }
    std::fs::OpenOptions::new().write(true).open(work).and_then(|f| f.set_len(want)).map_err(io("grow"))?;
    tools.resize2fs(&ResizeRequest { image: work.to_owned(), size_mib, checked: true }).map_err(DiskError::Resize)?;
    Ok(None)
}

/// Makes a sparse ext4 file of `size_mib` at `path` (written to a temp name, then renamed).
fn make_ext4(path: &Path, size_mib: u64) -> Result<(), DiskError> {
    let tmp = path.with_extension("ext4.tmp");
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| DiskError::Io { what, path, source }
    };
    let file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    file.set_len(size_mib * 1024 * 1024).map_err(io("size", &tmp))?;
    drop(file);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-L", "banger-overlay"])
        .arg(&tmp)
        .output()
        .map_err(DiskError::NoMkfs)?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(DiskError::Mkfs(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    std::fs::rename(&tmp, path).map_err(io("publish", path))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use banger_image::seed::{FakeSeedTools, SeedCall};

    use super::*;

    #[test]
    fn a_used_work_disk_is_grown_only_after_a_clean_check() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work.ext4");
        std::fs::File::create(&work).unwrap().set_len(64 << 20).unwrap();

        let clean = FakeSeedTools::new();
        assert_eq!(grow(&clean, &work, 64).unwrap(), None, "no grow asked: nothing runs");
        assert!(clean.calls().is_empty());
        assert_eq!(grow(&clean, &work, 128).unwrap(), None);
        let calls = clean.calls();
        assert_eq!(calls[0], SeedCall::E2fsck(work.clone()));
        assert_eq!(calls[1], SeedCall::Resize2fs(ResizeRequest { image: work.clone(), size_mib: 128, checked: true }));
        assert_eq!(std::fs::metadata(&work).unwrap().len(), 128 << 20);

        let dirty = FakeSeedTools {
            fsck_errors: Some("Inode 12 has illegal blocks.  Clear? no\n".into()),
            ..Default::default()
        };
        let warning = grow(&dirty, &work, 256).unwrap().expect("a warning");
        assert!(
            warning.contains("not grown to 256 MiB") && warning.contains("Inode 12 has illegal blocks"),
            "{warning}"
        );
        assert!(warning.contains("stop the vm cleanly"), "{warning}");
        assert_eq!(dirty.calls(), [SeedCall::E2fsck(work.clone())], "no resize2fs on an unclean disk");
        assert_eq!(std::fs::metadata(&work).unwrap().len(), 128 << 20, "the file is not grown either");
    }
}
