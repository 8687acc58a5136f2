//! The QEMU `microvm` driver: builds QEMU's command line from a [`LaunchSpec`], starts QEMU in its
//! own session, and waits for its QMP socket.
//!
//! The guest gets: a serial console written to the console log, the kernel and initramfs, one
//! `virtio-blk-device` per disk in spec order (`vda`, `vdb`, ...) and the spare slots last
//! ([`crate::slots`]), a `virtio-serial-device` with
//! one port named [`AGENT_PORT_NAME`] whose host end is a unix socket QEMU listens on, and no
//! network at all (no `-netdev`, so the guest has no route anywhere). Under TCG the kernel gets
//! `tsc_early_khz=<host TSC kHz>`: without it most TCG boots hang calibrating the TSC.
//!
//! Guest RAM is anonymous, or a memory file mapped shared ([`LaunchSpec::memory_file`]); then a
//! snapshot is the device state plus a frozen copy of the memory, restored lazily
//! ([`crate::memfile`]).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use banger_core::config::VmmKind;

use crate::process::{self, Children};
use crate::qmp::{QmpClient, QmpError};
use crate::spec::{Accel, LaunchSpec, AGENT_PORT_NAME};
use crate::{ControlError, LaunchError, Launched, Vmm, VmmFuture, VmmStats};

/// The QEMU binary banger runs by default.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Kernel parameters every QEMU guest gets, before the TSC hint and the spec's own.
/// `reboot=t` + `-no-reboot` and `panic=-1` make a guest reboot or panic end QEMU.
pub const BASE_KERNEL_ARGS: &[&str] = &["console=ttyS0", "reboot=t", "panic=-1", "quiet"];

/// Default time QEMU has to open and answer its QMP socket.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many stderr lines a launch error quotes.
const STDERR_LINES: usize = 15;

/// The QEMU `microvm` driver.
#[derive(Debug)]
pub struct QemuDriver {
    binary: PathBuf,
    accel: Accel,
    tsc_khz: Option<u32>,
    ready_timeout: Duration,
    control_timeout: Duration,
    children: Children,
    /// Sealed copies of snapshot memory for forks with a balloon ([`crate::balloon`]).
    sealed: crate::balloon::SealedMemory,
}

impl QemuDriver {
    /// A driver running [`QEMU_BINARY`] from `PATH` with `accel`. `tsc_khz` is the host TSC
    /// frequency given to TCG guests (see the module docs).
    pub fn new(accel: Accel, tsc_khz: Option<u32>) -> Self {
        Self {
            binary: PathBuf::from(QEMU_BINARY),
            accel,
            tsc_khz,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            control_timeout: Duration::from_secs(5),
            children: Children::default(),
            sealed: crate::balloon::SealedMemory::default(),
        }
    }

