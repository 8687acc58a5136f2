//! The daemon's HTTP/JSON API types: here the requests and answers of each endpoint, in the
//! submodules the records they carry. Every type is the wire's own, not the model's
//! (`banger_core`): a model change reaches the API only through a `From` conversion here, and
//! shows up in the OpenAPI snapshot.

mod artifact;
mod config;
mod egress;
mod forward;
mod op;
mod session;
mod snapshot;
mod vm;
mod web;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use self::artifact::{ImageRecord, InitMode, KernelRecord};
pub use self::config::{Config, VmmChoice, VmmKind};
pub use self::egress::{
    EgressDenial, EgressLog, EgressMode, EgressPolicy, EgressView, LearnedAddress, SetEgressRequest,
};
pub use self::forward::{ForwardProtocol, PortForward};
pub use self::op::{OpState, OperationRecord, StageRecord, StageState};
pub use self::session::{SessionRecord, SessionStatus, StdinMode};
pub use self::snapshot::SnapshotRecord;
pub use self::vm::{DesiredState, ObservedState, VmPaths, VmRecord, VmSpec};
pub use self::web::WebLogin;

/// The API version prefix.
pub const API_PREFIX: &str = "/v1";

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `not_found`, `conflict`, `invalid_request`.
    pub code: String,
    /// One line for humans, naming the fix where there is one.
    pub message: String,
}

/// `GET /v1/health` and `GET /v1/daemon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DaemonStatus {
    /// banger's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Its state directory.
    pub state_dir: String,
    /// Its API socket.
    pub socket: String,
    /// Its log file.
    pub log_file: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// How many VMs the store holds.
    pub vms: usize,
    /// Resident memory of the daemon in KiB, when readable.
    pub rss_kib: Option<u64>,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// The VM's name, a DNS label.
    pub name: String,
    /// Image; the configured default when omitted.
    pub image: Option<String>,
    /// Kernel; the configured default when omitted.
    pub kernel: Option<String>,
    /// vCPUs; the configured default when omitted.
    pub vcpus: Option<u32>,
    /// Memory in MiB; the configured default when omitted.
    pub memory_mib: Option<u64>,
    /// Work disk in MiB; the configured default when omitted.
    pub disk_mib: Option<u64>,
    /// Boot the VM once it is recorded (the operation then also waits for its agent).
    #[serde(default)]
    pub start: bool,
    /// VMM: `auto`, `qemu` or `firecracker`; the daemon's default when omitted.
    pub vmm: Option<VmmChoice>,
    /// Give it a NIC on banger's bridge; the config's `network` when omitted. Without one
    /// the VM is reachable through the agent channel only (`exec`, forwards).
    #[serde(default)]
    pub network: Option<bool>,
    /// Let it reach, and be reached by, other guests and any host port; the config's
    /// `allow_vm_traffic` when omitted.
    #[serde(default)]
    pub allow_vm_traffic: Option<bool>,
    /// Its egress policy: `mode` replaces the config's `egress_mode`; `allow` and `deny` add to
    /// `egress_allow` and `egress_deny`. The config's policy when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressPolicy>,
    /// The caller's git identity, written to the guest's `~/.gitconfig` when the VM boots.
    pub git_identity: Option<GitIdentity>,
    /// Port forwards to record with the VM; they listen whenever it runs.
    #[serde(default)]
    pub publish: Vec<PortForward>,
    /// Start it from this memory snapshot (name or id) instead of booting: a fork with the
    /// snapshot's image, kernel, vCPUs, memory and disks, and an identity of its own. Image,
    /// kernel, vCPUs, memory, disk, VMM and network must then be omitted or equal the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// Start it from the daemon's warm-start snapshot when `warm_start` is on and one matches
    /// (what `banger vm run` asks for); otherwise boot as usual.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm_start: bool,
    /// A host file holding an ext4 image of a container's root (the containerd shim's tasks):
    /// the daemon opens it as the caller, keeps a copy in the VM's dir and attaches that,
    /// writable, as the guest's container disk. Not with `from_snapshot` or `warm_start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_disk: Option<String>,
}

/// `POST /v1/vms/{vm}/start`: the body is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartVmRequest {
    /// The caller's git identity, written to the guest's `~/.gitconfig` before it boots.
    pub git_identity: Option<GitIdentity>,
}

/// A git `user.name` and `user.email` (either may be absent), as `git config --get` gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GitIdentity {
    /// `user.name`.
    pub name: Option<String>,
    /// `user.email`.
    pub email: Option<String>,
}

