//! SSH access to VMs. One ed25519 key pair per installation (`<state>/ssh/id_ed25519`, the
//! client key), one ed25519 host key per VM made host-side (`<vm dir>/ssh_host_ed25519_key`) so
//! that banger can pin it, and `<state>/ssh/known_hosts` with one `NAME.vm KEY` line per VM,
//! rewritten whenever a VM is created or deleted.
//!
//! At every start, before the VMM boots, the `guest-files` stage writes into the work disk (the
//! guest's /root): `.ssh/authorized_keys` (the installation key, kept beside any keys the guest
//! added), `.banger/ssh_host_ed25519_key{,.pub}` (which the agent installs as sshd's host key),
//! the caller's git identity merged into `.gitconfig`, and the config's `sync_files`. The banger
//! files must land or the start fails; the user's files are best effort, each problem a warning
//! on the operation.
//!
//! The work disk is guest-written: the guest's `authorized_keys` and `.gitconfig` are read only
//! when their inodes say they are at most [`MAX_GUEST_FILE_BYTES`] (checked before any byte is
//! copied out). A larger `authorized_keys` is replaced by the installation key alone, a larger
//! `.gitconfig` is left as it is without the identity; each with a warning.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use banger_core::config::SyncFile;
use banger_core::VmRecord;
use banger_image::seed::{self, GuestFile, GuestPath, GuestRead, SeedTools, SystemSeedTools};
use banger_proto::{GitIdentity, SshConfig, SshHost, SshInfo};
use nix::unistd::Gid;
use ssh_key::{Algorithm, LineEnding, PrivateKey};

use std::sync::Arc;

use banger_core::error_chain as chain;
use banger_store::StoreError;

use crate::locks::NamedLocks;
use crate::services::{Fleet, FleetError};

/// Comment of the installation key; `authorized_keys` lines with it are banger's to replace.
pub const INSTALLATION_KEY_COMMENT: &str = "banger-installation-key";
/// The user banger logs in as.
pub const SSH_USER: &str = "root";
/// The guest's sshd port.
pub const SSH_PORT: u16 = 22;
/// File name of a VM's host key in its directory (and under /.banger on its work disk).
const HOST_KEY: &str = "ssh_host_ed25519_key";
/// Host files larger than this are not synced.
const MAX_SYNC_BYTES: u64 = 16 << 20;
/// Where the installation key goes in the work disk.
const AUTHORIZED_KEYS: &str = "/.ssh/authorized_keys";
/// Where the git identity goes in the work disk.
const GITCONFIG: &str = "/.gitconfig";
/// Longest accepted git `user.name` or `user.email`.
const MAX_GIT_FIELD: usize = 256;
/// Largest guest `authorized_keys` or `.gitconfig` read from the work disk (thousands of keys).
pub const MAX_GUEST_FILE_BYTES: u64 = 256 << 10;

/// What went wrong with keys or the files beside them.
#[derive(Debug, thiserror::Error)]
pub enum SshKeyError {
    /// A file or directory could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Making, reading or encoding a key failed.
    #[error("key {} is unusable; remove it (and its .pub) to have a new one made", path.display())]
    Key {
        /// The private key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ssh_key::Error,
    },
    /// The key could not be given to `socket_group`.
    #[error("cannot give {} to the socket_group", path.display())]
    Group {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
}

/// A git identity `.gitconfig` cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitIdentityError {
    /// A control character.
    #[error("invalid git identity: {what} holds a control character")]
    Control {
        /// `user.name` or `user.email`.
        what: String,
    },
    /// Too long.
    #[error("invalid git identity: {what} is longer than {MAX_GIT_FIELD} bytes")]
    TooLong {
        /// `user.name` or `user.email`.
        what: String,
    },
}

