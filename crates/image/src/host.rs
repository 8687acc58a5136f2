//! Host tools the pull and build orchestrations run: apt, curl, mmdebstrap, mkfs.ext4.
//!
//! Everything that runs a program or reads host configuration goes through [`HostTools`].
//! [`SystemHost`] runs the real tools; [`FakeHost`] records each call as a [`HostCall`] and acts
//! out just enough of its effect (a `.deb` appears, a root tree appears, an ext4 superblock
//! appears) for the orchestration to be tested without the tools.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// A host program banger runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostTool {
    /// `apt-cache`.
    AptCache,
    /// `apt-get`.
    AptGet,
    /// `curl`.
    Curl,
    /// `mmdebstrap`.
    Mmdebstrap,
    /// `mkfs.ext4`.
    MkfsExt4,
    /// Reading the host's apt sources (no program).
    AptSources,
}

impl HostTool {
    /// The program name.
    pub fn program(self) -> &'static str {
        match self {
            Self::AptCache => "apt-cache",
            Self::AptGet => "apt-get",
            Self::Curl => "curl",
            Self::Mmdebstrap => "mmdebstrap",
            Self::MkfsExt4 => "mkfs.ext4",
            Self::AptSources => "apt sources",
        }
    }

    /// What to do when the program is missing.
    fn install_hint(self) -> &'static str {
        match self {
            Self::AptCache | Self::AptGet | Self::AptSources => {
                "catalog kernels are pulled with apt on a Debian host; pass `--from FILE.deb` instead"
            }
            Self::Curl => "run `apt-get install curl`, or download the package yourself and pass `--from FILE.deb`",
            Self::Mmdebstrap => "run `apt-get install mmdebstrap`",
            Self::MkfsExt4 => "run `apt-get install e2fsprogs`",
        }
    }
}

impl fmt::Display for HostTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program())
    }
}

/// What went wrong running a host tool.
#[derive(Debug, thiserror::Error)]
pub enum HostToolError {
    /// The program is not installed.
    #[error("`{tool}` is not installed; {}", tool.install_hint())]
    NotInstalled {
        /// The program.
        tool: HostTool,
    },
    /// The program could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// A host configuration file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One apt sources file of the host: `*.list` (one-line format) or `*.sources` (deb822).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSourceFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its text.
    pub contents: String,
}

/// An `mmdebstrap` run into a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmdebstrapRequest {
    /// Debian suite.
    pub suite: String,
    /// `--variant`.
    pub variant: String,
    /// `--include` packages.
    pub packages: Vec<String>,
    /// Target directory; must not exist yet.
    pub target: PathBuf,
    /// apt sources (deb822) passed on standard input.
    pub sources: String,
}

impl MmdebstrapRequest {
    /// The arguments after `mmdebstrap`; the sources go on standard input (`-` mirror).
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> =
            vec!["--mode=root".into(), "--format=directory".into(), format!("--variant={}", self.variant).into()];
        if !self.packages.is_empty() {
            args.push(format!("--include={}", self.packages.join(",")).into());
        }
        args.extend([self.suite.clone().into(), self.target.clone().into_os_string(), "-".into()]);
        args
    }
}

/// A `mkfs.ext4 -d` run: an ext4 image from a directory, without mounting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MkfsRequest {
    /// Directory whose contents (owners, modes, xattrs included) fill the file system.
    pub dir: PathBuf,
    /// Image file to create.
    pub image: PathBuf,
    /// File system label.
    pub label: String,
    /// Size in MiB.
    pub size_mib: u64,
    /// Minimum number of inodes.
    pub inodes: u64,
}

impl MkfsRequest {
    /// The arguments after `mkfs.ext4`. `-T default` keeps 4 KiB blocks and 256-byte inodes even
    /// for images under 512 MiB (where mke2fs would otherwise pick the `small` profile).
    pub fn args(&self) -> Vec<OsString> {
        vec![
            "-F".into(),
            "-q".into(),
            "-T".into(),
            "default".into(),
            "-L".into(),
            self.label.clone().into(),
            "-N".into(),
            self.inodes.to_string().into(),
            "-d".into(),
            self.dir.clone().into_os_string(),
            self.image.clone().into_os_string(),
            format!("{}M", self.size_mib).into(),
        ]
    }
}

