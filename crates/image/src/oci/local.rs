//! Local sources: OCI image layouts and `docker save` tarballs, read in place.
//!
//! Digests found in the documents are checked as hex before any path is built from them, so a
//! hostile `index.json` cannot name a blob outside `blobs/sha256/`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path};

use serde::Deserialize;

use super::{
    io_error, sha256_hex, sha256_reader, BlobLocation, FetchedImage, ImageConfig, LayerBlob, PullImageError,
    REF_NAME_ANNOTATION,
};

/// Largest JSON document (index, manifest, config) read into memory.
const MAX_DOCUMENT: u64 = 16 * 1024 * 1024;
/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;

/// A descriptor in an index or manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
}

/// A descriptor's platform.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
}

/// An image index or an image manifest (told apart by their fields, not their media type).
#[derive(Debug, Clone, Deserialize)]
struct Document {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// The linux/amd64 entry of an index; an index of one entry without a platform is taken as is.
pub(crate) fn pick_platform<'a>(entries: &'a [Descriptor], reference: &str) -> Result<&'a Descriptor, PullImageError> {
    let found =
        entries.iter().find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"));
    match (found, entries) {
        (Some(found), _) => Ok(found),
        (None, [only]) if only.platform.is_none() => Ok(only),
        _ => {
            let available: Vec<String> = entries
                .iter()
                .map(|d| match &d.platform {
                    Some(p) => format!("{}/{}", p.os, p.architecture),
                    None => "unknown".to_owned(),
                })
                .collect();
            Err(PullImageError::NoPlatform {
                reference: reference.to_owned(),
                available: if available.is_empty() { "nothing".to_owned() } else { available.join(", ") },
            })
        }
    }
}

fn bad_layout(path: &Path, reason: impl Into<String>) -> PullImageError {
    PullImageError::BadSource { path: path.to_owned(), kind: "OCI image layout", reason: reason.into() }
}

fn bad_archive(path: &Path, reason: impl Into<String>) -> PullImageError {
    PullImageError::BadSource { path: path.to_owned(), kind: "docker-archive", reason: reason.into() }
}

fn bad_document(what: &str, reference: &str, error: impl ToString) -> PullImageError {
    PullImageError::BadDocument { what: what.to_owned(), reference: reference.to_owned(), reason: error.to_string() }
}

fn read_limited(mut reader: impl Read, path: &Path) -> Result<Vec<u8>, PullImageError> {
    let mut bytes = Vec::new();
    (&mut reader).take(MAX_DOCUMENT + 1).read_to_end(&mut bytes).map_err(io_error(path))?;
    if bytes.len() as u64 > MAX_DOCUMENT {
        return Err(PullImageError::Io {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, "document larger than 16 MiB"),
        });
    }
    Ok(bytes)
}

/// A layout's blob for `digest`, checked to exist.
fn layout_blob(layout: &Path, digest: &str, reference: &str) -> Result<BlobLocation, PullImageError> {
    let hex = sha256_hex(digest, reference)?;
    let path = layout.join("blobs/sha256").join(hex);
    match BlobLocation::file(&path) {
        Ok(blob) => Ok(blob),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(bad_layout(layout, format!("blob {digest} is missing from blobs/sha256/")))
        }
        Err(e) => Err(io_error(&path)(e)),
    }
}

/// Reads a small blob and checks its digest (indexes and manifests are verified as they are
/// read, since what they name is trusted from then on).
fn read_verified(
    layout: &Path,
    descriptor: &Descriptor,
    what: &str,
    reference: &str,
) -> Result<Vec<u8>, PullImageError> {
    let blob = layout_blob(layout, &descriptor.digest, reference)?;
    let bytes = read_limited(blob.open().map_err(io_error(&blob.path))?, &blob.path)?;
    let actual = sha256_reader(bytes.as_slice()).map_err(io_error(&blob.path))?;
    if actual != descriptor.digest {
        return Err(PullImageError::DigestMismatch {
            what: what.to_owned(),
            expected: descriptor.digest.clone(),
            actual,
        });
    }
    Ok(bytes)
}

type Resolved = (FetchedImage, Option<(BlobLocation, String)>);