/// Why an ssh key, `known_hosts`, the guest files or ssh access failed.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The store failed, or has no such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM is not running.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// `socket_group` could not be looked up.
    #[error("cannot look up socket_group '{group}'")]
    GroupLookup {
        /// The group.
        group: String,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
    /// `socket_group` does not exist.
    #[error("socket_group '{group}' does not exist; create it or clear socket_group in config.toml")]
    NoGroup {
        /// The group.
        group: String,
    },
    /// The installation key could not be made or read.
    #[error("cannot prepare the installation ssh key")]
    InstallationKey(#[source] SshKeyError),
    /// A VM's host key could not be made or read.
    #[error("cannot prepare the ssh host key of vm '{vm}'")]
    HostKey {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: SshKeyError,
    },
    /// `known_hosts` could not be rewritten.
    #[error("cannot rewrite known_hosts")]
    KnownHosts(#[source] SshKeyError),
    /// The keys and files could not be written into the work disk.
    #[error("cannot write ssh keys into vm '{vm}': {message}")]
    GuestFiles {
        /// The VM.
        vm: String,
        /// What failed.
        message: String,
    },
    /// The VM has no address to ssh to.
    #[error("vm '{vm}' has no network address; use `banger vm exec {vm}`")]
    NoAddress {
        /// The VM.
        vm: String,
    },
    /// A blocking task died.
    #[error("a background task failed")]
    Task(#[from] tokio::task::JoinError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SshKeyError {
    let path = path.to_owned();
    move |source| SshKeyError::Io { path, source }
}

/// A key pair on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// The private key (OpenSSH format).
    pub private: PathBuf,
    /// The public key file (`private` + `.pub`).
    pub public: PathBuf,
    /// The public key as one OpenSSH line, `ssh-ed25519 AAAA... COMMENT`.
    pub line: String,
    /// Whether this call made it.
    pub created: bool,
}

/// `path` with `.pub` appended.
fn pub_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Writes `contents` to `path` through a temporary file and a rename, with `mode`.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), SshKeyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(io_error(dir))?;
    tmp.write_all(contents).map_err(io_error(tmp.path()))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode)).map_err(io_error(path))?;
    tmp.persist(path).map_err(|e| SshKeyError::Io { path: path.to_owned(), source: e.error })?;
    Ok(())
}

/// Sets `mode` and, when given, the group of `path`.
fn set_access(path: &Path, mode: u32, group: Option<Gid>) -> Result<(), SshKeyError> {
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|source| SshKeyError::Group { path: path.to_owned(), source })?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_error(path))
}

/// Makes the ed25519 key pair at `private` (+ `.pub`) unless it exists, and returns it. Safe
/// against a concurrent caller: the private key is published with a no-clobber link, so exactly
/// one key wins and both callers return it. Modes and group are (re)applied every time.
pub fn ensure_key_pair(private: &Path, comment: &str, mode: u32, group: Option<Gid>) -> Result<KeyPair, SshKeyError> {
    let key_error = |source| SshKeyError::Key { path: private.to_owned(), source };
    let dir = private.parent().unwrap_or(Path::new("."));
    let mut created = false;
    let key = match fs::read(private) {
        Ok(text) => PrivateKey::from_openssh(text).map_err(key_error)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519).map_err(key_error)?;
            key.set_comment(comment);
            let text = key.to_openssh(LineEnding::LF).map_err(key_error)?;
            let mut tmp = tempfile::Builder::new().prefix(".key-").tempfile_in(dir).map_err(io_error(dir))?;
            // NamedTempFile is 0600 from the start: the key is never readable by others.
            tmp.write_all(text.as_bytes()).and_then(|()| tmp.as_file().sync_all()).map_err(io_error(tmp.path()))?;
            match fs::hard_link(tmp.path(), private) {
                Ok(()) => {
                    created = true;
                    key
                }
                // Another caller made one first: use theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    PrivateKey::from_openssh(fs::read(private).map_err(io_error(private))?).map_err(key_error)?
                }
                Err(e) => return Err(SshKeyError::Io { path: private.to_owned(), source: e }),
            }
        }
        Err(e) => return Err(SshKeyError::Io { path: private.to_owned(), source: e }),
    };
    set_access(private, mode, group)?;
    let line = key.public_key().to_openssh().map_err(key_error)?;
    let public = pub_path(private);
    let want = format!("{line}\n");
    if fs::read_to_string(&public).ok().as_deref() != Some(want.as_str()) {
        write_atomic(&public, want.as_bytes(), 0o644)?;
    }
    if let Some(gid) = group {
        nix::unistd::chown(&public, None, Some(gid))
            .map_err(|source| SshKeyError::Group { path: public.clone(), source })?;
    }
    Ok(KeyPair { private: private.to_owned(), public, line, created })
}

