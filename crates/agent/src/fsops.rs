//! File requests of the file routes (`banger vm cp`, the MCP tools): `stat`, `list`, `mkdir`,
//! `remove`, `read`, `write` and `pack`. Each answers `FsFailed` with a code the daemon maps to
//! a status when it fails before streaming; streamed bytes (`list`, `read`, `pack`) go out as
//! `Data` under the channel's credit, uploads (`write`) are acknowledged as they are written.
//!
//! `pack` never follows a symlink: the tree is walked with `lstat`, files are opened with
//! `O_NOFOLLOW`, symlinks are stored as symlinks. What `write` and `read` name is the guest's
//! own business (the agent is the guest's root): they follow symlinks as `cat` and `cp` would,
//! and `write` replaces a symlink at `path` rather than writing through it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use banger_proto::agent::{ack_payload, AgentRequest, AgentResponse, FrameKind, STREAM_CHUNK, TUNNEL_ACK_EVERY};
use banger_proto::fs::{FileKind, FileStat, FsError, FsErrorCode, PARENT_DIR_MODE};

use crate::channel::Link;
use crate::workspace::Incoming;

/// Bytes read from a file per `Data` frame sent.
const READ_BUF: usize = 256 * 1024;
/// A listing sends its JSON lines in payloads of about this size.
const LIST_BATCH: usize = 32 * 1024;

/// A failure with its kind, from a path and an I/O error.
fn failed(code: FsErrorCode, message: impl Into<String>) -> FsError {
    FsError { code, message: message.into() }
}

/// `path: cannot WHAT: cause`, coded by the errno.
fn io_failed(path: &Path, what: &str, e: &std::io::Error) -> FsError {
    let code = match e.raw_os_error().map(nix::errno::Errno::from_raw) {
        Some(nix::errno::Errno::ENOENT) => FsErrorCode::NotFound,
        Some(nix::errno::Errno::ENOTDIR | nix::errno::Errno::EISDIR | nix::errno::Errno::ELOOP) => FsErrorCode::Invalid,
        Some(
            nix::errno::Errno::ENOTEMPTY
            | nix::errno::Errno::EEXIST
            | nix::errno::Errno::ENOSPC
            | nix::errno::Errno::EDQUOT
            | nix::errno::Errno::EROFS
            | nix::errno::Errno::EBUSY
            | nix::errno::Errno::EACCES
            | nix::errno::Errno::EPERM,
        ) => FsErrorCode::Conflict,
        _ => FsErrorCode::Io,
    };
    failed(code, format!("{}: cannot {what}: {e}", path.display()))
}

/// An absolute path, or the refusal.
fn absolute(path: &str) -> Result<&Path, FsError> {
    if banger_proto::fs::valid_guest_path(path) {
        Ok(Path::new(path))
    } else {
        Err(failed(FsErrorCode::Invalid, format!("{path}: must be an absolute path without '.' or '..' parts")))
    }
}

/// A path's `lstat` as the wire has it.
pub fn stat(path: &Path) -> Result<FileStat, FsError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_failed(path, "stat", &e))?;
    let kind = file_kind(&meta.file_type());
    let link_target = match kind {
        FileKind::Symlink => Some(
            std::fs::read_link(path).map_err(|e| io_failed(path, "read the link", &e))?.to_string_lossy().into_owned(),
        ),
        _ => None,
    };
    Ok(FileStat {
        path: path.to_string_lossy().into_owned(),
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
        link_target,
    })
}