    /// Runs `binary` (a name looked up on `PATH`, or a path) instead of [`QEMU_BINARY`].
    pub fn with_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = binary.into();
        self
    }

    /// How long QEMU has to answer on its QMP socket after it starts.
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The accelerator this driver uses.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The kernel command line for a guest with the `extra` parameters.
    pub fn kernel_cmdline(&self, extra: &[String]) -> String {
        let tsc = match (self.accel, self.tsc_khz) {
            (Accel::Tcg, Some(khz)) => Some(format!("tsc_early_khz={khz}")),
            _ => None,
        };
        let base = BASE_KERNEL_ARGS.iter().map(|arg| (*arg).to_owned());
        base.chain(tsc).chain(extra.iter().cloned()).collect::<Vec<_>>().join(" ")
    }

    /// QEMU's arguments (without the program name) for `spec`. With a memory file, guest RAM
    /// is that file, mapped shared (see [`crate::memfile`]).
    pub fn command_line(&self, spec: &LaunchSpec) -> Vec<OsString> {
        self.command_line_with(spec, spec.memory_file.as_deref().map(|path| (path, true)), spec.balloon, Boot::Kernel)
    }

    /// QEMU's arguments for `spec` with guest RAM backed by `memory`: a file and whether it is
    /// mapped shared (`share=on`) or private and copy-on-write (`share=off`); with `balloon`, a
    /// balloon with free page reporting ([`crate::balloon`]). `boot`: whether QEMU loads the
    /// kernel and initramfs.
    fn command_line_with(
        &self,
        spec: &LaunchSpec,
        memory: Option<(&Path, bool)>,
        balloon: bool,
        boot: Boot,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&OsStr]| args.push(parts.concat_os());
        let os = OsStr::new;

        push(&[os("-name")]);
        push(&[os("guest="), &escape_opt(OsStr::new(&spec.name)), os(",debug-threads=on")]);
        push(&[os("-M")]);
        let backend = memory.map(|_| format!(",memory-backend={RAM_ID}")).unwrap_or_default();
        push(&[os("microvm,x-option-roms=off,rtc=on"), os(&backend)]);
        push(&[os("-accel")]);
        push(&[os(self.accel.as_str())]);
        push(&[os("-cpu")]);
        push(&[os(match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        })]);
        let memory_mib = spec.memory_mib.to_string();
        let vcpus = spec.vcpus.to_string();
        for part in ["-m", &memory_mib, "-smp", &vcpus, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            push(&[os(part)]);
        }
        if let Some((file, shared)) = memory {
            push(&[os("-object")]);
            push(&[
                os(&format!("memory-backend-file,id={RAM_ID},size={memory_mib}M,mem-path=")),
                &escape_opt(file.as_os_str()),
                os(if shared { ",share=on" } else { ",share=off" }),
            ]);
        }

        push(&[os("-chardev")]);
        // `append=on`: QEMU writes with O_APPEND, so the daemon may truncate the log to rotate it
        // (see `logfile`); `launch` empties it first, as a plain `file` chardev would.
        push(&[os("file,id=con,append=on,path="), &escape_opt(spec.console_log.as_os_str())]);
        push(&[os("-serial")]);
        push(&[os("chardev:con")]);

        if boot == Boot::Kernel {
            push(&[os("-kernel")]);
            push(&[spec.kernel.as_os_str()]);
            push(&[os("-initrd")]);
            push(&[spec.initramfs.as_os_str()]);
            push(&[os("-append")]);
            push(&[os(&self.kernel_cmdline(&spec.kernel_args))]);
        }

        for (index, disk) in spec.disks.iter().enumerate() {
            let (readonly, extra) = if disk.read_only { ("on", "") } else { ("off", ",discard=unmap") };
            push(&[os("-drive")]);
            push(&[
                os(&format!("id=d{index},file=")),
                &escape_opt(disk.path.as_os_str()),
                os(&format!(",format=raw,if=none,readonly={readonly},cache=writeback,aio=threads{extra}")),
            ]);
            push(&[os("-device")]);
            push(&[os(&format!("virtio-blk-device,drive=d{index}"))]);
        }

        if let Some(net) = &spec.net {
            // `validate` allows only plain interface names and MACs: nothing to escape.
            push(&[os("-netdev")]);
            push(&[os(&format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap))]);
            push(&[os("-device")]);
            push(&[os(&format!("virtio-net-device,netdev=net0,mac={}", net.mac))]);
        }
        push(&[os("-device")]);
        push(&[os("virtio-serial-device,max_ports=2")]);
        push(&[os("-chardev")]);
        push(&[os("socket,id=agent,path="), &escape_opt(spec.agent_socket.as_os_str()), os(",server=on,wait=off")]);
        push(&[os("-device")]);
        push(&[os("virtserialport,chardev=agent,name="), os(AGENT_PORT_NAME)]);
        if balloon {
            // Last: the devices before it keep their virtio-mmio slots, so states saved
            // without it still fit the machine without it.
            push(&[os("-device")]);
            push(&[os(crate::balloon::QEMU_DEVICE)]);
        }
        // Spare slots after the balloon, so older states keep their virtio-mmio slots.
        for index in 0..spec.slots {
            let file = crate::slots::slot_file(&spec.vm_dir, index);
            push(&[os("-drive")]);
            push(&[
                os(&format!("id={},file=", crate::slots::drive_id(index))),
                &escape_opt(file.as_os_str()),
                os(",format=raw,if=none,readonly=off,cache=writeback,aio=threads,discard=unmap"),
            ]);
            push(&[os("-device")]);
            push(&[os(&format!(
                "virtio-blk-device,drive={},serial={}",
                crate::slots::drive_id(index),
                crate::slots::slot_serial(index)
            ))]);
        }

        push(&[os("-qmp")]);
        push(&[os("unix:"), &escape_opt(spec.control_socket.as_os_str()), os(",server=on,wait=off")]);
        push(&[os("-pidfile")]);
        push(&[spec.pidfile.as_os_str()]);
        args
    }

    /// QEMU's arguments for `spec` restored from a saved state: the same machine without a
    /// kernel to load ([`Boot::Restore`]), started
    /// paused (`-S`), reading the state from its stdin (`-incoming fd:0`), which the launch
    /// opens on the state file. QEMU reads the file itself: no `cat` and no pipe in between,
    /// which loads a fresh guest's ~90 MiB about a third faster.
    /// `balloon`: whether the saved guest has one.
    pub fn restore_command_line(&self, spec: &LaunchSpec, balloon: bool) -> Vec<OsString> {
        let memory = spec.memory_file.as_deref().map(|path| (path, true));
        let mut args = self.command_line_with(spec, memory, balloon, Boot::Restore);
        args.extend(["-S".into(), "-incoming".into(), "fd:0".into()]);
        args
    }

    /// QEMU's arguments for `spec` restored lazily from a device-only state and the memory
    /// file beside it ([`crate::memfile`]): guest RAM maps `memory` privately (copy-on-write,
    /// never written back), QEMU starts paused and waits (`-incoming defer`) for the
    /// `x-ignore-shared` capability before it reads the state from its stdin. `balloon`: whether
    /// the saved guest has one (then `memory` must be a sealed copy: [`crate::balloon`]).
    pub fn lazy_restore_command_line(&self, spec: &LaunchSpec, memory: &Path, balloon: bool) -> Vec<OsString> {
        let mut args = self.command_line_with(spec, Some((memory, false)), balloon, Boot::Restore);
        args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
        args
    }

    async fn launch_inner(&self, spec: &LaunchSpec, state_file: Option<&Path>) -> Result<Launched, LaunchError> {
        spec.validate()?;
        let mut spec = std::borrow::Cow::Borrowed(spec);
        if let Some(state) = state_file {
            // A saved guest gets exactly the slots it was saved with.
            let slots = crate::slots::state_slots(state)
                .map_err(|source| LaunchError::Prepare { path: crate::snapshot_devices_file(state), source })?;
            spec.to_mut().slots = slots;
        }
        let spec = spec.as_ref();
        let mut lazy = false;
        let (args, stdin) = match state_file {
            Some(state) => {
                if !state.is_file() {
                    return Err(LaunchError::MissingFile { what: "guest state", path: state.to_owned() });
                }
                let file =
                    File::open(state).map_err(|source| LaunchError::Prepare { path: state.to_owned(), source })?;
                let memory = crate::snapshot_memory_file(state);
                let devices = crate::snapshot_devices_file(state);
                let balloon = crate::balloon::state_has_balloon(state)
                    .map_err(|source| LaunchError::Prepare { path: devices, source })?;
                lazy = memory.is_file();
                let args = if lazy {
                    check_memory_file(&memory, spec.memory_mib)?;
                    if balloon {
                        // Discards must never reach the file every fork of the snapshot reads.
                        let sealed = self
                            .sealed
                            .path_for(&memory)
                            .await
                            .map_err(|source| LaunchError::Prepare { path: memory.clone(), source })?;
                        self.lazy_restore_command_line(spec, &sealed, true)
                    } else {
                        self.lazy_restore_command_line(spec, &memory, false)
                    }
                } else {
                    self.restore_command_line(spec, balloon)
                };
                (args, Stdio::from(file))
            }
            None => (self.command_line(spec), Stdio::null()),
        };
        let binary = process::find_program(&self.binary)
            .ok_or_else(|| LaunchError::QemuNotFound { binary: self.binary.clone() })?;
        if !spec.vm_dir.is_dir() {
            return Err(LaunchError::MissingFile { what: "vm dir", path: spec.vm_dir.clone() });
        }
        let inputs = [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)];
        let disks = spec.disks.iter().map(|disk| ("disk", &disk.path));
        if let Some((what, path)) = inputs.into_iter().chain(disks).find(|(_, path)| !path.is_file()) {
            return Err(LaunchError::MissingFile { what, path: path.clone() });
        }
        if state_file.is_none() {
            crate::slots::create_missing(&spec.vm_dir, spec.slots)
                .map_err(|source| LaunchError::Prepare { path: spec.vm_dir.clone(), source })?;
        } else if let Some(path) =
            (0..spec.slots).map(|i| crate::slots::slot_file(&spec.vm_dir, i)).find(|path| !path.is_file())
        {
            return Err(LaunchError::MissingFile { what: "slot disk", path });
        }
        // A stale memory file (a daemon killed mid-start) would be reused as it is.
        if let (None, Some(file)) = (state_file, &spec.memory_file) {
            crate::memfile::unlink(file);
        }
        // A stale socket makes QEMU fail to bind; a stale pidfile could name someone else.
        for stale in [&spec.control_socket, &spec.agent_socket, &spec.pidfile] {
            match std::fs::remove_file(stale) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(LaunchError::Prepare { path: stale.clone(), source: error });
                }
                _ => {}
            }
        }
        // Each boot starts a fresh console log (QEMU appends, it no longer truncates).
        for (path, empty) in [(&spec.console_log, true), (&crate::logfile::rotated_path(&spec.console_log), false)] {
            let done = if empty {
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path).map(drop)
            } else {
                std::fs::remove_file(path)
            };
            match done {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(LaunchError::Prepare { path: path.clone(), source: error });
                }
                _ => {}
            }
        }
        let stderr_path = spec.stderr_log();
        let stderr = crate::logfile::create_for_append(&stderr_path)
            .map_err(|source| LaunchError::Prepare { path: stderr_path.clone(), source })?;

        // Gated: the pid is in the pidfile before QEMU runs (QEMU rewrites it with the same pid),
        // so a daemon killed at any moment leaves no VMM the next one cannot find.
        let pid = self
            .children
            .spawn_recorded(
                &binary,
                |command| {
                    command.args(args).current_dir(&spec.vm_dir).stdin(stdin).stdout(Stdio::null()).stderr(stderr);
                },
                &spec.pidfile,
            )
            .await?;
        tracing::debug!(vm = %spec.name, pid, "qemu started");
        // Until QMP answers, a failure or a dropped future must not leave QEMU behind.
        // A fresh boot's memory file is QEMU's to create: a failed start leaves none behind.
        let memory = if state_file.is_none() { spec.memory_file.as_deref() } else { None };
        let guard = KillGuard { children: &self.children, pid, memory };

        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        loop {
            if !self.children.is_alive(pid, &spec.vm_dir) {
                let report = self.children.reap_within(pid, Duration::from_secs(1)).await;
                let status = report.map_or_else(|| "exit status unknown".to_owned(), |s| s.to_string());
                return Err(LaunchError::Exited { status, stderr: process::tail_lines(&stderr_path, STDERR_LINES) });
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                drop(guard);
                return Err(LaunchError::NotReady {
                    timeout: self.ready_timeout,
                    stderr: process::tail_lines(&stderr_path, STDERR_LINES),
                });
            }
            match QmpClient::connect(&spec.control_socket, remaining).await {
                Ok(client) => {
                    tracing::debug!(vm = %spec.name, "qmp answered");
                    if state_file.is_some() {
                        self.wait_restored(client, pid, spec, remaining, lazy).await?;
                        tracing::debug!(vm = %spec.name, "state loaded");
                    } else if let Some(file) = &spec.memory_file {
                        // QEMU answers once its memory is mapped: from now on the memory lives
                        // exactly as long as QEMU, whatever ends it.
                        crate::memfile::unlink(file);
                    }
                    break;
                }
                // Not listening yet.
                Err(QmpError::Connect { .. }) => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(source) => {
                    // QEMU opens its QMP socket before it checks every device: a bad command
                    // line shows up as a reset connection and an exited process.
                    let report = self.children.reap_within(pid, Duration::from_millis(500)).await;
                    drop(guard);
                    let stderr = process::tail_lines(&stderr_path, STDERR_LINES);
                    return Err(match report {
                        Some(status) => LaunchError::Exited { status: status.to_string(), stderr },
                        None => LaunchError::Handshake { source, stderr },
                    });
                }
            }
        }
        std::mem::forget(guard);
        Ok(Launched {
            pid,
            vm_dir: spec.vm_dir.clone(),
            control_socket: spec.control_socket.clone(),
            agent_socket: spec.agent_socket.clone(),
            console_log: spec.console_log.clone(),
        })
    }
}