/// The installation key in `ssh_dir` (made on first need). With a `socket_group`, the directory
/// is 0750 and the key 0640, both the group's, so its members' `ssh` can use the key (ssh only
/// refuses a too-open key that the user running it owns); otherwise 0700 and 0600.
pub fn ensure_installation_key(ssh_dir: &Path, group: Option<Gid>) -> Result<KeyPair, SshKeyError> {
    let (dir_mode, key_mode) = if group.is_some() { (0o750, 0o640) } else { (0o700, 0o600) };
    banger_host::paths::ensure_dir(ssh_dir, dir_mode).map_err(io_error(ssh_dir))?;
    set_access(ssh_dir, dir_mode, group)?;
    ensure_key_pair(&ssh_dir.join("id_ed25519"), INSTALLATION_KEY_COMMENT, key_mode, group)
}

/// A VM's host key pair in its directory (made on first need).
pub fn ensure_host_key(vm_dir: &Path, vm_name: &str) -> Result<KeyPair, SshKeyError> {
    ensure_key_pair(&vm_dir.join(HOST_KEY), &format!("root@{vm_name}"), 0o600, None)
}

/// The name a VM's host key is pinned under.
pub fn host_key_alias(vm_name: &str) -> String {
    format!("{vm_name}.vm")
}

