//! Making banger's directories. The paths themselves are pure arithmetic and live in
//! [`banger_core::Layout`] (re-exported here and at the crate root, where they used to be).

use std::path::Path;

pub use banger_core::Layout;

/// Makes `dir` (and parents) with `mode`, saying clearly when it cannot.
pub fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
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
}
