//! `bangerd`: banger's daemon. Serves the HTTP/JSON API on a unix socket, keeps durable state in
//! SQLite under the state directory, and refuses to run twice for one state directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use banger_core::Layout;
use banger_host::{lockfile, paths::ensure_dir};
use bangerd::daemon::Daemon;
use bangerd::services::Fleet;
use bangerd::{config, http};
use clap::Parser;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// banger's daemon: keeps VMs, images and operations, and serves the API on a unix socket.
/// The `banger` CLI starts it on demand; run it by hand to watch its logs.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// State directory (database, VMs, images, log). Default: /var/lib/banger as root,
    /// $XDG_DATA_HOME/banger otherwise.
    #[arg(long, env = "BANGER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// API socket. Default: /run/banger/bangerd.sock as root, $XDG_RUNTIME_DIR/banger/bangerd.sock
    /// otherwise.
    #[arg(long, env = "BANGER_SOCKET")]
    socket: Option<PathBuf>,
    /// Log to the log file only, not to stderr (used when the CLI starts the daemon).
    #[arg(long)]
    detached: bool,
    /// VMM for new VMs that do not choose one: auto, qemu or firecracker [default: the config's `vmm`]
    #[arg(long, env = "BANGER_VMM")]
    vmm: Option<banger_vmm::VmmChoice>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            tracing::error!(error = %chain.join(": "), "bangerd failed");
            eprintln!("bangerd: {}", chain.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// How long a start waits for a killed daemon's last threads to let go of the state dir's lock.
const LOCK_GRACE: Duration = Duration::from_secs(10);

fn run(args: Args) -> anyhow::Result<()> {
    let layout = Layout::resolve(args.state_dir, args.socket);
    prepare_state_dir(&layout.state_dir)?;
    let lock = lockfile::acquire_waiting(&layout.lock_file(), &layout.state_dir, LOCK_GRACE)?;
    let (config, config_source) = config::load(&layout.config_candidates())?;
    let tightened = restrict_state(&layout, !config.socket_group.is_empty())?;
    let _log_guard = init_logging(&layout, &config.log_level, !args.detached)?;
    for (path, old, new) in tightened {
        tracing::warn!(path = %path.display(), old = format!("{old:o}"), new = format!("{new:o}"),
            "tightened permissions: the state dir is private to the daemon's user");
    }
    tracing::info!(state_dir = %layout.state_dir.display(), socket = %layout.socket.display(),
        config = ?config_source, pid = std::process::id(), "bangerd starting");

    let store = banger_store::Store::open(&layout.db())?;
    let interrupted = store.interrupt_running_operations(&banger_core::time::now_rfc3339())?;
    if interrupted > 0 {
        tracing::warn!(interrupted, "operations cut short by the previous daemon marked interrupted");
    }
    let choice = args.vmm.unwrap_or(config.vmm);
    let host = banger_vmm::HostFacts::probe_for(&config);
    let selection = banger_vmm::select(choice, &host)
        .context("cannot select a vmm; set `vmm = \"auto\"` in config.toml or pass --vmm qemu")?;
    tracing::info!(vmm = %selection.kind, accel = %selection.accel, tsc_khz = ?selection.tsc_khz, "default vmm selected");
    let daemon = Daemon::new(Fleet::new(layout, config, store, host, choice), config_source);
    let swept = bangerd::services::recovery::sweep(&daemon.fleet).context("cannot recover from the last run")?;
    tracing::info!(?swept, "swept what the last run left half-done");
    let report = daemon.lifecycle.reconcile()?;
    let adopted: Vec<&str> = report.adopted.iter().map(|(vm, _)| vm.name.as_str()).collect();
    tracing::info!(?adopted, reaped = ?report.reaped, orphans = ?report.orphans, "reconciled vms with the host");
    daemon.fleet.ops.prune(Duration::from_secs(daemon.fleet.config.operation_retention_secs));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("bangerd")
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(async {
        daemon.lifecycle.adopt(report.adopted).await;
        let pruner = {
            let d = daemon.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    d.fleet.ops.prune(Duration::from_secs(d.fleet.config.operation_retention_secs));
                }
            })
        };
        let served = http::serve(daemon.clone(), shutdown_signal(daemon.clone())).await.context("api server failed");
        pruner.abort();
        let running =
            daemon.fleet.store.list_vms().map(|vms| vms.iter().any(|vm| daemon.fleet.alive(vm))).unwrap_or(true);
        daemon.net.shutdown(running).await;
        served
    });
    tracing::info!("bangerd stopped");
    drop(lock);
    served
}

fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    ensure_dir(dir, 0o700).with_context(|| {
        format!("cannot create state dir {}; pass a writable --state-dir (or BANGER_STATE_DIR)", dir.display())
    })?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| {
        format!("state dir {} is not writable; fix its permissions or pass another --state-dir", dir.display())
    })?;
    let _ = std::fs::remove_file(probe);
    ensure_dir(&dir.join("vms"), 0o700).context("cannot create the vms directory")?;
    Ok(())
}

/// Makes the state dir private before anything is written into it: the owner only (with
/// `socket_group`, the group may also pass through it, as docs/ssh.md asks), and the database and
/// log 0600 whatever the umask was when they were made. Returns what it changed.
fn restrict_state(layout: &Layout, group: bool) -> anyhow::Result<Vec<(PathBuf, u32, u32)>> {
    use banger_host::paths::restrict_mode;
    let dir_keep = if group { 0o750 } else { 0o700 };
    let db = layout.db();
    let mut paths = vec![(layout.state_dir.clone(), dir_keep), (layout.log_file(), 0o600)];
    for suffix in ["", "-wal", "-shm"] {
        paths.push((PathBuf::from(format!("{}{suffix}", db.display())), 0o600));
    }
    let mut changed = Vec::new();
    for (path, keep) in paths {
        let done = restrict_mode(&path, keep)
            .with_context(|| format!("cannot make {} private; fix its owner or mode", path.display()))?;
        if let Some((old, new)) = done {
            changed.push((path, old, new));
        }
    }
    // A database made from here on is private from its first byte (SQLite gives its -wal and
    // -shm files the database's mode).
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&db)
        .with_context(|| format!("cannot create the database {}", db.display()))?;
    Ok(changed)
}

fn init_logging(
    layout: &Layout,
    level: &str,
    to_stderr: bool,
) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let log_path = layout.log_file();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot open log file {}", log_path.display()))?;
    let (writer, guard) = tracing_appender::non_blocking(file);
    let filter = || {
        EnvFilter::try_from_env("BANGER_LOG")
            .unwrap_or_else(|_| EnvFilter::new(format!("{level},hickory_server=warn,hickory_proto=warn")))
    };
    let file_layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false).with_filter(filter());
    let stderr_layer =
        to_stderr.then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter()));
    tracing_subscriber::registry().with(file_layer).with(stderr_layer).try_init().context("cannot set up logging")?;
    Ok(guard)
}

/// Resolves on SIGTERM, SIGINT or a shutdown asked for over the API.
async fn shutdown_signal(daemon: std::sync::Arc<Daemon>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        () = daemon.shutdown.notified() => {}
    }
}
