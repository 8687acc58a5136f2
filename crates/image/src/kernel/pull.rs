//! Kernel pulls: fetch a Debian kernel package, unpack it, order its guest modules, publish it.
//!
//! A catalog pull resolves the entry's metapackage to the exact versioned package the host's apt
//! archive carries now (`apt-cache depends --important`, then `apt-cache policy` for the
//! candidate), and downloads that version with `apt-get download`; no mirror is named here.
//! `--from FILE.deb` and `--from URL` skip apt. The package is unpacked into
//! `<kernels>/.staging-*/kernel`, the guest modules are ordered from `.modinfo` (and, by default,
//! every other module is dropped), `modules.json` and `kernel.json` are written, and the directory
//! is renamed to `<kernels>/<name>`. Any failure leaves nothing behind.
//!
//! Layout of a published kernel: `vmlinuz`, `vmlinux`, `config`, `modules/` (a
//! `lib/modules/<release>` tree), [`MODULE_ORDER_FILE`] and [`KERNEL_MANIFEST_FILE`].

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{extract_kernel_deb, KernelExtractError, CONFIG_FILE, MODULES_DIR, VMLINUX_FILE, VMLINUZ_FILE};
use crate::catalog::{self, CatalogError, GUEST_MODULES};
use crate::host::{HostToolError, HostTools};
use crate::modinfo::{LoadOrderError, ModuleIndex, OrderedModule, ScanModulesError};
use crate::staging::{self, PublishFailure, Staging};

/// Manifest of a published kernel.
pub const KERNEL_MANIFEST_FILE: &str = "kernel.json";
/// Guest modules in load order, paths relative to `modules/`.
pub const MODULE_ORDER_FILE: &str = "modules.json";

/// Where a kernel package comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum KernelSource {
    /// The host's apt archive, through a metapackage resolved at pull time.
    Apt {
        /// Metapackage (`linux-image-cloud-amd64`).
        metapackage: String,
    },
    /// A local `.deb`.
    File {
        /// The package file.
        path: PathBuf,
    },
    /// A `.deb` downloaded with curl.
    Url {
        /// Where it was downloaded from.
        url: String,
    },
}

impl KernelSource {
    /// The source named by a `--from` argument: a URL if it holds `://`, else a file.
    pub fn from_arg(from: &str) -> Self {
        if from.contains("://") {
            Self::Url { url: from.to_owned() }
        } else {
            Self::File { path: PathBuf::from(from) }
        }
    }
}

/// What to pull: the input of [`pull_kernel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPull {
    /// Local name, the directory under the kernels directory.
    pub name: String,
    /// Where the package comes from.
    pub source: KernelSource,
    /// Modules the guest loads; they and their dependencies are ordered and kept.
    pub modules: Vec<String>,
    /// Drop every module file not in the load order (91 MB of modules become about 1 MB).
    pub prune_modules: bool,
}

impl KernelPull {
    /// Pulls catalog kernel `name` through apt.
    pub fn catalog(name: &str) -> Result<Self, CatalogError> {
        let entry = catalog::kernel(name)?;
        Ok(Self {
            name: name.to_owned(),
            source: KernelSource::Apt { metapackage: entry.metapackage.to_owned() },
            modules: entry.modules.iter().map(|m| (*m).to_owned()).collect(),
            prune_modules: true,
        })
    }

    /// Pulls kernel `name` from a `--from` argument (file or URL), with the module list of the
    /// catalog entry of the same name, or [`GUEST_MODULES`] for other names.
    pub fn from_arg(name: &str, from: &str) -> Self {
        let modules = catalog::kernel(name).map_or(GUEST_MODULES, |entry| entry.modules);
        Self {
            name: name.to_owned(),
            source: KernelSource::from_arg(from),
            modules: modules.iter().map(|m| (*m).to_owned()).collect(),
            prune_modules: true,
        }
    }
}

