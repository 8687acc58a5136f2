//! The agent as PID 1 (the initramfs `/init`): API mounts, console, kernel modules, the
//! copy-on-write root, hostname and network, then either staying PID 1 and serving (`fast`) or
//! handing PID 1 to systemd and serving from a child (`systemd`). Any fatal error is logged on
//! the console and the VM powers off, so the host sees it end instead of hanging.
//!
//! Parameters come from `/proc/cmdline` (the kernel does not pass dotted ones to init):
//! `banger.root=DEV` (required), `banger.overlay=DEV` (required), `banger.work=DEV`,
//! `banger.hostname=NAME`, `banger.init=fast|systemd`, `banger.run=PROGRAM[,ARG...]` (run it and
//! power off, serving nothing), `banger.ip=ADDR/PREFIX`, `banger.gw=ADDR`,
//! `banger.dns=ADDR[,ADDR]`, `banger.poweroff=reboot` (end the VM by rebooting: Firecracker has no
//! power-off device, and `reboot=k` makes a reboot end it).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, ForkResult, Pid};

use crate::exec::{self, Command};
use crate::mounts::{self, MountError};
use crate::net::{self, NetError};
use crate::serve::{self, Outcome, ServeError, Transport};

/// Where the initramfs lists modules to load, in order.
const MODULES_ORDER: &str = "/etc/banger/modules.order";
/// How long to wait for disks and the agent port.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// What PID 1 runs after the switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InitMode {
    /// The agent stays PID 1, reaps and serves; sshd is started if present.
    #[default]
    Fast,
    /// PID 1 execs /sbin/init; a forked child serves.
    Systemd,
}

/// The agent's kernel command-line parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    /// `banger.root`: the read-only base rootfs.
    pub root: Option<String>,
    /// `banger.overlay`: the per-VM writable disk.
    pub overlay: Option<String>,
    /// `banger.work`: mounted at /root.
    pub work: Option<String>,
    /// `banger.hostname`.
    pub hostname: Option<String>,
    /// `banger.init`.
    pub init: InitMode,
    /// `banger.ip`.
    pub ip: Option<String>,
    /// `banger.gw`.
    pub gw: Option<String>,
    /// `banger.dns`.
    pub dns: Option<String>,
    /// `banger.run=PROGRAM[,ARG...]`: run this once the root is up, then power off without
    /// serving the host (the baseline of `scripts/bench-boot`).
    pub run: Option<String>,
    /// `banger.poweroff=reboot`: end the VM with a reboot instead of a power-off.
    pub reboot_to_stop: bool,
}

/// Boot failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A parameter is missing or wrong.
    #[error("kernel command line: {0}")]
    Params(String),
    /// Mounting or switching root.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// Networking.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Serving the host.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Handing over to systemd.
    #[error("cannot start /sbin/init")]
    Systemd(#[source] nix::errno::Errno),
}

impl Params {
    /// Reads the `banger.*` parameters from a kernel command line.
    pub fn parse(cmdline: &str) -> Result<Self, InitError> {
        let mut params = Self::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else { continue };
            let value = value.trim_matches('"').to_owned();
            match key {
                "banger.root" => params.root = Some(value),
                "banger.overlay" => params.overlay = Some(value),
                "banger.work" => params.work = Some(value),
                "banger.hostname" => params.hostname = Some(value),
                "banger.ip" => params.ip = Some(value),
                "banger.gw" => params.gw = Some(value),
                "banger.dns" => params.dns = Some(value),
                "banger.run" => params.run = Some(value),
                "banger.poweroff" => params.reboot_to_stop = value == "reboot",
                "banger.init" => {
                    params.init = match value.as_str() {
                        "fast" => InitMode::Fast,
                        "systemd" => InitMode::Systemd,
                        other => return Err(InitError::Params(format!("banger.init={other}: use fast or systemd"))),
                    }
                }
                _ => {}
            }
        }
        Ok(params)
    }
}

/// Runs the boot path as PID 1. Never returns: it ends in power-off or in exec'ing systemd.
pub fn run() -> ! {
    // A panic in PID 1 would panic the kernel; power off with a message instead.
    std::panic::set_hook(Box::new(|info| {
        log!("panic: {info}");
        power_off();
    }));
    match boot() {
        Ok(()) => log!("powering off"),
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            log!("fatal: {message}; powering off");
        }
    }
    power_off()
}