impl QemuDriver {
    /// Waits until a restoring QEMU has loaded its state (a [`KillGuard`] still covers it).
    async fn wait_restored(
        &self,
        mut client: QmpClient,
        pid: u32,
        spec: &LaunchSpec,
        timeout: Duration,
        lazy: bool,
    ) -> Result<(), LaunchError> {
        let stderr_path = spec.stderr_log();
        let timeout = timeout.max(RESTORE_TIMEOUT);
        let loaded = async {
            if lazy {
                client.execute("migrate-set-capabilities", Some(ignore_shared(true))).await?;
                client.execute("migrate-incoming", Some(serde_json::json!({ "uri": "fd:0" }))).await?;
            }
            client.wait_incoming(Duration::from_millis(2), timeout).await
        };
        match loaded.await {
            // `prelaunch`: the saved guest had never run.
            Ok(status) if matches!(status.status.as_str(), "paused" | "running" | "prelaunch") => Ok(()),
            Ok(status) => Err(LaunchError::RestoreFailed {
                reason: format!("run state {}", status.status),
                stderr: process::tail_lines(&stderr_path, STDERR_LINES),
            }),
            Err(e) => {
                // A state that does not fit makes QEMU exit; give it a moment to say why.
                let _ = self.children.reap_within(pid, Duration::from_millis(500)).await;
                Err(LaunchError::RestoreFailed {
                    reason: e.to_string(),
                    stderr: process::tail_lines(&stderr_path, STDERR_LINES),
                })
            }
        }
    }

