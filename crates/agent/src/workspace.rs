//! `unpack`: a tar stream from the host extracted into a guest directory (the workspace
//! import). The stream comes in `Data` frames; the agent acknowledges what it has unpacked, so
//! the host never has more than a window in flight.
//!
//! Nothing may land outside the target directory, whatever the stream holds:
//! - paths must be relative and free of `..` (absolute paths and `..` are refused);
//! - every directory on the way is opened with `O_NOFOLLOW` from the target's own fd, so a
//!   symlink (made by this stream or found in the guest) is never written through;
//! - files are created with `O_EXCL | O_NOFOLLOW` after removing what was at their name, so an
//!   existing symlink is replaced, never followed;
//! - symlinks must point inside (`banger_proto::agent::symlink_escape`): relative, their `..`s
//!   first and no more of them than the link's own depth (`a/l -> ../x` is fine, `l -> ../x`
//!   and `/etc` are refused);
//! - hard links, device nodes, FIFOs and other special entries are refused;
//! - modes keep the permission bits only (no set-id bits); owners are not taken from the stream.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;

use banger_proto::agent::{ack_payload, symlink_escape, AgentResponse, FrameKind, TUNNEL_ACK_EVERY};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::channel::Link;

/// Bytes copied per read from the stream into a file.
const COPY_BUF: usize = 256 * 1024;