fn boot() -> Result<(), InitError> {
    mounts::early()?;
    setup_console();
    log!("banger-agent {} starting as /init", env!("CARGO_PKG_VERSION"));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let params = Params::parse(&cmdline)?;
    REBOOT_TO_STOP.store(params.reboot_to_stop, std::sync::atomic::Ordering::SeqCst);
    let root = params.root.clone().ok_or_else(|| InitError::Params("banger.root= is missing".into()))?;
    let overlay = params.overlay.clone().ok_or_else(|| InitError::Params("banger.overlay= is missing".into()))?;

    let loaded = mounts::load_modules(Path::new(MODULES_ORDER));
    log!("loaded {loaded} modules");
    if let Err(e) = net::loopback_up() {
        log!("cannot bring up lo: {e}");
    }
    let mut disks = vec![root.as_str(), overlay.as_str()];
    disks.extend(params.work.as_deref());
    mounts::wait_for_devices(&disks, DEVICE_TIMEOUT)?;
    mounts::overlay_root(&root, &overlay)?;
    mounts::switch_root()?;
    log!("switched root to the overlay of {root} and {overlay}");
    if let Some(work) = &params.work {
        mounts::mount_work(work, "/root")?;
        // Workspaces attached as disks before a restart live on in their slots.
        crate::disks::mount_attached();
    }
    // The host key banger made for this VM (and pinned) replaces any the image would generate.
    let host_key = match install_host_key(Path::new(BANGER_HOST_KEY_DIR), Path::new(SSH_DIR)) {
        Ok(Some(key)) => {
            log!("ssh host key installed at {}", key.display());
            Some(key)
        }
        Ok(None) => None,
        Err(e) => {
            log!("cannot install the ssh host key: {e}");
            None
        }
    };
    if let Some(name) = &params.hostname {
        if let Err(e) = nix::unistd::sethostname(name) {
            log!("cannot set the hostname: {e}");
        }
        let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    }
    if let Some(ip) = &params.ip {
        net::configure("eth0", ip, params.gw.as_deref())?;
        log!("eth0: {ip} via {}", params.gw.as_deref().unwrap_or("no gateway"));
    }
    if let Some(dns) = &params.dns {
        if let Err(e) = net::write_resolv_conf(dns) {
            log!("cannot write /etc/resolv.conf: {e}");
        }
    }

    if let Some(run) = &params.run {
        let mut argv = run.split(',');
        let program = argv.next().unwrap_or_default();
        let status = std::process::Command::new(program).args(argv).status();
        log!("banger.run {run}: {status:?}");
        stop_everything();
        return Ok(());
    }
    match params.init {
        InitMode::Fast => {
            exec::start_reaper();
            start_sshd(host_key);
            crate::services::start();
            let transport = serve::find_transport(DEVICE_TIMEOUT)?;
            log!("ready, serving on {}", describe(&transport));
            serve::serve(&transport)?;
            stop_everything();
            Ok(())
        }
        InitMode::Systemd => hand_over_to_systemd(),
    }
}

/// Points fds 0–2 and the log at /dev/console (the kernel may have found none in the
/// initramfs).
fn setup_console() {
    match OpenOptions::new().read(true).write(true).open("/dev/console") {
        Ok(console) => {
            for fd in 0..3 {
                // SAFETY: fcntl(F_GETFD) only queries whether fd is open.
                if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    // SAFETY: dup2 onto a closed standard fd; `console` stays open.
                    unsafe { libc::dup2(console.as_raw_fd(), fd) };
                }
            }
            crate::log::to_console(console);
        }
        Err(e) => log!("cannot open /dev/console: {e}"),
    }
}

/// Where banger leaves the VM's ssh host key on the work disk (mounted at /root).
const BANGER_HOST_KEY_DIR: &str = "/root/.banger";
/// sshd's configuration directory.
const SSH_DIR: &str = "/etc/ssh";
/// The host key's file name, in both directories.
const HOST_KEY_NAME: &str = "ssh_host_ed25519_key";

/// Copies `from/ssh_host_ed25519_key` (and its `.pub`) into `to` for sshd: the key 0600, the
/// public half 0644. Returns the installed key's path, or `None` when `from` has no key.
pub fn install_host_key(from: &Path, to: &Path) -> std::io::Result<Option<std::path::PathBuf>> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let source = from.join(HOST_KEY_NAME);
    let key = match std::fs::read(&source) {
        Ok(key) => key,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    std::fs::create_dir_all(to)?;
    let target = to.join(HOST_KEY_NAME);
    // Never readable by others, not even for a moment; an existing file is tightened too.
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&target)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(&key)?;
    let public = from.join(format!("{HOST_KEY_NAME}.pub"));
    if let Ok(text) = std::fs::read(&public) {
        let target = to.join(format!("{HOST_KEY_NAME}.pub"));
        std::fs::write(&target, text)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(Some(target))
}

