//! Work seeds: the pre-built ext4 image of `/root` that every VM's work disk starts from.
//!
//! Each image has a seed (label `banger-work`) holding the shell dotfiles of its `/etc/skel`
//! (or defaults), an empty `.ssh/authorized_keys` slot and an empty `.gitconfig` slot, all owned
//! by root, with `/` of the seed at mode 0700 (it is mounted at `/root`). A VM's work disk is a
//! clone of the seed resized to the VM's `--disk` size; its files are then written in with
//! [`write_files_into`]. Nothing here mounts anything.
//!
//! Provisioning cost does not grow with the seed's data: the seed is made with lazy inode table
//! and journal initialisation, so even a 4 GiB seed holds about 2 MiB of data; the clone is a
//! reflink where the file system has them and otherwise copies only those data extents; then the
//! file is grown and `resize2fs` (no `-f`, no `e2fsck` first: a seed and its fresh clone were
//! never mounted) grows the file system. What remains is `resize2fs`'s CPU time, which walks the
//! blocks of the *old* file system (about 2.5 ms per GiB of seed) plus a little per GiB of target
//! (64 MiB -> 2 GiB: 3 ms, -> 64 GiB: 10 ms, -> 256 GiB: 26 ms). So seeds are small
//! ([`DEFAULT_SEED_SIZE_MIB`]) and always grown: a seed made large to skip the resize would make
//! every smaller disk a shrink and every larger one a slower grow (4 GiB seed -> 2 GiB: 11 ms).
//! A disk of exactly the seed's size needs no `resize2fs` (under 1 ms). `examples/seed_bench.rs`
//! measures all of this.

pub(crate) mod copy;
mod tools;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use tools::{
    DebugfsCommand, DebugfsOutput, DebugfsRequest, FakeInode, FakeSeedTools, FsckReport, GuestPath, InodeField,
    InvalidGuestPath, LocalFile, ResizeRequest, SeedCall, SeedMkfsRequest, SeedTool, SeedToolError, SeedTools,
    StagedEntry, StagedKind, SystemSeedTools, FSCK_OUTPUT_HEAD,
};

/// File system label of seeds and work disks; the guest mounts the work disk by device.
pub const SEED_LABEL: &str = "banger-work";

/// Version of the seed layout. Store it with a seed; rebuild seeds whose version differs.
pub const SEED_FORMAT_VERSION: u32 = 1;

/// Size of a seed when the caller has no reason to pick another: work disks are grown from it.
pub const DEFAULT_SEED_SIZE_MIB: u64 = 64;

/// Smallest seed or work disk: room for the journal, the inode tables and the dotfiles.
pub const MIN_SIZE_MIB: u64 = 16;

/// Largest seed or work disk: 16 TiB.
pub const MAX_SIZE_MIB: u64 = 16 << 20;

const MIB: u64 = 1 << 20;

/// Where the dotfiles of a seed came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dotfiles {
    /// The image's `/etc/skel`, with defaults for `.bashrc` and `.profile` if it lacks them.
    Skel,
    /// banger's defaults.
    Defaults,
}

/// A seed made by [`build_work_seed`] or [`build_seed_from_image`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedInfo {
    /// The seed image.
    pub path: PathBuf,
    /// Its file system size in MiB.
    pub size_mib: u64,
    /// Where its dotfiles came from.
    pub dotfiles: Dotfiles,
    /// Paths of the seed (like `/.bashrc`), sorted.
    pub files: Vec<String>,
    /// Entries of the skeleton left out: names `debugfs` cannot take safely, devices, sockets.
    pub skipped: Vec<String>,
}

/// How [`clone_work_disk_with`] may copy the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyPolicy {
    /// A reflink if the file system supports it, else a sparse copy.
    #[default]
    ReflinkOrCopy,
    /// Always a sparse copy (for tests and measurements).
    SparseCopy,
}

/// How a work disk got the seed's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// `FICLONE`: the blocks are shared until written.
    Reflink,
    /// The seed's data extents were copied; holes stayed holes.
    SparseCopy,
}

/// What `resize2fs` did to a work disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// The seed already had the requested size.
    None,
    /// The file system was grown.
    Grow,
    /// The file system was shrunk.
    Shrink,
}

