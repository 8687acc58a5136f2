//! Copying a seed image into a new file in time that does not grow with the seed's size: a
//! reflink (`FICLONE`) where the file system shares extents (btrfs, XFS, bcachefs), else a copy of
//! the data extents only (`SEEK_DATA`/`SEEK_HOLE`, `copy_file_range`), so holes stay holes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// Clones `src` into the empty file `dst` by sharing its extents. `Ok(false)` when the file
/// system cannot (no reflink support, different file systems).
pub(crate) fn reflink(src: &File, dst: &File) -> io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument and reads no memory;
    // both descriptors stay open for the duration of the call since `src` and `dst` are borrowed.
    let result = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if result == 0 {
        return Ok(true);
    }
    match Errno::last() {
        Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY | Errno::ENOSYS => Ok(false),
        errno => Err(errno.into()),
    }
}

/// Copies the data extents of `src` into `dst` at the same offsets and gives `dst` the length of
/// `src`; returns the bytes copied.
pub(crate) fn sparse_copy(src: &File, dst: &File) -> io::Result<u64> {
    let len = i64::try_from(src.metadata()?.len()).map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
    dst.set_len(0)?;
    dst.set_len(len.unsigned_abs())?;
    let mut copied = 0;
    let mut offset = 0;
    while offset < len {
        let start = match lseek(src.as_raw_fd(), offset, Whence::SeekData) {
            Ok(start) => start,
            // No data past `offset`.
            Err(Errno::ENXIO) => break,
            // No SEEK_DATA here: the rest is data.
            Err(Errno::EINVAL) => offset,
            Err(errno) => return Err(errno.into()),
        };
        let end = match lseek(src.as_raw_fd(), start, Whence::SeekHole) {
            Ok(end) => end.min(len),
            Err(Errno::EINVAL) => len,
            Err(errno) => return Err(errno.into()),
        };
        copy_range(src, dst, start, end)?;
        copied += (end - start).unsigned_abs();
        offset = end;
    }
    Ok(copied)
}

/// Copies bytes `start..end` of `src` to the same offsets of `dst`.
fn copy_range(src: &File, dst: &File, start: i64, end: i64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (start, start);
    while off_in < end {
        let want = usize::try_from(end - off_in).unwrap_or(usize::MAX).min(1 << 30);
        // SAFETY: the offsets are valid, exclusively borrowed i64s that the kernel updates; the
        // descriptors stay open while `src` and `dst` are borrowed; no other memory is touched.
        let result =
            unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, want, 0) };
        let result = if result < 0 { Err(Errno::last()) } else { Ok(result) };
        match result {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the seed shrank while being copied")),
            Ok(_) => {}
            // Old kernels, or file systems without it: copy through memory.
            Err(Errno::ENOSYS | Errno::EXDEV | Errno::EOPNOTSUPP | Errno::EINVAL) => {
                return copy_range_buffered(src, dst, off_in, end)
            }
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

fn copy_range_buffered(src: &File, dst: &File, start: i64, end: i64) -> io::Result<()> {
    let mut buffer = vec![0u8; 1 << 20];
    let (mut offset, end) = (start.unsigned_abs(), end.unsigned_abs());
    while offset < end {
        let want = usize::try_from(end - offset).unwrap_or(usize::MAX).min(buffer.len());
        let chunk = &mut buffer[..want];
        src.read_exact_at(chunk, offset)?;
        dst.write_all_at(chunk, offset)?;
        offset += want as u64;
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    /// A 64 MiB file with data at 0, 10 MiB and in its last 4 KiB, holes elsewhere.
    fn holey(dir: &std::path::Path) -> File {
        let file = File::options().read(true).write(true).create(true).truncate(true).open(dir.join("src")).unwrap();
        file.set_len(64 * MIB).unwrap();
        file.write_all_at(b"start", 0).unwrap();
        file.write_all_at(&[7u8; 8192], 10 * MIB).unwrap();
        file.write_all_at(b"end", 64 * MIB - 3).unwrap();
        file
    }

    fn read_all(file: &File) -> Vec<u8> {
        let mut data = vec![0u8; usize::try_from(file.metadata().unwrap().len()).unwrap()];
        file.read_exact_at(&mut data, 0).unwrap();
        data
    }

    #[test]
    fn sparse_copy_copies_only_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = holey(dir.path());
        let dst =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("dst")).unwrap();
        let copied = sparse_copy(&src, &dst).unwrap();
        assert!(copied < MIB, "copied {copied} bytes of a mostly empty 64 MiB file");
        assert_eq!(dst.metadata().unwrap().len(), 64 * MIB);
        assert!(dst.metadata().unwrap().blocks() * 512 < 2 * MIB, "the copy is not sparse");
        assert!(read_all(&src) == read_all(&dst));
    }

    #[test]
    fn sparse_copy_of_an_empty_or_all_hole_file() {
        let dir = tempfile::tempdir().unwrap();
        let src =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("s")).unwrap();
        let dst =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("d")).unwrap();
        assert_eq!(sparse_copy(&src, &dst).unwrap(), 0);
        src.set_len(3 * MIB).unwrap();
        assert_eq!(sparse_copy(&src, &dst).unwrap(), 0);
        assert_eq!(dst.metadata().unwrap().len(), 3 * MIB);
    }

    #[test]
    fn buffered_fallback_copies_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let src = holey(dir.path());
        let dst =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("dst")).unwrap();
        dst.set_len(64 * MIB).unwrap();
        let at = i64::try_from(10 * MIB).unwrap();
        copy_range_buffered(&src, &dst, at, at + 8192).unwrap();
        let mut chunk = [0u8; 8192];
        dst.read_exact_at(&mut chunk, 10 * MIB).unwrap();
        assert!(chunk.iter().all(|&b| b == 7));
    }

    #[test]
    fn reflink_either_clones_or_says_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let src = holey(dir.path());
        let dst =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("dst")).unwrap();
        if reflink(&src, &dst).unwrap() {
            assert!(read_all(&src) == read_all(&dst));
        } else {
            assert_eq!(dst.metadata().unwrap().len(), 0);
        }
    }
}