/// One call made through [`HostTools`], as recorded by [`FakeHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCall {
    /// `apt-cache depends --important PACKAGE`.
    AptCacheDepends {
        /// The package.
        package: String,
    },
    /// `apt-cache policy PACKAGE`.
    AptCachePolicy {
        /// The package.
        package: String,
    },
    /// `apt-get download PACKAGE=VERSION` in `dir`.
    AptDownload {
        /// The package.
        package: String,
        /// Its exact version.
        version: String,
        /// Where the `.deb` lands.
        dir: PathBuf,
    },
    /// `curl -fsSL -o DEST URL`.
    FetchUrl {
        /// The URL.
        url: String,
        /// The file written.
        dest: PathBuf,
    },
    /// The host's apt sources were read.
    ReadAptSources,
    /// `mmdebstrap ...`.
    Mmdebstrap(MmdebstrapRequest),
    /// `mkfs.ext4 ...`.
    MkfsExt4(MkfsRequest),
}

impl HostCall {
    /// The tool the call runs.
    pub fn tool(&self) -> HostTool {
        match self {
            Self::AptCacheDepends { .. } | Self::AptCachePolicy { .. } => HostTool::AptCache,
            Self::AptDownload { .. } => HostTool::AptGet,
            Self::FetchUrl { .. } => HostTool::Curl,
            Self::ReadAptSources => HostTool::AptSources,
            Self::Mmdebstrap(_) => HostTool::Mmdebstrap,
            Self::MkfsExt4(_) => HostTool::MkfsExt4,
        }
    }
}

/// The host side effects of kernel pulls and image builds.
pub trait HostTools: Send + Sync {
    /// Output of `apt-cache depends --important PACKAGE`.
    fn apt_cache_depends(&self, package: &str) -> Result<String, HostToolError>;
    /// Output of `apt-cache policy PACKAGE`.
    fn apt_cache_policy(&self, package: &str) -> Result<String, HostToolError>;
    /// Downloads `PACKAGE=VERSION` with `apt-get download` into `dir`.
    fn apt_download(&self, package: &str, version: &str, dir: &Path) -> Result<(), HostToolError>;
    /// Downloads `url` to `dest`.
    fn fetch_url(&self, url: &str, dest: &Path) -> Result<(), HostToolError>;
    /// The host's apt sources files.
    fn read_apt_sources(&self) -> Result<Vec<AptSourceFile>, HostToolError>;
    /// Bootstraps a Debian tree into `request.target`.
    fn mmdebstrap(&self, request: &MmdebstrapRequest) -> Result<(), HostToolError>;
    /// Makes an ext4 image from a directory.
    fn mkfs_ext4(&self, request: &MkfsRequest) -> Result<(), HostToolError>;
}

/// The real host: runs the programs from `PATH`.
#[derive(Debug, Clone)]
pub struct SystemHost {
    apt_etc: PathBuf,
}

impl Default for SystemHost {
    fn default() -> Self {
        Self { apt_etc: PathBuf::from("/etc/apt") }
    }
}

impl SystemHost {
    /// The host as configured in `/etc/apt`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads apt sources from `apt_etc` instead of `/etc/apt`.
    pub fn with_apt_etc(apt_etc: impl Into<PathBuf>) -> Self {
        Self { apt_etc: apt_etc.into() }
    }
}

fn run(tool: HostTool, args: &[OsString], cwd: Option<&Path>, stdin: Option<&str>) -> Result<String, HostToolError> {
    use crate::command::RunFailure;
    crate::command::run(tool.program(), args, &[], cwd, stdin).map(|ran| ran.stdout).map_err(|f| match f {
        RunFailure::NotFound => HostToolError::NotInstalled { tool },
        RunFailure::Spawn { command, source } => HostToolError::Spawn { command, source },
        RunFailure::Failed { command, status, stderr_tail } => {
            HostToolError::Failed { command, status, stderr: stderr_tail }
        }
    })
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths = fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<io::Result<Vec<_>>>()?;
    paths.sort();
    Ok(paths)
}

impl HostTools for SystemHost {
    fn apt_cache_depends(&self, package: &str) -> Result<String, HostToolError> {
        run(HostTool::AptCache, &["depends".into(), "--important".into(), package.into()], None, None)
    }

    fn apt_cache_policy(&self, package: &str) -> Result<String, HostToolError> {
        run(HostTool::AptCache, &["policy".into(), package.into()], None, None)
    }

