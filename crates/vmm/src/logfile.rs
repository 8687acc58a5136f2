//! Files the guest writes into on the host (the serial console log) and files a VMM writes
//! about it (Firecracker's log and metrics), read and kept with bounds: the guest decides what
//! they hold and how fast they grow.
//!
//! Reads never take a whole file: [`read_tail`] seeks to the end minus a byte budget and reads
//! at most that many bytes; [`tail_lines`] splits such a tail into lines (UTF-8 lossy) and cuts
//! each one to a byte cap, so a guest that never writes a newline still yields short text.
//!
//! The console log is kept under a byte cap by [`rotate_if_over`]. The VMM writes it with
//! `O_APPEND` (QEMU's `-chardev file,append=on`, Firecracker's serial file), so every write
//! lands at the end the kernel sees at that moment. A rotation copies the log's older bytes to
//! `<log>.1` (one old file, replaced each time) and then removes exactly those bytes from the
//! log's head with `fallocate(FALLOC_FL_COLLAPSE_RANGE)`: the kernel shifts the file under the
//! inode lock that appends take too, so a byte the guest writes during a rotation is never lost
//! and `.1` followed by the log is always a contiguous stretch of the guest's output. On a
//! filesystem without collapse (tmpfs, some network ones) the log is copied and truncated to
//! zero instead; bytes written between that copy and the truncation are lost, the price of not
//! stopping the guest.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Byte cap of a console log before it is rotated; with its `.1` a VM keeps at most twice this
/// (plus what the guest writes between two checks).
pub const CONSOLE_LOG_CAP: u64 = 2 << 20;

/// Byte cap of a VMM's stderr file before it is rotated the same way (QEMU reports there what a
/// guest's devices make it do, e.g. every discard a fork's balloon asks for and the kernel
/// refuses: the guest decides how often).
pub const VMM_STDERR_CAP: u64 = 1 << 20;

/// Creates (or empties) `path` for a VMM to write as its stderr, opened with `O_APPEND`, so
/// [`rotate_if_over`] may truncate it while the VMM writes.
pub fn create_for_append(path: &Path) -> io::Result<File> {
    File::create(path)?;
    OpenOptions::new().append(true).open(path)
}

/// Longest line `vm logs` returns; longer lines are cut and marked.
pub const MAX_LINE_BYTES: usize = 4096;

/// What is appended to a line cut at its cap.
pub const CUT_MARK: &str = " [line cut]";

/// The last `max_bytes` bytes of the file at `path` (all of it if smaller). Never reads more,
/// whatever the file's size.
pub fn read_tail(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0).min(1 << 20));
    file.take(max_bytes).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The last `max_bytes` bytes of a rotated log: the end of `<path>.1` followed by `path`, so a
/// log just rotated (empty, its bytes moved to `.1`) still shows its newest lines. Also says
/// whether older bytes were left out (so the first line may be the cut end of a longer one).
/// A missing `.1` counts as empty; a missing `path` is an error, as for [`read_tail`].
pub fn read_log_tail(path: &Path, max_bytes: u64) -> io::Result<(Vec<u8>, bool)> {
    let newest = read_tail(path, max_bytes)?;
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    let newest_len = newest.len() as u64;
    if len > max_bytes || newest_len >= max_bytes {
        return Ok((newest, true));
    }
    let old_path = rotated_path(path);
    let old_len = std::fs::metadata(&old_path).map_or(0, |m| m.len());
    let budget = max_bytes - newest_len;
    let mut bytes = match read_tail(&old_path, budget) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    bytes.extend_from_slice(&newest);
    // A rotation keeps the end of a log that was over its cap, so `.1` itself begins mid-line.
    Ok((bytes, old_len > 0))
}

/// `line` cut to at most `max_bytes` bytes (on a character boundary) plus [`CUT_MARK`].
pub fn cap_line(line: &str, max_bytes: usize) -> String {
    if line.len() <= max_bytes {
        return line.to_owned();
    }
    let mut end = max_bytes;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARK}", &line[..end])
}

