//! The Firecracker driver: starts `firecracker` (or the jailer) with its API socket, configures
//! the VM over the API ([`api`]), boots it, and stops, pauses, snapshots and restores it.
//!
//! Launch: stale API and vsock sockets are removed (a stale API socket stops Firecracker from
//! starting, a stale vsock one fails `PUT /vsock` with "Address in use"); Firecracker starts in
//! its own session; once `GET /` answers, banger sends, in order: `PUT /logger`, `PUT /metrics`,
//! `PUT /serial` (the console log), `PUT /machine-config`, `PUT /boot-source` (the ELF
//! `vmlinux`, the initramfs, the command line), `PUT /drives/driveN` per disk in guest order,
//! `PUT /network-interfaces/eth0` (the VM's TAP, which must exist: Firecracker would make a
//! missing one), `PUT /vsock` (the hybrid socket at the agent socket path), and
//! `PUT /actions InstanceStart`. A refused call ends the launch with Firecracker's
//! `fault_message`; the VMM is killed.
//!
//! The agent is reached through the hybrid vsock socket ([`crate::AgentEndpoint::HybridVsock`]).
//! Stopping: the daemon asks the agent first; [`Vmm::quit`] sends Ctrl-Alt-Del (the guest kernel
//! reboots, and `reboot=k` makes Firecracker exit), then the default [`Vmm::stop`] kills. Guests
//! get `banger.poweroff=reboot` because Firecracker has no power-off device: the agent reboots
//! instead. Why Firecracker stopped is read from its log ([`logs`]), not from its exit status.

pub mod api;
pub mod jailer;
pub mod logs;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use banger_core::config::VmmKind;
use banger_core::Config;
use serde::Serialize;
use serde_json::Value;

use self::api::{ActionType, ApiClient, ApiError};
use self::jailer::{Jail, JailError, JailFs, JailLink, JailerOptions, LinuxJailFs};
use self::logs::ExitCause;
use crate::process::{self, Children, StatsError, VmmStats};
use crate::spec::LaunchSpec;
use crate::{AgentEndpoint, ControlError, LaunchError, Launched, Vmm, VmmFuture};

/// The Firecracker binary banger runs by default.
pub const FIRECRACKER_BINARY: &str = "firecracker";
/// The jailer binary banger runs by default.
pub const JAILER_BINARY: &str = "jailer";
/// Firecracker's log in the VM directory.
pub const LOG_FILE: &str = "firecracker.log";
/// Firecracker's metrics file in the VM directory.
pub const METRICS_FILE: &str = "firecracker.metrics";
/// The guest's vsock context id.
pub const GUEST_CID: u32 = 3;
/// The guest's network interface id.
pub const IFACE_ID: &str = "eth0";
/// The snapshot's VM state file in a snapshot directory.
pub const SNAPSHOT_STATE_FILE: &str = "vmstate";
/// The snapshot's guest memory file in a snapshot directory.
pub const SNAPSHOT_MEMORY_FILE: &str = "memory";

/// Kernel parameters every Firecracker guest gets before the spec's own. `reboot=k` and
/// `panic=1` make a guest reboot or panic end Firecracker (through the i8042 reset line);
/// `banger.poweroff=reboot` tells the agent to reboot instead of powering off.
pub const BASE_KERNEL_ARGS: &[&str] = &[
    "console=ttyS0",
    "reboot=k",
    "panic=1",
    "pci=off",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.dumbkbd",
    "quiet",
    "banger.poweroff=reboot",
];

/// How many stderr or log lines an error quotes.
const TAIL_LINES: usize = 15;

/// Why the Firecracker driver failed.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    /// The Firecracker binary is missing.
    #[error(
        "firecracker binary {} not found; install a firecracker release binary (v1.16) on PATH or set \
         `firecracker_bin` in config.toml, or use --vmm qemu",
        binary.display()
    )]
    NotFound {
        /// What was looked for.
        binary: PathBuf,
    },
    /// The jailer binary is missing.
    #[error(
        "jailer binary {} not found; install the jailer of the same firecracker release or set `jailer_bin`, \
         or set `firecracker_jailer = false` in config.toml",
        binary.display()
    )]
    JailerNotFound {
        /// What was looked for.
        binary: PathBuf,
    },
    /// The kernel has no ELF image.
    #[error("firecracker boots an ELF vmlinux and this kernel has none; re-pull it with `banger kernel pull`")]
    NoElfKernel,
    /// The VM's TAP device does not exist.
    #[error("tap device {tap} does not exist; restart the vm so banger sets its network up again")]
    NoTap {
        /// The TAP.
        tap: String,
    },
    /// Firecracker refused a configuration call.
    #[error("firecracker refused {call}: {fault_message}; its log ends with:\n{log}")]
    Refused {
        /// `PUT /path`.
        call: String,
        /// Firecracker's `fault_message`.
        fault_message: String,
        /// The end of Firecracker's log.
        log: String,
    },
    /// Firecracker refused to boot the VM.
    #[error(
        "firecracker refused to start the vm: {fault_message}; check that the kernel is an ELF vmlinux with \
         a PVH note and that the disks are raw images; its log ends with:\n{log}"
    )]
    StartRefused {
        /// Firecracker's `fault_message`.
        fault_message: String,
        /// The end of Firecracker's log.
        log: String,
    },
    /// The guest faulted or the VMM stopped while the VM was being started.
    #[error("{}; firecracker's log ends with:\n{log}", cause.describe())]
    Stopped {
        /// What the log says.
        cause: ExitCause,
        /// The end of Firecracker's log.
        log: String,
    },
    /// An API call failed below HTTP (socket, timeout, garbage).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The jail could not be made.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// A file the driver writes could not be.
    #[error("cannot write {}; check the vm dir's permissions", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Snapshots with the jailer are not wired up.
    #[error("snapshots of jailed firecracker vms are not supported; set `firecracker_jailer = false` to use them")]
    SnapshotInJail,
}

