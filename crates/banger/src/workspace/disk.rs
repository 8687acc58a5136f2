//! The import as a disk: for a large repository, the CLI builds an ext4 image of exactly what
//! the tar import would send and streams it to the daemon, which attaches it to the guest in a
//! spare slot (QEMU) and has the agent mount it at the workspace directory. The guest reads the
//! disk lazily instead of creating every file under emulation.
//!
//! Everything here runs as the calling user. The files go through the tar import's reader
//! ([`tarball`]: nothing outside the repository, no symlink followed, links pointing out left
//! out) into `banger vm cp`'s extractor (`files::untar`: nothing lands outside the staging
//! directory, no set-id bits), so the image holds what the tar path would unpack. `mkfs.ext4
//! -d` then copies the staging directory into a sparse image; run in a user namespace where
//! the caller is root (`unshare --map-root-user`) when they are not, so every file in the image
//! is owned by root, as the tar path leaves them. All-zero ranges are not sent.
//!
//! Small imports, and imports into a guest directory that exists already (a re-import), go by
//! tar: see [`wants_disk`].

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use banger_proto::agent::{Frame, FrameKind, MAX_PAYLOAD};
use banger_proto::workspace::{WorkspaceImported, DISK_OFFSET_BYTES, WORKSPACE_PROTOCOL};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;

use super::tarball::{self, Stats};
use crate::client::Client;
use crate::cmd::segment;

/// Imports with at least this many bytes of file contents go as a disk.
pub const DISK_MIN_BYTES: u64 = 32_000_000;
/// Imports with at least this many files go as a disk, whatever their size.
pub const DISK_MIN_FILES: u64 = 2_000;

/// Building the image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The scratch directory could not be made.
    #[error("cannot make a scratch directory in {0}")]
    Scratch(String, #[source] std::io::Error),
    /// The tar reader failed.
    #[error("cannot read the repository")]
    Tar(#[source] tarball::TarError),
    /// Staging the files failed.
    #[error("cannot stage the files")]
    Stage(#[source] crate::files::untar::UntarError),
    /// `mkfs.ext4` could not be run, or failed.
    #[error("`{command}` failed: {why}; install e2fsprogs (and util-linux's unshare)")]
    Mkfs {
        /// The command.
        command: String,
        /// What it said.
        why: String,
    },
}

/// Whether an import of `files` files holding `bytes` goes as a disk.
pub fn wants_disk(bytes: u64, files: u64) -> bool {
    bytes >= DISK_MIN_BYTES || files >= DISK_MIN_FILES
}

/// Bytes of the listed files (not following symlinks) and of `.git`: what the import carries.
pub fn measure(top: &Path, files: &[PathBuf]) -> (u64, u64) {
    let mut bytes = 0u64;
    let mut count = files.len() as u64;
    for rel in files {
        if let Ok(meta) = std::fs::symlink_metadata(top.join(rel)) {
            bytes += meta.len();
        }
    }
    let mut stack = vec![top.join(".git")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            count += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                bytes += meta.len();
            }
        }
    }
    (bytes, count)
}

/// The image size for `bytes` of contents in `entries` entries: room for them (4 KiB blocks),
/// their metadata and the journal, and as much again plus 1 GiB for the work done in the
/// guest. Sparse: only what is written uses host disk. A multiple of 1 MiB.
pub fn image_size(bytes: u64, entries: u64) -> u64 {
    let needed = bytes + entries * 4096 + (64 << 20);
    let size = needed * 2 + (1 << 30);
    size.div_ceil(1 << 20) * (1 << 20)
}

/// An image built for an import.
pub struct Built {
    /// The image file (in `scratch`).
    pub image: PathBuf,
    /// Its size.
    pub size: u64,
    /// What the tar reader put in (and left out).
    pub stats: Stats,
    /// Time spent staging the files, then running `mkfs.ext4`.
    pub took: (std::time::Duration, std::time::Duration),
}

