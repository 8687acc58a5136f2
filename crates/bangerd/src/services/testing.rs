//! Test doubles for driving services without HTTP, VMMs or guests: a recording [`FakeVmm`]
//! whose "guests" are fake agents on the real agent socket, a recording [`FakeProvision`], and
//! a [`fleet`] over a temporary state dir that uses them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_core::config::{VmmChoice, VmmKind};
use banger_core::Layout;
use banger_core::{Config, InitMode, VmRecord};
use banger_proto::agent::{AgentRequest, AgentResponse, Decoder, Frame, FrameKind};
use banger_proto::GitIdentity;
use banger_store::Store;
use banger_vmm::{ControlError, LaunchError, LaunchSpec, Launched, Vmm, VmmFuture, VmmStats};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use super::lifecycle::{Prepared, Provision, ProvisionFuture};
use super::Fleet;
use crate::ops::OpHandle;

/// A call a [`FakeVmm`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmCall {
    /// `launch` of the VM named so.
    Launch(String),
    /// `quit` of a control socket (the fake's VMMs all exit on it).
    Quit(PathBuf),
    /// `kill` of a pid.
    Kill(u32),
}

/// A VMM driver whose VMMs are entries in a set and whose guests are fake agents: they answer
/// `Ping` with `Pong`, and `Shutdown` with `Ok`, after which the "VMM" exits.
#[derive(Debug, Default)]
pub struct FakeVmm {
    calls: Mutex<Vec<VmmCall>>,
    live: Arc<Mutex<HashSet<u32>>>,
    sockets: Mutex<HashMap<PathBuf, u32>>,
    next_pid: AtomicU32,
    /// When set, the guest never answers (a boot that hangs).
    pub silent_guest: AtomicBool,
    /// When set, a launch fails.
    pub fail_launch: AtomicBool,
}

impl FakeVmm {
    /// The calls so far.
    pub fn calls(&self) -> Vec<VmmCall> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many VMMs run now.
    pub fn running(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The pids of the VMMs that run now.
    pub fn live(&self) -> HashSet<u32> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A "VMM" that runs until killed, with no guest behind it (for tests that serve their own
    /// agent); its pid.
    pub fn adopt(&self) -> u32 {
        let pid = 4_000_000 + self.next_pid.fetch_add(1, Ordering::SeqCst);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(pid);
        pid
    }

    fn record(&self, call: VmmCall) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(call);
    }

    fn end(&self, pid: u32) -> bool {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid)
    }
}

impl Vmm for FakeVmm {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> VmmFuture<'a, Result<Launched, LaunchError>> {
        Box::pin(async move {
            self.record(VmmCall::Launch(spec.name.clone()));
            if self.fail_launch.load(Ordering::SeqCst) {
                return Err(LaunchError::MissingFile { what: "fake kernel", path: spec.kernel.clone() });
            }
            let pid = 4_000_000 + self.next_pid.fetch_add(1, Ordering::SeqCst);
            let agent = banger_vmm::VmPaths::new(&spec.vm_dir).agent_socket;
            let _ = std::fs::remove_file(&agent);
            let listener =
                UnixListener::bind(&agent).map_err(|source| LaunchError::Prepare { path: agent.clone(), source })?;
            self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(pid);
            self.sockets.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.control_socket.clone(), pid);
            if !self.silent_guest.load(Ordering::SeqCst) {
                tokio::spawn(fake_agent(listener, pid, self.live.clone()));
            }
            Ok(Launched {
                pid,
                vm_dir: spec.vm_dir.clone(),
                control_socket: spec.control_socket.clone(),
                agent_socket: agent,
                console_log: spec.console_log.clone(),
            })
        })
    }

    fn is_alive(&self, pid: u32, _vm_dir: &Path) -> bool {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).contains(&pid)
    }

    fn quit<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            self.record(VmmCall::Quit(control_socket.to_owned()));
            // Like QEMU's `quit`: the VMM behind that control socket exits.
            let pid = self.sockets.lock().unwrap_or_else(|p| p.into_inner()).get(control_socket).copied();
            if let Some(pid) = pid {
                self.end(pid);
            }
            Ok(())
        })
    }

    fn kill(&self, pid: u32, _vm_dir: &Path) -> Result<bool, ControlError> {
        self.record(VmmCall::Kill(pid));
        Ok(self.end(pid))
    }

    fn wait_exit<'a>(&'a self, pid: u32, vm_dir: &'a Path, timeout: Duration) -> VmmFuture<'a, bool> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            while self.is_alive(pid, vm_dir) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            !self.is_alive(pid, vm_dir)
        })
    }

    fn pause<'a>(&'a self, _control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move { Ok(()) })
    }

    fn resume<'a>(&'a self, _control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move { Ok(()) })
    }

    fn snapshot<'a>(&'a self, _control: &'a Path, state_file: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let _ = std::fs::write(state_file, b"fake state");
            Ok(())
        })
    }

    fn stats(&self, _pid: u32) -> Result<VmmStats, banger_vmm::StatsError> {
        Ok(VmmStats { cpu_time_ms: 0, rss_kib: 0 })
    }
}