/// How the driver runs Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerOptions {
    /// The binary (a path, or a name on `PATH`).
    pub binary: PathBuf,
    /// Run it under the jailer.
    pub jailer: Option<JailerOptions>,
    /// How long Firecracker has to answer on its API socket after it starts.
    pub ready_timeout: Duration,
    /// How long one API call may take.
    pub api_timeout: Duration,
}

impl Default for FirecrackerOptions {
    fn default() -> Self {
        Self {
            binary: FIRECRACKER_BINARY.into(),
            jailer: None,
            ready_timeout: Duration::from_secs(10),
            api_timeout: api::DEFAULT_API_TIMEOUT,
        }
    }
}

impl FirecrackerOptions {
    /// The options `config` asks for (`firecracker_bin`, `firecracker_jailer`, `jailer_*`).
    pub fn from_config(config: &Config) -> Self {
        let jailer = config.firecracker_jailer.then(|| JailerOptions {
            binary: config.jailer_bin.clone().into(),
            uid: config.jailer_uid,
            gid: config.jailer_gid,
            chroot_base: config.jailer_chroot_base.clone().into(),
            cgroup_version: config.jailer_cgroup_version,
            cgroups: config.jailer_cgroups.clone(),
        });
        Self { binary: config.firecracker_bin.clone().into(), jailer, ..Self::default() }
    }
}

/// The files of a Firecracker snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotFiles {
    /// The VM state (`<dir>/vmstate`).
    pub state: PathBuf,
    /// The guest memory (`<dir>/memory`).
    pub memory: PathBuf,
}

impl SnapshotFiles {
    /// The files of a snapshot in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self { state: dir.join(SNAPSHOT_STATE_FILE), memory: dir.join(SNAPSHOT_MEMORY_FILE) }
    }

    /// The files of the snapshot whose state file is `state` (the memory beside it, see
    /// [`crate::snapshot_memory_file`]): the layout the [`Vmm`] trait's snapshots use.
    pub fn for_state(state: &Path) -> Self {
        Self { state: state.to_owned(), memory: crate::snapshot_memory_file(state) }
    }
}

/// One configuration call: `PUT path` with `body`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCall {
    /// The path (`/drives/drive0`).
    pub path: String,
    /// The JSON body.
    pub body: Value,
}

impl ApiCall {
    fn new(path: impl Into<String>, body: &impl Serialize) -> Self {
        Self { path: path.into(), body: serde_json::to_value(body).unwrap_or(Value::Null) }
    }
}

/// The paths Firecracker is given, in its own view (inside the jail when there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    kernel: PathBuf,
    initrd: PathBuf,
    drives: Vec<PathBuf>,
    console: PathBuf,
    log: PathBuf,
    metrics: PathBuf,
    vsock: PathBuf,
}

/// A started Firecracker whose API answers.
struct Started {
    pid: u32,
    client: ApiClient,
}

/// The Firecracker driver.
pub struct FirecrackerDriver {
    options: FirecrackerOptions,
    children: Children,
    jail_fs: Arc<dyn JailFs>,
}

impl std::fmt::Debug for FirecrackerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirecrackerDriver").field("options", &self.options).finish_non_exhaustive()
    }
}

impl Default for FirecrackerDriver {
    fn default() -> Self {
        Self::new(FirecrackerOptions::default())
    }
}

