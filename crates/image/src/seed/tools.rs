//! The e2fsprogs programs work seeds need (`mkfs.ext4 -d`, `resize2fs`, `debugfs`, and
//! `e2fsck -fn` to check a guest-written disk before anything else parses it), behind
//! [`SeedTools`].
//!
//! [`SystemSeedTools`] runs them; [`FakeSeedTools`] records each call as a [`SeedCall`] and acts
//! out just enough of its effect (an ext4 superblock of the right size, the staged tree, the files
//! `debugfs` writes and dumps) for the orchestration to be tested without the programs.
//!
//! `debugfs` reads its commands from standard input and parses each line into words, so every
//! path that reaches it is a [`GuestPath`] (an allowlist of characters, so nothing can end a word
//! or a line) or a fixed local file name; host paths never appear in a script: `debugfs` runs
//! in a scratch directory and reads and writes local files there by their fixed names.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// An e2fsprogs program the seed code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeedTool {
    /// `mkfs.ext4`.
    MkfsExt4,
    /// `resize2fs`.
    Resize2fs,
    /// `debugfs`.
    Debugfs,
    /// `e2fsck`.
    E2fsck,
}

impl SeedTool {
    /// The program name.
    pub fn program(self) -> &'static str {
        match self {
            Self::MkfsExt4 => "mkfs.ext4",
            Self::Resize2fs => "resize2fs",
            Self::Debugfs => "debugfs",
            Self::E2fsck => "e2fsck",
        }
    }
}

impl fmt::Display for SeedTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program())
    }
}

/// What went wrong running one of the [`SeedTools`].
#[derive(Debug, thiserror::Error)]
pub enum SeedToolError {
    /// The program is not installed.
    #[error("`{tool}` is not installed; run `apt-get install e2fsprogs`")]
    NotInstalled {
        /// The program.
        tool: SeedTool,
    },
    /// The program could not be started or talked to.
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
    /// A local file the fake acts on could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A path inside an ext4 image that is safe to put in a `debugfs` script: absolute, made of
/// non-empty components other than `.` and `..`, each of ASCII letters, digits and `._-+@,=:%~`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPath(String);

/// Why a string is not a [`GuestPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path '{}' cannot be written into a disk image: {reason}", path.escape_debug())]
pub struct InvalidGuestPath {
    /// The rejected path.
    pub path: String,
    /// Why.
    pub reason: &'static str,
}

/// Characters allowed in a [`GuestPath`] component besides ASCII letters and digits.
const PATH_PUNCTUATION: &str = "._-+@,=:%~";

impl GuestPath {
    /// Validates `path`.
    pub fn new(path: &str) -> Result<Self, InvalidGuestPath> {
        let invalid = |reason| Err(InvalidGuestPath { path: path.to_owned(), reason });
        let Some(rest) = path.strip_prefix('/') else {
            return invalid("it must be absolute");
        };
        if rest.is_empty() {
            return Ok(Self::root());
        }
        for component in rest.split('/') {
            if component.is_empty() || component == "." || component == ".." {
                return invalid("it must not contain empty, '.' or '..' components");
            }
            if !component.chars().all(|c| c.is_ascii_alphanumeric() || PATH_PUNCTUATION.contains(c)) {
                return invalid(
                    "use only ASCII letters, digits and ._-+@,=:%~ (no spaces, quotes or control characters)",
                );
            }
        }
        Ok(Self(path.to_owned()))
    }

