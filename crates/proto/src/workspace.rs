//! Workspace streams: `POST /v1/vms/{vm}/workspace/import` and `.../workspace/export`.
//!
//! Both ask for an HTTP upgrade (`Upgrade: banger-workspace`); the daemon checks the VM and the
//! query first and answers a plain JSON error when it refuses. After `101 Switching Protocols`
//! both sides speak the agent channel's framing (`crate::agent`) on channel 1:
//!
//! - import: client → daemon `Data` frames holding a tar stream, an empty `Data` at the end;
//!   daemon → client one final `Response` ([`WorkspaceImported`]) or `Error`. The daemon reads
//!   the client only as fast as the guest unpacks, so the socket carries the back-pressure.
//! - import as a disk (the query names `disk_bytes`): client → daemon `Data` frames each
//!   holding a little-endian `u64` offset and the bytes of an ext4 image the CLI built at that
//!   offset (all-zero ranges are left out: they read as zeros), an empty `Data` at the end;
//!   every piece must lie within `disk_bytes`. The daemon writes them into a free spare slot of
//!   the VM, grows the slot to `disk_bytes` and has the agent mount it at `dir` (which must be
//!   missing or empty); then the final `Response` or `Error` as above.
//! - export: daemon → client `Data` frames (a git bundle, or a patch), then one final
//!   `Response` ([`WorkspaceExported`]) or `Error`; the client sends nothing.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The upgrade protocol name of both workspace endpoints.
pub const WORKSPACE_PROTOCOL: &str = "banger-workspace";

/// Query of `POST /v1/vms/{vm}/workspace/import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceImportQuery {
    /// Absolute guest directory to unpack into, e.g. `/root/myrepo` (made when missing).
    pub dir: String,
    /// The stream is an ext4 image of this many bytes, attached as a disk and mounted at
    /// `dir` (QEMU VMs; at most [`MAX_DISK_BYTES`]), instead of a tar stream.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

/// The largest image a disk import may attach: 256 GiB (sparse: only what is written uses
/// host disk).
pub const MAX_DISK_BYTES: u64 = 256 << 30;

/// Bytes of the offset that starts each `Data` frame of a disk import.
pub const DISK_OFFSET_BYTES: usize = 8;

/// The final answer of an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceImported {
    /// The VM's name.
    pub vm: String,
    /// The guest directory.
    pub dir: String,
    /// Entries unpacked (files, directories, symlinks).
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// What an export brings back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportKind {
    /// A git bundle of the guest's `HEAD` (without the commits under `basis`).
    Bundle,
    /// The guest's uncommitted changes against its `HEAD`, untracked files included, as a
    /// binary-safe `git diff`.
    Patch,
}

/// Query of `POST /v1/vms/{vm}/workspace/export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceExportQuery {
    /// Absolute guest directory of the repository.
    pub dir: String,
    /// Bundle or patch.
    pub kind: ExportKind,
    /// For a bundle: a commit the host has (its `HEAD`); commits reachable from it are left
    /// out when the guest has it too.
    pub basis: Option<String>,
    /// The most bytes the guest may send [default: [`DEFAULT_EXPORT_MAX_BYTES`]]; a larger
    /// export ends with an error.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// The export size cap when the query names none: 1 GiB.
pub const DEFAULT_EXPORT_MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// The error of an export from `vm` larger than `cap` bytes, naming the fix.
pub fn export_too_large(vm: &str, cap: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    let shown = match cap {
        c if c >= 1024 * MIB && c.is_multiple_of(1024 * MIB) => format!("{}G", c / (1024 * MIB)),
        c if c >= MIB && c.is_multiple_of(MIB) => format!("{}M", c / MIB),
        c => format!("{c} bytes"),
    };
    format!(
        "the export from vm '{vm}' is larger than the cap of {shown}; nothing was written; \
         raise the cap with `banger workspace export --max-size SIZE` (e.g. 4G)"
    )
}

/// The final answer of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceExported {
    /// The VM's name.
    pub vm: String,
    /// The guest directory.
    pub dir: String,
    /// Bytes sent.
    pub bytes: u64,
}

/// Whether `dir` may name a guest workspace directory: absolute, normal (no `.`, `..` or
/// empty components), not `/` itself, and free of NUL and newline bytes.
pub fn valid_guest_dir(dir: &str) -> bool {
    let Some(rest) = dir.strip_prefix('/') else { return false };
    !rest.is_empty() && !dir.contains(['\0', '\n']) && rest.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Whether `basis` looks like a full commit id (40 or 64 lowercase hex digits).
pub fn valid_commit_id(basis: &str) -> bool {
    matches!(basis.len(), 40 | 64) && basis.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_dirs_must_be_absolute_and_normal() {
        for good in ["/root/repo", "/srv/a b/c", "/x"] {
            assert!(valid_guest_dir(good), "{good}");
        }
        for bad in ["", "/", "root/repo", "/root/../etc", "/root/./r", "/root//r", "/root/r/", "/a\0b", "/a\nb"] {
            assert!(!valid_guest_dir(bad), "{bad:?}");
        }
    }

    #[test]
    fn commit_ids_are_full_lowercase_hex() {
        assert!(valid_commit_id(&"a".repeat(40)));
        assert!(valid_commit_id(&"0f".repeat(32)));
        assert!(!valid_commit_id("HEAD"));
        assert!(!valid_commit_id(&"A".repeat(40)));
        assert!(!valid_commit_id(&"a".repeat(39)));
        assert!(!valid_commit_id(&format!("{}; rm", "a".repeat(36))));
    }

    #[test]
    fn queries_use_snake_case() {
        let q = WorkspaceExportQuery { dir: "/root/r".into(), kind: ExportKind::Patch, basis: None, max_bytes: None };
        assert_eq!(
            serde_json::to_string(&q).expect("json"),
            r#"{"dir":"/root/r","kind":"patch","basis":null,"max_bytes":null}"#
        );
    }
}
