//! Root images from OCI images: a registry reference, an OCI image layout or a docker-archive.
//!
//! Every source is first normalised to a [`FetchedImage`]: an image config and its layer blobs
//! on disk, in order, each with the digest it must have ([`fetch`]: stages `resolve`, `fetch`,
//! `verify`). The layers are then flattened into a staging tree without ever following a
//! symlink ([`flatten`], stage `flatten`), the tree is made fit for many VMs (no ssh host keys,
//! `/etc/banger`, a hostname), and the shared image path of [`crate::rootfs`] makes, checks and
//! publishes the ext4 image (`mkfs`, `checksum`, `publish`). Nothing is published unless every
//! step succeeded; the staging directory under the images directory is removed on any failure.
//!
//! [`pull_image`] is synchronous. For registries it runs its own current-thread tokio runtime,
//! so call it from `tokio::task::spawn_blocking` (or a plain thread), never from async code.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use banger_proto::agent::meta::{from_labels, ImageMeta};

use crate::catalog::InitMode;
use crate::host::HostTools;
use crate::rootfs::{self, BuildImageError, BuiltImage, ImageInfo, ImageSource};
use crate::staging::Staging;

mod flatten;
mod local;
mod registry;

pub use flatten::{flatten, EntryProblem, FlattenReport};

/// Annotation naming a manifest's tag in an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Where to pull an OCI image from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OciSource {
    /// A registry reference: `127.0.0.1:5000/name:tag`, `debian:bookworm`, `name@sha256:…`.
    Registry {
        /// The reference as given.
        reference: String,
        /// Plain HTTP instead of HTTPS (local test registries).
        insecure: bool,
    },
    /// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
    Layout {
        /// The directory.
        path: PathBuf,
        /// Tag to pick (`org.opencontainers.image.ref.name`); needed when it holds several images.
        tag: Option<String>,
    },
    /// A `docker save` tarball (`manifest.json`, config and layer tars; may be gzip'd).
    DockerArchive {
        /// The tarball.
        path: PathBuf,
    },
}

impl fmt::Display for OciSource {
    /// The reference recorded in the image manifest.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registry { reference, .. } => f.write_str(reference),
            Self::Layout { path, tag: Some(tag) } => write!(f, "oci:{}:{tag}", path.display()),
            Self::Layout { path, tag: None } => write!(f, "oci:{}", path.display()),
            Self::DockerArchive { path } => write!(f, "docker-archive:{}", path.display()),
        }
    }
}

/// Maps a command-line argument to a source: `oci:DIR[:TAG]`, `docker-archive:FILE` and
/// `docker://REF` say it explicitly; otherwise an existing directory (optionally `DIR:TAG`) is a
/// layout, an existing file a docker-archive, and anything else a registry reference.
pub fn parse_source(arg: &str, insecure: bool) -> OciSource {
    let layout = |spec: &str| match Path::new(spec).is_dir() {
        true => OciSource::Layout { path: PathBuf::from(spec), tag: None },
        false => match spec.rsplit_once(':') {
            Some((dir, tag)) if Path::new(dir).is_dir() && !tag.is_empty() && !tag.contains('/') => {
                OciSource::Layout { path: PathBuf::from(dir), tag: Some(tag.to_owned()) }
            }
            _ => OciSource::Layout { path: PathBuf::from(spec), tag: None },
        },
    };
    if let Some(spec) = arg.strip_prefix("oci:") {
        return layout(spec);
    }
    if let Some(path) = arg.strip_prefix("docker-archive:") {
        return OciSource::DockerArchive { path: PathBuf::from(path) };
    }
    if let Some(reference) = arg.strip_prefix("docker://") {
        return OciSource::Registry { reference: reference.to_owned(), insecure };
    }
    let path = Path::new(arg);
    if path.is_dir() {
        return OciSource::Layout { path: path.to_owned(), tag: None };
    }
    if path.is_file() {
        return OciSource::DockerArchive { path: path.to_owned() };
    }
    match layout(arg) {
        found @ OciSource::Layout { tag: Some(_), .. } => found,
        _ => OciSource::Registry { reference: arg.to_owned(), insecure },
    }
}

/// Where a blob's bytes are: a whole file, or a member of a docker-archive tarball.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    /// The file holding it.
    pub path: PathBuf,
    /// Offset of the first byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl BlobLocation {
    /// The whole file at `path`.
    pub fn file(path: &Path) -> io::Result<Self> {
        Ok(Self { path: path.to_owned(), offset: 0, len: fs::metadata(path)?.len() })
    }

    /// Opens the blob for reading.
    pub fn open(&self) -> io::Result<io::Take<File>> {
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        Ok(file.take(self.len))
    }
}

