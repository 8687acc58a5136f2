//! Guest memory files for lazy snapshots (QEMU).
//!
//! A VM booted with a memory file ([`crate::LaunchSpec::memory_file`], on tmpfs, mapped shared)
//! is snapshotted as its device state alone (QEMU's `x-ignore-shared` migration, tens of KB)
//! plus a frozen copy of that file taken while the guest is paused, beside the state
//! ([`crate::snapshot_memory_file`]). The copy is sparse: pages of zeros (never touched, or
//! scrubbed by the agent before the snapshot) are holes. A fork maps the copy privately
//! (copy-on-write), so its pages are read when the guest touches them and forks of one snapshot
//! share the clean ones in the host page cache. The copy is what the snapshot owns: the source
//! VM keeps running and keeps changing its own file.
//!
//! Format marker: a QEMU state file with a memory file beside it was saved this way and is
//! restored lazily; one without was saved whole (the format before this) and is loaded whole.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The page size the copy tests for zeros.
const PAGE: usize = 4096;
/// How much the copy reads at once.
const CHUNK: usize = 1 << 20;

/// Copies memory file `src` to a new file `dest` (mode 0600; an existing one is an error),
/// leaving holes for pages of zeros. Returns the bytes written.
pub fn copy_sparse(src: &Path, dest: &Path) -> io::Result<u64> {
    let mut input = File::open(src)?;
    let len = input.metadata()?.len();
    copy_sparse_from(&mut input, dest, len).map(|(_, written)| written)
}

/// Copies at most `len` bytes of `input`, from where it stands, to a new file `dest` (mode
/// 0600; an existing one is an error) of `len` bytes, leaving holes for pages of zeros. A
/// shorter input leaves the rest a hole; a longer one is cut at `len`. Returns the new file
/// and the bytes written.
pub fn copy_sparse_from(input: &mut File, dest: &Path, len: u64) -> io::Result<(File, u64)> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    let out = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest)?;
    let mut buf = vec![0u8; CHUNK];
    let (mut offset, mut written) = (0u64, 0u64);
    while offset < len {
        let want = usize::try_from(len - offset).map_or(CHUNK, |left| left.min(CHUNK));
        let n = read_full(input, &mut buf[..want])?;
        if n == 0 {
            break;
        }
        // Runs of non-zero pages, written at their offsets. (Slice equality is a memcmp.)
        let mut run: Option<usize> = None;
        let pages = buf[..n].chunks(PAGE).map(|page| page != &ZERO[..page.len()]).chain([false]);
        for (index, data) in pages.enumerate() {
            match (data, run) {
                (true, None) => run = Some(index * PAGE),
                (false, Some(start)) => {
                    let end = (index * PAGE).min(n);
                    out.write_all_at(&buf[start..end], offset + start as u64)?;
                    written += (end - start) as u64;
                    run = None;
                }
                _ => {}
            }
        }
        offset += n as u64;
    }
    out.set_len(len)?;
    Ok((out, written))
}

/// Removes the name of a memory file QEMU has open (its memory then goes with QEMU); a
/// missing one is fine, a failure is logged (the daemon's start-up removes stale ones).
pub fn unlink(file: &Path) {
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(file = %file.display(), error = %e, "cannot unlink the memory file");
        }
        _ => {}
    }
}

/// A path that opens memory file `mem_path` as the QEMU of `vm_dir` holds it (`/proc/PID/fd/N`;
/// the file itself is unlinked once QEMU runs).
pub fn open_path_in(vm_dir: &Path, mem_path: &Path) -> io::Result<std::path::PathBuf> {
    let pid = crate::read_pidfile(&crate::VmPaths::new(vm_dir).pidfile)
        .filter(|pid| crate::is_alive(*pid, vm_dir))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the vmm is not running"))?;
    let mut deleted = mem_path.as_os_str().to_owned();
    deleted.push(" (deleted)");
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let path = entry?.path();
        if std::fs::read_link(&path).is_ok_and(|target| target == mem_path || target.as_os_str() == deleted) {
            return Ok(path);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("vmm {pid} does not hold {}", mem_path.display())))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_pages_become_holes_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dest) = (dir.path().join("ram"), dir.path().join("state.mem"));
        let len = 3 * CHUNK as u64 + 5 * PAGE as u64;
        let file = File::create(&src).unwrap();
        file.set_len(len).unwrap();
        // Data at the start, across a chunk boundary, and in the last page.
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(&[7u8; 2 * PAGE], CHUNK as u64 - PAGE as u64).unwrap();
        file.write_all_at(b"tail", len - 4).unwrap();
        let written = copy_sparse(&src, &dest).unwrap();
        assert_eq!(written, 4 * PAGE as u64, "only the pages holding data");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dest).unwrap(), "same bytes");
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(meta.len(), len);
        assert!(meta.blocks() * 512 <= 8 * PAGE as u64, "sparse: {} blocks", meta.blocks());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(copy_sparse(&src, &dest).unwrap_err().kind(), io::ErrorKind::AlreadyExists, "never overwritten");
    }
}
