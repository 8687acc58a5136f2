//! The start-up sweep: finishes or rolls back every step a previous daemon left half-done.
//!
//! Every step that makes or removes files records its intent first (the `pending` column, see
//! `banger_store::Pending`): a row "being made" before its files, "being deleted" before they go.
//! So after a crash the sweep knows, from rows alone, what was under way:
//!
//! * a row being made (VM, fork whose disks were being copied, snapshot, kernel, image) is
//!   rolled back: its files, then the row;
//! * a row being deleted is finished: its files, then the row;
//! * a snapshot recorded complete without its state file (written by older daemons, which
//!   inserted the row first) is removed when no fork uses it: it would be chosen and fail;
//! * files without a row (`<state>/vms/<id>`, `<state>/snapshots/<id>`, kernel and image
//!   directories) and scratch (`.staging-*`, `.deleting-*`, `.seed-*`, `.read-*`, `.write-*`, …)
//!   are removed;
//! * promote's loop mounts under the state dir are unmounted first (deepest first) and loop
//!   devices backed by files under it are detached, so nothing is removed through a mount.
//!
//! It runs once, before `Lifecycle::reconcile`, with the state dir's lock held: nothing else
//! runs, so every unfinished row is stale.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use banger_store::{Pending, StoreError, Table};

use crate::services::Fleet;

/// Names of scratch files and directories that only a running step uses.
const SCRATCH_PREFIXES: &[&str] =
    &[".staging-", ".deleting-", ".seed-", ".skel-", ".read-", ".write-", ".disk-", ".work-"];

/// A snapshot's state file, as `SnapshotRecord::paths` names it: written first, so a snapshot
/// without it has no usable files.
const SNAPSHOT_STATE: &str = "state.bin";

/// Whether a directory belongs to a row.
type Known<'a> = dyn Fn(&Path) -> bool + 'a;

/// Why the sweep stopped.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A directory could not be listed.
    #[error("cannot read {}", path.display())]
    Read {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Leftover files could not be removed; remove them by hand and start again.
    #[error("cannot remove {}; remove it by hand, then start bangerd again", path.display())]
    Remove {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A leftover mount could not be undone: nothing under it is removed.
    #[error("cannot unmount {}: {detail}; unmount it by hand (`umount -l`), then start bangerd again", path.display())]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// What `umount` said.
        detail: String,
    },
}

/// What the sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Unfinished makes undone (`vm ID`, `snapshot ID`, `kernel NAME`, `image NAME`).
    pub rolled_back: Vec<String>,
    /// Unfinished deletes finished.
    pub finished: Vec<String>,
    /// Files without a row, and scratch, removed.
    pub removed: Vec<PathBuf>,
    /// Mount points unmounted.
    pub unmounted: Vec<PathBuf>,
    /// Loop devices detached.
    pub detached: Vec<PathBuf>,
}

impl SweepReport {
    /// Whether there was nothing to do.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The host's mounts and loop devices, behind a trait so the sweep is tested without root.
pub trait HostMounts {
    /// Every mount point.
    fn mount_points(&self) -> std::io::Result<Vec<PathBuf>>;
    /// Unmounts `target`.
    fn unmount(&self, target: &Path) -> Result<(), String>;
    /// Every loop device with its backing file.
    fn loop_devices(&self) -> std::io::Result<Vec<(PathBuf, PathBuf)>>;
    /// Detaches loop device `device`.
    fn detach(&self, device: &Path) -> Result<(), String>;
}

/// The real mounts: `/proc/self/mountinfo`, `/sys/block/loop*`, `umount(8)`, `losetup(8)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemMounts;

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = std::process::Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A mount point as `mountinfo` escapes it (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

impl HostMounts for SystemMounts {
    fn mount_points(&self) -> std::io::Result<Vec<PathBuf>> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(text.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape_mountinfo).collect())
    }

    fn unmount(&self, target: &Path) -> Result<(), String> {
        run("umount", &[target.as_os_str()]).or_else(|_| run("umount", &["-l".as_ref(), target.as_os_str()]))
    }

    fn loop_devices(&self) -> std::io::Result<Vec<(PathBuf, PathBuf)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/sys/block")?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
                let backing = backing.trim_end().trim_end_matches(" (deleted)");
                found.push((Path::new("/dev").join(&name), PathBuf::from(backing)));
            }
        }
        Ok(found)
    }

    fn detach(&self, device: &Path) -> Result<(), String> {
        run("losetup", &["-d".as_ref(), device.as_os_str()])
    }
}

/// [`sweep_with`] the host's real mounts.
pub fn sweep(fleet: &Fleet) -> Result<SweepReport, RecoveryError> {
    sweep_with(fleet, &SystemMounts)
}

