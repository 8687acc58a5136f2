//! What a boot needs ([`LaunchSpec`], run with an [`Accel`]) and the file names every VM
//! directory uses ([`VmPaths`]).
//!
//! The daemon fills a [`LaunchSpec`]; the driver turns it into a VMM process. Socket, pidfile and
//! log names are fixed here so that the daemon, `doctor` and the drivers agree on them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation (slow, works everywhere).
    Tcg,
}

impl Accel {
    /// The accelerator's name as QEMU spells it (`kvm`, `tcg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// File name of the VMM control socket (QMP for QEMU) in a VM directory.
pub const CONTROL_SOCKET_FILE: &str = "qmp.sock";
/// File name of the host end of the agent channel (virtio-serial) in a VM directory.
pub const AGENT_SOCKET_FILE: &str = "agent.sock";
/// File name of the VMM pidfile in a VM directory.
pub const PIDFILE_FILE: &str = "vmm.pid";
/// File name of the guest serial console log in a VM directory.
pub const CONSOLE_LOG_FILE: &str = "console.log";
/// File name of the VMM's own stderr in a VM directory.
pub const STDERR_FILE: &str = "vmm.stderr";

/// Name of the virtio-serial port the guest agent opens (`/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT_NAME: &str = "banger.agent";

/// Longest path a unix socket address can hold (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The well-known files of one VM directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPaths {
    /// The VM directory itself.
    pub vm_dir: PathBuf,
    /// `<vm_dir>/qmp.sock`: the VMM control socket.
    pub control_socket: PathBuf,
    /// `<vm_dir>/agent.sock`: the host end of the agent channel.
    pub agent_socket: PathBuf,
    /// `<vm_dir>/vmm.pid`: the VMM pidfile.
    pub pidfile: PathBuf,
    /// `<vm_dir>/console.log`: the guest serial console.
    pub console_log: PathBuf,
    /// `<vm_dir>/vmm.stderr`: the VMM's stderr.
    pub stderr_log: PathBuf,
}

impl VmPaths {
    /// The well-known files of `vm_dir`.
    pub fn new(vm_dir: &Path) -> Self {
        Self {
            vm_dir: vm_dir.to_owned(),
            control_socket: vm_dir.join(CONTROL_SOCKET_FILE),
            agent_socket: vm_dir.join(AGENT_SOCKET_FILE),
            pidfile: vm_dir.join(PIDFILE_FILE),
            console_log: vm_dir.join(CONSOLE_LOG_FILE),
            stderr_log: vm_dir.join(STDERR_FILE),
        }
    }
}

impl VmPaths {
    /// Removes the runtime files a VMM leaves behind (control and agent sockets, pidfile);
    /// missing ones are fine. Call it once the VMM is gone.
    pub fn remove_runtime_files(&self) -> std::io::Result<()> {
        for path in [&self.control_socket, &self.agent_socket, &self.pidfile] {
            match std::fs::remove_file(path) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        Ok(())
    }
}

/// One block device, in the order the guest sees them (`vda`, `vdb`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Raw disk image on the host.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

impl DiskSpec {
    /// A disk the guest may only read.
    pub fn read_only(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), read_only: true }
    }

    /// A disk the guest may write.
    pub fn writable(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), read_only: false }
    }
}

