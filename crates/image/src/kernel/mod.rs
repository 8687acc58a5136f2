//! Debian kernel packages: unpack a `linux-image-*.deb` into a kernel directory.
//!
//! A `.deb` is an `ar` archive whose `data.tar[.xz|.zst|.gz]` member holds `boot/vmlinuz-<release>`,
//! `boot/config-<release>` and `lib/modules/<release>/` (or `usr/lib/modules/<release>/`), with or
//! without a leading `./`. The result is a directory holding `vmlinuz` (bzImage, for QEMU),
//! `vmlinux` (ELF, for Firecracker), `config` and `modules/` (the `lib/modules/<release>` tree).

pub mod pull;
mod vmlinux;

pub use vmlinux::{extract_vmlinux, VmlinuxError};

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

/// Name of the bzImage in an extracted kernel directory.
pub const VMLINUZ_FILE: &str = "vmlinuz";
/// Name of the ELF kernel in an extracted kernel directory.
pub const VMLINUX_FILE: &str = "vmlinux";
/// Name of the kernel build configuration in an extracted kernel directory.
pub const CONFIG_FILE: &str = "config";
/// Name of the module tree (`lib/modules/<release>`) in an extracted kernel directory.
pub const MODULES_DIR: &str = "modules";

/// A kernel unpacked by [`extract_kernel_deb`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedKernel {
    /// Kernel release, as `uname -r` will print it (e.g. `6.1.0-56-cloud-amd64`).
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The ELF kernel unpacked from the bzImage.
    pub vmlinux: PathBuf,
    /// The kernel build configuration, if the package ships one.
    pub config: Option<PathBuf>,
    /// The module tree, the package's `lib/modules/<release>` directory (created even if empty).
    pub modules: PathBuf,
    /// Number of regular files written under `modules`.
    pub module_tree_files: usize,
}

/// What went wrong unpacking a kernel package.
#[derive(Debug, thiserror::Error)]
pub enum KernelExtractError {
    /// The package file could not be opened or read.
    #[error("cannot read {}", path.display())]
    Open {
        /// The package.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not an `ar` archive.
    #[error(
        "{} is not a Debian kernel package (not an ar archive); pass a linux-image-*.deb",
        path.display()
    )]
    NotADeb {
        /// The file.
        path: PathBuf,
    },
    /// The archive has no `data.tar*` member.
    #[error(
        "{} is not a Debian kernel package (no data.tar member); pass a linux-image-*.deb",
        path.display()
    )]
    NoDataMember {
        /// The file.
        path: PathBuf,
    },
    /// The data member uses a compression we do not decode.
    #[error(
        "{} has a data member '{member}' in an unsupported format; \
         expected data.tar, data.tar.xz, data.tar.zst or data.tar.gz",
        path.display()
    )]
    UnsupportedDataMember {
        /// The package.
        path: PathBuf,
        /// The member name.
        member: String,
    },
    /// The archive or its data member is corrupt.
    #[error("cannot unpack {}; the file may be truncated or corrupt, download it again", path.display())]
    Corrupt {
        /// The package.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The package holds no kernel image.
    #[error(
        "{} is not a Debian kernel package (no boot/vmlinuz-* inside); pass a linux-image-*.deb",
        path.display()
    )]
    NoKernel {
        /// The package.
        path: PathBuf,
    },
    /// The package holds more than one kernel image.
    #[error(
        "{} holds several kernels ({first} and {second}); pass a package with one kernel",
        path.display()
    )]
    SeveralKernels {
        /// The package.
        path: PathBuf,
        /// One release.
        first: String,
        /// Another release.
        second: String,
    },
    /// The package's module tree is for another release than its kernel.
    #[error(
        "{} holds modules for {modules} but the kernel is {kernel}; pass a single linux-image package",
        path.display()
    )]
    ReleaseMismatch {
        /// The package.
        path: PathBuf,
        /// Kernel release from `boot/vmlinuz-*`.
        kernel: String,
        /// Other releases found in the module tree or config name.
        modules: String,
    },
    /// An archive entry would escape the destination.
    #[error("{} has an unsafe entry '{entry}'; refusing to unpack it", path.display())]
    UnsafeEntry {
        /// The package.
        path: PathBuf,
        /// The entry's path.
        entry: String,
    },
    /// Writing into the destination failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The bzImage could not be unpacked.
    #[error("cannot unpack vmlinux from the kernel in {}", path.display())]
    Vmlinux {
        /// The package.
        path: PathBuf,
        /// The cause.
        #[source]
        source: VmlinuxError,
    },
}

