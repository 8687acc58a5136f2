//! The configuration on the wire (`GET /v1/config`) and the VMM names requests and records
//! carry, with the conversions from the model (`banger_core::config`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Which VMM drives guests (`vmm` in the config, `--vmm` on the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum VmmChoice {
    /// Let banger pick: Firecracker when its binary is there and KVM boots stock guests,
    /// else QEMU (KVM when usable, TCG when not).
    #[default]
    Auto,
    /// QEMU `-M microvm`.
    Qemu,
    /// Firecracker (needs KVM that boots stock guests).
    Firecracker,
}

/// Which VMM runs a VM (what [`VmmChoice::Auto`] resolves to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    /// QEMU `microvm`.
    Qemu,
    /// Firecracker.
    Firecracker,
}

impl VmmKind {
    /// The kind's name (`qemu`, `firecracker`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Firecracker => "firecracker",
        }
    }
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// banger's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// VMM selection: `auto`, `qemu` or `firecracker`.
    pub vmm: VmmChoice,
    /// Image used when `--image` is omitted.
    pub default_image: String,
    /// Kernel used when `--kernel` is omitted.
    pub default_kernel: String,
    /// vCPUs used when `--cpus` is omitted.
    pub default_vcpus: u32,
    /// Memory in MiB used when `--memory` is omitted.
    pub default_memory_mib: u64,
    /// Work disk in MiB used when `--disk` is omitted.
    pub default_disk_mib: u64,
    /// Size of each VM's root overlay disk (sparse: it costs what the guest writes), in MiB.
    pub overlay_mib: u64,
    /// Group allowed to use the API socket (mode 0660); empty means owner only (0600).
    pub socket_group: String,
    /// Log filter, in `tracing` EnvFilter syntax (`info`, `bangerd=debug`, ...).
    pub log_level: String,
    /// How long finished operations are kept before they are pruned, in seconds.
    pub operation_retention_secs: u64,
    /// How long a guest may take from VMM start to its agent's first answer, in seconds.
    pub boot_timeout_secs: u64,
    /// Whether new VMs get a NIC unless created with `--no-network`.
    pub network: bool,
    /// The bridge guests are attached to.
    pub bridge: String,
    /// The bridge's subnet: the host is its `.1`, guests get addresses from `.2` up.
    pub bridge_subnet: String,
    /// Masquerade guest traffic out of the host (guest internet access).
    pub nat: bool,
    /// The interface NAT traffic leaves through; empty means any interface but the bridge.
    pub uplink: String,
    /// How many idle TAP devices are kept ready so that starting a VM never waits on netlink.
    pub tap_pool_size: u32,
    /// The DNS domain of guest names: a VM called `web` is `web.vm`.
    pub dns_domain: String,
    /// Whether the guest DNS server forwards names other than `NAME.<dns_domain>` to the host's
    /// resolvers (from /etc/resolv.conf, which may include split-DNS or VPN zones); when off,
    /// guests resolve only VM names and other names are refused.
    pub dns_forward: bool,
    /// Whether new VMs may reach other guests and host ports unless told otherwise.
    pub allow_vm_traffic: bool,
    /// Host files copied into every VM's /root at each start: `HOST_PATH` or `HOST_PATH:GUEST_PATH`.
    /// `HOST_PATH` is absolute or starts with `~/` (the daemon's `$HOME`); `GUEST_PATH` is under
    /// /root (`~/x`, `/root/x` or `x`) and defaults to `HOST_PATH` relative to `$HOME`.
    pub sync_files: Vec<String>,
    /// The Firecracker binary: a path, or a name looked up on `PATH` (default `firecracker`).
    pub firecracker_bin: String,
    /// Run Firecracker under its jailer (chroot, dropped uid/gid, cgroups).
    pub firecracker_jailer: bool,
    /// The jailer binary: a path, or a name looked up on `PATH` (default `jailer`).
    pub jailer_bin: String,
    /// The uid Firecracker runs as under the jailer (not root).
    pub jailer_uid: u32,
    /// The gid Firecracker runs as under the jailer (not root).
    pub jailer_gid: u32,
    /// Where the jailer makes each VM's chroot; must be on the state dir's filesystem, since the
    /// VM's kernel, initramfs and disks are hard-linked into it.
    pub jailer_chroot_base: String,
    /// The cgroup version the jailer uses (1 or 2).
    pub jailer_cgroup_version: u32,
    /// Cgroup settings the jailer applies, each `FILE=VALUE` (e.g. `cpu.max=50000 100000`).
    pub jailer_cgroups: Vec<String>,
    /// Keep a memory snapshot of a freshly booted VM per image, kernel, vCPUs, memory and agent,
    /// and start `vm run` VMs from it (as forks) whenever nothing about their boot differs.
    pub warm_start: bool,
    /// Whether QEMU guests get a memory balloon with free page reporting.
    pub balloon: bool,
    /// The egress mode of new VMs unless `--network-mode` is given.
    pub egress_mode: super::EgressMode,
    /// Hosts new VMs may reach (`--allow-host` adds to them).
    pub egress_allow: Vec<String>,
    /// Hosts new VMs may never reach (`--deny-host` adds to them).
    pub egress_deny: Vec<String>,
    /// Whether the daemon serves the web UI on `web_listen`.
    pub web: bool,
    /// The web UI's TCP address, `IP:PORT`.
    pub web_listen: String,
    /// Whether `web_listen` may be an address other than loopback.
    pub web_allow_remote: bool,
}