/// Finds the image `tag` (or the only image) of the layout at `layout`, down to its manifest;
/// returns the image and its config blob with the config's digest.
pub(crate) fn resolve_layout(layout: &Path, tag: Option<&str>, reference: &str) -> Result<Resolved, PullImageError> {
    let marker = layout.join("oci-layout");
    if !marker.is_file() {
        return Err(bad_layout(layout, "it has no 'oci-layout' file"));
    }
    let index_path = layout.join("index.json");
    let file = File::open(&index_path).map_err(|_| bad_layout(layout, "it has no readable 'index.json'"))?;
    let index: Document = serde_json::from_slice(&read_limited(file, &index_path)?)
        .map_err(|e| bad_layout(layout, format!("index.json: {e}")))?;
    let entries = index.manifests.unwrap_or_default();
    let tag_of = |d: &Descriptor| d.annotations.get(REF_NAME_ANNOTATION).cloned();
    let tags = || {
        let tags: Vec<String> = entries.iter().filter_map(tag_of).collect();
        if tags.is_empty() {
            "none".to_owned()
        } else {
            tags.join(", ")
        }
    };
    let mut descriptor = match tag {
        Some(tag) => entries
            .iter()
            .find(|d| tag_of(d).as_deref() == Some(tag))
            .ok_or_else(|| bad_layout(layout, format!("no image is tagged '{tag}' (tags: {})", tags())))?,
        None => match entries.as_slice() {
            [only] => only,
            [] => return Err(bad_layout(layout, "index.json lists no image")),
            _ => {
                return Err(bad_layout(
                    layout,
                    format!("it holds {} images; pick one with DIR:TAG (tags: {})", entries.len(), tags()),
                ))
            }
        },
    }
    .clone();
    for _ in 0..MAX_INDEX_DEPTH {
        let bytes = read_verified(layout, &descriptor, "manifest", reference)?;
        let document: Document = serde_json::from_slice(&bytes).map_err(|e| bad_document("manifest", reference, e))?;
        if let Some(entries) = document.manifests {
            descriptor = pick_platform(&entries, reference)?.clone();
            continue;
        }
        let (Some(config), Some(layers)) = (document.config, document.layers) else {
            return Err(bad_document("manifest", reference, "it is neither an image index nor an image manifest"));
        };
        let config_blob = layout_blob(layout, &config.digest, reference)?;
        let config_bytes = read_limited(config_blob.open().map_err(io_error(&config_blob.path))?, &config_blob.path)?;
        let image_config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| bad_document("image config", reference, e))?;
        let layers = layers
            .into_iter()
            .map(|d| {
                Ok(LayerBlob {
                    blob: layout_blob(layout, &d.digest, reference)?,
                    digest: Some(d.digest),
                    diff_id: None,
                    media_type: d.media_type,
                })
            })
            .collect::<Result<Vec<_>, PullImageError>>()?;
        let image = FetchedImage {
            reference: reference.to_owned(),
            manifest_digest: Some(descriptor.digest.clone()),
            config: image_config,
            layers,
        };
        return Ok((image, Some((config_blob, config.digest))));
    }
    Err(bad_document("image index", reference, "indexes nest too deeply"))
}

/// A member of the outer tarball.
#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, len: u64 },
    Link(String),
}

/// `./a//b/` → `a/b`; `None` if it climbs out with `..`.
fn archive_name(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?.to_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// The entry in `members` for `name`, following symlink members (old `docker save` links
/// duplicate layers to one another) a few times.
fn lookup(members: &HashMap<String, Member>, name: &str) -> Option<(u64, u64)> {
    let mut name = archive_name(name)?;
    for _ in 0..8 {
        match members.get(&name)? {
            Member::File { offset, len } => return Some((*offset, *len)),
            Member::Link(target) => {
                let base = Path::new(&name).parent().map(Path::to_owned).unwrap_or_default();
                name = archive_name(&base.join(target).to_string_lossy())?;
            }
        }
    }
    None
}

/// `manifest.json` of a docker-archive.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifest {
    config: String,
    layers: Vec<String>,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
}

/// The digest a member's name gives (`blobs/sha256/HEX`, `HEX.json`), if any.
fn digest_from_name(name: &str) -> Option<String> {
    let base = name.strip_prefix("blobs/sha256/").or_else(|| name.strip_suffix(".json"))?;
    let digest = format!("sha256:{base}");
    sha256_hex(&digest, "").ok()?;
    Some(digest)
}