/// Every line of `bytes` (UTF-8 lossy, `\r` dropped), each cut to `max_line` bytes. When
/// `partial_first` is set, the first line is dropped unless it is the only text: it is the cut
/// end of a line that began before the tail.
pub fn capped_lines(bytes: &[u8], max_line: usize, partial_first: bool) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if partial_first && lines.len() > 1 {
        lines.remove(0);
    }
    lines.iter().map(|l| cap_line(l.trim_end_matches('\r'), max_line)).collect()
}

/// The last `n` lines of the log at `path` (and its `.1`) read from its last `max_bytes` bytes, each cut to
/// `max_line` bytes, joined by newlines. A missing or unreadable file gives "".
pub fn tail_lines(path: &Path, n: usize, max_line: usize, max_bytes: u64) -> String {
    let Ok((bytes, cut)) = read_log_tail(path, max_bytes) else { return String::new() };
    let lines = capped_lines(&bytes, max_line, cut);
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `<path>.1`, where a rotated log's previous bytes go.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// When the file at `path` is larger than `cap`, moves its older bytes out: the last `cap` of
/// them to `<path>.1` (written anew), and off the log's head; returns whether it did. The
/// writer must append (`O_APPEND`), see the module doc. A missing file is left alone.
pub fn rotate_if_over(path: &Path, cap: u64) -> io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(false);
    }
    let mut log = OpenOptions::new().read(true).write(true).open(path)?;
    // Collapse takes whole filesystem blocks and must leave at least one byte.
    let block = std::os::unix::fs::MetadataExt::blksize(&log.metadata()?).max(1);
    let head = (len - 1) / block * block;
    if head > 0 {
        write_rotated(path, &read_range(&mut log, head.saturating_sub(cap), head)?)?;
        match collapse_head(&log, head) {
            Ok(()) => return Ok(true),
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // No collapse here: copy the newest bytes and start the log again (see the module doc).
    write_rotated(path, &read_tail(path, cap)?)?;
    log.set_len(0)?;
    Ok(true)
}

/// Bytes `from..to` of `file`.
fn read_range(file: &mut File, from: u64, to: u64) -> io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::with_capacity(usize::try_from(to - from).unwrap_or(0).min(4 << 20));
    file.take(to - from).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Replaces `<path>.1` with `bytes` (through a rename, so a reader sees the old or the new).
fn write_rotated(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let old = rotated_path(path);
    let mut tmp = old.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut out = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        out.write_all(bytes)?;
    }
    std::fs::rename(&tmp, &old)
}