fn file_kind(t: &std::fs::FileType) -> FileKind {
    if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_dir() {
        FileKind::Dir
    } else if t.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

/// Answers a request that has one JSON answer: the answer, or `FsFailed`.
fn answer(link: &Link, result: Result<AgentResponse, FsError>) {
    let response = result.unwrap_or_else(AgentResponse::FsFailed);
    let _ = link.json(FrameKind::Response, &response);
    link.finish();
}

/// Serves the file requests that need no upload route (`write` has one: see `serve_write`).
pub fn serve(link: &Link, request: AgentRequest) {
    match request {
        AgentRequest::Stat { path } => answer(link, absolute(&path).and_then(stat).map(AgentResponse::Stat)),
        AgentRequest::Mkdir { path, parents, mode } => {
            answer(link, absolute(&path).and_then(|p| mkdir(p, parents, mode)).map(AgentResponse::Stat));
        }
        AgentRequest::Remove { path, recursive } => {
            answer(link, absolute(&path).and_then(|p| remove(p, recursive)).map(|()| AgentResponse::Ok));
        }
        AgentRequest::List { path, limit } => serve_list(link, &path, limit),
        AgentRequest::Read { path, limit } => serve_read(link, &path, limit),
        AgentRequest::Pack { path } => serve_pack(link, &path),
        other => {
            link.fail(&format!("not a file request: {other:?}"));
            link.finish();
        }
    }
}

fn mkdir(path: &Path, parents: bool, mode: Option<u32>) -> Result<FileStat, FsError> {
    let mode = mode.unwrap_or(PARENT_DIR_MODE) & 0o7777;
    if parents {
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(PARENT_DIR_MODE)
                .create(parent)
                .map_err(|e| io_failed(parent, "make the parent directories", &e))?;
        }
    }
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {
            // The umask may have trimmed the mode.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_failed(path, "chmod", &e))?;
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists && parents => {
            let found = stat(path)?;
            if found.kind != FileKind::Dir {
                return Err(failed(
                    FsErrorCode::Conflict,
                    format!("{}: exists and is not a directory", path.display()),
                ));
            }
        }
        Err(e) => return Err(io_failed(path, "make the directory", &e)),
    }
    stat(path)
}

fn remove(path: &Path, recursive: bool) -> Result<(), FsError> {
    if path.parent().is_none() {
        return Err(failed(FsErrorCode::Invalid, "refusing to remove '/'"));
    }
    let found = stat(path)?;
    let removed = match (found.kind, recursive) {
        (FileKind::Dir, true) => std::fs::remove_dir_all(path),
        (FileKind::Dir, false) => std::fs::remove_dir(path),
        // A symlink itself goes, never what it points to.
        _ => std::fs::remove_file(path),
    };
    removed.map_err(|e| match e.raw_os_error().map(nix::errno::Errno::from_raw) {
        Some(nix::errno::Errno::ENOTEMPTY | nix::errno::Errno::EEXIST) => failed(
            FsErrorCode::Conflict,
            format!("{}: the directory is not empty; remove it with recursive=true", path.display()),
        ),
        _ => io_failed(path, "remove", &e),
    })
}

/// Serves `list`: sorted entries as JSON lines in `Data`, then `Listed`.
pub fn serve_list(link: &Link, path: &str, limit: u32) {
    let dir = match absolute(path) {
        Ok(dir) => dir,
        Err(e) => return answer(link, Err(e)),
    };
    let names = match list_names(dir) {
        Ok(names) => names,
        Err(e) => return answer(link, Err(e)),
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut batch = Vec::with_capacity(LIST_BATCH + 512);
    let mut count = 0u64;
    for name in names.iter().take(limit) {
        // An entry removed since the listing is left out.
        let Ok(entry) = stat(&dir.join(name)) else { continue };
        if serde_json::to_writer(&mut batch, &entry).is_err() {
            continue;
        }
        batch.push(b'\n');
        count += 1;
        if batch.len() >= LIST_BATCH && link.send(FrameKind::Data, std::mem::take(&mut batch)).is_err() {
            return link.finish();
        }
    }
    if !batch.is_empty() && link.send(FrameKind::Data, batch).is_err() {
        return link.finish();
    }
    answer(link, Ok(AgentResponse::Listed { count, truncated: names.len() > limit }));
}

/// A directory's entry names, sorted.
fn list_names(dir: &Path) -> Result<Vec<std::ffi::OsString>, FsError> {
    let found = stat(dir)?;
    if found.kind != FileKind::Dir {
        return Err(failed(FsErrorCode::Invalid, format!("{}: not a directory", dir.display())));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_failed(dir, "list", &e))? {
        names.push(entry.map_err(|e| io_failed(dir, "list", &e))?.file_name());
    }
    names.sort();
    Ok(names)
}

/// Serves `read`: `Opened`, the contents (at most `limit` bytes), an empty `Data`.
pub fn serve_read(link: &Link, path: &str, limit: Option<u64>) {
    let opened = absolute(path).and_then(|p| {
        let file = File::open(p).map_err(|e| io_failed(p, "open", &e))?;
        let meta = file.metadata().map_err(|e| io_failed(p, "stat", &e))?;
        if !meta.is_file() {
            return Err(failed(FsErrorCode::Invalid, format!("{path}: not a regular file")));
        }
        Ok((file, meta.len()))
    });
    let (file, size) = match opened {
        Ok(opened) => opened,
        Err(e) => return answer(link, Err(e)),
    };
    if link.json(FrameKind::Response, &AgentResponse::Opened { size }).is_err() {
        return link.finish();
    }
    let mut reader = file.take(limit.unwrap_or(u64::MAX));
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                link.fail(&format!("{path}: cannot read: {e}"));
                return link.finish();
            }
        };
        if link.send(FrameKind::Data, buf[..n].to_vec()).is_err() {
            return link.finish();
        }
    }
    let _ = link.send(FrameKind::Data, Vec::new());
    link.finish();
}

