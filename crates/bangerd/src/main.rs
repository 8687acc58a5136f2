//! `bangerd`: banger's daemon. Serves the HTTP/JSON API on a unix socket, keeps durable state in
//! SQLite under the state directory, and refuses to run twice for one state directory.

mod agent_conn;
mod api;
mod artifacts;
mod config;
mod daemon;
mod disks;
mod dns;
mod doctor;
mod error;
mod exec;
mod forward;
mod handles;
mod lifecycle;
mod locks;
mod net;
mod ops;
mod session_stream;
mod sessions;
mod snapshots;
mod ssh;
mod tunnel;
mod vms;
mod workspace;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use banger_host::{lockfile, paths::ensure_dir, Layout};
use clap::Parser;
use tokio::net::UnixListener;
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

fn run(args: Args) -> anyhow::Result<()> {
    let layout = Layout::resolve(args.state_dir, args.socket);
    prepare_state_dir(&layout.state_dir)?;
    let lock = lockfile::acquire(&layout.lock_file(), &layout.state_dir)?;
    let (config, config_source) = config::load(&layout.config_candidates())?;
    let _log_guard = init_logging(&layout, &config.log_level, !args.detached)?;
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
    let daemon = daemon::Daemon::new(layout, config, config_source, store, host, choice);
    let report = daemon.handles.reconcile(&daemon.store)?;
    let adopted: Vec<&str> = report.adopted.iter().map(|(vm, _)| vm.name.as_str()).collect();
    tracing::info!(?adopted, reaped = ?report.reaped, "reconciled vms with the host");
    daemon.ops.prune(Duration::from_secs(daemon.config.operation_retention_secs));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("bangerd")
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(async {
        let in_use: std::collections::BTreeSet<String> = report
            .adopted
            .iter()
            .filter(|(vm, _)| vm.spec.network)
            .filter_map(|(vm, _)| daemon.handles.get(vm).and_then(|h| h.tap))
            .collect();
        let networked = report.adopted.iter().any(|(vm, _)| vm.spec.network);
        for (vm, pid) in report.adopted {
            daemon.activate_forwards(&vm).await;
            daemon.spawn_monitor(vm, pid);
        }
        if networked {
            // Running guests need their rules and names back before anything else happens.
            match daemon.net.ensure_up(&in_use).await {
                Ok(()) => daemon.sync_net().await,
                Err(e) => tracing::error!(error = %banger_core::error_chain(&e), "cannot restore the guest network"),
            }
        }
        let served = serve(daemon.clone()).await;
        let running = daemon.store.list_vms().map(|vms| vms.iter().any(|vm| daemon.handles.alive(vm))).unwrap_or(true);
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

fn init_logging(
    layout: &Layout,
    level: &str,
    to_stderr: bool,
) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    let log_path = layout.log_file();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
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

async fn serve(daemon: Arc<daemon::Daemon>) -> anyhow::Result<()> {
    let socket = daemon.layout.socket.clone();
    let listener = bind_socket(&socket, &daemon.config.socket_group)?;
    tracing::info!(socket = %socket.display(), "serving the api");

    let pruner = {
        let d = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                d.ops.prune(Duration::from_secs(d.config.operation_retention_secs));
            }
        })
    };

    let shutdown = {
        let d = daemon.clone();
        async move {
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
                () = d.shutdown.notified() => {}
            }
        }
    };
    let served = axum::serve(listener, api::router(daemon.clone())).with_graceful_shutdown(shutdown).await;
    pruner.abort();
    // Only the socket we bound is ours to remove.
    let _ = std::fs::remove_file(&socket);
    served.context("api server failed")
}

/// Binds the API socket. We hold the state dir's lock, so a socket file already there was left
/// by a daemon that died: remove it.
fn bind_socket(socket: &Path, group: &str) -> anyhow::Result<UnixListener> {
    if let Some(parent) = socket.parent() {
        ensure_dir(parent, 0o755).with_context(|| format!("cannot create socket directory {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            tracing::warn!(socket = %socket.display(), "removing stale socket left by a previous daemon");
            std::fs::remove_file(socket).with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket; remove it or pass another --socket", socket.display()),
        Err(_) => {}
    }
    // Bind with a tight umask so the socket is never briefly open to others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("cannot bind {}", socket.display()))?;
    let mode = if group.is_empty() {
        0o600
    } else {
        let gid = nix::unistd::Group::from_name(group)
            .context("cannot look up socket_group")?
            .with_context(|| {
                format!("socket_group '{group}' does not exist; create it or clear socket_group in config.toml")
            })?
            .gid;
        nix::unistd::chown(socket, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", socket.display()))?;
        0o660
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode on {}", socket.display()))?;
    Ok(listener)
}