impl Default for Config {
    /// The daemon's defaults, which `GET /v1/config` documents.
    fn default() -> Self {
        banger_core::Config::default().into()
    }
}

impl From<banger_core::config::VmmChoice> for VmmChoice {
    fn from(c: banger_core::config::VmmChoice) -> Self {
        use banger_core::config::VmmChoice as M;
        match c {
            M::Auto => Self::Auto,
            M::Qemu => Self::Qemu,
            M::Firecracker => Self::Firecracker,
        }
    }
}

impl From<VmmChoice> for banger_core::config::VmmChoice {
    fn from(c: VmmChoice) -> Self {
        match c {
            VmmChoice::Auto => Self::Auto,
            VmmChoice::Qemu => Self::Qemu,
            VmmChoice::Firecracker => Self::Firecracker,
        }
    }
}

impl From<banger_core::config::VmmKind> for VmmKind {
    fn from(k: banger_core::config::VmmKind) -> Self {
        use banger_core::config::VmmKind as M;
        match k {
            M::Qemu => Self::Qemu,
            M::Firecracker => Self::Firecracker,
        }
    }
}

impl From<banger_core::Config> for Config {
    fn from(c: banger_core::Config) -> Self {
        let banger_core::Config {
            vmm,
            default_image,
            default_kernel,
            default_vcpus,
            default_memory_mib,
            default_disk_mib,
            overlay_mib,
            socket_group,
            log_level,
            operation_retention_secs,
            boot_timeout_secs,
            network,
            bridge,
            bridge_subnet,
            nat,
            uplink,
            tap_pool_size,
            dns_domain,
            dns_forward,
            allow_vm_traffic,
            sync_files,
            firecracker_bin,
            firecracker_jailer,
            jailer_bin,
            jailer_uid,
            jailer_gid,
            jailer_chroot_base,
            jailer_cgroup_version,
            jailer_cgroups,
            warm_start,
            balloon,
            egress_mode,
            egress_allow,
            egress_deny,
            web,
            web_listen,
            web_allow_remote,
        } = c;
        let text = |rules: Vec<banger_core::egress::HostRule>| rules.iter().map(ToString::to_string).collect();
        Self {
            vmm: vmm.into(),
            default_image,
            default_kernel,
            default_vcpus,
            default_memory_mib,
            default_disk_mib,
            overlay_mib,
            socket_group,
            log_level,
            operation_retention_secs,
            boot_timeout_secs,
            network,
            bridge: bridge.into(),
            bridge_subnet: bridge_subnet.into(),
            nat,
            uplink,
            tap_pool_size,
            dns_domain,
            dns_forward,
            allow_vm_traffic,
            sync_files,
            firecracker_bin,
            firecracker_jailer,
            jailer_bin,
            jailer_uid,
            jailer_gid,
            jailer_chroot_base,
            jailer_cgroup_version,
            jailer_cgroups,
            warm_start,
            balloon,
            egress_mode: egress_mode.into(),
            egress_allow: text(egress_allow),
            egress_deny: text(egress_deny),
            web,
            web_listen,
            web_allow_remote,
        }
    }
}
