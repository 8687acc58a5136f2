//! Extracting a tar stream from a guest (`banger vm cp VM:SRC DST`) on the host. The stream is
//! untrusted: nothing may land outside the destination directory, with the guest agent's
//! `unpack` rules:
//! - entry paths must be relative and free of `..`, and all under the one top entry the copy
//!   asked for (which may be renamed, or stripped to copy a directory's contents);
//! - every directory on the way is opened with `O_NOFOLLOW` from the destination's fd, so a
//!   symlink (made by this stream or already there) is never written through;
//! - files are created with `O_EXCL | O_NOFOLLOW` after removing what was at their name;
//! - symlinks must point inside (`banger_proto::agent::symlink_escape`);
//! - hard links, devices, FIFOs and other special entries are refused;
//! - permission bits are kept without set-id and sticky bits; owners are not taken.
//!
//! The first refusal ends the extraction with an error naming the entry.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use banger_proto::agent::symlink_escape;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

/// An extraction that failed.
#[derive(Debug, thiserror::Error)]
pub enum UntarError {
    /// An entry that would land outside, or that is not allowed.
    #[error("refused entry '{path}' from the guest: {why}")]
    Refused {
        /// The entry's path as the stream names it.
        path: String,
        /// Why.
        why: String,
    },
    /// A file system call failed.
    #[error("{path}: cannot {what}")]
    Io {
        /// The host path.
        path: String,
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a tar stream, or it broke off.
    #[error("bad tar stream from the guest")]
    Tar(#[source] std::io::Error),
}

/// How the archive's top entry maps onto the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Top {
    /// The top entry's name in the stream (the guest path's base name).
    pub from: OsString,
    /// Its name in the destination; `None` puts what is under it straight into the
    /// destination (`SRC/.`), leaving the top entry itself out.
    pub to: Option<OsString>,
}

/// What an extraction wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Entries extracted.
    pub entries: u64,
    /// Bytes of file contents.
    pub bytes: u64,
}

fn refused(path: &Path, why: impl Into<String>) -> UntarError {
    UntarError::Refused { path: path.display().to_string(), why: why.into() }
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(Errno) -> UntarError + 'a {
    move |e| UntarError::Io { path: path.display().to_string(), what, source: e.into() }
}

/// Extracts `reader` into existing directory `dest`, the top entry mapped by `top`.
pub fn extract(reader: impl Read, dest: &Path, top: &Top) -> Result<Summary, UntarError> {
    let root = open_dir(None, dest.as_os_str(), true).map_err(io_err(dest, "open the destination directory"))?;
    let mut archive = tar::Archive::new(reader);
    let mut summary = Summary::default();
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    for entry in archive.entries().map_err(UntarError::Tar)? {
        let mut entry = entry.map_err(UntarError::Tar)?;
        let raw = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let Some(rel) = mapped(&raw, top)? else { continue };
        let mode = entry.header().mode().map_err(UntarError::Tar)? & 0o777;
        let shown = dest.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                walk(&root, &rel, &shown)?;
                dirs.push((rel, mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let (parent, name) = parent_of(&root, &rel, &shown)?;
                let file = create(&parent, name, &shown, mode)?;
                let mut file = File::from(file);
                loop {
                    let n = match entry.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(UntarError::Tar(e)),
                    };
                    file.write_all(&buf[..n]).map_err(|source| UntarError::Io {
                        path: shown.display().to_string(),
                        what: "write",
                        source,
                    })?;
                    summary.bytes += n as u64;
                }
                // The umask may have trimmed the mode at create.
                nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))
                    .map_err(io_err(&shown, "chmod"))?;
                if let Ok(mtime) = entry.header().mtime() {
                    let t = nix::sys::time::TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
                    let _ = nix::sys::stat::futimens(file.as_raw_fd(), &nix::sys::time::TimeSpec::UTIME_OMIT, &t);
                }
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| OsString::from(OsStr::from_bytes(&t)));
                let target = target.ok_or_else(|| refused(&raw, "a symlink without a target"))?;
                if let Some(why) = symlink_escape(&rel, Path::new(&target)) {
                    return Err(refused(&raw, format!("{why}: '{}'", Path::new(&target).display())));
                }
                let (parent, name) = parent_of(&root, &rel, &shown)?;
                clear(&parent, name, &shown)?;
                nix::unistd::symlinkat(target.as_os_str(), Some(parent.as_raw_fd()), name)
                    .map_err(io_err(&shown, "make the symlink"))?;
            }
            tar::EntryType::Link => return Err(refused(&raw, "hard links are not accepted")),
            tar::EntryType::Char | tar::EntryType::Block => return Err(refused(&raw, "device nodes are not accepted")),
            tar::EntryType::Fifo => return Err(refused(&raw, "FIFOs are not accepted")),
            other => return Err(refused(&raw, format!("entries of type {other:?} are not accepted"))),
        }
        summary.entries += 1;
    }
    // Directory modes last, so a read-only directory still took its entries.
    for (rel, mode) in dirs.iter().rev() {
        let shown = dest.join(rel);
        let fd = walk(&root, rel, &shown)?;
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(*mode)).map_err(io_err(&shown, "chmod"))?;
    }
    Ok(summary)
}

