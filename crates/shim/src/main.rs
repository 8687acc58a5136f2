//! `containerd-shim-banger-v2`: banger as a containerd runtime (`io.containerd.banger.v2`).
//! containerd starts it (as root) per task; it serves the shim v2 task API over ttrpc and runs
//! each task in a banger microVM through bangerd's API on its unix socket (`BANGER_SOCKET`).
//! It never runs a VMM itself. See docs/kubernetes.md.

mod client;
mod process;
mod rootfs;
mod service;
mod spec;

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{publisher::RemotePublisher, run, spawn, ExitSignal, Shim};
use containerd_shim::{api::DeleteResponse, Config, Error, Flags, StartOpts};

/// The runtime's name in containerd.
const RUNTIME: &str = "io.containerd.banger.v2";

struct BangerShim {
    namespace: String,
    bundle: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for BangerShim {
    type T = service::Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self { namespace: args.namespace.clone(), bundle: args.bundle.clone(), exit: Arc::default() }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // Not reached: `main` answers the start action itself.
        let grouping = opts.id.clone();
        spawn(opts, &grouping, Vec::new()).await
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // containerd runs this in the bundle when the shim is gone: remove the VM it left.
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?
        } else {
            self.bundle.clone().into()
        };
        if let Err(e) = service::cleanup_bundle(&bundle).await {
            log::warn!("cleanup of {}: {e}", bundle.display());
            return Err(Error::Other(e));
        }
        let mut resp = DeleteResponse::new();
        resp.exit_status = 137;
        resp.exited_at = containerd_shim::protos::protobuf::MessageField::some(std::time::SystemTime::now().into());
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(&self.namespace, publisher, self.exit.clone())
    }
}

/// The `start` action, answered here: containerd before 1.7 reads the answer as a plain
/// address, and containerd-shim 0.12 answers legacy callers in the JSON form of 1.7+ (which
/// 1.6 fails to dial). A plain address suits every legacy caller; containerd 2.3+'s bootstrap
/// protocol (its parameters on stdin) gets its protobuf answer.
async fn start(flags: &Flags) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use containerd_shim::bootstrap::{BootstrapParams, BootstrapResult};
    use containerd_shim::protos::protobuf::Message as _;
    use std::io::{Read as _, Write as _};
    let mut input = Vec::new();
    std::io::stdin().take(10 << 20).read_to_end(&mut input).context("cannot read the start parameters")?;
    let bootstrap = BootstrapParams::parse_from_bytes(&input)
        .ok()
        .filter(|p| !input.is_empty() && p.instance_id == flags.id && p.namespace == flags.namespace);
    let opts = match &bootstrap {
        Some(params) => StartOpts::from(params.clone()),
        None => StartOpts {
            id: flags.id.clone(),
            publish_binary: flags.publish_binary.clone(),
            address: flags.address.clone(),
            ttrpc_address: std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?,
            namespace: flags.namespace.clone(),
            debug: flags.debug,
            ..Default::default()
        },
    };
    // One shim process per task, or per pod: a pod's containers go to the shim of its sandbox
    // (the sandbox id groups them, as Kata's and runc's v2 shims do), which runs them in the
    // pod's VM.
    let grouping = match spec::read_role(std::path::Path::new(".")) {
        Ok(spec::Role::PodContainer(sandbox)) => sandbox,
        _ => opts.id.clone(),
    };
    let address = match running_shim(&opts.socket_address(&grouping)) {
        Some(address) => address,
        None => spawn(opts, &grouping, Vec::new()).await.context("cannot start the shim server")?,
    };
    // containerd (1.6) finds a running shim again after its own restart by this file in the
    // bundle, our working directory.
    std::fs::write("address", &address).context("cannot write the bundle's address file")?;
    let answer = match bootstrap {
        Some(_) => BootstrapResult {
            version: containerd_shim::protos::TASK_API_VERSION,
            address,
            protocol: "ttrpc".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .context("cannot encode the start answer")?,
        None => address.into_bytes(),
    };
    let mut stdout = std::io::stdout();
    stdout.write_all(&answer).and_then(|()| stdout.flush()).context("cannot answer containerd")?;
    Ok(())
}

/// `address` when a shim serves there already (the pod's, for one of its containers).
fn running_shim(address: &str) -> Option<String> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    std::os::unix::net::UnixStream::connect(path).ok().map(|_| address.to_owned())
}

/// The task service's ttrpc name in containerd 1.6 and 1.7; 2.x calls the same messages v3.
const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";

/// The shim server: the task service under both its names on `flags.socket`, until
/// `Shutdown` (no tasks left), SIGTERM or SIGINT. Served here rather than by the crate's `run`,
/// which registers only the v3 name that containerd 1.6 does not call.
async fn serve(flags: &Flags) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use containerd_shim::protos::shim_async::create_task;
    use containerd_shim::protos::ttrpc::r#async::Server;
    if let Err(e) = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id) {
        eprintln!("{RUNTIME}: no log fifo: {e}");
    }
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address).await.context("cannot reach containerd's event service")?;
    let exit = Arc::new(ExitSignal::default());
    let service: Arc<dyn containerd_shim::protos::shim_async::Task + Send + Sync> =
        Arc::new(service::Service::new(&flags.namespace, publisher, exit.clone()));
    let mut services = create_task(service.clone());
    if let Some(v2) = create_task(service).remove(TASK_V3) {
        services.insert(TASK_V2.to_owned(), v2);
    }
    let path = flags.socket.strip_prefix("unix://").unwrap_or(&flags.socket);
    // A socket left by a shim of this task that died: containerd started us in its place.
    let _ = std::fs::remove_file(path);
    // Its directory (`/run/containerd/s`) exists only once some shim made it: on a host whose
    // containerd never ran another runtime's shim, this one is the first.
    if let Some(dir) = std::path::Path::new(path).parent() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot make the shim socket's directory {}", dir.display()))?;
    }
    let mut server = Server::new().bind(&flags.socket).context("cannot listen on the shim socket")?;
    server = server.register_service(services);
    server.start().await.context("cannot start the ttrpc server")?;
    // The start action reads our stdout until it closes: point it at stderr.
    // SAFETY: dup2 on the process's own standard descriptors; no Rust object owns fd 1.
    if unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
        log::warn!("cannot close stdout: {}", std::io::Error::last_os_error());
    }
    log::info!("shim serving on {}", flags.socket);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = exit.wait() => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(path);
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    if let Ok(flags) = containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        let served = match flags.action.as_str() {
            "start" => Some(start(&flags).await),
            "" if !flags.socket.is_empty() && !flags.info && !flags.version => Some(serve(&flags).await),
            _ => None,
        };
        if let Some(result) = served {
            return match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{RUNTIME}: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
    }
    // `delete`, `-info`, `-v`: the crate's bootstrap.
    run::<BangerShim>(RUNTIME, None).await;
    std::process::ExitCode::SUCCESS
}
