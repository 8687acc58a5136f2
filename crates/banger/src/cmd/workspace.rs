//! `banger workspace ...`: a host git repository imported into a running VM, and the guest's
//! work brought back as a branch or a patch. Also the `--workspace` of `vm create` and `vm run`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use banger_proto::workspace::{valid_guest_dir, ExportKind, WorkspaceExportQuery, DEFAULT_EXPORT_MAX_BYTES};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::client::Client;
use crate::output;
use crate::workspace::{bring_back, disk, patch, stream, tarball, Repo};

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Import a git repository into a running VM at /root/<repo name>: its tracked files and
    /// uncommitted changes (modified files, and untracked files that are not ignored), with
    /// `.git`. Prints the guest directory.
    Prepare(PrepareArgs),
    /// Bring the guest's new commits back into the repository of the current directory as a
    /// branch (default `banger/<vm>`), or its uncommitted changes as a patch file with
    /// --patch. The host's checked-out branch and work tree are never touched. Prints the
    /// branch (or the patch file).
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Name, id or id prefix of a running VM.
    vm: String,
    /// A directory inside the repository [default: the current directory]
    path: Option<PathBuf>,
    /// Print what was imported as JSON.
    #[arg(long)]
    json: bool,
    /// How the files go in: `disk` attaches an ext4 image the CLI builds (fast for large
    /// repositories; QEMU VMs, new directories), `tar` streams them to the agent, `auto` picks.
    #[arg(long, value_enum, default_value_t)]
    by: disk::By,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Name, id or id prefix of a running VM.
    pub(crate) vm: String,
    /// The branch to make [default: banger/<vm>]
    #[arg(long, conflicts_with = "patch")]
    pub(crate) branch: Option<String>,
    /// Replace the branch (or the patch file) if it exists.
    #[arg(long)]
    pub(crate) force: bool,
    /// The repository's directory in the guest [default: /root/<name of this repository>]
    #[arg(long, value_name = "GUEST_DIR")]
    pub(crate) path: Option<String>,
    /// Write the guest's uncommitted changes (against its HEAD, untracked files included) to
    /// FILE as a git patch instead; apply it with `git apply FILE`.
    #[arg(long, value_name = "FILE")]
    pub(crate) patch: Option<PathBuf>,
    /// The most the guest may send, e.g. 4G [default: 1G]; a larger export is refused before
    /// anything is written.
    #[arg(long, value_name = "SIZE", value_parser = super::parse_size)]
    pub(crate) max_size: Option<u64>,
    /// Print what was exported as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// What an import did, for `--json` and for the summary line.
