//! Root images: bootstrap a Debian tree from a [`Recipe`] and make it an ext4 image.
//!
//! `mmdebstrap --mode=root --format=directory` fills `<images>/.staging-*/rootfs` using the host's
//! own apt sources (those serving the recipe's suite, rewritten as deb822 and passed on standard
//! input), so no mirror is named here. The tree is then made fit for many VMs (no ssh host keys,
//! hostname `banger`, `/etc/banger`, the recipe's files), `mkfs.ext4 -d` turns it into
//! `rootfs.ext4` without mounting anything (so the image is in the clean, unmounted state a
//! read-only base needs), the image is checksummed, `image.json` is written, and the directory is
//! renamed to `<images>/<name>`. Any failure leaves nothing behind.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{self, CatalogError, InitMode, Recipe};
use crate::host::{AptSourceFile, HostToolError, HostTools, MkfsRequest, MmdebstrapRequest, SUPERBLOCK_OFFSET};
use crate::staging::{self, PublishFailure, Staging};
use banger_proto::agent::meta::ImageMeta;

/// The image file of a published image.
pub const IMAGE_FILE: &str = "rootfs.ext4";
/// Manifest of a published image.
pub const IMAGE_MANIFEST_FILE: &str = "image.json";
/// File system label of root images.
pub const ROOT_LABEL: &str = "banger-root";
/// Guest hostname baked into images (the daemon sets each VM's own at boot).
pub const IMAGE_HOSTNAME: &str = "banger";

const MIB: u64 = 1024 * 1024;
/// Free space on top of the measured content, for the journal and metadata.
const SLACK_BYTES: u64 = 64 * MIB;
/// Growth factor applied to the measured content.
const CONTENT_FACTOR_PERCENT: u64 = 130;
const INODE_SIZE: u64 = 256;
const BLOCK: u64 = 4096;

/// Where an image's recipe came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageSource {
    /// A catalog entry.
    Catalog {
        /// The entry's name.
        entry: String,
    },
    /// A recipe given by the caller.
    Recipe,
    /// An OCI image: a registry reference, an OCI layout or a docker-archive (see [`crate::oci`]).
    Oci {
        /// What was pulled: `registry/repo:tag`, `oci:PATH[:TAG]` or `docker-archive:PATH`.
        reference: String,
        /// Digest of the image manifest, when the source has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// A Dockerfile built with buildah (see [`crate::dockerfile`]).
    Dockerfile {
        /// The Dockerfile's path on the host.
        path: String,
    },
    /// An ext4 file registered as it was.
    File {
        /// The file it was copied from.
        path: String,
    },
    /// A stopped VM's root (base plus overlay) made into an image.
    Promoted {
        /// The VM's name.
        vm: String,
        /// The image it was made from.
        from: String,
    },
}

impl std::fmt::Display for ImageSource {
    /// One line for listings: `recipe:minimal`, `recipe`, `REFERENCE[@DIGEST]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Catalog { entry } => write!(f, "recipe:{entry}"),
            Self::Recipe => f.write_str("recipe"),
            Self::Oci { reference, digest: Some(digest) } if !reference.contains('@') => {
                write!(f, "{reference}@{digest}")
            }
            Self::Oci { reference, .. } => f.write_str(reference),
            Self::Dockerfile { path } => write!(f, "dockerfile:{path}"),
            Self::File { path } => write!(f, "file:{path}"),
            Self::Promoted { vm, from } => write!(f, "promote:{vm} (from {from})"),
        }
    }
}

/// What to build: the input of [`build_image`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuild {
    /// Local name, the directory under the images directory.
    pub name: String,
    /// Where the recipe came from.
    pub source: ImageSource,
    /// What goes in.
    pub recipe: Recipe,
}

impl ImageBuild {
    /// Builds catalog image `name` under the same name.
    pub fn catalog(name: &str) -> Result<Self, CatalogError> {
        let entry = catalog::image(name)?;
        Ok(Self {
            name: name.to_owned(),
            source: ImageSource::Catalog { entry: name.to_owned() },
            recipe: entry.recipe(),
        })
    }
}

