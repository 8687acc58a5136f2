//! Disk attach: an ext4 image the CLI built (as the calling user, from exactly the files the
//! tar import would send) written into a free spare slot of a running QEMU VM
//! (`banger_vmm::slots`), grown to its size, and mounted by the agent read-write at the
//! workspace directory. The guest reads the disk lazily, so a large import costs what the host
//! writes, not what the emulated guest would create file by file.
//!
//! The API is two calls on [`Workspace`]: [`Workspace::attach_into`] (a stream in, a slot
//! out; the slot's guest directory recorded beside it, `slotN.dir`) and
//! [`Workspace::detach_dir`] (the disk mounted at a directory unmounted, then its slot empty
//! again: the containerd shim frees a pod container's root at its Delete). The daemon never
//! mounts or reads the image: it only checks that every piece lies within the size the client
//! named ([`ImageWriter`]) and writes it; the guest mounts what it gets.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_proto::agent::{AgentFailure, AgentRequest, AgentResponse, Decoder, Frame, FrameKind};
use banger_proto::workspace::{WorkspaceImported, DISK_OFFSET_BYTES, MAX_DISK_BYTES};
use banger_vmm::slots;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{Target, Workspace};
use crate::agent_conn::AgentError;

/// How long the agent may take to see the new capacity and mount the disk.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a disk could not be attached (or detached).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Every slot holds a disk, or the VM has none.
    #[error(
        "vm '{vm}' has no free disk slot (it runs on firecracker, was started before disk slots existed, \
         or both slots hold workspaces); the import goes by tar instead"
    )]
    NoFreeSlot {
        /// The VM.
        vm: String,
    },
    /// The size the client named is not one a disk may have.
    #[error(
        "{size} bytes is not a disk size banger attaches (a positive multiple of 1 MiB, at most {MAX_DISK_BYTES})"
    )]
    BadSize {
        /// The size.
        size: u64,
    },
    /// A piece of the image lies outside it, or has no offset.
    #[error("a piece of {len} bytes at offset {offset} lies outside the {size}-byte image")]
    OutOfBounds {
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The image size.
        size: u64,
    },
    /// The client's stream broke the framing or sent something else.
    #[error("corrupt image stream from the client: {0}")]
    Stream(String),
    /// The client went away before the end.
    #[error("the client went away before the end of the image")]
    ClientGone,
    /// The slot file could not be written.
    #[error("cannot write slot file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM refused the resize.
    #[error("cannot resize disk slot {index} of vm '{vm}'")]
    Resize {
        /// The VM.
        vm: String,
        /// The slot.
        index: u8,
        /// Why.
        #[source]
        source: banger_vmm::ControlError,
    },
    /// The VM has no control socket (it stopped).
    #[error("vm '{vm}' stopped before the disk was attached")]
    Stopped {
        /// The VM.
        vm: String,
    },
    /// No disk attached by this daemon is mounted at the directory.
    #[error("vm '{vm}' has no disk attached at {dir}")]
    NotAttached {
        /// The VM.
        vm: String,
        /// The guest directory.
        dir: String,
    },
    /// The agent could not mount or unmount it.
    #[error("the agent of vm '{vm}' could not {what} {dir}")]
    Agent {
        /// The VM.
        vm: String,
        /// `mount the disk at` / `unmount`.
        what: &'static str,
        /// The guest directory.
        dir: String,
        /// Why.
        #[source]
        source: AgentError,
    },
}

/// Whether `size` is a size a disk import may have.
pub fn valid_disk_size(size: u64) -> bool {
    size > 0 && size <= MAX_DISK_BYTES && size.is_multiple_of(1 << 20)
}

/// The first free slot in `vm_dir` (its file exists and is empty).
pub fn free_slot(vm_dir: &Path) -> Option<u8> {
    (0..slots::QEMU_SLOTS)
        .find(|&i| std::fs::metadata(slots::slot_file(vm_dir, i)).is_ok_and(|m| m.is_file() && m.len() == 0))
}