    /// `/`.
    pub fn root() -> Self {
        Self("/".to_owned())
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `self/name`, validated.
    pub fn join(&self, name: &str) -> Result<Self, InvalidGuestPath> {
        Self::new(&format!("{}/{name}", self.0.trim_end_matches('/')))
    }

    /// The directories above this path, outermost first, without `/`.
    pub fn ancestors(&self) -> Vec<GuestPath> {
        let mut ancestors = Vec::new();
        let mut end = 0;
        while let Some(next) = self.0[end + 1..].find('/') {
            end += 1 + next;
            ancestors.push(Self(self.0[..end].to_owned()));
        }
        ancestors
    }
}

impl fmt::Display for GuestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An inode field `debugfs set_inode_field` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InodeField {
    /// The whole `i_mode`, file type bits included.
    Mode,
    /// Owner.
    Uid,
    /// Group.
    Gid,
}

impl InodeField {
    fn name(self) -> &'static str {
        match self {
            Self::Mode => "mode",
            Self::Uid => "uid",
            Self::Gid => "gid",
        }
    }
}

/// A local file in a [`DebugfsRequest`]'s scratch directory, named `fN` in scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalFile(pub u32);

impl LocalFile {
    /// Its name in the scratch directory.
    pub fn name(self) -> String {
        format!("f{}", self.0)
    }
}

impl fmt::Display for LocalFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "f{}", self.0)
    }
}

/// One `debugfs` command. Local files are [`LocalFile`]s in the request's scratch directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebugfsCommand {
    /// `mkdir PATH` (fails harmlessly if it exists).
    Mkdir(GuestPath),
    /// `rm PATH` (fails harmlessly if it does not exist).
    Rm(GuestPath),
    /// `write LOCAL PATH`: a new file from the local file `local`.
    Write {
        /// The local file.
        local: LocalFile,
        /// Where it goes in the image.
        guest: GuestPath,
    },
    /// `set_inode_field PATH FIELD VALUE` (`VALUE` in octal for the mode).
    SetInodeField {
        /// The inode.
        path: GuestPath,
        /// The field.
        field: InodeField,
        /// The new value.
        value: u32,
    },
    /// `stat PATH`.
    Stat(GuestPath),
    /// `dump PATH LOCAL`: a file's contents into the local file `local`.
    Dump {
        /// The file in the image.
        guest: GuestPath,
        /// The local file.
        local: LocalFile,
    },
    /// `rdump PATH .`: a directory tree into the scratch directory.
    Rdump(GuestPath),
}

impl DebugfsCommand {
    /// The script line.
    pub fn line(&self) -> String {
        match self {
            Self::Mkdir(path) => format!("mkdir {path}"),
            Self::Rm(path) => format!("rm {path}"),
            Self::Write { local, guest } => format!("write {local} {guest}"),
            Self::SetInodeField { path, field: InodeField::Mode, value } => format!("sif {path} mode 0{value:o}"),
            Self::SetInodeField { path, field, value } => format!("sif {path} {} {value}", field.name()),
            Self::Stat(path) => format!("stat {path}"),
            Self::Dump { guest, local } => format!("dump {guest} {local}"),
            Self::Rdump(path) => format!("rdump {path} ."),
        }
    }
}

/// A `debugfs` run over an unmounted image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugfsRequest {
    /// The ext4 image (absolute).
    pub image: PathBuf,
    /// Open read-write (`-w`).
    pub writable: bool,
    /// Scratch directory `debugfs` runs in; local file names are relative to it.
    pub scratch: PathBuf,
    /// The script.
    pub commands: Vec<DebugfsCommand>,
}

impl DebugfsRequest {
    /// The arguments after `debugfs`; the script goes on standard input.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if self.writable {
            args.push("-w".into());
        }
        args.extend(["-f".into(), "-".into(), self.image.clone().into_os_string()]);
        args
    }

    /// The script, one command a line.
    pub fn script(&self) -> String {
        self.commands.iter().map(|c| c.line() + "\n").collect()
    }
}

/// What `debugfs` printed. It exits 0 even when commands fail, so callers check the effect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DebugfsOutput {
    /// Command echoes and results.
    pub stdout: String,
    /// Errors, one line each.
    pub stderr: String,
}

/// A `mkfs.ext4 -d` run that makes a work seed from a directory, without mounting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedMkfsRequest {
    /// Directory whose contents fill the file system.
    pub dir: PathBuf,
    /// Image file to write.
    pub image: PathBuf,
    /// File system label.
    pub label: String,
    /// Size in MiB.
    pub size_mib: u64,
}