/// Finishes or rolls back what a previous daemon left half-done (see the module doc).
pub fn sweep_with(fleet: &Fleet, mounts: &dyn HostMounts) -> Result<SweepReport, RecoveryError> {
    let state = fleet.layout.state_dir.clone();
    let mut report = SweepReport::default();
    release_mounts(&state, mounts, &mut report)?;
    let store = &fleet.store;
    let (vms_dir, snapshots_dir) = (fleet.layout.vms_dir(), state.join("snapshots"));
    let (kernels_dir, images_dir) = (state.join("kernels"), state.join("images"));

    // Rows first: what was under way.
    for row in store.rows_of(Table::Vms)? {
        if let Some(pending) = row.pending {
            remove(Path::new(&row.path))?;
            store.remove_row(Table::Vms, &row.key)?;
            note(&mut report, pending, format!("vm {}", row.key));
        }
    }
    for row in store.rows_of(Table::Snapshots)? {
        let state_file = Path::new(&row.path).join(SNAPSHOT_STATE);
        let unfinished = match row.pending {
            Some(p) => Some(p),
            // An older daemon's row-before-files snapshot that never got its files.
            None if !state_file.is_file() && store.snapshot_forks(&row.key)?.is_empty() => Some(Pending::Making),
            None => None,
        };
        if let Some(pending) = unfinished {
            remove(Path::new(&row.path))?;
            store.remove_row(Table::Snapshots, &row.key)?;
            note(&mut report, pending, format!("snapshot {}", row.key));
        }
    }
    for (table, what, dir) in [(Table::Kernels, "kernel", &kernels_dir), (Table::Images, "image", &images_dir)] {
        for row in store.rows_of(table)? {
            if let Some(pending) = row.pending {
                remove(&dir.join(&row.key))?;
                store.remove_row(table, &row.key)?;
                note(&mut report, pending, format!("{what} {}", row.key));
            }
        }
    }

    // Then files: directories no row names, and scratch.
    let vm_dirs: HashSet<PathBuf> = store.rows_of(Table::Vms)?.into_iter().map(|r| PathBuf::from(r.path)).collect();
    let snapshot_dirs: HashSet<PathBuf> =
        store.rows_of(Table::Snapshots)?.into_iter().map(|r| PathBuf::from(r.path)).collect();
    let kernels: HashSet<String> = store.rows_of(Table::Kernels)?.into_iter().map(|r| r.key).collect();
    let images: HashSet<String> = store.rows_of(Table::Images)?.into_iter().map(|r| r.key).collect();
    sweep_scratch(&state, &mut report)?;
    let named =
        |names: &HashSet<String>, p: &Path| p.file_name().is_some_and(|n| names.contains(&*n.to_string_lossy()));
    let known_vm = |p: &Path| vm_dirs.contains(p);
    let known_snapshot = |p: &Path| snapshot_dirs.contains(p);
    let known_kernel = |p: &Path| named(&kernels, p);
    let known_image = |p: &Path| named(&images, p);
    let kinds: [(&PathBuf, &Known<'_>); 4] = [
        (&vms_dir, &known_vm),
        (&snapshots_dir, &known_snapshot),
        (&kernels_dir, &known_kernel),
        (&images_dir, &known_image),
    ];
    for (dir, known) in kinds {
        sweep_scratch(dir, &mut report)?;
        for entry in entries(dir)? {
            let is_dir = entry.symlink_metadata().is_ok_and(|m| m.is_dir());
            if !is_dir || is_scratch(&entry) {
                continue;
            }
            if known(&entry) {
                sweep_scratch(&entry, &mut report)?;
            } else {
                remove(&entry)?;
                report.removed.push(entry);
            }
        }
    }
    Ok(report)
}

fn note(report: &mut SweepReport, pending: Pending, what: String) {
    match pending {
        Pending::Making => report.rolled_back.push(what),
        Pending::Deleting => report.finished.push(what),
    }
}

/// Unmounts every mount under `state` (deepest first), then detaches loop devices backed by a
/// file under it.
fn release_mounts(state: &Path, mounts: &dyn HostMounts, report: &mut SweepReport) -> Result<(), RecoveryError> {
    let read = |source| RecoveryError::Read { path: PathBuf::from("/proc/self/mountinfo"), source };
    let mut points: Vec<PathBuf> =
        mounts.mount_points().map_err(read)?.into_iter().filter(|p| p.starts_with(state) && p != state).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in points {
        mounts.unmount(&point).map_err(|detail| RecoveryError::Unmount { path: point.clone(), detail })?;
        tracing::warn!(mount = %point.display(), "left-over mount undone");
        report.unmounted.push(point);
    }
    let loops = mounts.loop_devices().map_err(|source| RecoveryError::Read { path: "/sys/block".into(), source })?;
    for (device, backing) in loops.into_iter().filter(|(_, b)| b.starts_with(state)) {
        match mounts.detach(&device) {
            Ok(()) => {
                tracing::warn!(device = %device.display(), file = %backing.display(), "left-over loop device detached");
                report.detached.push(device);
            }
            Err(e) => tracing::warn!(device = %device.display(), error = e, "cannot detach a left-over loop device"),
        }
    }
    Ok(())
}

fn is_scratch(path: &Path) -> bool {
    path.file_name().is_some_and(|n| SCRATCH_PREFIXES.iter().any(|p| n.to_string_lossy().starts_with(p)))
}

/// Removes the scratch entries directly in `dir`.
fn sweep_scratch(dir: &Path, report: &mut SweepReport) -> Result<(), RecoveryError> {
    for entry in entries(dir)?.into_iter().filter(|e| is_scratch(e)) {
        remove(&entry)?;
        report.removed.push(entry);
    }
    Ok(())
}

/// The entries of `dir`, sorted; none if it does not exist.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, RecoveryError> {
    let read = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.map_err(|source| RecoveryError::Read { path: dir.to_owned(), source })?,
    };
    let mut found: Vec<PathBuf> = read.flatten().map(|e| e.path()).collect();
    found.sort();
    Ok(found)
}

/// Removes a file or directory tree; one that is not there is removed already.
fn remove(path: &Path) -> Result<(), RecoveryError> {
    let removed = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Ok(m) if m.is_dir() => {
            // A file that lands while the tree is removed (the tests' in-process "kill" leaves
            // the old daemon's blocking threads running) makes one pass fail: try a few more.
            let mut removed = std::fs::remove_dir_all(path);
            for _ in 0..10 {
                match &removed {
                    Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        removed = std::fs::remove_dir_all(path);
                    }
                    _ => break,
                }
            }
            removed
        }
        _ => std::fs::remove_file(path),
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(RecoveryError::Remove { path: path.to_owned(), source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
