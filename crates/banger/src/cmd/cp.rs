//! `banger vm cp SRC DST`: files and trees between the host and a running VM, with `docker cp`'s
//! rules. Both ways travel as tar streams (`GET`/`PUT /v1/vms/{vm}/files/archive`); the host
//! side builds its stream with the workspace import's reader (never following a symlink; links
//! pointing out of the copied tree are left out with a warning) and extracts the guest's with
//! `files::untar` (anything that would land outside the destination is refused).

use std::ffi::OsString;
use std::io::{IsTerminal as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use banger_proto::fs::{FileKind, FileStat};
use clap::Args;
use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::client::Client;
use crate::files::untar::{self, Top};
use crate::files::{self, ChannelBody};
use crate::workspace::tarball;

/// Bytes per piece of an upload.
const PIECE: usize = 256 * 1024;
/// A copy shows progress (on a terminal) once it has moved this much.
const PROGRESS_AFTER: u64 = 4 * 1024 * 1024;

/// Copy files and directory trees between the host and a running VM (the `docker cp` shape).
///
/// One side is `VM:/absolute/path`. A directory is copied whole: into DST when DST is an
/// existing directory, else as DST. `SRC/.` copies a directory's contents. A file goes into an
/// existing directory DST, or becomes DST (a DST ending in `/` must be an existing directory).
/// Modes (without set-id bits) and symlinks are kept; symlinks are never followed, and ones that
/// point out of the copied tree are refused coming from the guest and left out (with a warning)
/// going in. `-` as SRC reads a tar stream from stdin (DST must be a directory); as DST it
/// writes one to stdout.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  banger vm cp ./src dev:/root/\n  banger vm cp dev:/root/out.log .\n  \
                        banger vm cp dev:/etc/. ./guest-etc\n  tar -c dir | banger vm cp - dev:/root")]
pub struct CpArgs {
    /// What to copy: a host path, `VM:/path`, or `-` (a tar stream on stdin).
    src: String,
    /// Where to: a host path, `VM:/path`, or `-` (a tar stream on stdout).
    dst: String,
}

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Side {
    Host(String),
    Guest { vm: String, path: String },
    Stdio,
}

fn side(arg: &str) -> anyhow::Result<Side> {
    if arg == "-" {
        return Ok(Side::Stdio);
    }
    match arg.split_once(':') {
        Some((vm, path)) if !vm.is_empty() && !vm.contains('/') => {
            if !path.starts_with('/') {
                bail!("'{arg}': the guest path must be absolute, e.g. {vm}:/root/{path}");
            }
            Ok(Side::Guest { vm: vm.to_owned(), path: path.to_owned() })
        }
        _ => Ok(Side::Host(arg.to_owned())),
    }
}

pub async fn run(client: &Client, a: CpArgs) -> anyhow::Result<ExitCode> {
    match (side(&a.src)?, side(&a.dst)?) {
        (Side::Guest { vm, path }, dst @ (Side::Host(_) | Side::Stdio)) => copy_out(client, &vm, &path, &dst).await?,
        (src @ (Side::Host(_) | Side::Stdio), Side::Guest { vm, path }) => copy_in(client, &src, &vm, &path).await?,
        (Side::Guest { .. }, Side::Guest { .. }) => {
            bail!("both sides are in a VM; copy to the host first (one side of `vm cp` is a host path or -)")
        }
        _ => bail!("neither side is in a VM; name one as VM:/path (e.g. dev:/root/file)"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A guest path without a trailing `/` or `/.`, and whether it asked for a directory's contents.
fn guest_path(path: &str) -> (String, bool) {
    let contents = path.ends_with("/.");
    let trimmed = path.trim_end_matches("/.").trim_end_matches('/');
    (if trimmed.is_empty() { "/".to_owned() } else { trimmed.to_owned() }, contents)
}

fn base_name(path: &str) -> Option<OsString> {
    Path::new(path).file_name().map(ToOwned::to_owned)
}

/// The parent of a guest path (`/` for a top-level one).
fn guest_parent(path: &str) -> String {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/".to_owned(),
        Some((parent, _)) => parent.to_owned(),
    }
}

async fn guest_stat(client: &Client, vm: &str, path: &str) -> anyhow::Result<Option<FileStat>> {
    match files::stat(client, vm, path).await {
        Ok(stat) => Ok(Some(stat)),
        Err(e) if files::is_not_found(&e) && !e.to_string().starts_with("no vm") => Ok(None),
        Err(e) => Err(e),
    }
}

// ---- host → guest ----------------------------------------------------------------------------

async fn copy_in(client: &Client, src: &Side, vm: &str, dst: &str) -> anyhow::Result<()> {
    let (dst_path, _) = guest_path(dst);
    let Side::Host(src) = src else {
        // A tar stream from stdin goes into a directory, as `docker cp -` does.
        match guest_stat(client, vm, &dst_path).await? {
            Some(stat) if stat.kind == FileKind::Dir => {}
            Some(_) => bail!("{vm}:{dst} is not a directory; a tar stream from stdin is extracted into a directory"),
            None => bail!("{vm}:{dst}: no such directory; make it first (`banger vm exec {vm} -- mkdir -p {dst}`)"),
        }
        let (tx, body) = ChannelBody::new(8);
        let reader = tokio::task::spawn_blocking(move || {
            let mut writer = BodyWriter::new(tx, Meter::new("sending"));
            let copied = std::io::copy(&mut std::io::stdin().lock(), &mut writer).and_then(|_| writer.flush());
            writer.meter.done();
            copied
        });
        let done = files::extract(client, vm, &dst_path, body).await;
        let read = reader.await.context("the stdin reader failed")?;
        let done = done.with_context(|| format!("copying stdin into {vm}:{dst} failed"))?;
        read.context("cannot read stdin")?;
        return report(&format!("{vm}:{dst}"), done.entries, done.bytes);
    };
    let contents = src.ends_with("/.");
    let (parent, name) = host_source(src)?;
    let parent_fd = open_dir(&parent, true).with_context(|| format!("{src}: cannot open {}", parent.display()))?;
    let meta = std::fs::symlink_metadata(parent.join(&name)).with_context(|| format!("{src}: cannot read it"))?;
    let is_dir = meta.is_dir();
    if contents && !is_dir {
        bail!("{src}: not a directory (`/.` copies a directory's contents)");
    }
    // Where in the guest, and the entries' names there.
    let (into, as_name) = match guest_stat(client, vm, &dst_path).await? {
        Some(stat) if stat.kind == FileKind::Dir => {
            (dst_path.clone(), if contents { None } else { Some(name.clone()) })
        }
        Some(stat) if stat.kind == FileKind::Symlink => bail!(
            "{vm}:{dst} is a symlink (to {}); name the directory it points to",
            stat.link_target.unwrap_or_default()
        ),
        Some(_) if is_dir => bail!("cannot copy directory {src} onto file {vm}:{dst}"),
        Some(_) => (guest_parent(&dst_path), base_name(&dst_path)),
        None => {
            if dst.ends_with('/') && !is_dir {
                bail!("{vm}:{dst}: no such directory; make it first (`banger vm exec {vm} -- mkdir -p {dst}`)");
            }
            let up = guest_parent(&dst_path);
            if guest_stat(client, vm, &up).await?.is_none_or(|s| s.kind != FileKind::Dir) {
                bail!("{vm}:{up}: no such directory; make it first (`banger vm exec {vm} -- mkdir -p {up}`)");
            }
            (up, base_name(&dst_path))
        }
    };
    // The entries: the source itself under its new name, or (for `/.` into a directory) its
    // children.
    let (dir_fd, names) = match as_name {
        Some(as_name) => (parent_fd, vec![(name, PathBuf::from(as_name))]),
        None => {
            let dir = open_at(&parent_fd, &name).with_context(|| format!("{src}: cannot open the directory"))?;
            let children = children(&parent.join(&name))?;
            (dir, children.into_iter().map(|c| (c.clone(), PathBuf::from(c))).collect())
        }
    };
    let (tx, body) = ChannelBody::new(8);
    let builder = tokio::task::spawn_blocking(move || {
        let mut writer = BodyWriter::new(tx, Meter::new("sending"));
        let stats = tarball::write_named(&dir_fd, &names, &mut writer);
        writer.meter.done();
        stats
    });
    let done = files::extract(client, vm, &into, body).await;
    let built = builder.await.context("the tar builder failed")?;
    let done = done.with_context(|| format!("copying {src} to {vm}:{dst} failed"))?;
    let stats = built.with_context(|| format!("cannot read {src}"))?;
    for (path, why) in &stats.skipped {
        eprintln!("warning: left out {}: {why}", path.display());
    }
    report(&format!("{vm}:{dst}"), done.entries, done.bytes)
}

/// The directory holding host path `src` (symlinks on the way followed) and `src`'s own name
/// (not followed).
fn host_source(src: &str) -> anyhow::Result<(PathBuf, OsString)> {
    let path = Path::new(src);
    let resolved;
    let path = if path.file_name().is_none() {
        // `.`, `..`, `dir/..`: the directory they name.
        resolved = std::fs::canonicalize(path).with_context(|| format!("{src}: cannot read it"))?;
        resolved.as_path()
    } else {
        path
    };
    let name = path.file_name().context("cannot copy '/'; name a directory under it")?.to_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

fn open_dir(path: &Path, follow: bool) -> nix::Result<OwnedFd> {
    open_dir_at(None, path.as_os_str(), follow)
}

fn open_at(dir: &OwnedFd, name: &OsString) -> nix::Result<OwnedFd> {
    open_dir_at(Some(dir), name, true)
}

fn open_dir_at(dir: Option<&OwnedFd>, name: &std::ffi::OsStr, follow: bool) -> nix::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if !follow {
        flags |= OFlag::O_NOFOLLOW;
    }
    let fd = nix::fcntl::openat(dir.map(|d| d.as_raw_fd()), name, flags, Mode::empty())?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn children(dir: &Path) -> anyhow::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        names.push(entry.with_context(|| format!("cannot list {}", dir.display()))?.file_name());
    }
    names.sort();
    Ok(names)
}

/// A `Write` that feeds a [`ChannelBody`] in pieces (from a blocking thread).
struct BodyWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
    meter: Meter,
}

impl BodyWriter {
    fn new(tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>, meter: Meter) -> Self {
        Self { tx, buf: Vec::with_capacity(PIECE), meter }
    }
}

impl std::io::Write for BodyWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIECE {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE)));
        self.meter.add(piece.len() as u64);
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "bangerd stopped reading the upload"))
    }
}

