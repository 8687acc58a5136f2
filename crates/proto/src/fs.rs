//! File routes (`/v1/vms/{vm}/files/...`) and the agent's file requests share these types: a
//! file's `lstat` as [`FileStat`], and the limits both sides hold to.

use serde::{Deserialize, Serialize};

/// Most entries a listing returns; more make it `truncated`.
pub const LIST_MAX_ENTRIES: usize = 10_000;
/// Response header of `GET .../files/content`: the file's whole size, whatever `limit` cut.
pub const FILE_SIZE_HEADER: &str = "x-banger-file-size";
/// Default mode of a written file (`0644`).
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Mode of parent directories made on the way (`0755`).
pub const PARENT_DIR_MODE: u32 = 0o755;

/// What a path is (`lstat`: a symlink is a symlink, never its target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// A guest path's `lstat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
pub struct FileStat {
    /// The absolute guest path.
    pub path: String,
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes (a symlink's: the length of its target).
    pub size: u64,
    /// Permission bits, set-id and sticky bits included, no type bits (e.g. `420` = `0644`).
    pub mode: u32,
    /// Last modification, Unix seconds.
    pub mtime: i64,
    /// A symlink's target, as stored.
    pub link_target: Option<String>,
}

/// Why a file request failed, as the agent reports it (the daemon maps `code` to a status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsError {
    /// What kind of failure.
    pub code: FsErrorCode,
    /// One line naming the path and the cause.
    pub message: String,
}

/// What kind of file failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsErrorCode {
    /// The path (or a parent) does not exist.
    NotFound,
    /// A bad request: a relative path, `/` where it cannot be, the wrong kind of file.
    Invalid,
    /// The state of the file system refuses it: not empty, exists, no space.
    Conflict,
    /// Anything else.
    Io,
}

/// A directory listing: `GET /v1/vms/{vm}/files/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
pub struct FileList {
    /// The directory.
    pub path: String,
    /// Its entries, sorted by name; each `path` is the entry's full path.
    pub entries: Vec<FileStat>,
    /// Whether the directory holds more than the entries listed (at most 10,000).
    pub truncated: bool,
}

/// Body of `POST /v1/vms/{vm}/files/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
pub struct MkdirRequest {
    /// Absolute guest path.
    pub path: String,
    /// Make missing parents (`0755`) too, and accept an existing directory.
    #[serde(default)]
    pub parents: bool,
    /// Permission bits (default `0755`, i.e. 493).
    #[serde(default)]
    pub mode: Option<u32>,
}

/// What `PUT /v1/vms/{vm}/files/archive` extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
pub struct ArchiveExtracted {
    /// Entries extracted (files, directories, symlinks).
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// Query naming one guest path (`stat`, `list`, `archive`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathQuery {
    /// Absolute guest path.
    pub path: String,
}

/// Query of `GET .../files/content`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadQuery {
    /// Absolute guest path.
    pub path: String,
    /// Most bytes to send.
    #[serde(default)]
    pub limit: Option<u64>,
}

/// Query of `PUT .../files/content`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteQuery {
    /// Absolute guest path.
    pub path: String,
    /// Permission bits, decimal (default 420 = `0644`).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Make missing parent directories.
    #[serde(default)]
    pub parents: Option<bool>,
}

/// Query of `DELETE .../files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveQuery {
    /// Absolute guest path.
    pub path: String,
    /// Remove a directory with what it holds.
    #[serde(default)]
    pub recursive: Option<bool>,
}

/// Whether `path` is absolute and free of `.`/`..` components and NUL bytes: what every file
/// route and file request takes.
pub fn valid_guest_path(path: &str) -> bool {
    use std::path::{Component, Path};
    path.starts_with('/')
        && !path.contains('\0')
        && Path::new(path).components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !path.split('/').any(|part| part == "." || part == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_must_be_absolute_and_plain() {
        for ok in ["/", "/root", "/root/a b/c.txt", "/x/"] {
            assert!(valid_guest_path(ok), "{ok}");
        }
        for bad in ["", "root", "./x", "/a/../b", "/a/./b", "/a/..", "/a\0b"] {
            assert!(!valid_guest_path(bad), "{bad:?}");
        }
        let stat = FileStat {
            path: "/l".into(),
            kind: FileKind::Symlink,
            size: 4,
            mode: 0o777,
            mtime: 5,
            link_target: Some("/etc".into()),
        };
        assert_eq!(
            serde_json::to_string(&stat).expect("json"),
            r#"{"path":"/l","kind":"symlink","size":4,"mode":511,"mtime":5,"link_target":"/etc"}"#
        );
    }
}