impl SeedMkfsRequest {
    /// The arguments after `mkfs.ext4`. `-T default` keeps 4 KiB blocks for small seeds; lazy
    /// inode table and journal init leave those regions unwritten, so a seed of any size holds
    /// only a few MiB of data and stays cheap to copy.
    pub fn args(&self) -> Vec<OsString> {
        vec![
            "-q".into(),
            "-F".into(),
            "-T".into(),
            "default".into(),
            "-L".into(),
            self.label.clone().into(),
            "-E".into(),
            "lazy_itable_init=1,lazy_journal_init=1".into(),
            "-d".into(),
            self.dir.clone().into_os_string(),
            self.image.clone().into_os_string(),
            format!("{}M", self.size_mib).into(),
        ]
    }
}

/// A `resize2fs` run over an unmounted image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeRequest {
    /// The ext4 image.
    pub image: PathBuf,
    /// New file system size in MiB.
    pub size_mib: u64,
    /// `-f`: skip `resize2fs`'s own "run `e2fsck -f` first" demand. Only right just after a
    /// clean [`SeedTools::e2fsck_ro`] of the same, unused image: a read-only check does not
    /// record itself in the superblock, so `resize2fs` would still ask for one.
    pub checked: bool,
}

impl ResizeRequest {
    /// The arguments after `resize2fs`. Without `checked`, no `-f`: the seed and its fresh
    /// clones were never mounted, so `resize2fs` does not ask for `e2fsck -f`; if it does, the
    /// image is not what it should be and the error says so.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if self.checked {
            args.push("-f".into());
        }
        args.extend([self.image.clone().into_os_string(), format!("{}M", self.size_mib).into()]);
        args
    }
}

/// What a read-only `e2fsck -fn` said about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsckReport {
    /// No errors found (exit status 0).
    pub clean: bool,
    /// The start of what it printed (at most [`FSCK_OUTPUT_HEAD`] bytes), where the first
    /// problems are.
    pub output_head: String,
}

impl FsckReport {
    /// The first problem `e2fsck` reported (its question and `no` answer dropped), cut to
    /// 200 bytes; "errors found" when its output names none.
    pub fn first_problem(&self) -> String {
        let line = self
            .output_head
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("e2fsck ") && !l.starts_with("Pass ") && !l.ends_with("? no"))
            .or_else(|| self.output_head.lines().map(str::trim).find(|l| l.ends_with("? no")))
            .unwrap_or("errors found");
        let line = line.split("  ").next().unwrap_or(line).trim_end_matches(['.', ' ']);
        let mut end = line.len().min(200);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line[..end].to_owned()
    }
}

/// Bytes of `e2fsck`'s output kept: a hostile file system can make it print without end.
pub const FSCK_OUTPUT_HEAD: usize = 2048;

/// The host programs that build, grow and edit work seeds.
pub trait SeedTools: Send + Sync {
    /// Makes an ext4 image from a directory.
    fn mkfs_ext4_from_dir(&self, request: &SeedMkfsRequest) -> Result<(), SeedToolError>;
    /// Grows or shrinks an unmounted ext4 file system (not the file holding it).
    fn resize2fs(&self, request: &ResizeRequest) -> Result<(), SeedToolError>;
    /// Runs a `debugfs` script.
    fn debugfs(&self, request: &DebugfsRequest) -> Result<DebugfsOutput, SeedToolError>;
    /// Checks an unmounted ext4 image read-only and in full (`e2fsck -fn`): nothing is written.
    fn e2fsck_ro(&self, image: &Path) -> Result<FsckReport, SeedToolError>;
}

