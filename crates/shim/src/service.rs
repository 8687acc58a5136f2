//! The shim v2 task service: each task (container) is one banger VM, made at `Create` with the
//! container's rootfs as its container disk; the init process and every exec are container
//! processes in it (`process.rs`). The VM is removed at the init's `Delete`.
//!
//! Pods (CRI): the sandbox task is such a VM, the pod's. A pod container's task (CRI
//! annotations, `spec::Role`) reaches this same shim (the `start` action groups by sandbox id)
//! and runs in the pod's VM: its rootfs image is attached to the running VM in a free spare
//! disk slot and mounted at its own guest directory (`ContainerExec::root_dir`), which its
//! processes enter; at its `Delete` the disk is detached and the slot freed. A VM has two
//! spare slots, so a pod holds at most [`MAX_POD_CONTAINERS`] containers besides its sandbox.
//!
//! Restarts: containerd reconnects to this same shim process (its address is in the bundle),
//! which has kept its tasks and exec streams, and bangerd keeps the VM. A shim that died is
//! cleaned up by containerd's `delete` action, which removes the VM named in the bundle's
//! `banger-shim.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use banger_proto::CreateVmRequest;
use containerd_shim::api;
use containerd_shim::asynchronous::{publisher::RemotePublisher, ExitSignal};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, context::Context, r#async::TtrpcContext};
use containerd_shim::TtrpcResult;

use crate::client::Client;
use crate::process::{Exit, Process, Status};
use crate::{rootfs, spec};

/// The bundle file naming a task's VM, for the `delete` action of a shim that died.
pub const STATE_FILE: &str = "banger-shim.json";

/// What the bundle records.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BundleState {
    /// The task's VM.
    pub vm: String,
    /// The bangerd socket it lives on.
    pub socket: String,
}

/// The most containers a pod holds besides its sandbox: its VM's spare disk slots
/// (`banger_vmm::slots::QEMU_SLOTS`).
pub const MAX_POD_CONTAINERS: usize = 2;

/// One task: its VM and processes.
#[derive(Debug)]
struct Container {
    bundle: String,
    vm: String,
    /// For a pod container: its sandbox's task id and the guest directory of its root.
    pod: Option<(String, String)>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        let execs = self.execs.lock().map_err(|_| internal("exec table poisoned"))?;
        execs.get(exec_id).cloned().ok_or_else(|| not_found(&format!("exec {exec_id} not found")))
    }
}

/// The task service.
#[derive(Clone)]
pub struct Service {
    client: Client,
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    tasks: Arc<Mutex<HashMap<String, Arc<Container>>>>,
}

fn status(code: ttrpc::Code, message: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}
fn not_found(message: &str) -> ttrpc::Error {
    status(ttrpc::Code::NOT_FOUND, message)
}
fn internal(message: &str) -> ttrpc::Error {
    status(ttrpc::Code::INTERNAL, message)
}
fn failed(e: &dyn std::error::Error) -> ttrpc::Error {
    status(ttrpc::Code::FAILED_PRECONDITION, &banger_core::error_chain(e))
}

fn stamp(at: std::time::SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(at))
}

/// The VM name of task `id` in `namespace`: a DNS label, readable, unique by a hash.
pub fn vm_name(namespace: &str, id: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (namespace, id).hash(&mut h);
    let clean: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(40).collect();
    let clean = clean.trim_matches('-');
    format!("ctr-{clean}-{:08x}", h.finish() & 0xffff_ffff).replace("--", "-")
}