/// Serves the fake guest agent of fake VMM `pid` until it is told to shut down.
async fn fake_agent(listener: UnixListener, pid: u32, live: Arc<Mutex<HashSet<u32>>>) {
    while let Ok((stream, _)) = listener.accept().await {
        if serve_agent(stream).await {
            live.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid);
            return;
        }
    }
}

/// One agent connection; whether the guest was told to shut down.
async fn serve_agent(stream: UnixStream) -> bool {
    let (mut rd, mut wr) = stream.into_split();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = rd.read(&mut buf).await {
        if n == 0 {
            return false;
        }
        decoder.push(&buf[..n]);
        while let Ok(Some(f)) = decoder.next_frame() {
            let Ok(request) = f.parse::<AgentRequest>("request") else { continue };
            let (answer, down) = match request {
                AgentRequest::Ping => {
                    (AgentResponse::Pong { version: "fake".into(), uptime_ms: 1, kernel: "fake".into() }, false)
                }
                AgentRequest::Shutdown => (AgentResponse::Ok, true),
                _ => (AgentResponse::Ok, false),
            };
            let _ = wr.write_all(&Frame::json(f.channel, FrameKind::Response, &answer).encode()).await;
            if down {
                return true;
            }
        }
    }
    false
}

/// A call a [`FakeProvision`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionCall {
    /// The VM.
    pub vm: String,
    /// Whether it restores a snapshot.
    pub restoring: bool,
}

/// Provisioning that makes nothing: it records the call and hands back paths in the VM dir.
#[derive(Debug, Default)]
pub struct FakeProvision {
    calls: Mutex<Vec<ProvisionCall>>,
}

impl FakeProvision {
    /// The calls so far.
    pub fn calls(&self) -> Vec<ProvisionCall> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Provision for FakeProvision {
    fn prepare<'a>(
        &'a self,
        op: &'a OpHandle,
        vm: &'a VmRecord,
        _git: Option<&'a GitIdentity>,
        restoring: bool,
    ) -> ProvisionFuture<'a> {
        Box::pin(async move {
            op.stage("provision")?;
            self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(ProvisionCall { vm: vm.name.clone(), restoring });
            let dir = PathBuf::from(&vm.vm_dir);
            // Small disks, so snapshots and forks have something to copy.
            for disk in ["overlay.ext4", "work.ext4"] {
                if !dir.join(disk).exists() {
                    let _ = std::fs::write(dir.join(disk), b"fake disk");
                }
            }
            Ok(Prepared {
                kernel: dir.join("vmlinuz"),
                kernel_elf: None,
                initramfs: dir.join("initramfs"),
                base: dir.join("base.ext4"),
                overlay: dir.join("overlay.ext4"),
                work: dir.join("work.ext4"),
                init_mode: InitMode::Fast,
                wait_ports: Vec::new(),
            })
        })
    }
}

/// A fleet over a fresh store in `dir` whose VMMs (both kinds) are `vmm`.
pub fn fleet_with(dir: &Path, vmm: Arc<FakeVmm>) -> Arc<Fleet> {
    let layout = Layout::resolve(Some(dir.to_path_buf()), Some(dir.join("s.sock")));
    let store = Store::open(&dir.join("banger.db")).expect("store");
    let drivers: HashMap<VmmKind, Arc<dyn Vmm>> =
        [(VmmKind::Qemu, vmm.clone() as Arc<dyn Vmm>), (VmmKind::Firecracker, vmm as Arc<dyn Vmm>)].into();
    let host = banger_vmm::HostFacts::default();
    let config = Config { network: false, ..Config::default() };
    Arc::new(Fleet::with_drivers(layout, config, store, host, VmmChoice::default(), drivers))
}

/// A fleet over a fresh store in `dir` with a fresh [`FakeVmm`].
pub fn fleet(dir: &Path) -> Arc<Fleet> {
    fleet_with(dir, Arc::new(FakeVmm::default()))
}

/// A daemon over [`fleet_with`] whose boots are provisioned by `provision`.
pub fn daemon_with(
    dir: &Path,
    vmm: Arc<FakeVmm>,
    provision: Arc<FakeProvision>,
    config: impl FnOnce(&mut Config),
) -> Arc<crate::daemon::Daemon> {
    let layout = Layout::resolve(Some(dir.to_path_buf()), Some(dir.join("s.sock")));
    let store = Store::open(&dir.join("banger.db")).expect("store");
    let drivers: HashMap<VmmKind, Arc<dyn Vmm>> =
        [(VmmKind::Qemu, vmm.clone() as Arc<dyn Vmm>), (VmmKind::Firecracker, vmm.clone() as Arc<dyn Vmm>)].into();
    let mut c = Config::default();
    config(&mut c);
    let fleet = Fleet::with_drivers(layout, c, store, banger_vmm::HostFacts::default(), VmmChoice::default(), drivers);
    let live = vmm.live.clone();
    *fleet.handles.test_alive.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(Arc::new(move |pid| live.lock().unwrap_or_else(|p| p.into_inner()).contains(&pid)));
    crate::daemon::Daemon::wire(Arc::new(fleet), None, Some(provision))
}

/// A daemon with fresh fakes and the default config.
pub fn daemon(dir: &Path) -> Arc<crate::daemon::Daemon> {
    daemon_with(dir, Arc::new(FakeVmm::default()), Arc::new(FakeProvision::default()), |_| {})
}