/// What an unpack did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Entries extracted.
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// An unpack that failed. Messages carry their cause: they cross the channel as one line.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The target directory is not absolute.
    #[error("{0}: the target directory must be an absolute path")]
    RelativeTarget(String),
    /// The target directory cannot be made or opened.
    #[error("cannot open the target directory {dir}: {source}")]
    Target {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An entry that would land outside the target, or that is not allowed at all.
    #[error("refused tar entry '{path}': {why}")]
    Refused {
        /// The entry's path as the stream gives it.
        path: String,
        /// Why.
        why: String,
    },
    /// A file system call failed.
    #[error("{path}: cannot {what}: {source}")]
    Io {
        /// The entry.
        path: String,
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The stream is not a tar archive, or it broke off.
    #[error("bad tar stream: {0}")]
    Tar(#[source] std::io::Error),
    /// The host went away (or abandoned the import).
    #[error("the host went away")]
    Gone,
}

fn refused(path: &Path, why: impl Into<String>) -> UnpackError {
    UnpackError::Refused { path: path.display().to_string(), why: why.into() }
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(Errno) -> UnpackError + 'a {
    move |e| UnpackError::Io { path: path.display().to_string(), what, source: e.into() }
}

/// Serves one `unpack` channel: unpacks what arrives on `chunks` into `dir`, answers
/// `Unpacked`, or `Error` with the first refusal.
pub fn session(link: &Link, dir: &str, chunks: &mpsc::Receiver<Vec<u8>>) {
    let mut incoming = Incoming::new(chunks, |n| link.send(FrameKind::Ack, ack_payload(n)).is_ok());
    match unpack(&mut incoming, Path::new(dir)) {
        Ok(summary) => {
            let _ = link
                .json(FrameKind::Response, &AgentResponse::Unpacked { entries: summary.entries, bytes: summary.bytes });
        }
        Err(UnpackError::Gone) => log!("workspace import into {dir} abandoned by the host"),
        Err(e) => {
            log!("workspace import into {dir} failed: {e}");
            link.fail(&e.to_string());
        }
    }
    link.finish();
}

/// The host's `Data` payloads as a byte stream: an empty payload is the end, a dropped sender
/// (`Close`, or the connection ended) is [`UnpackError::Gone`]. Consumed bytes are acknowledged
/// every [`TUNNEL_ACK_EVERY`].
pub struct Incoming<'a, F: FnMut(usize) -> bool> {
    chunks: &'a mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
    gone: bool,
    unacked: usize,
    ack: F,
}

impl<'a, F: FnMut(usize) -> bool> Incoming<'a, F> {
    /// Reads `chunks`, calling `ack(n)` for consumed bytes (false: the host is gone).
    pub fn new(chunks: &'a mpsc::Receiver<Vec<u8>>, ack: F) -> Self {
        Self { chunks, current: Vec::new(), pos: 0, ended: false, gone: false, unacked: 0, ack }
    }

    /// Whether the host went away (or abandoned the upload).
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// Reads to the host's end marker, discarding what is left (the tar's trailing padding).
    fn drain(&mut self) -> std::io::Result<()> {
        let mut sink = vec![0u8; 64 * 1024];
        while self.read(&mut sink)? > 0 {}
        Ok(())
    }
}

impl<F: FnMut(usize) -> bool> Read for Incoming<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            if self.ended {
                return Ok(0);
            }
            match self.chunks.recv() {
                Ok(chunk) if chunk.is_empty() => self.ended = true,
                Ok(chunk) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Err(_) => {
                    self.gone = true;
                    return Err(std::io::Error::new(ErrorKind::ConnectionAborted, "the host went away"));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        self.unacked += n;
        if self.unacked >= TUNNEL_ACK_EVERY {
            if !(self.ack)(self.unacked) {
                self.gone = true;
                return Err(std::io::Error::new(ErrorKind::ConnectionAborted, "the host went away"));
            }
            self.unacked = 0;
        }
        Ok(n)
    }
}

/// Unpacks the tar stream `incoming` into `dir` (made, with its parents, when missing).
pub fn unpack<F: FnMut(usize) -> bool>(incoming: &mut Incoming<'_, F>, dir: &Path) -> Result<Summary, UnpackError> {
    let result = unpack_from(&mut *incoming, dir);
    match result {
        Err(_) if incoming.gone => Err(UnpackError::Gone),
        Ok(summary) => match incoming.drain() {
            Ok(()) => Ok(summary),
            Err(_) => Err(UnpackError::Gone),
        },
        Err(e) => Err(e),
    }
}

/// Unpacks a tar archive read from `reader` into `dir`; see the module docs for what is refused.
pub fn unpack_from(reader: impl Read, dir: &Path) -> Result<Summary, UnpackError> {
    let root = open_target(dir)?;
    let mut archive = tar::Archive::new(reader);
    let mut summary = Summary::default();
    let mut parent_cache: Option<(PathBuf, OwnedFd)> = None;
    let mut buf = vec![0u8; COPY_BUF];
    let umask = current_umask();
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let rel = clean_path(&raw)?;
        let Some(rel) = rel else {
            // "." or "./": the target itself.
            if kind.is_dir() {
                continue;
            }
            return Err(refused(&raw, "names the target directory itself"));
        };
        let mode = entry.header().mode().map_err(UnpackError::Tar)? & 0o777;
        match kind {
            tar::EntryType::Directory => {
                let fd = walk(&root, &rel, true)?;
                nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode | 0o700))
                    .map_err(io_err(&rel, "chmod"))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let (parent, name) = parent_of(&root, &rel, &mut parent_cache)?;
                let file = create_file(parent, name, &rel, mode, umask)?;
                let mut file = File::from(file);
                let mut written = 0u64;
                loop {
                    let n = match entry.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(UnpackError::Tar(e)),
                    };
                    file.write_all(&buf[..n]).map_err(|source| UnpackError::Io {
                        path: rel.display().to_string(),
                        what: "write",
                        source,
                    })?;
                    written += n as u64;
                }
                if let Ok(mtime) = entry.header().mtime() {
                    let t = nix::sys::time::TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
                    let _ = nix::sys::stat::futimens(file.as_raw_fd(), &nix::sys::time::TimeSpec::UTIME_OMIT, &t);
                }
                summary.bytes += written;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| OsString::from(OsStr::from_bytes(&t)));
                let target = target.ok_or_else(|| refused(&rel, "symlink without a target"))?;
                check_link_target(&rel, Path::new(&target))?;
                let (parent, name) = parent_of(&root, &rel, &mut parent_cache)?;
                replace(parent, name, &rel)?;
                nix::unistd::symlinkat(target.as_os_str(), Some(parent.as_raw_fd()), name)
                    .map_err(io_err(&rel, "make the symlink"))?;
            }
            tar::EntryType::Link => return Err(refused(&rel, "hard links are not accepted")),
            tar::EntryType::Char | tar::EntryType::Block => return Err(refused(&rel, "device nodes are not accepted")),
            tar::EntryType::Fifo => return Err(refused(&rel, "FIFOs are not accepted")),
            other => return Err(refused(&rel, format!("entries of type {other:?} are not accepted"))),
        }
        summary.entries += 1;
    }
    Ok(summary)
}