/// The guest's network interface: a virtio-net device backed by an existing host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Host tap device name.
    pub tap: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// Everything a boot needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// VM id (stable, unique).
    pub vm_id: String,
    /// VM name (shown as the QEMU guest name).
    pub name: String,
    /// The VM directory; the VMM's command line names it, which is how liveness checks tell a
    /// VMM from a process that reused its pid.
    pub vm_dir: PathBuf,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Kernel as a bzImage (`vmlinuz`), what QEMU boots.
    pub kernel: PathBuf,
    /// Kernel as an ELF `vmlinux`, what Firecracker boots; unused by QEMU.
    pub kernel_elf: Option<PathBuf>,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// Disks in guest order: 0 the read-only base rootfs, 1 the per-VM overlay disk, 2 (optional)
    /// the work disk.
    pub disks: Vec<DiskSpec>,
    /// Extra kernel command-line parameters appended after the driver's own
    /// (e.g. `banger.hostname=web`).
    pub kernel_args: Vec<String>,
    /// Guest serial console log.
    pub console_log: PathBuf,
    /// Host end of the agent channel (a unix socket the VMM listens on).
    pub agent_socket: PathBuf,
    /// VMM control socket (QMP for QEMU).
    pub control_socket: PathBuf,
    /// VMM pidfile.
    pub pidfile: PathBuf,
    /// Network interface. Reserved for the networking work: drivers reject it for now.
    pub net: Option<NetSpec>,
    /// A file on tmpfs to back guest memory with, mapped shared (QEMU): a snapshot then saves
    /// the device state only and copies this file beside it, and forks map that copy privately
    /// ([`crate::snapshot_memory_file`]). `None`: anonymous memory, saved in the state. QEMU
    /// creates the file; the launch unlinks it once QEMU answers, so the memory goes with QEMU.
    /// A restore ignores it.
    pub memory_file: Option<PathBuf>,
    /// Give the guest a memory balloon with free page reporting (QEMU: [`crate::balloon`];
    /// Firecracker: `PUT /balloon`), so memory it frees goes back to the host. A restore ignores it: a saved guest gets the
    /// devices it was saved with ([`crate::snapshot_devices_file`]).
    #[serde(default)]
    pub balloon: bool,
    /// Spare drive slots to boot with (QEMU; [`crate::slots`]), their files in the VM dir. A
    /// restore ignores it: a saved guest gets the slots it was saved with.
    #[serde(default)]
    pub slots: u8,
}

impl LaunchSpec {
    /// A spec with the well-known paths of `vm_dir` ([`VmPaths`]), one vCPU, 512 MiB, no disks
    /// and no extra kernel parameters. Adjust the public fields afterwards.
    pub fn new(
        vm_id: impl Into<String>,
        name: impl Into<String>,
        vm_dir: &Path,
        kernel: impl Into<PathBuf>,
        initramfs: impl Into<PathBuf>,
    ) -> Self {
        let paths = VmPaths::new(vm_dir);
        Self {
            vm_id: vm_id.into(),
            name: name.into(),
            vm_dir: paths.vm_dir,
            vcpus: 1,
            memory_mib: 512,
            kernel: kernel.into(),
            kernel_elf: None,
            initramfs: initramfs.into(),
            disks: Vec::new(),
            kernel_args: Vec::new(),
            console_log: paths.console_log,
            agent_socket: paths.agent_socket,
            control_socket: paths.control_socket,
            pidfile: paths.pidfile,
            net: None,
            memory_file: None,
            balloon: false,
            slots: 0,
        }
    }

    /// Where the VMM's stderr goes: `<vm_dir>/vmm.stderr`.
    pub fn stderr_log(&self) -> PathBuf {
        self.vm_dir.join(STDERR_FILE)
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.vcpus == 0 {
            return Err(SpecError::NoVcpus);
        }
        if self.memory_mib < 64 {
            return Err(SpecError::TooLittleMemory { memory_mib: self.memory_mib });
        }
        if !self.vm_dir.is_absolute() {
            return Err(SpecError::RelativeVmDir { vm_dir: self.vm_dir.clone() });
        }
        if !self.pidfile.starts_with(&self.vm_dir) {
            return Err(SpecError::PidfileOutsideVmDir { pidfile: self.pidfile.clone() });
        }
        for socket in [&self.control_socket, &self.agent_socket] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(SpecError::SocketPathTooLong { path: socket.clone() });
            }
        }
        if let Some(file) = self.memory_file.as_ref().filter(|f| !f.is_absolute()) {
            return Err(SpecError::RelativeMemoryFile { path: file.clone() });
        }
        if let Some(arg) = self.kernel_args.iter().find(|arg| arg.is_empty() || arg.contains(char::is_whitespace)) {
            return Err(SpecError::BadKernelArg { arg: arg.clone() });
        }
        if let Some(net) = &self.net {
            let tap_ok = !net.tap.is_empty()
                && net.tap.len() <= 15
                && net.tap.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !tap_ok {
                return Err(SpecError::BadNet(format!("tap name {:?} is not a valid interface name", net.tap)));
            }
            let parts: Vec<&str> = net.mac.split(':').collect();
            let mac_ok =
                parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
            if !mac_ok {
                return Err(SpecError::BadNet(format!("MAC {:?} is not of the form 02:ab:cd:ef:01:23", net.mac)));
            }
        }
        Ok(())
    }
}