impl Service {
    /// A service for shim instance in `namespace`.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        Self {
            client: Client::from_env(),
            namespace: namespace.to_owned(),
            publisher: Arc::new(publisher),
            exit,
            tasks: Arc::default(),
        }
    }

    fn task(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        let tasks = self.tasks.lock().map_err(|_| internal("task table poisoned"))?;
        tasks.get(id).cloned().ok_or_else(|| not_found(&format!("task {id} not found")))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.publisher.publish(Context::default(), topic, &self.namespace, event).await {
            log::warn!("cannot publish {topic}: {e}");
        }
    }

    /// What runs when a process ends: containerd's exit event.
    fn exit_hook(&self, id: &str, exec_id: &str, pid: u32) -> impl FnOnce(Exit) + Send + 'static {
        let (this, id, exec_id) = (self.clone(), id.to_owned(), exec_id.to_owned());
        move |exit: Exit| {
            tokio::spawn(async move {
                let event = TaskExit {
                    container_id: id.clone(),
                    id: if exec_id.is_empty() { id } else { exec_id },
                    pid,
                    exit_status: exit.status,
                    exited_at: stamp(exit.at),
                    ..Default::default()
                };
                this.publish(containerd_shim::protos::topics::TASK_EXIT_EVENT_TOPIC, Box::new(event)).await;
            });
        }
    }

    async fn create_vm(
        &self,
        req: &api::CreateTaskRequest,
        vm: &str,
        files: &[(String, String)],
    ) -> Result<(), String> {
        let bundle = Path::new(&req.bundle);
        let image = rootfs::build(bundle, &req.rootfs, files).await.map_err(|e| banger_core::error_chain(&e))?;
        let state = BundleState { vm: vm.to_owned(), socket: self.client.socket().display().to_string() };
        let written = serde_json::to_vec(&state)
            .map_err(|e| e.to_string())
            .and_then(|b| std::fs::write(bundle.join(STATE_FILE), b).map_err(|e| e.to_string()));
        let created = match written {
            Ok(()) => {
                let create = CreateVmRequest {
                    name: vm.to_owned(),
                    image: std::env::var("BANGER_SHIM_IMAGE").ok().filter(|s| !s.is_empty()),
                    start: true,
                    network: Some(false),
                    container_disk: Some(image.display().to_string()),
                    ..Default::default()
                };
                tokio::time::timeout(crate::client::BOOT_TIMEOUT, self.client.create_vm(&create))
                    .await
                    .map_err(|_| format!("vm {vm} did not start within {:?}", crate::client::BOOT_TIMEOUT))
                    .and_then(|r| r.map_err(|e| banger_core::error_chain(&e)))
            }
            Err(e) => Err(format!("cannot write {STATE_FILE}: {e}")),
        };
        // bangerd keeps its own copy: the image is not needed past the create.
        let _ = std::fs::remove_file(&image);
        if created.is_err() {
            if let Err(e) = self.client.remove_vm(vm).await {
                log::warn!("cannot remove vm {vm} after a failed create: {e}");
            }
            let _ = std::fs::remove_file(bundle.join(STATE_FILE));
        }
        created
    }
}

impl Service {
    /// Attaches pod container `req`'s root to the VM of its pod's `sandbox`, mounted at its own
    /// guest directory; the VM and the directory.
    async fn attach_root(
        &self,
        req: &api::CreateTaskRequest,
        sandbox: &str,
        files: &[(String, String)],
    ) -> Result<(String, String), String> {
        let too_many = || {
            format!(
                "pod sandbox {sandbox} already holds {MAX_POD_CONTAINERS} containers: a banger pod runs at most \
                 {MAX_POD_CONTAINERS} containers besides its sandbox (one spare disk slot of its VM each; \
                 docs/kubernetes.md)"
            )
        };
        let vm = {
            let tasks = self.tasks.lock().map_err(|_| "task table poisoned".to_owned())?;
            let Some(pod) = tasks.get(sandbox).filter(|t| t.pod.is_none()) else {
                return Err(format!(
                    "pod sandbox {sandbox} does not run in this shim; its sandbox task must be created first"
                ));
            };
            if tasks.values().filter(|t| t.pod.as_ref().is_some_and(|(s, _)| s == sandbox)).count()
                >= MAX_POD_CONTAINERS
            {
                return Err(too_many());
            }
            pod.vm.clone()
        };
        let dir = banger_proto::agent::ContainerExec::root_dir(&req.id);
        let image = rootfs::build(Path::new(&req.bundle), &req.rootfs, files)
            .await
            .map_err(|e| banger_core::error_chain(&e))?;
        let attached = self.client.attach_disk(&vm, &dir, &image).await;
        // bangerd wrote it into the slot: the image is not needed any more.
        let _ = std::fs::remove_file(&image);
        match attached {
            Ok(()) => Ok((vm, dir)),
            Err(e @ crate::client::ClientError::Refused { status: hyper::StatusCode::CONFLICT, .. }) => Err(format!(
                "cannot attach the root of container {} to the pod's vm {vm}: {}; a banger pod runs at most \
                 {MAX_POD_CONTAINERS} containers besides its sandbox, and only on QEMU (docs/kubernetes.md)",
                req.id,
                banger_core::error_chain(&e)
            )),
            Err(e) => Err(banger_core::error_chain(&e)),
        }
    }