/// Paths inside a published kernel, relative to its directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFiles {
    /// bzImage (QEMU).
    pub vmlinuz: String,
    /// ELF kernel (Firecracker).
    pub vmlinux: String,
    /// Kernel configuration, if the package ships one.
    pub config: Option<String>,
    /// Module tree.
    pub modules: String,
    /// Module load order.
    pub module_order: String,
}

/// `kernel.json`: what a published kernel is and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelManifest {
    /// Local name.
    pub name: String,
    /// Debian package name, if known (from apt or the package's control file).
    pub package: Option<String>,
    /// Exact package version, if known.
    pub version: Option<String>,
    /// Kernel release (`uname -r`).
    pub release: String,
    /// Where the package came from.
    pub source: KernelSource,
    /// Files of the kernel directory.
    pub files: KernelFiles,
    /// Guest modules in load order (names; paths are in `modules.json`).
    pub modules: Vec<String>,
    /// Whether module files outside the load order were dropped.
    pub pruned_modules: bool,
    /// When it was pulled (RFC 3339, UTC).
    pub pulled_at: String,
}

/// One module of `modules.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleOrderEntry {
    /// Normalised module name.
    pub name: String,
    /// Path relative to the kernel's `modules/` directory.
    pub path: PathBuf,
    /// Modules it depends on.
    pub depends: Vec<String>,
}

/// `modules.json`: the guest modules in load order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleOrderFile {
    /// Kernel release.
    pub release: String,
    /// Modules, each after its dependencies.
    pub modules: Vec<ModuleOrderEntry>,
    /// Requested or needed modules built into the kernel.
    pub builtin: Vec<String>,
}

/// A published kernel, as returned by [`pull_kernel`] and [`open_kernel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledKernel {
    /// Local name.
    pub name: String,
    /// Debian package name, if known.
    pub package: Option<String>,
    /// Exact package version, if known.
    pub version: Option<String>,
    /// Kernel release (`uname -r`).
    pub release: String,
    /// Where the package came from.
    pub source: KernelSource,
    /// The kernel directory.
    pub dir: PathBuf,
    /// bzImage.
    pub vmlinuz: PathBuf,
    /// ELF kernel.
    pub vmlinux: PathBuf,
    /// Kernel configuration, if shipped.
    pub config: Option<PathBuf>,
    /// Module tree root.
    pub modules_dir: PathBuf,
    /// Guest modules in load order, with full paths: pass to
    /// [`crate::initramfs::build_guest_initramfs`].
    pub modules: Vec<OrderedModule>,
    /// Guest modules built into the kernel.
    pub builtin: Vec<String>,
}