/// Runs `e2fsck -fn image`, keeping only the first [`FSCK_OUTPUT_HEAD`] bytes of its output
/// (stdout and stderr together; the rest is read and dropped, never buffered).
fn run_e2fsck(image: &Path) -> Result<FsckReport, SeedToolError> {
    use std::io::Read as _;
    use std::process::{Command, Stdio};
    let command = format!("e2fsck -fn {}", image.display());
    let (reader, writer) = io::pipe().map_err(|source| SeedToolError::Spawn { command: command.clone(), source })?;
    let stderr = writer.try_clone().map_err(|source| SeedToolError::Spawn { command: command.clone(), source })?;
    let mut child = Command::new(SeedTool::E2fsck.program())
        .arg("-fn")
        .arg(image)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr)
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => SeedToolError::NotInstalled { tool: SeedTool::E2fsck },
            _ => SeedToolError::Spawn { command: command.clone(), source },
        })?;
    let mut head: Vec<u8> = Vec::with_capacity(FSCK_OUTPUT_HEAD);
    let mut chunk = [0u8; 8192];
    let mut reader = reader;
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                let room = FSCK_OUTPUT_HEAD - head.len();
                head.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SeedToolError::Spawn { command, source });
            }
        }
    }
    let status = child.wait().map_err(|source| SeedToolError::Spawn { command: command.clone(), source })?;
    let output_head = String::from_utf8_lossy(&head).trim().to_owned();
    match status.code() {
        Some(0) => Ok(FsckReport { clean: true, output_head }),
        // 4: errors left uncorrected (with -n, every error found).
        Some(4) => Ok(FsckReport { clean: false, output_head }),
        _ => Err(SeedToolError::Failed { command, status: status.to_string(), stderr: output_head }),
    }
}

/// The real programs, from `PATH`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemSeedTools;

fn run(
    tool: SeedTool,
    args: &[OsString],
    cwd: Option<&Path>,
    stdin: Option<&str>,
) -> Result<crate::command::Ran, SeedToolError> {
    use crate::command::RunFailure;
    crate::command::run(tool.program(), args, &[("DEBUGFS_PAGER", "__none__")], cwd, stdin).map_err(|f| match f {
        RunFailure::NotFound => SeedToolError::NotInstalled { tool },
        RunFailure::Spawn { command, source } => SeedToolError::Spawn { command, source },
        RunFailure::Failed { command, status, stderr_tail } => {
            SeedToolError::Failed { command, status, stderr: stderr_tail }
        }
    })
}

impl SeedTools for SystemSeedTools {
    fn mkfs_ext4_from_dir(&self, request: &SeedMkfsRequest) -> Result<(), SeedToolError> {
        run(SeedTool::MkfsExt4, &request.args(), None, None).map(drop)
    }

    fn resize2fs(&self, request: &ResizeRequest) -> Result<(), SeedToolError> {
        run(SeedTool::Resize2fs, &request.args(), None, None).map(drop)
    }

    fn e2fsck_ro(&self, image: &Path) -> Result<FsckReport, SeedToolError> {
        run_e2fsck(image)
    }

    fn debugfs(&self, request: &DebugfsRequest) -> Result<DebugfsOutput, SeedToolError> {
        let ran = run(SeedTool::Debugfs, &request.args(), Some(&request.scratch), Some(&request.script()))?;
        // The banner is not an error.
        let stderr = ran.stderr.lines().filter(|l| !l.starts_with("debugfs ")).map(|l| format!("{l}\n")).collect();
        Ok(DebugfsOutput { stdout: ran.stdout, stderr })
    }
}

/// What a [`FakeSeedTools`] `mkfs` saw in the staged directory, relative to it (`/` for itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedEntry {
    /// Path below the staged directory, starting with `/`.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// What it is.
    pub kind: StagedKind,
}

/// The kind and content of a [`StagedEntry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StagedKind {
    /// A directory.
    Dir,
    /// A regular file and its bytes.
    File(Vec<u8>),
    /// A symbolic link and its target.
    Symlink(PathBuf),
}

/// One call made through [`SeedTools`], as recorded by [`FakeSeedTools`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedCall {
    /// `mkfs.ext4 -d`, with the tree it was given.
    MkfsExt4 {
        /// The request.
        request: SeedMkfsRequest,
        /// The staged directory, sorted by path.
        tree: Vec<StagedEntry>,
    },
    /// `resize2fs`.
    Resize2fs(ResizeRequest),
    /// `debugfs`.
    Debugfs(DebugfsRequest),
    /// `e2fsck -fn` of an image.
    E2fsck(PathBuf),
}