/// The entry's path as normal components only; `None` for the target itself. Absolute paths
/// and `..` are refused.
fn clean_path(raw: &Path) -> Result<Option<PathBuf>, UnpackError> {
    if raw.as_os_str().is_empty() {
        return Err(refused(raw, "empty path"));
    }
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused(raw, "the path goes up with '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(refused(raw, "absolute paths are not accepted")),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// A symlink at `link` may point only inside the target (see `symlink_escape`).
fn check_link_target(link: &Path, target: &Path) -> Result<(), UnpackError> {
    match symlink_escape(link, target) {
        None => Ok(()),
        Some(why) => Err(refused(link, format!("{why}: '{}'", target.display()))),
    }
}

/// Makes (with parents) and opens the target directory; its last component must not be a
/// symlink.
fn open_target(dir: &Path) -> Result<OwnedFd, UnpackError> {
    if !dir.is_absolute() {
        return Err(UnpackError::RelativeTarget(dir.display().to_string()));
    }
    let target = |source: std::io::Error| UnpackError::Target { dir: dir.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(target)?;
    open_dir_at(None, dir.as_os_str()).map_err(|e| target(e.into()))
}

fn open_dir_at(parent: Option<&OwnedFd>, name: &OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(parent.map(AsRawFd::as_raw_fd), name, flags, Mode::empty())?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `rel` under `root` one component at a time, never following a symlink;
/// with `create`, missing directories are made.
fn walk(root: &OwnedFd, rel: &Path, create: bool) -> Result<OwnedFd, UnpackError> {
    let mut current: Option<OwnedFd> = None;
    let mut so_far = PathBuf::new();
    for component in rel.components() {
        let name = component.as_os_str();
        so_far.push(name);
        let parent = current.as_ref().unwrap_or(root);
        let opened = match open_dir_at(Some(parent), name) {
            Err(Errno::ENOENT) if create => {
                match nix::sys::stat::mkdirat(Some(parent.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => open_dir_at(Some(parent), name),
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        current = Some(opened.map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => {
                refused(rel, format!("'{}' is a symlink or a file; refusing to write through it", so_far.display()))
            }
            e => UnpackError::Io { path: so_far.display().to_string(), what: "open the directory", source: e.into() },
        })?);
    }
    match current {
        Some(fd) => Ok(fd),
        None => root.try_clone().map_err(|source| UnpackError::Io { path: ".".into(), what: "open", source }),
    }
}

/// The directory holding `rel` (opened safely, cached for the next entry in the same place)
/// and `rel`'s last component.
fn parent_of<'c>(
    root: &OwnedFd,
    rel: &'c Path,
    cache: &'c mut Option<(PathBuf, OwnedFd)>,
) -> Result<(&'c OwnedFd, &'c OsStr), UnpackError> {
    let name = rel.file_name().ok_or_else(|| refused(rel, "no file name"))?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    if cache.as_ref().is_none_or(|(p, _)| p != parent) {
        *cache = Some((parent.to_owned(), walk(root, parent, true)?));
    }
    let (_, fd) = cache.as_ref().ok_or_else(|| refused(rel, "no parent directory"))?;
    Ok((fd, name))
}

/// Removes whatever non-directory is at `name` (a symlink is removed, not followed).
fn replace(parent: &OwnedFd, name: &OsStr, rel: &Path) -> Result<(), UnpackError> {
    match nix::unistd::unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) => Err(refused(rel, "a directory is in the way")),
        Err(e) => Err(io_err(rel, "replace")(e)),
    }
}

/// Creates `name` in `parent` afresh (`O_EXCL | O_NOFOLLOW`): what was there is removed first
/// (a symlink is removed, never followed). The mode is set again when the `umask` trimmed it.
fn create_file(parent: &OwnedFd, name: &OsStr, rel: &Path, mode: u32, umask: u32) -> Result<OwnedFd, UnpackError> {
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let create = || nix::fcntl::openat(Some(parent.as_raw_fd()), name, flags, Mode::from_bits_truncate(mode));
    // A fresh import finds nothing in the way: try first, replace only when something is there.
    let fd = match create() {
        Err(Errno::EEXIST) => {
            replace(parent, name, rel)?;
            create()
        }
        other => other,
    }
    .map_err(io_err(rel, "create"))?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if mode & umask != 0 {
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(io_err(rel, "chmod"))?;
    }
    Ok(fd)
}

/// This process's umask (from `/proc/self/status`, since `umask(2)` cannot read it without
/// changing it for every thread); all bits when unknown.
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_owned())))
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0o777)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A header with `name` written raw (the tar crate's own setters refuse `..` and `/`).
    fn raw_header(name: &[u8], kind: tar::EntryType, size: u64, link: Option<&[u8]>) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    /// A header and the entry's data.
    type Entry = (tar::Header, &'static [u8]);

    fn tar_of(entries: &[Entry]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (h, data) in entries {
            b.append(h, *data).expect("append");
        }
        b.into_inner().expect("finish")
    }

    fn file(name: &str, data: &'static [u8]) -> Entry {
        (raw_header(name.as_bytes(), tar::EntryType::Regular, data.len() as u64, None), data)
    }

    fn link(name: &str, target: &str) -> Entry {
        (raw_header(name.as_bytes(), tar::EntryType::Symlink, 0, Some(target.as_bytes())), b"")
    }

    /// A sandbox: `outside/` next to the target `root/`, so escapes have somewhere to land.
    struct Sandbox {
        dir: tempfile::TempDir,
    }

    impl Sandbox {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir(dir.path().join("outside")).expect("outside");
            Self { dir }
        }
        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }
        fn outside_is_empty(&self) -> bool {
            std::fs::read_dir(self.dir.path().join("outside")).expect("ls").next().is_none()
                && std::fs::read_dir(self.dir.path()).expect("ls").count() <= 2
        }
        fn unpack(&self, tar: &[u8]) -> Result<Summary, UnpackError> {
            unpack_from(tar, &self.root())
        }
    }

    #[test]
    fn a_plain_tree_unpacks_with_modes_and_inner_symlinks() {
        let s = Sandbox::new();
        let mut run = raw_header(b"bin/run", tar::EntryType::Regular, 3, None);
        run.set_mode(0o4755);
        run.set_cksum();
        let tar = tar_of(&[
            (raw_header(b".git/", tar::EntryType::Directory, 0, None), b""),
            file(".git/HEAD", b"ref: refs/heads/main\n"),
            file("src/deep/er/lib.rs", b"fn main() {}\n"),
            (run, b"#!x"),
            link("src/deep/up", "../../bin/run"),
            link("here", "./src"),
        ]);
        let summary = s.unpack(&tar).expect("unpack");
        assert_eq!(summary.entries, 6);
        assert_eq!(summary.bytes, 21 + 13 + 3);
        let root = s.root();
        assert_eq!(std::fs::read_to_string(root.join(".git/HEAD")).expect("head"), "ref: refs/heads/main\n");
        assert_eq!(std::fs::read(root.join("src/deep/up")).expect("through the link"), b"#!x");
        let mode = std::fs::metadata(root.join("bin/run")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "no set-id bits");
        assert!(s.outside_is_empty());
    }

    #[test]
    fn a_second_import_replaces_files_and_symlinks_without_following_them() {
        let s = Sandbox::new();
        let outside = s.dir.path().join("outside/victim");
        std::fs::create_dir_all(s.root()).expect("root");
        std::os::unix::fs::symlink(&outside, s.root().join("f")).expect("planted symlink");
        s.unpack(&tar_of(&[file("f", b"new")])).expect("unpack");
        assert_eq!(std::fs::read(s.root().join("f")).expect("f"), b"new");
        assert!(!outside.exists(), "the planted symlink was replaced, not followed");
        s.unpack(&tar_of(&[file("f", b"newer")])).expect("again");
        assert_eq!(std::fs::read(s.root().join("f")).expect("f"), b"newer");
    }

    #[test]
    fn hostile_paths_are_refused_and_nothing_lands_outside() {
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![file("../outside/x", b"evil")], "goes up"),
            (vec![file("a/../../outside/x", b"evil")], "goes up"),
            (vec![file("/tmp/abs-evil", b"evil")], "absolute"),
            (vec![link("l", "../outside"), file("l/x", b"evil")], "points outside"),
            (vec![link("l", "/etc/passwd")], "points outside"),
            (vec![link("a/l", "../../outside/x")], "points outside"),
            (vec![link("a/b/l", "../x/../../..")], "after a name"),
            (vec![link("d", "sub"), file("d/x", b"evil")], "refusing to write through it"),
            (vec![(raw_header(b"h", tar::EntryType::Link, 0, Some(b"../outside/x")), b"")], "hard links"),
            (vec![(raw_header(b"h", tar::EntryType::Link, 0, Some(b"inside")), b"")], "hard links"),
            (vec![(raw_header(b"dev", tar::EntryType::Char, 0, None), b"")], "device nodes"),
            (vec![(raw_header(b"blk", tar::EntryType::Block, 0, None), b"")], "device nodes"),
            (vec![(raw_header(b"p", tar::EntryType::Fifo, 0, None), b"")], "FIFOs"),
        ];
        for (entries, why) in cases {
            let s = Sandbox::new();
            let err = s.unpack(&tar_of(&entries)).expect_err(why);
            let message = err.to_string();
            assert!(message.starts_with("refused tar entry"), "{message}");
            assert!(message.contains(why), "{why}: {message}");
            assert!(s.outside_is_empty(), "{why}: something landed outside");
            assert!(!Path::new("/tmp/abs-evil").exists());
        }
    }

    #[test]
    fn a_symlinked_directory_planted_in_the_guest_is_not_written_through() {
        let s = Sandbox::new();
        std::fs::create_dir_all(s.root()).expect("root");
        std::os::unix::fs::symlink(s.dir.path().join("outside"), s.root().join("src")).expect("plant");
        let err = s.unpack(&tar_of(&[file("src/x", b"evil")])).expect_err("refused");
        assert!(err.to_string().contains("'src' is a symlink or a file"), "{err}");
        assert!(s.outside_is_empty());
    }

    #[test]
    fn garbage_is_a_bad_tar_stream() {
        let s = Sandbox::new();
        let err = s.unpack(&[b'x'; 1024]).expect_err("garbage");
        assert!(matches!(err, UnpackError::Tar(_)), "{err}");
        assert!(err.to_string().starts_with("bad tar stream"), "{err}");
    }

    #[test]
    fn the_stream_is_read_from_chunks_and_acknowledged() {
        let s = Sandbox::new();
        let big = vec![7u8; 3 * TUNNEL_ACK_EVERY];
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(big.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "big.bin", big.as_slice()).expect("append");
        let tar = b.into_inner().expect("finish");
        let (tx, rx) = mpsc::channel();
        for piece in tar.chunks(10_000) {
            tx.send(piece.to_vec()).expect("send");
        }
        tx.send(Vec::new()).expect("end");
        let mut acked = 0;
        let summary = unpack(
            &mut Incoming::new(&rx, |n| {
                acked += n;
                true
            }),
            &s.root(),
        )
        .expect("unpack");
        assert_eq!(summary.bytes, big.len() as u64);
        // Acks come every TUNNEL_ACK_EVERY bytes consumed; less than that may stay unacked.
        assert!(acked + TUNNEL_ACK_EVERY > tar.len() && acked <= tar.len(), "acked {acked} of {}", tar.len());

        // A host that goes away mid-stream is Gone, not a tar error.
        let (tx, rx) = mpsc::channel();
        tx.send(tar[..2048].to_vec()).expect("send");
        drop(tx);
        let err = unpack(&mut Incoming::new(&rx, |_| true), &s.dir.path().join("other")).expect_err("gone");
        assert!(matches!(err, UnpackError::Gone), "{err}");
    }
}
