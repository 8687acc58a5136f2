//! Flattening layer tars into one root directory without ever leaving it.
//!
//! Every path is resolved component by component from a directory descriptor with `O_NOFOLLOW`,
//! so no symlink in the tree (absolute or relative, from this layer or a lower one) is ever
//! followed: an entry under a symlinked directory is refused, `..` is refused, and absolute
//! names are taken relative to the root. Whiteouts (`.wh.NAME`, `.wh..wh..opq`) remove what
//! lower layers put there. Owners, modes (setuid, setgid, sticky), mtimes and `SCHILY.xattr.*`
//! extended attributes are kept; device nodes and fifos are skipped and counted. Directory modes
//! and mtimes are applied last, deepest first, since filling a directory changes its mtime.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use super::{hex_digest, LayerBlob, PullImageError};

/// What went wrong with one layer entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    /// A `..` component would leave the root.
    #[error("escapes the image root")]
    Escapes,
    /// A parent directory is a symlink; following it could leave the root.
    #[error("would be written through the symlink '{symlink}' (banger never follows symlinks while unpacking)")]
    ThroughSymlink {
        /// The symlink, relative to the root.
        symlink: String,
    },
    /// A parent is a file, not a directory.
    #[error("has a parent '{parent}' that is not a directory")]
    ParentNotDirectory {
        /// The parent, relative to the root.
        parent: String,
    },
    /// A hard link whose target is outside the root.
    #[error("is a hard link to '{target}', which escapes the image root")]
    HardLinkOutside {
        /// The link target as the layer gives it.
        target: String,
    },
    /// A hard link to something not unpacked (yet).
    #[error("is a hard link to '{target}', which is not in the image")]
    HardLinkMissing {
        /// The link target as the layer gives it.
        target: String,
    },
    /// A hard link to a directory.
    #[error("is a hard link to the directory '{target}'")]
    HardLinkToDirectory {
        /// The link target as the layer gives it.
        target: String,
    },
    /// A file entry without a name.
    #[error("has no file name")]
    NoName,
    /// A uid or gid that does not fit.
    #[error("has owner {uid}:{gid}, which is out of range")]
    BadOwner {
        /// The uid.
        uid: u64,
        /// The gid.
        gid: u64,
    },
}

/// What flattening did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlattenReport {
    /// Layers applied.
    pub layers: usize,
    /// Entries unpacked (files, directories, links).
    pub entries: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
    /// Device nodes and fifos skipped.
    pub skipped_devices: u64,
    /// Entries of other kinds skipped.
    pub skipped_other: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// How a blob is compressed, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub(crate) fn detect(magic: &[u8]) -> Self {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }

    pub(crate) fn decoder<'a, R: BufRead + 'a>(self, reader: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Self::None => Box::new(reader),
            Self::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
            Self::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
        })
    }
}

/// Hashes what passes through, for the layer's diff ID.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);
const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT: &[u8] = b".wh.";

/// Why a directory could not be opened.
enum WalkError {
    /// `prefix` is a symlink.
    Symlink(String),
    /// `prefix` is not a directory.
    NotDirectory(String),
    /// Something is missing and was not to be created.
    Missing,
    Io(io::Error),
}

fn join(parts: &[OsString]) -> String {
    parts.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>().join("/")
}

fn key(parts: &[OsString]) -> Vec<u8> {
    let mut key = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(b'/');
        }
        key.extend_from_slice(part.as_bytes());
    }
    key
}

/// `/a/./b//c` → `[a, b, c]`; `None` if a component is `..`.
fn split_path(raw: &[u8]) -> Option<Vec<OsString>> {
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return None,
            part => parts.push(OsStr::from_bytes(part).to_owned()),
        }
    }
    Some(parts)
}