/// Serves `write`: the upload into a temporary file beside `path`, renamed over it.
pub fn serve_write(link: &Link, path: &str, mode: u32, parents: bool, chunks: &mpsc::Receiver<Vec<u8>>) {
    let mut incoming = Incoming::new(chunks, |n| link.send(FrameKind::Ack, ack_payload(n)).is_ok());
    let result = absolute(path).and_then(|p| write(p, mode, parents, &mut incoming));
    match result {
        Err(e) if incoming.is_gone() => log!("upload to {path} abandoned by the host: {}", e.message),
        result => {
            let _ = link.json(FrameKind::Response, &result.map_or_else(AgentResponse::FsFailed, AgentResponse::Stat));
        }
    }
    link.finish();
}

fn write(path: &Path, mode: u32, parents: bool, incoming: &mut impl Read) -> Result<FileStat, FsError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(failed(FsErrorCode::Invalid, "refusing to write over '/'"));
    };
    if parents {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PARENT_DIR_MODE)
            .create(parent)
            .map_err(|e| io_failed(parent, "make the parent directories", &e))?;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(failed(FsErrorCode::Invalid, format!("{}: is a directory", path.display())));
    }
    let temp = parent.join(format!(".{}.banger-{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode & 0o7777)
            .open(&temp)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => failed(
                    FsErrorCode::NotFound,
                    format!("{}: the parent directory does not exist; make it first (or pass parents)", path.display()),
                ),
                _ => io_failed(path, "create", &e),
            })?;
        std::io::copy(incoming, &mut file).map_err(|e| io_failed(path, "write", &e))?;
        // The umask may have trimmed the mode at create.
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| io_failed(path, "chmod", &e))?;
        file.sync_all().map_err(|e| io_failed(path, "sync", &e))?;
        std::fs::rename(&temp, path).map_err(|e| io_failed(path, "rename", &e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result?;
    stat(path)
}

/// `Data` frames of at most [`STREAM_CHUNK`] bytes, as a writer (for the tar builder).
struct DataWriter<'a> {
    link: &'a Link,
    buf: Vec<u8>,
}

impl Write for DataWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(STREAM_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == STREAM_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(STREAM_CHUNK));
        self.link
            .send(FrameKind::Data, chunk)
            .map_err(|_| std::io::Error::new(ErrorKind::ConnectionAborted, "the host went away"))
    }
}