/// One layer of a fetched image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Its bytes.
    pub blob: BlobLocation,
    /// `sha256:…` of the blob as stored, when the source names one (layouts and registries do).
    pub digest: Option<String>,
    /// `sha256:…` of the uncompressed tar, from the image config's `rootfs.diff_ids`.
    pub diff_id: Option<String>,
    /// Media type as the manifest gives it (empty for docker-archives).
    pub media_type: String,
}

impl LayerBlob {
    /// A short name for messages: `sha256:` and 12 hex digits of the digest (or diff ID), or
    /// `#N` when the source names neither.
    pub fn label(&self, index: usize) -> String {
        match self.digest.as_deref().or(self.diff_id.as_deref()) {
            Some(digest) => short_digest(digest),
            None => format!("#{}", index + 1),
        }
    }
}

/// `sha256:0123456789ab…`.
pub(crate) fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algorithm, hex)) if hex.len() > 12 => format!("{algorithm}:{}…", &hex[..12]),
        _ => digest.to_owned(),
    }
}

/// The parts of an OCI image config banger reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    /// `amd64`, `arm64`, ….
    #[serde(default)]
    pub architecture: Option<String>,
    /// `linux`, ….
    #[serde(default)]
    pub os: Option<String>,
    /// The layers' uncompressed digests.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
    /// How a container of it runs: user, working directory, environment, labels.
    #[serde(default, rename = "config")]
    pub container: Option<ContainerConfig>,
}

/// `config` of an image config: the parts banger reads into the image's declarations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ContainerConfig {
    /// `USER`.
    #[serde(default, rename = "User")]
    pub user: Option<String>,
    /// `WORKDIR`.
    #[serde(default, rename = "WorkingDir")]
    pub working_dir: Option<String>,
    /// `ENV`, `KEY=VALUE`.
    #[serde(default, rename = "Env")]
    pub env: Option<Vec<String>>,
    /// `LABEL`s.
    #[serde(default, rename = "Labels")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