/// Reads the `docker save` tarball at `archive` (decompressing it into `scratch` first if it is
/// gzip'd or zstd'd), returning the image and, when its name gives one, the config's digest.
pub(crate) fn resolve_docker_archive(
    archive: &Path,
    scratch: &Path,
    reference: &str,
) -> Result<Resolved, PullImageError> {
    let file = File::open(archive).map_err(io_error(archive))?;
    let mut reader = BufReader::new(file);
    let magic = reader.fill_buf().map_err(io_error(archive))?.to_vec();
    let tar_path = match super::flatten::Compression::detect(&magic) {
        super::flatten::Compression::None => archive.to_owned(),
        compression => {
            let out = scratch.join("archive.tar");
            let mut decoder = compression.decoder(reader).map_err(io_error(archive))?;
            let mut file = File::create(&out).map_err(io_error(&out))?;
            io::copy(&mut decoder, &mut file)
                .map_err(|e| bad_archive(archive, format!("cannot decompress it: {e}")))?;
            out
        }
    };
    let members = index_archive(&tar_path).map_err(|e| bad_archive(archive, format!("not a tar file: {e}")))?;
    let member = |name: &str| {
        lookup(&members, name)
            .map(|(offset, len)| BlobLocation { path: tar_path.clone(), offset, len })
            .ok_or_else(|| bad_archive(archive, format!("'{name}' is missing")))
    };
    let manifest_blob = member("manifest.json")?;
    let bytes = read_limited(manifest_blob.open().map_err(io_error(archive))?, archive)?;
    let manifests: Vec<ArchiveManifest> =
        serde_json::from_slice(&bytes).map_err(|e| bad_archive(archive, format!("manifest.json: {e}")))?;
    let manifest = match manifests.as_slice() {
        [only] => only,
        [] => return Err(bad_archive(archive, "manifest.json lists no image")),
        several => {
            let tags: Vec<String> = several.iter().flat_map(|m| m.repo_tags.clone().unwrap_or_default()).collect();
            return Err(bad_archive(
                archive,
                format!("it holds {} images ({}); save one image per archive", several.len(), tags.join(", ")),
            ));
        }
    };
    let config_blob = member(&manifest.config)?;
    let config_bytes = read_limited(config_blob.open().map_err(io_error(archive))?, archive)?;
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| bad_document("image config", reference, e))?;
    let layers = manifest
        .layers
        .iter()
        .map(|name| {
            Ok(LayerBlob {
                blob: member(name)?,
                digest: archive_name(name).as_deref().and_then(digest_from_name),
                diff_id: None,
                media_type: String::new(),
            })
        })
        .collect::<Result<Vec<_>, PullImageError>>()?;
    let config_digest = archive_name(&manifest.config).as_deref().and_then(digest_from_name);
    let image = FetchedImage { reference: reference.to_owned(), manifest_digest: None, config, layers };
    Ok((image, config_digest.map(|digest| (config_blob, digest))))
}

fn index_archive(path: &Path) -> io::Result<HashMap<String, Member>> {
    let mut archive = tar::Archive::new(File::open(path)?);
    let mut members = HashMap::new();
    for entry in archive.entries()? {
        let entry = entry?;
        let Some(name) = archive_name(&String::from_utf8_lossy(&entry.path_bytes())) else { continue };
        let kind = entry.header().entry_type();
        if kind.is_file() || kind.is_contiguous() {
            members.insert(name, Member::File { offset: entry.raw_file_position(), len: entry.size() });
        } else if kind.is_symlink() || kind.is_hard_link() {
            if let Some(target) = entry.link_name_bytes() {
                let target = String::from_utf8_lossy(&target).into_owned();
                // Hard link names are relative to the archive root, symlinks to the member's directory.
                let target = match kind.is_hard_link() {
                    true => format!("/{target}"),
                    false => target,
                };
                members.insert(name, Member::Link(target));
            }
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_are_normalised() {
        assert_eq!(archive_name("./a//b/").as_deref(), Some("a/b"));
        assert_eq!(archive_name("a/../b").as_deref(), Some("b"));
        assert_eq!(archive_name("../x"), None);
    }

    #[test]
    fn links_between_members_are_followed() {
        let mut members = HashMap::new();
        members.insert("l1/layer.tar".to_owned(), Member::File { offset: 512, len: 10 });
        members.insert("l2/layer.tar".to_owned(), Member::Link("../l1/layer.tar".to_owned()));
        members.insert("hard".to_owned(), Member::Link("/l1/layer.tar".to_owned()));
        members.insert("loop".to_owned(), Member::Link("loop".to_owned()));
        assert_eq!(lookup(&members, "./l2/layer.tar"), Some((512, 10)));
        assert_eq!(lookup(&members, "hard"), Some((512, 10)));
        assert_eq!(lookup(&members, "loop"), None);
        assert_eq!(lookup(&members, "missing"), None);
    }

    #[test]
    fn digests_come_from_blob_names() {
        let hex = "a".repeat(64);
        assert_eq!(digest_from_name(&format!("blobs/sha256/{hex}")), Some(format!("sha256:{hex}")));
        assert_eq!(digest_from_name(&format!("{hex}.json")), Some(format!("sha256:{hex}")));
        assert_eq!(digest_from_name("abc/layer.tar"), None);
        assert_eq!(digest_from_name("blobs/sha256/../../x"), None);
    }
}