    fn apt_download(&self, package: &str, version: &str, dir: &Path) -> Result<(), HostToolError> {
        let args = ["download".into(), "-q".into(), format!("{package}={version}").into()];
        run(HostTool::AptGet, &args, Some(dir), None).map(drop)
    }

    fn fetch_url(&self, url: &str, dest: &Path) -> Result<(), HostToolError> {
        let args = ["-fsSL".into(), "-o".into(), dest.as_os_str().to_owned(), url.into()];
        run(HostTool::Curl, &args, None, None).map(drop)
    }

    fn read_apt_sources(&self) -> Result<Vec<AptSourceFile>, HostToolError> {
        let read = |path: &Path| {
            fs::read_to_string(path)
                .map(|contents| AptSourceFile { path: path.to_owned(), contents })
                .map_err(|source| HostToolError::Read { path: path.to_owned(), source })
        };
        let mut files = Vec::new();
        let main = self.apt_etc.join("sources.list");
        if main.is_file() {
            files.push(read(&main)?);
        }
        let dir = self.apt_etc.join("sources.list.d");
        if dir.is_dir() {
            let paths = read_dir_sorted(&dir).map_err(|source| HostToolError::Read { path: dir.clone(), source })?;
            for path in paths {
                let wanted = path.extension().is_some_and(|ext| ext == "list" || ext == "sources");
                if wanted && path.is_file() {
                    files.push(read(&path)?);
                }
            }
        }
        Ok(files)
    }

    fn mmdebstrap(&self, request: &MmdebstrapRequest) -> Result<(), HostToolError> {
        run(HostTool::Mmdebstrap, &request.args(), None, Some(&request.sources)).map(drop)
    }

    fn mkfs_ext4(&self, request: &MkfsRequest) -> Result<(), HostToolError> {
        run(HostTool::MkfsExt4, &request.args(), None, None).map(drop)
    }
}

/// A recording fake of [`HostTools`] for tests (also usable by the daemon's tests).
///
/// Each call is recorded, then fails if its tool is [`FakeHost::fail_on`], and otherwise acts out
/// its effect: `apt_download` and `fetch_url` write [`FakeHost::deb`], `mmdebstrap` creates the
/// files in [`FakeHost::rootfs`], and `mkfs_ext4` writes a small file with a clean ext4 superblock.
#[derive(Debug, Default)]
pub struct FakeHost {
    /// Calls made so far, in order (see [`FakeHost::calls`]).
    pub calls: Mutex<Vec<HostCall>>,
    /// Returned by `apt_cache_depends`.
    pub depends_output: String,
    /// Returned by `apt_cache_policy`.
    pub policy_output: String,
    /// Bytes of the package that downloads produce.
    pub deb: Vec<u8>,
    /// Returned by `read_apt_sources`.
    pub apt_sources: Vec<AptSourceFile>,
    /// Files `mmdebstrap` creates: (relative path, mode, contents).
    pub rootfs: Vec<(String, u32, Vec<u8>)>,
    /// The tool whose calls fail.
    pub fail_on: Option<HostTool>,
}

impl FakeHost {
    /// A fake with nothing configured.
    pub fn new() -> Self {
        Self::default()
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<HostCall> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<HostCall>> {
        self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, call: HostCall) -> Result<(), HostToolError> {
        let tool = call.tool();
        self.lock().push(call);
        if self.fail_on == Some(tool) {
            return Err(HostToolError::Failed {
                command: tool.program().to_owned(),
                status: "exit status: 1".to_owned(),
                stderr: "fake failure".to_owned(),
            });
        }
        Ok(())
    }

    fn write(path: &Path, data: &[u8]) -> Result<(), HostToolError> {
        fs::write(path, data).map_err(|source| HostToolError::Read { path: path.to_owned(), source })
    }
}

/// Offset of the ext4 superblock in the image.
pub(crate) const SUPERBLOCK_OFFSET: usize = 1024;

impl HostTools for FakeHost {
    fn apt_cache_depends(&self, package: &str) -> Result<String, HostToolError> {
        self.record(HostCall::AptCacheDepends { package: package.to_owned() })?;
        Ok(self.depends_output.clone())
    }

    fn apt_cache_policy(&self, package: &str) -> Result<String, HostToolError> {
        self.record(HostCall::AptCachePolicy { package: package.to_owned() })?;
        Ok(self.policy_output.clone())
    }

