//! Atomic publication of artifact directories (kernels, images).
//!
//! Work happens in `<parent>/.staging-<random>/`, which is removed when dropped. Publishing is a
//! `renameat2(RENAME_NOREPLACE)` of a finished directory to `<parent>/<name>`, so a name either
//! holds a complete artifact or nothing, and two racing publishers cannot replace each other.
//! Deleting renames the directory aside first, so a half-deleted artifact never keeps its name.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags};

/// Prefix of staging directories; names starting with `.` are never artifacts.
pub(crate) const STAGING_PREFIX: &str = ".staging-";

/// Why an artifact name cannot be a directory name. Policy (allowed characters) is the caller's;
/// this only keeps the name inside its parent directory.
pub(crate) fn unsafe_name(name: &str) -> bool {
    name.is_empty() || name.starts_with('.') || name.contains(['/', '\0'])
}

/// A private work directory under an artifact directory.
#[derive(Debug)]
pub(crate) struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    /// Creates `parent` if needed and a fresh staging directory in it.
    pub(crate) fn new(parent: &Path) -> io::Result<Self> {
        fs::create_dir_all(parent)?;
        let dir = tempfile::Builder::new().prefix(STAGING_PREFIX).tempdir_in(parent)?;
        Ok(Self { dir })
    }

    /// The staging directory.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// What went wrong publishing a directory.
#[derive(Debug)]
pub(crate) enum PublishFailure {
    /// The destination exists.
    Exists,
    /// The rename failed otherwise.
    Io(io::Error),
}

/// Renames the finished directory `from` to `to` (mode 0755), failing if `to` exists.
pub(crate) fn publish(from: &Path, to: &Path) -> Result<(), PublishFailure> {
    fs::set_permissions(from, fs::Permissions::from_mode(0o755)).map_err(PublishFailure::Io)?;
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST | Errno::ENOTEMPTY) => Err(PublishFailure::Exists),
        // File systems without RENAME_NOREPLACE: check, then rename (a small race, no loss:
        // rename(2) refuses to replace a non-empty directory).
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            if to.exists() {
                return Err(PublishFailure::Exists);
            }
            fs::rename(from, to).map_err(|e| match e.raw_os_error().map(Errno::from_raw) {
                Some(Errno::EEXIST | Errno::ENOTEMPTY) => PublishFailure::Exists,
                _ => PublishFailure::Io(e),
            })
        }
        Err(errno) => Err(PublishFailure::Io(errno.into())),
    }
}

/// Removes `<parent>/<name>`; `Ok(false)` if it does not exist.
pub(crate) fn delete_dir(parent: &Path, name: &str) -> io::Result<bool> {
    let dir = parent.join(name);
    match fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let aside: PathBuf = tempfile::Builder::new().prefix(".deleting-").tempdir_in(parent)?.keep();
    // `aside` is an empty directory now: rename(2) may replace it.
    fs::rename(&dir, &aside)?;
    fs::remove_dir_all(&aside)?;
    Ok(true)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;

    #[test]
    fn publishes_once_and_cleans_up_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let staging = Staging::new(&parent.path().join("kernels")).unwrap();
        let staged = staging.path().to_owned();
        assert!(staged.file_name().unwrap().to_str().unwrap().starts_with(STAGING_PREFIX));
        let work = staged.join("out");
        fs::create_dir(&work).unwrap();
        fs::write(work.join("f"), "x").unwrap();
        let to = parent.path().join("kernels/k");
        publish(&work, &to).unwrap();
        assert_eq!(fs::read_to_string(to.join("f")).unwrap(), "x");
        assert_eq!(fs::metadata(&to).unwrap().permissions().mode() & 0o777, 0o755);

        let again = staged.join("again");
        fs::create_dir(&again).unwrap();
        assert!(matches!(publish(&again, &to), Err(PublishFailure::Exists)));
        // Even an empty destination is not replaced.
        let empty = parent.path().join("kernels/empty");
        fs::create_dir(&empty).unwrap();
        assert!(matches!(publish(&again, &empty), Err(PublishFailure::Exists)));

        drop(staging);
        assert!(!staged.exists());
    }

    #[test]
    fn deletes_directories() {
        let parent = tempfile::tempdir().unwrap();
        fs::create_dir_all(parent.path().join("k/modules")).unwrap();
        fs::write(parent.path().join("k/modules/x"), "x").unwrap();
        assert!(delete_dir(parent.path(), "k").unwrap());
        assert!(!delete_dir(parent.path(), "k").unwrap());
        assert_eq!(fs::read_dir(parent.path()).unwrap().count(), 0);
    }

    #[test]
    fn refuses_names_that_leave_the_parent() {
        for bad in ["", ".staging-x", "..", "a/b", "a\0"] {
            assert!(unsafe_name(bad), "{bad:?}");
        }
        assert!(!unsafe_name("debian-6.1-cloud"));
    }
}