    async fn control(&self, control_socket: &Path) -> Result<QmpClient, ControlError> {
        Ok(QmpClient::connect(control_socket, self.control_timeout).await?)
    }
}

/// Longest wait for QEMU to load a saved guest state.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for QEMU to write a guest state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Kills and reaps a half-started VMM when dropped, and unlinks its memory file.
struct KillGuard<'a> {
    children: &'a Children,
    pid: u32,
    memory: Option<&'a Path>,
}

impl Drop for KillGuard<'_> {
    fn drop(&mut self) {
        self.children.kill_and_reap(self.pid);
        if let Some(file) = self.memory {
            crate::memfile::unlink(file);
        }
    }
}

impl Vmm for QemuDriver {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> VmmFuture<'a, Result<Launched, LaunchError>> {
        Box::pin(self.launch_inner(spec, None))
    }

    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        state_file: &'a Path,
    ) -> VmmFuture<'a, Result<Launched, LaunchError>> {
        Box::pin(self.launch_inner(spec, Some(state_file)))
    }

    fn pause<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move { Ok(self.control(control_socket).await?.stop().await?) })
    }

    fn resume<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move { Ok(self.control(control_socket).await?.cont().await?) })
    }

    fn snapshot<'a>(
        &'a self,
        control_socket: &'a Path,
        state_file: &'a Path,
    ) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let mut client = self.control(control_socket).await?;
            let memory = shared_memory_file(&mut client).await?;
            client.execute("migrate-set-capabilities", Some(ignore_shared(memory.is_some()))).await?;
            client.save_state(state_file, Duration::from_millis(10), SAVE_TIMEOUT).await?;
            if has_balloon(&mut client).await? {
                crate::balloon::mark_state(state_file).map_err(|source| ControlError::DevicesFile {
                    path: crate::snapshot_devices_file(state_file),
                    source,
                })?;
            }
            let slots = crate::slots::count(&mut client).await?;
            if slots > 0 {
                crate::slots::mark_state(state_file, slots).map_err(|source| ControlError::DevicesFile {
                    path: crate::snapshot_devices_file(state_file),
                    source,
                })?;
            }
            if let Some(path) = memory {
                // Still paused: the copy is the memory the device state belongs to.
                let dest = crate::snapshot_memory_file(state_file);
                let vm_dir = control_socket.parent().unwrap_or(Path::new("/")).to_owned();
                let mem_path = path.clone();
                let copied = tokio::task::spawn_blocking(move || {
                    let src = crate::memfile::open_path_in(&vm_dir, &mem_path)?;
                    crate::memfile::copy_sparse(&src, &dest)
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|copied| copied);
                let bytes = copied.map_err(|source| ControlError::MemoryCopy { path, source })?;
                tracing::debug!(bytes, "guest memory copied into the snapshot");
            }
            Ok(())
        })
    }

    fn is_alive(&self, pid: u32, vm_dir: &Path) -> bool {
        self.children.is_alive(pid, vm_dir)
    }

    fn resize_slot<'a>(
        &'a self,
        control_socket: &'a Path,
        index: u8,
        size: u64,
    ) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let mut client = self.control(control_socket).await?;
            let args = serde_json::json!({ "device": crate::slots::drive_id(index), "size": size });
            client.execute("block_resize", Some(args)).await?;
            Ok(())
        })
    }

    fn quit<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let mut client = QmpClient::connect(control_socket, self.control_timeout).await?;
            client.quit().await?;
            Ok(())
        })
    }

    fn kill(&self, pid: u32, vm_dir: &Path) -> Result<bool, ControlError> {
        process::kill(pid, vm_dir).map_err(|source| ControlError::Signal { pid, source })
    }

    fn wait_exit<'a>(&'a self, pid: u32, vm_dir: &'a Path, timeout: Duration) -> VmmFuture<'a, bool> {
        Box::pin(self.children.wait_exit(pid, vm_dir, timeout))
    }

    fn stats(&self, pid: u32) -> Result<VmmStats, process::StatsError> {
        process::stats(pid)
    }

    fn release_unused_snapshot_memory(&self) {
        self.sealed.release_unused();
    }
}