/// The file beside slot `index` of `vm_dir` that names the guest directory its disk is mounted
/// at (written by the daemon: never read from the guest).
fn dir_record(vm_dir: &Path, index: u8) -> PathBuf {
    vm_dir.join(format!("slot{index}.dir"))
}

/// The slot whose disk was attached at `dir` (its file holds a disk and its record names `dir`).
pub fn slot_at(vm_dir: &Path, dir: &str) -> Option<u8> {
    (0..slots::QEMU_SLOTS).find(|&i| {
        let attached = std::fs::metadata(slots::slot_file(vm_dir, i)).is_ok_and(|m| m.is_file() && m.len() > 0);
        // A record is a path the API accepted: at most a few KiB.
        let record = std::fs::read(dir_record(vm_dir, i)).ok().filter(|r| r.len() <= 4096);
        attached && record.is_some_and(|r| r == dir.as_bytes())
    })
}

/// Writes the pieces of an image (`offset` + bytes, as the stream carries them) into a slot
/// file, refusing any that would lie outside `size`.
pub struct ImageWriter {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    /// Bytes written.
    pub written: u64,
}

impl ImageWriter {
    /// A writer into empty slot file `path`, which it sizes to `size` (the rest reads as zeros).
    pub fn open(path: &Path, size: u64) -> Result<Self, AttachError> {
        let io = |source| AttachError::Io { path: path.to_owned(), source };
        let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io)?;
        file.set_len(size).map_err(io)?;
        Ok(Self { file: Arc::new(file), path: path.to_owned(), size, written: 0 })
    }

    /// Checks one frame's payload; the offset and bytes to write.
    pub fn check<'a>(&self, payload: &'a [u8]) -> Result<(u64, &'a [u8]), AttachError> {
        let Some((head, data)) = payload.split_first_chunk::<DISK_OFFSET_BYTES>() else {
            return Err(AttachError::Stream(format!("a piece of {} bytes has no offset", payload.len())));
        };
        let offset = u64::from_le_bytes(*head);
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(AttachError::OutOfBounds { offset, len, size: self.size });
        }
        Ok((offset, data))
    }

    /// Writes one frame's payload.
    pub async fn piece(&mut self, payload: Vec<u8>) -> Result<(), AttachError> {
        let (offset, data) = self.check(&payload)?;
        let len = data.len() as u64;
        let file = Arc::clone(&self.file);
        let written = tokio::task::spawn_blocking(move || file.write_all_at(&payload[DISK_OFFSET_BYTES..], offset))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        written.map_err(|source| AttachError::Io { path: self.path.clone(), source })?;
        self.written += len;
        Ok(())
    }

    /// Empties the slot file again (a failed attach frees its slot).
    pub fn empty(&self) -> Result<(), AttachError> {
        self.file.set_len(0).map_err(|source| AttachError::Io { path: self.path.clone(), source })
    }
}

impl Workspace {
    /// Receives an ext4 image of `size` bytes from the client stream `io` into a free slot of
    /// `target`, attaches it and has the agent mount it at `dir`, under the VM's workspace
    /// lock; then sends the client the final frame. A failure leaves the slot empty.
    pub async fn attach_into(
        &self,
        io: &mut (impl AsyncRead + AsyncWrite + Unpin),
        target: &Target,
        dir: &str,
        size: u64,
    ) {
        let _ws = self.locks.lock(&target.id).await;
        let started = Instant::now();
        let outcome = match self.still_running(target) {
            Ok(()) => self.attach(io, target, dir, size).await.map_err(|e| banger_core::error_chain(&e)),
            Err(e) => Err(e),
        };
        let frame = match outcome {
            Ok((index, written)) => {
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::info!(vm = %target.name, dir, slot = index, size, written, elapsed_ms, "workspace disk attached");
                let done =
                    WorkspaceImported { vm: target.name.clone(), dir: dir.to_owned(), entries: 0, bytes: written };
                Frame::json(1, FrameKind::Response, &done)
            }
            Err(message) => {
                tracing::warn!(vm = %target.name, dir, error = %message, "workspace disk attach failed");
                let message = format!("importing into {}:{dir} as a disk failed: {message}", target.name);
                Frame::json(1, FrameKind::Error, &AgentFailure { message })
            }
        };
        let _ = io.write_all(&frame.encode()).await;
        let _ = io.shutdown().await;
    }