fn lstat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileType>> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(FileType::from_raw_mode(stat.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens the directory `parts` below `root` without following any symlink, creating missing
/// directories (0755, owned by the caller) when `create` is set.
fn open_dir(root: BorrowedFd<'_>, parts: &[OsString], create: bool) -> Result<OwnedFd, WalkError> {
    let mut dir = rfs::openat(root, ".", DIR_FLAGS, Mode::empty()).map_err(|e| WalkError::Io(e.into()))?;
    for (i, part) in parts.iter().enumerate() {
        let opened = match rfs::openat(&dir, part.as_os_str(), DIR_FLAGS, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                match rfs::mkdirat(&dir, part.as_os_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(WalkError::Io(e.into())),
                }
                let opened = rfs::openat(&dir, part.as_os_str(), DIR_FLAGS, Mode::empty());
                if let Ok(fd) = &opened {
                    // mkdirat honours the umask; implicit directories are always 0755.
                    rfs::fchmod(fd, Mode::from_raw_mode(0o755)).map_err(|e| WalkError::Io(e.into()))?;
                }
                opened
            }
            other => other,
        };
        dir = match opened {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(WalkError::Missing),
            Err(Errno::LOOP | Errno::NOTDIR) => {
                let prefix = join(&parts[..=i]);
                return Err(match lstat(dir.as_fd(), part) {
                    Ok(Some(FileType::Symlink)) => WalkError::Symlink(prefix),
                    Ok(_) => WalkError::NotDirectory(prefix),
                    Err(e) => WalkError::Io(e),
                });
            }
            Err(e) => return Err(WalkError::Io(e.into())),
        };
    }
    Ok(dir)
}

/// Names in a directory, without `.` and `..`.
fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

/// Removes `name` in `dir`, recursively if it is a directory, never following symlinks.
fn remove_any(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match lstat(dir, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            let child = rfs::openat(dir, name, DIR_FLAGS, Mode::empty())?;
            for entry in list(child.as_fd())? {
                remove_any(child.as_fd(), &entry)?;
            }
            Ok(rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
        }
        Some(_) => Ok(rfs::unlinkat(dir, name, AtFlags::empty())?),
    }
}

/// An entry's owner, mode, mtime and extended attributes.
#[derive(Debug, Clone)]
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Timespec,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Meta {
    fn times(&self) -> Timestamps {
        Timestamps { last_access: self.mtime, last_modification: self.mtime }
    }
}

/// A directory's mode and mtime, applied once every layer is in.
#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime: Timespec,
}

/// `1700000000.5` → seconds and nanoseconds.
pub(super) fn parse_pax_time(text: &str) -> Option<Timespec> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let tv_sec: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let tv_nsec = if digits.is_empty() {
        0
    } else {
        let value: i64 = digits.parse().ok()?;
        value * 10i64.pow(9 - u32::try_from(digits.len()).ok()?)
    };
    Some(Timespec { tv_sec, tv_nsec })
}

struct Flattener {
    root: OwnedFd,
    /// Directory metadata to apply at the end, by path key.
    dirs: BTreeMap<Vec<u8>, DirMeta>,
    report: FlattenReport,
    /// Ownership can only be given away as root; others (tests) keep their own.
    chown: bool,
}

/// One layer being applied.
struct Layer {
    label: String,
    /// Paths this layer put in place: its own whiteouts and opaque markers leave them alone.
    added: HashSet<Vec<u8>>,
}

impl Layer {
    fn entry_error(&self, entry: &str, problem: EntryProblem) -> PullImageError {
        PullImageError::Entry { layer: self.label.clone(), entry: entry.to_owned(), problem }
    }

    fn io_error(&self, entry: &str) -> impl FnOnce(io::Error) -> PullImageError {
        let (layer, entry) = (self.label.clone(), entry.to_owned());
        move |source| PullImageError::EntryIo { layer, entry, source }
    }

    fn corrupt(&self) -> impl FnOnce(io::Error) -> PullImageError {
        let layer = self.label.clone();
        move |source| PullImageError::CorruptLayer { layer, source }
    }

    fn walk_error(&self, entry: &str, error: WalkError) -> PullImageError {
        match error {
            WalkError::Symlink(symlink) => self.entry_error(entry, EntryProblem::ThroughSymlink { symlink }),
            WalkError::NotDirectory(parent) => self.entry_error(entry, EntryProblem::ParentNotDirectory { parent }),
            WalkError::Missing => self.io_error(entry)(io::Error::from(io::ErrorKind::NotFound)),
            WalkError::Io(e) => self.io_error(entry)(e),
        }
    }
}

/// Applies `layers` in order to the (empty or partly filled) directory `root`.
pub fn flatten(layers: &[LayerBlob], root: &Path) -> Result<FlattenReport, PullImageError> {
    let root_fd = rfs::open(root, DIR_FLAGS, Mode::empty())
        .map_err(|e| PullImageError::Io { path: root.to_owned(), source: e.into() })?;
    let mut flattener = Flattener {
        root: root_fd,
        dirs: BTreeMap::new(),
        report: FlattenReport::default(),
        chown: nix::unistd::geteuid().is_root(),
    };
    for (index, blob) in layers.iter().enumerate() {
        flattener.apply(blob, index)?;
        flattener.report.layers += 1;
    }
    flattener.finish_dirs().map_err(|source| PullImageError::Io { path: root.to_owned(), source })?;
    Ok(flattener.report)
}