/// Whether a QEMU command line boots a kernel or restores a saved guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boot {
    /// `-kernel`, `-initrd` and `-append`.
    Kernel,
    /// None of them: the saved guest is already booted, and its state holds no firmware
    /// configuration. Left out, QEMU neither reads the kernel and initramfs (~14 MiB, kept in
    /// its memory for a reset that a `-no-reboot` guest never gets) nor copies them, which
    /// takes milliseconds off every restore and that memory off every fork.
    Restore,
}

/// The id of the guest RAM backend: the one QEMU gives the anonymous RAM of `microvm`, so RAM
/// block names match whatever backs it and a saved state loads into either kind of machine.
const RAM_ID: &str = "microvm.ram";

/// The migration capability that leaves shared memory (a memory file) out of a saved state.
fn ignore_shared(on: bool) -> serde_json::Value {
    serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })
}

/// The file behind the guest RAM of the QEMU on `client` when it is mapped shared (a VM
/// launched with a memory file); `None` for anonymous or private memory.
async fn shared_memory_file(client: &mut QmpClient) -> Result<Option<PathBuf>, QmpError> {
    let memdevs = client.execute("query-memdev", None).await?;
    let shared = memdevs.as_array().into_iter().flatten().any(|dev| {
        dev.get("id").and_then(serde_json::Value::as_str) == Some(RAM_ID)
            && dev.get("share").and_then(serde_json::Value::as_bool) == Some(true)
    });
    if !shared {
        return Ok(None);
    }
    let path = client
        .execute("qom-get", Some(serde_json::json!({ "path": format!("/objects/{RAM_ID}"), "property": "mem-path" })))
        .await?;
    Ok(path.as_str().map(PathBuf::from))
}

/// Whether the QEMU on `client` has a balloon device (`query-balloon` answers only then).
async fn has_balloon(client: &mut QmpClient) -> Result<bool, QmpError> {
    match client.execute("query-balloon", None).await {
        Ok(_) => Ok(true),
        Err(QmpError::Command { class, .. }) if class == "DeviceNotActive" => Ok(false),
        Err(e) => Err(e),
    }
}

/// Refuses a snapshot memory file whose size is not the guest's: QEMU would grow an empty
/// one in place (writing into the snapshot) and refuse a short one late.
fn check_memory_file(memory: &Path, memory_mib: u32) -> Result<(), LaunchError> {
    let len =
        std::fs::metadata(memory).map_err(|source| LaunchError::Prepare { path: memory.to_owned(), source })?.len();
    let want = u64::from(memory_mib) << 20;
    if len != want {
        return Err(LaunchError::RestoreFailed {
            reason: format!("memory file {} holds {len} bytes, the vm has {want}", memory.display()),
            stderr: String::new(),
        });
    }
    Ok(())
}

