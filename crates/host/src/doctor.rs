//! `banger doctor`: one line per check of what banger needs from the host, each ok, warn or
//! fail, with the fix. Also decides whether KVM is usable for stock guests, which the VMM
//! selection uses too.

use std::path::Path;

use serde::Serialize;

use crate::probe::HostProbe;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, with a caveat.
    Warn,
    /// banger cannot do its job until this is fixed.
    Fail,
}

impl Status {
    /// The status as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name, e.g. `kvm`.
    pub name: &'static str,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it, when not ok.
    pub fix: Option<String>,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check { name, status, detail: detail.into(), fix: fix.map(str::to_owned) }
}

/// What KVM can do here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmSupport {
    /// `/dev/kvm` runs stock guests.
    Usable,
    /// `/dev/kvm` is a PVM implementation: only PVM-patched guests boot.
    PvmOnly,
    /// No usable `/dev/kvm`.
    Absent,
}

/// Decides what KVM can do on this host.
pub fn kvm_support(probe: &dyn HostProbe) -> KvmSupport {
    let dev = Path::new("/dev/kvm");
    if !probe.exists(dev) || !probe.openable_rw(dev) {
        KvmSupport::Absent
    } else if probe.exists(Path::new("/sys/module/kvm_pvm")) {
        KvmSupport::PvmOnly
    } else {
        KvmSupport::Usable
    }
}

/// What the checks need to know about banger's own setup.
#[derive(Debug, Clone)]
pub struct DoctorInput<'a> {
    /// The state directory.
    pub state_dir: &'a Path,
    /// The API socket.
    pub socket: &'a Path,
    /// Whether a socket group is configured (mode 0660 instead of 0600).
    pub socket_group: bool,
    /// The Firecracker binary the config names (`firecracker_bin`: a path or a name on `PATH`).
    pub firecracker_bin: &'a str,
    /// What the configured VMM choice picks here and why (from the VMM selection), or why it
    /// cannot be satisfied (with the fix).
    pub vmm_pick: Option<Result<String, String>>,
}

const GIB: u64 = 1024 * 1024 * 1024;

/// Runs every check.
pub fn run(probe: &dyn HostProbe, input: &DoctorInput<'_>) -> Vec<Check> {
    let mut checks = vec![kvm_check(probe)];
    checks.push(program_check(probe, "qemu", "qemu-system-x86_64", Status::Fail, "apt-get install qemu-system-x86"));
    checks.push(firecracker_check(probe, input.firecracker_bin));
    if let Some(pick) = &input.vmm_pick {
        checks.push(vmm_check(pick));
    }
    checks.push(program_check(probe, "mkfs.ext4", "mkfs.ext4", Status::Fail, "apt-get install e2fsprogs"));
    checks.push(program_check(probe, "mmdebstrap", "mmdebstrap", Status::Fail, "apt-get install mmdebstrap"));
    checks.push(program_check(
        probe,
        "nft",
        "nft",
        Status::Fail,
        "apt-get install nftables (guest isolation and NAT), or set `network = false` in config.toml",
    ));
    checks.push(tun_check(probe));
    checks.push(program_check(
        probe,
        "ssh",
        "ssh",
        Status::Warn,
        "apt-get install openssh-client (for `banger vm ssh`)",
    ));
    checks.push(space_check(probe, input.state_dir));
    checks.push(socket_check(probe, input));
    checks
}

fn kvm_check(probe: &dyn HostProbe) -> Check {
    match kvm_support(probe) {
        KvmSupport::Usable => check("kvm", Status::Ok, "/dev/kvm runs stock guests: hardware acceleration", None),
        KvmSupport::PvmOnly => check(
            "kvm",
            Status::Warn,
            "KVM only runs PVM guests here (kvm_pvm loaded): QEMU TCG will be used",
            Some("nothing to do; guests boot under TCG emulation, slower than KVM"),
        ),
        KvmSupport::Absent => check(
            "kvm",
            Status::Warn,
            "/dev/kvm is missing or not accessible: QEMU TCG will be used",
            Some("load kvm_intel or kvm_amd and give this user access to /dev/kvm for hardware acceleration"),
        ),
    }
}

fn tun_check(probe: &dyn HostProbe) -> Check {
    let tun = Path::new("/dev/net/tun");
    if probe.openable_rw(tun) {
        check("tun", Status::Ok, "/dev/net/tun: guest NICs are TAP devices", None)
    } else {
        check(
            "tun",
            Status::Fail,
            "/dev/net/tun is missing or not accessible: guests cannot get a NIC",
            Some("modprobe tun (run the daemon as root), or create VMs with --no-network"),
        )
    }
}

