//! The import's tar stream: the files `git ls-files -co --exclude-standard` lists (tracked
//! files plus untracked ones that are not ignored, so uncommitted changes come along) and the
//! whole `.git` directory, read as they are in the work tree.
//!
//! Nothing outside the repository is ever read: every path is opened from the top-level
//! directory's fd one component at a time with `O_NOFOLLOW`, so a symlinked directory on the
//! way is never followed (such paths are left out with a warning). Symlinks are stored as
//! symlinks; those pointing outside the repository are left out with a warning, since the
//! guest would refuse them. Hard links become plain files; FIFOs, sockets and devices are left
//! out. Lock files in `.git` (a git command running meanwhile) are left out too.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use super::Repo;

/// Building the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// Listing the files failed.
    #[error("cannot list the repository's files")]
    List(#[source] super::RepoError),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file, relative to the top.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The stream could not be written (the daemon went away).
    #[error("cannot send the stream")]
    Write(#[source] std::io::Error),
}

/// What went into the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Entries written.
    pub entries: u64,
    /// Bytes of file contents.
    pub bytes: u64,
    /// Paths left out, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The work tree's files to import (relative paths, sorted, without `.git`).
pub fn list_files(repo: &Repo) -> Result<Vec<PathBuf>, TarError> {
    let out = repo.git(&["ls-files", "-co", "--exclude-standard", "-z"]).map_err(TarError::List)?;
    let unique: BTreeSet<PathBuf> = out
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(OsString::from_vec(p.to_vec())))
        .filter(|p| !p.starts_with(".git"))
        .collect();
    Ok(unique.into_iter().collect())
}

/// Writes the tar stream of `files` (relative to `top`) and `top/.git` into `out`.
pub fn write_tar(top: &Path, files: &[PathBuf], out: impl Write) -> Result<Stats, TarError> {
    write_tar_under(top, files, None, out)
}

/// [`write_tar`] with every entry named under `prefix` (the disk import stages the stream
/// with `banger vm cp`'s extractor, which wants one top entry).
pub fn write_tar_under(
    top: &Path,
    files: &[PathBuf],
    prefix: Option<&Path>,
    out: impl Write,
) -> Result<Stats, TarError> {
    let read_err = |path: &Path| {
        let path = path.display().to_string();
        move |e: Errno| TarError::Read { path, source: e.into() }
    };
    let root = open_dir_at(None, top.as_os_str()).map_err(read_err(top))?;
    let mut w = Writer { builder: tar::Builder::new(out), stats: Stats::default(), prefix: prefix.map(Path::to_owned) };
    if let Some(prefix) = prefix {
        let st = nix::sys::stat::fstat(root.as_raw_fd()).map_err(read_err(top))?;
        let mut header = header(&st, tar::EntryType::Directory, 0);
        w.builder.append_data(&mut header, prefix, std::io::empty()).map_err(TarError::Write)?;
    }
    let mut cache: Option<(PathBuf, OwnedFd)> = None;
    for rel in files {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else { continue };
        if cache.as_ref().is_none_or(|(p, _)| p != parent) {
            match walk(&root, parent) {
                Ok(fd) => cache = Some((parent.to_owned(), fd)),
                // Listed but gone from the work tree: a deletion git will see in the guest too.
                Err(Errno::ENOENT) => continue,
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    w.stats.skipped.push((rel.clone(), "a directory on its path is a symlink".into()));
                    continue;
                }
                Err(e) => return Err(read_err(rel)(e)),
            }
        }
        let Some((_, dir)) = cache.as_ref() else { continue };
        w.add(dir, name, rel, false)?;
    }
    match open_dir_at(Some(&root), OsStr::new(".git")) {
        Ok(git) => w.add_tree(&git, Path::new(".git"))?,
        Err(e) => return Err(read_err(Path::new(".git"))(e)),
    }
    let stats = std::mem::take(&mut w.stats);
    w.builder.into_inner().and_then(|mut out| out.flush()).map_err(TarError::Write)?;
    Ok(stats)
}