/// What went wrong pulling a kernel.
#[derive(Debug, thiserror::Error)]
pub enum PullKernelError {
    /// The name cannot be a directory name.
    #[error("kernel name '{name}' cannot be used; use letters, digits, '-' and '.', not starting with '.'")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A kernel of that name exists.
    #[error("kernel '{name}' already exists; delete it with `banger kernel delete {name}`")]
    Exists {
        /// The name.
        name: String,
    },
    /// apt does not know the metapackage.
    #[error("apt knows no package '{package}'; run `apt-get update` on the host, or pass `--from FILE.deb`")]
    UnknownPackage {
        /// The package.
        package: String,
    },
    /// The metapackage depends on no versioned kernel package.
    #[error(
        "apt says '{metapackage}' depends on no linux-image package; run `apt-get update` on the host, \
         or pass `--from FILE.deb`"
    )]
    NoVersionedPackage {
        /// The metapackage.
        metapackage: String,
    },
    /// apt has no installable version of the package.
    #[error(
        "apt has no installable version of '{package}'; run `apt-get update` on the host, or pass `--from FILE.deb`"
    )]
    NoCandidate {
        /// The package.
        package: String,
    },
    /// Asking apt failed.
    #[error("cannot resolve '{metapackage}' with apt")]
    Resolve {
        /// The metapackage.
        metapackage: String,
        /// The cause.
        #[source]
        source: HostToolError,
    },
    /// Downloading failed.
    #[error("cannot download kernel package '{what}'")]
    Download {
        /// Package and version, or URL.
        what: String,
        /// The cause.
        #[source]
        source: HostToolError,
    },
    /// The download succeeded but left no package file.
    #[error("apt-get download left no .deb for '{package}' in {}; check apt's configuration", dir.display())]
    DownloadMissing {
        /// The package.
        package: String,
        /// Where it should be.
        dir: PathBuf,
    },
    /// The package could not be unpacked (or is not a kernel package).
    #[error(transparent)]
    Extract(#[from] KernelExtractError),
    /// The module tree could not be indexed.
    #[error(transparent)]
    ScanModules(#[from] ScanModulesError),
    /// The guest modules could not be ordered (missing from this kernel, for instance).
    #[error(transparent)]
    ModuleOrder(#[from] LoadOrderError),
    /// Writing into the kernels directory failed.
    #[error("cannot write {}; check that the kernels directory is writable", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What went wrong opening or deleting a published kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelDirError {
    /// No kernel of that name.
    #[error("kernel '{name}' not found; run `banger kernel pull {name}`")]
    NotFound {
        /// The name.
        name: String,
    },
    /// Its manifest is missing or unreadable.
    #[error("kernel '{name}' is damaged ({}); delete it with `banger kernel delete {name}` and pull it again", path.display())]
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
    #[error("cannot delete kernel '{name}' in {}", dir.display())]
    Delete {
        /// The name.
        name: String,
        /// The kernels directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The versioned package `metapackage` depends on, from `apt-cache depends --important` output.
pub fn parse_apt_depends(output: &str, metapackage: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('|');
        let package = line.strip_prefix("Depends:").or_else(|| line.strip_prefix("PreDepends:"))?.trim();
        (package.starts_with("linux-image-") && package != metapackage && !package.starts_with('<'))
            .then(|| package.to_owned())
    })
}

/// The candidate version from `apt-cache policy` output; `None` if there is none.
pub fn parse_apt_candidate(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_owned)
}

/// `Package` and `Version` from a `.deb`'s control file; `None` if it has none readable.
pub fn read_deb_control(deb: &Path) -> Option<(String, String)> {
    let mut archive = ar::Archive::new(BufReader::new(File::open(deb).ok()?));
    while let Some(entry) = archive.next_entry() {
        let entry = entry.ok()?;
        let member = String::from_utf8_lossy(entry.header().identifier()).trim_end_matches('/').to_owned();
        let Some(format) = member.strip_prefix("control.tar") else {
            continue;
        };
        let reader: Box<dyn Read + '_> = match format {
            "" => Box::new(entry),
            ".xz" => Box::new(xz2::read::XzDecoder::new(entry)),
            ".gz" => Box::new(flate2::read::GzDecoder::new(entry)),
            ".zst" => Box::new(zstd::stream::read::Decoder::new(entry).ok()?),
            _ => return None,
        };
        let mut tar = tar::Archive::new(reader);
        for file in tar.entries().ok()? {
            let mut file = file.ok()?;
            let path = file.path().ok()?.into_owned();
            if path.strip_prefix(".").unwrap_or(&path) != Path::new("control") {
                continue;
            }
            let mut text = String::new();
            file.read_to_string(&mut text).ok()?;
            let field = |key: &str| {
                text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(|v| v.trim().to_owned())
            };
            return Some((field("Package")?, field("Version")?));
        }
        return None;
    }
    None
}

