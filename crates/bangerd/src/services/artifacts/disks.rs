//! A VM's writable disks: the root overlay (a sparse ext4 the guest's overlayfs writes into)
//! and the work disk mounted at /root, cloned from its image's work seed and grown to the VM's
//! `--disk`. Seeds are built once per image, lazily (so images made before seeds existed get
//! one on first use), under the image's seed lock.

use std::path::{Path, PathBuf};

use banger_core::{ImageRecord, VmRecord};
use banger_image::rootfs::BuiltImage;
use banger_image::seed::{self, ResizeRequest, SeedTools as _, SystemSeedTools};

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
        let disks = VmDisks { overlay: PathBuf::from(&paths.overlay_disk), work: PathBuf::from(&paths.work_disk) };
        let seed = if disks.work.exists() { None } else { Some(self.ensure_seed(image, built).await?) };
        let (overlay, work, overlay_mib, disk_mib) =
            (disks.overlay.clone(), disks.work.clone(), self.fleet.config.overlay_mib, vm.spec.disk_mib);
        tokio::task::spawn_blocking(move || -> Result<(), DiskError> {
            if !overlay.exists() {
                make_ext4(&overlay, overlay_mib)?;
            }
            match seed {
                Some(seed) => {
                    let report = seed::clone_work_disk(&SystemSeedTools, &seed, &work, disk_mib)
                        .map_err(|source| DiskError::Seed { what: "clone the work disk".into(), source })?;
                    tracing::debug!(method = ?report.method, elapsed = ?report.elapsed, "work disk cloned");
                }
                None => grow(&work, disk_mib)?,
            }
            Ok(())
        })
        .await??;
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
fn grow(work: &Path, size_mib: u64) -> Result<(), DiskError> {
    let io = |what: &'static str| move |source| DiskError::Io { what, path: work.to_owned(), source };
    let want = size_mib * 1024 * 1024;
    let have = std::fs::metadata(work).map_err(io("stat"))?.len();
    if have >= want {
        return Ok(());
    }
    std::fs::OpenOptions::new().write(true).open(work).and_then(|f| f.set_len(want)).map_err(io("grow"))?;
    SystemSeedTools.resize2fs(&ResizeRequest { image: work.to_owned(), size_mib }).map_err(DiskError::Resize)
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