/// Writes each `(name, rel)`: entry `name` of directory `dir` (a file, a symlink, or a whole
/// tree), stored as `rel`, with the same rules as the import (`banger vm cp` uses it).
pub fn write_named(dir: &OwnedFd, names: &[(OsString, PathBuf)], out: impl Write) -> Result<Stats, TarError> {
    let mut w = Writer { builder: tar::Builder::new(out), stats: Stats::default(), prefix: None };
    for (name, rel) in names {
        w.add(dir, name, rel, true)?;
    }
    let stats = std::mem::take(&mut w.stats);
    w.builder.into_inner().and_then(|mut out| out.flush()).map_err(TarError::Write)?;
    Ok(stats)
}

struct Writer<W: Write> {
    builder: tar::Builder<W>,
    stats: Stats,
    /// What every entry is named under.
    prefix: Option<PathBuf>,
}

impl<W: Write> Writer<W> {
    /// The stream's name for `rel`.
    fn entry_name(&self, rel: &Path) -> PathBuf {
        self.prefix.as_ref().map_or_else(|| rel.to_owned(), |p| p.join(rel))
    }

    /// Adds `dir`/`name` as `rel`; directories only as an entry unless `recurse`.
    fn add(&mut self, dir: &OwnedFd, name: &OsStr, rel: &Path, recurse: bool) -> Result<(), TarError> {
        let read_err = |e: Errno| TarError::Read { path: rel.display().to_string(), source: e.into() };
        let st = match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(read_err(e)),
        };
        match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFREG => {
                if recurse && name.as_bytes().ends_with(b".lock") {
                    return Ok(());
                }
                let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
                let fd = match nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => return Ok(()),
                    Err(e) => return Err(read_err(e)),
                };
                // SAFETY: `openat` just returned this fd and nothing else owns it.
                let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let st = nix::sys::stat::fstat(file.as_raw_fd()).map_err(read_err)?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                    return Ok(());
                }
                let size = u64::try_from(st.st_size).unwrap_or(0);
                let mut header = header(&st, tar::EntryType::Regular, size);
                let exact = Exact { file, left: size };
                let named = self.entry_name(rel);
                self.builder.append_data(&mut header, named, exact).map_err(|e| self.stream_error(rel, e))?;
                self.stats.bytes += size;
            }
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name).map_err(read_err)?;
                if let Some(why) = banger_proto::agent::symlink_escape(rel, Path::new(&target)) {
                    let why = format!("{why} ({} -> {})", rel.display(), Path::new(&target).display());
                    self.stats.skipped.push((rel.to_owned(), why));
                    return Ok(());
                }
                let mut header = header(&st, tar::EntryType::Symlink, 0);
                let named = self.entry_name(rel);
                self.builder.append_link(&mut header, named, &target).map_err(|e| self.stream_error(rel, e))?;
            }
            SFlag::S_IFDIR if recurse => {
                let sub = open_dir_at(Some(dir), name).map_err(read_err)?;
                self.add_tree(&sub, rel)?;
                return Ok(());
            }
            SFlag::S_IFDIR => {
                // A listed directory is a submodule's checkout: its entry only.
                let mut header = header(&st, tar::EntryType::Directory, 0);
                let named = self.entry_name(rel);
                self.builder
                    .append_data(&mut header, named, std::io::empty())
                    .map_err(|e| self.stream_error(rel, e))?;
            }
            _ => {
                self.stats.skipped.push((rel.to_owned(), "not a regular file, directory or symlink".into()));
                return Ok(());
            }
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Adds directory `dir` (at `rel`) and everything under it.
    fn add_tree(&mut self, dir: &OwnedFd, rel: &Path) -> Result<(), TarError> {
        let read_err = |e: Errno| TarError::Read { path: rel.display().to_string(), source: e.into() };
        let st = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(read_err)?;
        let mut header = header(&st, tar::EntryType::Directory, 0);
        let named = self.entry_name(rel);
        self.builder.append_data(&mut header, named, std::io::empty()).map_err(|e| self.stream_error(rel, e))?;
        self.stats.entries += 1;
        let listing = nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_raw_fd()).map_err(read_err)?).map_err(read_err)?;
        let mut names: Vec<OsString> = Vec::new();
        for entry in listing {
            let entry = entry.map_err(read_err)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                names.push(name.to_owned());
            }
        }
        names.sort();
        for name in names {
            self.add(dir, &name, &rel.join(&name), true)?;
        }
        Ok(())
    }

    /// A tar error while appending: a read error when the file failed, else the stream's.
    fn stream_error(&self, rel: &Path, e: std::io::Error) -> TarError {
        if e.kind() == std::io::ErrorKind::BrokenPipe || e.kind() == std::io::ErrorKind::ConnectionAborted {
            TarError::Write(e)
        } else {
            TarError::Read { path: rel.display().to_string(), source: e }
        }
    }
}