/// What [`clone_work_disk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneReport {
    /// How the seed was copied.
    pub method: CloneMethod,
    /// Bytes copied (0 for a reflink).
    pub bytes_copied: u64,
    /// What the resize did.
    pub resize: Resize,
    /// Wall time of the whole clone.
    pub elapsed: Duration,
    /// Of which `resize2fs`.
    pub resize_elapsed: Duration,
}

/// A file to put into an ext4 image with [`write_files_into`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile<'a> {
    /// Absolute path inside the image (the work disk's `/` is the guest's `/root`).
    pub path: &'a str,
    /// Contents.
    pub contents: &'a [u8],
    /// Permission bits (at most `0o7777`).
    pub mode: u32,
}

/// What went wrong making, cloning or writing into a work seed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The size is out of range.
    #[error("work disk size {size_mib} MiB is out of range; use {MIN_SIZE_MIB} MiB to {MAX_SIZE_MIB} MiB")]
    InvalidSize {
        /// The requested size.
        size_mib: u64,
    },
    /// A guest path cannot be written safely.
    #[error(transparent)]
    InvalidPath(#[from] InvalidGuestPath),
    /// The mode has bits beyond the permission bits.
    #[error("mode {mode:#o} for '{path}' is not a permission mode; use at most 0o7777")]
    InvalidMode {
        /// The guest path.
        path: String,
        /// The mode.
        mode: u32,
    },
    /// The file is not an ext4 image.
    #[error("{} is not an ext4 image", path.display())]
    NotExt4 {
        /// The file.
        path: PathBuf,
    },
    /// The seed's file system is not clean.
    #[error("{} is not a clean ext4 file system; rebuild the seed", path.display())]
    NotClean {
        /// The seed.
        path: PathBuf,
    },
    /// The image's file system is not clean or not of the expected size.
    #[error("{} is not a clean ext4 file system of {expected_mib} MiB after {step}; check e2fsprogs and rebuild the seed", path.display())]
    BadResult {
        /// The image.
        path: PathBuf,
        /// The size it should have.
        expected_mib: u64,
        /// What ran last.
        step: &'static str,
    },
    /// The destination exists.
    #[error("{} already exists; delete it first", path.display())]
    Exists {
        /// The destination.
        path: PathBuf,
    },
    /// A host tool failed.
    #[error("{step} failed")]
    Tool {
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: SeedToolError,
    },
    /// Something other than a regular file is at the path, or a file where a directory should be.
    #[error("cannot write '{path}' into {}: {detail}", image.display())]
    InTheWay {
        /// The image.
        image: PathBuf,
        /// The guest path.
        path: String,
        /// What is in the way.
        detail: String,
    },
    /// `debugfs` ran but the file is not as asked.
    #[error("writing '{path}' into {} did not take effect: {detail}", image.display())]
    NotWritten {
        /// The image.
        image: PathBuf,
        /// The guest path.
        path: String,
        /// What was found, and what `debugfs` said.
        detail: String,
    },
    /// Reading or writing a host file failed.
    #[error("cannot access {}; check that the directory is writable and has space", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SeedError {
    let path = path.to_owned();
    move |source| SeedError::Io { path, source }
}

fn check_size(size_mib: u64) -> Result<(), SeedError> {
    if (MIN_SIZE_MIB..=MAX_SIZE_MIB).contains(&size_mib) {
        Ok(())
    } else {
        Err(SeedError::InvalidSize { size_mib })
    }
}

/// The directory a file is in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// The fields of an ext4 superblock the seed code checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Superblock {
    bytes: u64,
    clean: bool,
}

/// The superblock of `image`; `None` if it is not ext4.
fn read_superblock(image: &Path) -> io::Result<Option<Superblock>> {
    let mut superblock = [0u8; 1024];
    let mut file = File::open(image)?;
    io::copy(&mut (&mut file).take(1024), &mut io::sink())?;
    if file.read_exact(&mut superblock).is_err() {
        return Ok(None);
    }
    let u16_at = |at: usize| u16::from_le_bytes([superblock[at], superblock[at + 1]]);
    let u32_at =
        |at: usize| u32::from_le_bytes([superblock[at], superblock[at + 1], superblock[at + 2], superblock[at + 3]]);
    const VALID_FS: u16 = 1;
    const ERROR_FS: u16 = 2;
    const INCOMPAT_RECOVER: u32 = 0x4;
    const INCOMPAT_64BIT: u32 = 0x80;
    if u16_at(0x38) != 0xEF53 {
        return Ok(None);
    }
    let (state, incompat, log_block) = (u16_at(0x3a), u32_at(0x60), u32_at(0x18));
    let high = if incompat & INCOMPAT_64BIT != 0 { u64::from(u32_at(0x150)) } else { 0 };
    let blocks = high << 32 | u64::from(u32_at(0x04));
    let bytes = blocks.saturating_mul(1024u64 << log_block.min(6));
    let clean = state & VALID_FS != 0 && state & ERROR_FS == 0 && incompat & INCOMPAT_RECOVER == 0;
    Ok(Some(Superblock { bytes, clean }))
}