/// `image.json`: what a published image is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Local name.
    pub name: String,
    /// Where the recipe came from.
    pub source: ImageSource,
    /// The recipe it was built from; `None` for images pulled from OCI sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<Recipe>,
    /// What it declares for its guests (services, ports to wait for, user, working directory).
    #[serde(default, skip_serializing_if = "ImageMeta::is_empty")]
    pub meta: ImageMeta,
    /// How the guest starts.
    pub init: InitMode,
    /// Image file, relative to the image directory.
    pub file: String,
    /// File system type (`ext4`).
    pub format: String,
    /// File system label.
    pub label: String,
    /// SHA-256 of the image file, lowercase hex.
    pub sha256: String,
    /// Size of the image file in bytes.
    pub size_bytes: u64,
    /// Measured size of the bootstrapped tree in bytes (4 KiB blocks).
    pub content_bytes: u64,
    /// When it was built (RFC 3339, UTC).
    pub created: String,
}

/// A published image, as returned by [`build_image`] and [`open_image`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The image directory.
    pub dir: PathBuf,
    /// The ext4 image.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: ImageManifest,
}

/// What went wrong building an image.
#[derive(Debug, thiserror::Error)]
pub enum BuildImageError {
    /// The name cannot be a directory name.
    #[error("image name '{name}' cannot be used; use letters, digits, '-' and '.', not starting with '.'")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// An image of that name exists.
    #[error("image '{name}' already exists; delete it with `banger image delete {name}`")]
    Exists {
        /// The name.
        name: String,
    },
    /// The host's apt sources could not be read.
    #[error("cannot read the host's apt sources")]
    Sources(#[source] HostToolError),
    /// No host apt source serves the suite.
    #[error(
        "the host's apt sources serve no '{suite}' suite; add a Debian '{suite}' source under \
         /etc/apt/sources.list.d/, or build on a Debian {suite} host"
    )]
    NoSources {
        /// The suite.
        suite: String,
    },
    /// A file given to register is not an ext4 image.
    #[error("{} is not an ext4 filesystem image; give a file made with mkfs.ext4", path.display())]
    NotExt4 {
        /// The file.
        path: PathBuf,
    },
    /// A recipe file has a path outside the tree or through a symlink.
    #[error("recipe file '{path}' cannot be written: {reason}")]
    BadFile {
        /// The guest path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// mmdebstrap failed.
    #[error("bootstrapping Debian '{suite}' failed")]
    Bootstrap {
        /// The suite.
        suite: String,
        /// The cause.
        #[source]
        source: HostToolError,
    },
    /// A recipe's labels are invalid.
    #[error("invalid labels: {reason}")]
    BadLabels {
        /// Which label and why.
        reason: String,
    },
    /// mkfs.ext4 failed.
    #[error("making the ext4 image failed")]
    Mkfs(#[source] HostToolError),
    /// The new image is not a clean ext4 file system.
    #[error("{} is not a clean ext4 image after mkfs.ext4; check e2fsprogs", path.display())]
    NotClean {
        /// The image.
        path: PathBuf,
    },
    /// The stopped VM's disks could not be checked or mounted for a promote.
    #[error("cannot merge the vm's disks into an image")]
    Merge(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Reading or writing under the images directory failed.
    #[error("cannot write {}; check that the images directory is writable and has space", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What went wrong opening or deleting a published image.
#[derive(Debug, thiserror::Error)]
pub enum ImageDirError {
    /// No image of that name.
    #[error("image '{name}' not found; run `banger image build {name}`")]
    NotFound {
        /// The name.
        name: String,
    },
    /// Its manifest is missing or unreadable.
    #[error("image '{name}' is damaged ({}); delete it with `banger image delete {name}` and build it again", path.display())]
    Damaged {
        /// The name.
        name: String,
        /// The file that could not be read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Removing it failed.
    #[error("cannot delete image '{name}' in {}", dir.display())]
    Delete {
        /// The name.
        name: String,
        /// The images directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> BuildImageError {
    let path = path.to_owned();
    move |source| BuildImageError::Io { path, source }
}

/// Builds an image into `images_dir/<build.name>`, reporting stages (`debootstrap`, `mkfs`,
/// `checksum`, `publish`) to `progress`.
pub fn build_image(
    host: &dyn HostTools,
    images_dir: &Path,
    build: &ImageBuild,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, BuildImageError> {
    let name = &build.name;
    let recipe = &build.recipe;
    check_new_name(images_dir, name)?;
    for file in &recipe.files {
        guest_relative(&file.path)?;
    }
    let files = host.read_apt_sources().map_err(BuildImageError::Sources)?;
    let sources = render_sources(&files, &recipe.suite)
        .ok_or_else(|| BuildImageError::NoSources { suite: recipe.suite.clone() })?;

    let staging = Staging::new(images_dir).map_err(io_error(images_dir))?;
    let rootfs = staging.path().join("rootfs");

    progress("debootstrap");
    let request = MmdebstrapRequest {
        suite: recipe.suite.clone(),
        variant: recipe.variant.clone(),
        packages: recipe.packages.clone(),
        target: rootfs.clone(),
        sources,
    };
    host.mmdebstrap(&request).map_err(|source| BuildImageError::Bootstrap { suite: recipe.suite.clone(), source })?;
    customize(&rootfs, recipe)?;

    let meta = banger_proto::agent::meta::from_labels(&recipe.labels, None, None, &[])
        .map_err(|reason| BuildImageError::BadLabels { reason })?;
    if !meta.is_empty() {
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| BuildImageError::Io {
            path: PathBuf::from(banger_proto::agent::meta::IMAGE_META_PATH),
            source: e.into(),
        })?;
        write_guest_file(&rootfs, banger_proto::agent::meta::IMAGE_META_PATH, 0o644, &json)?;
    }
    let info = ImageInfo {
        name: name.clone(),
        source: build.source.clone(),
        recipe: Some(recipe.clone()),
        init: recipe.init,
        meta,
    };
    finish_image(host, images_dir, staging, &rootfs, info, progress)
}

/// Fails unless `name` is usable and free under `images_dir`; returns the image's directory.
pub(crate) fn check_new_name(images_dir: &Path, name: &str) -> Result<PathBuf, BuildImageError> {
    if staging::unsafe_name(name) {
        return Err(BuildImageError::InvalidName { name: name.to_owned() });
    }
    let dest = images_dir.join(name);
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(BuildImageError::Exists { name: name.to_owned() });
    }
    Ok(dest)
}

/// What [`finish_image`] records in the manifest besides the image file itself.
#[derive(Debug, Clone)]
pub(crate) struct ImageInfo {
    /// Local name.
    pub(crate) name: String,
    /// Where it came from.
    pub(crate) source: ImageSource,
    /// The recipe, for built images.
    pub(crate) recipe: Option<Recipe>,
    /// How the guest starts.
    pub(crate) init: InitMode,
    /// What it declares for its guests.
    pub(crate) meta: ImageMeta,
}

/// Turns the finished tree `rootfs` (inside `staging`) into `rootfs.ext4` with `mkfs.ext4 -d`,
/// checks it is clean, checksums it, writes `image.json` and publishes the image as
/// `images_dir/<info.name>`, reporting `mkfs`, `checksum` and `publish`. The tree is removed.
pub(crate) fn finish_image(
    host: &dyn HostTools,
    images_dir: &Path,
    staging: Staging,
    rootfs: &Path,
    info: ImageInfo,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, BuildImageError> {
    let (image, content_bytes) = mkfs_image(host, &staging, rootfs, progress)?;
    // The tree is in the image now; drop it before publishing.
    fs::remove_dir_all(rootfs).map_err(io_error(rootfs))?;
    publish_image(images_dir, staging, &image, content_bytes, info, progress)
}

/// Builds `<staging>/image/rootfs.ext4` from the tree `rootfs` (left in place); returns the image
/// file and the tree's measured size.
pub(crate) fn mkfs_image(
    host: &dyn HostTools,
    staging: &Staging,
    rootfs: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(PathBuf, u64), BuildImageError> {
    let work = staging.path().join("image");
    fs::create_dir(&work).map_err(io_error(&work))?;
    progress("mkfs");
    let (content_bytes, entries) = measure(rootfs).map_err(io_error(rootfs))?;
    let (size_mib, inodes) = filesystem_size(content_bytes, entries);
    let image = work.join(IMAGE_FILE);
    let mkfs =
        MkfsRequest { dir: rootfs.to_owned(), image: image.clone(), label: ROOT_LABEL.to_owned(), size_mib, inodes };
    host.mkfs_ext4(&mkfs).map_err(BuildImageError::Mkfs)?;
    Ok((image, content_bytes))
}

/// Checks that `image` (in `<staging>/image/`) is a clean ext4, checksums it, writes
/// `image.json` beside it and publishes that directory as `images_dir/<info.name>`.
pub(crate) fn publish_image(
    images_dir: &Path,
    staging: Staging,
    image: &Path,
    content_bytes: u64,
    info: ImageInfo,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, BuildImageError> {
    let ImageInfo { name, source, recipe, init, meta } = info;
    let dest = images_dir.join(&name);
    let work = image.parent().map(Path::to_path_buf).unwrap_or_else(|| staging.path().join("image"));
    if !is_clean_ext4(image).map_err(io_error(image))? {
        return Err(BuildImageError::NotClean { path: image.to_owned() });
    }

    progress("checksum");
    let sha256 = sha256_file(image).map_err(io_error(image))?;
    let size_bytes = fs::metadata(image).map_err(io_error(image))?.len();

    let manifest = ImageManifest {
        name: name.clone(),
        source,
        recipe,
        meta,
        init,
        file: IMAGE_FILE.to_owned(),
        format: "ext4".to_owned(),
        label: ROOT_LABEL.to_owned(),
        sha256,
        size_bytes,
        content_bytes,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let manifest_path = work.join(IMAGE_MANIFEST_FILE);
    let mut text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| BuildImageError::Io { path: manifest_path.clone(), source: io::Error::from(e) })?;
    text.push('\n');
    fs::write(&manifest_path, text).map_err(io_error(&manifest_path))?;

    progress("publish");
    staging::publish(&work, &dest).map_err(|failure| match failure {
        PublishFailure::Exists => BuildImageError::Exists { name: name.clone() },
        PublishFailure::Io(source) => BuildImageError::Io { path: dest.clone(), source },
    })?;
    drop(staging);
    tracing::info!(image = %name, size_bytes, "image published");
    Ok(BuiltImage { path: dest.join(IMAGE_FILE), dir: dest, manifest })
}

/// Registers the ext4 file `file` as image `name`: a sparse copy into the images directory,
/// checked clean and checksummed. The original is not touched.
pub fn register_image(
    images_dir: &Path,
    name: &str,
    file: &Path,
    init: InitMode,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, BuildImageError> {
    register_image_via(images_dir, name, file, file, init, progress)
}

/// [`register_image`] reading the bytes through `via` (for example `/proc/self/fd/N` of a file
/// the caller opened with its own permissions) while recording `file` as the source.
pub fn register_image_via(
    images_dir: &Path,
    name: &str,
    file: &Path,
    via: &Path,
    init: InitMode,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, BuildImageError> {
    check_new_name(images_dir, name)?;
    let mut magic = [0u8; 2];
    let is_ext4 = fs::File::open(via)
        .and_then(|mut f| {
            use std::io::{Read as _, Seek as _};
            f.seek(io::SeekFrom::Start(1080))?;
            f.read_exact(&mut magic)
        })
        .is_ok()
        && magic == [0x53, 0xef];
    if !is_ext4 {
        return Err(BuildImageError::NotExt4 { path: file.to_owned() });
    }
    let staging = Staging::new(images_dir).map_err(io_error(images_dir))?;
    let work = staging.path().join("image");
    fs::create_dir(&work).map_err(io_error(&work))?;
    progress("copy");
    let image = work.join(IMAGE_FILE);
    copy_file(via, &image).map_err(io_error(&image))?;
    let source = ImageSource::File { path: file.display().to_string() };
    let info = ImageInfo { name: name.to_owned(), source, recipe: None, init, meta: ImageMeta::default() };
    publish_image(images_dir, staging, &image, 0, info, progress)
}

/// Makes image `name` from a stopped VM's root: `base` (its image's rootfs) under the overlay
/// disk's `upper/` layer, merged by a read-only overlayfs mount (see [`crate::promote`]).
#[expect(clippy::too_many_arguments, reason = "one call site; a struct would only rename them")]
pub fn promote_image(
    host: &dyn HostTools,
    mounter: &dyn crate::promote::Mounter,
    images_dir: &Path,
    name: &str,
    base: &Path,
    overlay_disk: &Path,
    source: ImageSource,
    init: InitMode,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, BuildImageError> {
    check_new_name(images_dir, name)?;
    let staging = Staging::new(images_dir).map_err(io_error(images_dir))?;
    let mounts = Staging::new(images_dir).map_err(io_error(images_dir))?;
    progress("merge");
    let built = crate::promote::with_merged_root(mounter, base, overlay_disk, mounts.path(), |root| {
        mkfs_image(host, &staging, root, progress)
    });
    let (image, content_bytes) = built.map_err(|e| match e {
        crate::promote::PromoteError::Work(e) => e,
        other => BuildImageError::Merge(Box::new(other)),
    })?;
    drop(mounts);
    let info = ImageInfo { name: name.to_owned(), source, recipe: None, init, meta: ImageMeta::default() };
    publish_image(images_dir, staging, &image, content_bytes, info, progress)
}

/// Copies `from` to `to` as a reflink where the filesystem allows, else copying data extents only.
fn copy_file(from: &Path, to: &Path) -> io::Result<()> {
    let src = fs::File::open(from)?;
    let dst = fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    if !crate::seed::copy::reflink(&src, &dst)? {
        crate::seed::copy::sparse_copy(&src, &dst)?;
    }
    dst.sync_all()
}

/// Opens the published image `images_dir/<name>`.
pub fn open_image(images_dir: &Path, name: &str) -> Result<BuiltImage, ImageDirError> {
    let dir = images_dir.join(name);
    if staging::unsafe_name(name) || !dir.is_dir() {
        return Err(ImageDirError::NotFound { name: name.to_owned() });
    }
    let path = dir.join(IMAGE_MANIFEST_FILE);
    let manifest: ImageManifest = fs::read(&path)
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(io::Error::from))
        .map_err(|source| ImageDirError::Damaged { name: name.to_owned(), path, source })?;
    Ok(BuiltImage { path: dir.join(&manifest.file), dir, manifest })
}

/// Deletes the published image `images_dir/<name>`.
pub fn delete_image_dir(images_dir: &Path, name: &str) -> Result<(), ImageDirError> {
    if staging::unsafe_name(name) {
        return Err(ImageDirError::NotFound { name: name.to_owned() });
    }
    match staging::delete_dir(images_dir, name) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ImageDirError::NotFound { name: name.to_owned() }),
        Err(source) => Err(ImageDirError::Delete { name: name.to_owned(), dir: images_dir.to_owned(), source }),
    }
}

/// One apt source: a deb822 paragraph as (field, value lines).
type Paragraph = Vec<(String, Vec<String>)>;

fn suite_matches(candidate: &str, suite: &str) -> bool {
    candidate == suite
        || candidate.strip_prefix(suite).is_some_and(|rest| rest.starts_with('-') || rest.starts_with('/'))
}

/// The host's binary sources that serve `suite` (and its `-updates`, `-security`, ...), as deb822
/// text for mmdebstrap; `None` if there are none. Third-party sources for other suites are left out.
pub fn render_sources(files: &[AptSourceFile], suite: &str) -> Option<String> {
    let mut paragraphs = Vec::new();
    for file in files {
        if file.path.extension().is_some_and(|e| e == "sources") {
            paragraphs.extend(parse_deb822(&file.contents));
        } else {
            paragraphs.extend(file.contents.lines().filter_map(parse_one_line));
        }
    }
    let mut out = String::new();
    for mut paragraph in paragraphs {
        let field = |p: &Paragraph, key: &str| -> Option<String> {
            p.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.join(" "))
        };
        if field(&paragraph, "Enabled").is_some_and(|v| v.trim().eq_ignore_ascii_case("no")) {
            continue;
        }
        if !field(&paragraph, "Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb")) {
            continue;
        }
        let suites: Vec<String> = field(&paragraph, "Suites")
            .unwrap_or_default()
            .split_whitespace()
            .filter(|s| suite_matches(s, suite))
            .map(str::to_owned)
            .collect();
        if suites.is_empty() {
            continue;
        }
        for (key, value) in &mut paragraph {
            if key.eq_ignore_ascii_case("Types") {
                *value = vec!["deb".to_owned()];
            } else if key.eq_ignore_ascii_case("Suites") {
                *value = vec![suites.join(" ")];
            }
        }
        if !out.is_empty() {
            out.push('\n');
        }
        for (key, value) in paragraph {
            out.push_str(&key);
            out.push(':');
            for (i, line) in value.iter().enumerate() {
                match (i, line.is_empty()) {
                    (0, _) => {
                        out.push(' ');
                        out.push_str(line);
                    }
                    (_, true) => out.push_str("\n ."),
                    (_, false) => {
                        out.push_str("\n ");
                        out.push_str(line);
                    }
                }
            }
            out.push('\n');
        }
    }
    (!out.is_empty()).then_some(out)
}

fn parse_deb822(text: &str) -> Vec<Paragraph> {
    let mut paragraphs = Vec::new();
    let mut current: Paragraph = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = current.last_mut() {
                let line = line.trim();
                value.push(if line == "." { String::new() } else { line.to_owned() });
            }
        } else if let Some((key, value)) = line.split_once(':') {
            current.push((key.trim().to_owned(), vec![value.trim().to_owned()]));
        }
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    paragraphs
}

/// `deb [opt=v ...] URI SUITE COMPONENT...` as a deb822 paragraph.
fn parse_one_line(line: &str) -> Option<Paragraph> {
    let line = line.split('#').next()?.trim();
    let rest = line.strip_prefix("deb")?;
    if !rest.starts_with([' ', '\t']) {
        return None; // deb-src
    }
    let rest = rest.trim_start();
    let (options, rest) = match rest.strip_prefix('[') {
        Some(inner) => {
            let (options, rest) = inner.split_once(']')?;
            (options, rest)
        }
        None => ("", rest),
    };
    let mut words = rest.split_whitespace();
    let (uri, suite) = (words.next()?, words.next()?);
    let components: Vec<_> = words.collect();
    let mut paragraph: Paragraph = vec![
        ("Types".into(), vec!["deb".into()]),
        ("URIs".into(), vec![uri.into()]),
        ("Suites".into(), vec![suite.into()]),
        ("Components".into(), vec![components.join(" ")]),
    ];
    for option in options.split_whitespace() {
        let Some((key, value)) = option.split_once('=') else { continue };
        let key = match key {
            "arch" => "Architectures",
            "signed-by" => "Signed-By",
            "trusted" => "Trusted",
            _ => continue,
        };
        paragraph.push((key.into(), vec![value.replace(',', " ")]));
    }
    Some(paragraph)
}

/// `/etc/motd` → `etc/motd`, refusing relative paths and `..`.
fn guest_relative(path: &str) -> Result<PathBuf, BuildImageError> {
    let bad = |reason| BuildImageError::BadFile { path: path.to_owned(), reason };
    let relative = Path::new(path).strip_prefix("/").map_err(|_| bad("the path must be absolute"))?;
    if relative.as_os_str().is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("the path must name a file without '.' or '..' parts"));
    }
    Ok(relative.to_owned())
}

/// Writes `contents` to guest path `path` under `root` with `mode`, creating parent directories,
/// and never following a symlink (one could point at the host's own files).
fn write_guest_file(root: &Path, path: &str, mode: u32, contents: &[u8]) -> Result<(), BuildImageError> {
    let relative = guest_relative(path)?;
    let mut dir = root.to_owned();
    let parents: Vec<_> = relative.parent().into_iter().flat_map(Path::components).collect();
    for component in parents {
        dir.push(component);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(BuildImageError::BadFile {
                    path: path.to_owned(),
                    reason: "a parent directory is a symlink in the image; use the real path (e.g. /usr/bin)",
                })
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(BuildImageError::BadFile { path: path.to_owned(), reason: "a parent is not a directory" })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(io_error(&dir))?;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(io_error(&dir))?;
            }
            Err(e) => return Err(io_error(&dir)(e)),
        }
    }
    let target = root.join(&relative);
    match fs::symlink_metadata(&target) {
        Ok(meta) if meta.is_dir() => {
            return Err(BuildImageError::BadFile { path: path.to_owned(), reason: "it is a directory in the image" })
        }
        Ok(_) => fs::remove_file(&target).map_err(io_error(&target))?,
        Err(_) => {}
    }
    fs::write(&target, contents).map_err(io_error(&target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(mode & 0o7777)).map_err(io_error(&target))
}

/// Makes a bootstrapped tree fit to be the base of many VMs.
fn customize(root: &Path, recipe: &Recipe) -> Result<(), BuildImageError> {
    // Every VM would share these; the guest generates its own.
    let ssh = root.join("etc/ssh");
    if ssh.is_dir() {
        for entry in fs::read_dir(&ssh).map_err(io_error(&ssh))? {
            let entry = entry.map_err(io_error(&ssh))?;
            if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
                fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
            }
        }
    }
    // mmdebstrap copies the build host's name.
    write_guest_file(root, "/etc/hostname", 0o644, format!("{IMAGE_HOSTNAME}\n").as_bytes())?;
    let hosts =
        format!("127.0.0.1\tlocalhost\n127.0.1.1\t{IMAGE_HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    write_guest_file(root, "/etc/hosts", 0o644, hosts.as_bytes())?;
    let banger = root.join("etc/banger");
    fs::create_dir_all(&banger).map_err(io_error(&banger))?;
    fs::set_permissions(&banger, fs::Permissions::from_mode(0o755)).map_err(io_error(&banger))?;
    for file in &recipe.files {
        write_guest_file(root, &file.path, file.mode, file.contents.as_bytes())?;
    }
    Ok(())
}

/// Bytes the tree needs in 4 KiB blocks, and its number of entries (inodes).
fn measure(root: &Path) -> io::Result<(u64, u64)> {
    let mut bytes = 0;
    let mut entries = 1;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        bytes += BLOCK;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            entries += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                bytes += meta.len().next_multiple_of(BLOCK);
            } else if meta.file_type().is_symlink() && meta.size() >= 60 {
                bytes += BLOCK; // longer targets do not fit in the inode
            }
        }
    }
    Ok((bytes, entries))
}