/// Builds the image of `files` under `top` (and `.git`) in `scratch`, to be mounted at
/// `guest_dir`.
pub fn build_image(top: &Path, files: Vec<PathBuf>, guest_dir: &str, scratch: &Path) -> Result<Built, ImageError> {
    let started = std::time::Instant::now();
    let stage = scratch.join("stage");
    std::fs::create_dir(&stage).map_err(|e| ImageError::Scratch(scratch.display().to_string(), e))?;
    let (reader, writer) = std::io::pipe().map_err(|e| ImageError::Scratch(scratch.display().to_string(), e))?;
    let top2 = top.to_owned();
    let tar = std::thread::spawn(move || tarball::write_tar_under(&top2, &files, Some(Path::new("ws")), writer));
    let top_entry = crate::files::untar::Top { from: OsString::from("ws"), to: None };
    let staged = crate::files::untar::extract(reader, &stage, &top_entry);
    let stats = tar.join().map_err(|_| ImageError::Tar(tarball::TarError::Write(std::io::Error::other("panicked"))))?;
    let stats = stats.map_err(ImageError::Tar)?;
    let summary = staged.map_err(ImageError::Stage)?;
    let size = image_size(summary.bytes, summary.entries);
    let image = scratch.join("workspace.ext4");
    let staged_at = std::time::Instant::now();
    mkfs(&stage, &image, size, summary.entries, guest_dir)?;
    let took = (staged_at - started, staged_at.elapsed());
    // The image holds it all now: free the staging copy early.
    let _ = std::fs::remove_dir_all(&stage);
    Ok(Built { image, size, stats, took })
}

/// `mkfs.ext4 -d stage image`, as root in a user namespace when the caller is not root.
fn mkfs(stage: &Path, image: &Path, size: u64, entries: u64, guest_dir: &str) -> Result<(), ImageError> {
    let inodes = (entries * 2 + 16_384).to_string();
    let kib = format!("{}k", size / 1024);
    let mut args: Vec<OsString> = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        args.extend(["unshare", "--map-root-user", "--"].map(OsString::from));
    }
    args.extend(["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", &inodes, "-M", guest_dir].map(OsString::from));
    args.extend(["-E".into(), "root_owner=0:0".into(), "-d".into(), stage.into(), image.into(), kib.into()]);
    let shown = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let out = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::Mkfs { command: shown.clone(), why: e.to_string() })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(ImageError::Mkfs { command: shown, why });
    }
    Ok(())
}

/// The non-zero pieces of `file` (`size` bytes) as `Data` payloads (offset + bytes), at most
/// a frame each, handed to `send` in order; holes and all-zero pieces are skipped.
fn pieces(file: &File, size: u64, mut send: impl FnMut(Vec<u8>) -> bool) -> std::io::Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd as _;
    let max = (MAX_PAYLOAD - DISK_OFFSET_BYTES) as u64;
    let mut offset = 0u64;
    while offset < size {
        let at = i64::try_from(offset).map_err(std::io::Error::other)?;
        let start = match lseek(file.as_raw_fd(), at, Whence::SeekData) {
            Ok(start) => u64::try_from(start).map_err(std::io::Error::other)?,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = lseek(file.as_raw_fd(), i64::try_from(start).map_err(std::io::Error::other)?, Whence::SeekHole)?;
        let end = u64::try_from(end).map_err(std::io::Error::other)?.min(size);
        let mut at = start;
        while at < end {
            let len = (end - at).min(max);
            let mut piece = vec![0u8; DISK_OFFSET_BYTES + usize::try_from(len).map_err(std::io::Error::other)?];
            piece[..DISK_OFFSET_BYTES].copy_from_slice(&at.to_le_bytes());
            file.read_exact_at(&mut piece[DISK_OFFSET_BYTES..], at)?;
            if piece[DISK_OFFSET_BYTES..].iter().any(|&b| b != 0) && !send(piece) {
                return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the workspace stream ended"));
            }
            at += len;
        }
        offset = end.max(start + 1);
    }
    Ok(())
}

/// Streams `built`'s image to `vm`, attached and mounted at `dir`; the daemon's answer.
pub async fn send(client: &Client, vm: &str, dir: &str, built: &Built) -> anyhow::Result<WorkspaceImported> {
    let path = format!("/v1/vms/{}/workspace/import?dir={}&disk_bytes={}", segment(vm), segment(dir), built.size);
    let io = crate::exec::upgrade(client, &path, WORKSPACE_PROTOCOL).await?;
    let (mut rd, mut wr) = tokio::io::split(io);
    let file = File::open(&built.image).with_context(|| format!("cannot open {}", built.image.display()))?;
    let size = built.size;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let reader = tokio::task::spawn_blocking(move || pieces(&file, size, |p| tx.blocking_send(p).is_ok()));
    let sending = async {
        while let Some(piece) = rx.recv().await {
            wr.write_all(&Frame::new(1, FrameKind::Data, piece).encode()).await?;
        }
        wr.write_all(&Frame::new(1, FrameKind::Data, Vec::new()).encode()).await?;
        wr.flush().await
    };
    let answer = super::stream::final_frame::<WorkspaceImported>(&mut rd, |_| Ok(()));
    tokio::pin!(answer);
    tokio::select! {
        sent = sending => sent.context("the workspace stream broke")?,
        early = &mut answer => match early {
            Err(e) => return Err(e),
            Ok(_) => bail!("bangerd answered before the image was sent"),
        },
    }
    reader.await.context("the image reader failed")?.context("cannot read the image")?;
    answer.await
}