fn superblock_of(image: &Path) -> Result<Superblock, SeedError> {
    read_superblock(image).map_err(io_error(image))?.ok_or_else(|| SeedError::NotExt4 { path: image.to_owned() })
}

/// Checks that `image` is a clean ext4 file system of `size_mib`.
fn verify(image: &Path, size_mib: u64, step: &'static str) -> Result<(), SeedError> {
    let superblock = superblock_of(image)?;
    if superblock.clean && superblock.bytes == size_mib * MIB {
        Ok(())
    } else {
        Err(SeedError::BadResult { path: image.to_owned(), expected_mib: size_mib, step })
    }
}

const DEFAULT_BASHRC: &str = r#"# ~/.bashrc: executed by bash(1) for non-login shells.

# If not running interactively, don't do anything.
case $- in
    *i*) ;;
      *) return;;
esac

HISTCONTROL=ignoreboth
HISTSIZE=10000
HISTFILESIZE=20000
shopt -s histappend checkwinsize

PS1='\u@\h:\w\$ '
alias ls='ls --color=auto'
alias ll='ls -alF'
alias grep='grep --color=auto'
"#;

const DEFAULT_PROFILE: &str = r#"# ~/.profile: executed by the command interpreter for login shells.

if [ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ]; then
    . "$HOME/.bashrc"
fi

if [ -d "$HOME/.local/bin" ]; then
    PATH="$HOME/.local/bin:$PATH"
fi
"#;

/// Top-level names the seed owns whatever the skeleton holds.
const SLOTS: [&str; 2] = [".ssh", ".gitconfig"];

/// The staged `/root` tree: its guest paths (for the ownership fix-up) and what was skipped.
#[derive(Debug, Default)]
struct Staged {
    paths: Vec<GuestPath>,
    skipped: Vec<String>,
}

/// Copies the skeleton `skel` into `root`, without following symbolic links, leaving out names a
/// `debugfs` script cannot take and anything but directories, files and symbolic links.
fn copy_skel(skel: &Path, root: &Path, staged: &mut Staged) -> io::Result<()> {
    let mut stack = vec![(skel.to_owned(), root.to_owned(), GuestPath::root())];
    while let Some((from_dir, to_dir, guest_dir)) = stack.pop() {
        let mut entries = fs::read_dir(&from_dir)?.collect::<io::Result<Vec<_>>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let shown = || format!("{}/{}", guest_dir.as_str().trim_end_matches('/'), name.to_string_lossy());
            let Some(text) = name.to_str() else {
                staged.skipped.push(shown());
                continue;
            };
            if guest_dir == GuestPath::root() && SLOTS.contains(&text) {
                continue;
            }
            let Ok(guest) = guest_dir.join(text) else {
                staged.skipped.push(shown());
                continue;
            };
            let (from, to) = (entry.path(), to_dir.join(&name));
            let meta = fs::symlink_metadata(&from)?;
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_dir() {
                fs::create_dir(&to)?;
                fs::set_permissions(&to, fs::Permissions::from_mode(mode | 0o700))?;
                stack.push((from, to, guest.clone()));
            } else if meta.is_file() {
                fs::copy(&from, &to)?;
                fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
            } else if meta.file_type().is_symlink() {
                symlink(fs::read_link(&from)?, &to)?;
            } else {
                staged.skipped.push(shown());
                continue;
            }
            staged.paths.push(guest);
        }
    }
    Ok(())
}

/// Writes `contents` to `root/name` with `mode` and records it.
fn stage_file(root: &Path, name: &str, contents: &[u8], mode: u32, staged: &mut Staged) -> io::Result<()> {
    let path = root.join(name);
    fs::write(&path, contents)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    staged.paths.push(GuestPath::new(&format!("/{name}")).map_err(io::Error::other)?);
    Ok(())
}

