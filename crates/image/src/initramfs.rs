//! initramfs images: a cpio "newc" writer, a builder, and banger's guest initramfs.
//!
//! newc format: each entry is a 110-byte ASCII header (`070701`, then 13 fields as 8 hex digits:
//! ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
//! namesize including the NUL, check), the NUL-terminated name padded to 4 bytes, then the data
//! padded to 4 bytes. A `TRAILER!!!` entry ends the archive. The kernel unpacks it gzip'd.
//! Output is deterministic: owner root, mtime 0, inode numbers in path order.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use crate::modinfo::{read_module_file, ModinfoError, OrderedModule};

/// Guest path of the file listing the modules to load, one absolute path a line, in load order.
pub const MODULES_ORDER_PATH: &str = "/etc/banger/modules.order";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const PERMISSION_BITS: u32 = 0o7777;
const TRAILER: &str = "TRAILER!!!";

/// What went wrong building or writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A path is empty or would leave the archive root.
    #[error("'{path}' is not a valid initramfs path; use a path without '..', '.' or NUL")]
    InvalidPath {
        /// The offending path.
        path: String,
    },
    /// The same path was added twice.
    #[error("'{path}' is added to the initramfs twice")]
    Duplicate {
        /// The path.
        path: String,
    },
    /// A parent of a path is not a directory.
    #[error("cannot add '{path}' to the initramfs: '{parent}' is not a directory")]
    NotADirectory {
        /// The path being added.
        path: String,
        /// Its parent that is a file, symlink or device.
        parent: String,
    },
    /// The init program needs a dynamic loader, which the initramfs does not have.
    #[error(
        "{} is dynamically linked (it asks for {interpreter}), so the guest kernel cannot run it as \
         /init; build the static agent with scripts/build-agent and point BANGER_AGENT at it",
        path.display()
    )]
    DynamicInit {
        /// The init program.
        path: PathBuf,
        /// Its ELF interpreter.
        interpreter: String,
    },
    /// A host file to include could not be read.
    #[error("cannot read {} to put it in the initramfs", path.display())]
    ReadHost {
        /// The host file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file exceeds the 4 GiB limit of the newc format.
    #[error("'{path}' ({size} bytes) is too large for a cpio newc archive (4 GiB at most)")]
    TooLarge {
        /// The path in the archive.
        path: String,
        /// Its size.
        size: usize,
    },
    /// Writing the archive failed.
    #[error("cannot write the initramfs {}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A kernel module could not be read.
    #[error(transparent)]
    Module(#[from] ModinfoError),
}

/// Writes a cpio newc archive entry by entry; [`CpioWriter::finish`] adds the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self { out, next_ino: 1, written: 0 }
    }

    /// Appends an entry named `name` (no leading `/`) with the full `st_mode` `mode` (file type
    /// and permissions), device numbers `rdev` (major, minor) and contents `data` (a regular
    /// file's bytes or a symlink's target). Owner is root, mtime 0, inodes count up from 1.
    pub fn append(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let too_large = |what| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} too large for cpio newc"));
        let filesize = u32::try_from(data.len()).map_err(|_| too_large("file"))?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| too_large("name"))?;
        let nlink = if mode & 0o170_000 == S_IFDIR { 2 } else { 1 };
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino = self.next_ino.wrapping_add(1);
        let fields = [ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    /// Writes the trailer entry and returns the output stream.
    pub fn finish(mut self) -> io::Result<W> {
        self.append(TRAILER, 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        const ZEROS: [u8; 3] = [0; 3];
        let len = usize::try_from((4 - self.written % 4) % 4).unwrap_or(0);
        self.write(&ZEROS[..len])
    }
}

/// One entry of an [`InitramfsBuilder`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// `explicit` is false for parents created on the way to another entry.
    Dir {
        mode: u32,
        explicit: bool,
    },
    File {
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        target: String,
    },
    Device {
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// Sizes of an archive written by [`InitramfsBuilder::write_gz`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsSummary {
    /// The gzip'd archive.
    pub path: PathBuf,
    /// Number of entries, trailer excluded.
    pub entries: usize,
    /// Size of the cpio archive before compression.
    pub cpio_bytes: u64,
    /// Size of the written file.
    pub gzip_bytes: u64,
}

/// Collects directories, files, symlinks and device nodes, and writes them as a deterministic
/// cpio archive: entries sorted by path (parents first), missing parents added as `0755`
/// directories. Paths may be given with or without a leading `/`; modes are permission bits.
#[derive(Debug, Clone, Default)]
pub struct InitramfsBuilder {
    entries: BTreeMap<PathBuf, Node>,
}

impl InitramfsBuilder {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory; re-adding a directory only created as a parent sets its mode.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        let key = self.prepare(path)?;
        let mode = mode & PERMISSION_BITS;
        match self.entries.get_mut(&key) {
            Some(Node::Dir { explicit: false, .. }) | None => {
                self.entries.insert(key, Node::Dir { mode, explicit: true });
                Ok(self)
            }
            Some(_) => Err(InitramfsError::Duplicate { path: path.into() }),
        }
    }

    /// Adds a regular file with contents `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Result<&mut Self, InitramfsError> {
        let data = data.into();
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge { path: path.into(), size: data.len() });
        }
        let mode = mode & PERMISSION_BITS;
        self.insert(path, Node::File { mode, data })
    }

    /// Adds a regular file with the contents of host file `host`.
    pub fn file_from_host(&mut self, path: &str, mode: u32, host: &Path) -> Result<&mut Self, InitramfsError> {
        let data = fs::read(host).map_err(|source| InitramfsError::ReadHost { path: host.into(), source })?;
        self.file(path, mode, data)
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::Symlink { target: target.into() })
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<&mut Self, InitramfsError> {
        let mode = S_IFCHR | (mode & PERMISSION_BITS);
        self.insert(path, Node::Device { mode, major, minor })
    }

    /// Adds a block device node.
    pub fn block_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<&mut Self, InitramfsError> {
        let mode = S_IFBLK | (mode & PERMISSION_BITS);
        self.insert(path, Node::Device { mode, major, minor })
    }

    /// Number of entries, implicit parent directories included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the uncompressed cpio archive to `out` and returns it.
    pub fn write_cpio<W: Write>(&self, out: W) -> io::Result<W> {
        let mut cpio = CpioWriter::new(out);
        self.write_entries(&mut cpio)?;
        cpio.finish()
    }

    /// Writes the gzip'd archive to `path`, through a temporary file renamed into place.
    pub fn write_gz(&self, path: &Path) -> Result<InitramfsSummary, InitramfsError> {
        let write_error = |source| InitramfsError::Write { path: path.into(), source };
        let mut temp_name = path.as_os_str().to_owned();
        temp_name.push(format!(".tmp-{}", std::process::id()));
        let temp = PathBuf::from(temp_name);

        let result = (|| {
            let file = BufWriter::new(File::create(&temp)?);
            // The gzip header carries no name and mtime 0, so the output is reproducible.
            let gzip = flate2::GzBuilder::new().write(file, flate2::Compression::default());
            let mut cpio = CpioWriter::new(gzip);
            self.write_entries(&mut cpio)?;
            let cpio_bytes = cpio.written();
            let file = cpio.finish()?.finish()?;
            file.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()?;
            fs::rename(&temp, path)?;
            Ok(cpio_bytes)
        })();
        let cpio_bytes = result.map_err(|e| {
            // Best effort: the write error is what matters.
            let _ = fs::remove_file(&temp);
            write_error(e)
        })?;
        let gzip_bytes = fs::metadata(path).map_err(write_error)?.len();
        Ok(InitramfsSummary {
            path: path.into(),
            entries: self.entries.len(),
            cpio_bytes: cpio_bytes + trailer_len(),
            gzip_bytes,
        })
    }

    fn write_entries<W: Write>(&self, cpio: &mut CpioWriter<W>) -> io::Result<()> {
        for (key, node) in &self.entries {
            let name = key.to_str().unwrap_or_default();
            match node {
                Node::Dir { mode, .. } => cpio.append(name, S_IFDIR | mode, (0, 0), &[])?,
                Node::File { mode, data } => cpio.append(name, S_IFREG | mode, (0, 0), data)?,
                Node::Symlink { target } => cpio.append(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())?,
                Node::Device { mode, major, minor } => cpio.append(name, *mode, (*major, *minor), &[])?,
            }
        }
        Ok(())
    }

    /// Adds a non-directory entry.
    fn insert(&mut self, path: &str, node: Node) -> Result<&mut Self, InitramfsError> {
        let key = self.prepare(path)?;
        if self.entries.contains_key(&key) {
            return Err(InitramfsError::Duplicate { path: path.into() });
        }
        self.entries.insert(key, node);
        Ok(self)
    }

    /// Validates `path`, creates its missing parents, and returns its key.
    fn prepare(&mut self, path: &str) -> Result<PathBuf, InitramfsError> {
        let invalid = || InitramfsError::InvalidPath { path: path.into() };
        if path.contains('\0') {
            return Err(invalid());
        }
        let mut key = PathBuf::new();
        for component in Path::new(path).components() {
            match component {
                Component::RootDir => {}
                Component::Normal(part) => key.push(part),
                Component::CurDir | Component::ParentDir | Component::Prefix(_) => return Err(invalid()),
            }
        }
        // The trailer's name would end the archive early.
        if key.as_os_str().is_empty() || key == Path::new(TRAILER) {
            return Err(invalid());
        }
        let parents: Vec<_> = key.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()).collect();
        // Check every parent before adding any, so a failed call changes nothing.
        if let Some(parent) = parents.iter().find(|p| !matches!(self.entries.get(**p), Some(Node::Dir { .. }) | None)) {
            return Err(InitramfsError::NotADirectory { path: path.into(), parent: parent.display().to_string() });
        }
        for parent in parents {
            self.entries.entry(parent.to_owned()).or_insert(Node::Dir { mode: 0o755, explicit: false });
        }
        Ok(key)
    }
}