/// The path as a string for a JSON body (paths banger makes are UTF-8).
fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl FirecrackerDriver {
    /// A driver with `options`.
    pub fn new(options: FirecrackerOptions) -> Self {
        Self { options, children: Children::default(), jail_fs: Arc::new(LinuxJailFs) }
    }

    /// Runs `binary` (a name on `PATH`, or a path) as Firecracker.
    pub fn with_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.options.binary = binary.into();
        self
    }

    /// How long Firecracker has to answer on its API socket after it starts.
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.options.ready_timeout = timeout;
        self
    }

    /// Makes jails through `fs` (a fake in tests).
    pub fn with_jail_fs(mut self, fs: Arc<dyn JailFs>) -> Self {
        self.jail_fs = fs;
        self
    }

    /// The options in force.
    pub fn options(&self) -> &FirecrackerOptions {
        &self.options
    }

    /// The kernel command line for a guest with the `extra` parameters.
    pub fn kernel_cmdline(&self, extra: &[String]) -> String {
        let base = BASE_KERNEL_ARGS.iter().map(|arg| (*arg).to_owned());
        base.chain(extra.iter().cloned()).collect::<Vec<_>>().join(" ")
    }

    /// Firecracker's own arguments (without the program name) for `spec`.
    pub fn firecracker_args(&self, spec: &LaunchSpec) -> Vec<OsString> {
        vec!["--api-sock".into(), spec.control_socket.clone().into(), "--id".into(), spec.vm_id.clone().into()]
    }

    /// The jail of `spec`'s VM when the options ask for the jailer.
    fn jail(&self, spec: &LaunchSpec, exec_file: &Path) -> Result<Option<(Jail, &JailerOptions)>, JailError> {
        let Some(options) = &self.options.jailer else { return Ok(None) };
        Ok(Some((Jail::new(options, exec_file, &spec.vm_id, &spec.vm_dir)?, options)))
    }

    /// The paths Firecracker is given, and the files to link into the jail when there is one.
    fn view(spec: &LaunchSpec, kernel: &Path, jail: Option<&Jail>) -> (View, Vec<JailLink>) {
        let log = spec.vm_dir.join(LOG_FILE);
        let metrics = spec.vm_dir.join(METRICS_FILE);
        let Some(jail) = jail else {
            // Firecracker runs in the VM dir: the VM's own disks are named relative to it, so a
            // snapshot (which records drive paths) restores in another VM dir onto that VM's
            // copies. Shared disks (the base image) keep their absolute path.
            let drive = |path: &PathBuf| path.strip_prefix(&spec.vm_dir).map_or_else(|_| path.clone(), Path::to_owned);
            let view = View {
                kernel: kernel.to_owned(),
                initrd: spec.initramfs.clone(),
                drives: spec.disks.iter().map(|d| drive(&d.path)).collect(),
                console: spec.console_log.clone(),
                log,
                metrics,
                vsock: spec.agent_socket.clone(),
            };
            return (view, Vec::new());
        };
        let mut links = vec![
            JailLink { host: kernel.to_owned(), name: "vmlinux".into(), writable: false },
            JailLink { host: spec.initramfs.clone(), name: "initrd".into(), writable: false },
        ];
        for (index, disk) in spec.disks.iter().enumerate() {
            links.push(JailLink { host: disk.path.clone(), name: format!("drive{index}"), writable: !disk.read_only });
        }
        for (host, name) in [(&spec.console_log, "console.log"), (&log, LOG_FILE), (&metrics, METRICS_FILE)] {
            links.push(JailLink { host: host.clone(), name: name.into(), writable: true });
        }
        let view = View {
            kernel: jail.fc_path("vmlinux"),
            initrd: jail.fc_path("initrd"),
            drives: (0..spec.disks.len()).map(|i| jail.fc_path(&format!("drive{i}"))).collect(),
            console: jail.fc_path("console.log"),
            log: jail.fc_path(LOG_FILE),
            metrics: jail.fc_path(METRICS_FILE),
            // Sockets keep their VM-dir path in Firecracker's view; the host's is a symlink.
            vsock: spec.agent_socket.clone(),
        };
        (view, links)
    }

    fn observability_calls(view: &View) -> Vec<ApiCall> {
        vec![
            ApiCall::new(
                "/logger",
                &api::Logger { log_path: text(&view.log), level: "Info", show_level: true, show_log_origin: false },
            ),
            ApiCall::new("/metrics", &api::Metrics { metrics_path: text(&view.metrics) }),
        ]
    }

    /// The configuration calls of a boot, in order (all `PUT`; `InstanceStart` follows).
    fn boot_calls(&self, spec: &LaunchSpec, view: &View) -> Vec<ApiCall> {
        let mut calls = Self::observability_calls(view);
        calls.push(ApiCall::new("/serial", &api::Serial { serial_out_path: text(&view.console) }));
        calls.push(ApiCall::new(
            "/machine-config",
            &api::MachineConfig { vcpu_count: spec.vcpus, mem_size_mib: spec.memory_mib, smt: false },
        ));
        calls.push(ApiCall::new(
            "/boot-source",
            &api::BootSource {
                kernel_image_path: text(&view.kernel),
                initrd_path: Some(text(&view.initrd)),
                boot_args: self.kernel_cmdline(&spec.kernel_args),
            },
        ));
        for (index, (disk, path)) in spec.disks.iter().zip(&view.drives).enumerate() {
            let drive_id = format!("drive{index}");
            calls.push(ApiCall::new(
                format!("/drives/{drive_id}"),
                &api::Drive {
                    drive_id: drive_id.clone(),
                    path_on_host: text(path),
                    is_root_device: false,
                    is_read_only: disk.read_only,
                    cache_type: "Writeback",
                },
            ));
        }
        if let Some(net) = &spec.net {
            calls.push(ApiCall::new(
                format!("/network-interfaces/{IFACE_ID}"),
                &api::NetworkInterface {
                    iface_id: IFACE_ID.into(),
                    host_dev_name: net.tap.clone(),
                    guest_mac: net.mac.clone(),
                },
            ));
        }
        calls.push(ApiCall::new("/vsock", &api::Vsock { guest_cid: GUEST_CID, uds_path: text(&view.vsock) }));
        calls
    }

    /// The configuration calls of a boot of `spec`, as the driver would send them (no jail).
    pub fn boot_plan(&self, spec: &LaunchSpec) -> Vec<ApiCall> {
        let kernel = spec.kernel_elf.clone().unwrap_or_else(|| spec.kernel.clone());
        self.boot_calls(spec, &Self::view(spec, &kernel, None).0)
    }

    /// Checks the inputs, clears stale files, makes the jail, starts Firecracker and waits for
    /// its API. `append_console`: keep the console log (a restore) and let Firecracker's stdout
    /// (where a restored serial console writes) go there.
    async fn start(&self, spec: &LaunchSpec, append_console: bool) -> Result<(Started, View), LaunchError> {
        spec.validate()?;
        let kernel = spec.kernel_elf.clone().ok_or(FirecrackerError::NoElfKernel)?;
        let binary = process::find_program(&self.options.binary)
            .ok_or_else(|| FirecrackerError::NotFound { binary: self.options.binary.clone() })?;
        let jailer_binary = match &self.options.jailer {
            Some(jailer) => Some(
                process::find_program(&jailer.binary)
                    .ok_or_else(|| FirecrackerError::JailerNotFound { binary: jailer.binary.clone() })?,
            ),
            None => None,
        };
        if !spec.vm_dir.is_dir() {
            return Err(LaunchError::MissingFile { what: "vm dir", path: spec.vm_dir.clone() });
        }
        if !append_console {
            let inputs = [("kernel", &kernel), ("initramfs", &spec.initramfs)];
            let disks = spec.disks.iter().map(|disk| ("disk", &disk.path));
            if let Some((what, path)) = inputs.into_iter().chain(disks).find(|(_, path)| !path.is_file()) {
                return Err(LaunchError::MissingFile { what, path: path.clone() });
            }
        }
        if let Some(net) = &spec.net {
            if !Path::new("/sys/class/net").join(&net.tap).exists() {
                return Err(FirecrackerError::NoTap { tap: net.tap.clone() }.into());
            }
        }
        // A stale API socket stops Firecracker from starting; a stale vsock socket fails
        // `PUT /vsock` with "Address in use"; a stale pidfile could name someone else.
        for stale in [&spec.control_socket, &spec.agent_socket, &spec.pidfile] {
            remove_stale(stale)?;
        }
        if let Some(jailer) = &self.options.jailer {
            jailer::remove_jail(&spec.vm_dir, &jailer.chroot_base, self.jail_fs.as_ref())
                .map_err(FirecrackerError::from)?;
        }
        let log = spec.vm_dir.join(LOG_FILE);
        let metrics = spec.vm_dir.join(METRICS_FILE);
        for path in [&log, &metrics] {
            File::create(path).map_err(|source| LaunchError::Prepare { path: path.clone(), source })?;
        }
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&spec.console_log)
            .and_then(|file| if append_console { Ok(file) } else { file.set_len(0).map(|()| file) })
            .map_err(|source| LaunchError::Prepare { path: spec.console_log.clone(), source })?;

        let jail = self.jail(spec, &binary).map_err(FirecrackerError::from)?;
        let (view, links) = Self::view(spec, &kernel, jail.as_ref().map(|(jail, _)| jail));
        if let Some((jail, options)) = &jail {
            let sockets = [spec.control_socket.clone(), spec.agent_socket.clone()];
            jail.prepare(options, &links, &sockets, self.jail_fs.as_ref()).map_err(FirecrackerError::from)?;
        }

        let stderr_path = spec.stderr_log();
        let stderr = crate::logfile::create_for_append(&stderr_path)
            .map_err(|source| LaunchError::Prepare { path: stderr_path.clone(), source })?;
        // Before `PUT /logger`, Firecracker logs to stdout: keep that with its stderr.
        let stdout = if append_console {
            console
        } else {
            stderr.try_clone().map_err(|source| LaunchError::Prepare { path: stderr_path.clone(), source })?
        };
        let fc_args = self.firecracker_args(spec);
        let (program, args) = match (&jail, jailer_binary) {
            (Some((jail, options)), Some(jailer)) => (jailer, jail.command_line(options, &binary, &fc_args)),
            _ => (binary, fc_args),
        };
        // Gated: the pid is in the pidfile before Firecracker runs, so a daemon killed at any
        // moment leaves no VMM the next one cannot find.
        let pid = self
            .children
            .spawn_recorded(
                &program,
                |command| {
                    command.args(args).current_dir(&spec.vm_dir).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
                },
                &spec.pidfile,
            )
            .await?;
        tracing::debug!(vm = %spec.name, pid, jailed = jail.is_some(), "firecracker started");
        let guard = KillGuard { driver: self, pid, vm_dir: &spec.vm_dir };

        let client = ApiClient::new(&spec.control_socket, self.options.api_timeout);
        let deadline = tokio::time::Instant::now() + self.options.ready_timeout;
        loop {
            if let Some(report) = self.gone(pid, &spec.vm_dir).await {
                return Err(self.exit_error(Some(report), spec));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LaunchError::NotReady {
                    timeout: self.options.ready_timeout,
                    stderr: process::tail_lines(&stderr_path, TAIL_LINES),
                });
            }
            match client.instance_info().await {
                Ok(info) => {
                    tracing::debug!(vm = %spec.name, version = %info.vmm_version, state = %info.state, "firecracker api up");
                    break;
                }
                // Not listening yet (or answering before it is ready).
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        guard.disarm();
        Ok((Started { pid, client }, view))
    }

    /// How our child `pid` ended, if it has: judged by `waitpid`, never by its command line
    /// (which reads as ours, or empty, while the child execs; the jailer execs Firecracker).
    async fn gone(&self, pid: u32, vm_dir: &Path) -> Option<process::ExitReport> {
        if self.children.is_alive(pid, vm_dir) {
            return None;
        }
        self.children.reap_within(pid, Duration::from_millis(100)).await
    }

    /// The error for a Firecracker that exited during start: the guest fault or VMM error its
    /// log shows, else its exit status (`report`) and stderr.
    fn exit_error(&self, report: Option<process::ExitReport>, spec: &LaunchSpec) -> LaunchError {
        self.cleanup(&spec.vm_dir);
        let log = spec.vm_dir.join(LOG_FILE);
        match logs::exit_cause_of(&log) {
            Some(cause @ (ExitCause::GuestFault(_) | ExitCause::VmmError(_))) => {
                FirecrackerError::Stopped { cause, log: process::tail_lines(&log, TAIL_LINES) }.into()
            }
            _ => LaunchError::Exited {
                status: report.map_or_else(|| "exit status unknown".to_owned(), |s| s.to_string()),
                stderr: process::tail_lines(&spec.stderr_log(), TAIL_LINES),
            },
        }
    }

    /// Sends `calls` in order; a refusal or a dead VMM ends the start.
    async fn configure(&self, started: &Started, spec: &LaunchSpec, calls: &[ApiCall]) -> Result<(), LaunchError> {
        for call in calls {
            if let Err(error) = started.client.put(&call.path, &call.body).await {
                return Err(self.call_failed(started, spec, format!("PUT {}", call.path), error).await);
            }
        }
        Ok(())
    }

    /// The error for a failed API call during start.
    async fn call_failed(&self, started: &Started, spec: &LaunchSpec, call: String, error: ApiError) -> LaunchError {
        let log = process::tail_lines(&spec.vm_dir.join(LOG_FILE), TAIL_LINES);
        match error {
            ApiError::Fault { fault_message, .. } => {
                let error = FirecrackerError::Refused { call, fault_message, log };
                self.abandon(started.pid, &spec.vm_dir);
                error.into()
            }
            // A dropped connection is usually a VMM that is exiting: give it a moment.
            other => match self.children.reap_within(started.pid, Duration::from_millis(500)).await {
                Some(report) => {
                    tracing::debug!(error = %other, "firecracker died during configuration");
                    self.exit_error(Some(report), spec)
                }
                None => {
                    self.abandon(started.pid, &spec.vm_dir);
                    FirecrackerError::Api(other).into()
                }
            },
        }
    }

    /// Kills and reaps a half-started VMM and removes its jail.
    fn abandon(&self, pid: u32, vm_dir: &Path) {
        self.children.kill_and_reap(pid);
        self.cleanup(vm_dir);
    }

    /// Removes the jail of `vm_dir`, if any (best effort: the next launch retries).
    fn cleanup(&self, vm_dir: &Path) {
        if let Some(jailer) = &self.options.jailer {
            if let Err(error) = jailer::remove_jail(vm_dir, &jailer.chroot_base, self.jail_fs.as_ref()) {
                tracing::warn!(error = %error, vm_dir = %vm_dir.display(), "cannot remove the firecracker jail");
            }
        }
    }

    fn launched(spec: &LaunchSpec, pid: u32) -> Launched {
        Launched {
            pid,
            vm_dir: spec.vm_dir.clone(),
            control_socket: spec.control_socket.clone(),
            agent_socket: spec.agent_socket.clone(),
            console_log: spec.console_log.clone(),
        }
    }

    async fn launch_inner(&self, spec: &LaunchSpec) -> Result<Launched, LaunchError> {
        let (started, view) = self.start(spec, false).await?;
        self.configure(&started, spec, &self.boot_calls(spec, &view)).await?;
        if let Err(error) = started.client.action(ActionType::InstanceStart).await {
            return Err(match error {
                ApiError::Fault { fault_message, .. } => {
                    self.abandon(started.pid, &spec.vm_dir);
                    let log = process::tail_lines(&spec.vm_dir.join(LOG_FILE), TAIL_LINES);
                    FirecrackerError::StartRefused { fault_message, log }.into()
                }
                other => self.call_failed(&started, spec, "PUT /actions (InstanceStart)".into(), other).await,
            });
        }
        self.check_started(&started, spec).await?;
        Ok(Self::launched(spec, started.pid))
    }

    /// After InstanceStart or a snapshot load: a VMM already gone, or a fault already logged,
    /// fails the start.
    async fn check_started(&self, started: &Started, spec: &LaunchSpec) -> Result<(), LaunchError> {
        if let Some(report) = self.gone(started.pid, &spec.vm_dir).await {
            return Err(self.exit_error(Some(report), spec));
        }
        let log = spec.vm_dir.join(LOG_FILE);
        if let Some(cause @ ExitCause::GuestFault(_)) = logs::exit_cause_of(&log) {
            self.abandon(started.pid, &spec.vm_dir);
            return Err(FirecrackerError::Stopped { cause, log: process::tail_lines(&log, TAIL_LINES) }.into());
        }
        Ok(())
    }

    fn client(&self, api_socket: &Path) -> ApiClient {
        ApiClient::new(api_socket, self.options.api_timeout)
    }

    /// Pauses the VM and writes a full snapshot into `dir` (`vmstate` and `memory`). The VM is
    /// left paused: resume it ([`Vmm::resume`]), or end it.
    pub async fn snapshot_to_dir(&self, api_socket: &Path, dir: &Path) -> Result<SnapshotFiles, FirecrackerError> {
        if self.options.jailer.is_some() {
            return Err(FirecrackerError::SnapshotInJail);
        }
        std::fs::create_dir_all(dir).map_err(|source| FirecrackerError::Io { path: dir.to_owned(), source })?;
        let files = SnapshotFiles::in_dir(dir);
        let paused = api::VmState { state: api::VmRunState::Paused };
        self.client(api_socket).patch("/vm", &paused).await?;
        self.create_snapshot(api_socket, &files).await?;
        Ok(files)
    }

    /// Writes a full snapshot of the paused VM to `files` (`PUT /snapshot/create`).
    pub async fn create_snapshot(&self, api_socket: &Path, files: &SnapshotFiles) -> Result<(), FirecrackerError> {
        if self.options.jailer.is_some() {
            return Err(FirecrackerError::SnapshotInJail);
        }
        let create = api::SnapshotCreate {
            snapshot_type: "Full",
            snapshot_path: text(&files.state),
            mem_file_path: text(&files.memory),
        };
        Ok(self.client(api_socket).put("/snapshot/create", &create).await?)
    }

    /// Starts a Firecracker for `spec` and loads `snapshot` into it instead of booting: the
    /// disks must be where the snapshot had them; the TAP and the vsock socket are `spec`'s.
    /// With `resume`, the VM runs at once; otherwise it stays paused.
    pub async fn restore_from(
        &self,
        spec: &LaunchSpec,
        snapshot: &SnapshotFiles,
        resume: bool,
    ) -> Result<Launched, LaunchError> {
        if self.options.jailer.is_some() {
            return Err(FirecrackerError::SnapshotInJail.into());
        }
        for path in [&snapshot.state, &snapshot.memory] {
            if !path.is_file() {
                return Err(LaunchError::MissingFile { what: "snapshot file", path: path.clone() });
            }
        }
        let (started, view) = self.start(spec, true).await?;
        self.configure(&started, spec, &Self::observability_calls(&view)).await?;
        let load = api::SnapshotLoad {
            snapshot_path: text(&snapshot.state),
            mem_backend: api::MemoryBackend { backend_type: "File", backend_path: text(&snapshot.memory) },
            resume_vm: resume,
            network_overrides: spec
                .net
                .iter()
                .map(|net| api::NetworkOverride { iface_id: IFACE_ID.into(), host_dev_name: net.tap.clone() })
                .collect(),
            vsock_override: Some(api::VsockOverride { uds_path: text(&view.vsock) }),
        };
        self.configure(&started, spec, &[ApiCall::new("/snapshot/load", &load)]).await?;
        self.check_started(&started, spec).await?;
        Ok(Self::launched(spec, started.pid))
    }

    /// Asks Firecracker to flush its metrics, then totals its metrics file (see
    /// [`logs::sum_metrics`]).
    pub async fn read_metrics(
        &self,
        vm_dir: &Path,
        api_socket: &Path,
    ) -> Result<BTreeMap<String, u64>, FirecrackerError> {
        self.client(api_socket).action(ActionType::FlushMetrics).await?;
        let path = vm_dir.join(METRICS_FILE);
        // Bounded: the newest flushes only (a cut first line is not JSON and is skipped).
        let text = crate::logfile::read_tail(&path, logs::METRICS_TAIL_BYTES)
            .map_err(|source| FirecrackerError::Io { path, source })?;
        Ok(logs::sum_metrics(&String::from_utf8_lossy(&text)))
    }
}