/// Stages the seed's `/root` tree in `root` (which must not exist).
fn stage_tree(skel: Option<&Path>, root: &Path) -> io::Result<Staged> {
    let mut staged = Staged::default();
    fs::create_dir(root)?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
    if let Some(skel) = skel {
        copy_skel(skel, root, &mut staged)?;
    }
    for (name, contents) in [(".bashrc", DEFAULT_BASHRC), (".profile", DEFAULT_PROFILE)] {
        if fs::symlink_metadata(root.join(name)).is_err() {
            stage_file(root, name, contents.as_bytes(), 0o644, &mut staged)?;
        }
    }
    let ssh = root.join(".ssh");
    fs::create_dir(&ssh)?;
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))?;
    staged.paths.push(GuestPath::new("/.ssh").map_err(io::Error::other)?);
    stage_file(root, ".ssh/authorized_keys", b"", 0o600, &mut staged)?;
    stage_file(root, ".gitconfig", b"", 0o644, &mut staged)?;
    staged.paths.sort();
    Ok(staged)
}

/// The skeleton directory to use: `skel` if it is a real directory (not a symbolic link).
fn usable_skel(skel: Option<&Path>) -> Option<&Path> {
    skel.filter(|dir| fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()))
}

/// Builds a work seed of `size_mib` at `out` (replacing it) from the skeleton directory `skel`
/// (an image's `/etc/skel`; `None`, a missing path or a symbolic link means banger's defaults).
///
/// The tree is staged next to `out`, put in the image with `mkfs.ext4 -d`, owned by root with
/// `debugfs` (so the build needs no root), and the image renamed into place when complete.
pub fn build_work_seed(
    tools: &dyn SeedTools,
    skel: Option<&Path>,
    out: &Path,
    size_mib: u64,
) -> Result<SeedInfo, SeedError> {
    check_size(size_mib)?;
    let parent = parent_dir(out);
    let staging = tempfile::Builder::new().prefix(".seed-").tempdir_in(parent).map_err(io_error(parent))?;
    let root = staging.path().join("root");
    let skel = usable_skel(skel);
    let staged = stage_tree(skel, &root).map_err(io_error(&root))?;

    let image = staging.path().join("seed.ext4");
    let mkfs = SeedMkfsRequest { dir: root.clone(), image: image.clone(), label: SEED_LABEL.to_owned(), size_mib };
    tools.mkfs_ext4_from_dir(&mkfs).map_err(|source| SeedError::Tool { step: "making the work seed", source })?;

    // mkfs.ext4 -d copies owners from the staged tree (ours, not root's unless we are root) and
    // leaves `/` at 0755; the guest's /root must be root's and 0700.
    let mut commands =
        vec![DebugfsCommand::SetInodeField { path: GuestPath::root(), field: InodeField::Mode, value: 0o040_700 }];
    for path in std::iter::once(GuestPath::root()).chain(staged.paths.iter().cloned()) {
        commands.push(DebugfsCommand::SetInodeField { path: path.clone(), field: InodeField::Uid, value: 0 });
        commands.push(DebugfsCommand::SetInodeField { path, field: InodeField::Gid, value: 0 });
    }
    let absolute = std::path::absolute(&image).map_err(io_error(&image))?;
    let request = DebugfsRequest { image: absolute, writable: true, scratch: staging.path().to_owned(), commands };
    let output =
        tools.debugfs(&request).map_err(|source| SeedError::Tool { step: "setting the seed's owners", source })?;
    if !output.stderr.trim().is_empty() {
        return Err(SeedError::NotWritten {
            image: image.clone(),
            path: "/".to_owned(),
            detail: output.stderr.trim().to_owned(),
        });
    }
    verify(&image, size_mib, "mkfs.ext4")?;

    fs::rename(&image, out).map_err(io_error(out))?;
    let dotfiles = if skel.is_some() { Dotfiles::Skel } else { Dotfiles::Defaults };
    let files = staged.paths.iter().map(|p| p.as_str().to_owned()).collect();
    tracing::info!(seed = %out.display(), size_mib, ?dotfiles, "work seed built");
    Ok(SeedInfo { path: out.to_owned(), size_mib, dotfiles, files, skipped: staged.skipped })
}