    /// Ends what still runs of pod container `task` (SIGKILL; containerd kills it before its
    /// `Delete`), then detaches its root at `dir` from the pod's VM.
    async fn detach_root(&self, task: &Container, dir: &str) -> Result<(), crate::client::ClientError> {
        let mut all = vec![task.init.clone()];
        all.extend(task.execs.lock().map(|e| e.values().cloned().collect::<Vec<_>>()).unwrap_or_default());
        for process in &all {
            let killed = matches!(process.status(), Status::Running(_)) && process.signal(libc::SIGKILL);
            if killed && tokio::time::timeout(KILL_WAIT, process.wait()).await.is_err() {
                log::warn!("a process of {} outlived SIGKILL for {KILL_WAIT:?}", task.bundle);
            }
        }
        match self.client.detach_disk(&task.vm, dir).await {
            // The pod's VM stopped: the disk goes with it when the sandbox is deleted.
            Err(crate::client::ClientError::Refused { status: hyper::StatusCode::CONFLICT, message }) => {
                log::warn!("cannot detach {dir} from vm {}: {message}", task.vm);
                Ok(())
            }
            other => other,
        }
    }
}

/// How long a killed process of a pod container may take to be seen gone before its root is
/// detached anyway.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Removes the VM a dead shim left (the `delete` action), from the bundle's state file.
pub async fn cleanup_bundle(bundle: &Path) -> Result<(), String> {
    let path = bundle.join(STATE_FILE);
    let Ok(bytes) = std::fs::read(&path) else { return Ok(()) };
    let state: BundleState = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let client = Client::from_env();
    client.remove_vm(&state.vm).await.map_err(|e| banger_core::error_chain(&e))?;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(bundle.join(rootfs::IMAGE));
    Ok(())
}

fn bundle_path(bundle: &str) -> PathBuf {
    PathBuf::from(bundle)
}