impl Flattener {
    fn apply(&mut self, blob: &LayerBlob, index: usize) -> Result<(), PullImageError> {
        let layer = Layer { label: blob.label(index), added: HashSet::new() };
        let mut reader = BufReader::new(blob.blob.open().map_err(layer.corrupt())?);
        let magic = reader.fill_buf().map_err(layer.corrupt())?.to_vec();
        let decoder = Compression::detect(&magic).decoder(reader).map_err(layer.corrupt())?;
        let mut archive = tar::Archive::new(Hashing { inner: decoder, hasher: Sha256::new() });
        let mut layer = layer;
        for entry in archive.entries().map_err(layer.corrupt())? {
            let mut entry = entry.map_err(layer.corrupt())?;
            self.entry(&mut layer, &mut entry)?;
        }
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(layer.corrupt())?;
        if let Some(expected) = &blob.diff_id {
            let actual = hex_digest(rest.hasher);
            if &actual != expected {
                return Err(PullImageError::DiffIdMismatch { layer: layer.label, expected: expected.clone(), actual });
            }
        }
        Ok(())
    }

    fn meta<R: Read>(&self, layer: &Layer, name: &str, entry: &mut tar::Entry<'_, R>) -> Result<Meta, PullImageError> {
        let header = entry.header();
        let corrupt = |e| layer.corrupt()(e);
        let mode = header.mode().map_err(corrupt)? & 0o7777;
        let mut uid = header.uid().map_err(corrupt)?;
        let mut gid = header.gid().map_err(corrupt)?;
        let mut mtime = Timespec { tv_sec: i64::try_from(header.mtime().map_err(corrupt)?).unwrap_or(0), tv_nsec: 0 };
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(corrupt)? {
            for extension in extensions {
                let extension = extension.map_err(corrupt)?;
                let Ok(key) = extension.key() else { continue };
                let value = extension.value_bytes();
                if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.push((OsString::from(xattr), value.to_vec()));
                    continue;
                }
                let text = String::from_utf8_lossy(value);
                match key {
                    "uid" => uid = text.trim().parse().unwrap_or(uid),
                    "gid" => gid = text.trim().parse().unwrap_or(gid),
                    "mtime" => mtime = parse_pax_time(text.trim()).unwrap_or(mtime),
                    _ => {}
                }
            }
        }
        let owner = |id: u64| u32::try_from(id).ok().filter(|id| *id != u32::MAX);
        let (Some(uid32), Some(gid32)) = (owner(uid), owner(gid)) else {
            return Err(layer.entry_error(name, EntryProblem::BadOwner { uid, gid }));
        };
        Ok(Meta { uid: uid32, gid: gid32, mode, mtime, xattrs })
    }

    fn entry<R: Read>(&mut self, layer: &mut Layer, entry: &mut tar::Entry<'_, R>) -> Result<(), PullImageError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let parts = split_path(&raw).ok_or_else(|| layer.entry_error(&name, EntryProblem::Escapes))?;
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            return Ok(());
        }
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo) {
            tracing::debug!(layer = %layer.label, entry = %name, "skipping device node or fifo");
            self.report.skipped_devices += 1;
            return Ok(());
        }
        let Some((base, parents)) = parts.split_last() else {
            // The root itself (`./`).
            if kind.is_dir() {
                let meta = self.meta(layer, &name, entry)?;
                let root = rfs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
                    .map_err(|e| layer.io_error(&name)(e.into()))?;
                self.set_dir_meta(root.as_fd(), Vec::new(), &meta).map_err(layer.io_error(&name))?;
                return Ok(());
            }
            return Err(layer.entry_error(&name, EntryProblem::NoName));
        };
        let base_bytes = base.as_bytes();
        if let Some(target) = base_bytes.strip_prefix(WHITEOUT) {
            return self.whiteout(layer, &name, parents, base_bytes, target);
        }
        let parent = open_dir(self.root.as_fd(), parents, true).map_err(|e| layer.walk_error(&name, e))?;
        let path_key = key(&parts);
        layer.added.insert(path_key.clone());
        self.report.entries += 1;
        match kind {
            tar::EntryType::Directory => {
                let meta = self.meta(layer, &name, entry)?;
                match lstat(parent.as_fd(), base).map_err(layer.io_error(&name))? {
                    Some(FileType::Directory) => {}
                    Some(_) => {
                        remove_any(parent.as_fd(), base).map_err(layer.io_error(&name))?;
                        rfs::mkdirat(&parent, base.as_os_str(), Mode::from_raw_mode(0o700))
                            .map_err(|e| layer.io_error(&name)(e.into()))?;
                    }
                    None => rfs::mkdirat(&parent, base.as_os_str(), Mode::from_raw_mode(0o700))
                        .map_err(|e| layer.io_error(&name)(e.into()))?,
                }
                let dir = rfs::openat(&parent, base.as_os_str(), DIR_FLAGS, Mode::empty())
                    .map_err(|e| layer.io_error(&name)(e.into()))?;
                self.set_dir_meta(dir.as_fd(), path_key, &meta).map_err(layer.io_error(&name))
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let meta = self.meta(layer, &name, entry)?;
                self.forget_dirs(&path_key);
                remove_any(parent.as_fd(), base).map_err(layer.io_error(&name))?;
                let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let fd = rfs::openat(&parent, base.as_os_str(), flags, Mode::from_raw_mode(0o600))
                    .map_err(|e| layer.io_error(&name)(e.into()))?;
                let mut file = File::from(fd);
                let expected = entry.size();
                let written = copy_entry(entry, &mut file, layer, &name)?;
                if written != expected {
                    return Err(layer.corrupt()(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("entry '{name}' is cut short ({written} of {expected} bytes)"),
                    )));
                }
                self.report.bytes += written;
                self.set_file_meta(file.as_fd(), &meta).map_err(layer.io_error(&name))
            }
            tar::EntryType::Symlink => {
                let meta = self.meta(layer, &name, entry)?;
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                self.forget_dirs(&path_key);
                remove_any(parent.as_fd(), base).map_err(layer.io_error(&name))?;
                rfs::symlinkat(OsStr::from_bytes(&target), &parent, base.as_os_str())
                    .map_err(|e| layer.io_error(&name)(e.into()))?;
                if self.chown {
                    rfs::chownat(
                        &parent,
                        base.as_os_str(),
                        Some(uid(meta.uid)),
                        Some(gid(meta.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| layer.io_error(&name)(e.into()))?;
                }
                rfs::utimensat(&parent, base.as_os_str(), &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| layer.io_error(&name)(e.into()))?;
                Ok(())
            }
            tar::EntryType::Link => {
                let raw_target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                self.hard_link(layer, &name, parent.as_fd(), base, &path_key, &raw_target)
            }
            other => {
                tracing::warn!(layer = %layer.label, entry = %name, kind = ?other, "skipping entry of unsupported kind");
                self.report.entries -= 1;
                self.report.skipped_other += 1;
                Ok(())
            }
        }
    }

    fn whiteout(
        &mut self,
        layer: &mut Layer,
        name: &str,
        parents: &[OsString],
        base: &[u8],
        target: &[u8],
    ) -> Result<(), PullImageError> {
        let parent = match open_dir(self.root.as_fd(), parents, false) {
            Ok(parent) => parent,
            // Nothing below to hide.
            Err(WalkError::Missing | WalkError::NotDirectory(_)) => return Ok(()),
            Err(e) => return Err(layer.walk_error(name, e)),
        };
        self.report.whiteouts += 1;
        let parent_key = key(parents);
        let child_key = |child: &[u8]| {
            let mut k = parent_key.clone();
            if !k.is_empty() {
                k.push(b'/');
            }
            k.extend_from_slice(child);
            k
        };
        if base == OPAQUE {
            for child in list(parent.as_fd()).map_err(layer.io_error(name))? {
                let child_path = child_key(child.as_bytes());
                if !layer.added.contains(&child_path) {
                    self.forget_dirs(&child_path);
                    remove_any(parent.as_fd(), &child).map_err(layer.io_error(name))?;
                }
            }
            return Ok(());
        }
        if target.starts_with(WHITEOUT) {
            // Other `.wh..wh.*` markers (aufs hard-link directories) mean nothing here.
            return Ok(());
        }
        match target {
            b"" | b"." => return Err(layer.entry_error(name, EntryProblem::NoName)),
            b".." => return Err(layer.entry_error(name, EntryProblem::Escapes)),
            _ => {}
        }
        let child_path = child_key(target);
        if !layer.added.contains(&child_path) {
            self.forget_dirs(&child_path);
            remove_any(parent.as_fd(), OsStr::from_bytes(target)).map_err(layer.io_error(name))?;
        }
        Ok(())
    }

    fn hard_link(
        &mut self,
        layer: &Layer,
        name: &str,
        parent: BorrowedFd<'_>,
        base: &OsStr,
        path_key: &[u8],
        raw_target: &[u8],
    ) -> Result<(), PullImageError> {
        let target = String::from_utf8_lossy(raw_target).into_owned();
        let parts = split_path(raw_target)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| layer.entry_error(name, EntryProblem::HardLinkOutside { target: target.clone() }))?;
        let missing = || layer.entry_error(name, EntryProblem::HardLinkMissing { target: target.clone() });
        let Some((target_base, target_parents)) = parts.split_last() else { return Err(missing()) };
        let target_dir = match open_dir(self.root.as_fd(), target_parents, false) {
            Ok(dir) => dir,
            Err(WalkError::Missing | WalkError::NotDirectory(_)) => return Err(missing()),
            Err(e) => return Err(layer.walk_error(name, e)),
        };
        match lstat(target_dir.as_fd(), target_base).map_err(layer.io_error(name))? {
            None => return Err(missing()),
            Some(FileType::Directory) => {
                return Err(layer.entry_error(name, EntryProblem::HardLinkToDirectory { target }))
            }
            Some(_) => {}
        }
        if key(&parts) == path_key {
            return Ok(());
        }
        self.forget_dirs(path_key);
        remove_any(parent, base).map_err(layer.io_error(name))?;
        rfs::linkat(&target_dir, target_base.as_os_str(), parent, base, AtFlags::empty())
            .map_err(|e| layer.io_error(name)(e.into()))
    }

    fn set_file_meta(&self, fd: BorrowedFd<'_>, meta: &Meta) -> io::Result<()> {
        // chown clears setuid/setgid and security.capability: owner first, then mode, then xattrs.
        if self.chown {
            rfs::fchown(fd, Some(uid(meta.uid)), Some(gid(meta.gid)))?;
        }
        rfs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
        set_xattrs(fd, meta)?;
        rfs::futimens(fd, &meta.times())?;
        Ok(())
    }

    fn set_dir_meta(&mut self, fd: BorrowedFd<'_>, path_key: Vec<u8>, meta: &Meta) -> io::Result<()> {
        if self.chown {
            rfs::fchown(fd, Some(uid(meta.uid)), Some(gid(meta.gid)))?;
        }
        set_xattrs(fd, meta)?;
        self.dirs.insert(path_key, DirMeta { mode: meta.mode, mtime: meta.mtime });
        Ok(())
    }

    /// Drops pending directory metadata at and below `path_key` (it is being replaced).
    fn forget_dirs(&mut self, path_key: &[u8]) {
        let below = |k: &[u8]| k == path_key || (k.starts_with(path_key) && k.get(path_key.len()) == Some(&b'/'));
        if self.dirs.keys().any(|k| below(k)) {
            self.dirs.retain(|k, _| !below(k));
        }
    }

    /// Applies directory modes and mtimes, deepest first.
    fn finish_dirs(&mut self) -> io::Result<()> {
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirs).into_iter().collect();
        dirs.sort_by_key(|(k, _)| {
            std::cmp::Reverse(k.iter().filter(|b| **b == b'/').count() + usize::from(!k.is_empty()))
        });
        for (path_key, meta) in dirs {
            let Some(parts) = split_path(&path_key) else { continue };
            let Ok(dir) = open_dir(self.root.as_fd(), &parts, false) else { continue };
            rfs::fchmod(&dir, Mode::from_raw_mode(meta.mode))?;
            rfs::futimens(&dir, &Timestamps { last_access: meta.mtime, last_modification: meta.mtime })?;
        }
        Ok(())
    }
}