/// Serves `pack`: the tar stream of `path` in `Data`, then `Packed`.
pub fn serve_pack(link: &Link, path: &str) {
    let top = absolute(path).and_then(|p| {
        let name =
            p.file_name().ok_or_else(|| failed(FsErrorCode::Invalid, "name a path under '/', not '/' itself"))?;
        stat(p)?;
        Ok((p.to_owned(), PathBuf::from(name)))
    });
    let (source, name) = match top {
        Ok(top) => top,
        Err(e) => return answer(link, Err(e)),
    };
    let mut builder = tar::Builder::new(DataWriter { link, buf: Vec::with_capacity(STREAM_CHUNK) });
    let mut packed = Packed::default();
    let result = pack_into(&mut builder, &source, &name, &mut packed)
        .and_then(|()| builder.finish())
        .and_then(|()| builder.get_mut().flush());
    match result {
        Ok(()) => {
            let _ =
                link.json(FrameKind::Response, &AgentResponse::Packed { entries: packed.entries, bytes: packed.bytes });
        }
        Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
        Err(e) => link.fail(&format!("packing {path} failed: {e}")),
    }
    link.finish();
}

/// Counts of a pack.
#[derive(Debug, Default)]
struct Packed {
    entries: u64,
    bytes: u64,
}

/// Appends `source` as `name`, and a directory's entries below it (sorted), never following a
/// symlink. Sockets, FIFOs and devices are left out.
fn pack_into<W: Write>(
    builder: &mut tar::Builder<W>,
    source: &Path,
    name: &Path,
    packed: &mut Packed,
) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(source)?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(source)?;
        header.set_size(0);
        builder.append_link(&mut header, name, target)?;
    } else if kind.is_dir() {
        header.set_size(0);
        builder.append_data(&mut header, name, std::io::empty())?;
        let mut children: Vec<_> =
            std::fs::read_dir(source)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        children.sort();
        packed.entries += 1;
        for child in children {
            pack_into(builder, &source.join(&child), &name.join(&child), packed)?;
        }
        return Ok(());
    } else if kind.is_file() {
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(source)?;
        let size = meta.len();
        // Exactly the size in the header, even if the file changes meanwhile.
        let mut reader = Exact { inner: file.take(size), left: size };
        builder.append_data(&mut header, name, &mut reader)?;
        packed.bytes += size;
    } else {
        log!("pack: leaving out {} (not a file, directory or symlink)", source.display());
        return Ok(());
    }
    packed.entries += 1;
    Ok(())
}

/// Reads exactly `left` bytes: a file that shrank while packed is padded with zeros, so the
/// stream stays a valid tar.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = match self.inner.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.left -= n as u64;
        Ok(n)
    }
}

