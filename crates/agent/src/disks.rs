//! Disks the host attaches to the running guest: the spare `virtio-blk` slots a QEMU guest
//! boots with (empty, capacity 0, serial `banger-slotN`) grow when the host writes a file
//! system into one (`block_resize`); `mount_disk` waits for that capacity and mounts the ext4
//! read-write at the directory asked for (a fast workspace import). After a restart the disk
//! still holds it: [`mount_attached`] mounts every non-empty slot again where its superblock
//! says it was last mounted (`mke2fs -M`, kept up to date by ext4 itself).

use std::path::Path;
use std::time::{Duration, Instant};

use banger_proto::agent::{AgentResponse, FrameKind};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::channel::Link;

/// How long a disk may take to show its new capacity after the host grew it.
const CAPACITY_TIMEOUT: Duration = Duration::from_secs(20);
/// Serials of the spare slots start with this.
const SLOT_SERIAL_PREFIX: &str = "banger-slot";

/// Attaching a disk failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// No block device has the serial.
    #[error("no disk with serial {0} (is the vm booted with spare slots?)")]
    NoDisk(String),
    /// The device kept capacity 0.
    #[error("{dev} still has no capacity after {timeout:?}: the host's resize did not reach the guest")]
    NoCapacity {
        /// The device.
        dev: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The directory is not a plain absolute path.
    #[error("{0}: not an absolute directory")]
    BadDir(String),
    /// Something is in the way at the mount point.
    #[error("{0} exists and is not an empty directory; import into a new directory")]
    NotEmpty(String),
    /// A file system call failed.
    #[error("cannot {what} {path}")]
    Io {
        /// The call.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a str) -> impl FnOnce(std::io::Error) -> DiskError + 'a {
    move |source| DiskError::Io { what, path: path.to_owned(), source }
}

/// Serves one `mount_disk` channel: answers `Ok` or `Error`.
pub fn serve_mount(link: &Link, serial: &str, dir: &str) {
    let started = Instant::now();
    match mount_disk(serial, dir) {
        Ok(dev) => {
            log!("mounted {dev} ({serial}) at {dir} in {} ms", started.elapsed().as_millis());
            let _ = link.json(FrameKind::Response, &AgentResponse::Ok);
        }
        Err(e) => {
            log!("cannot mount {serial} at {dir}: {e}");
            link.fail(&e.to_string());
        }
    }
    link.finish();
}

/// Serves one `unmount_disk` channel: answers `Ok` or `Error`.
pub fn serve_unmount(link: &Link, dir: &str) {
    match umount2(dir, MntFlags::empty()) {
        Ok(()) => {
            let _ = link.json(FrameKind::Response, &AgentResponse::Ok);
        }
        Err(e) => link.fail(&format!("cannot unmount {dir}: {e}")),
    }
    link.finish();
}

/// The `/dev` node of the block device whose serial is `serial`.
fn find_device(serial: &str) -> Option<String> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    entries.flatten().find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        let found = read_small(&entry.path().join("serial"))?;
        (name.starts_with("vd") && found.trim() == serial).then(|| format!("/dev/{name}"))
    })
}