#[async_trait]
impl Task for Service {
    async fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.task(&req.id).ok().and_then(|t| match t.init.status() {
            Status::Running(pid) => Some(pid),
            _ => None,
        });
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid.unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(status(ttrpc::Code::UNIMPLEMENTED, "banger tasks cannot be restored from a checkpoint"));
        }
        let spec::Bundle { mut process, role, files } =
            spec::read_bundle(&bundle_path(&req.bundle)).map_err(|e| failed(&e))?;
        process.terminal = req.terminal;
        let refused = |e: String| status(ttrpc::Code::FAILED_PRECONDITION, &e);
        let (vm, pod) = match role {
            spec::Role::PodContainer(sandbox) => {
                let (vm, dir) = self.attach_root(&req, &sandbox, &files).await.map_err(refused)?;
                (vm, Some((sandbox, dir)))
            }
            spec::Role::Task | spec::Role::Sandbox => {
                let vm = vm_name(&self.namespace, &req.id);
                self.create_vm(&req, &vm, &files).await.map_err(refused)?;
                (vm, None)
            }
        };
        process.root = pod.as_ref().map(|(_, dir)| dir.clone());
        let init = Process::new([req.stdin.clone(), req.stdout.clone(), req.stderr.clone()], process);
        let container =
            Container { bundle: req.bundle.clone(), vm, pod, init: Arc::new(init), execs: Mutex::default() };
        self.tasks.lock().map_err(|_| internal("task table poisoned"))?.insert(req.id.clone(), Arc::new(container));
        let pid = std::process::id();
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            pid,
            ..Default::default()
        };
        self.publish(containerd_shim::protos::topics::TASK_CREATE_EVENT_TOPIC, Box::new(event)).await;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        if process.status() != Status::Created {
            return Err(status(ttrpc::Code::FAILED_PRECONDITION, "the process was already started"));
        }
        // The hook needs the pid the start answers with; it is sent on once known.
        let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<u32>();
        let hook_service = self.clone();
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let on_exit = move |exit: Exit| {
            tokio::spawn(async move {
                let pid = pid_rx.await.unwrap_or_default();
                (hook_service.exit_hook(&id, &exec_id, pid))(exit);
            });
        };
        let pid = match process.start(&self.client, &task.vm, on_exit).await {
            Ok(pid) => pid,
            Err(e) => return Err(failed(&e)),
        };
        let _ = pid_tx.send(pid);
        if req.exec_id.is_empty() {
            let event = TaskStart { container_id: req.id.clone(), pid, ..Default::default() };
            self.publish(containerd_shim::protos::topics::TASK_START_EVENT_TOPIC, Box::new(event)).await;
        } else {
            let event = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(containerd_shim::protos::topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event)).await;
        }
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        let mut resp = api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: task.bundle.clone(),
            stdin: process.stdio[0].clone(),
            stdout: process.stdio[1].clone(),
            stderr: process.stdio[2].clone(),
            terminal: process.spec.terminal,
            ..Default::default()
        };
        match process.status() {
            Status::Created => resp.status = api::Status::CREATED.into(),
            Status::Running(pid) => {
                resp.status = api::Status::RUNNING.into();
                resp.pid = pid;
            }
            Status::Exited(exit) => {
                resp.status = api::Status::STOPPED.into();
                resp.exit_status = exit.status;
                resp.exited_at = stamp(exit.at);
            }
        }
        Ok(resp)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let process = self.task(&req.id)?.process(&req.exec_id)?;
        let exit = process.wait().await;
        Ok(api::WaitResponse { exit_status: exit.status, exited_at: stamp(exit.at), ..Default::default() })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let task = self.task(&req.id)?;
        let process = task.process(&req.exec_id)?;
        let signal = i32::try_from(req.signal).map_err(|_| status(ttrpc::Code::INVALID_ARGUMENT, "bad signal"))?;
        match process.status() {
            Status::Running(_) => {
                if req.all && req.exec_id.is_empty() {
                    let execs: Vec<_> = task.execs.lock().map(|e| e.values().cloned().collect()).unwrap_or_default();
                    execs.iter().for_each(|p| {
                        p.signal(signal);
                    });
                }
                process.signal(signal);
                Ok(api::Empty::new())
            }
            // Never started: it ends as killed by the signal.
            Status::Created => {
                process.mark_exited(128 + req.signal);
                Ok(api::Empty::new())
            }
            Status::Exited(_) => Err(not_found("process already finished")),
        }
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let task = self.task(&req.id)?;
        let bytes = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        let mut process = spec::parse_process(&bytes).map_err(|e| failed(&e))?;
        process.terminal = req.terminal;
        process.root = task.pod.as_ref().map(|(_, dir)| dir.clone());
        {
            let mut execs = task.execs.lock().map_err(|_| internal("exec table poisoned"))?;
            if execs.contains_key(&req.exec_id) {
                return Err(status(ttrpc::Code::ALREADY_EXISTS, &format!("exec {} exists", req.exec_id)));
            }
            let stdio = [req.stdin.clone(), req.stdout.clone(), req.stderr.clone()];
            execs.insert(req.exec_id.clone(), Arc::new(Process::new(stdio, process)));
        }
        let event = TaskExecAdded { container_id: req.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() };
        self.publish(containerd_shim::protos::topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event)).await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let process = self.task(&req.id)?.process(&req.exec_id)?;
        process.resize(req.width, req.height);
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let process = self.task(&req.id)?.process(&req.exec_id)?;
        if req.stdin {
            process.close_stdin();
        }
        Ok(api::Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let task = self.task(&req.id)?;
        let mut all = vec![task.init.clone()];
        all.extend(task.execs.lock().map(|e| e.values().cloned().collect::<Vec<_>>()).unwrap_or_default());
        let processes = all
            .iter()
            .filter_map(|p| match p.status() {
                Status::Running(pid) => Some(containerd_shim::protos::api::ProcessInfo { pid, ..Default::default() }),
                _ => None,
            })
            .collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim::protos::cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics};
        let task = self.task(&req.id)?;
        let path = format!("/v1/vms/{}/stats", task.vm);
        let stats: banger_proto::VmStats =
            self.client.call(hyper::Method::GET, &path, None).await.map_err(|e| failed(&e))?;
        // The VM as the task's cgroup: the VMM's CPU time and memory.
        let metrics = Metrics {
            cpu: MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: stats.cpu_time_ms.unwrap_or_default().saturating_mul(1_000_000),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                rss: stats.rss_kib.unwrap_or_default().saturating_mul(1024),
                usage: MessageField::some(MemoryEntry {
                    usage: stats.rss_kib.unwrap_or_default().saturating_mul(1024),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics)).map_err(|e| internal(&e.to_string()))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let task = self.task(&req.id)?;
        if !req.exec_id.is_empty() {
            let process = task.process(&req.exec_id)?;
            if let Status::Running(_) = process.status() {
                return Err(status(ttrpc::Code::FAILED_PRECONDITION, "the exec is still running; kill it first"));
            }
            task.execs.lock().map_err(|_| internal("exec table poisoned"))?.remove(&req.exec_id);
            let exit = match process.status() {
                Status::Exited(exit) => exit,
                _ => Exit { status: 0, at: std::time::SystemTime::now() },
            };
            return Ok(api::DeleteResponse {
                exit_status: exit.status,
                exited_at: stamp(exit.at),
                ..Default::default()
            });
        }
        match &task.pod {
            // A pod container: its processes end, its root leaves the pod's VM.
            Some((_, dir)) => self.detach_root(&task, dir).await.map_err(|e| failed(&e))?,
            // The task's VM goes with it; processes still running end with it (killed), and
            // so do those of the pod's containers if it was a sandbox.
            None => {
                self.client.remove_vm(&task.vm).await.map_err(|e| failed(&e))?;
                let tasks: Vec<_> = self.tasks.lock().map(|t| t.values().cloned().collect()).unwrap_or_default();
                for other in tasks.iter().filter(|t| t.pod.as_ref().is_some_and(|(s, _)| *s == req.id)) {
                    other.init.mark_exited(137);
                }
            }
        }
        task.init.mark_exited(137);
        let _ = std::fs::remove_file(Path::new(&task.bundle).join(STATE_FILE));
        self.tasks.lock().map_err(|_| internal("task table poisoned"))?.remove(&req.id);
        let exit = match task.init.status() {
            Status::Exited(exit) => exit,
            _ => Exit { status: 137, at: std::time::SystemTime::now() },
        };
        let event = TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            exit_status: exit.status,
            exited_at: stamp(exit.at),
            ..Default::default()
        };
        self.publish(containerd_shim::protos::topics::TASK_DELETE_EVENT_TOPIC, Box::new(event)).await;
        Ok(api::DeleteResponse { exit_status: exit.status, exited_at: stamp(exit.at), ..Default::default() })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.tasks.lock().map(|t| t.is_empty()).unwrap_or(false) {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_dns_labels_and_unique_per_namespace() {
        let a = vm_name("default", "My_Task.1");
        assert!(a.starts_with("ctr-my-task-1-"), "{a}");
        assert!(a.len() <= 63 && banger_core::validate_name(&a).is_ok(), "{a}");
        assert_ne!(a, vm_name("k8s.io", "My_Task.1"));
        let long = vm_name("default", &"x".repeat(200));
        assert!(long.len() <= 63 && banger_core::validate_name(&long).is_ok(), "{long}");
        let odd = vm_name("default", "--");
        assert!(banger_core::validate_name(&odd).is_ok(), "{odd}");
    }
}