    fn apt_download(&self, package: &str, version: &str, dir: &Path) -> Result<(), HostToolError> {
        self.record(HostCall::AptDownload {
            package: package.to_owned(),
            version: version.to_owned(),
            dir: dir.to_owned(),
        })?;
        Self::write(&dir.join(format!("{package}_{}_amd64.deb", version.replace(':', "%3a"))), &self.deb)
    }

    fn fetch_url(&self, url: &str, dest: &Path) -> Result<(), HostToolError> {
        self.record(HostCall::FetchUrl { url: url.to_owned(), dest: dest.to_owned() })?;
        Self::write(dest, &self.deb)
    }

    fn read_apt_sources(&self) -> Result<Vec<AptSourceFile>, HostToolError> {
        self.record(HostCall::ReadAptSources)?;
        Ok(self.apt_sources.clone())
    }

    fn mmdebstrap(&self, request: &MmdebstrapRequest) -> Result<(), HostToolError> {
        self.record(HostCall::Mmdebstrap(request.clone()))?;
        let create = |path: &Path| {
            fs::create_dir_all(path).map_err(|source| HostToolError::Read { path: path.to_owned(), source })
        };
        create(&request.target)?;
        for (relative, mode, contents) in &self.rootfs {
            let path = request.target.join(relative);
            if let Some(parent) = path.parent() {
                create(parent)?;
            }
            Self::write(&path, contents)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                .map_err(|source| HostToolError::Read { path: path.clone(), source })?;
        }
        Ok(())
    }

    fn mkfs_ext4(&self, request: &MkfsRequest) -> Result<(), HostToolError> {
        self.record(HostCall::MkfsExt4(request.clone()))?;
        let mut image = vec![0u8; 4096];
        image[SUPERBLOCK_OFFSET + 0x38..SUPERBLOCK_OFFSET + 0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        image[SUPERBLOCK_OFFSET + 0x3a..SUPERBLOCK_OFFSET + 0x3c].copy_from_slice(&1u16.to_le_bytes());
        Self::write(&request.image, &image)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;

    #[test]
    fn mmdebstrap_arguments() {
        let request = MmdebstrapRequest {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            packages: vec!["kmod".into(), "iproute2".into()],
            target: "/x/rootfs".into(),
            sources: String::new(),
        };
        assert_eq!(
            request.args(),
            [
                "--mode=root",
                "--format=directory",
                "--variant=minbase",
                "--include=kmod,iproute2",
                "bookworm",
                "/x/rootfs",
                "-"
            ]
            .map(OsString::from)
        );
    }

    #[test]
    fn mkfs_arguments() {
        let request = MkfsRequest {
            dir: "/d".into(),
            image: "/i.ext4".into(),
            label: "banger-root".into(),
            size_mib: 300,
            inodes: 9000,
        };
        assert_eq!(
            request.args(),
            ["-F", "-q", "-T", "default", "-L", "banger-root", "-N", "9000", "-d", "/d", "/i.ext4", "300M"]
                .map(OsString::from)
        );
    }

    #[test]
    fn missing_programs_name_the_fix() {
        let message = HostToolError::NotInstalled { tool: HostTool::Mmdebstrap }.to_string();
        assert_eq!(message, "`mmdebstrap` is not installed; run `apt-get install mmdebstrap`");
    }

    #[test]
    fn reads_host_sources_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("sources.list"), "deb http://a/ x main\n").unwrap();
        fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        for name in ["b.sources", "a.list", "c.list.disabled", "d.save"] {
            fs::write(dir.path().join("sources.list.d").join(name), name).unwrap();
        }
        let files = SystemHost::with_apt_etc(dir.path()).read_apt_sources().unwrap();
        let names: Vec<_> = files.iter().map(|f| f.path.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["sources.list", "a.list", "b.sources"]);
    }

    #[test]
    fn failed_commands_keep_the_end_of_stderr() {
        let err = run(HostTool::AptCache, &["--no-such-option-for-banger".into()], None, None).unwrap_err();
        match err {
            HostToolError::Failed { command, stderr, .. } => {
                assert_eq!(command, "apt-cache --no-such-option-for-banger");
                assert!(!stderr.is_empty());
            }
            HostToolError::NotInstalled { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