/// Escapes a QEMU option value: a comma is written twice.
fn escape_opt(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &byte in value.as_bytes() {
        out.push(byte);
        if byte == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// Concatenation of `OsStr` pieces.
trait ConcatOs {
    fn concat_os(&self) -> OsString;
}

impl ConcatOs for [&OsStr] {
    fn concat_os(&self) -> OsString {
        self.iter().fold(OsString::new(), |mut acc, part| {
            acc.push(part);
            acc
        })
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::spec::DiskSpec;

    fn spec() -> LaunchSpec {
        let mut spec = LaunchSpec::new("01abc", "web", Path::new("/srv/vms/01abc"), "/k/vmlinuz", "/k/initrd.img");
        spec.vcpus = 2;
        spec.memory_mib = 1024;
        spec.disks = vec![
            DiskSpec::read_only("/images/base.ext4"),
            DiskSpec::writable("/srv/vms/01abc/overlay.ext4"),
            DiskSpec::writable("/srv/vms/01abc/work,1.ext4"),
        ];
        spec.kernel_args = vec!["banger.hostname=web".into()];
        spec
    }

    fn args(driver: &QemuDriver, spec: &LaunchSpec) -> Vec<String> {
        driver.command_line(spec).into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    /// The value following `flag`, for every occurrence.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn tcg_command_line() {
        let driver = QemuDriver::new(Accel::Tcg, Some(2_596_096));
        let args = args(&driver, &spec());
        assert_eq!(values(&args, "-M"), ["microvm,x-option-roms=off,rtc=on"]);
        assert_eq!(values(&args, "-accel"), ["tcg"]);
        assert_eq!(values(&args, "-cpu"), ["max"]);
        assert_eq!(values(&args, "-m"), ["1024"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert_eq!(values(&args, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/k/initrd.img"]);
        assert_eq!(
            values(&args, "-append"),
            ["console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz=2596096 banger.hostname=web"]
        );
        assert_eq!(values(&args, "-serial"), ["chardev:con"]);
        assert_eq!(values(&args, "-qmp"), ["unix:/srv/vms/01abc/qmp.sock,server=on,wait=off"]);
        assert_eq!(values(&args, "-pidfile"), ["/srv/vms/01abc/vmm.pid"]);
        assert_eq!(values(&args, "-name"), ["guest=web,debug-threads=on"]);
    }

    #[test]
    fn restore_command_line_is_the_same_machine_started_paused_from_the_state() {
        let driver = QemuDriver::new(Accel::Tcg, Some(2_596_096));
        let boot = args(&driver, &spec());
        let restore: Vec<String> =
            driver.restore_command_line(&spec(), false).into_iter().map(|a| a.into_string().unwrap()).collect();
        // The same machine, without the kernel to load.
        let mut booted = boot.clone();
        let kernel = booted.iter().position(|a| a == "-kernel").expect("-kernel");
        booted.drain(kernel..kernel + 6);
        assert_eq!(booted[kernel - 1], "chardev:con", "-kernel, -initrd and -append follow the serial port");
        assert!(!restore.iter().any(|a| ["-kernel", "-initrd", "-append"].contains(&a.as_str())), "{restore:?}");
        assert_eq!(&restore[..booted.len()], &booted[..], "same devices, same order");
        assert_eq!(&restore[booted.len()..], ["-S", "-incoming", "fd:0"], "the state file is its stdin");
    }

    #[test]
    fn a_memory_file_backs_guest_ram_shared() {
        let driver = QemuDriver::new(Accel::Tcg, None);
        let mut spec = spec();
        spec.memory_file = Some("/dev/shm/banger-01abc,x.mem".into());
        let args = args(&driver, &spec);
        assert_eq!(values(&args, "-M"), ["microvm,x-option-roms=off,rtc=on,memory-backend=microvm.ram"]);
        assert_eq!(values(&args, "-m"), ["1024"], "the size QEMU checks against the backend");
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-file,id=microvm.ram,size=1024M,mem-path=/dev/shm/banger-01abc,,x.mem,share=on"]
        );
        let anonymous = self::args(&driver, &self::spec());
        assert!(values(&anonymous, "-object").is_empty(), "{anonymous:?}");
    }

    #[test]
    fn a_lazy_restore_maps_the_snapshot_memory_privately_and_defers_the_state() {
        let driver = QemuDriver::new(Accel::Tcg, None);
        let mut spec = spec();
        // The fork's own memory file is not used: its memory is the snapshot's.
        spec.memory_file = Some("/dev/shm/banger-01abc.mem".into());
        let args: Vec<String> = driver
            .lazy_restore_command_line(&spec, Path::new("/srv/vms/01abc/restore-state.mem"), false)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-file,id=microvm.ram,size=1024M,mem-path=/srv/vms/01abc/restore-state.mem,share=off"]
        );
        assert_eq!(values(&args, "-M"), ["microvm,x-option-roms=off,rtc=on,memory-backend=microvm.ram"]);
        assert_eq!(&args[args.len() - 3..], ["-S", "-incoming", "defer"]);
        assert!(values(&args, "-kernel").is_empty() && values(&args, "-initrd").is_empty(), "a restore boots nothing");
        let boot = self::args(&driver, &self::spec());
        let devices = |a: &[String]| values(a, "-device").into_iter().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(devices(&args), devices(&boot), "same devices, same order");
    }

    /// The balloon comes last, so the devices before it keep their virtio-mmio slots; a
    /// restore gives the guest the balloon exactly when its state was saved with one.
    #[test]
    fn a_balloon_is_the_last_device_and_restores_match_the_saved_guest() {
        let driver = QemuDriver::new(Accel::Tcg, None);
        let mut spec = spec();
        spec.net = Some(crate::NetSpec { tap: "bgpool3".into(), mac: "02:aa:bb:cc:dd:ee".into() });
        let plain = args(&driver, &spec);
        spec.balloon = true;
        let boot = args(&driver, &spec);
        let devices = |a: &[String]| values(a, "-device").into_iter().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(devices(&boot).last().map(String::as_str), Some("virtio-balloon-device,free-page-reporting=on"));
        assert_eq!(devices(&boot)[..devices(&boot).len() - 1], devices(&plain)[..], "the others keep their order");
        let strings = |a: Vec<OsString>| a.into_iter().map(|a| a.into_string().unwrap()).collect::<Vec<_>>();
        // A restore ignores `spec.balloon`: the saved guest decides.
        let lazy = strings(driver.lazy_restore_command_line(&spec, Path::new("/s/restore-state.mem"), false));
        assert_eq!(devices(&lazy), devices(&plain));
        let lazy = strings(driver.lazy_restore_command_line(&spec, Path::new("/proc/1/fd/9"), true));
        assert_eq!(devices(&lazy), devices(&boot));
        assert_eq!(devices(&strings(driver.restore_command_line(&spec, true))), devices(&boot));
        assert_eq!(devices(&strings(driver.restore_command_line(&spec, false))), devices(&plain));
    }

    /// Spare slots come after the balloon, named by serial, backed by the VM dir's slot files.
    #[test]
    fn slots_follow_the_balloon() {
        let driver = QemuDriver::new(Accel::Tcg, None);
        let mut spec = spec();
        spec.balloon = true;
        let plain = args(&driver, &spec);
        spec.slots = 2;
        let boot = args(&driver, &spec);
        let devices = |a: &[String]| values(a, "-device").into_iter().map(str::to_owned).collect::<Vec<_>>();
        let all = devices(&boot);
        let (before, after) = all.split_at(devices(&plain).len());
        assert_eq!(before, &devices(&plain)[..], "the other devices keep their order");
        assert_eq!(
            after,
            ["virtio-blk-device,drive=slot0,serial=banger-slot0", "virtio-blk-device,drive=slot1,serial=banger-slot1"]
        );
        let slot1 = format!("id=slot1,file={}/slot1.img,format=raw", spec.vm_dir.display());
        assert!(values(&boot, "-drive").iter().any(|d| d.starts_with(&slot1)), "{boot:?}");
    }

    /// A fork of a snapshot saved with a balloon never maps the snapshot's memory file itself
    /// (QEMU 7.2 would punch its guest's freed pages out of it): it maps a sealed copy.
    #[tokio::test]
    async fn a_lazy_restore_with_a_balloon_maps_a_sealed_copy_of_the_snapshot_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec =
            LaunchSpec::new("01abc", "web", dir.path(), dir.path().join("vmlinuz"), dir.path().join("initrd"));
        spec.memory_mib = 64;
        for file in ["vmlinuz", "initrd"] {
            std::fs::write(dir.path().join(file), b"").unwrap();
        }
        let state = dir.path().join("restore-state.bin");
        std::fs::write(&state, b"state").unwrap();
        let memory = crate::snapshot_memory_file(&state);
        std::fs::write(&memory, vec![5u8; 64 << 20]).unwrap();
        crate::balloon::mark_state(&state).unwrap();
        // A stand-in QEMU that records its arguments and what its memory path holds, then fails.
        let record = dir.path().join("args");
        let fake = dir.path().join("qemu");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" > {0}\nfor a in \"$@\"; do case $a in *mem-path=*) p=${{a#*mem-path=}}; p=${{p%%,*}}; \
                 head -c 4 \"$p\" >> {0};; esac; done\nexit 3\n",
                record.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let driver = QemuDriver::new(Accel::Tcg, None).with_binary(&fake);
        let error = driver.restore(&spec, &state).await.unwrap_err();
        assert!(matches!(error, LaunchError::Exited { .. }), "{error}");
        let recorded = std::fs::read_to_string(&record).unwrap();
        let own = format!("mem-path=/proc/{}/fd/", std::process::id());
        assert!(recorded.contains(&own), "{recorded}");
        assert!(recorded.contains("share=off") && recorded.contains("virtio-balloon-device"), "{recorded}");
        assert!(!recorded.contains(&*memory.to_string_lossy()), "never the snapshot's own file: {recorded}");
        assert!(recorded.ends_with("\u{5}\u{5}\u{5}\u{5}"), "the copy holds the snapshot's bytes: {recorded:?}");
    }

    #[tokio::test]
    async fn a_lazy_restore_refuses_a_memory_file_of_another_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = LaunchSpec::new("01abc", "web", dir.path(), "/k/vmlinuz", "/k/initrd.img");
        spec.memory_mib = 64;
        let state = dir.path().join("restore-state.bin");
        std::fs::write(&state, b"state").unwrap();
        // Empty: QEMU would grow it to the guest's size, writing into the snapshot.
        std::fs::write(crate::snapshot_memory_file(&state), b"").unwrap();
        let driver = QemuDriver::new(Accel::Tcg, None).with_binary("sh");
        let error = driver.restore(&spec, &state).await.unwrap_err();
        assert!(error.to_string().contains("holds 0 bytes, the vm has 67108864"), "{error}");
    }

    #[tokio::test]
    async fn restore_of_a_missing_state_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = LaunchSpec::new("01abc", "web", dir.path(), "/k/vmlinuz", "/k/initrd.img");
        spec.disks = Vec::new();
        let driver = QemuDriver::new(Accel::Tcg, None).with_binary("sh");
        let error = driver.restore(&spec, &dir.path().join("state.bin")).await.unwrap_err();
        assert!(matches!(error, LaunchError::MissingFile { what: "guest state", .. }), "{error:?}");
    }

    #[test]
    fn kvm_command_line() {
        let driver = QemuDriver::new(Accel::Kvm, Some(2_596_096));
        let args = args(&driver, &spec());
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host"]);
        // The TSC hint is for TCG only: under KVM it would override kvmclock's figure.
        assert_eq!(values(&args, "-append"), ["console=ttyS0 reboot=t panic=-1 quiet banger.hostname=web"]);
    }

    #[test]
    fn tsc_hint_needs_a_frequency() {
        let driver = QemuDriver::new(Accel::Tcg, None);
        assert_eq!(driver.kernel_cmdline(&[]), "console=ttyS0 reboot=t panic=-1 quiet");
    }

    #[test]
    fn disks_in_order_with_readonly_flags() {
        let args = args(&QemuDriver::new(Accel::Tcg, None), &spec());
        assert_eq!(
            values(&args, "-drive"),
            [
                "id=d0,file=/images/base.ext4,format=raw,if=none,readonly=on,cache=writeback,aio=threads",
                "id=d1,file=/srv/vms/01abc/overlay.ext4,format=raw,if=none,readonly=off,cache=writeback,aio=threads,discard=unmap",
                // Commas in paths are doubled.
                "id=d2,file=/srv/vms/01abc/work,,1.ext4,format=raw,if=none,readonly=off,cache=writeback,aio=threads,discard=unmap",
            ]
        );
        let devices = values(&args, "-device");
        assert_eq!(
            devices,
            [
                "virtio-blk-device,drive=d0",
                "virtio-blk-device,drive=d1",
                "virtio-blk-device,drive=d2",
                "virtio-serial-device,max_ports=2",
                "virtserialport,chardev=agent,name=banger.agent",
            ]
        );
    }

    #[test]
    fn network_is_a_tap_backed_virtio_net_device() {
        let mut spec = spec();
        spec.net = Some(crate::NetSpec { tap: "bgpool3".into(), mac: "02:aa:bb:cc:dd:ee".into() });
        let args = args(&QemuDriver::new(Accel::Tcg, None), &spec);
        assert_eq!(values(&args, "-netdev"), ["tap,id=net0,ifname=bgpool3,script=no,downscript=no"]);
        assert!(values(&args, "-device").contains(&"virtio-net-device,netdev=net0,mac=02:aa:bb:cc:dd:ee"));
    }

    #[test]
    fn console_and_agent_chardevs() {
        let args = args(&QemuDriver::new(Accel::Tcg, None), &spec());
        assert_eq!(
            values(&args, "-chardev"),
            [
                "file,id=con,append=on,path=/srv/vms/01abc/console.log",
                "socket,id=agent,path=/srv/vms/01abc/agent.sock,server=on,wait=off",
            ]
        );
    }

    #[test]
    fn no_network_of_any_kind() {
        let args = args(&QemuDriver::new(Accel::Tcg, None), &spec());
        assert!(!args.iter().any(|a| a == "-netdev" || a == "-net" || a == "-nic"), "{args:?}");
        assert!(!args.iter().any(|a| a.contains("virtio-net") || a.contains("user,")), "{args:?}");
        // -nodefaults keeps QEMU from adding a default NIC.
        assert!(args.iter().any(|a| a == "-nodefaults"));
    }

    #[tokio::test]
    async fn missing_qemu_is_reported_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LaunchSpec::new("id", "vm", dir.path(), "/k", "/i");
        let driver = QemuDriver::new(Accel::Tcg, None).with_binary("no-such-qemu-banger");
        let error = driver.launch(&spec).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "no-such-qemu-banger not found; install it with `apt-get install qemu-system-x86` (see `banger doctor`)"
        );
        let default_message = LaunchError::QemuNotFound { binary: QEMU_BINARY.into() }.to_string();
        assert_eq!(
            default_message,
            "qemu-system-x86_64 not found; install it with `apt-get install qemu-system-x86` (see `banger doctor`)"
        );
    }

    #[tokio::test]
    async fn missing_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LaunchSpec::new("id", "vm", dir.path(), dir.path().join("vmlinuz"), "/i");
        let driver = QemuDriver::new(Accel::Tcg, None).with_binary("/bin/sh");
        let error = driver.launch(&spec).await.unwrap_err();
        assert!(matches!(error, LaunchError::MissingFile { what: "kernel", .. }), "{error:?}");
    }

    /// A "VMM" that dies at once: the error carries its stderr and exit status.
    #[tokio::test]
    async fn early_exit_quotes_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-qemu");
        std::fs::write(&fake, "#!/bin/sh\necho 'qemu: could not load kernel' >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"").unwrap();
        let spec = LaunchSpec::new("id", "vm", dir.path(), &kernel, &kernel);
        let driver = QemuDriver::new(Accel::Tcg, None).with_binary(&fake);
        let error = driver.launch(&spec).await.unwrap_err();
        match &error {
            LaunchError::Exited { status, stderr } => {
                assert_eq!(status, "exit status 1");
                assert_eq!(stderr, "qemu: could not load kernel");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A "VMM" that never opens its socket is killed after the timeout.
    #[tokio::test]
    async fn hung_vmm_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-qemu");
        // `tail -f` of the script itself: its command line names the vm dir, and it leaves no
        // grandchild behind when killed.
        std::fs::write(&fake, "#!/bin/sh\necho starting >&2\nexec tail -f \"$0\"\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"").unwrap();
        let spec = LaunchSpec::new("id", "vm", dir.path(), &kernel, &kernel);
        let driver =
            QemuDriver::new(Accel::Tcg, None).with_binary(&fake).with_ready_timeout(Duration::from_millis(300));
        let error = driver.launch(&spec).await.unwrap_err();
        assert!(matches!(error, LaunchError::NotReady { .. }), "{error:?}");
        assert!(error.to_string().contains("starting"), "{error}");
        assert_eq!(driver.children.tracked(), 0, "killed and reaped");
    }
}
