//! `read_file` and `write_file`: file contents travel in `Data` frames. Uploads are written to a
//! temporary file beside the target and renamed over it, so readers never see half a file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use banger_proto::agent::{AgentResponse, FrameKind};

use crate::channel::Link;

/// Bytes per `Data` frame sent to the host.
const CHUNK: usize = 256 * 1024;

/// A file transfer that failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is not absolute.
    #[error("{0}: path must be absolute")]
    Relative(String),
    /// Not a regular file.
    #[error("{0}: not a regular file")]
    NotFile(String),
    /// An I/O call failed.
    #[error("{path}: cannot {what}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host went away mid-transfer.
    #[error("{0}: the host went away")]
    Gone(String),
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io { path: path.display().to_string(), what, source }
}

/// Serves `read_file`: `Data` chunks, then `Response(File)`; `Error` on failure.
pub fn read_file(link: &Link, path: &str) {
    match send_file(link, Path::new(path)) {
        Ok(response) => {
            let _ = link.json(FrameKind::Response, &response);
        }
        Err(FileError::Gone(_)) => {}
        Err(e) => link.fail(&e.to_string()),
    }
    link.finish();
}

fn send_file(link: &Link, path: &Path) -> Result<AgentResponse, FileError> {
    if !path.is_absolute() {
        return Err(FileError::Relative(path.display().to_string()));
    }
    let mut file = File::open(path).map_err(io(path, "open"))?;
    let meta = file.metadata().map_err(io(path, "stat"))?;
    if !meta.is_file() {
        return Err(FileError::NotFile(path.display().to_string()));
    }
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(path, "read")(e)),
        };
        link.send(FrameKind::Data, buf[..n].to_vec()).map_err(|_| FileError::Gone(path.display().to_string()))?;
        size += n as u64;
    }
    Ok(AgentResponse::File { size, mode: meta.permissions().mode() & 0o7777 })
}

/// Serves `write_file`: takes `Data` chunks until an empty one, then answers `Written`.
pub fn write_file(link: &Link, path: &str, mode: u32, chunks: &mpsc::Receiver<Vec<u8>>) {
    match receive_file(Path::new(path), mode, chunks) {
        Ok(size) => {
            let _ = link.json(FrameKind::Response, &AgentResponse::Written { size });
        }
        Err(FileError::Gone(_)) => {}
        Err(e) => link.fail(&e.to_string()),
    }
    link.finish();
}

fn temp_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy();
    Some(path.with_file_name(format!(".{name}.banger-{}.tmp", std::process::id())))
}

fn receive_file(path: &Path, mode: u32, chunks: &mpsc::Receiver<Vec<u8>>) -> Result<u64, FileError> {
    if !path.is_absolute() {
        return Err(FileError::Relative(path.display().to_string()));
    }
    let temp = temp_path(path).ok_or_else(|| FileError::NotFile(path.display().to_string()))?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode & 0o7777)
            .open(&temp)
            .map_err(io(path, "create"))?;
        let mut size = 0u64;
        loop {
            let chunk = chunks.recv().map_err(|_| FileError::Gone(path.display().to_string()))?;
            if chunk.is_empty() {
                break;
            }
            file.write_all(&chunk).map_err(io(path, "write"))?;
            size += chunk.len() as u64;
        }
        // The umask may have trimmed the mode at create.
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)).map_err(io(path, "chmod"))?;
        file.sync_all().map_err(io(path, "sync"))?;
        std::fs::rename(&temp, path).map_err(io(path, "rename"))?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_land_atomically_with_their_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("f.txt");
        let (tx, rx) = mpsc::channel();
        for chunk in [b"hello ".to_vec(), b"world".to_vec(), Vec::new()] {
            tx.send(chunk).expect("send");
        }
        assert_eq!(receive_file(&target, 0o640, &rx).expect("write"), 11);
        assert_eq!(std::fs::read(&target).expect("read"), b"hello world");
        assert_eq!(std::fs::metadata(&target).expect("meta").permissions().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1, "no temp file left");
    }

    #[test]
    fn an_abandoned_upload_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("f");
        let (tx, rx) = mpsc::channel();
        tx.send(b"partial".to_vec()).expect("send");
        drop(tx);
        assert!(matches!(receive_file(&target, 0o644, &rx), Err(FileError::Gone(_))));
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        assert!(matches!(receive_file(Path::new("rel"), 0o644, &mpsc::channel().1), Err(FileError::Relative(_))));
    }
}
