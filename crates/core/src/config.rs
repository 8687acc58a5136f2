//! The daemon's configuration: every key has a default, so an empty or missing file is valid.
//! Files are TOML; unknown keys are refused so that typos do not go unnoticed.

use crate::net::{IfName, Subnet};
use serde::{Deserialize, Serialize};

/// Which VMM drives guests (`vmm` in the config, `--vmm` on the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Group allowed to use the API socket (mode 0660); empty means owner only (0600). Members
    /// may do what the API offers, except make the daemon read a host file their own user cannot
    /// (`image register` opens it as the caller) or forward a privileged host port
    /// (docs/security.md).
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
    pub bridge: IfName,
    /// The bridge's subnet: the host is its `.1`, guests get addresses from `.2` up.
    pub bridge_subnet: Subnet,
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
    /// Give QEMU guests a memory balloon with free page reporting, so memory a guest frees goes
    /// back to the host a few seconds later (forks of a snapshot keep theirs on QEMU 7.2).
    pub balloon: bool,
    /// The egress mode of new VMs when `--network-mode` is not given: `open`, `allowlist` or
    /// `closed` (docs/security.md "Egress policy").
    pub egress_mode: crate::egress::EgressMode,
    /// Hosts new VMs may reach (`--allow-host` adds to them): `api.github.com`, `*.pypi.org`,
    /// `198.18.0.1`, `10.0.0.0/8`, each optionally with `:PORT`.
    pub egress_allow: Vec<crate::egress::HostRule>,
    /// Hosts new VMs may never reach (`--deny-host` adds to them); deny wins.
    pub egress_deny: Vec<crate::egress::HostRule>,
    /// Whether the daemon serves the web UI on `web_listen` (`banger web` logs a browser in).
    pub web: bool,
    /// The web UI's TCP address, `IP:PORT`. Loopback unless `web_allow_remote` is set.
    pub web_listen: String,
    /// Allow `web_listen` on an address other than loopback: anyone who can reach it may try to
    /// log in (docs/security.md "The web UI"); `banger doctor` warns while it is set.
    pub web_allow_remote: bool,
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
            dns_forward: true,
            allow_vm_traffic: false,
            sync_files: Vec::new(),
            firecracker_bin: "firecracker".into(),
            firecracker_jailer: false,
            jailer_bin: "jailer".into(),
            jailer_uid: 0,
            jailer_gid: 0,
            jailer_chroot_base: "/srv/jailer".into(),
            jailer_cgroup_version: 2,
            jailer_cgroups: Vec::new(),
            warm_start: false,
            balloon: true,
            egress_mode: crate::egress::EgressMode::Open,
            egress_allow: Vec::new(),
            egress_deny: Vec::new(),
            web: true,
            web_listen: "127.0.0.1:7777".into(),
            web_allow_remote: false,
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
        for entry in &self.sync_files {
            SyncFile::parse(entry)?;
        }
        self.validate_firecracker()?;
        crate::egress::EgressPolicy::new(self.egress_mode, self.egress_allow.clone(), self.egress_deny.clone())
            .map_err(|e| format!("egress: {e}"))?;
        self.web_addr()?;
        Ok(())
    }

    /// `web_listen` as an address, refused when it is not loopback and `web_allow_remote` is
    /// off.
    pub fn web_addr(&self) -> Result<std::net::SocketAddr, String> {
        let addr: std::net::SocketAddr = self
            .web_listen
            .parse()
            .map_err(|e| format!("web_listen {:?}: {e}; write IP:PORT, e.g. 127.0.0.1:7777", self.web_listen))?;
        if !addr.ip().is_loopback() && !self.web_allow_remote {
            return Err(format!(
                "web_listen {addr} is not a loopback address; set web_allow_remote = true to serve the web UI there \
                 (anyone who reaches it can try to log in), or listen on 127.0.0.1"
            ));
        }
        Ok(addr)
    }

    /// The egress policy new VMs get unless told otherwise.
    pub fn default_egress(&self) -> crate::egress::EgressPolicy {
        crate::egress::EgressPolicy {
            mode: self.egress_mode,
            allow: self.egress_allow.clone(),
            deny: self.egress_deny.clone(),
        }
    }

    fn validate_firecracker(&self) -> Result<(), String> {
        for (key, value) in [("firecracker_bin", &self.firecracker_bin), ("jailer_bin", &self.jailer_bin)] {
            if value.trim().is_empty() {
                return Err(format!("{key} is empty; give a path or a program name on PATH"));
            }
        }
        if !matches!(self.jailer_cgroup_version, 1 | 2) {
            return Err(format!("jailer_cgroup_version {} is not 1 or 2", self.jailer_cgroup_version));
        }
        if let Some(bad) = self.jailer_cgroups.iter().find(|c| !c.split_once('=').is_some_and(|(k, _)| k.contains('.')))
        {
            return Err(format!("jailer_cgroups entry {bad:?} is not FILE=VALUE (e.g. \"cpu.max=50000 100000\")"));
        }
        if self.firecracker_jailer {
            if self.jailer_uid == 0 || self.jailer_gid == 0 {
                return Err("firecracker_jailer = true needs jailer_uid and jailer_gid of an unprivileged user \
                            (e.g. a dedicated `firecracker` user); root would defeat the jail"
                    .into());
            }
            if !self.jailer_chroot_base.starts_with('/') {
                return Err(format!("jailer_chroot_base {:?} must be an absolute path", self.jailer_chroot_base));
            }
        }
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

/// One `sync_files` entry, checked: where the host file is and where in /root it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncFile {
    /// The entry as written.
    pub entry: String,
    /// The host path as written: absolute, or `~/`-relative.
    pub host: String,
    /// The guest path relative to /root (`a/b`), when the entry gives one.
    pub guest: Option<String>,
}