    /// The attach itself: the slot and the bytes written.
    async fn attach(
        &self,
        io: &mut (impl AsyncRead + Unpin),
        target: &Target,
        dir: &str,
        size: u64,
    ) -> Result<(u8, u64), AttachError> {
        if !valid_disk_size(size) {
            return Err(AttachError::BadSize { size });
        }
        let index = free_slot(&target.vm_dir).ok_or_else(|| AttachError::NoFreeSlot { vm: target.name.clone() })?;
        let control = target.control.clone().ok_or_else(|| AttachError::Stopped { vm: target.name.clone() })?;
        let mut writer = ImageWriter::open(&slots::slot_file(&target.vm_dir, index), size)?;
        let received = receive(io, &mut writer).await;
        if let Err(e) = received {
            let _ = writer.empty();
            return Err(e);
        }
        let driver = self.fleet.driver(target.vmm);
        if let Err(source) = driver.resize_slot(&control, index, size).await {
            let _ = writer.empty();
            return Err(AttachError::Resize { vm: target.name.clone(), index, source });
        }
        let request = AgentRequest::MountDisk { serial: slots::slot_serial(index), dir: dir.to_owned() };
        let mounted = match target.agent.call(&request, MOUNT_TIMEOUT).await {
            Ok(AgentResponse::Ok) => Ok(()),
            Ok(other) => Err(AgentError::Unexpected(format!("{other:?}"))),
            Err(e) => Err(e),
        };
        if let Err(source) = mounted {
            // Nothing is mounted: take the disk away again.
            let _ = driver.resize_slot(&control, index, 0).await;
            let _ = writer.empty();
            return Err(AttachError::Agent {
                vm: target.name.clone(),
                what: "mount the disk at",
                dir: dir.to_owned(),
                source,
            });
        }
        let record = dir_record(&target.vm_dir, index);
        if let Err(e) = std::fs::write(&record, dir) {
            tracing::warn!(vm = %target.name, path = %record.display(), error = %e, "cannot record the slot's directory");
        }
        Ok((index, writer.written))
    }

    /// Unmounts the disk attached at `dir` of `target` and empties its slot, under the VM's
    /// workspace lock.
    pub async fn detach_dir(&self, target: &Target, dir: &str) -> Result<(), AttachError> {
        let _ws = self.locks.lock(&target.id).await;
        let not_attached = || AttachError::NotAttached { vm: target.name.clone(), dir: dir.to_owned() };
        let index = slot_at(&target.vm_dir, dir).ok_or_else(not_attached)?;
        let control = target.control.clone().ok_or_else(|| AttachError::Stopped { vm: target.name.clone() })?;
        let request = AgentRequest::UnmountDisk { dir: dir.to_owned() };
        match target.agent.call(&request, MOUNT_TIMEOUT).await {
            Ok(AgentResponse::Ok) => {}
            Ok(other) => {
                let source = AgentError::Unexpected(format!("{other:?}"));
                return Err(AttachError::Agent {
                    vm: target.name.clone(),
                    what: "unmount",
                    dir: dir.to_owned(),
                    source,
                });
            }
            Err(source) => {
                return Err(AttachError::Agent {
                    vm: target.name.clone(),
                    what: "unmount",
                    dir: dir.to_owned(),
                    source,
                })
            }
        }
        self.fleet.driver(target.vmm).resize_slot(&control, index, 0).await.map_err(|source| AttachError::Resize {
            vm: target.name.clone(),
            index,
            source,
        })?;
        let path = slots::slot_file(&target.vm_dir, index);
        let file = std::fs::OpenOptions::new().write(true).open(&path);
        file.and_then(|f| f.set_len(0)).map_err(|source| AttachError::Io { path, source })?;
        let _ = std::fs::remove_file(dir_record(&target.vm_dir, index));
        tracing::info!(vm = %target.name, dir, slot = index, "disk detached");
        Ok(())
    }
}