/// Pulls a kernel into `kernels_dir/<pull.name>`, reporting stages (`resolve`, `download`,
/// `extract`, `publish`) to `progress`.
pub fn pull_kernel(
    host: &dyn HostTools,
    kernels_dir: &Path,
    pull: &KernelPull,
    progress: &mut dyn FnMut(&str),
) -> Result<PulledKernel, PullKernelError> {
    let name = &pull.name;
    if staging::unsafe_name(name) {
        return Err(PullKernelError::InvalidName { name: name.clone() });
    }
    let dest = kernels_dir.join(name);
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(PullKernelError::Exists { name: name.clone() });
    }
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| PullKernelError::Io { path, source }
    };
    let staging = Staging::new(kernels_dir).map_err(io_error(kernels_dir))?;
    let download_dir = staging.path().join("download");
    fs::create_dir(&download_dir).map_err(io_error(&download_dir))?;

    let (deb, mut package) = match &pull.source {
        KernelSource::Apt { metapackage } => {
            progress("resolve");
            let (package, version) = resolve_apt(host, metapackage)?;
            progress("download");
            tracing::info!(%package, %version, "downloading kernel package");
            host.apt_download(&package, &version, &download_dir)
                .map_err(|source| PullKernelError::Download { what: format!("{package}={version}"), source })?;
            let deb = find_deb(&download_dir, &package)?;
            (deb, Some((package, version)))
        }
        KernelSource::File { path } => (path.clone(), None),
        KernelSource::Url { url } => {
            progress("download");
            let deb = download_dir.join("kernel.deb");
            host.fetch_url(url, &deb).map_err(|source| PullKernelError::Download { what: url.clone(), source })?;
            (deb, None)
        }
    };

    progress("extract");
    let work = staging.path().join("kernel");
    let extracted = extract_kernel_deb(&deb, &work)?;
    if package.is_none() {
        package = read_deb_control(&deb);
    }
    let mut index = ModuleIndex::scan(&extracted.modules)?;
    if let Some(config) = &extracted.config {
        index = index.with_config(config)?;
    }
    let order = index.load_order(&pull.modules)?;
    if pull.prune_modules {
        let keep: BTreeSet<PathBuf> = order.modules.iter().map(|m| m.relative.clone()).collect();
        prune_modules(&extracted.modules, Path::new(""), &keep).map_err(io_error(&extracted.modules))?;
    }
    // The download is no longer needed; drop it before publishing so the rename moves less.
    fs::remove_dir_all(&download_dir).map_err(io_error(&download_dir))?;

    let (package, version) = package.unzip();
    let order_file = ModuleOrderFile {
        release: extracted.release.clone(),
        modules: order
            .modules
            .iter()
            .map(|m| ModuleOrderEntry { name: m.name.clone(), path: m.relative.clone(), depends: m.depends.clone() })
            .collect(),
        builtin: order.builtin.clone(),
    };
    let manifest = KernelManifest {
        name: name.clone(),
        package,
        version,
        release: extracted.release.clone(),
        source: pull.source.clone(),
        files: KernelFiles {
            vmlinuz: VMLINUZ_FILE.to_owned(),
            vmlinux: VMLINUX_FILE.to_owned(),
            config: extracted.config.as_ref().map(|_| CONFIG_FILE.to_owned()),
            modules: MODULES_DIR.to_owned(),
            module_order: MODULE_ORDER_FILE.to_owned(),
        },
        modules: order.modules.iter().map(|m| m.name.clone()).collect(),
        pruned_modules: pull.prune_modules,
        pulled_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    write_json(&work.join(MODULE_ORDER_FILE), &order_file)?;
    write_json(&work.join(KERNEL_MANIFEST_FILE), &manifest)?;

    progress("publish");
    staging::publish(&work, &dest).map_err(|failure| match failure {
        PublishFailure::Exists => PullKernelError::Exists { name: name.clone() },
        PublishFailure::Io(source) => PullKernelError::Io { path: dest.clone(), source },
    })?;
    drop(staging);
    tracing::info!(kernel = %name, release = %manifest.release, "kernel published");
    Ok(published(&dest, manifest, order_file))
}