/// How an import should go in (`banger workspace prepare --by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum By {
    /// A disk for a large import into a new directory (at least 32 MB of contents or 2,000
    /// files), else tar.
    #[default]
    Auto,
    /// Always a tar stream.
    Tar,
    /// Always a disk (fails where a disk cannot be attached).
    Disk,
}

/// How an import went in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// A tar stream unpacked by the agent.
    Tar,
    /// An ext4 image attached as a disk.
    Disk,
}

/// Imports `files` of the repository at `top` into `dir` of `vm`: as a disk when the import
/// is large and `dir` does not exist in the guest yet, else (or when the VM has no free slot,
/// or the image cannot be built here) by tar. The daemon's answer with the entries and bytes
/// of file contents that went in, what the reader left out, and how.
pub async fn import(
    client: &Client,
    vm: &str,
    top: PathBuf,
    files: Vec<PathBuf>,
    dir: &str,
    by: By,
) -> anyhow::Result<(WorkspaceImported, Stats, Method)> {
    if by == By::Tar {
        return by_tar(client, vm, top, files, dir).await;
    }
    let measured = {
        let (top, files) = (top.clone(), files.clone());
        tokio::task::spawn_blocking(move || measure(&top, &files)).await.context("measuring the import failed")?
    };
    let fresh = match crate::files::stat(client, vm, dir).await {
        Ok(_) => false,
        Err(e) if crate::files::is_not_found(&e) => true,
        Err(e) => return Err(e),
    };
    if by == By::Disk && !fresh {
        bail!("{vm}:{dir} exists already; a disk can only be mounted at a new directory (use --by tar)");
    }
    if by == By::Auto && (!wants_disk(measured.0, measured.1) || !fresh) {
        return by_tar(client, vm, top, files, dir).await;
    }
    eprintln!("workspace: building a file system image of {} entries, {:.1} MB", measured.1, measured.0 as f64 / 1e6);
    let base = scratch_base(measured.0);
    // Dropped (removed) however this future ends: done, failed, or dropped on Ctrl-C.
    let scratch = Scratch::new(&base).with_context(|| format!("cannot make a scratch dir in {}", base.display()))?;
    let built = {
        let (top, files, dir, scratch) = (top.clone(), files.clone(), dir.to_owned(), scratch.path().to_owned());
        tokio::task::spawn_blocking(move || build_image(&top, files, &dir, &scratch)).await.context("image build")?
    };
    let built = match built {
        Ok(built) => built,
        Err(e) if by == By::Disk => return Err(e.into()),
        Err(e) => {
            eprintln!("warning: workspace: {}; importing by tar instead", banger_core::error_chain(&e));
            return by_tar(client, vm, top, files, dir).await;
        }
    };
    eprintln!(
        "workspace: staged in {} ms, image made in {} ms; attaching a {} MiB disk to {vm} at {dir}",
        built.took.0.as_millis(),
        built.took.1.as_millis(),
        built.size >> 20
    );
    match send(client, vm, dir, &built).await {
        Ok(mut done) => {
            // What went in, as the tar path counts it (the daemon counts image bytes).
            done.entries = built.stats.entries;
            done.bytes = built.stats.bytes;
            Ok((done, built.stats, Method::Disk))
        }
        Err(e) if by == By::Auto && falls_back(&e) => {
            eprintln!("workspace: {e:#}");
            by_tar(client, vm, top, files, dir).await
        }
        Err(e) => Err(e),
    }
}

/// An import's scratch directory (`banger-workspace-PID-XXXXXX`, the staging copy and the
/// image), removed when dropped. The staging thread or `mkfs` may still be writing into it then
/// (the import was dropped on Ctrl-C while they ran): removal is retried until the directory
/// itself is gone, after which nothing can be created in it.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(base: &Path) -> std::io::Result<Self> {
        let prefix = format!("banger-workspace-{}-", std::process::id());
        Ok(Self(tempfile::Builder::new().prefix(&prefix).tempdir_in(base)?))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for _ in 0..20 {
            match std::fs::remove_dir_all(self.0.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
                _ => return,
            }
        }
        eprintln!("warning: workspace: cannot remove the scratch dir {}", self.0.path().display());
    }
}