/// Where a data-member entry goes.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Vmlinuz {
        release: &'a str,
    },
    Config {
        release: &'a str,
    },
    /// Inside `lib/modules/<release>/`; `rest` is empty for the release directory itself.
    Module {
        release: &'a str,
        rest: &'a Path,
    },
    Ignore,
}

/// Unpacks the Debian kernel package `deb` into `dest` (created if missing), writing `vmlinuz`,
/// `vmlinux`, `config` and `modules/`.
///
/// Existing files of the same names are overwritten; to replace a kernel atomically, unpack into a
/// fresh directory and rename it into place.
pub fn extract_kernel_deb(deb: &Path, dest: &Path) -> Result<ExtractedKernel, KernelExtractError> {
    let open_error = |source| KernelExtractError::Open { path: deb.to_owned(), source };
    let corrupt = |source| KernelExtractError::Corrupt { path: deb.to_owned(), source };

    let mut file = BufReader::new(File::open(deb).map_err(open_error)?);
    let mut magic = [0u8; 8];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"!<arch>\n" => {}
        Ok(()) => return Err(KernelExtractError::NotADeb { path: deb.into() }),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(KernelExtractError::NotADeb { path: deb.into() })
        }
        Err(e) => return Err(open_error(e)),
    }
    file.rewind().map_err(open_error)?;

    mkdir(dest)?;
    let modules_dir = dest.join(MODULES_DIR);
    mkdir(&modules_dir)?;

    let mut archive = ar::Archive::new(file);
    while let Some(entry) = archive.next_entry() {
        let entry = entry.map_err(corrupt)?;
        // GNU ar ends member names with '/'; dpkg-deb does not.
        let member = String::from_utf8_lossy(entry.header().identifier()).trim_end_matches('/').to_owned();
        let Some(format) = member.strip_prefix("data.tar") else {
            continue;
        };
        let reader: Box<dyn Read + '_> = match format {
            "" => Box::new(entry),
            ".xz" => Box::new(xz2::read::XzDecoder::new(entry)),
            ".gz" => Box::new(flate2::read::GzDecoder::new(entry)),
            ".zst" => Box::new(zstd::stream::read::Decoder::new(entry).map_err(corrupt)?),
            _ => return Err(KernelExtractError::UnsupportedDataMember { path: deb.into(), member }),
        };
        return unpack_data(deb, reader, dest, &modules_dir);
    }
    Err(KernelExtractError::NoDataMember { path: deb.into() })
}