/// A path relative to /root without empty, `.` or `..` components, or why not.
fn clean_relative(path: &str) -> Result<String, &'static str> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err("it names no file");
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err("'.' and '..' are not allowed");
    }
    Ok(parts.join("/"))
}

impl SyncFile {
    /// Parses `HOST_PATH` or `HOST_PATH:GUEST_PATH` (split at the first `:`).
    pub fn parse(entry: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("sync_files entry '{entry}': {why}");
        let (host, guest) = match entry.split_once(':') {
            Some((host, guest)) => (host, Some(guest)),
            None => (entry, None),
        };
        if let Some(rest) = host.strip_prefix("~/") {
            clean_relative(rest).map_err(|why| bad(&format!("host path {why}")))?;
        } else if host.starts_with('/') {
            clean_relative(host).map_err(|why| bad(&format!("host path {why}")))?;
        } else {
            return Err(bad("the host path must be absolute or start with ~/"));
        }
        let guest = match guest {
            None => None,
            Some(g) => {
                let relative = if let Some(rest) = g.strip_prefix("~/") {
                    rest
                } else if let Some(rest) = g.strip_prefix("/root/") {
                    rest
                } else if g.starts_with('/') || g.starts_with('~') {
                    return Err(bad("the guest path must be under /root (the work disk): ~/PATH, /root/PATH or PATH"));
                } else {
                    g
                };
                Some(clean_relative(relative).map_err(|why| bad(&format!("guest path {why}")))?)
            }
        };
        Ok(Self { entry: entry.to_owned(), host: host.to_owned(), guest })
    }