/// Opens the published kernel `kernels_dir/<name>`.
pub fn open_kernel(kernels_dir: &Path, name: &str) -> Result<PulledKernel, KernelDirError> {
    let dir = kernels_dir.join(name);
    if staging::unsafe_name(name) || !dir.is_dir() {
        return Err(KernelDirError::NotFound { name: name.to_owned() });
    }
    let manifest: KernelManifest = read_json(&dir, name, KERNEL_MANIFEST_FILE)?;
    let order: ModuleOrderFile = read_json(&dir, name, &manifest.files.module_order)?;
    Ok(published(&dir, manifest, order))
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str, file: &str) -> Result<T, KernelDirError> {
    let path = dir.join(file);
    fs::read(&path)
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(io::Error::from))
        .map_err(|source| KernelDirError::Damaged { name: name.to_owned(), path, source })
}

/// Deletes the published kernel `kernels_dir/<name>`.
pub fn delete_kernel_dir(kernels_dir: &Path, name: &str) -> Result<(), KernelDirError> {
    if staging::unsafe_name(name) {
        return Err(KernelDirError::NotFound { name: name.to_owned() });
    }
    match staging::delete_dir(kernels_dir, name) {
        Ok(true) => Ok(()),
        Ok(false) => Err(KernelDirError::NotFound { name: name.to_owned() }),
        Err(source) => Err(KernelDirError::Delete { name: name.to_owned(), dir: kernels_dir.to_owned(), source }),
    }
}

fn published(dir: &Path, manifest: KernelManifest, order: ModuleOrderFile) -> PulledKernel {
    let modules_dir = dir.join(&manifest.files.modules);
    PulledKernel {
        vmlinuz: dir.join(&manifest.files.vmlinuz),
        vmlinux: dir.join(&manifest.files.vmlinux),
        config: manifest.files.config.as_ref().map(|c| dir.join(c)),
        modules: order
            .modules
            .into_iter()
            .map(|m| OrderedModule {
                name: m.name,
                path: modules_dir.join(&m.path),
                relative: m.path,
                depends: m.depends,
            })
            .collect(),
        builtin: order.builtin,
        modules_dir,
        dir: dir.to_owned(),
        name: manifest.name,
        package: manifest.package,
        version: manifest.version,
        release: manifest.release,
        source: manifest.source,
    }
}

fn resolve_apt(host: &dyn HostTools, metapackage: &str) -> Result<(String, String), PullKernelError> {
    let resolve_error = |source: HostToolError| match &source {
        HostToolError::Failed { stderr, .. } if stderr.contains("No packages found") => {
            PullKernelError::UnknownPackage { package: metapackage.to_owned() }
        }
        _ => PullKernelError::Resolve { metapackage: metapackage.to_owned(), source },
    };
    let depends = host.apt_cache_depends(metapackage).map_err(resolve_error)?;
    let package = parse_apt_depends(&depends, metapackage)
        .ok_or_else(|| PullKernelError::NoVersionedPackage { metapackage: metapackage.to_owned() })?;
    let policy = host.apt_cache_policy(&package).map_err(resolve_error)?;
    let version =
        parse_apt_candidate(&policy).ok_or_else(|| PullKernelError::NoCandidate { package: package.clone() })?;
    Ok((package, version))
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, PullKernelError> {
    let missing = || PullKernelError::DownloadMissing { package: package.to_owned(), dir: dir.to_owned() };
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .map_err(|source| PullKernelError::Io { path: dir.to_owned(), source })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")))
        .ok_or_else(missing)
}

/// Removes module files under `root/dir` not in `keep`, and directories left empty.
fn prune_modules(root: &Path, dir: &Path, keep: &BTreeSet<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(root.join(dir))? {
        let entry = entry?;
        let relative = dir.join(entry.file_name());
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            prune_modules(root, &relative, keep)?;
            let full = root.join(&relative);
            if fs::read_dir(&full)?.next().is_none() {
                fs::remove_dir(&full)?;
            }
        } else if !keep.contains(&relative) && entry.file_name().to_str().is_some_and(is_module_file) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn is_module_file(name: &str) -> bool {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|suffix| name.ends_with(suffix))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), PullKernelError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| PullKernelError::Io { path: path.to_owned(), source: io::Error::from(e) })?;
    text.push('\n');
    fs::write(path, text).map_err(|source| PullKernelError::Io { path: path.to_owned(), source })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests;