/// Unpacks the kernel files from the data tarball `data` of package `deb`.
fn unpack_data(
    deb: &Path,
    data: impl Read,
    dest: &Path,
    modules_dir: &Path,
) -> Result<ExtractedKernel, KernelExtractError> {
    let corrupt = |source| KernelExtractError::Corrupt { path: deb.to_owned(), source };
    let mut kernel: Option<(String, Vec<u8>)> = None;
    let mut config = None;
    let mut module_releases = BTreeSet::new();
    let mut module_tree_files = 0;

    let mut tar = tar::Archive::new(data);
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let entry_path = entry.path().map_err(corrupt)?.into_owned();
        let Some(target) = classify(&entry_path) else {
            return Err(KernelExtractError::UnsafeEntry { path: deb.into(), entry: entry_path.display().to_string() });
        };
        let kind = entry.header().entry_type();
        match target {
            Target::Vmlinuz { release } if kind.is_file() => {
                if let Some((first, _)) = &kernel {
                    return Err(KernelExtractError::SeveralKernels {
                        path: deb.into(),
                        first: first.clone(),
                        second: release.into(),
                    });
                }
                let mut image = Vec::new();
                entry.read_to_end(&mut image).map_err(corrupt)?;
                let out = dest.join(VMLINUZ_FILE);
                fs::write(&out, &image).map_err(|source| write_error(&out, source))?;
                kernel = Some((release.to_owned(), image));
            }
            Target::Config { release } if kind.is_file() => {
                let out = dest.join(CONFIG_FILE);
                copy_entry(deb, &mut entry, &out)?;
                config = Some((release.to_owned(), out));
            }
            Target::Module { release, rest } => {
                module_releases.insert(release.to_owned());
                let out = modules_dir.join(rest);
                if kind.is_dir() {
                    mkdir(&out)?;
                } else if kind.is_file() {
                    if let Some(parent) = out.parent() {
                        mkdir(parent)?;
                    }
                    copy_entry(deb, &mut entry, &out)?;
                    module_tree_files += 1;
                }
                // Symlinks (`build`, `source`) point into headers packages we do not have.
            }
            _ => {}
        }
    }

    let Some((release, image)) = kernel else {
        return Err(KernelExtractError::NoKernel { path: deb.into() });
    };
    let foreign: Vec<_> =
        module_releases.iter().chain(config.iter().map(|(r, _)| r)).filter(|r| **r != release).cloned().collect();
    if !foreign.is_empty() {
        return Err(KernelExtractError::ReleaseMismatch {
            path: deb.into(),
            kernel: release,
            modules: foreign.join(", "),
        });
    }

    let elf = extract_vmlinux(&image).map_err(|source| KernelExtractError::Vmlinux { path: deb.into(), source })?;
    let vmlinux = dest.join(VMLINUX_FILE);
    fs::write(&vmlinux, elf).map_err(|source| write_error(&vmlinux, source))?;

    Ok(ExtractedKernel {
        release,
        vmlinuz: dest.join(VMLINUZ_FILE),
        vmlinux,
        config: config.map(|(_, path)| path),
        modules: modules_dir.to_owned(),
        module_tree_files,
    })
}

/// Decides where an entry of the data tarball goes. `None` for a path that could escape the
/// destination (`..`, absolute).
fn classify(path: &Path) -> Option<Target<'_>> {
    if path.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_))) {
        return None;
    }
    let path = path.strip_prefix(".").unwrap_or(path);
    let modules = path.strip_prefix("lib/modules").or_else(|_| path.strip_prefix("usr/lib/modules"));
    if let Ok(modules) = modules {
        let mut components = modules.components();
        let target = match components.next().map(|c| c.as_os_str().to_str()) {
            Some(Some(release)) => Target::Module { release, rest: components.as_path() },
            _ => Target::Ignore,
        };
        return Some(target);
    }
    let name = match path.strip_prefix("boot") {
        Ok(name) if name.components().count() == 1 => name.to_str(),
        _ => None,
    };
    let release = |prefix| name?.strip_prefix(prefix).filter(|r| !r.is_empty());
    Some(if let Some(release) = release("vmlinuz-") {
        Target::Vmlinuz { release }
    } else if let Some(release) = release("config-") {
        Target::Config { release }
    } else {
        Target::Ignore
    })
}

/// Copies a tarball entry to a new file at `out`, telling the package's read errors from the
/// destination's write errors.
fn copy_entry(deb: &Path, entry: &mut impl Read, out: &Path) -> Result<(), KernelExtractError> {
    let mut file = File::create(out).map_err(|source| write_error(out, source))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(KernelExtractError::Corrupt { path: deb.into(), source }),
        };
        file.write_all(&buf[..n]).map_err(|source| write_error(out, source))?;
    }
}

fn mkdir(path: &Path) -> Result<(), KernelExtractError> {
    fs::create_dir_all(path).map_err(|source| write_error(path, source))
}