/// Size of the trailer entry: header, name and NUL, padded.
fn trailer_len() -> u64 {
    (110 + TRAILER.len() as u64 + 1).next_multiple_of(4)
}

/// Starts banger's guest initramfs: `/init` from host file `init`, a skeleton (`/dev` with
/// `console` and `null`, `/proc`, `/sys`, `/run`, `/tmp`, `/mnt`), the `modules` (in load order)
/// stored uncompressed under `/lib/modules/<release>/`, and [`MODULES_ORDER_PATH`] listing their
/// guest paths in that order. Callers may add more before writing.
pub fn guest_initramfs(
    init: &Path,
    release: &str,
    modules: &[OrderedModule],
) -> Result<InitramfsBuilder, InitramfsError> {
    if release.is_empty() || release.contains('/') {
        return Err(InitramfsError::InvalidPath { path: format!("lib/modules/{release}") });
    }
    let mut builder = InitramfsBuilder::new();
    for (dir, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("mnt", 0o755),
        ("etc/banger", 0o755),
    ] {
        builder.dir(dir, mode)?;
    }
    builder.char_device("dev/console", 0o600, 5, 1)?;
    builder.char_device("dev/null", 0o666, 1, 3)?;
    if let Some(interpreter) = elf_interpreter_of(init)? {
        return Err(InitramfsError::DynamicInit { path: init.to_owned(), interpreter });
    }
    builder.file_from_host("init", 0o755, init)?;

    let modules_dir = format!("lib/modules/{release}");
    builder.dir(&modules_dir, 0o755)?;
    let mut order = String::new();
    for module in modules {
        let relative = uncompressed_name(&module.relative);
        let guest_path = format!("{modules_dir}/{}", relative.display());
        builder.file(&guest_path, 0o644, read_module_file(&module.path)?)?;
        order.push('/');
        order.push_str(&guest_path);
        order.push('\n');
    }
    builder.file(MODULES_ORDER_PATH, 0o644, order)?;
    Ok(builder)
}