/// A GNU header (long names and link targets go in extension entries) with the permission
/// bits and mtime of `st`, owned by root.
fn header(st: &FileStat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(st.st_mode & 0o777);
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Exactly `left` bytes of `file`: zeros when it shrank meanwhile, the rest ignored when it grew.
struct Exact {
    file: std::fs::File,
    left: u64,
}

impl Read for Exact {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let want = usize::try_from(self.left).unwrap_or(usize::MAX).min(out.len());
        if want == 0 {
            return Ok(0);
        }
        let n = match self.file.read(&mut out[..want]) {
            Ok(0) => {
                out[..want].fill(0);
                want
            }
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        self.left -= n as u64;
        Ok(n)
    }
}

fn open_dir_at(parent: Option<&OwnedFd>, name: &OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(parent.map(AsRawFd::as_raw_fd), name, flags, Mode::empty())?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `rel` under `root` one component at a time, never following a symlink.
fn walk(root: &OwnedFd, rel: &Path) -> Result<OwnedFd, Errno> {
    let mut current = root.try_clone().map_err(|_| Errno::EMFILE)?;
    for component in rel.components() {
        current = open_dir_at(Some(&current), component.as_os_str())?;
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{git, repo};
    use super::*;

    fn entries(tar: &[u8]) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let path = e.path().expect("path").display().to_string();
                let kind = e.header().entry_type();
                let mut data = Vec::new();
                if kind == tar::EntryType::Symlink {
                    data = e.link_name_bytes().expect("target").into_owned();
                } else {
                    e.read_to_end(&mut data).expect("data");
                }
                (path, kind, data)
            })
            .collect()
    }

    #[test]
    fn tracked_changed_and_untracked_files_come_with_git_but_ignored_ones_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = repo(dir.path(), "proj");
        std::fs::write(top.join(".gitignore"), "*.log\n").expect("ignore");
        std::fs::write(top.join("tracked.txt"), "changed\n").expect("modify");
        std::fs::create_dir_all(top.join("new/deep")).expect("mkdir");
        std::fs::write(top.join("new/deep/file.rs"), "fn x() {}\n").expect("untracked");
        std::fs::write(top.join("debug.log"), "noise").expect("ignored");
        std::os::unix::fs::symlink("new/deep/file.rs", top.join("inner-link")).expect("symlink");
        std::fs::write(top.join(".git/index.lock"), "").expect("lock");
        let long = "d".repeat(120);
        std::fs::create_dir_all(top.join(&long)).expect("long dir");
        std::fs::write(top.join(&long).join("f".repeat(120)), "long").expect("long name");
        let repo = Repo::discover(&top).expect("repo");
        let files = list_files(&repo).expect("list");
        let mut out = Vec::new();
        let stats = write_tar(&repo.top, &files, &mut out).expect("tar");
        assert!(stats.skipped.is_empty(), "{:?}", stats.skipped);
        let got = entries(&out);
        let find = |p: &str| got.iter().find(|(path, ..)| path == p).map(|(_, k, d)| (*k, d.clone()));
        assert_eq!(find("tracked.txt"), Some((tar::EntryType::Regular, b"changed\n".to_vec())));
        assert_eq!(find("new/deep/file.rs"), Some((tar::EntryType::Regular, b"fn x() {}\n".to_vec())));
        assert_eq!(find("inner-link"), Some((tar::EntryType::Symlink, b"new/deep/file.rs".to_vec())));
        assert_eq!(find(&format!("{long}/{}", "f".repeat(120))).map(|(_, d)| d), Some(b"long".to_vec()));
        assert!(find("debug.log").is_none(), "ignored files stay out");
        assert!(find(".git/index.lock").is_none(), "lock files stay out");
        assert_eq!(find(".git").map(|(k, _)| k), Some(tar::EntryType::Directory));
        assert!(find(".git/HEAD").is_some() && find(".git/index").is_some());
        let objects = got.iter().filter(|(p, ..)| p.starts_with(".git/objects/")).count();
        assert!(objects >= 3, "the commit's objects come along");
        assert_eq!(stats.entries, got.len() as u64);
        assert_eq!(
            stats.bytes,
            got.iter().filter(|(_, k, _)| *k == tar::EntryType::Regular).map(|(.., d)| d.len() as u64).sum::<u64>()
        );
    }

    #[test]
    fn nothing_outside_the_repository_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = repo(dir.path(), "proj");
        let secret = dir.path().join("secret");
        std::fs::create_dir(&secret).expect("secret dir");
        std::fs::write(secret.join("key"), "SECRET").expect("secret");
        // A tracked directory replaced by a symlink to outside, after the commit.
        std::fs::create_dir(top.join("sub")).expect("sub");
        std::fs::write(top.join("sub/key"), "mine").expect("tracked");
        git(&top, &["add", "."]);
        git(&top, &["commit", "-qm", "sub"]);
        std::fs::remove_dir_all(top.join("sub")).expect("rm");
        std::os::unix::fs::symlink(&secret, top.join("sub")).expect("swap in a symlink");
        // Symlinks that point out are left out, whatever their form.
        std::os::unix::fs::symlink(secret.join("key"), top.join("abs-link")).expect("abs");
        std::os::unix::fs::symlink("../secret/key", top.join("rel-link")).expect("rel");
        let repo = Repo::discover(&top).expect("repo");
        // `git ls-files` would not list paths under a symlink on its own; give it one anyway.
        let mut files = list_files(&repo).expect("list");
        files.push(PathBuf::from("sub/key"));
        files.sort();
        let mut out = Vec::new();
        let stats = write_tar(&repo.top, &files, &mut out).expect("tar");
        let got = entries(&out);
        assert!(got.iter().all(|(_, _, data)| data != b"SECRET"), "no byte from outside");
        for gone in ["sub/key", "abs-link", "rel-link"] {
            assert!(got.iter().all(|(p, ..)| p != gone), "{gone} is left out");
            assert!(stats.skipped.iter().any(|(p, _)| p == Path::new(gone)), "{gone} is reported: {:?}", stats.skipped);
        }
        let (_, why) = stats.skipped.iter().find(|(p, _)| p == Path::new("abs-link")).expect("abs-link");
        assert!(why.contains("points outside"), "{why}");
    }

    #[test]
    fn a_file_that_shrinks_while_it_is_read_keeps_the_stream_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), "0123456789").expect("write");
        let file = std::fs::File::open(dir.path().join("f")).expect("open");
        let mut exact = Exact { file, left: 20 };
        let mut got = Vec::new();
        exact.read_to_end(&mut got).expect("read");
        assert_eq!(got.len(), 20);
        assert_eq!(&got[..10], b"0123456789");
        assert!(got[10..].iter().all(|b| *b == 0));
    }
}