/// `known_hosts` text: one `NAME.vm TYPE KEY` line per `(name, public key line)`, sorted by
/// name, without comments (ssh's parser needs none and a comment could only confuse).
pub fn render_known_hosts(entries: &[(String, String)]) -> String {
    let mut lines: Vec<(String, String)> = entries
        .iter()
        .filter_map(|(name, key)| {
            let mut fields = key.split_whitespace();
            let (kind, blob) = (fields.next()?, fields.next()?);
            Some((name.clone(), format!("{} {kind} {blob}\n", host_key_alias(name))))
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|(_, line)| line).collect()
}

/// `authorized_keys` with `key_line` in it: the guest's other keys stay, an earlier installation
/// key (one with [`INSTALLATION_KEY_COMMENT`]) is replaced.
pub fn merge_authorized_keys(existing: &str, key_line: &str) -> String {
    let mut out: String = existing
        .lines()
        .filter(|line| {
            let line = line.trim();
            !line.is_empty() && line.split_whitespace().last() != Some(INSTALLATION_KEY_COMMENT)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    out.push_str(key_line.trim());
    out.push('\n');
    out
}

/// A git config value, quoted so that any character but a newline survives.
fn git_quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Whether `line` is a section header, and whether that section is `[user]`.
fn section_header(line: &str) -> Option<bool> {
    let t = line.trim();
    t.starts_with('[').then(|| t.trim_start_matches('[').trim_end_matches(']').trim().eq_ignore_ascii_case("user"))
}

/// The key of a `key = value` line (lowercase), if it is one.
fn config_key(line: &str) -> Option<String> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
        return None;
    }
    let key = t.split(['=', ' ', '\t']).next()?.trim();
    Some(key.to_ascii_lowercase())
}

/// `.gitconfig` text with `user.name` and `user.email` set to those of `git` that are given;
/// every other line is kept. The first `[user]` section gets the values (replacing earlier ones
/// there and dropping them from any later `[user]` section); without one, a section is appended.
pub fn merge_gitconfig(existing: &str, git: &GitIdentity) -> String {
    let wanted: Vec<(&str, &str)> = [("name", git.name.as_deref()), ("email", git.email.as_deref())]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    if wanted.is_empty() {
        return existing.to_owned();
    }
    let render = |(k, v): &(&str, &str)| format!("\t{k} = {}\n", git_quote(v));
    let mut out = String::new();
    let (mut in_user, mut placed) = (false, false);
    for line in existing.lines() {
        if let Some(is_user) = section_header(line) {
            in_user = is_user;
            out.push_str(line);
            out.push('\n');
            if is_user && !placed {
                out.extend(wanted.iter().map(render));
                placed = true;
            }
            continue;
        }
        if in_user && config_key(line).is_some_and(|k| wanted.iter().any(|(w, _)| *w == k)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !placed {
        out.push_str("[user]\n");
        out.extend(wanted.iter().map(render));
    }
    out
}

/// Trims a git identity, drops empty fields and refuses what `.gitconfig` cannot hold.
pub fn check_git_identity(git: Option<GitIdentity>) -> Result<Option<GitIdentity>, GitIdentityError> {
    let Some(git) = git else { return Ok(None) };
    let field = |what: &str, value: Option<String>| -> Result<Option<String>, GitIdentityError> {
        let Some(value) = value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) else { return Ok(None) };
        if value.chars().any(char::is_control) {
            return Err(GitIdentityError::Control { what: what.to_owned() });
        }
        if value.len() > MAX_GIT_FIELD {
            return Err(GitIdentityError::TooLong { what: what.to_owned() });
        }
        Ok(Some(value))
    };
    let git = GitIdentity { name: field("user.name", git.name)?, email: field("user.email", git.email)? };
    Ok((git.name.is_some() || git.email.is_some()).then_some(git))
}

/// A file bound for the work disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path in the work disk (`/x` is the guest's `/root/x`).
    pub path: String,
    /// Contents.
    pub contents: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

impl PlannedFile {
    fn guest(&self) -> GuestFile<'_> {
        GuestFile { path: &self.path, contents: &self.contents, mode: self.mode }
    }
}

/// Whether one of `a` and `b` is the other or a directory above it.
fn overlaps(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// Reads the `sync_files` entries' host files (`~` is `home`). Each problem (missing file,
/// unreadable, too large, a path the work disk cannot take, a clash with banger's own files or an
/// earlier entry) is a warning and the entry is skipped.
pub fn collect_sync_files(
    entries: &[String],
    home: Option<&Path>,
    reserved: &[&str],
) -> (Vec<PlannedFile>, Vec<String>) {
    let (mut files, mut warnings): (Vec<PlannedFile>, Vec<String>) = (Vec::new(), Vec::new());
    for entry in entries {
        let resolved = SyncFile::parse(entry).and_then(|s| s.resolve(home));
        let (host, relative) = match resolved {
            Ok(r) => r,
            Err(e) => {
                warnings.push(format!("{e}; skipped"));
                continue;
            }
        };
        let path = format!("/{relative}");
        let shown = host.display();
        let skip = |why: String| format!("sync_files: {why}; skipped");
        if let Err(e) = GuestPath::new(&path) {
            warnings.push(skip(format!("guest path ~/{relative} cannot be written into the work disk ({e})")));
            continue;
        }
        let meta = match fs::metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warnings.push(skip(format!("{shown} does not exist")));
                continue;
            }
            Err(e) => {
                warnings.push(skip(format!("cannot read {shown}: {e}")));
                continue;
            }
        };
        if !meta.is_file() {
            warnings.push(skip(format!("{shown} is not a regular file")));
            continue;
        }
        if meta.len() > MAX_SYNC_BYTES {
            warnings.push(skip(format!("{shown} is larger than {} MiB", MAX_SYNC_BYTES >> 20)));
            continue;
        }
        if let Some(clash) = reserved.iter().find(|r| overlaps(&path, r)) {
            warnings.push(skip(format!("~/{relative} clashes with banger's ~{clash}")));
            continue;
        }
        if let Some(earlier) = files.iter().find(|f| overlaps(&path, &f.path)) {
            warnings.push(skip(format!("~/{relative} clashes with the earlier entry for ~{}", earlier.path)));
            continue;
        }
        match fs::read(&host) {
            Ok(contents) => files.push(PlannedFile { path, contents, mode: meta.permissions().mode() & 0o777 }),
            Err(e) => warnings.push(skip(format!("cannot read {shown}: {e}"))),
        }
    }
    (files, warnings)
}

