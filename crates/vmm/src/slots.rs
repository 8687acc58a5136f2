//! Spare drive slots (QEMU): disks attached to a running guest without hotplug, which QEMU's
//! `microvm` machine lacks.
//!
//! A QEMU guest boots with [`QEMU_SLOTS`] extra `virtio-blk-device`s, each backed by a raw file
//! in its VM dir ([`slot_file`]) that starts empty: capacity 0, nothing the guest can read or
//! write. The guest finds them by their serial ([`slot_serial`], `/sys/block/vd*/serial`).
//! To attach a disk, the daemon writes a file system into that same file (the inode QEMU holds
//! open) and resizes the drive to the file's size ([`crate::Vmm::resize_slot`], QMP
//! `block_resize`): virtio-blk tells the guest its new capacity and the agent mounts it. To
//! free a slot, the guest unmounts it, the file is truncated to 0 and the drive resized to 0.
//! A slot whose file is empty is free.
//!
//! The slots are part of the device set a snapshot records ([`crate::snapshot_devices_file`],
//! a `slots N` line): their devices come after the balloon, so states saved without slots keep
//! their virtio-mmio slots, and a restore gives a guest exactly the slots it was saved with.
//! Their files are disks: a snapshot copies them, a fork gets its own copies.
//!
//! Firecracker takes drives before boot only and gets no slots: imports into it take the tar
//! path.

use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::qmp::{QmpClient, QmpError};

/// Spare slots a QEMU guest boots with.
pub const QEMU_SLOTS: u8 = 2;

/// What [`crate::snapshot_devices_file`] says (`slots N`) for a guest with N slots.
pub const SLOTS_MARK: &str = "slots";

/// The file behind slot `index` in `dir` (a VM dir or a snapshot dir).
pub fn slot_file(dir: &Path, index: u8) -> PathBuf {
    dir.join(format!("slot{index}.img"))
}

/// The serial the guest sees on slot `index`.
pub fn slot_serial(index: u8) -> String {
    format!("banger-slot{index}")
}

/// QEMU's drive (block backend) name of slot `index`.
pub fn drive_id(index: u8) -> String {
    format!("slot{index}")
}

/// How many slots the saved guest at `state` has (its devices file's `slots N`; none without
/// the line or the file).
pub fn state_slots(state: &Path) -> io::Result<u8> {
    let text = match std::fs::read_to_string(crate::snapshot_devices_file(state)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for line in text.lines() {
        if let Some(n) = line.trim().strip_prefix(SLOTS_MARK).and_then(|rest| rest.strip_prefix(' ')) {
            return n
                .trim()
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad line {line:?}")));
        }
    }
    Ok(0)
}

/// Records beside `state` that its guest has `slots` slots (a line added to its devices file).
pub fn mark_state(state: &Path, slots: u8) -> io::Result<()> {
    let mut file =
        std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(crate::snapshot_devices_file(state))?;
    writeln!(file, "{SLOTS_MARK} {slots}")
}

/// Makes the missing slot files of `dir` (empty, mode 0600); existing ones keep what they hold
/// (a restarted VM keeps its attached disks).
pub fn create_missing(dir: &Path, slots: u8) -> io::Result<()> {
    for index in 0..slots {
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(slot_file(dir, index)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How many slot drives the QEMU on `client` has.
pub(crate) async fn count(client: &mut QmpClient) -> Result<u8, QmpError> {
    let blocks = client.execute("query-block", None).await?;
    let n = blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b.get("device").and_then(serde_json::Value::as_str).is_some_and(|d| d.starts_with("slot")))
        .count();
    Ok(u8::try_from(n).unwrap_or(u8::MAX))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn the_devices_file_records_slots_beside_the_balloon() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.bin");
        assert_eq!(state_slots(&state).unwrap(), 0, "no file: saved without slots");
        crate::balloon::mark_state(&state).unwrap();
        assert_eq!(state_slots(&state).unwrap(), 0, "a balloon only");
        mark_state(&state, 2).unwrap();
        assert_eq!(state_slots(&state).unwrap(), 2);
        assert!(crate::balloon::state_has_balloon(&state).unwrap(), "the balloon line stays");
        std::fs::write(crate::snapshot_devices_file(&state), "slots x\n").unwrap();
        assert!(state_slots(&state).is_err(), "a bad line is an error, not 0");
    }

    #[test]
    fn missing_slot_files_are_made_empty_and_existing_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(slot_file(dir.path(), 1), b"an attached disk").unwrap();
        create_missing(dir.path(), 2).unwrap();
        assert_eq!(std::fs::metadata(slot_file(dir.path(), 0)).unwrap().len(), 0);
        assert_eq!(std::fs::read(slot_file(dir.path(), 1)).unwrap(), b"an attached disk");
        assert_eq!(slot_serial(1), "banger-slot1");
    }
}
