//! Memory returned to the host: a `virtio-balloon` device with free page reporting (QEMU).
//!
//! The guest's balloon driver reports free blocks of memory (2 MiB, a while after they were
//! freed); QEMU discards them (`fallocate(PUNCH_HOLE)` on the memory file, `madvise(DONTNEED)`
//! on anonymous memory), so the host gets them back, and a page the guest touches again is a
//! fresh zero page. The guest keeps all of its memory: nothing is taken away, only idle pages.
//!
//! **A fork must not discard into its snapshot.** A fork maps its snapshot's memory file
//! privately (see [`crate::memfile`]), and QEMU 7.2 discards a private file mapping by punching
//! holes into the file itself, which every fork of that snapshot, and the snapshot, read. A
//! hostile guest could wipe its siblings' memory that way. So a fork whose snapshot has a
//! balloon maps a **write-sealed memfd** holding the snapshot's memory instead
//! ([`SealedMemory`]): the kernel refuses every punch into it (`EPERM`), QEMU logs the refusal
//! and moves on, and the fork keeps the memory it touched (forks get nothing back on this
//! QEMU). One memfd serves every fork of a snapshot, so clean pages are still shared; it lives
//! while the daemon holds it and any fork maps it.
//!
//! Which devices a saved guest has is written beside its state
//! ([`crate::snapshot_devices_file`]): a restore must give it exactly those, or QEMU refuses
//! the state. States without that file were saved before the balloon and restore without one.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use tokio::sync::OnceCell;

/// What [`crate::snapshot_devices_file`] says for a guest with a balloon.
pub const BALLOON_MARK: &str = "balloon";

/// QEMU's device for a balloon with free page reporting on `microvm` (virtio-mmio).
pub const QEMU_DEVICE: &str = "virtio-balloon-device,free-page-reporting=on";

/// Whether the saved guest at `state` has a balloon (its devices file says so). A missing file
/// is a state saved without one; an unreadable one is an error.
pub fn state_has_balloon(state: &Path) -> io::Result<bool> {
    match std::fs::read_to_string(crate::snapshot_devices_file(state)) {
        Ok(text) => Ok(text.lines().any(|line| line.trim() == BALLOON_MARK)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Records beside `state` that its guest has a balloon (mode 0600, replacing any old file).
pub fn mark_state(state: &Path) -> io::Result<()> {
    std::fs::write(crate::snapshot_devices_file(state), format!("{BALLOON_MARK}\n"))
}

/// The memfd's name: `/proc/PID/fd` links of a process that maps one read
/// `/memfd:banger-snapshot-memory (deleted)`.
const MEMFD_NAME: &std::ffi::CStr = c"banger-snapshot-memory";

/// Whether an open file's link target is a sealed snapshot memory copy.
pub(crate) fn is_snapshot_memory(target: &str) -> bool {
    let target = target.strip_suffix(" (deleted)").unwrap_or(target);
    target.strip_prefix("/memfd:").map(str::as_bytes) == Some(MEMFD_NAME.to_bytes())
}

/// How much a fill reads at once.
const CHUNK: usize = 1 << 20;

/// One snapshot memory file's sealed copy.
struct Slot {
    /// The file it was made from, kept open to see when its last name goes.
    source: File,
    /// The sealed memfd, made by the first fork that asks.
    memfd: OnceCell<Arc<OwnedFd>>,
}

/// Write-sealed memfd copies of snapshot memory files, one per file (by device and inode: the
/// hard links a fork's restore state is made of share one), for forks with a balloon.
#[derive(Default)]
pub struct SealedMemory {
    slots: Mutex<HashMap<(u64, u64), Arc<Slot>>>,
}

impl std::fmt::Debug for SealedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedMemory").finish_non_exhaustive()
    }
}

impl SealedMemory {
    /// A path QEMU can open as `memory` (a snapshot memory file) sealed against writes and
    /// hole punching: `/proc/<daemon>/fd/<memfd>`. The memfd stays open here while any name of
    /// `memory` exists, so the path holds until the fork restoring it has mapped it (its restore
    /// state is such a name).
    pub async fn path_for(&self, memory: &Path) -> io::Result<PathBuf> {
        let source = File::open(memory)?;
        let meta = source.metadata()?;
        let slot = {
            let mut slots = self.slots.lock().map_err(|_| io::Error::other("sealed memory lock poisoned"))?;
            release_unused(&mut slots);
            Arc::clone(
                slots
                    .entry((meta.dev(), meta.ino()))
                    .or_insert_with(|| Arc::new(Slot { source, memfd: OnceCell::new() })),
            )
        };
        let memfd = slot
            .memfd
            .get_or_try_init(|| async {
                let source = slot.source.try_clone()?;
                let filled = tokio::task::spawn_blocking(move || sealed_copy(&source)).await;
                filled.map_err(io::Error::other)?.map(Arc::new)
            })
            .await?;
        Ok(PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), memfd.as_raw_fd())))
    }

    /// Drops the copies of files whose last name is gone: they serve nobody new (forks that
    /// map one keep it mapped).
    pub fn release_unused(&self) {
        if let Ok(mut slots) = self.slots.lock() {
            release_unused(&mut slots);
        }
    }

    /// How many sealed copies are held.
    pub fn len(&self) -> usize {
        self.slots.lock().map(|slots| slots.values().filter(|s| s.memfd.initialized()).count()).unwrap_or(0)
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn release_unused(slots: &mut HashMap<(u64, u64), Arc<Slot>>) {
    slots.retain(|_, slot| slot.source.metadata().is_ok_and(|m| m.nlink() > 0));
}

/// A memfd with `source`'s bytes (holes stay holes), sealed against writes, growing and
/// shrinking, and against further seals.
fn sealed_copy(source: &File) -> io::Result<OwnedFd> {
    let len = source.metadata()?.len();
    let memfd = memfd_create(MEMFD_NAME, MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)?;
    let out = File::from(memfd);
    out.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in data_extents(source, len)? {
        let mut offset = start;
        while offset < end {
            let want = usize::try_from((end - offset).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = source.read_at(&mut buf[..want], offset)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "snapshot memory file shrank while copied"));
            }
            out.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
        }
    }
    let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
    nix::fcntl::fcntl(out.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    Ok(OwnedFd::from(out))
}