    /// The host file and its guest path relative to /root, with `~` being `home`.
    pub fn resolve(&self, home: Option<&std::path::Path>) -> Result<(std::path::PathBuf, String), String> {
        let bad = |why: String| format!("sync_files entry '{}': {why}", self.entry);
        let home_rel = |rest: &str| -> Result<std::path::PathBuf, String> {
            home.map(|h| h.join(rest)).ok_or_else(|| bad("$HOME of the daemon is not set, so ~/ means nothing".into()))
        };
        let (host, relative) = match self.host.strip_prefix("~/") {
            Some(rest) => (home_rel(rest)?, clean_relative(rest).ok()),
            None => {
                let host = std::path::PathBuf::from(&self.host);
                let under_home = home
                    .and_then(|h| host.strip_prefix(h).ok())
                    .and_then(|rel| rel.to_str())
                    .and_then(|rel| clean_relative(rel).ok());
                (host, under_home)
            }
        };
        let guest = match (&self.guest, relative) {
            (Some(guest), _) => guest.clone(),
            (None, Some(relative)) => relative,
            (None, None) => {
                return Err(bad(format!(
                    "{} is outside $HOME; give a guest path, e.g. '{}:~/NAME'",
                    self.host, self.host
                )))
            }
        };
        Ok((host, guest))
    }
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
    fn the_web_ui_listens_beyond_loopback_only_when_allowed() {
        assert_eq!(Config::default().web_addr().ok(), "127.0.0.1:7777".parse().ok());
        let e = Config::from_toml("web_listen = \"0.0.0.0:7777\"", "x").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("web_allow_remote = true")));
        assert!(Config::from_toml("web_listen = \"0.0.0.0:7777\"\nweb_allow_remote = true", "x").is_ok());
        assert!(Config::from_toml("web_listen = \"[::1]:0\"", "x").is_ok());
        assert!(Config::from_toml("web_listen = \"localhost\"", "x").is_err(), "IP:PORT only");
    }

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
        let e = Config::from_toml("sync_files = [\"rel/path\"]", "x").err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|m| m.contains("'rel/path'") && m.contains("~/")), "{e:?}");
    }

    #[test]
    fn egress_keys() {
        let c = Config::from_toml(
            "egress_mode = \"allowlist\"\negress_allow = [\"*.pypi.org\", \"10.0.0.0/8:443\"]\n",
            "x",
        )
        .expect("parse");
        assert_eq!(c.default_egress().to_string(), "allowlist allow=*.pypi.org,10.0.0.0/8:443");
        assert_eq!(Config::from_toml(&c.to_toml(), "x").ok(), Some(c));
        let e = Config::from_toml("egress_deny = [\"a b\"]", "x").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("invalid host rule 'a b'"), "{e}");
    }

    #[test]
    fn firecracker_keys() {
        let c = Config::from_toml(
            "firecracker_bin = \"/opt/fc/firecracker\"\nfirecracker_jailer = true\njailer_uid = 900\njailer_gid = 900\n\
             jailer_cgroups = [\"cpu.max=50000 100000\"]\n",
            "x",
        )
        .expect("parse");
        assert_eq!(c.firecracker_bin, "/opt/fc/firecracker");
        assert!(c.firecracker_jailer);
        assert_eq!((c.jailer_uid, c.jailer_gid, c.jailer_cgroup_version), (900, 900, 2));
        assert_eq!(c.jailer_chroot_base, "/srv/jailer");
        let err = |text: &str| Config::from_toml(text, "x").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err("firecracker_jailer = true").contains("jailer_uid and jailer_gid"));
        assert!(err("jailer_cgroup_version = 3").contains("not 1 or 2"));
        assert!(err("jailer_cgroups = [\"nonsense\"]").contains("FILE=VALUE"));
        assert!(err("firecracker_bin = \"\"").contains("firecracker_bin is empty"));
        let relative = "firecracker_jailer = true\njailer_uid = 9\njailer_gid = 9\njailer_chroot_base = \"jail\"";
        assert!(err(relative).contains("absolute"));
    }

    #[test]
    fn sync_files_parse() {
        let p = |e: &str| SyncFile::parse(e).map(|s| (s.host, s.guest));
        assert_eq!(p("~/.npmrc"), Ok(("~/.npmrc".into(), None)));
        assert_eq!(p("/etc/gitconfig:~/.gitconfig"), Ok(("/etc/gitconfig".into(), Some(".gitconfig".into()))));
        assert_eq!(p("~/a:/root/b//c"), Ok(("~/a".into(), Some("b/c".into()))));
        assert_eq!(p("~/a:docs/a.txt"), Ok(("~/a".into(), Some("docs/a.txt".into()))));
        for bad in ["", "~", "~/", "rel", "~/../x", "/a/./b", "~/a:/etc/x", "~/a:~", "~/a:/root", "~/a:../x", "~/a:"] {
            assert!(SyncFile::parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = SyncFile::parse("~/a:/etc/x").err().unwrap_or_default();
        assert!(e.contains("under /root"), "{e}");
    }

    #[test]
    fn sync_files_resolve_against_home() {
        let home = std::path::Path::new("/home/me");
        let r = |e: &str| SyncFile::parse(e).and_then(|s| s.resolve(Some(home)));
        assert_eq!(r("~/.config/git/ignore"), Ok((home.join(".config/git/ignore"), ".config/git/ignore".into())));
        assert_eq!(r("/home/me/.npmrc"), Ok((home.join(".npmrc"), ".npmrc".into())));
        assert_eq!(r("/etc/hosts:~/hosts"), Ok(("/etc/hosts".into(), "hosts".into())));
        let outside = r("/etc/hosts").err().unwrap_or_default();
        assert!(outside.contains("outside $HOME") && outside.contains("'/etc/hosts:~/NAME'"), "{outside}");
        let no_home = SyncFile::parse("~/.npmrc").and_then(|s| s.resolve(None)).err().unwrap_or_default();
        assert!(no_home.contains("$HOME"), "{no_home}");
        assert_eq!(
            SyncFile::parse("/etc/hosts:x").and_then(|s| s.resolve(None)),
            Ok(("/etc/hosts".into(), "x".into()))
        );
    }
}