/// `GET /v1/vms/{vm}/ssh`: how to reach a running VM's sshd with the system `ssh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SshInfo {
    /// Login user (`root`).
    pub user: String,
    /// The guest's address.
    pub host: String,
    /// sshd's port.
    pub port: u16,
    /// The installation's private key.
    pub identity_file: String,
    /// The known_hosts file that pins every VM's host key.
    pub known_hosts_file: String,
    /// The name the VM's host key is pinned under (`NAME.vm`).
    pub host_key_alias: String,
}

/// `GET /v1/ssh/config`: one entry per VM, for an ssh_config include.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SshConfig {
    /// The installation's private key.
    pub identity_file: String,
    /// The known_hosts file that pins every VM's host key.
    pub known_hosts_file: String,
    /// Every VM, oldest first.
    pub hosts: Vec<SshHost>,
}

/// One VM in [`SshConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SshHost {
    /// The VM's name.
    pub name: String,
    /// `Host` and `HostKeyAlias`: `NAME.vm`.
    pub alias: String,
    /// The guest's address, when it has one.
    pub hostname: Option<String>,
    /// Login user (`root`).
    pub user: String,
    /// sshd's port.
    pub port: u16,
    /// Whether the VM is running now.
    pub running: bool,
}

/// `PATCH /v1/vms/{vm}`: the fields to change; the VM must not be running.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVmRequest {
    /// New image.
    pub image: Option<String>,
    /// New kernel.
    pub kernel: Option<String>,
    /// New vCPU count.
    pub vcpus: Option<u32>,
    /// New memory in MiB.
    pub memory_mib: Option<u64>,
    /// New work disk size in MiB (grow only).
    pub disk_mib: Option<u64>,
}

/// A VM as the API shows it: its durable record, its paths and whether it is alive now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    /// The durable record.
    #[serde(flatten)]
    pub record: VmRecord,
    /// Its deterministic paths.
    pub paths: VmPaths,
    /// Whether its VMM process is alive right now.
    pub alive: bool,
    /// The name of the memory snapshot it was started from, if it is a fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_snapshot: Option<String>,
    /// Its egress policy (in `GET /v1/vms/{vm}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressPolicy>,
}

/// `POST /v1/vms/{vm}/snapshot`: the body is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The snapshot's name, a DNS label; `VM-YYYYMMDD-HHMMSS` when omitted.
    pub name: Option<String>,
}

/// A memory snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotView {
    /// The durable record.
    #[serde(flatten)]
    pub record: SnapshotRecord,
    /// The VMs started from it (it cannot be deleted while any exists).
    pub forks: Vec<String>,
}

/// `GET /v1/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    /// Every snapshot, oldest first (warm-start snapshots included).
    pub snapshots: Vec<SnapshotView>,
}

/// `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    /// Every VM, oldest first.
    pub vms: Vec<VmView>,
}

/// `GET /v1/operations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OperationList {
    /// Every kept operation, oldest first.
    pub operations: Vec<OperationRecord>,
}

/// `GET /v1/config`: the configuration in force and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConfigView {
    /// The file it was read from, or none when every key is a default.
    pub source: Option<String>,
    /// Every key with its value.
    pub config: Config,
}

/// `GET /v1/doctor`: the daemon's checks of this host (it runs the VMMs, so its view is the one
/// that counts), one per thing banger needs, each with the fix when not ok.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DoctorReport {
    /// No check failed.
    pub ok: bool,
    /// Every check, in a stable order.
    pub checks: Vec<DoctorCheck>,
}

/// One check of [`DoctorReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DoctorCheck {
    /// Short name, e.g. `kvm`, `qemu`, `vmm`, `disk space`.
    pub name: String,
    /// How it came out.
    pub status: DoctorStatus,
    /// What was found.
    pub detail: String,
    /// What to do about it, when not ok.
    pub fix: Option<String>,
}

/// How a [`DoctorCheck`] came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DoctorStatus {
    /// Fine.
    Ok,
    /// Works, with a caveat.
    Warn,
    /// banger cannot do its job until this is fixed.
    Fail,
}

impl DoctorStatus {
    /// The status as printed (`ok`, `warn`, `fail`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// `GET /v1/vms/{vm}/logs`: the VM's serial console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmLogs {
    /// The console log file.
    pub path: String,
    /// Its contents (the last `tail` lines when asked).
    pub text: String,
}