/// A sysfs attribute (at most 256 bytes).
fn read_small(path: &Path) -> Option<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path).ok()?.take(256).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The size of `/dev/<name>` in 512-byte sectors.
fn sectors(dev: &str) -> u64 {
    let name = dev.trim_start_matches("/dev/");
    read_small(&Path::new("/sys/block").join(name).join("size")).and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Whether `dir` is an absolute path below `/` made of plain names only (what the host's
/// `valid_guest_dir` accepts; the agent does not link the API types).
fn usable_dir(dir: &str) -> bool {
    let Some(rest) = dir.strip_prefix('/') else { return false };
    !rest.is_empty() && !dir.contains(['\0', '\n']) && rest.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Waits for the disk `serial` to have a capacity, then mounts it at `dir`; the device.
fn mount_disk(serial: &str, dir: &str) -> Result<String, DiskError> {
    if !usable_dir(dir) {
        return Err(DiskError::BadDir(dir.to_owned()));
    }
    let dev = find_device(serial).ok_or_else(|| DiskError::NoDisk(serial.to_owned()))?;
    let deadline = Instant::now() + CAPACITY_TIMEOUT;
    while sectors(&dev) == 0 {
        if Instant::now() >= deadline {
            return Err(DiskError::NoCapacity { dev, timeout: CAPACITY_TIMEOUT });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    prepare_mount_point(dir)?;
    mount_ext4(&dev, dir)?;
    Ok(dev)
}

/// Makes `dir` (with its parents), or checks that the existing one is an empty directory.
fn prepare_mount_point(dir: &str) -> Result<(), DiskError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            let mut entries = std::fs::read_dir(dir).map_err(io_err("read", dir))?;
            if entries.next().is_some() {
                return Err(DiskError::NotEmpty(dir.to_owned()));
            }
            Ok(())
        }
        Ok(_) => Err(DiskError::NotEmpty(dir.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))
        }
        Err(e) => Err(io_err("inspect", dir)(e)),
    }
}

fn mount_ext4(dev: &str, dir: &str) -> Result<(), DiskError> {
    mount(Some(dev), dir, Some("ext4"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None::<&str>)
        .map_err(|e| io_err("mount on", dir)(e.into()))
}

/// The "last mounted on" directory of the ext4 superblock in `head` (the disk's first 2 KiB),
/// when it is one a workspace may use.
pub fn last_mounted(head: &[u8]) -> Option<String> {
    const SUPERBLOCK: usize = 1024;
    const MAGIC_AT: usize = SUPERBLOCK + 0x38;
    const LAST_MOUNTED_AT: usize = SUPERBLOCK + 0x88;
    let magic = head.get(MAGIC_AT..MAGIC_AT + 2)?;
    if magic != [0x53, 0xef] {
        return None;
    }
    let field = head.get(LAST_MOUNTED_AT..LAST_MOUNTED_AT + 64)?;
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let dir = std::str::from_utf8(&field[..end]).ok()?;
    usable_dir(dir).then(|| dir.to_owned())
}

/// At boot: mounts each slot that holds a file system where it was last mounted. Failures are
/// logged; the boot goes on.
pub fn mount_attached() {
    use std::io::Read as _;
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return };
    for entry in entries.flatten() {
        let Some(serial) = read_small(&entry.path().join("serial")) else { continue };
        if !serial.trim().starts_with(SLOT_SERIAL_PREFIX) {
            continue;
        }
        let dev = format!("/dev/{}", entry.file_name().to_string_lossy());
        if sectors(&dev) == 0 {
            continue;
        }
        let mut head = [0u8; 2048];
        let read = std::fs::File::open(&dev).and_then(|mut f| f.read_exact(&mut head));
        let Some(dir) = read.ok().and_then(|()| last_mounted(&head)) else {
            log!("{dev} ({}) holds no workspace file system; left alone", serial.trim());
            continue;
        };
        match prepare_mount_point(&dir).and_then(|()| mount_ext4(&dev, &dir)) {
            Ok(()) => log!("mounted {dev} at {dir}"),
            Err(e) => log!("cannot mount {dev} at {dir}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(dir: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; 2048];
        head[1024 + 0x38] = 0x53;
        head[1024 + 0x39] = 0xef;
        head[1024 + 0x88..1024 + 0x88 + dir.len()].copy_from_slice(dir);
        head
    }

    #[test]
    fn the_last_mounted_directory_is_read_from_an_ext4_superblock() {
        assert_eq!(last_mounted(&superblock(b"/root/repo")).as_deref(), Some("/root/repo"));
        assert_eq!(last_mounted(&superblock(&[b'/'; 64])), None, "not a usable directory");
        assert_eq!(last_mounted(&superblock(b"/root/../etc")), None);
        assert_eq!(last_mounted(&superblock(b"")), None);
        assert_eq!(last_mounted(&[0u8; 2048]), None, "no ext4 magic");
        assert_eq!(last_mounted(&[0u8; 100]), None, "too short");
    }

    #[test]
    fn a_mount_point_is_made_or_must_be_an_empty_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let new = tmp.path().join("a/b");
        prepare_mount_point(new.to_str().expect("utf-8")).expect("made");
        assert!(new.is_dir());
        prepare_mount_point(new.to_str().expect("utf-8")).expect("empty is fine");
        std::fs::write(new.join("x"), "").expect("write");
        let err = prepare_mount_point(new.to_str().expect("utf-8")).expect_err("not empty");
        assert!(matches!(err, DiskError::NotEmpty(_)), "{err}");
        let err = prepare_mount_point(new.join("x").to_str().expect("utf-8")).expect_err("a file");
        assert!(matches!(err, DiskError::NotEmpty(_)), "{err}");
    }
}