/// Builds a work seed at `out` from the `/etc/skel` of the unmounted ext4 image `rootfs_ext4`
/// (read with `debugfs rdump`), or from defaults if it has none. This gives seeds to images made
/// before seeds existed.
pub fn build_seed_from_image(
    tools: &dyn SeedTools,
    rootfs_ext4: &Path,
    out: &Path,
    size_mib: u64,
) -> Result<SeedInfo, SeedError> {
    check_size(size_mib)?;
    superblock_of(rootfs_ext4)?;
    let parent = parent_dir(out);
    let scratch = tempfile::Builder::new().prefix(".skel-").tempdir_in(parent).map_err(io_error(parent))?;
    let image = std::path::absolute(rootfs_ext4).map_err(io_error(rootfs_ext4))?;
    let etc_skel = GuestPath::new("/etc/skel")?;
    let request = DebugfsRequest {
        image,
        writable: false,
        scratch: scratch.path().to_owned(),
        commands: vec![DebugfsCommand::Rdump(etc_skel)],
    };
    let output = tools
        .debugfs(&request)
        .map_err(|source| SeedError::Tool { step: "reading /etc/skel from the image", source })?;
    let skel = scratch.path().join("skel");
    if !output.stderr.trim().is_empty() {
        // Most often "/etc/skel: File not found"; anything else loses dotfiles, not the seed.
        tracing::debug!(image = %rootfs_ext4.display(), stderr = %output.stderr.trim(), "rdump /etc/skel");
    }
    build_work_seed(tools, Some(&skel), out, size_mib)
}

/// Copies the disk image `src` to `dest` (which must not exist) as it is: a reflink where the
/// file system can, else a copy of its data extents (holes stay holes). Written to a temporary
/// name beside `dest` and renamed into place. Returns how, and the bytes copied.
pub fn copy_disk(src: &Path, dest: &Path) -> Result<(CloneMethod, u64), SeedError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(SeedError::Exists { path: dest.to_owned() });
    }
    let parent = parent_dir(dest);
    let temp =
        tempfile::Builder::new().prefix(".disk-").suffix(".tmp").tempfile_in(parent).map_err(io_error(parent))?;
    let source = File::open(src).map_err(io_error(src))?;
    let result = if copy::reflink(&source, temp.as_file()).map_err(io_error(temp.path()))? {
        (CloneMethod::Reflink, 0)
    } else {
        (CloneMethod::SparseCopy, copy::sparse_copy(&source, temp.as_file()).map_err(io_error(temp.path()))?)
    };
    temp.persist_noclobber(dest).map_err(|e| match e.error.kind() {
        io::ErrorKind::AlreadyExists => SeedError::Exists { path: dest.to_owned() },
        _ => SeedError::Io { path: dest.to_owned(), source: e.error },
    })?;
    Ok(result)
}

/// Clones the seed into a new work disk at `dest` of `size_mib`, reflinking where possible.
/// See [`clone_work_disk_with`].
pub fn clone_work_disk(
    tools: &dyn SeedTools,
    seed: &Path,
    dest: &Path,
    size_mib: u64,
) -> Result<CloneReport, SeedError> {
    clone_work_disk_with(tools, seed, dest, size_mib, CopyPolicy::ReflinkOrCopy)
}