/// `GET /v1/vms/{vm}/stats`: resource use of a running VM's VMM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmStats {
    /// The VM's name.
    pub name: String,
    /// Whether it is running.
    pub running: bool,
    /// VMM process id.
    pub pid: Option<u32>,
    /// Host CPU time the VMM used, in milliseconds.
    pub cpu_time_ms: Option<u64>,
    /// Resident memory of the VMM, in KiB. Counts shared pages whole (a guest memory file,
    /// a snapshot's pages shared with its other forks): do not sum it over VMs.
    pub rss_kib: Option<u64>,
    /// Proportional memory of the VMM, in KiB: each shared page divided among the processes
    /// that map it (`Pss` of `/proc/PID/smaps_rollup`).
    #[serde(default)]
    pub pss_kib: Option<u64>,
    /// What the guest's memory file on `/dev/shm` holds, in KiB (QEMU guests booted fresh).
    #[serde(default)]
    pub memory_file_kib: Option<u64>,
    /// Guest memory the host does not hold, in KiB: the guest's size less its memory file,
    /// i.e. pages never touched plus pages the guest freed and its balloon gave back (QEMU
    /// guests booted fresh).
    #[serde(default)]
    pub memory_returned_kib: Option<u64>,
    /// The host memory this VM costs, in KiB: the VMM's PSS plus what its memory file holds
    /// beyond the part of it the VMM maps. Sums over VMs to the host's use.
    #[serde(default)]
    pub host_memory_kib: Option<u64>,
    /// What the snapshot memory a fork maps holds, in KiB: one copy per snapshot, shared by all
    /// of its forks (their clean pages), so not in `host_memory_kib` beyond the fork's PSS share.
    /// Absent for guests booted fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_memory_kib: Option<u64>,
    /// The guest's own view (`MemTotal` of its `/proc/meminfo`), in KiB.
    #[serde(default)]
    pub guest_mem_total_kib: Option<u64>,
    /// The guest's own view (`MemAvailable` of its `/proc/meminfo`), in KiB.
    #[serde(default)]
    pub guest_mem_available_kib: Option<u64>,
    /// Seconds since the VMM started.
    pub uptime_secs: Option<u64>,
    /// The VMM's own counters, totalled since it started (Firecracker's metrics:
    /// `block_read_bytes`, `net_rx_bytes`, `vsock_tx_bytes`, ...); absent for QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_metrics: Option<std::collections::BTreeMap<String, u64>>,
}

/// `POST /v1/kernels`: pull a kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullKernelRequest {
    /// Catalog name, or the name to give a kernel from `from`.
    pub name: String,
    /// A local `.deb` path or a URL; the host's apt archive when omitted.
    pub from: Option<String>,
}

/// `GET /v1/kernels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KernelList {
    /// Pulled kernels.
    pub kernels: Vec<KernelRecord>,
    /// Names the catalog can pull.
    pub catalog: Vec<String>,
}

/// `POST /v1/images`: build an image from a catalog recipe or from the caller's recipe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildImageRequest {
    /// The image's name; without `recipe`, the catalog recipe of that name (e.g. `minimal`).
    pub name: String,
    /// The caller's recipe (the TOML file of `banger image build --recipe`).
    pub recipe: Option<ImageRecipe>,
    /// A Dockerfile to build instead (`banger image build NAME --dockerfile PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<DockerfileBuild>,
}

/// A Dockerfile build: buildah builds it on the host, as root, and the result is imported like
/// an OCI image. `FROM banger/NAME` names a local banger image. Only root or the daemon's user
/// may ask for one (its RUN steps run as root on the host).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerfileBuild {
    /// Absolute path of the Dockerfile on the daemon's host.
    pub path: String,
    /// Absolute path of the build context [default: the Dockerfile's directory].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Build arguments (`--build-arg KEY=VALUE`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub build_args: std::collections::BTreeMap<String, String>,
}

/// A user's image recipe. Every field but `packages` has a default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageRecipe {
    /// Debian suite [default: bookworm]; the host's apt sources must serve it.
    pub suite: Option<String>,
    /// mmdebstrap variant [default: minbase].
    pub variant: Option<String>,
    /// Packages to install.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Files to write into the image.
    #[serde(default)]
    pub files: Vec<RecipeFile>,
    /// How the guest starts [default: fast].
    pub init: Option<InitMode>,
    /// Declarations for its guests, with the Dockerfile label keys: `dev.banger.service.NAME`
    /// (command; `.user`, `.env.KEY`, `.restart` = on-failure|no), `dev.banger.ports`,
    /// `dev.banger.user`, `dev.banger.workdir`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A file a recipe writes into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Absolute path in the image.
    pub path: String,
    /// Permission bits [default: 0o644].
    #[serde(default = "default_file_mode")]
    pub mode: u32,
    /// Contents.
    pub contents: String,
}

