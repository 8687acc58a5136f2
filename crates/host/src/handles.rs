//! What is *currently true* of a running VM: its VMM pid, sockets, tap and overlay files. These
//! never go into SQLite; they live in the daemon's memory and in `<vm dir>/handles.json`, so a
//! restarted daemon can adopt a VM whose VMM outlived it, or clean up after one that died.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::process::pid_alive;

/// Transient handles of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandles {
    /// The VMM's process id.
    pub pid: Option<u32>,
    /// A string the VMM's command line contains (its VM directory), guarding against pid reuse.
    pub marker: String,
    /// VMM control socket (QMP or the Firecracker API).
    pub control_socket: Option<String>,
    /// Agent channel socket.
    pub agent_socket: Option<String>,
    /// Tap device.
    pub tap: Option<String>,
    /// Per-VM files to remove when the VM stops (overlay scratch, sockets).
    #[serde(default)]
    pub scratch_files: Vec<String>,
}

/// Why the handles file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HandlesError {
    /// Reading or writing the file failed.
    #[error("handles file {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("handles file {path} is corrupt")]
    Corrupt {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl VmHandles {
    /// The one liveness check: the VMM process is alive and is this VM's.
    pub fn is_alive(&self) -> bool {
        self.pid.is_some_and(|pid| pid_alive(pid, &self.marker))
    }

    /// Reads `path`; a missing file is `Ok(None)`.
    pub fn load(path: &Path) -> Result<Option<Self>, HandlesError> {
        let shown = || path.display().to_string();
        match std::fs::read(path) {
            Ok(raw) => {
                serde_json::from_slice(&raw).map(Some).map_err(|source| HandlesError::Corrupt { path: shown(), source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HandlesError::Io { path: shown(), source }),
        }
    }

    /// Writes `path` atomically (temp file, fsync, rename).
    pub fn store(&self, path: &Path) -> Result<(), HandlesError> {
        let io = |source| HandlesError::Io { path: path.display().to_string(), source };
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self)
            .map_err(|source| HandlesError::Corrupt { path: path.display().to_string(), source })?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Removes `path`; a missing file is fine.
    pub fn remove(path: &Path) -> Result<(), HandlesError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(HandlesError::Io { path: path.display().to_string(), source: e })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handles.json");
        assert!(VmHandles::load(&path).expect("missing").is_none());
        let h = VmHandles {
            pid: Some(std::process::id()),
            marker: String::new(),
            tap: Some("tap0".into()),
            ..Default::default()
        };
        h.store(&path).expect("store");
        let back = VmHandles::load(&path).expect("load").expect("some");
        assert_eq!(back, h);
        assert!(back.is_alive());
        std::fs::write(&path, b"{not json").expect("write");
        assert!(matches!(VmHandles::load(&path), Err(HandlesError::Corrupt { .. })));
        VmHandles::remove(&path).expect("remove");
        VmHandles::remove(&path).expect("remove again");
        assert!(!VmHandles::default().is_alive());
    }
}