/// Image size in MiB and inode count for a tree of `content_bytes` in `entries` entries:
/// content × 1.3, plus inode tables and 64 MiB of slack (journal, metadata, a little room).
pub fn filesystem_size(content_bytes: u64, entries: u64) -> (u64, u64) {
    let inodes = (entries + entries / 4 + 4096).next_multiple_of(1024);
    let bytes = content_bytes * CONTENT_FACTOR_PERCENT / 100 + inodes * INODE_SIZE + SLACK_BYTES;
    (bytes.div_ceil(MIB), inodes)
}

/// Whether `image` holds an ext4 superblock marked cleanly unmounted, without errors and without
/// a journal to replay.
pub fn is_clean_ext4(image: &Path) -> io::Result<bool> {
    let mut superblock = [0u8; 1024];
    let mut file = File::open(image)?;
    io::copy(&mut (&mut file).take(SUPERBLOCK_OFFSET as u64), &mut io::sink())?;
    if file.read_exact(&mut superblock).is_err() {
        return Ok(false);
    }
    let u16_at = |offset: usize| u16::from_le_bytes([superblock[offset], superblock[offset + 1]]);
    let u32_at = |offset: usize| {
        u32::from_le_bytes([superblock[offset], superblock[offset + 1], superblock[offset + 2], superblock[offset + 3]])
    };
    const EXT4_VALID_FS: u16 = 1;
    const EXT4_ERROR_FS: u16 = 2;
    const INCOMPAT_RECOVER: u32 = 0x4;
    let (magic, state, incompat) = (u16_at(0x38), u16_at(0x3a), u32_at(0x60));
    Ok(magic == 0xEF53 && state & EXT4_VALID_FS != 0 && state & EXT4_ERROR_FS == 0 && incompat & INCOMPAT_RECOVER == 0)
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests;