fn default_file_mode() -> u32 {
    0o644
}

/// `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    /// Local images.
    pub images: Vec<ImageRecord>,
    /// Names the catalog can build.
    pub catalog: Vec<String>,
}

/// `POST /v1/images/pull`: pull an OCI image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImageRequest {
    /// A registry reference (`host:port/repo:tag`), an OCI layout directory (`DIR[:TAG]`) or a
    /// docker-archive tarball.
    pub reference: String,
    /// The local name [default: the reference's last path component].
    pub name: Option<String>,
    /// Talk plain HTTP to the registry (for localhost test registries).
    #[serde(default)]
    pub insecure: bool,
}

/// `POST /v1/images/register`: make an existing ext4 file an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterImageRequest {
    /// The image's name.
    pub name: String,
    /// Absolute path of the ext4 file (copied; the original is untouched).
    pub file: String,
    /// How its guest starts [default: fast].
    pub init: Option<InitMode>,
}

/// `POST /v1/vms/{vm}/promote`: make a stopped VM's root a new image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The new image's name.
    pub name: String,
}

/// `GET /v1/vms/{vm}/ports`: sockets listening in the guest, as its agent reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmPorts {
    /// The VM's name.
    pub name: String,
    /// Listening sockets.
    pub ports: Vec<GuestPort>,
}

/// One listening socket in a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestPort {
    /// `tcp`, `tcp6`, `udp` or `udp6`.
    pub proto: String,
    /// Bound address.
    pub address: String,
    /// Port number.
    pub port: u16,
}

/// `GET /v1/vms/{vm}/forwards`: a VM's port forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForwardList {
    /// The VM's name.
    pub vm: String,
    /// Its forwards, by host port.
    pub forwards: Vec<ForwardView>,
}

/// A port forward as the API shows it: the durable forward and whether it listens now. Its
/// schema is [`ForwardViewSchema`]'s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardView {
    /// The forward.
    #[serde(flatten)]
    pub forward: PortForward,
    /// The VM's name.
    pub vm: String,
    /// Whether it listens now.
    pub state: ForwardState,
    /// Why it does not listen, when `state` is `failed`.
    pub error: Option<String>,
}

// ForwardView's fields spelled out for the document. Derived from `ForwardView` itself, the
// flattened forward would be `allOf` PortForward, whose `additionalProperties: false` (it
// refuses unknown fields as input) would make every answer invalid: `vm`, `state` and `error`
// are not among its properties.
/// A port forward as the API shows it: the durable forward and whether it listens now.
#[derive(ToSchema)]
#[schema(as = ForwardView)]
#[expect(dead_code, reason = "a schema only: `ForwardView` is what is sent")]
pub(crate) struct ForwardViewSchema {
    /// Host address it listens on.
    #[schema(example = "127.0.0.1")]
    host_addr: String,
    /// Host port, 1-65535.
    host_port: u16,
    /// Port in the guest, 1-65535.
    guest_port: u16,
    /// Transport.
    protocol: ForwardProtocol,
    /// The VM's name.
    vm: String,
    /// Whether it listens now.
    state: ForwardState,
    /// Why it does not listen, when `state` is `failed`.
    error: Option<String>,
}

impl utoipa::PartialSchema for ForwardView {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <ForwardViewSchema as utoipa::PartialSchema>::schema()
    }
}

impl ToSchema for ForwardView {
    fn name() -> std::borrow::Cow<'static, str> {
        <ForwardViewSchema as ToSchema>::name()
    }

    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <ForwardViewSchema as ToSchema>::schemas(schemas);
    }
}

/// Whether a forward listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ForwardState {
    /// Listening on the host; connections reach the guest.
    Listening,
    /// Kept, not listening: the VM is not running.
    Inactive,
    /// The VM runs but the host address could not be bound (see `error`).
    Failed,
}

impl ForwardState {
    /// The state's name as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listening => "listening",
            Self::Inactive => "inactive",
            Self::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests;