#[derive(Debug, Serialize)]
pub struct ImportReport {
    vm: String,
    host_path: String,
    guest_dir: String,
    entries: u64,
    bytes: u64,
    elapsed_ms: u64,
    /// Millions of bytes of file contents per second, over the whole stream.
    mb_per_s: f64,
    /// `tar` or `disk` (an attached file system image).
    method: disk::Method,
    skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
struct Skipped {
    path: String,
    why: String,
}

pub async fn run(client: &Client, command: WorkspaceCommand) -> anyhow::Result<ExitCode> {
    match command {
        WorkspaceCommand::Prepare(a) => {
            let repo = discover(a.path.as_deref())?;
            client.ensure_daemon().await?;
            // On Ctrl-C the import is dropped, which removes its scratch files (and the daemon
            // frees a slot whose stream broke) before the process ends.
            let report = tokio::select! {
                report = import_by(client, &a.vm, &repo, a.by) => report?,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("interrupted; the import into {} did not finish", a.vm);
                    return Ok(ExitCode::from(130));
                }
            };
            if a.json {
                output::json(&report)?;
            } else {
                println!("{}", report.guest_dir);
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkspaceCommand::Export(a) => export(client, a).await,
    }
}

/// The repository at `path` (default: the current directory).
pub fn discover(path: Option<&Path>) -> anyhow::Result<Repo> {
    Ok(Repo::discover(path.unwrap_or(Path::new(".")))?)
}

/// Imports `repo` into running VM `vm`, with progress and warnings on stderr.
pub async fn import(client: &Client, vm: &str, repo: &Repo) -> anyhow::Result<ImportReport> {
    import_by(client, vm, repo, disk::By::Auto).await
}

/// [`import`], going in as `by` says.
pub async fn import_by(client: &Client, vm: &str, repo: &Repo, by: disk::By) -> anyhow::Result<ImportReport> {
    let dir = repo.guest_dir();
    let files = tarball::list_files(repo)?;
    eprintln!("workspace: importing {} into {vm}:{dir}", repo.top.display());
    let started = Instant::now();
    let (done, stats, method) = disk::import(client, vm, repo.top.clone(), files, &dir, by).await?;
    let elapsed = started.elapsed();
    for (path, why) in &stats.skipped {
        eprintln!("warning: workspace: left out {}: {why}", path.display());
    }
    let report = ImportReport {
        vm: done.vm,
        host_path: repo.top.display().to_string(),
        guest_dir: done.dir,
        entries: done.entries,
        bytes: done.bytes,
        elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        mb_per_s: done.bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-3),
        method,
        skipped: stats
            .skipped
            .iter()
            .map(|(p, why)| Skipped { path: p.display().to_string(), why: why.clone() })
            .collect(),
    };
    eprintln!(
        "workspace: {} entries, {:.1} MB in {} ({:.1} MB/s)",
        report.entries,
        report.bytes as f64 / 1e6,
        banger_core::time::human_duration(Duration::from_millis(report.elapsed_ms)),
        report.mb_per_s
    );
    Ok(report)
}

/// What an export did, for `--json` and for `banger mcp`.
#[derive(Debug, Serialize)]
pub(crate) struct ExportReport {
    vm: String,
    guest_dir: String,
    bytes: u64,
    branch: Option<String>,
    commit: Option<String>,
    patch: Option<String>,
}

async fn export(client: &Client, a: ExportArgs) -> anyhow::Result<ExitCode> {
    let repo = discover(None)?;
    let json = a.json;
    let report = export_from(client, &repo, a).await?;
    if json {
        output::json(&report)?;
    } else {
        println!("{}", report.branch.as_deref().or(report.patch.as_deref()).unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

/// Exports from `a.vm` into `repo` (a branch, or a patch file with `a.patch`), with progress
/// on stderr; what was exported.
pub(crate) async fn export_from(client: &Client, repo: &Repo, a: ExportArgs) -> anyhow::Result<ExportReport> {
    let dir = a.path.clone().unwrap_or_else(|| repo.guest_dir());
    if !valid_guest_dir(&dir) {
        bail!("guest directory '{dir}' must be an absolute path without '.' or '..' components (e.g. /root/myrepo)");
    }
    // Refuse what can be refused before asking the guest for anything.
    let branch = a.branch.clone().unwrap_or_else(|| format!("banger/{}", a.vm));
    match &a.patch {
        None => bring_back::check_branch(repo, &branch, a.force)?,
        Some(file) if !a.force && file.symlink_metadata().is_ok() => {
            bail!("{} already exists; pass --force to replace it", file.display())
        }
        Some(_) => {}
    }
    client.ensure_daemon().await?;
    let kind = if a.patch.is_some() { ExportKind::Patch } else { ExportKind::Bundle };
    let basis = if kind == ExportKind::Bundle { repo.head()? } else { None };
    let max_bytes = a.max_size.map_or(DEFAULT_EXPORT_MAX_BYTES, |mib| mib.saturating_mul(1024 * 1024));
    let q = WorkspaceExportQuery { dir: dir.clone(), kind, basis, max_bytes: Some(max_bytes) };
    let mut temp =
        tempfile::Builder::new().prefix("banger-export-").tempfile().context("cannot make a temporary file")?;
    let done = stream::export(client, &a.vm, &q, temp.as_file_mut()).await?;
    let mut report = ExportReport {
        vm: done.vm.clone(),
        guest_dir: done.dir,
        bytes: done.bytes,
        branch: None,
        commit: None,
        patch: None,
    };
    match a.patch {
        Some(file) => {
            let patch = std::fs::read(temp.path()).context("cannot read the received patch")?;
            let summary = patch::check_patch(&patch)?;
            write_patch(&file, &patch, a.force)?;
            if summary.files == 0 {
                eprintln!("workspace: no uncommitted changes in {}:{dir}; {} is empty", done.vm, file.display());
            } else {
                eprintln!("workspace: {} changed files from {}:{dir} in {}", summary.files, done.vm, file.display());
            }
            report.patch = Some(file.display().to_string());
        }
        None => {
            let commit = bring_back::fetch_bundle(repo, temp.path(), &branch, a.force)?;
            let count = match &q.basis {
                Some(basis) => repo.git(&["rev-list", "--count", &format!("{basis}..{commit}")]).ok(),
                None => repo.git(&["rev-list", "--count", &commit]).ok(),
            };
            let count = count.map(|c| String::from_utf8_lossy(&c).trim().to_owned()).unwrap_or_else(|| "?".into());
            eprintln!(
                "workspace: branch {branch} is at {} ({count} new commits from {}:{dir})",
                &commit[..commit.len().min(12)],
                done.vm
            );
            report.branch = Some(branch);
            report.commit = Some(commit);
        }
    }
    Ok(report)
}

/// Writes the checked patch to `file` through a temporary file beside it.
fn write_patch(file: &Path, patch: &[u8], force: bool) -> anyhow::Result<()> {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".banger-patch-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    std::io::Write::write_all(&mut temp, patch).context("cannot write the patch")?;
    let persisted = if force { temp.persist(file) } else { temp.persist_noclobber(file) };
    persisted.map(drop).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!("{} already exists; pass --force to replace it", file.display())
        } else {
            anyhow::Error::new(e.error).context(format!("cannot write {}", file.display()))
        }
    })
}

/// For `vm create` and `vm run`: the repository to import, found before anything is created.
pub fn prepare_flag(flag: Option<&Path>) -> anyhow::Result<Option<Repo>> {
    flag.map(|p| discover(Some(p))).transpose()
}

/// For `vm create`: imports `repo` into the new (running) VM, saying what to do if it fails.
pub async fn import_into_new(client: &Client, vm: &str, repo: &Repo) -> anyhow::Result<ImportReport> {
    import(client, vm, repo).await.with_context(|| {
        format!(
            "vm {vm} runs, but the workspace import failed; retry with `banger workspace prepare {vm} {}`",
            repo.top.display()
        )
    })
}