/// The `[start, end)` ranges of `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`); the whole
/// file where the file system cannot say.
fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut offset: u64 = 0;
    while offset < len {
        let at = i64::try_from(offset).map_err(io::Error::other)?;
        let start = match lseek(fd, at, Whence::SeekData) {
            Ok(start) => u64::try_from(start).map_err(io::Error::other)?,
            // No data after `offset`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) if offset == 0 => return Ok(vec![(0, len)]),
            Err(e) => return Err(e.into()),
        };
        let end = match lseek(fd, i64::try_from(start).map_err(io::Error::other)?, Whence::SeekHole) {
            Ok(end) => u64::try_from(end).map_err(io::Error::other)?.min(len),
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn memory_file(dir: &Path) -> PathBuf {
        let path = dir.join("state.mem");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(&[7u8; 4096], 5 << 20).unwrap();
        path
    }

    #[tokio::test]
    async fn a_sealed_copy_has_the_bytes_and_refuses_writes_and_punches_but_maps_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = memory_file(dir.path());
        let sealed = SealedMemory::default();
        let proc_path = sealed.path_for(&path).await.unwrap();
        assert_eq!(std::fs::read(&proc_path).unwrap(), std::fs::read(&path).unwrap(), "same bytes");

        // QEMU opens it read-write, as a root process would.
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&proc_path).unwrap();
        assert!(file.write_all_at(b"x", 0).is_err(), "writes are sealed");
        let punched = nix::fcntl::fallocate(
            file.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        );
        assert_eq!(punched, Err(nix::errno::Errno::EPERM), "holes cannot be punched");
        assert!(file.set_len(16 << 20).is_err(), "it cannot grow");

        // A private, writable mapping still works (copy-on-write), as guest RAM needs.
        // SAFETY: a fresh mapping of a file we hold, unmapped before the test ends; nothing
        // else refers to it.
        unsafe {
            let len = std::num::NonZeroUsize::new(8 << 20).unwrap();
            let prot = nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE;
            let map = nix::sys::mman::mmap(None, len, prot, nix::sys::mman::MapFlags::MAP_PRIVATE, &file, 0).unwrap();
            let bytes = map.cast::<u8>().as_ptr();
            assert_eq!(*bytes, b'h');
            *bytes = b'X';
            assert_eq!(*bytes, b'X');
            nix::sys::mman::munmap(map, len.get()).unwrap();
        }
        assert_eq!(&std::fs::read(&proc_path).unwrap()[..4], b"head", "the private write stayed private");
    }

    #[tokio::test]
    async fn hard_links_share_one_copy_and_it_goes_once_no_name_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = memory_file(dir.path());
        let link = dir.path().join("restore-state.mem");
        std::fs::hard_link(&path, &link).unwrap();
        let sealed = SealedMemory::default();
        let a = sealed.path_for(&path).await.unwrap();
        let b = sealed.path_for(&link).await.unwrap();
        assert_eq!(a, b, "one memfd for both names");
        assert_eq!(sealed.len(), 1);

        std::fs::remove_file(&path).unwrap();
        assert_eq!(sealed.len(), 1, "a name is left");
        sealed.release_unused();
        assert_eq!(sealed.len(), 1, "a name is still left");
        std::fs::remove_file(&link).unwrap();
        sealed.release_unused();
        assert_eq!(sealed.len(), 0, "no name left: released");
        // A new file of the same name is another inode.
        sealed.path_for(&memory_file(dir.path())).await.unwrap();
        assert_eq!(sealed.len(), 1, "only the new file's copy");
    }

    #[test]
    fn the_sealed_copy_is_known_by_its_fd_link() {
        assert!(is_snapshot_memory("/memfd:banger-snapshot-memory (deleted)"));
        assert!(is_snapshot_memory("/memfd:banger-snapshot-memory"));
        assert!(!is_snapshot_memory("/memfd:banger-snapshot-memory-x (deleted)"));
        assert!(!is_snapshot_memory("/dev/shm/banger-mem-0/ab.mem"));
    }

    #[test]
    fn the_devices_file_says_whether_a_state_has_a_balloon() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.bin");
        assert!(!state_has_balloon(&state).unwrap(), "no file: saved without one");
        mark_state(&state).unwrap();
        assert!(state_has_balloon(&state).unwrap());
        std::fs::write(crate::snapshot_devices_file(&state), "\n").unwrap();
        assert!(!state_has_balloon(&state).unwrap());
    }

    #[test]
    fn extents_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::open(memory_file(dir.path())).unwrap();
        let extents = data_extents(&file, 8 << 20).unwrap();
        let covered: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert!(covered < 8 << 20, "holes skipped: {extents:?}");
        assert!(extents.iter().any(|&(s, e)| s <= 5 << 20 && e > 5 << 20), "the data page is in: {extents:?}");
    }
}