const _: () = assert!(TUNNEL_ACK_EVERY <= READ_BUF);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_mkdir_and_remove_follow_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(root.join("f"), b"hello").expect("write");
        std::fs::set_permissions(root.join("f"), std::fs::Permissions::from_mode(0o4755)).expect("chmod");
        std::os::unix::fs::symlink("/etc/passwd", root.join("l")).expect("symlink");
        let f = stat(&root.join("f")).expect("stat");
        assert_eq!((f.kind, f.size, f.mode, f.link_target), (FileKind::File, 5, 0o4755, None));
        let l = stat(&root.join("l")).expect("stat");
        assert_eq!((l.kind, l.link_target.as_deref()), (FileKind::Symlink, Some("/etc/passwd")));
        assert_eq!(stat(&root.join("nope")).expect_err("missing").code, FsErrorCode::NotFound);

        let made = mkdir(&root.join("a/b/c"), true, Some(0o700)).expect("mkdir -p");
        assert_eq!((made.kind, made.mode), (FileKind::Dir, 0o700));
        assert_eq!(stat(&root.join("a")).expect("parent").mode, 0o755);
        assert!(mkdir(&root.join("a/b/c"), true, None).is_ok(), "mkdir -p of an existing dir");
        assert_eq!(mkdir(&root.join("a/b/c"), false, None).expect_err("exists").code, FsErrorCode::Conflict);
        assert_eq!(mkdir(&root.join("x/y"), false, None).expect_err("no parent").code, FsErrorCode::NotFound);
        assert_eq!(mkdir(&root.join("f"), true, None).expect_err("a file").code, FsErrorCode::Conflict);

        // A symlink goes, its target stays; a non-empty dir needs `recursive`; never '/'.
        std::fs::write(root.join("target"), b"t").expect("write");
        std::os::unix::fs::symlink(root.join("target"), root.join("l2")).expect("symlink");
        remove(&root.join("l2"), false).expect("rm link");
        assert!(root.join("target").exists());
        std::os::unix::fs::symlink(root.join("a"), root.join("ldir")).expect("symlink");
        remove(&root.join("ldir"), true).expect("rm dir link");
        assert!(root.join("a/b/c").exists(), "a recursive remove of a link leaves its target");
        assert_eq!(remove(&root.join("a"), false).expect_err("not empty").code, FsErrorCode::Conflict);
        remove(&root.join("a"), true).expect("rm -r");
        assert!(!root.join("a").exists());
        assert_eq!(remove(Path::new("/"), true).expect_err("root").code, FsErrorCode::Invalid);
        assert_eq!(absolute("rel").expect_err("relative").code, FsErrorCode::Invalid);
    }

    #[test]
    fn writes_land_atomically_and_refuse_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("sub/f.sh");
        let missing = write(&target, 0o755, false, &mut &b"x"[..]).expect_err("no parent");
        assert_eq!(missing.code, FsErrorCode::NotFound);
        let written = write(&target, 0o755, true, &mut &b"#!/bin/sh\n"[..]).expect("write");
        assert_eq!((written.kind, written.size, written.mode), (FileKind::File, 10, 0o755));
        // Over a symlink: the link is replaced, its target untouched.
        std::fs::write(dir.path().join("t"), b"keep").expect("write");
        std::os::unix::fs::symlink(dir.path().join("t"), dir.path().join("sub/link")).expect("symlink");
        write(&dir.path().join("sub/link"), 0o644, false, &mut &b"new"[..]).expect("write over link");
        assert_eq!(std::fs::read(dir.path().join("t")).expect("read"), b"keep");
        assert_eq!(std::fs::read(dir.path().join("sub/link")).expect("read"), b"new");
        assert_eq!(
            write(&dir.path().join("sub"), 0o644, false, &mut &b""[..]).expect_err("dir").code,
            FsErrorCode::Invalid
        );
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("sub")).expect("ls").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
    }

    #[test]
    fn packs_keep_modes_and_symlinks_and_never_follow_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).expect("mkdir");
        std::fs::write(tree.join("bin/run"), b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(tree.join("bin/run"), std::fs::Permissions::from_mode(0o750)).expect("chmod");
        std::os::unix::fs::symlink("bin/run", tree.join("link")).expect("symlink");
        std::fs::create_dir(dir.path().join("outside")).expect("mkdir");
        std::fs::write(dir.path().join("outside/secret"), b"s").expect("write");
        std::os::unix::fs::symlink(dir.path().join("outside"), tree.join("out")).expect("symlink");
        let mut builder = tar::Builder::new(Vec::new());
        let mut packed = Packed::default();
        pack_into(&mut builder, &tree, Path::new("tree"), &mut packed).expect("pack");
        let bytes = builder.into_inner().expect("finish");
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let link = entry.link_name().expect("link").map(|l| l.display().to_string());
            seen.push((path, entry.header().mode().expect("mode") & 0o7777, link));
        }
        let names: Vec<&str> = seen.iter().map(|(p, ..)| p.as_str()).collect();
        assert_eq!(names, ["tree", "tree/bin", "tree/bin/run", "tree/link", "tree/out"]);
        assert_eq!(seen[2].1, 0o750);
        assert_eq!(seen[3].2.as_deref(), Some("bin/run"));
        assert!(!names.iter().any(|n| n.contains("secret")), "the symlinked directory was not followed");
        assert_eq!((packed.entries, packed.bytes), (5, 10));
        let mut short = Exact { inner: &b"ab"[..], left: 4 };
        let mut out = Vec::new();
        short.read_to_end(&mut out).expect("read");
        assert_eq!(out, b"ab\0\0");
    }
}