impl SeedCall {
    /// The program the call runs.
    pub fn tool(&self) -> SeedTool {
        match self {
            Self::MkfsExt4 { .. } => SeedTool::MkfsExt4,
            Self::Resize2fs(_) => SeedTool::Resize2fs,
            Self::Debugfs(_) => SeedTool::Debugfs,
            Self::E2fsck(_) => SeedTool::E2fsck,
        }
    }
}

/// A file the fake `debugfs` keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeInode {
    /// `i_mode`, file type bits included.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Contents.
    pub contents: Vec<u8>,
}

impl FakeInode {
    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170_000 == 0o040_000
    }
}

/// A recording fake of [`SeedTools`] for tests.
///
/// Each call is recorded, then fails if its program is [`FakeSeedTools::fail_on`], and otherwise
/// acts out its effect: `mkfs` writes a sparse file of the requested size with a clean ext4
/// superblock, records the staged tree and adds it to [`FakeSeedTools::files`] (owned by
/// [`FAKE_BUILDER_ID`]), `resize2fs` rewrites the superblock's block count, and
/// `debugfs` keeps files and directories in [`FakeSeedTools::files`] (shared by all images), `rdump`s
/// [`FakeSeedTools::skel`] for `/etc/skel`, and answers `stat` like the real one.
#[derive(Debug, Default)]
pub struct FakeSeedTools {
    /// Calls made so far, in order (see [`FakeSeedTools::calls`]).
    pub calls: Mutex<Vec<SeedCall>>,
    /// What `rdump /etc/skel` produces: (relative path, mode, contents); `None`: no `/etc/skel`.
    pub skel: Option<Vec<(String, u32, Vec<u8>)>>,
    /// Files and directories made with `debugfs`, by guest path.
    pub files: Mutex<BTreeMap<String, FakeInode>>,
    /// The program whose calls fail.
    pub fail_on: Option<SeedTool>,
    /// Makes `debugfs` ignore `set_inode_field` (a broken tool the callers must catch).
    pub ignore_set_inode_field: bool,
    /// What `e2fsck -fn` reports as the errors of every image; `None`: images are clean.
    pub fsck_errors: Option<String>,
}

/// Owner and group of what the fake `mkfs` puts in an image, as if built without root.
pub const FAKE_BUILDER_ID: u32 = 1000;

/// Block size of the fake's file systems.
const FAKE_BLOCK: u64 = 4096;