/// Where to stage and build: `/dev/shm` when it has room for twice the contents and 512 MiB
/// more (measured: copying 20,000 files there took 1.2 s where the loaded disk took 13 s),
/// else the temporary directory.
fn scratch_base(bytes: u64) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let room = nix::sys::statvfs::statvfs(shm).map(|s| s.blocks_available().saturating_mul(s.fragment_size()));
    if room.is_ok_and(|free| free >= bytes * 2 + (512 << 20)) {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// The tar import, as [`import`] answers it.
async fn by_tar(
    client: &Client,
    vm: &str,
    top: PathBuf,
    files: Vec<PathBuf>,
    dir: &str,
) -> anyhow::Result<(WorkspaceImported, Stats, Method)> {
    let (done, stats) = super::stream::import(client, vm, top, files, dir).await?;
    Ok((done, stats, Method::Tar))
}

/// Whether a failed disk import should go by tar instead: the VM has no free slot (409).
pub fn falls_back(error: &anyhow::Error) -> bool {
    error.downcast_ref::<crate::client::ApiErrorAnswer>().is_some_and(|e| e.status == hyper::StatusCode::CONFLICT)
}

#[cfg(test)]
mod tests {
    use super::super::testing::repo;
    use super::*;

    #[test]
    fn the_threshold_and_the_size_leave_room() {
        assert!(!wants_disk(1_000_000, 100));
        assert!(wants_disk(DISK_MIN_BYTES, 1));
        assert!(wants_disk(0, DISK_MIN_FILES));
        let size = image_size(200_000_000, 20_000);
        assert!(size >= 2 * 200_000_000 && size.is_multiple_of(1 << 20), "{size}");
    }

    #[test]
    fn pieces_skip_holes_and_zeros_and_carry_their_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let file = File::create(&path).expect("create");
        file.set_len(8 << 20).expect("len");
        file.write_all_at(b"head", 0).expect("write");
        file.write_all_at(&[0u8; 4096], 2 << 20).expect("zeros");
        file.write_all_at(b"tail", (8 << 20) - 4).expect("write");
        let file = File::open(&path).expect("open");
        let mut got = Vec::new();
        pieces(&file, 8 << 20, |p| {
            got.push(p);
            true
        })
        .expect("pieces");
        let mut rebuilt = vec![0u8; 8 << 20];
        for p in &got {
            let at = usize::try_from(u64::from_le_bytes(p[..8].try_into().expect("8"))).expect("fits");
            rebuilt[at..at + p.len() - 8].copy_from_slice(&p[8..]);
            assert!(p.len() <= MAX_PAYLOAD);
        }
        assert_eq!(rebuilt, std::fs::read(&path).expect("read"), "the pieces rebuild the image");
        let sent: usize = got.iter().map(|p| p.len() - 8).sum();
        assert!(sent < 4 << 20, "holes and zeros are not sent ({sent} bytes)");
    }

    /// The image holds what the tar path would unpack, owned by root, ignored files left out.
    #[test]
    fn an_image_holds_the_files_the_tar_path_sends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = repo(dir.path(), "proj");
        std::fs::write(top.join(".gitignore"), "*.log\n").expect("ignore");
        std::fs::write(top.join("debug.log"), "noise").expect("ignored");
        std::fs::write(top.join("new.txt"), "untracked\n").expect("untracked");
        std::os::unix::fs::symlink("/etc/passwd", top.join("out-link")).expect("symlink");
        let repo = super::super::Repo::discover(&top).expect("repo");
        let files = tarball::list_files(&repo).expect("list");
        let scratch = tempfile::tempdir().expect("scratch");
        let built = build_image(&repo.top, files, "/root/proj", scratch.path()).expect("image");
        assert!(built.stats.skipped.iter().any(|(p, _)| p == Path::new("out-link")), "{:?}", built.stats.skipped);
        let ls = Command::new("debugfs").args(["-R", "ls -l /"]).arg(&built.image).output().expect("debugfs");
        let listing = String::from_utf8_lossy(&ls.stdout);
        for want in ["tracked.txt", "new.txt", ".git", ".gitignore"] {
            assert!(listing.contains(want), "{want} in {listing}");
        }
        assert!(!listing.contains("debug.log") && !listing.contains("out-link"), "{listing}");
        let stat = Command::new("debugfs").args(["-R", "stat /tracked.txt"]).arg(&built.image).output().expect("stat");
        let stat = String::from_utf8_lossy(&stat.stdout);
        assert!(stat.contains("User:     0") && stat.contains("Group:     0"), "{stat}");
        assert!(!scratch.path().join("stage").exists(), "the staging copy is gone");
    }
}