/// The commands that start sshd: with banger's host key, sshd alone on it; otherwise
/// `ssh-keygen -A` first (when there) to make the image's missing keys.
pub fn sshd_commands(host_key: Option<&Path>, has_keygen: bool) -> Vec<Vec<String>> {
    match host_key {
        Some(key) => vec![vec!["/usr/sbin/sshd".into(), "-h".into(), key.display().to_string()]],
        None if has_keygen => vec![vec!["/usr/bin/ssh-keygen".into(), "-A".into()], vec!["/usr/sbin/sshd".into()]],
        None => vec![vec!["/usr/sbin/sshd".into()]],
    }
}

/// Starts sshd if the image has it, in the background: without banger's host key, key
/// generation under TCG takes seconds and must not delay the agent.
pub fn start_sshd(host_key: Option<std::path::PathBuf>) {
    if !Path::new("/usr/sbin/sshd").exists() {
        return;
    }
    let spawned = std::thread::Builder::new().name("sshd".into()).spawn(move || {
        let _ = std::fs::create_dir_all("/run/sshd");
        let has_keygen = Path::new("/usr/bin/ssh-keygen").exists();
        for argv in sshd_commands(host_key.as_deref(), has_keygen) {
            let words: Vec<&str> = argv.iter().map(String::as_str).collect();
            let name = words.first().copied().unwrap_or_default();
            // sshd stays in the foreground: its parent is PID 1 and it leads its own session
            // without a terminal, so it considers itself daemonized already. Report its start,
            // then wait for it like for any other command.
            let command = Command::new(&words);
            let waited = if name.ends_with("sshd") {
                exec::spawn(&command).and_then(|child| {
                    log!("sshd started (pid {})", child.pid);
                    child
                        .exit
                        .recv()
                        .map_err(|_| exec::SpawnError::Sys { what: "wait for sshd", errno: nix::errno::Errno::ECHILD })
                })
            } else {
                exec::run(&command)
            };
            match waited {
                Ok(status) if status.code == 0 => {}
                Ok(status) => log!("{} exited with {}", words.join(" "), status.code),
                Err(e) => log!("cannot run {name}: {e}"),
            }
        }
    });
    if let Err(e) = spawned {
        log!("cannot start the sshd thread: {e}");
    }
}

/// systemd mode: the child serves, PID 1 becomes systemd.
fn hand_over_to_systemd() -> Result<(), InitError> {
    // SAFETY: no other thread exists yet in this process (the reaper and server start in the
    // child), so the child may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            exec::start_reaper();
            crate::services::start();
            let outcome = serve::find_transport(DEVICE_TIMEOUT).and_then(|transport| {
                log!("ready (systemd mode), serving on {}", describe(&transport));
                serve::serve(&transport)
            });
            match outcome {
                Ok(Outcome::Shutdown | Outcome::Closed) => {
                    // SIGRTMIN+4 asks systemd for a clean power-off, SIGRTMIN+5 for a reboot
                    // (which is what ends a VMM without a power-off device).
                    let reboot = REBOOT_TO_STOP.load(std::sync::atomic::Ordering::SeqCst);
                    let signal = libc::SIGRTMIN() + if reboot { 5 } else { 4 };
                    // SAFETY: plain kill(2) of PID 1.
                    unsafe { libc::kill(1, signal) };
                }
                Err(e) => log!("serving failed: {e}"),
            }
            std::process::exit(0)
        }
        Ok(ForkResult::Parent { .. }) => {
            let init = c"/sbin/init";
            let errno = nix::unistd::execv(init, &[init]).err().unwrap_or(nix::errno::Errno::UnknownErrno);
            Err(InitError::Systemd(errno))
        }
        Err(errno) => Err(InitError::Systemd(errno)),
    }
}

/// Fast-mode shutdown: SIGTERM everyone, up to 2 s grace, SIGKILL, then clean disks.
fn stop_everything() {
    log!("stopping all processes");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while user_processes() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while user_processes() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    mounts::quiesce();
}

/// Processes other than us and kernel threads (zombies count until reaped).
fn user_processes() -> usize {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.bytes().all(|b| b.is_ascii_digit()) && name != me && name != "1"
        })
        .filter(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // Field 9 (flags) counted after the ")" that ends the command name.
            let flags = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
            flags.is_some_and(|f| f & PF_KTHREAD == 0)
        })
        .count()
}