/// Removes the first `len` bytes of `file`, shifting the rest down, atomically with respect to
/// appends (both hold the inode lock).
fn collapse_head(file: &File, len: u64) -> nix::Result<()> {
    let len = i64::try_from(len).map_err(|_| nix::errno::Errno::EINVAL)?;
    nix::fcntl::fallocate(
        std::os::fd::AsRawFd::as_raw_fd(file),
        nix::fcntl::FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
        0,
        len,
    )
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;

    #[test]
    fn an_append_file_rotates_and_the_writer_goes_on_at_the_new_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.stderr");
        std::fs::write(&path, b"old run").unwrap();
        let mut writer = create_for_append(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"", "emptied");
        writer.write_all(&[b'x'; 100]).unwrap();
        assert!(rotate_if_over(&path, 10).unwrap());
        writer.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"after", "no hole before the next write");
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), [b'x'; 10]);
    }

    #[test]
    fn a_rotation_under_appends_loses_no_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = create_for_append(&path).unwrap();
        let cap = 16 << 10;
        // Another thread appends while this one rotates, as a VMM and the monitor do.
        let writer = std::thread::spawn(move || {
            let mut written = Vec::new();
            for i in 0..20_000u32 {
                let line = format!("line {i}\n");
                log.write_all(line.as_bytes()).unwrap();
                written.extend_from_slice(line.as_bytes());
            }
            written
        });
        let mut rotations = 0;
        while !writer.is_finished() {
            if rotate_if_over(&path, cap).unwrap() {
                rotations += 1;
                assert!(std::fs::read(rotated_path(&path)).unwrap().len() as u64 <= cap);
            }
        }
        let written = writer.join().unwrap();
        assert!(rotations > 0, "never rotated");
        let mut kept = std::fs::read(rotated_path(&path)).unwrap();
        kept.extend(std::fs::read(&path).unwrap());
        assert!(written.ends_with(&kept), "`.1` and the log are the newest bytes, in order ({rotations} rotations)");
        assert!(kept.ends_with(b"line 19999\n"));
    }

    #[test]
    fn read_tail_reads_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_tail(&path, 4).unwrap(), b"6789");
        assert_eq!(read_tail(&path, 100).unwrap(), b"0123456789");
        assert_eq!(read_tail(&path, 0).unwrap(), b"");
        assert!(read_tail(&dir.path().join("none"), 4).is_err());
    }

    #[test]
    fn a_huge_sparse_file_is_read_in_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let file = File::create(&path).unwrap();
        file.set_len(20 << 30).unwrap();
        drop(file);
        OpenOptions::new().append(true).open(&path).unwrap().write_all(b"\nlast line\n").unwrap();
        assert_eq!(tail_lines(&path, 3, 16, 64), "last line");
        assert_eq!(read_tail(&path, 1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn lines_are_cut_on_character_boundaries() {
        assert_eq!(cap_line("short", 10), "short");
        assert_eq!(cap_line("abcdef", 3), format!("abc{CUT_MARK}"));
        // "é" is two bytes: a cap inside it backs off to the boundary.
        assert_eq!(cap_line("aé", 2), format!("a{CUT_MARK}"));
        let lines = capped_lines(b"cut end\nfull\n\xff\xfe\r\n", 100, true);
        assert_eq!(lines, ["full", "\u{fffd}\u{fffd}"]);
        assert_eq!(capped_lines(b"only", 100, true), ["only"]);
    }

    #[test]
    fn tail_lines_caps_count_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let long = "x".repeat(10_000);
        std::fs::write(&path, format!("a\nb\n{long}\nc\n")).unwrap();
        let tail = tail_lines(&path, 2, 8, 1 << 20);
        assert_eq!(tail, format!("xxxxxxxx{CUT_MARK}\nc"));
        assert_eq!(tail_lines(&path, 10, 8, 4), "c");
        assert_eq!(tail_lines(&dir.path().join("none"), 3, 8, 64), "");
    }

    #[test]
    fn rotation_keeps_the_newest_bytes_in_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        assert!(!rotate_if_over(&path, 8).unwrap(), "a missing log is left alone");
        let mut writer = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        writer.write_all(b"12345678").unwrap();
        assert!(!rotate_if_over(&path, 8).unwrap(), "at the cap is not over it");
        writer.write_all(b"9abc").unwrap();
        assert!(rotate_if_over(&path, 8).unwrap());
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), b"56789abc");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // The appending writer goes on at the new end: no hole where the old bytes were.
        writer.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        writer.write_all(b"-more-than-8").unwrap();
        assert!(rotate_if_over(&path, 8).unwrap());
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), b"e-than-8", "the old file is replaced");
    }

    #[test]
    fn a_just_rotated_log_still_shows_its_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut writer = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        writer.write_all(b"old line\nfirst\nsecond\n").unwrap();
        assert!(rotate_if_over(&path, 16).unwrap());
        // The log is empty right after the rotation; its newest bytes are in `.1`.
        assert_eq!(tail_lines(&path, 5, 64, 16), "first\nsecond", "the cut first line is dropped");
        writer.write_all(b"third\n").unwrap();
        let (bytes, cut) = read_log_tail(&path, 64).unwrap();
        assert_eq!((bytes.as_slice(), cut), (b"ne\nfirst\nsecond\nthird\n".as_slice(), true));
        let (bytes, cut) = read_log_tail(&path, 10).unwrap();
        assert_eq!((bytes.as_slice(), cut), (b"ond\nthird\n".as_slice(), true));
        assert!(read_log_tail(&dir.path().join("absent"), 8).is_err());
    }
}