fn write_error(path: &Path, source: io::Error) -> KernelExtractError {
    KernelExtractError::Write { path: path.into(), source }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::vmlinux::tests::{bzimage, tiny_elf};
    use super::*;

    const RELEASE: &str = "6.1.0-99-cloud-amd64";

    /// A bzImage whose payload is an uncompressed tiny ELF.
    fn kernel_image() -> (Vec<u8>, Vec<u8>) {
        let elf = tiny_elf(b"vmlinux body");
        (bzimage(4, 8, &elf), elf)
    }

    /// A tarball of `files` (path, contents); paths ending in `/` are directories.
    fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            if path.ends_with('/') {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
            } else {
                header.set_mode(0o644);
            }
            header.set_size(data.len() as u64);
            tar.append_data(&mut header, path, *data).unwrap();
        }
        tar.into_inner().unwrap()
    }

    /// A .deb-shaped ar archive with the given data member name and contents.
    fn deb(dir: &Path, member: &str, data: &[u8]) -> PathBuf {
        let path = dir.join("linux-image-test_1_amd64.deb");
        let mut ar = ar::Builder::new(File::create(&path).unwrap());
        for (name, contents) in
            [("debian-binary", b"2.0\n".as_slice()), ("control.tar.xz", b"not looked at".as_slice()), (member, data)]
        {
            let header = ar::Header::new(name.as_bytes().to_vec(), contents.len() as u64);
            ar.append(&header, contents).unwrap();
        }
        path
    }

    fn kernel_files(prefix: &str, modules_root: &str, image: &[u8]) -> Vec<u8> {
        let config = format!("{prefix}boot/config-{RELEASE}");
        let vmlinuz = format!("{prefix}boot/vmlinuz-{RELEASE}");
        let root = format!("{prefix}{modules_root}/{RELEASE}/");
        let virtio = format!("{root}kernel/drivers/virtio/");
        let ko = format!("{virtio}virtio_mmio.ko");
        let builtin = format!("{root}modules.builtin");
        tarball(&[
            (&format!("{prefix}boot/"), b""),
            (&format!("{prefix}boot/System.map-{RELEASE}"), b"ffff T _text"),
            (&config, b"CONFIG_EXT4_FS=y\n"),
            (&vmlinuz, image),
            (&root, b""),
            (&virtio, b""),
            (&ko, b"\x7fELF module"),
            (&builtin, b"kernel/fs/ext4/ext4.ko\n"),
            (&format!("{prefix}usr/share/doc/x/changelog.gz"), b"doc"),
        ])
    }

    fn check_extracted(kernel: &ExtractedKernel, dest: &Path, elf: &[u8]) {
        assert_eq!(kernel.release, RELEASE);
        assert_eq!(kernel.vmlinux, dest.join("vmlinux"));
        assert!(fs::read(&kernel.vmlinux).unwrap() == elf);
        assert!(fs::read(&kernel.vmlinuz).unwrap().len() > 512);
        assert_eq!(fs::read_to_string(kernel.config.as_ref().unwrap()).unwrap(), "CONFIG_EXT4_FS=y\n");
        assert_eq!(kernel.modules, dest.join("modules"));
        assert_eq!(fs::read(kernel.modules.join("kernel/drivers/virtio/virtio_mmio.ko")).unwrap(), b"\x7fELF module");
        assert!(kernel.modules.join("modules.builtin").is_file());
        assert_eq!(kernel.module_tree_files, 2);
        assert!(!dest.join("usr").exists() && !dest.join("System.map").exists());
    }

    #[test]
    fn extracts_xz_deb_with_dot_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let (image, elf) = kernel_image();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&kernel_files("./", "lib/modules", &image)).unwrap();
        let deb = deb(dir.path(), "data.tar.xz", &xz.finish().unwrap());
        let dest = dir.path().join("kernel");
        let kernel = extract_kernel_deb(&deb, &dest).unwrap();
        check_extracted(&kernel, &dest, &elf);
    }

    #[test]
    fn extracts_zst_gz_and_plain_members_with_usr_lib_modules() {
        let (image, elf) = kernel_image();
        let data = kernel_files("", "usr/lib/modules", &image);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let members = [
            ("data.tar.zst", zstd::encode_all(data.as_slice(), 1).unwrap()),
            ("data.tar.gz", gz.finish().unwrap()),
            ("data.tar", data.clone()),
        ];
        for (member, contents) in members {
            let dir = tempfile::tempdir().unwrap();
            let deb = deb(dir.path(), member, &contents);
            let dest = dir.path().join("kernel");
            let kernel = extract_kernel_deb(&deb, &dest).unwrap();
            check_extracted(&kernel, &dest, &elf);
        }
    }

    #[test]
    fn rejects_a_file_that_is_not_an_ar_archive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinuz");
        fs::write(&path, b"MZ this is a bzImage, not a package").unwrap();
        let err = extract_kernel_deb(&path, &dir.path().join("out")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is not a Debian kernel package (not an ar archive); pass a linux-image-*.deb", path.display())
        );
        fs::write(&path, b"tiny").unwrap();
        assert!(matches!(extract_kernel_deb(&path, &dir.path().join("out")), Err(KernelExtractError::NotADeb { .. })));
    }

    #[test]
    fn rejects_a_package_without_a_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let data = tarball(&[("./usr/bin/", b""), ("./usr/bin/hello", b"hi")]);
        let deb = deb(dir.path(), "data.tar", &data);
        let err = extract_kernel_deb(&deb, &dir.path().join("out")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is not a Debian kernel package (no boot/vmlinuz-* inside); \
                 pass a linux-image-*.deb",
                deb.display()
            )
        );
    }

    #[test]
    fn rejects_missing_and_unknown_data_members() {
        let dir = tempfile::tempdir().unwrap();
        let deb_path = deb(dir.path(), "other.tar", b"");
        assert!(matches!(
            extract_kernel_deb(&deb_path, &dir.path().join("out")),
            Err(KernelExtractError::NoDataMember { .. })
        ));
        let deb_path = deb(dir.path(), "data.tar.bz2", b"BZh");
        assert!(matches!(
            extract_kernel_deb(&deb_path, &dir.path().join("out")),
            Err(KernelExtractError::UnsupportedDataMember { member, .. }) if member == "data.tar.bz2"
        ));
    }

    #[test]
    fn rejects_modules_of_another_release() {
        let dir = tempfile::tempdir().unwrap();
        let (image, _) = kernel_image();
        let data =
            tarball(&[(&format!("boot/vmlinuz-{RELEASE}"), &image), ("lib/modules/5.10.0-1-amd64/kernel/x.ko", b"x")]);
        let deb = deb(dir.path(), "data.tar", &data);
        let err = extract_kernel_deb(&deb, &dir.path().join("out")).unwrap_err();
        assert!(
            matches!(&err, KernelExtractError::ReleaseMismatch { modules, .. } if modules == "5.10.0-1-amd64"),
            "{err}"
        );
    }

    #[test]
    fn rejects_a_bad_bzimage() {
        let dir = tempfile::tempdir().unwrap();
        let data = tarball(&[(&format!("boot/vmlinuz-{RELEASE}"), b"garbage")]);
        let deb = deb(dir.path(), "data.tar", &data);
        let err = extract_kernel_deb(&deb, &dir.path().join("out")).unwrap_err();
        assert!(matches!(err, KernelExtractError::Vmlinux { source: VmlinuxError::NotBzImage, .. }));
    }

    #[test]
    fn classifies_entries() {
        let module = |path| match classify(Path::new(path)) {
            Some(Target::Module { release, rest }) => (release.to_owned(), rest.to_owned()),
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(module("./lib/modules/6.1/kernel/a.ko"), ("6.1".into(), PathBuf::from("kernel/a.ko")));
        assert_eq!(module("usr/lib/modules/6.1/"), ("6.1".into(), PathBuf::new()));
        assert_eq!(classify(Path::new("./boot/vmlinuz-6.1")), Some(Target::Vmlinuz { release: "6.1" }));
        assert_eq!(classify(Path::new("boot/config-6.1")), Some(Target::Config { release: "6.1" }));
        for ignored in ["boot/vmlinuz-", "boot/x/vmlinuz-1", "lib/modules", "./", "etc/x"] {
            assert_eq!(classify(Path::new(ignored)), Some(Target::Ignore), "{ignored}");
        }
        assert_eq!(classify(Path::new("../lib/modules/6.1/x.ko")), None);
        assert_eq!(classify(Path::new("/boot/vmlinuz-6.1")), None);
        assert_eq!(classify(Path::new("lib/modules/6.1/../../../x")), None);
    }
}