fn uid(raw: u32) -> Uid {
    Uid::from_raw(raw)
}

fn gid(raw: u32) -> Gid {
    Gid::from_raw(raw)
}

fn set_xattrs(fd: BorrowedFd<'_>, meta: &Meta) -> io::Result<()> {
    for (name, value) in &meta.xattrs {
        rfs::fsetxattr(fd, name.as_os_str(), value, XattrFlags::empty()).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot set extended attribute {}: {e}", name.to_string_lossy()),
            )
        })?;
    }
    Ok(())
}

/// Copies an entry's content, telling read errors (a corrupt layer) from write errors.
fn copy_entry(reader: &mut impl Read, file: &mut File, layer: &Layer, name: &str) -> Result<u64, PullImageError> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(layer.corrupt()(e)),
        };
        file.write_all(&buffer[..n]).map_err(layer.io_error(name))?;
        total += n as u64;
    }
}

/// Makes a flattened tree fit to be the base of many VMs: removes `/etc/ssh/ssh_host_*` (each
/// VM makes its own), creates `/etc/banger/`, and writes `/etc/hostname` if the image has none.
pub(crate) fn prepare_tree(root: &Path) -> Result<(), PullImageError> {
    let prepare = |path: &str, reason: String| PullImageError::Prepare { path: path.to_owned(), reason };
    let root_fd = rfs::open(root, DIR_FLAGS, Mode::empty())
        .map_err(|e| PullImageError::Io { path: root.to_owned(), source: e.into() })?;
    let parts = |p: &[&str]| p.iter().map(OsString::from).collect::<Vec<_>>();
    match open_dir(root_fd.as_fd(), &parts(&["etc", "ssh"]), false) {
        Ok(ssh) => {
            for name in list(ssh.as_fd()).map_err(|e| prepare("/etc/ssh", e.to_string()))? {
                if name.as_bytes().starts_with(b"ssh_host_")
                    && lstat(ssh.as_fd(), &name).ok().flatten().is_some_and(|t| t != FileType::Directory)
                {
                    rfs::unlinkat(&ssh, name.as_os_str(), AtFlags::empty())
                        .map_err(|e| prepare("/etc/ssh", e.to_string()))?;
                }
            }
        }
        Err(WalkError::Missing) => {}
        Err(WalkError::Symlink(link)) => tracing::warn!(symlink = %link, "not removing ssh host keys behind a symlink"),
        Err(WalkError::NotDirectory(_)) => {}
        Err(WalkError::Io(e)) => return Err(prepare("/etc/ssh", e.to_string())),
    }
    let walk = |error: WalkError| match error {
        WalkError::Symlink(link) => prepare("/etc/banger", format!("/{link} is a symlink; banger needs a real /etc")),
        WalkError::NotDirectory(p) => prepare("/etc/banger", format!("/{p} is not a directory")),
        WalkError::Missing => prepare("/etc/banger", "missing".to_owned()),
        WalkError::Io(e) => prepare("/etc/banger", e.to_string()),
    };
    open_dir(root_fd.as_fd(), &parts(&["etc", "banger"]), true).map_err(walk)?;
    let etc = open_dir(root_fd.as_fd(), &parts(&["etc"]), false).map_err(walk)?;
    let hostname = OsStr::new("hostname");
    if lstat(etc.as_fd(), hostname).map_err(|e| prepare("/etc/hostname", e.to_string()))?.is_none() {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(&etc, hostname, flags, Mode::from_raw_mode(0o644))
            .map_err(|e| prepare("/etc/hostname", e.to_string()))?;
        rfs::fchmod(&fd, Mode::from_raw_mode(0o644)).map_err(|e| prepare("/etc/hostname", e.to_string()))?;
        let mut file = File::from(fd);
        writeln!(file, "{}", crate::rootfs::IMAGE_HOSTNAME).map_err(|e| prepare("/etc/hostname", e.to_string()))?;
    }
    Ok(())
}