// ---- guest → host ----------------------------------------------------------------------------

async fn copy_out(client: &Client, vm: &str, src: &str, dst: &Side) -> anyhow::Result<()> {
    let (src_path, contents) = guest_path(src);
    let Side::Host(dst) = dst else {
        let mut body = files::archive(client, vm, &src_path).await?;
        let mut out = tokio::io::stdout();
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("the stream of {vm}:{src} broke off; see bangerd's log"))?;
            if let Ok(data) = frame.into_data() {
                tokio::io::AsyncWriteExt::write_all(&mut out, &data).await.context("cannot write stdout")?;
            }
        }
        tokio::io::AsyncWriteExt::flush(&mut out).await.context("cannot write stdout")?;
        return Ok(());
    };
    let Some(stat) = guest_stat(client, vm, &src_path).await? else {
        bail!("{vm}:{src}: no such file or directory");
    };
    let name = base_name(&src_path).context("cannot copy the guest's '/'; name a directory under it")?;
    let is_dir = stat.kind == FileKind::Dir;
    if contents && !is_dir {
        bail!("{vm}:{src}: not a directory (`/.` copies a directory's contents)");
    }
    let dst_path = Path::new(dst);
    let (into, top) = match std::fs::metadata(dst_path) {
        Ok(meta) if meta.is_dir() => {
            (dst_path.to_owned(), Top { from: name.clone(), to: if contents { None } else { Some(name) } })
        }
        Ok(_) if is_dir => bail!("cannot copy directory {vm}:{src} onto file {dst}"),
        Ok(_) => host_target(dst_path, name)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dst.ends_with('/') && !is_dir {
                bail!("{dst}: no such directory; make it first");
            }
            host_target(dst_path, name)?
        }
        Err(e) => return Err(e).with_context(|| format!("{dst}: cannot read it")),
    };
    let body = files::archive(client, vm, &src_path).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let dest = into.clone();
    let extractor = tokio::task::spawn_blocking(move || untar::extract(ChannelReader::new(rx), &dest, &top));
    let pumped = pump(body, tx).await;
    let extracted = extractor.await.context("the extractor failed")?;
    let summary = match (extracted, pumped) {
        // A refusal ends the extraction (and so the pump): it is the reason.
        (Err(e), _) => return Err(e).with_context(|| format!("copying {vm}:{src} to {dst} failed")),
        (Ok(_), Err(e)) => return Err(e.context(format!("copying {vm}:{src} to {dst} failed"))),
        (Ok(summary), Ok(())) => summary,
    };
    report(dst, summary.entries, summary.bytes)
}