/// Clones the seed into a new work disk at `dest` (which must not exist) and resizes its file
/// system to `size_mib`: copy to a temporary name next to `dest`, grow the file and `resize2fs`
/// (or `resize2fs` and shrink the file), check the superblock, rename into place.
pub fn clone_work_disk_with(
    tools: &dyn SeedTools,
    seed: &Path,
    dest: &Path,
    size_mib: u64,
    policy: CopyPolicy,
) -> Result<CloneReport, SeedError> {
    let started = Instant::now();
    check_size(size_mib)?;
    let superblock = superblock_of(seed)?;
    if !superblock.clean {
        return Err(SeedError::NotClean { path: seed.to_owned() });
    }
    if fs::symlink_metadata(dest).is_ok() {
        return Err(SeedError::Exists { path: dest.to_owned() });
    }
    let parent = parent_dir(dest);
    let temp =
        tempfile::Builder::new().prefix(".work-").suffix(".tmp").tempfile_in(parent).map_err(io_error(parent))?;
    let source = File::open(seed).map_err(io_error(seed))?;

    let copied = match policy {
        CopyPolicy::ReflinkOrCopy => copy::reflink(&source, temp.as_file()).map_err(io_error(temp.path()))?,
        CopyPolicy::SparseCopy => false,
    };
    let (method, bytes_copied) = if copied {
        (CloneMethod::Reflink, 0)
    } else {
        (CloneMethod::SparseCopy, copy::sparse_copy(&source, temp.as_file()).map_err(io_error(temp.path()))?)
    };

    let target = size_mib * MIB;
    let resize = match target.cmp(&superblock.bytes) {
        std::cmp::Ordering::Equal => Resize::None,
        std::cmp::Ordering::Greater => Resize::Grow,
        std::cmp::Ordering::Less => Resize::Shrink,
    };
    let set_len = |len| temp.as_file().set_len(len).map_err(io_error(temp.path()));
    let resize_started = Instant::now();
    if resize == Resize::Grow {
        set_len(target)?;
    }
    if resize != Resize::None {
        let request = ResizeRequest { image: temp.path().to_owned(), size_mib, checked: false };
        tools.resize2fs(&request).map_err(|source| SeedError::Tool { step: "resizing the work disk", source })?;
    }
    let resize_elapsed = resize_started.elapsed();
    set_len(target)?;
    verify(temp.path(), size_mib, "resize2fs")?;

    temp.persist_noclobber(dest).map_err(|e| match e.error.kind() {
        io::ErrorKind::AlreadyExists => SeedError::Exists { path: dest.to_owned() },
        _ => SeedError::Io { path: dest.to_owned(), source: e.error },
    })?;
    let report = CloneReport { method, bytes_copied, resize, elapsed: started.elapsed(), resize_elapsed };
    tracing::debug!(disk = %dest.display(), size_mib, ?report, "work disk cloned");
    Ok(report)
}

/// Writes one file into the unmounted ext4 `image` (not in use by a VM) with `debugfs -w`,
/// replacing it if present, owned by root with `mode`. See [`write_files_into`].
pub fn write_file_into(
    tools: &dyn SeedTools,
    image: &Path,
    guest_path: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), SeedError> {
    write_files_into(tools, image, &[GuestFile { path: guest_path, contents, mode }])
}

/// The type and permission bits, owner, group and size `debugfs stat` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
}

/// Parses the output of one `debugfs stat`.
fn parse_stat(text: &str) -> Option<Stat> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
    Some(Stat {
        kind: after("Type:")?.to_owned(),
        mode: u32::from_str_radix(after("Mode:")?, 8).ok()?,
        uid: after("User:")?.parse().ok()?,
        gid: after("Group:")?.parse().ok()?,
        size: after("Size:")?.parse().ok()?,
    })
}

/// The output of each command of a `debugfs -f` run, in order.
fn command_outputs(stdout: &str) -> Vec<String> {
    let mut outputs: Vec<String> = Vec::new();
    for line in stdout.lines() {
        if line.starts_with("debugfs: ") {
            outputs.push(String::new());
        } else if let Some(last) = outputs.last_mut() {
            last.push_str(line);
            last.push('\n');
        }
    }
    outputs
}

/// Runs `stat` on each path (read-only) and returns what each is; `None` for missing paths.
fn probe(
    tools: &dyn SeedTools,
    request: &mut DebugfsRequest,
    paths: &[GuestPath],
) -> Result<Vec<Option<Stat>>, SeedError> {
    request.writable = false;
    request.commands = paths.iter().cloned().map(DebugfsCommand::Stat).collect();
    let output = tools.debugfs(request).map_err(|source| SeedError::Tool { step: "reading the image", source })?;
    let outputs = command_outputs(&output.stdout);
    Ok((0..paths.len()).map(|i| outputs.get(i).and_then(|text| parse_stat(text))).collect())
}