/// Writes the image's declarations to `/etc/banger/image.json` in the prepared tree `root`
/// (none when it declares nothing), replacing what the layers put there, never through a link.
pub(crate) fn write_meta(root: &Path, meta: &banger_proto::agent::meta::ImageMeta) -> Result<(), PullImageError> {
    let path = banger_proto::agent::meta::IMAGE_META_PATH;
    let fail = |e: String| PullImageError::Prepare { path: path.to_owned(), reason: e };
    let root_fd = rfs::open(root, DIR_FLAGS, Mode::empty())
        .map_err(|e| PullImageError::Io { path: root.to_owned(), source: e.into() })?;
    let parts: Vec<OsString> = ["etc", "banger"].iter().map(OsString::from).collect();
    // prepare_tree made /etc/banger a real directory.
    let dir = open_dir(root_fd.as_fd(), &parts, false).map_err(|_| fail("not a directory".into()))?;
    let name = OsStr::new("image.json");
    match rfs::unlinkat(&dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    if meta.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec_pretty(meta).map_err(|e| fail(e.to_string()))?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(&dir, name, flags, Mode::from_raw_mode(0o644)).map_err(|e| fail(e.to_string()))?;
    rfs::fchmod(&fd, Mode::from_raw_mode(0o644)).map_err(|e| fail(e.to_string()))?;
    File::from(fd).write_all(&json).map_err(|e| fail(e.to_string()))
}