/// Syncs and powers off; never returns.
/// Set from `banger.poweroff=reboot`: [`power_off`] reboots (see the module docs).
static REBOOT_TO_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where the agent serves, for the console log.
fn describe(transport: &Transport) -> String {
    match transport {
        Transport::Port(path) | Transport::Listen(path) | Transport::Connect(path) => path.display().to_string(),
        Transport::Vsock(port) => format!("vsock port {port}"),
    }
}

/// How the VM ends: a power-off, or a reboot where the VMM has no power-off device.
fn stop_mode(reboot_to_stop: bool) -> RebootMode {
    if reboot_to_stop {
        RebootMode::RB_AUTOBOOT
    } else {
        RebootMode::RB_POWER_OFF
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = reboot(stop_mode(REBOOT_TO_STOP.load(std::sync::atomic::Ordering::SeqCst)));
    // Not PID 1, or not allowed: nothing else to do but stop.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parameters_are_read() {
        let line = "console=ttyS0 panic=-1 banger.root=/dev/vda banger.overlay=/dev/vdb banger.hostname=t1 \
                    banger.init=systemd banger.ip=172.16.0.2/24 banger.gw=172.16.0.1 banger.dns=1.1.1.1 quiet\n";
        let params = Params::parse(line).expect("parse");
        assert_eq!(params.root.as_deref(), Some("/dev/vda"));
        assert_eq!(params.overlay.as_deref(), Some("/dev/vdb"));
        assert_eq!(params.hostname.as_deref(), Some("t1"));
        assert_eq!(params.init, InitMode::Systemd);
        assert_eq!(params.ip.as_deref(), Some("172.16.0.2/24"));
        assert_eq!(params.gw.as_deref(), Some("172.16.0.1"));
        assert_eq!(params.dns.as_deref(), Some("1.1.1.1"));
        assert_eq!(params.work, None);
        assert_eq!(Params::parse("banger.root=/dev/vda").expect("parse").init, InitMode::Fast);
        assert!(Params::parse("banger.init=openrc").is_err());
        assert!(!params.reboot_to_stop);
    }

    #[test]
    fn firecracker_guests_stop_by_rebooting() {
        let params = Params::parse("reboot=k banger.root=/dev/vda banger.poweroff=reboot").expect("parse");
        assert!(params.reboot_to_stop);
        assert_eq!(stop_mode(params.reboot_to_stop), RebootMode::RB_AUTOBOOT);
        assert_eq!(stop_mode(false), RebootMode::RB_POWER_OFF);
        assert_eq!(describe(&Transport::Vsock(1024)), "vsock port 1024");
    }

    #[test]
    fn the_banger_host_key_is_installed_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let (from, to) = (dir.path().join("root/.banger"), dir.path().join("etc/ssh"));
        assert_eq!(install_host_key(&from, &to).expect("no key"), None);
        assert!(!to.exists(), "nothing made without a key");
        std::fs::create_dir_all(&from).expect("mkdir");
        std::fs::write(from.join(HOST_KEY_NAME), "PRIVATE").expect("write");
        std::fs::write(from.join("ssh_host_ed25519_key.pub"), "ssh-ed25519 AAAA root@t1\n").expect("write");
        std::fs::create_dir_all(&to).expect("mkdir");
        std::fs::write(to.join(HOST_KEY_NAME), "OLD KEY THAT IS LONGER").expect("write");
        std::fs::set_permissions(to.join(HOST_KEY_NAME), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let installed = install_host_key(&from, &to).expect("install");
        assert_eq!(installed, Some(to.join(HOST_KEY_NAME)));
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(std::fs::read_to_string(to.join(HOST_KEY_NAME)).expect("read"), "PRIVATE");
        assert_eq!(mode(&to.join(HOST_KEY_NAME)), 0o600);
        assert_eq!(mode(&to.join("ssh_host_ed25519_key.pub")), 0o644);
    }

    #[test]
    fn sshd_uses_the_banger_key_and_skips_keygen() {
        let key = Path::new("/etc/ssh/ssh_host_ed25519_key");
        assert_eq!(sshd_commands(Some(key), true), [["/usr/sbin/sshd", "-h", "/etc/ssh/ssh_host_ed25519_key"]]);
        assert_eq!(sshd_commands(None, true), [vec!["/usr/bin/ssh-keygen", "-A"], vec!["/usr/sbin/sshd"]]);
        assert_eq!(sshd_commands(None, false), [["/usr/sbin/sshd"]]);
    }
}