/// Writes files into the unmounted ext4 `image` (not in use by a VM) with one `debugfs -w` run,
/// each replacing any regular file at its path, owned by uid/gid 0 with its mode; missing parent
/// directories are made (0755, root's).
///
/// `debugfs` goes on after a failed command and reports it only on standard error, and some
/// failures are harmful (`mkdir` of an existing name leaks an inode; `set_inode_field` after a
/// failed `write` would retype whatever is at the path). So a read-only run first finds what
/// exists, the write run holds only commands that apply, and a last read-only run checks each
/// file's type, mode, owner and contents.
pub fn write_files_into(tools: &dyn SeedTools, image: &Path, files: &[GuestFile<'_>]) -> Result<(), SeedError> {
    let mut paths: Vec<GuestPath> = Vec::with_capacity(files.len());
    for file in files {
        let path = GuestPath::new(file.path)?;
        let invalid = |reason| SeedError::from(InvalidGuestPath { path: file.path.to_owned(), reason });
        if path == GuestPath::root() {
            return Err(invalid("it is the root directory"));
        }
        if paths.contains(&path) {
            return Err(invalid("it is given twice"));
        }
        if files.iter().any(|other| other.path.starts_with(&format!("{}/", file.path))) {
            return Err(invalid("it is also the directory of another file"));
        }
        if file.mode > 0o7777 {
            return Err(SeedError::InvalidMode { path: file.path.to_owned(), mode: file.mode });
        }
        paths.push(path);
    }
    superblock_of(image)?;
    let absolute = std::path::absolute(image).map_err(io_error(image))?;
    let parent = parent_dir(&absolute);
    let scratch = tempfile::Builder::new().prefix(".write-").tempdir_in(parent).map_err(io_error(parent))?;
    let mut request =
        DebugfsRequest { image: absolute, writable: false, scratch: scratch.path().to_owned(), commands: Vec::new() };
    let not_written = |path: &GuestPath, detail: String| SeedError::NotWritten {
        image: image.to_owned(),
        path: path.as_str().to_owned(),
        detail,
    };

    let in_the_way = |path: &GuestPath, detail: String| SeedError::InTheWay {
        image: image.to_owned(),
        path: path.as_str().to_owned(),
        detail,
    };
    let describe = |stat: &Stat| match stat.kind.as_str() {
        "regular" => "regular file".to_owned(),
        "symlink" => "symbolic link".to_owned(),
        other => other.to_owned(),
    };

    let mut dirs: Vec<GuestPath> = paths.iter().flat_map(GuestPath::ancestors).collect();
    dirs.sort();
    dirs.dedup();
    let probed = probe(tools, &mut request, &[dirs.as_slice(), paths.as_slice()].concat())?;
    let (dir_stats, file_stats) = probed.split_at(dirs.len());

    let mut commands = Vec::new();
    // Sorted, so parents come before their children.
    for (dir, stat) in dirs.iter().zip(dir_stats) {
        match stat {
            None => commands.push(DebugfsCommand::Mkdir(dir.clone())),
            Some(stat) if stat.kind == "directory" => {}
            Some(stat) => return Err(in_the_way(dir, format!("'{dir}' is a {}, not a directory", describe(stat)))),
        }
    }
    for (index, ((file, path), stat)) in files.iter().zip(&paths).zip(file_stats).enumerate() {
        match stat {
            None => {}
            Some(stat) if stat.kind == "regular" => commands.push(DebugfsCommand::Rm(path.clone())),
            Some(stat) => return Err(in_the_way(path, format!("a {} is in the way", describe(stat)))),
        }
        let local = LocalFile(u32::try_from(index).unwrap_or(u32::MAX));
        let local_path = scratch.path().join(local.name());
        // The scratch directory is 0700 already; the contents may be secrets all the same.
        File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&local_path)
            .and_then(|mut f| f.write_all(file.contents))
            .map_err(io_error(&local_path))?;
        commands.push(DebugfsCommand::Write { local, guest: path.clone() });
        let sif = |field, value| DebugfsCommand::SetInodeField { path: path.clone(), field, value };
        commands.extend([
            sif(InodeField::Mode, 0o100_000 | file.mode),
            sif(InodeField::Uid, 0),
            sif(InodeField::Gid, 0),
        ]);
    }
    request.writable = true;
    request.commands = commands;
    let written =
        tools.debugfs(&request).map_err(|source| SeedError::Tool { step: "writing into the image", source })?;

    // Check with a fresh read-only open, so what is checked is what reached the file.
    request.writable = false;
    request.commands = Vec::new();
    let checks: Vec<LocalFile> =
        (0..paths.len()).map(|i| LocalFile(u32::try_from(i + files.len()).unwrap_or(u32::MAX))).collect();
    for (path, check) in paths.iter().zip(&checks) {
        request.commands.push(DebugfsCommand::Stat(path.clone()));
        request.commands.push(DebugfsCommand::Dump { guest: path.clone(), local: *check });
    }
    let read = tools.debugfs(&request).map_err(|source| SeedError::Tool { step: "reading back the image", source })?;
    let outputs = command_outputs(&read.stdout);
    for (index, ((file, path), check)) in files.iter().zip(&paths).zip(&checks).enumerate() {
        let want = Stat {
            kind: "regular".to_owned(),
            mode: file.mode,
            uid: 0,
            gid: 0,
            size: u64::try_from(file.contents.len()).unwrap_or(u64::MAX),
        };
        let got = outputs.get(index * 2).and_then(|text| parse_stat(text));
        let dumped = fs::read(scratch.path().join(check.name())).ok();
        if got.as_ref() != Some(&want) || dumped.as_deref() != Some(file.contents) {
            let found = match got {
                Some(s) => format!("{} file, mode {:04o}, owner {}:{}, {} bytes", s.kind, s.mode, s.uid, s.gid, s.size),
                None => "no file".to_owned(),
            };
            let said = written.stderr.lines().chain(read.stderr.lines()).collect::<Vec<_>>().join("; ");
            return Err(not_written(path, format!("found {found} (debugfs: {said})")));
        }
    }
    if !written.stderr.trim().is_empty() {
        // Everything checked out; still worth knowing.
        tracing::warn!(image = %image.display(), stderr = %written.stderr.trim(), "debugfs complained while writing");
    }
    Ok(())
}

