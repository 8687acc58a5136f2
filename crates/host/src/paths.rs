//! Making banger's directories. The paths themselves are pure arithmetic and live in
//! [`banger_core::Layout`] (re-exported here and at the crate root, where they used to be).

use std::path::Path;

pub use banger_core::Layout;

/// Makes `dir` (and parents) with `mode`, saying clearly when it cannot.
pub fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// Clears the permission bits of `path` outside `keep` when the calling user owns it, so a state
/// dir made by hand under a 0755 umask does not leave the database and logs world-readable.
/// Returns the old and new modes when it changed them; a path that does not exist, or that
/// belongs to someone else (whose choice it is), is left alone.
pub fn restrict_mode(path: &Path, keep: u32) -> std::io::Result<Option<(u32, u32)>> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let old = meta.mode() & 0o7777;
    if meta.file_type().is_symlink() || meta.uid() != nix::unistd::geteuid().as_raw() || old & !keep == 0 {
        return Ok(None);
    }
    let new = old & keep;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(new))?;
    Ok(Some((old, new)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_dir_makes_parents_with_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("a/b");
        ensure_dir(&deep, 0o700).expect("ensure_dir");
        ensure_dir(&deep, 0o700).expect("ensure_dir again");
        let mode = std::fs::metadata(&deep).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn restrict_mode_clears_bits_outside_keep_only_when_needed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("db");
        std::fs::write(&file, b"").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(restrict_mode(&file, 0o600).expect("restrict"), Some((0o644, 0o600)));
        assert_eq!(std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777, 0o600);
        assert_eq!(restrict_mode(&file, 0o600).expect("again"), None, "already tight");
        assert_eq!(restrict_mode(&dir.path().join("absent"), 0o600).expect("absent"), None);
    }
}