/// Builds banger's guest initramfs (see [`guest_initramfs`]) and writes it gzip'd to `out`.
pub fn build_guest_initramfs(
    init: &Path,
    release: &str,
    modules: &[OrderedModule],
    out: &Path,
) -> Result<InitramfsSummary, InitramfsError> {
    guest_initramfs(init, release, modules)?.write_gz(out)
}

/// The ELF interpreter (`PT_INTERP`, e.g. `/lib64/ld-linux-x86-64.so.2`) the program at `path`
/// asks for; `None` for a static executable or anything that is not a 64-bit little-endian ELF.
pub fn elf_interpreter_of(path: &Path) -> Result<Option<String>, InitramfsError> {
    use std::io::Read as _;
    let read = |source| InitramfsError::ReadHost { path: path.to_owned(), source };
    let mut head = Vec::new();
    // Program headers sit near the start of any executable a linker makes.
    fs::File::open(path).and_then(|f| f.take(64 * 1024).read_to_end(&mut head)).map_err(read)?;
    Ok(elf_interpreter(&head))
}

/// [`elf_interpreter_of`] on the first bytes of a file.
pub fn elf_interpreter(head: &[u8]) -> Option<String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| head.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| head.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    let u64_at = |at: usize| head.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    // 64-bit (class 2), little-endian (data 1).
    if !head.starts_with(b"\x7fELF") || head.get(4) != Some(&2) || head.get(5) != Some(&1) {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (entsize, count) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    (0..count).find_map(|i| {
        let at = phoff.checked_add(i.checked_mul(entsize)?)?;
        if u32_at(at)? != PT_INTERP {
            return None;
        }
        let offset = usize::try_from(u64_at(at + 8)?).ok()?;
        let size = usize::try_from(u64_at(at + 32)?).ok()?;
        let name = head.get(offset..offset.checked_add(size)?)?;
        Some(String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or_default()).into_owned())
    })
}