/// For a destination that is (or will be) a file or a new directory: its parent, which must
/// exist, and the top entry renamed to its name.
fn host_target(dst: &Path, from: OsString) -> anyhow::Result<(PathBuf, Top)> {
    let to = dst.file_name().with_context(|| format!("{}: name a file or directory", dst.display()))?.to_owned();
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!("{}: no such directory; make it first", parent.display());
    }
    Ok((parent, Top { from, to: Some(to) }))
}

/// Moves the body's bytes to the extractor, counting them.
async fn pump(mut body: hyper::body::Incoming, tx: tokio::sync::mpsc::Sender<Bytes>) -> anyhow::Result<()> {
    let mut meter = Meter::new("receiving");
    let result = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the stream from the guest broke off; see bangerd's log")?;
            let Ok(data) = frame.into_data() else { continue };
            meter.add(data.len() as u64);
            if tx.send(data).await.is_err() {
                // The extractor stopped (its error says why).
                break;
            }
        }
        Ok(())
    }
    .await;
    meter.done();
    result
}

/// A blocking reader over the pieces a [`pump`] sends.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    /// For a blocking thread (`blocking_recv`).
    fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        Self { rx, current: Bytes::new() }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(piece) => self.current = piece,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

// ---- progress --------------------------------------------------------------------------------

