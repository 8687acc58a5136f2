//! A banger image as a one-layer OCI image layout, so buildah can take it as a base with no
//! registry: the ext4 file is mounted read-only in a private mount namespace (the mount and its
//! loop device go with the namespace, even if the export is killed) and tarred as it is.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;

use super::{io_error, DockerfileError};
use crate::oci::{sha256_reader, REF_NAME_ANNOTATION};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Writes the tree of the ext4 image `file` as an OCI layout in `dir` (tag `latest`), using
/// `mnt` as the (private) mount point.
pub fn export_ext4(file: &Path, dir: &Path, mnt: &Path) -> Result<(), DockerfileError> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io_error(&blobs))?;
    std::fs::create_dir_all(mnt).map_err(io_error(mnt))?;
    let tar = dir.join("layer.tar");
    let script = "set -e; mount -t ext4 -o ro,loop,noload \"$1\" \"$2\"; \
                  exec tar --numeric-owner --xattrs --xattrs-include='*' --exclude=./lost+found -C \"$2\" -cf \"$3\" .";
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"])
        .arg(file)
        .arg(mnt)
        .arg(&tar)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DockerfileError::Command { command: "unshare mount+tar".into(), detail: e.to_string() })?;
    if !output.status.success() {
        return Err(DockerfileError::Command {
            command: format!("export of {}", file.display()),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    write_layout(dir, &tar)
}

/// Makes `dir` an OCI layout whose one image has the uncompressed layer `tar` (moved into it).
pub fn write_layout(dir: &Path, tar: &Path) -> Result<(), DockerfileError> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io_error(&blobs))?;
    let digest = std::fs::File::open(tar).and_then(sha256_reader).map_err(io_error(tar))?;
    let size = std::fs::metadata(tar).map_err(io_error(tar))?.len();
    let hex = digest.trim_start_matches("sha256:");
    let layer = blobs.join(hex);
    std::fs::rename(tar, &layer).map_err(io_error(&layer))?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [digest] },
    });
    let (config_digest, config_size) = put(&blobs, &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size }],
    });
    let (manifest_digest, manifest_size) = put(&blobs, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST, "digest": manifest_digest, "size": manifest_size,
            "annotations": { REF_NAME_ANNOTATION: "latest" },
        }],
    });
    write(&dir.join("index.json"), index.to_string().as_bytes())?;
    write(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
}

fn put(blobs: &Path, doc: &serde_json::Value) -> Result<(String, usize), DockerfileError> {
    let bytes = doc.to_string().into_bytes();
    let digest = sha256_reader(bytes.as_slice()).map_err(io_error(blobs))?;
    write(&blobs.join(digest.trim_start_matches("sha256:")), &bytes)?;
    Ok((digest, bytes.len()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), DockerfileError> {
    std::fs::write(path, bytes).map_err(io_error(path))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;
    use crate::oci::{fetch, OciSource};

    #[test]
    fn the_layout_passes_the_oci_checks() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "x\n").unwrap();
        let tar = dir.path().join("layer.tar");
        let status = Command::new("tar").arg("-C").arg(&tree).arg("-cf").arg(&tar).arg(".").status().unwrap();
        assert!(status.success());
        let layout = dir.path().join("layout");
        write_layout(&layout, &tar).unwrap();
        let source = OciSource::Layout { path: layout, tag: Some("latest".into()) };
        let image = fetch(&source, &dir.path().join("blobs"), &mut |_| {}).unwrap();
        assert_eq!(image.layers.len(), 1);
        assert!(image.layers[0].diff_id.is_some(), "the config names the layer's diff ID");
    }
}