/// Everything the `guest-files` stage writes.
#[derive(Debug, Clone)]
pub struct GuestFilesPlan {
    /// The installation's public key line.
    pub authorized_key: String,
    /// The VM's host private key (OpenSSH text).
    pub host_key: Vec<u8>,
    /// The VM's host public key line.
    pub host_key_pub: String,
    /// The caller's git identity.
    pub git: Option<GitIdentity>,
    /// The `sync_files` contents.
    pub sync: Vec<PlannedFile>,
}

/// Work-disk paths banger owns; `sync_files` may not touch them.
pub const RESERVED: [&str; 3] = [AUTHORIZED_KEYS, "/.banger/ssh_host_ed25519_key", "/.banger/ssh_host_ed25519_key.pub"];

/// Writes `plan` into the unmounted work disk `work`. banger's files (authorized key, host key)
/// must land: their failure is the error. The git identity and the synced files are best effort:
/// each failure is a warning. Returns the warnings.
pub fn write_guest_files(tools: &dyn SeedTools, work: &Path, plan: GuestFilesPlan) -> Result<Vec<String>, String> {
    let existing = seed::read_files_from(tools, work, &[AUTHORIZED_KEYS, GITCONFIG], MAX_GUEST_FILE_BYTES)
        .map_err(|e| format!("cannot read the work disk: {}", chain(&e)))?;
    let text =
        |i: usize| existing.get(i).and_then(GuestRead::contents).map(|b| String::from_utf8_lossy(b).into_owned());
    let too_large = |i: usize| match existing.get(i) {
        Some(GuestRead::TooLarge { size }) => Some(*size),
        _ => None,
    };
    let mut warnings = Vec::new();
    let cap_kib = MAX_GUEST_FILE_BYTES >> 10;
    if let Some(size) = too_large(0) {
        warnings.push(format!(
            "the guest's ~/.ssh/authorized_keys is {size} bytes, over the {cap_kib} KiB cap: it was not read and \
             now holds the installation key alone; add the guest's other keys again"
        ));
    }
    let keys = merge_authorized_keys(&text(0).unwrap_or_default(), &plan.authorized_key);
    let host_pub = format!("{}\n", plan.host_key_pub.trim());
    let banger = [
        GuestFile { path: AUTHORIZED_KEYS, contents: keys.as_bytes(), mode: 0o600 },
        GuestFile { path: RESERVED[1], contents: &plan.host_key, mode: 0o600 },
        GuestFile { path: RESERVED[2], contents: host_pub.as_bytes(), mode: 0o644 },
    ];
    seed::write_files_into(tools, work, &banger).map_err(|e| chain(&e))?;

    let mut user = plan.sync;
    if let Some(git) = &plan.git {
        // A synced .gitconfig is the base the identity is merged into; else the disk's own.
        let base = user.iter().position(|f| f.path == GITCONFIG).map(|i| user.remove(i));
        let (base_text, mode) = match (base, too_large(1)) {
            (Some(f), _) => (Some(String::from_utf8_lossy(&f.contents).into_owned()), f.mode),
            (None, Some(size)) => {
                warnings.push(format!(
                    "the guest's ~/.gitconfig is {size} bytes, over the {cap_kib} KiB cap: it was not read and \
                     the git identity was not written into it"
                ));
                (None, 0o644)
            }
            (None, None) => (Some(text(1).unwrap_or_default()), 0o644),
        };
        if let Some(base_text) = base_text {
            user.push(PlannedFile {
                path: GITCONFIG.into(),
                contents: merge_gitconfig(&base_text, git).into_bytes(),
                mode,
            });
        }
    }
    if user.is_empty() {
        return Ok(warnings);
    }
    let all: Vec<GuestFile<'_>> = user.iter().map(PlannedFile::guest).collect();
    if seed::write_files_into(tools, work, &all).is_err() {
        // One bad path must not keep the others out: write them one by one.
        for file in &user {
            if let Err(e) = seed::write_files_into(tools, work, &[file.guest()]) {
                warnings.push(format!("cannot write ~{}: {}; skipped", file.path, chain(&e)));
            }
        }
    }
    Ok(warnings)
}