impl FakeSeedTools {
    /// A fake with nothing configured.
    pub fn new() -> Self {
        Self::default()
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<SeedCall> {
        lock(&self.calls).clone()
    }

    fn record(&self, call: SeedCall) -> Result<(), SeedToolError> {
        let tool = call.tool();
        lock(&self.calls).push(call);
        if self.fail_on == Some(tool) {
            return Err(SeedToolError::Failed {
                command: tool.program().to_owned(),
                status: "exit status: 1".to_owned(),
                stderr: "fake failure".to_owned(),
            });
        }
        Ok(())
    }

    fn debugfs_command(&self, scratch: &Path, command: &DebugfsCommand, out: &mut DebugfsOutput) -> io::Result<()> {
        let mut files = lock(&self.files);
        match command {
            DebugfsCommand::Mkdir(path) => {
                if files.contains_key(path.as_str()) {
                    out.stderr.push_str("mkdir: Ext2 directory already exists\n");
                } else {
                    let dir = FakeInode { mode: 0o040_755, uid: 0, gid: 0, contents: Vec::new() };
                    files.insert(path.as_str().to_owned(), dir);
                }
            }
            DebugfsCommand::Rm(path) => match files.get(path.as_str()) {
                None => out.stderr.push_str("rm: File not found by ext2_lookup while trying to resolve filename\n"),
                Some(inode) if inode.is_dir() => out.stderr.push_str("rm: file is a directory\n"),
                Some(_) => drop(files.remove(path.as_str())),
            },
            DebugfsCommand::Write { local, guest } => {
                if files.contains_key(guest.as_str()) {
                    out.stderr.push_str("write: Ext2 file already exists\n");
                    return Ok(());
                }
                let path = scratch.join(local.name());
                let meta = fs::metadata(&path)?;
                // Like the real one: owner and mode come from the local file.
                let inode =
                    FakeInode { mode: meta.mode(), uid: meta.uid(), gid: meta.gid(), contents: fs::read(&path)? };
                files.insert(guest.as_str().to_owned(), inode);
            }
            DebugfsCommand::SetInodeField { path, field, value } => match files.get_mut(path.as_str()) {
                _ if self.ignore_set_inode_field => {}
                Some(inode) => match field {
                    InodeField::Mode => inode.mode = *value,
                    InodeField::Uid => inode.uid = *value,
                    InodeField::Gid => inode.gid = *value,
                },
                None => out.stderr.push_str(&format!("{path}: File not found by ext2_lookup\n")),
            },
            DebugfsCommand::Stat(path) => match files.get(path.as_str()) {
                Some(inode) => out.stdout.push_str(&format!(
                    "Inode: 12   Type: {}    Mode:  {:04o}   Flags: 0x80000\n\
                     User: {:5}   Group: {:5}   Project:     0   Size: {}\n",
                    match inode.mode & 0o170_000 {
                        0o040_000 => "directory",
                        0o120_000 => "symlink",
                        _ => "regular",
                    },
                    inode.mode & 0o7777,
                    inode.uid,
                    inode.gid,
                    inode.contents.len()
                )),
                None => out.stderr.push_str(&format!("{path}: File not found by ext2_lookup\n")),
            },
            DebugfsCommand::Dump { guest, local } => match files.get(guest.as_str()) {
                Some(inode) => fs::write(scratch.join(local.name()), &inode.contents)?,
                None => out.stderr.push_str(&format!("{guest}: File not found by ext2_lookup\n")),
            },
            DebugfsCommand::Rdump(path) => match (&self.skel, path.as_str()) {
                (Some(skel), "/etc/skel") => {
                    let root = scratch.join("skel");
                    fs::create_dir(&root)?;
                    for (relative, mode, contents) in skel {
                        let file = root.join(relative);
                        if let Some(parent) = file.parent() {
                            fs::create_dir_all(parent)?;
                        }
                        fs::write(&file, contents)?;
                        fs::set_permissions(&file, fs::Permissions::from_mode(*mode))?;
                    }
                }
                _ => out.stderr.push_str(&format!("{path}: File not found by ext2_lookup\n")),
            },
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The staged tree under `root`, sorted by path.
fn snapshot(root: &Path) -> io::Result<Vec<StagedEntry>> {
    let mut entries = Vec::new();
    let mut stack = vec![(root.to_owned(), "/".to_owned())];
    while let Some((path, name)) = stack.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let mode = meta.mode() & 0o7777;
        let kind = if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                let entry = entry?;
                let child = entry.file_name().to_string_lossy().into_owned();
                stack.push((entry.path(), format!("{}/{child}", name.trim_end_matches('/'))));
            }
            StagedKind::Dir
        } else if meta.file_type().is_symlink() {
            StagedKind::Symlink(fs::read_link(&path)?)
        } else {
            StagedKind::File(fs::read(&path)?)
        };
        entries.push(StagedEntry { path: name, mode, kind });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Writes a clean ext4 superblock for `blocks` 4 KiB blocks into `image`, keeping the rest.
pub(crate) fn write_fake_superblock(image: &Path, blocks: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const INCOMPAT_64BIT: u32 = 0x80;
    let mut superblock = [0u8; 1024];
    let (lo, hi) = (blocks & 0xffff_ffff, blocks >> 32);
    superblock[0x04..0x08].copy_from_slice(&u32::try_from(lo).unwrap_or(u32::MAX).to_le_bytes());
    superblock[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 1024 << 2 = 4 KiB
    superblock[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
    superblock[0x3a..0x3c].copy_from_slice(&1u16.to_le_bytes());
    superblock[0x60..0x64].copy_from_slice(&INCOMPAT_64BIT.to_le_bytes());
    superblock[0x150..0x154].copy_from_slice(&u32::try_from(hi).unwrap_or(u32::MAX).to_le_bytes());
    let file = fs::OpenOptions::new().write(true).create(true).truncate(false).open(image)?;
    file.write_all_at(&superblock, 1024)
}

impl SeedTools for FakeSeedTools {
    fn mkfs_ext4_from_dir(&self, request: &SeedMkfsRequest) -> Result<(), SeedToolError> {
        let tree = snapshot(&request.dir).map_err(|source| SeedToolError::Io { path: request.dir.clone(), source })?;
        self.record(SeedCall::MkfsExt4 { request: request.clone(), tree: tree.clone() })?;
        let mut files = lock(&self.files);
        for entry in tree {
            let (kind, contents) = match entry.kind {
                StagedKind::Dir => (0o040_000, Vec::new()),
                StagedKind::File(contents) => (0o100_000, contents),
                StagedKind::Symlink(target) => (0o120_000, target.into_os_string().into_encoded_bytes()),
            };
            // As after an unprivileged build: owned by the builder, not root.
            let inode = FakeInode { mode: kind | entry.mode, uid: FAKE_BUILDER_ID, gid: FAKE_BUILDER_ID, contents };
            files.insert(entry.path, inode);
        }
        drop(files);
        let io_error = |source| SeedToolError::Io { path: request.image.clone(), source };
        let blocks = request.size_mib * (1 << 20) / FAKE_BLOCK;
        write_fake_superblock(&request.image, blocks).map_err(io_error)?;
        fs::OpenOptions::new()
            .write(true)
            .open(&request.image)
            .and_then(|f| f.set_len(blocks * FAKE_BLOCK))
            .map_err(io_error)
    }

    fn resize2fs(&self, request: &ResizeRequest) -> Result<(), SeedToolError> {
        self.record(SeedCall::Resize2fs(request.clone()))?;
        write_fake_superblock(&request.image, request.size_mib * (1 << 20) / FAKE_BLOCK)
            .map_err(|source| SeedToolError::Io { path: request.image.clone(), source })
    }

    fn e2fsck_ro(&self, image: &Path) -> Result<FsckReport, SeedToolError> {
        self.record(SeedCall::E2fsck(image.to_owned()))?;
        Ok(match &self.fsck_errors {
            Some(errors) => FsckReport { clean: false, output_head: errors.clone() },
            None => FsckReport { clean: true, output_head: String::new() },
        })
    }

    fn debugfs(&self, request: &DebugfsRequest) -> Result<DebugfsOutput, SeedToolError> {
        self.record(SeedCall::Debugfs(request.clone()))?;
        let mut out = DebugfsOutput::default();
        for command in &request.commands {
            out.stdout.push_str(&format!("debugfs: {}\n", command.line()));
            self.debugfs_command(&request.scratch, command, &mut out)
                .map_err(|source| SeedToolError::Io { path: request.scratch.clone(), source })?;
        }
        Ok(out)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_reject_what_could_inject_commands() {
        for bad in [
            "",
            "relative",
            "/a b",
            "/a\nrm /x",
            "/a\"b",
            "/a'b",
            "/a\\b",
            "/a\tb",
            "/../x",
            "/a/./b",
            "//a",
            "/a/",
            "/é",
            "/a;b",
            "/a#b",
            "/$x",
        ] {
            assert!(GuestPath::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["/", "/.ssh/authorized_keys", "/.gitconfig", "/a-b_c.d/e+f@g,h=i:j%k~l"] {
            assert_eq!(GuestPath::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn invalid_paths_say_why() {
        let err = GuestPath::new("/a b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "path '/a b' cannot be written into a disk image: use only ASCII letters, digits and ._-+@,=:%~ \
             (no spaces, quotes or control characters)"
        );
        assert!(GuestPath::new("/a\nb").unwrap_err().to_string().contains("'/a\\nb'"));
    }

    #[test]
    fn ancestors_and_join() {
        let path = GuestPath::new("/a/b/c").unwrap();
        let ancestors: Vec<_> = path.ancestors().iter().map(|p| p.as_str().to_owned()).collect();
        assert_eq!(ancestors, ["/a", "/a/b"]);
        assert!(GuestPath::new("/x").unwrap().ancestors().is_empty());
        assert_eq!(GuestPath::root().join(".ssh").unwrap().as_str(), "/.ssh");
        assert_eq!(path.join("d").unwrap().as_str(), "/a/b/c/d");
        assert!(path.join("d e").is_err());
    }

    #[test]
    fn debugfs_script_lines() {
        let p = GuestPath::new("/.ssh/authorized_keys").unwrap();
        let request = DebugfsRequest {
            image: "/i.ext4".into(),
            writable: true,
            scratch: "/s".into(),
            commands: vec![
                DebugfsCommand::Rm(p.clone()),
                DebugfsCommand::Mkdir(GuestPath::new("/.ssh").unwrap()),
                DebugfsCommand::Write { local: LocalFile(0), guest: p.clone() },
                DebugfsCommand::SetInodeField { path: p.clone(), field: InodeField::Mode, value: 0o100600 },
                DebugfsCommand::SetInodeField { path: p.clone(), field: InodeField::Uid, value: 0 },
                DebugfsCommand::Stat(p.clone()),
                DebugfsCommand::Dump { guest: p, local: LocalFile(1) },
                DebugfsCommand::Rdump(GuestPath::new("/etc/skel").unwrap()),
            ],
        };
        assert_eq!(request.args(), ["-w", "-f", "-", "/i.ext4"].map(OsString::from));
        assert_eq!(
            request.script(),
            "rm /.ssh/authorized_keys\nmkdir /.ssh\nwrite f0 /.ssh/authorized_keys\n\
             sif /.ssh/authorized_keys mode 0100600\nsif /.ssh/authorized_keys uid 0\n\
             stat /.ssh/authorized_keys\ndump /.ssh/authorized_keys f1\nrdump /etc/skel .\n"
        );
    }

    #[test]
    fn mkfs_and_resize_arguments() {
        let mkfs =
            SeedMkfsRequest { dir: "/d".into(), image: "/o.ext4".into(), label: "banger-work".into(), size_mib: 64 };
        assert_eq!(
            mkfs.args(),
            [
                "-q",
                "-F",
                "-T",
                "default",
                "-L",
                "banger-work",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                "-d",
                "/d",
                "/o.ext4",
                "64M"
            ]
            .map(OsString::from)
        );
        let resize = ResizeRequest { image: "/o.ext4".into(), size_mib: 2048, checked: false };
        assert_eq!(resize.args(), ["/o.ext4", "2048M"].map(OsString::from));
        let checked = ResizeRequest { checked: true, ..resize };
        assert_eq!(checked.args(), ["-f", "/o.ext4", "2048M"].map(OsString::from));
    }

    #[test]
    fn the_first_fsck_problem_is_quoted() {
        let output = "e2fsck 1.47.0 (5-Feb-2023)\nPass 1: Checking inodes, blocks, and sizes\nPass 2: Checking \
                      directory structure\nEntry 'bent' in /upper/etc (13) has deleted/unused inode 14.  Clear? no\n\n\
                      Inode 13 ref count is 3, should be 2.  Fix? no\n";
        let report = FsckReport { clean: false, output_head: output.into() };
        assert_eq!(report.first_problem(), "Entry 'bent' in /upper/etc (13) has deleted/unused inode 14");
        let bare = FsckReport { clean: false, output_head: "e2fsck 1.47.0\n".into() };
        assert_eq!(bare.first_problem(), "errors found");
        let long = FsckReport { clean: false, output_head: "é".repeat(300) };
        assert_eq!(long.first_problem().len(), 200);
    }

    #[test]
    fn missing_programs_name_the_fix() {
        let message = SeedToolError::NotInstalled { tool: SeedTool::Resize2fs }.to_string();
        assert_eq!(message, "`resize2fs` is not installed; run `apt-get install e2fsprogs`");
    }
}