/// `x.ko.xz` → `x.ko`: modules go into the initramfs decompressed.
fn uncompressed_name(relative: &Path) -> PathBuf {
    let name = relative.to_string_lossy();
    let stripped = [".xz", ".zst", ".gz"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|stem| stem.ends_with(".ko"))
        .unwrap_or(&name);
    PathBuf::from(stripped)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;
    use crate::modinfo::tests::{virtio_tree, GUEST_MODULES};
    use crate::modinfo::ModuleIndex;
    use std::io::Read;

    /// One parsed newc entry.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Entry {
        name: String,
        ino: u32,
        mode: u32,
        uid: u32,
        nlink: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// Parses a newc archive, checking magic, padding and trailer.
    fn parse_cpio(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut entries = Vec::new();
        loop {
            assert_eq!((total - bytes.len()) % 4, 0, "entry not aligned");
            let header = std::str::from_utf8(&bytes[..110]).unwrap();
            assert_eq!(&header[..6], "070701");
            let field = |i: usize| u32::from_str_radix(&header[6 + 8 * i..14 + 8 * i], 16).unwrap();
            let (filesize, namesize) = (field(6) as usize, field(11) as usize);
            let name_end = 110 + namesize;
            assert_eq!(bytes[name_end - 1], 0, "name not NUL-terminated");
            let name = std::str::from_utf8(&bytes[110..name_end - 1]).unwrap().to_owned();
            let data_start = name_end.next_multiple_of(4);
            let data = bytes[data_start..data_start + filesize].to_vec();
            bytes = &bytes[(data_start + filesize).next_multiple_of(4)..];
            if name == TRAILER {
                assert!(bytes.is_empty(), "data after trailer");
                return entries;
            }
            entries.push(Entry {
                name,
                ino: field(0),
                mode: field(1),
                uid: field(2),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                data,
            });
        }
    }

    fn gunzip(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(File::open(path).unwrap()).read_to_end(&mut out).unwrap();
        out
    }

    fn sample_builder() -> InitramfsBuilder {
        let mut b = InitramfsBuilder::new();
        b.file("/bin/sh", 0o755, b"#!shell".to_vec())
            .unwrap()
            .dir("/dev", 0o755)
            .unwrap()
            .char_device("/dev/console", 0o600, 5, 1)
            .unwrap()
            .block_device("dev/vda", 0o660, 254, 0)
            .unwrap()
            .symlink("/sbin", "bin")
            .unwrap()
            .file("etc/hostname", 0o644, "guest\n")
            .unwrap();
        b
    }

    #[test]
    fn cpio_round_trip() {
        let archive = sample_builder().write_cpio(Vec::new()).unwrap();
        let entries = parse_cpio(&archive);
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/sh", "dev", "dev/console", "dev/vda", "etc", "etc/hostname", "sbin"]);
        let by_name = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by_name("bin").mode, 0o040_755);
        assert_eq!(by_name("bin").nlink, 2);
        assert_eq!(by_name("bin/sh").mode, 0o100_755);
        assert_eq!(by_name("bin/sh").data, b"#!shell");
        assert_eq!(by_name("dev/console").mode, 0o020_600);
        assert_eq!(by_name("dev/console").rdev, (5, 1));
        assert_eq!(by_name("dev/vda").mode, 0o060_660);
        assert_eq!(by_name("dev/vda").rdev, (254, 0));
        assert_eq!(by_name("sbin").mode, 0o120_777);
        assert_eq!(by_name("sbin").data, b"bin");
        assert_eq!(by_name("etc/hostname").data, b"guest\n");
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(entry.ino as usize, i + 1);
            assert_eq!((entry.uid, entry.mtime), (0, 0));
        }
    }

    #[test]
    fn output_is_deterministic_and_order_independent() {
        let mut reversed = InitramfsBuilder::new();
        reversed
            .file("etc/hostname", 0o644, "guest\n")
            .unwrap()
            .symlink("sbin", "bin")
            .unwrap()
            .block_device("dev/vda", 0o660, 254, 0)
            .unwrap()
            .char_device("dev/console", 0o600, 5, 1)
            .unwrap()
            .dir("dev", 0o755)
            .unwrap()
            .file("bin/sh", 0o755, "#!shell")
            .unwrap();
        let a = sample_builder().write_cpio(Vec::new()).unwrap();
        let b = reversed.write_cpio(Vec::new()).unwrap();
        assert_eq!(a, b);

        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("1.cpio.gz"), dir.path().join("2.cpio.gz"));
        let summary = sample_builder().write_gz(&one).unwrap();
        sample_builder().write_gz(&two).unwrap();
        assert_eq!(fs::read(&one).unwrap(), fs::read(&two).unwrap());
        assert_eq!(gunzip(&one), a);
        assert_eq!(summary.entries, 8);
        assert_eq!(summary.cpio_bytes, a.len() as u64);
        assert_eq!(summary.gzip_bytes, fs::metadata(&one).unwrap().len());
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 2, "temporary file left behind");
    }

    #[test]
    fn padding_for_every_name_and_data_length() {
        let mut b = InitramfsBuilder::new();
        for len in 1..=8 {
            b.file(&"n".repeat(len), 0o644, vec![b'x'; len]).unwrap();
        }
        let entries = parse_cpio(&b.write_cpio(Vec::new()).unwrap());
        assert_eq!(entries.len(), 8);
        for entry in entries {
            assert_eq!(entry.data.len(), entry.name.len());
        }
    }

    #[test]
    fn empty_archive_is_just_a_trailer() {
        let archive = InitramfsBuilder::new().write_cpio(Vec::new()).unwrap();
        assert_eq!(archive.len() as u64, trailer_len());
        assert!(parse_cpio(&archive).is_empty());
    }

    #[test]
    fn rejects_bad_paths_and_duplicates() {
        let mut b = InitramfsBuilder::new();
        for bad in ["", "/", "../etc", "a/../b", "./a", "a\0b", "TRAILER!!!"] {
            let err = b.file(bad, 0o644, "x").unwrap_err();
            assert!(matches!(err, InitramfsError::InvalidPath { .. }), "{bad:?}: {err}");
        }
        b.file("init", 0o755, "x").unwrap();
        let err = b.file("/init", 0o755, "y").unwrap_err();
        assert_eq!(err.to_string(), "'/init' is added to the initramfs twice");
        let err = b.file("init/x/y", 0o644, "y").unwrap_err();
        assert_eq!(err.to_string(), "cannot add 'init/x/y' to the initramfs: 'init' is not a directory");
        assert!(b.dir("init", 0o755).is_err());
        assert_eq!(b.len(), 1, "a failed add left entries behind");
        // An implicit parent can be given a mode, once.
        b.file("etc/banger/x", 0o644, "x").unwrap();
        b.dir("etc", 0o700).unwrap();
        assert!(b.dir("etc", 0o700).is_err());
        assert!(b.symlink("etc", "x").is_err());
        let entries = parse_cpio(&b.write_cpio(Vec::new()).unwrap());
        assert_eq!(entries.iter().find(|e| e.name == "etc").unwrap().mode, 0o040_700);
        assert_eq!(entries.iter().find(|e| e.name == "etc/banger").unwrap().mode, 0o040_755);
    }

    #[test]
    fn missing_host_file_is_an_error() {
        let err = InitramfsBuilder::new().file_from_host("init", 0o755, Path::new("/nonexistent/init")).unwrap_err();
        assert_eq!(err.to_string(), "cannot read /nonexistent/init to put it in the initramfs");
    }

    #[test]
    fn guest_initramfs_holds_init_modules_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("modules");
        virtio_tree(&tree);
        // A compressed module goes in decompressed.
        let overlay = tree.join("kernel/fs/overlayfs/overlay.ko");
        let raw = fs::read(&overlay).unwrap();
        fs::write(tree.join("kernel/fs/overlayfs/overlay.ko.zst"), zstd::encode_all(raw.as_slice(), 1).unwrap())
            .unwrap();
        fs::remove_file(&overlay).unwrap();
        let init = dir.path().join("agent");
        fs::write(&init, b"\x7fELF agent").unwrap();

        let release = "6.1.0-99-cloud-amd64";
        let order = ModuleIndex::scan(&tree).unwrap().load_order(&GUEST_MODULES).unwrap();
        let out = dir.path().join("initramfs.cpio.gz");
        let summary = build_guest_initramfs(&init, release, &order.modules, &out).unwrap();
        let entries = parse_cpio(&gunzip(&out));
        assert_eq!(summary.entries, entries.len());
        let find = |n: &str| entries.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("{n}"));

        assert_eq!(find("init").mode, 0o100_755);
        assert_eq!(find("init").data, b"\x7fELF agent");
        assert_eq!(find("dev/console").rdev, (5, 1));
        assert_eq!(find("tmp").mode, 0o041_777);
        let listed = String::from_utf8(find("etc/banger/modules.order").data.clone()).unwrap();
        let lines: Vec<_> = listed.lines().collect();
        assert_eq!(lines.len(), 12);
        assert_eq!(lines[0], format!("/lib/modules/{release}/kernel/drivers/virtio/virtio.ko"));
        assert!(lines.contains(&format!("/lib/modules/{release}/kernel/fs/overlayfs/overlay.ko").as_str()));
        for (line, module) in lines.iter().zip(&order.modules) {
            let entry = find(line.trim_start_matches('/'));
            assert_eq!(entry.mode, 0o100_644);
            assert_eq!(entry.data, read_module_file(&module.path).unwrap());
        }
    }

    #[test]
    fn guest_initramfs_rejects_bad_release() {
        let err = guest_initramfs(Path::new("/bin/true"), "../x", &[]).unwrap_err();
        assert!(matches!(err, InitramfsError::InvalidPath { .. }));
    }

    #[test]
    fn dynamic_programs_are_refused_as_init() {
        // This test binary is dynamically linked (tests are built without +crt-static).
        let me = std::env::current_exe().unwrap();
        let interpreter = elf_interpreter_of(&me).unwrap().expect("a dynamic test binary");
        assert!(interpreter.contains("ld-linux"), "{interpreter}");
        let err = guest_initramfs(&me, "6.1.0", &[]).unwrap_err();
        assert!(err.to_string().contains("dynamically linked") && err.to_string().contains("scripts/build-agent"));
        // Not an ELF, or a short one: nothing to say.
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None);
        assert_eq!(elf_interpreter(b"\x7fELF agent"), None);
    }

    #[test]
    fn uncompressed_names() {
        assert_eq!(uncompressed_name(Path::new("a/b.ko.xz")), Path::new("a/b.ko"));
        assert_eq!(uncompressed_name(Path::new("a/b.ko")), Path::new("a/b.ko"));
        assert_eq!(uncompressed_name(Path::new("a/b.tar.gz")), Path::new("a/b.tar.gz"));
    }
}