/// Removes `path` if it is there.
fn remove_stale(path: &Path) -> Result<(), LaunchError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(LaunchError::Prepare { path: path.to_owned(), source: error })
        }
        _ => Ok(()),
    }
}

/// Kills and reaps a half-started Firecracker (and removes its jail) when dropped armed.
struct KillGuard<'a> {
    driver: &'a FirecrackerDriver,
    pid: u32,
    vm_dir: &'a Path,
}

impl KillGuard<'_> {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for KillGuard<'_> {
    fn drop(&mut self) {
        self.driver.abandon(self.pid, self.vm_dir);
    }
}

impl Vmm for FirecrackerDriver {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> VmmFuture<'a, Result<Launched, LaunchError>> {
        Box::pin(self.launch_inner(spec))
    }

    /// `PATCH /vm Paused`; Firecracker accepts it for a paused VM too.
    fn pause<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        let state = api::VmState { state: api::VmRunState::Paused };
        Box::pin(async move { Ok(self.client(control_socket).patch("/vm", &state).await?) })
    }

    /// `PATCH /vm Resumed`.
    fn resume<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        let state = api::VmState { state: api::VmRunState::Resumed };
        Box::pin(async move { Ok(self.client(control_socket).patch("/vm", &state).await?) })
    }

    /// `PUT /snapshot/create` of the paused VM: the device state to `state_file`, the memory
    /// beside it ([`crate::snapshot_memory_file`]).
    fn snapshot<'a>(
        &'a self,
        control_socket: &'a Path,
        state_file: &'a Path,
    ) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let files = SnapshotFiles::for_state(state_file);
            match self.create_snapshot(control_socket, &files).await {
                Ok(()) => Ok(()),
                Err(FirecrackerError::Api(error)) => Err(error.into()),
                Err(error) => Err(ControlError::SaveFailed { path: state_file.to_owned(), reason: error.to_string() }),
            }
        })
    }

    /// A fresh Firecracker that loads the snapshot of `state_file` (and its memory file) with
    /// `spec`'s TAP and vsock socket, left paused.
    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        state_file: &'a Path,
    ) -> VmmFuture<'a, Result<Launched, LaunchError>> {
        Box::pin(async move { self.restore_from(spec, &SnapshotFiles::for_state(state_file), false).await })
    }

    fn is_alive(&self, pid: u32, vm_dir: &Path) -> bool {
        self.children.is_alive(pid, vm_dir)
    }

    /// Sends Ctrl-Alt-Del: the guest kernel reboots and `reboot=k` ends Firecracker.
    fn quit<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move { Ok(self.client(control_socket).action(ActionType::SendCtrlAltDel).await?) })
    }

    fn kill(&self, pid: u32, vm_dir: &Path) -> Result<bool, ControlError> {
        if self.children.kill_child(pid) {
            return Ok(true);
        }
        process::kill(pid, vm_dir).map_err(|source| ControlError::Signal { pid, source })
    }

    fn wait_exit<'a>(&'a self, pid: u32, vm_dir: &'a Path, timeout: Duration) -> VmmFuture<'a, bool> {
        Box::pin(async move {
            let gone = self.children.wait_exit(pid, vm_dir, timeout).await;
            if gone {
                self.cleanup(vm_dir);
            }
            gone
        })
    }

    fn stats(&self, pid: u32) -> Result<VmmStats, StatsError> {
        process::stats(pid)
    }

    fn agent_endpoint(&self, vm_dir: &Path) -> AgentEndpoint {
        AgentEndpoint::HybridVsock {
            path: crate::VmPaths::new(vm_dir).agent_socket,
            port: banger_proto::agent::AGENT_VSOCK_PORT,
        }
    }

    fn exit_reason(&self, vm_dir: &Path) -> Option<String> {
        logs::exit_cause_of(&vm_dir.join(LOG_FILE)).map(|cause| cause.describe())
    }

    fn metrics<'a>(
        &'a self,
        vm_dir: &'a Path,
        control_socket: &'a Path,
    ) -> VmmFuture<'a, Option<BTreeMap<String, u64>>> {
        Box::pin(async move {
            match self.read_metrics(vm_dir, control_socket).await {
                Ok(totals) => Some(totals),
                Err(error) => {
                    tracing::debug!(error = %error, "no firecracker metrics");
                    None
                }
            }
        })
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NetSpec};

    fn spec() -> LaunchSpec {
        let mut spec = LaunchSpec::new("01abc", "web", Path::new("/srv/vms/01abc"), "/k/vmlinuz", "/k/initrd.img");
        spec.kernel_elf = Some("/k/vmlinux".into());
        spec.vcpus = 2;
        spec.memory_mib = 1024;
        spec.disks = vec![
            DiskSpec::read_only("/images/base.ext4"),
            DiskSpec::writable("/srv/vms/01abc/overlay.ext4"),
            DiskSpec::writable("/srv/vms/01abc/work.ext4"),
        ];
        spec.kernel_args = vec!["banger.hostname=web".into()];
        spec.net = Some(NetSpec { tap: "bgpool3".into(), mac: "02:aa:bb:cc:dd:ee".into() });
        spec
    }

    #[test]
    fn boot_plan_in_order() {
        let plan = FirecrackerDriver::default().boot_plan(&spec());
        let paths: Vec<&str> = plan.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/logger",
                "/metrics",
                "/serial",
                "/machine-config",
                "/boot-source",
                "/drives/drive0",
                "/drives/drive1",
                "/drives/drive2",
                "/network-interfaces/eth0",
                "/vsock"
            ]
        );
        assert_eq!(plan[3].body, serde_json::json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}));
        assert_eq!(
            plan[4].body,
            serde_json::json!({
                "kernel_image_path": "/k/vmlinux",
                "initrd_path": "/k/initrd.img",
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd quiet \
                              banger.poweroff=reboot banger.hostname=web"
            })
        );
        assert_eq!(plan[5].body["is_read_only"], true);
        assert_eq!(plan[6].body["is_read_only"], false);
        assert_eq!(plan[6].body["path_on_host"], "overlay.ext4", "relative to the vm dir, firecracker's cwd");
        assert_eq!(
            plan[8].body,
            serde_json::json!({"iface_id": "eth0", "host_dev_name": "bgpool3", "guest_mac": "02:aa:bb:cc:dd:ee"})
        );
        assert_eq!(plan[9].body, serde_json::json!({"guest_cid": 3, "uds_path": "/srv/vms/01abc/agent.sock"}));
        assert_eq!(plan[2].body, serde_json::json!({"serial_out_path": "/srv/vms/01abc/console.log"}));
    }

    #[test]
    fn jailed_view_uses_the_mirror() {
        let options = JailerOptions {
            binary: "jailer".into(),
            uid: 900,
            gid: 900,
            chroot_base: "/srv/jailer".into(),
            cgroup_version: 2,
            cgroups: Vec::new(),
        };
        let spec = spec();
        let jail = Jail::new(&options, Path::new("/usr/bin/firecracker"), &spec.vm_id, &spec.vm_dir).unwrap();
        let (view, links) = FirecrackerDriver::view(&spec, Path::new("/k/vmlinux"), Some(&jail));
        assert_eq!(view.kernel, Path::new("/srv/vms/01abc/vmlinux"));
        assert_eq!(view.drives[0], Path::new("/srv/vms/01abc/drive0"));
        assert_eq!(view.vsock, Path::new("/srv/vms/01abc/agent.sock"));
        let writable: Vec<(&str, bool)> = links.iter().map(|l| (l.name.as_str(), l.writable)).collect();
        assert_eq!(
            writable,
            [
                ("vmlinux", false),
                ("initrd", false),
                ("drive0", false),
                ("drive1", true),
                ("drive2", true),
                ("console.log", true),
                ("firecracker.log", true),
                ("firecracker.metrics", true)
            ]
        );
    }

    #[test]
    fn options_from_config() {
        let mut config = Config::default();
        assert_eq!(FirecrackerOptions::from_config(&config).binary, Path::new("firecracker"));
        assert_eq!(FirecrackerOptions::from_config(&config).jailer, None);
        config.firecracker_jailer = true;
        config.jailer_uid = 900;
        config.jailer_gid = 901;
        let jailer = FirecrackerOptions::from_config(&config).jailer.unwrap();
        assert_eq!((jailer.uid, jailer.gid, jailer.chroot_base.as_path()), (900, 901, Path::new("/srv/jailer")));
    }

    #[test]
    fn agent_is_reached_through_hybrid_vsock() {
        let endpoint = FirecrackerDriver::default().agent_endpoint(Path::new("/v"));
        assert_eq!(endpoint, AgentEndpoint::HybridVsock { path: "/v/agent.sock".into(), port: 1024 });
    }

    #[tokio::test]
    async fn missing_binary_and_kernel_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = LaunchSpec::new("id", "vm", dir.path(), "/k", "/i");
        let driver = FirecrackerDriver::default().with_binary("no-such-firecracker-banger");
        let error = driver.launch(&spec).await.unwrap_err();
        assert!(error.to_string().contains("ELF vmlinux"), "{error}");
        spec.kernel_elf = Some("/k/vmlinux".into());
        let error = driver.launch(&spec).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "firecracker binary no-such-firecracker-banger not found; install a firecracker release binary (v1.16) \
             on PATH or set `firecracker_bin` in config.toml, or use --vmm qemu"
        );
    }
}