/// A [`LaunchSpec`] that cannot be booted as written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Zero vCPUs.
    #[error("a vm needs at least one vcpu; set vcpus to 1 or more")]
    NoVcpus,
    /// Less memory than a kernel boots in.
    #[error("{memory_mib} MiB of memory is too little to boot; give the vm at least 64 MiB")]
    TooLittleMemory {
        /// The memory asked for.
        memory_mib: u32,
    },
    /// The VM directory is relative (liveness checks match it against `/proc/<pid>/cmdline`).
    #[error("vm dir {} is relative; pass an absolute path", vm_dir.display())]
    RelativeVmDir {
        /// The directory.
        vm_dir: PathBuf,
    },
    /// The pidfile is outside the VM directory, so the VMM command line might not name the
    /// directory.
    #[error("pidfile {} is outside the vm dir; keep it in the vm dir", pidfile.display())]
    PidfileOutsideVmDir {
        /// The pidfile.
        pidfile: PathBuf,
    },
    /// The memory file is relative.
    #[error("memory file {} is relative; pass an absolute path", path.display())]
    RelativeMemoryFile {
        /// The file.
        path: PathBuf,
    },
    /// A socket path longer than a unix socket address holds.
    #[error("socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter state dir", path.display())]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// A kernel parameter that is empty or holds whitespace.
    #[error("kernel parameter {arg:?} is empty or holds whitespace; pass one parameter per entry")]
    BadKernelArg {
        /// The parameter.
        arg: String,
    },
    /// The network interface is malformed.
    #[error("bad network interface: {0}")]
    BadNet(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec::new("id1", "web", Path::new("/var/lib/banger/vms/id1"), "/k/vmlinuz", "/k/initrd")
    }

    #[test]
    fn well_known_paths() {
        let paths = VmPaths::new(Path::new("/v"));
        assert_eq!(paths.control_socket, Path::new("/v/qmp.sock"));
        assert_eq!(paths.agent_socket, Path::new("/v/agent.sock"));
        assert_eq!(paths.pidfile, Path::new("/v/vmm.pid"));
        assert_eq!(paths.console_log, Path::new("/v/console.log"));
        assert_eq!(paths.stderr_log, Path::new("/v/vmm.stderr"));
        let spec = spec();
        assert_eq!(spec.control_socket, Path::new("/var/lib/banger/vms/id1/qmp.sock"));
        assert_eq!(spec.stderr_log(), Path::new("/var/lib/banger/vms/id1/vmm.stderr"));
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn removes_runtime_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = VmPaths::new(dir.path());
        std::fs::write(&paths.pidfile, "1\n").expect("write");
        std::fs::write(&paths.console_log, "log").expect("write");
        paths.remove_runtime_files().expect("removes");
        assert!(!paths.pidfile.exists());
        assert!(paths.console_log.exists(), "logs are kept");
        paths.remove_runtime_files().expect("missing files are fine");
    }

    #[test]
    fn validation() {
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(s.validate(), Err(SpecError::NoVcpus));
        let mut s = spec();
        s.memory_mib = 16;
        assert!(matches!(s.validate(), Err(SpecError::TooLittleMemory { .. })));
        let mut s = spec();
        s.pidfile = "/tmp/x.pid".into();
        assert!(matches!(s.validate(), Err(SpecError::PidfileOutsideVmDir { .. })));
        let mut s = spec();
        s.agent_socket = PathBuf::from(format!("/{}", "a".repeat(120)));
        assert!(matches!(s.validate(), Err(SpecError::SocketPathTooLong { .. })));
        let mut s = spec();
        s.kernel_args = vec!["a b".into()];
        assert!(matches!(s.validate(), Err(SpecError::BadKernelArg { .. })));
        let mut s = spec();
        s.net = Some(NetSpec { tap: "tap0".into(), mac: "02:00:00:00:00:01".into() });
        assert_eq!(s.validate(), Ok(()));
        s.net = Some(NetSpec { tap: "tap0,script=/x".into(), mac: "02:00:00:00:00:01".into() });
        assert!(matches!(s.validate(), Err(SpecError::BadNet(_))));
        s.net = Some(NetSpec { tap: "tap0".into(), mac: "02:00:00:00:01".into() });
        assert!(matches!(s.validate(), Err(SpecError::BadNet(_))));
        let mut s = spec();
        s.vm_dir = "rel".into();
        s.pidfile = "rel/vmm.pid".into();
        assert!(matches!(s.validate(), Err(SpecError::RelativeVmDir { .. })));
    }
}