/// Bytes moved, shown on stderr when it is a terminal and the copy is large.
struct Meter {
    what: &'static str,
    moved: u64,
    live: bool,
    bar: Option<ProgressBar>,
}

impl Meter {
    fn new(what: &'static str) -> Self {
        Self { what, moved: 0, live: std::io::stderr().is_terminal(), bar: None }
    }

    fn add(&mut self, n: u64) {
        self.moved += n;
        if self.live && self.bar.is_none() && self.moved >= PROGRESS_AFTER {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec}, {elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(self.what);
            bar.enable_steady_tick(Duration::from_millis(100));
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(self.moved);
        }
    }

    fn done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// One line on stderr (on a terminal): what was copied where.
fn report(to: &str, entries: u64, bytes: u64) -> anyhow::Result<()> {
    if std::io::stderr().is_terminal() {
        eprintln!("copied {entries} entries ({}) to {to}", indicatif::HumanBytes(bytes));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_and_guest_paths_parse() {
        assert_eq!(side("-").expect("stdio"), Side::Stdio);
        assert_eq!(side("dev:/root/x").expect("guest"), Side::Guest { vm: "dev".into(), path: "/root/x".into() });
        assert_eq!(side("./a:b").expect("host"), Side::Host("./a:b".into()));
        assert_eq!(side("file").expect("host"), Side::Host("file".into()));
        assert!(side("dev:root/x").expect_err("relative").to_string().contains("must be absolute"));
        assert_eq!(guest_path("/root/dir/."), ("/root/dir".to_owned(), true));
        assert_eq!(guest_path("/root/dir/"), ("/root/dir".to_owned(), false));
        assert_eq!(guest_path("/"), ("/".to_owned(), false));
        assert_eq!((guest_parent("/x"), guest_parent("/a/b")), ("/".to_owned(), "/a".to_owned()));
        let (parent, name) = host_source("dir/file").expect("host source");
        assert_eq!((parent, name), (PathBuf::from("dir"), OsString::from("file")));
        assert_eq!(host_source("file").expect("bare").0, PathBuf::from("."));
    }
}