/// Reads the image's pieces from `io` into `writer` until the empty `Data` that ends them.
async fn receive(io: &mut (impl AsyncRead + Unpin), writer: &mut ImageWriter) -> Result<(), AttachError> {
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        while let Some(frame) = decoder.next_frame().map_err(|e| AttachError::Stream(e.to_string()))? {
            if frame.kind != FrameKind::Data {
                return Err(AttachError::Stream(format!("unexpected {:?} frame", frame.kind)));
            }
            if frame.payload.is_empty() {
                return Ok(());
            }
            writer.piece(frame.payload).await?;
        }
        match io.read(&mut buf).await {
            Ok(n) if n > 0 => decoder.push(&buf[..n]),
            _ => return Err(AttachError::ClientGone),
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn piece(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend_from_slice(data);
        p
    }

    #[tokio::test]
    async fn pieces_land_at_their_offsets_and_none_may_pass_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = slots::slot_file(dir.path(), 0);
        std::fs::write(&path, b"").unwrap();
        let mut w = ImageWriter::open(&path, 1 << 20).unwrap();
        w.piece(piece(4096, b"abc")).await.unwrap();
        w.piece(piece((1 << 20) - 2, b"yz")).await.unwrap();
        for bad in [piece((1 << 20) - 1, b"yz"), piece(u64::MAX, b"a"), vec![1, 2, 3]] {
            assert!(w.piece(bad).await.is_err());
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 1 << 20, "sized to the image");
        assert_eq!(&bytes[4096..4099], b"abc");
        assert_eq!(&bytes[(1 << 20) - 2..], b"yz");
        assert!(bytes[..4096].iter().all(|&b| b == 0), "what was not sent reads as zeros");
        w.empty().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "a failed attach frees its slot");
    }

    #[tokio::test]
    async fn a_stream_ends_at_its_empty_data_and_refuses_other_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = slots::slot_file(dir.path(), 0);
        std::fs::write(&path, b"").unwrap();
        let mut w = ImageWriter::open(&path, 1 << 20).unwrap();
        let mut stream = Frame::new(1, FrameKind::Data, piece(0, b"head")).encode();
        stream.extend(Frame::new(1, FrameKind::Data, Vec::new()).encode());
        receive(&mut stream.as_slice(), &mut w).await.unwrap();
        assert_eq!(w.written, 4);

        let mut w = ImageWriter::open(&path, 1 << 20).unwrap();
        let bad = Frame::new(1, FrameKind::Close, Vec::new()).encode();
        assert!(matches!(receive(&mut bad.as_slice(), &mut w).await, Err(AttachError::Stream(_))));
        let cut = Frame::new(1, FrameKind::Data, piece(0, b"head")).encode();
        assert!(matches!(receive(&mut cut.as_slice(), &mut w).await, Err(AttachError::ClientGone)));
    }

    #[test]
    fn a_free_slot_is_an_empty_slot_file_and_sizes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(free_slot(dir.path()), None, "a vm booted without slots has none");
        slots::create_missing(dir.path(), slots::QEMU_SLOTS).unwrap();
        assert_eq!(free_slot(dir.path()), Some(0));
        std::fs::write(slots::slot_file(dir.path(), 0), b"attached").unwrap();
        assert_eq!(free_slot(dir.path()), Some(1));
        std::fs::write(slots::slot_file(dir.path(), 1), b"attached").unwrap();
        assert_eq!(free_slot(dir.path()), None);
        assert_eq!(slot_at(dir.path(), "/root/a"), None);
        std::fs::write(dir_record(dir.path(), 1), "/root/a").unwrap();
        assert_eq!(slot_at(dir.path(), "/root/a"), Some(1), "found by the daemon's record");
        assert_eq!(slot_at(dir.path(), "/root/b"), None);
        std::fs::write(slots::slot_file(dir.path(), 1), b"").unwrap();
        assert_eq!(slot_at(dir.path(), "/root/a"), None, "an empty slot holds nothing to detach");
        assert!(valid_disk_size(1 << 30));
        for bad in [0, 1 << 19, MAX_DISK_BYTES + (1 << 20)] {
            assert!(!valid_disk_size(bad), "{bad}");
        }
    }
}