/// The ssh service: the installation key, VM host keys, `known_hosts` and the guest files.
pub struct Ssh {
    fleet: Arc<Fleet>,
    /// One `known_hosts` rewrite at a time.
    known_hosts: NamedLocks,
}

impl Ssh {
    /// The service over `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet, known_hosts: NamedLocks::default() }
    }

    /// `<state>/ssh`: the installation key and known_hosts.
    pub fn ssh_dir(&self) -> PathBuf {
        self.fleet.layout.state_dir.join("ssh")
    }

    /// `<state>/ssh/known_hosts`.
    pub fn known_hosts_file(&self) -> PathBuf {
        self.ssh_dir().join("known_hosts")
    }

    /// The group of `socket_group`, if set.
    fn ssh_group(&self) -> Result<Option<Gid>, SshError> {
        let group = &self.fleet.config.socket_group;
        if group.is_empty() {
            return Ok(None);
        }
        let found = nix::unistd::Group::from_name(group)
            .map_err(|source| SshError::GroupLookup { group: group.clone(), source })?;
        found.map(|g| Some(g.gid)).ok_or_else(|| SshError::NoGroup { group: group.clone() })
    }

    /// The installation key pair, made on first need.
    pub fn installation_key(&self) -> Result<KeyPair, SshError> {
        let key = ensure_installation_key(&self.ssh_dir(), self.ssh_group()?).map_err(SshError::InstallationKey)?;
        if key.created {
            tracing::info!(key = %key.private.display(), "installation ssh key made");
        }
        Ok(key)
    }

    /// `vm`'s host key pair, made on first need.
    pub fn vm_host_key(&self, vm: &VmRecord) -> Result<KeyPair, SshError> {
        ensure_host_key(Path::new(&vm.vm_dir), &vm.name)
            .map_err(|source| SshError::HostKey { vm: vm.name.clone(), source })
    }

    /// Rewrites `known_hosts` from every VM's host public key. One rewrite at a time (under the
    /// `ssh:known_hosts` artifact lock), each from the store as it is then, so the last one run
    /// lists every VM whose key exists.
    pub async fn rewrite_known_hosts(&self) -> Result<(), SshError> {
        let _guard = self.known_hosts.lock("known_hosts").await;
        let vms = self.fleet.store.list_vms()?;
        let (dir, file, group) = (self.ssh_dir(), self.known_hosts_file(), self.ssh_group()?);
        tokio::task::spawn_blocking(move || -> Result<(), SshKeyError> {
            let entries: Vec<(String, String)> = vms
                .iter()
                .filter_map(|vm| {
                    let key = fs::read_to_string(pub_path(&Path::new(&vm.vm_dir).join(HOST_KEY))).ok()?;
                    Some((vm.name.clone(), key))
                })
                .collect();
            let dir_mode = if group.is_some() { 0o750 } else { 0o700 };
            banger_host::paths::ensure_dir(&dir, dir_mode).map_err(io_error(&dir))?;
            write_atomic(&file, render_known_hosts(&entries).as_bytes(), 0o644)
        })
        .await?
        .map_err(SshError::KnownHosts)
    }

    /// Writes the installation key, the VM's host key, the git identity and `sync_files` into
    /// the unmounted `work_disk` of `vm` (see the module doc). Returns warnings for the
    /// operation: user files that were skipped.
    pub async fn prepare_guest_files(
        &self,
        vm: &VmRecord,
        work_disk: &Path,
        git: Option<&GitIdentity>,
    ) -> Result<Vec<String>, SshError> {
        let started = std::time::Instant::now();
        let group = self.ssh_group()?;
        let (ssh_dir, vm_dir, name) = (self.ssh_dir(), PathBuf::from(&vm.vm_dir), vm.name.clone());
        let (work, git, sync) = (work_disk.to_owned(), git.cloned(), self.fleet.config.sync_files.clone());
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        let (warnings, host_key_made) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let installation = ensure_installation_key(&ssh_dir, group).map_err(|e| chain(&e))?;
            let host = ensure_host_key(&vm_dir, &name).map_err(|e| chain(&e))?;
            let host_key =
                fs::read(&host.private).map_err(|e| format!("cannot read {}: {e}", host.private.display()))?;
            let (sync, mut warnings) = collect_sync_files(&sync, home.as_deref(), &RESERVED);
            let plan =
                GuestFilesPlan { authorized_key: installation.line, host_key, host_key_pub: host.line, git, sync };
            warnings.extend(write_guest_files(&SystemSeedTools, &work, plan)?);
            Ok((warnings, host.created))
        })
        .await?
        .map_err(|message| SshError::GuestFiles { vm: vm.name.clone(), message })?;
        if host_key_made {
            self.rewrite_known_hosts().await?;
        }
        for w in &warnings {
            tracing::warn!(vm = %vm.name, warning = %w, "guest file skipped");
        }
        tracing::debug!(vm = %vm.name, elapsed = ?started.elapsed(), "guest files written");
        Ok(warnings)
    }

    /// How to reach VM `reference` with `ssh`: it must have an address and be running.
    pub fn ssh_info(&self, reference: &str) -> Result<SshInfo, SshError> {
        let vm = self.fleet.store.find_vm(reference)?;
        let Some(host) = vm.guest_ip.clone() else {
            return Err(SshError::NoAddress { vm: vm.name });
        };
        if !self.fleet.alive(&vm) {
            return Err(FleetError::NotRunning { vm: vm.name }.into());
        }
        let key = self.installation_key()?;
        Ok(SshInfo {
            user: SSH_USER.into(),
            host,
            port: SSH_PORT,
            identity_file: key.private.display().to_string(),
            known_hosts_file: self.known_hosts_file().display().to_string(),
            host_key_alias: host_key_alias(&vm.name),
        })
    }

    /// Every VM as an ssh_config host.
    pub fn ssh_config(&self) -> Result<SshConfig, SshError> {
        let key = self.installation_key()?;
        let hosts = self
            .fleet
            .store
            .list_vms()?
            .into_iter()
            .map(|vm| SshHost {
                alias: host_key_alias(&vm.name),
                hostname: vm.guest_ip.clone(),
                user: SSH_USER.into(),
                port: SSH_PORT,
                running: self.fleet.alive(&vm),
                name: vm.name,
            })
            .collect();
        Ok(SshConfig {
            identity_file: key.private.display().to_string(),
            known_hosts_file: self.known_hosts_file().display().to_string(),
            hosts,
        })
    }
}

#[cfg(test)]
#[path = "ssh_tests.rs"]
mod tests;