fn program_check(probe: &dyn HostProbe, name: &'static str, program: &str, missing: Status, fix: &str) -> Check {
    match probe.find_program(program) {
        Some(path) => check(name, Status::Ok, path.display().to_string(), None),
        None => check(name, missing, format!("{program} not found"), Some(fix)),
    }
}

/// What the VMM selection picks, as a check: ok with the pick and its reason, or a failure
/// when the configured choice cannot run here.
fn vmm_check(pick: &Result<String, String>) -> Check {
    match pick {
        Ok(why) => check("vmm", Status::Ok, why.clone(), None),
        Err(why) => check(
            "vmm",
            Status::Fail,
            why.clone(),
            Some("set `vmm = \"auto\"` (or \"qemu\") in config.toml, or fix what the message names"),
        ),
    }
}

fn firecracker_check(probe: &dyn HostProbe, binary: &str) -> Check {
    let kvm = kvm_support(probe);
    let program = if binary.is_empty() { "firecracker" } else { binary };
    let found = if program.contains('/') {
        Some(Path::new(program)).filter(|p| probe.exists(p)).map(Path::to_path_buf)
    } else {
        probe.find_program(program)
    };
    match (found, kvm) {
        (Some(path), KvmSupport::Usable) => check("firecracker", Status::Ok, path.display().to_string(), None),
        (Some(path), _) => check(
            "firecracker",
            Status::Warn,
            format!("{} found, but KVM cannot run stock guests here", path.display()),
            Some("the qemu driver is used instead; nothing to do"),
        ),
        (None, _) => check(
            "firecracker",
            Status::Warn,
            format!("{program} not found (optional: the qemu driver is used)"),
            Some("install a firecracker release binary (v1.16) on PATH, or set `firecracker_bin` in config.toml, to use --vmm firecracker"),
        ),
    }
}

fn space_check(probe: &dyn HostProbe, state_dir: &Path) -> Check {
    let shown = state_dir.display();
    match probe.free_bytes(state_dir) {
        None => check(
            "disk space",
            Status::Fail,
            format!("cannot read free space for {shown}"),
            Some("check that the state dir's filesystem is mounted"),
        ),
        Some(free) if free < 2 * GIB => check(
            "disk space",
            Status::Fail,
            format!("{:.1} GiB free for {shown}", free as f64 / GIB as f64),
            Some("free space or move the state dir (--state-dir); images and VM disks need several GiB"),
        ),
        Some(free) if free < 10 * GIB => check(
            "disk space",
            Status::Warn,
            format!("{:.1} GiB free for {shown}", free as f64 / GIB as f64),
            Some("10 GiB or more is comfortable for a few images and VMs"),
        ),
        Some(free) => {
            check("disk space", Status::Ok, format!("{:.1} GiB free for {shown}", free as f64 / GIB as f64), None)
        }
    }
}

