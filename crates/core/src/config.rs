//! The daemon's configuration: every key has a default, so an empty or missing file is valid.
//! Files are TOML; unknown keys are refused so that typos do not go unnoticed.

use crate::net::{IfName, Subnet};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Which VMM drives guests (`vmm` in the config, `--vmm` on the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum VmmChoice {
    /// Let banger pick (QEMU for now).
    #[default]
    Auto,
    /// QEMU `-M microvm`.
    Qemu,
    /// Firecracker (not built yet).
    Firecracker,
}

impl VmmChoice {
    /// The choice's name, as parsed by [`std::str::FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Qemu => "qemu",
            Self::Firecracker => "firecracker",
        }
    }
}

impl std::fmt::Display for VmmChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmmChoice {
    type Err = ParseVmmChoiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Auto, Self::Qemu, Self::Firecracker]
            .into_iter()
            .find(|choice| choice.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseVmmChoiceError { given: s.to_owned() })
    }
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

    /// Parses a stored kind name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Qemu, Self::Firecracker].into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown VMM name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown vmm {given:?}; use auto, qemu or firecracker")]
pub struct ParseVmmChoiceError {
    /// What was given.
    pub given: String,
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
    #[schema(value_type = String)]
    pub bridge: IfName,
    /// The bridge's subnet: the host is its `.1`, guests get addresses from `.2` up.
    #[schema(value_type = String)]
    pub bridge_subnet: Subnet,
    /// Masquerade guest traffic out of the host (guest internet access).
    pub nat: bool,
    /// The interface NAT traffic leaves through; empty means any interface but the bridge.
    pub uplink: String,
    /// How many idle TAP devices are kept ready so that starting a VM never waits on netlink.
    pub tap_pool_size: u32,
    /// The DNS domain of guest names: a VM called `web` is `web.vm`.
    pub dns_domain: String,
    /// Whether new VMs may reach other guests and host ports unless told otherwise.
    pub allow_vm_traffic: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            vmm: VmmChoice::Auto,
            default_image: "debian-bookworm".into(),
            default_kernel: "debian-6.1-cloud".into(),
            default_vcpus: 1,
            default_memory_mib: 512,
            default_disk_mib: 2048,
            overlay_mib: 8192,
            socket_group: String::new(),
            log_level: "info".into(),
            operation_retention_secs: 24 * 3600,
            boot_timeout_secs: 120,
            network: true,
            bridge: IfName::default(),
            bridge_subnet: Subnet::default(),
            nat: false,
            uplink: String::new(),
            tap_pool_size: 4,
            dns_domain: "vm".into(),
            allow_vm_traffic: false,
        }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid TOML, or a key or value that does not fit.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
}

impl Config {
    /// Parses a config file's text; `path` only names the file in errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        let parsed = toml_from_str(text).map_err(|message| ConfigError::Invalid { path: path.to_owned(), message })?;
        parsed.validate().map_err(|message| ConfigError::Invalid { path: path.to_owned(), message })?;
        Ok(parsed)
    }

    fn validate(&self) -> Result<(), String> {
        use crate::size::{check_range, DISK_MIB, MEMORY_MIB, VCPUS};
        check_range("default_vcpus", u64::from(self.default_vcpus), VCPUS).map_err(|e| e.to_string())?;
        check_range("default_memory_mib", self.default_memory_mib, MEMORY_MIB).map_err(|e| e.to_string())?;
        check_range("default_disk_mib", self.default_disk_mib, DISK_MIB).map_err(|e| e.to_string())?;
        check_range("overlay_mib", self.overlay_mib, DISK_MIB).map_err(|e| e.to_string())?;
        check_range("boot_timeout_secs", self.boot_timeout_secs, (1, 3600)).map_err(|e| e.to_string())?;
        check_range("tap_pool_size", u64::from(self.tap_pool_size), (0, 256)).map_err(|e| e.to_string())?;
        self.uplink_name()?;
        crate::name::validate_name(&self.dns_domain).map_err(|e| format!("dns_domain {:?}: {e}", self.dns_domain))?;
        Ok(())
    }

    /// The `uplink` key as an interface name (`None` when empty).
    pub fn uplink_name(&self) -> Result<Option<IfName>, String> {
        if self.uplink.is_empty() {
            return Ok(None);
        }
        IfName::new(self.uplink.clone()).map(Some).map_err(|e| format!("uplink {:?}: {e}", self.uplink))
    }
}

fn toml_from_str(text: &str) -> Result<Config, String> {
    toml::from_str(text).map_err(|e| e.message().to_owned())
}

/// The configuration as TOML text, every key shown.
impl Config {
    /// Renders the configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::from_toml("", "x").ok(), Some(Config::default()));
    }

    #[test]
    fn keys_override_and_round_trip() {
        let c = Config::from_toml("vmm = \"qemu\"\ndefault_vcpus = 2\n", "x").expect("parse");
        assert_eq!(c.vmm, VmmChoice::Qemu);
        assert_eq!(c.default_vcpus, 2);
        assert_eq!(Config::from_toml(&c.to_toml(), "x").ok(), Some(c));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let e = Config::from_toml("default_cpus = 2", "/etc/banger/config.toml").err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|m| m.contains("default_cpus") && m.contains("/etc/banger")), "{e:?}");
        assert!(Config::from_toml("default_vcpus = 0", "x").is_err());
        assert!(Config::from_toml("vmm = \"xen\"", "x").is_err());
    }
}