/// The entry's path under the destination: checked (relative, no `..`, under the top) and
/// mapped by `top`; `None` for an entry to leave out (the stripped top itself).
fn mapped(raw: &Path, top: &Top) -> Result<Option<PathBuf>, UntarError> {
    let mut parts = Vec::new();
    for component in raw.components() {
        match component {
            Component::Normal(c) => parts.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused(raw, "the path goes up with '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(refused(raw, "absolute paths are not accepted")),
        }
    }
    let Some((first, rest)) = parts.split_first() else {
        return Err(refused(raw, "an empty path"));
    };
    if *first != top.from.as_os_str() {
        return Err(refused(raw, format!("not under the copied path '{}'", Path::new(&top.from).display())));
    }
    let mut out = top.to.as_ref().map(PathBuf::from).unwrap_or_default();
    out.extend(rest);
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

fn open_dir(parent: Option<&OwnedFd>, name: &OsStr, follow: bool) -> Result<OwnedFd, Errno> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if !follow {
        flags |= OFlag::O_NOFOLLOW;
    }
    let fd = nix::fcntl::openat(parent.map(AsRawFd::as_raw_fd), name, flags, Mode::empty())?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens (making what is missing, `0700` until the end) directory `rel` under `root`, one
/// component at a time, never through a symlink.
fn walk(root: &OwnedFd, rel: &Path, shown: &Path) -> Result<OwnedFd, UntarError> {
    let mut current = root.try_clone().map_err(|source| UntarError::Io {
        path: shown.display().to_string(),
        what: "open",
        source,
    })?;
    for component in rel.components() {
        let name = component.as_os_str();
        let opened = match open_dir(Some(&current), name, false) {
            Err(Errno::ENOENT) => {
                match nix::sys::stat::mkdirat(Some(current.as_raw_fd()), name, Mode::from_bits_truncate(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => open_dir(Some(&current), name, false),
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        current = opened.map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => {
                refused(rel, format!("'{}' is a symlink or a file; refusing to write through it", shown.display()))
            }
            e => io_err(shown, "open the directory")(e),
        })?;
    }
    Ok(current)
}

fn parent_of<'a>(root: &OwnedFd, rel: &'a Path, shown: &Path) -> Result<(OwnedFd, &'a OsStr), UntarError> {
    let name = rel.file_name().ok_or_else(|| refused(rel, "no file name"))?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    Ok((walk(root, parent, shown)?, name))
}

/// Removes what is at `name` unless it is a directory (a directory in the way is an error).
fn clear(parent: &OwnedFd, name: &OsStr, shown: &Path) -> Result<(), UntarError> {
    match nix::unistd::unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR | Errno::EPERM) => Err(refused(shown, "a directory is in the way")),
        Err(e) => Err(io_err(shown, "replace")(e)),
    }
}

fn create(parent: &OwnedFd, name: &OsStr, shown: &Path, mode: u32) -> Result<OwnedFd, UntarError> {
    clear(parent, name, shown)?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(Some(parent.as_raw_fd()), name, flags, Mode::from_bits_truncate(mode | 0o200))
        .map_err(io_err(shown, "create"))?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A tar stream built entry by entry, hostile ones included (the `tar` crate's safe setters
    /// refuse `..`, so names are written into the header bytes).
    /// Path, type, contents, link target, mode.
    type Entry<'a> = (&'a str, tar::EntryType, &'a [u8], Option<&'a str>, u32);

    fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("finish")
    }

    fn top(from: &str, to: Option<&str>) -> Top {
        Top { from: from.into(), to: to.map(Into::into) }
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as L};

    #[test]
    fn a_tree_lands_with_modes_and_symlinks_renamed_or_stripped() {
        let dest = tempfile::tempdir().expect("tempdir");
        let stream = tar_of(&[
            ("t", D, b"", None, 0o755),
            ("t/bin", D, b"", None, 0o750),
            ("t/bin/run", F, b"#!/bin/sh\n", None, 0o4755),
            ("t/link", L, b"", Some("bin/run"), 0o777),
        ]);
        let got = extract(&stream[..], dest.path(), &top("t", Some("copy"))).expect("extract");
        assert_eq!(got, Summary { entries: 4, bytes: 10 });
        let mode =
            |p: &str| std::fs::symlink_metadata(dest.path().join(p)).expect("meta").permissions().mode() & 0o7777;
        assert_eq!((mode("copy"), mode("copy/bin"), mode("copy/bin/run")), (0o755, 0o750, 0o755), "no set-id bits");
        assert_eq!(std::fs::read_link(dest.path().join("copy/link")).expect("link"), Path::new("bin/run"));
        let stripped = tempfile::tempdir().expect("tempdir");
        extract(&stream[..], stripped.path(), &top("t", None)).expect("extract");
        assert!(stripped.path().join("bin/run").is_file() && !stripped.path().join("t").exists());
    }

    #[test]
    fn escapes_are_refused_and_nothing_lands_outside() {
        let base = tempfile::tempdir().expect("tempdir");
        let dest = base.path().join("dest");
        std::fs::create_dir(&dest).expect("mkdir");
        std::fs::create_dir(base.path().join("outside")).expect("mkdir");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (tar_of(&[("t/../../x", F, b"x", None, 0o644)]), "goes up"),
            (tar_of(&[("/etc/x", F, b"x", None, 0o644)]), "absolute"),
            (tar_of(&[("other/x", F, b"x", None, 0o644)]), "not under the copied path"),
            (tar_of(&[("t/l", L, b"", Some("/etc/passwd"), 0o777)]), "points outside"),
            (tar_of(&[("t/l", L, b"", Some("../../outside"), 0o777)]), "points outside"),
            (tar_of(&[("t/h", H, b"", Some("/etc/passwd"), 0o644)]), "hard links"),
            (tar_of(&[("t/d", tar::EntryType::Char, b"", None, 0o644)]), "device"),
        ];
        for (stream, why) in cases {
            let err = extract(&stream[..], &dest, &top("t", None)).expect_err(why).to_string();
            assert!(err.contains(why), "{err}");
        }
        // A symlink already in the destination (or made by the stream) is never written through.
        std::os::unix::fs::symlink(base.path().join("outside"), dest.join("sub")).expect("symlink");
        let through = tar_of(&[("t/sub/x", F, b"x", None, 0o644)]);
        let err = extract(&through[..], &dest, &top("t", None)).expect_err("through a symlink").to_string();
        assert!(err.contains("refusing to write through it"), "{err}");
        let over = tar_of(&[("t/sub", F, b"new", None, 0o644)]);
        extract(&over[..], &dest, &top("t", None)).expect("a file replaces the link");
        assert_eq!(std::fs::read(dest.join("sub")).expect("read"), b"new");
        assert_eq!(std::fs::read_dir(base.path().join("outside")).expect("ls").count(), 0, "nothing outside");
    }
}