fn socket_check(probe: &dyn HostProbe, input: &DoctorInput<'_>) -> Check {
    let want = if input.socket_group { 0o660 } else { 0o600 };
    let shown = input.socket.display();
    if !probe.exists(input.socket) {
        return check(
            "socket",
            Status::Ok,
            format!("{shown} absent: the daemon is not running; it will be made with mode {want:o}"),
            None,
        );
    }
    match probe.mode_and_gid(input.socket) {
        Some((mode, _)) if mode & 0o777 == want => check("socket", Status::Ok, format!("{shown} mode {mode:o}"), None),
        Some((mode, _)) => check(
            "socket",
            Status::Fail,
            format!("{shown} has mode {mode:o}, expected {want:o}"),
            Some("restart the daemon (`banger daemon stop`, then any banger command) to recreate the socket"),
        ),
        None => check(
            "socket",
            Status::Warn,
            format!("cannot stat {shown}"),
            Some("check the socket's directory permissions"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{FakeProbe, ProbeCall};
    use std::path::PathBuf;

    fn input() -> DoctorInput<'static> {
        DoctorInput {
            state_dir: Path::new("/var/lib/banger"),
            socket: Path::new("/run/banger/bangerd.sock"),
            socket_group: false,
            firecracker_bin: "firecracker",
            vmm_pick: None,
        }
    }

    fn status_of(checks: &[Check], name: &str) -> Status {
        checks.iter().find(|c| c.name == name).map_or(Status::Fail, |c| c.status)
    }

    #[test]
    fn pvm_host_falls_back_to_tcg() {
        let mut probe = FakeProbe::default();
        probe.paths.insert("/dev/kvm".into());
        probe.rw.insert("/dev/kvm".into());
        probe.paths.insert("/sys/module/kvm_pvm".into());
        assert_eq!(kvm_support(&probe), KvmSupport::PvmOnly);
        let checks = run(&probe, &input());
        let kvm = &checks[0];
        assert_eq!(kvm.status, Status::Warn);
        assert!(kvm.detail.contains("KVM only runs PVM guests here") && kvm.detail.contains("QEMU TCG will be used"));
        assert!(probe.calls.borrow().contains(&ProbeCall::Exists("/sys/module/kvm_pvm".into())));
    }

    #[test]
    fn missing_tools_fail_with_the_fix() {
        let probe = FakeProbe { free: Some(100 * GIB), ..Default::default() };
        let checks = run(&probe, &input());
        assert_eq!(status_of(&checks, "qemu"), Status::Fail);
        let qemu = checks.iter().find(|c| c.name == "qemu").expect("qemu check");
        assert_eq!(qemu.fix.as_deref(), Some("apt-get install qemu-system-x86"));
        assert_eq!(status_of(&checks, "firecracker"), Status::Warn);
        assert_eq!(status_of(&checks, "disk space"), Status::Ok);
        assert_eq!(status_of(&checks, "socket"), Status::Ok);
        assert_eq!(status_of(&checks, "kvm"), Status::Warn);
        assert_eq!(status_of(&checks, "tun"), Status::Fail);
        assert_eq!(status_of(&checks, "nft"), Status::Fail);
        assert_eq!(status_of(&checks, "ssh"), Status::Warn);
    }

    #[test]
    fn healthy_host_is_all_ok_but_optional_firecracker() {
        let mut probe = FakeProbe { free: Some(100 * GIB), ..Default::default() };
        probe.paths.insert("/dev/kvm".into());
        probe.rw.insert("/dev/kvm".into());
        probe.rw.insert("/dev/net/tun".into());
        for p in ["qemu-system-x86_64", "firecracker", "mkfs.ext4", "mmdebstrap", "nft", "ssh"] {
            probe.programs.insert(p.into(), PathBuf::from("/usr/bin").join(p));
        }
        probe.paths.insert("/run/banger/bangerd.sock".into());
        probe.modes.insert("/run/banger/bangerd.sock".into(), (0o600, 0));
        let checks = run(&probe, &input());
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:#?}");
    }

    #[test]
    fn vmm_pick_is_reported() {
        let probe = FakeProbe { free: Some(100 * GIB), ..Default::default() };
        let mut input = input();
        input.vmm_pick = Some(Ok("auto picks qemu (tcg): firecracker is not installed".into()));
        let checks = run(&probe, &input);
        let vmm = checks.iter().find(|c| c.name == "vmm").expect("vmm check");
        assert_eq!(vmm.status, Status::Ok);
        assert_eq!(vmm.detail, "auto picks qemu (tcg): firecracker is not installed");
        input.vmm_pick = Some(Err("firecracker cannot run on this host: ...".into()));
        let checks = run(&probe, &input);
        assert_eq!(status_of(&checks, "vmm"), Status::Fail);
    }

    #[test]
    fn configured_firecracker_path_is_checked() {
        let mut probe = FakeProbe::default();
        probe.paths.insert("/opt/fc/firecracker".into());
        let mut input = input();
        input.firecracker_bin = "/opt/fc/firecracker";
        let checks = run(&probe, &input);
        let fc = checks.iter().find(|c| c.name == "firecracker").expect("firecracker check");
        assert!(fc.detail.starts_with("/opt/fc/firecracker found"), "{}", fc.detail);
        input.firecracker_bin = "/opt/none/firecracker";
        let checks = run(&probe, &input);
        let fc = checks.iter().find(|c| c.name == "firecracker").expect("firecracker check");
        assert_eq!(fc.detail, "/opt/none/firecracker not found (optional: the qemu driver is used)");
    }

    #[test]
    fn low_space_and_open_socket_fail() {
        let mut probe = FakeProbe { free: Some(GIB), ..Default::default() };
        probe.paths.insert("/run/banger/bangerd.sock".into());
        probe.modes.insert("/run/banger/bangerd.sock".into(), (0o666, 0));
        let checks = run(&probe, &input());
        assert_eq!(status_of(&checks, "disk space"), Status::Fail);
        assert_eq!(status_of(&checks, "socket"), Status::Fail);
    }
}