impl ContainerConfig {
    /// The image's declarations (`dev.banger.*` labels, with USER, WORKDIR and ENV).
    pub fn meta(&self) -> Result<ImageMeta, String> {
        let labels = self.labels.clone().unwrap_or_default();
        let env = self.env.clone().unwrap_or_default();
        from_labels(&labels, self.user.as_deref(), self.working_dir.as_deref(), &env)
    }
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RootFs {
    /// `sha256:…` of each uncompressed layer tar, in order.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// An image ready to flatten: its config and its layers on disk, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedImage {
    /// What was pulled, as recorded in the image manifest.
    pub reference: String,
    /// Digest of the image manifest, when the source has one.
    pub manifest_digest: Option<String>,
    /// The image config.
    pub config: ImageConfig,
    /// The layers, lowest first.
    pub layers: Vec<LayerBlob>,
}

/// What went wrong pulling an OCI image.
#[derive(Debug, thiserror::Error)]
pub enum PullImageError {
    /// Naming, making or publishing the ext4 image failed.
    #[error(transparent)]
    Image(#[from] BuildImageError),
    /// The registry reference cannot be parsed.
    #[error("'{reference}' is not an image reference (expected REGISTRY/NAME:TAG or NAME@sha256:…)")]
    BadReference {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: oci_client::ParseError,
    },
    /// Talking to the registry failed.
    #[error("cannot pull '{reference}' from its registry{hint}")]
    Registry {
        /// The reference.
        reference: String,
        /// What to try, if anything.
        hint: &'static str,
        /// The cause.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// The local source cannot be read as the kind of source it was taken for.
    #[error("{} is not a usable {kind}: {reason}", path.display())]
    BadSource {
        /// The file or directory.
        path: PathBuf,
        /// `OCI image layout` or `docker-archive`.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A document (manifest, index, config) is not what it claims to be.
    #[error("{what} of '{reference}' is invalid: {reason}")]
    BadDocument {
        /// Which document.
        what: String,
        /// The image.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// An image index has no linux/amd64 image.
    #[error("'{reference}' has no linux/amd64 image (it has: {available}); banger runs linux/amd64 guests")]
    NoPlatform {
        /// The image.
        reference: String,
        /// The platforms it has, comma-separated.
        available: String,
    },
    /// The image config names another platform.
    #[error("'{reference}' is a {platform} image; banger runs linux/amd64 guests")]
    WrongPlatform {
        /// The image.
        reference: String,
        /// `os/architecture`.
        platform: String,
    },
    /// A digest uses an algorithm other than sha256, or is malformed.
    #[error("digest '{digest}' in '{reference}' is not supported; only sha256 digests are")]
    UnsupportedDigest {
        /// The image.
        reference: String,
        /// The digest.
        digest: String,
    },
    /// A layer has a media type that is not a (compressed) tar.
    #[error("layer {layer} of '{reference}' has media type '{media_type}', which banger cannot unpack")]
    UnsupportedLayer {
        /// The image.
        reference: String,
        /// The layer's label.
        layer: String,
        /// Its media type.
        media_type: String,
    },
    /// A blob does not have its digest or size.
    #[error("{what} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        /// `layer 2 of 3 (sha256:…)`, `config`.
        what: String,
        /// The digest (or size) named by the manifest.
        expected: String,
        /// The digest (or size) of the bytes.
        actual: String,
    },
    /// An uncompressed layer does not match the config's diff ID.
    #[error("layer {layer} does not match the image config's diff ID: expected {expected}, got {actual}")]
    DiffIdMismatch {
        /// The layer's label.
        layer: String,
        /// `rootfs.diff_ids[i]`.
        expected: String,
        /// sha256 of the uncompressed tar.
        actual: String,
    },
    /// The config's diff IDs do not match the layers.
    #[error("the image config of '{reference}' lists {diff_ids} layers but the manifest has {layers}")]
    LayerCount {
        /// The image.
        reference: String,
        /// Number of diff IDs.
        diff_ids: usize,
        /// Number of layers.
        layers: usize,
    },
    /// A layer is not a readable (compressed) tar.
    #[error("layer {layer} is truncated or corrupt")]
    CorruptLayer {
        /// The layer's label.
        layer: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A layer entry is refused (it would escape the root, or is otherwise unsafe).
    #[error("layer {layer} entry '{entry}' {problem}")]
    Entry {
        /// The layer's label.
        layer: String,
        /// The entry's path as the layer gives it.
        entry: String,
        /// What is wrong.
        problem: EntryProblem,
    },
    /// Writing a layer entry into the staging tree failed.
    #[error("layer {layer}: cannot unpack entry '{entry}'")]
    EntryIo {
        /// The layer's label.
        layer: String,
        /// The entry's path.
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The flattened tree cannot be made fit for banger.
    #[error("the image's {path} cannot be prepared: {reason}")]
    Prepare {
        /// The guest path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading a source file or writing the staging directory failed.
    #[error("cannot read or write {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PullImageError {
    let path = path.to_owned();
    move |source| PullImageError::Io { path, source }
}

/// Resolves `source`, puts its blobs on disk (registry blobs go into `blobs_dir`, local ones are
/// read in place) and verifies every digest the source names, reporting `resolve`, `fetch` and
/// `verify`. Registries are reached from a private current-thread tokio runtime: do not call
/// this from async code.
pub fn fetch(
    source: &OciSource,
    blobs_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<FetchedImage, PullImageError> {
    let (mut image, config_blob) = match source {
        OciSource::Registry { reference, insecure } => registry::fetch(reference, *insecure, blobs_dir, progress)?,
        OciSource::Layout { path, tag } => {
            progress("resolve");
            let reference = source.to_string();
            let found = local::resolve_layout(path, tag.as_deref(), &reference)?;
            progress("fetch");
            found
        }
        OciSource::DockerArchive { path } => {
            progress("resolve");
            let found = local::resolve_docker_archive(path, blobs_dir, &source.to_string())?;
            progress("fetch");
            found
        }
    };
    check_image(&mut image)?;
    progress("verify");
    if let Some((blob, digest)) = &config_blob {
        verify_blob(blob, digest, "config", &image.reference)?;
    }
    let count = image.layers.len();
    for (index, layer) in image.layers.iter().enumerate() {
        if let Some(digest) = &layer.digest {
            let what = format!("layer {} of {count} ({})", index + 1, short_digest(digest));
            verify_blob(&layer.blob, digest, &what, &image.reference)?;
        }
    }
    Ok(image)
}

/// The digest's hex part, if it is a well-formed sha256 digest (also what keeps blob paths
/// built from it inside the blobs directory).
pub(crate) fn sha256_hex<'a>(digest: &'a str, reference: &str) -> Result<&'a str, PullImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
            Ok(hex)
        }
        _ => Err(PullImageError::UnsupportedDigest { reference: reference.to_owned(), digest: digest.to_owned() }),
    }
}

/// `sha256:…` of everything `reader` yields.
pub(crate) fn sha256_reader(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex_digest(hasher))
}

pub(crate) fn hex_digest(hasher: Sha256) -> String {
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn verify_blob(blob: &BlobLocation, digest: &str, what: &str, reference: &str) -> Result<(), PullImageError> {
    sha256_hex(digest, reference)?;
    let actual = blob.open().and_then(sha256_reader).map_err(io_error(&blob.path))?;
    if actual != digest {
        return Err(PullImageError::DigestMismatch { what: what.to_owned(), expected: digest.to_owned(), actual });
    }
    Ok(())
}

/// Checks the config's platform, pairs diff IDs with layers and refuses non-tar media types.
pub(crate) fn check_image(image: &mut FetchedImage) -> Result<(), PullImageError> {
    let reference = image.reference.clone();
    let os = image.config.os.as_deref().unwrap_or("linux");
    let arch = image.config.architecture.as_deref().unwrap_or("amd64");
    if os != "linux" || arch != "amd64" {
        return Err(PullImageError::WrongPlatform { reference, platform: format!("{os}/{arch}") });
    }
    let diff_ids = image.config.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
    if !diff_ids.is_empty() {
        if diff_ids.len() != image.layers.len() {
            return Err(PullImageError::LayerCount { reference, diff_ids: diff_ids.len(), layers: image.layers.len() });
        }
        for (layer, diff_id) in image.layers.iter_mut().zip(diff_ids) {
            sha256_hex(&diff_id, &reference)?;
            layer.diff_id = Some(diff_id);
        }
    }
    for (index, layer) in image.layers.iter().enumerate() {
        let media_type = layer.media_type.as_str();
        let tar = media_type.is_empty()
            || (media_type.contains(".tar") || media_type.ends_with("tar")) && !media_type.contains("encrypted");
        if !tar {
            return Err(PullImageError::UnsupportedLayer {
                reference,
                layer: layer.label(index),
                media_type: media_type.to_owned(),
            });
        }
    }
    Ok(())
}

/// Pulls `source` and publishes it as image `images_dir/<name>` (init mode `fast`), reporting
/// the stages `resolve`, `fetch`, `verify`, `flatten`, `mkfs`, `checksum` and `publish`.
///
/// Synchronous; registries are reached from a private current-thread tokio runtime, so call it
/// from `tokio::task::spawn_blocking` or a plain thread.
pub fn pull_image(
    host: &dyn HostTools,
    images_dir: &Path,
    name: &str,
    source: &OciSource,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, PullImageError> {
    import_image(host, images_dir, name, source, None, InitMode::Fast, progress)
}

/// [`pull_image`] recording `origin` (instead of the OCI source) as where the image came from,
/// and starting its guests with `init` (a Dockerfile build keeps its base image's).
pub fn import_image(
    host: &dyn HostTools,
    images_dir: &Path,
    name: &str,
    source: &OciSource,
    origin: Option<ImageSource>,
    init: InitMode,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, PullImageError> {
    rootfs::check_new_name(images_dir, name)?;
    let staging = Staging::new(images_dir).map_err(io_error(images_dir))?;
    let blobs = staging.path().join("blobs");
    fs::create_dir(&blobs).map_err(io_error(&blobs))?;
    let image = fetch(source, &blobs, progress)?;

    progress("flatten");
    let root = staging.path().join("rootfs");
    fs::create_dir(&root).map_err(io_error(&root))?;
    let report = flatten(&image.layers, &root)?;
    tracing::info!(
        reference = %image.reference,
        layers = report.layers,
        entries = report.entries,
        skipped_devices = report.skipped_devices,
        "layers flattened"
    );
    flatten::prepare_tree(&root)?;
    let meta = match &image.config.container {
        Some(container) => container.meta().map_err(|reason| PullImageError::BadDocument {
            what: "the labels".into(),
            reference: image.reference.clone(),
            reason,
        })?,
        None => ImageMeta::default(),
    };
    flatten::write_meta(&root, &meta)?;
    // Free the space of downloaded blobs before mkfs needs it.
    fs::remove_dir_all(&blobs).map_err(io_error(&blobs))?;

    let info = ImageInfo {
        name: name.to_owned(),
        source: origin.unwrap_or_else(|| ImageSource::Oci {
            reference: image.reference.clone(),
            digest: image.manifest_digest.clone(),
        }),
        recipe: None,
        init,
        meta,
    };
    Ok(rootfs::finish_image(host, images_dir, staging, &root, info, progress)?)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests;