/// What [`read_files_from`] found at one path of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRead {
    /// Nothing is there.
    Missing,
    /// Something other than a regular file (a directory, a symbolic link) is there.
    NotRegular,
    /// A regular file larger than the cap: it was not read.
    TooLarge {
        /// Its size, as its inode says.
        size: u64,
    },
    /// A regular file within the cap, and its contents.
    Contents(Vec<u8>),
}

impl GuestRead {
    /// The contents, if the file was read.
    pub fn contents(&self) -> Option<&[u8]> {
        match self {
            Self::Contents(bytes) => Some(bytes),
            _ => None,
        }
    }
}

/// Reads files out of the unmounted ext4 `image` (not in use by a VM) with read-only `debugfs`
/// runs, in the order of `paths`. The image may be guest-written, so sizes are checked before
/// anything is read: a first run `stat`s every path, and only regular files of at most
/// `max_bytes` are dumped (a sparse 20 GiB file is never copied to the host); each dumped
/// file's size is checked again before it is read.
pub fn read_files_from(
    tools: &dyn SeedTools,
    image: &Path,
    paths: &[&str],
    max_bytes: u64,
) -> Result<Vec<GuestRead>, SeedError> {
    let guest = paths.iter().map(|p| GuestPath::new(p)).collect::<Result<Vec<_>, _>>()?;
    superblock_of(image)?;
    let absolute = std::path::absolute(image).map_err(io_error(image))?;
    let parent = parent_dir(&absolute);
    let scratch = tempfile::Builder::new().prefix(".read-").tempdir_in(parent).map_err(io_error(parent))?;
    let mut request =
        DebugfsRequest { image: absolute, writable: false, scratch: scratch.path().to_owned(), commands: Vec::new() };
    let stats = probe(tools, &mut request, &guest)?;
    let mut found: Vec<GuestRead> = stats
        .iter()
        .map(|stat| match stat {
            None => GuestRead::Missing,
            Some(stat) if stat.kind != "regular" => GuestRead::NotRegular,
            Some(stat) if stat.size > max_bytes => GuestRead::TooLarge { size: stat.size },
            Some(_) => GuestRead::Contents(Vec::new()),
        })
        .collect();
    let local = |i: usize| LocalFile(u32::try_from(i).unwrap_or(u32::MAX));
    request.commands = guest
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(found[*i], GuestRead::Contents(_)))
        .map(|(i, path)| DebugfsCommand::Dump { guest: path.clone(), local: local(i) })
        .collect();
    if request.commands.is_empty() {
        return Ok(found);
    }
    tools.debugfs(&request).map_err(|source| SeedError::Tool { step: "reading the image", source })?;
    for (i, read) in found.iter_mut().enumerate() {
        if !matches!(read, GuestRead::Contents(_)) {
            continue;
        }
        let file = scratch.path().join(local(i).name());
        *read = match fs::metadata(&file) {
            Ok(meta) if meta.len() > max_bytes => GuestRead::TooLarge { size: meta.len() },
            Ok(_) => GuestRead::Contents(fs::read(&file).map_err(io_error(&file))?),
            Err(_) => GuestRead::Missing,
        };
    }
    Ok(found)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests;
