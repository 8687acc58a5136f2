//! A minimal `/init` for banger-vmm's real-guest tests.
//!
//! It mounts `/proc`, `/sys` and `/dev`, prints [`MARKER`] to the console, loads the modules
//! listed in `/etc/banger/modules.order` (in order, with `finit_module`), finds the virtio-serial
//! port named `banger.agent`, waits for the host to connect, and writes
//! `BANGER-AGENT-HELLO <disks>` where `<disks>` is `vda:ro=1:sectors=N,vdb:...`. It then answers
//! one line `ping X` with `pong X`. With `banger.test=stay` on the kernel command line it then
//! idles (so the host can test `quit`); otherwise it powers the machine off. On any failure it
//! prints `BANGER-TEST-INIT: error: ...` and powers off.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Printed to the console as soon as init runs.
const MARKER: &str = "BANGER-TEST-INIT: started";
const MODULES_ORDER: &str = "/etc/banger/modules.order";
const PORT_NAME: &str = "banger.agent";

fn main() {
    println!("{MARKER}");
    if let Err(error) = run() {
        println!("BANGER-TEST-INIT: error: {error}");
    }
    power_off();
}

fn run() -> Result<(), String> {
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")?;
    mount("devtmpfs", "/dev", "devtmpfs")?;
    let order = fs::read_to_string(MODULES_ORDER).map_err(|e| format!("read {MODULES_ORDER}: {e}"))?;
    for module in order.lines().filter(|line| !line.trim().is_empty()) {
        load_module(module.trim())?;
    }
    let port = wait_for(Duration::from_secs(20), find_port).ok_or("no virtio port named banger.agent")?;
    let mut file = OpenOptions::new().read(true).write(true).open(&port).map_err(|e| format!("open {port:?}: {e}"))?;
    wait_for_host(&file)?;

    let disks: Vec<String> = ["vda", "vdb", "vdc"]
        .iter()
        .filter_map(|name| {
            let dir = Path::new("/sys/block").join(name);
            let ro = fs::read_to_string(dir.join("ro")).ok()?;
            let sectors = fs::read_to_string(dir.join("size")).ok()?;
            Some(format!("{name}:ro={}:sectors={}", ro.trim(), sectors.trim()))
        })
        .collect();
    writeln!(file, "BANGER-AGENT-HELLO {}", disks.join(",")).map_err(|e| format!("write port: {e}"))?;

    let line = read_line(&mut file)?;
    let rest = line.strip_prefix("ping ").ok_or_else(|| format!("expected ping, got {line:?}"))?;
    writeln!(file, "pong {rest}").map_err(|e| format!("write port: {e}"))?;

    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|arg| arg == "banger.test=stay") {
        println!("BANGER-TEST-INIT: staying up");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    println!("BANGER-TEST-INIT: powering off");
    Ok(())
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<(), String> {
    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let (source_c, target_c, fstype_c) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is null.
    let rc = unsafe { libc::mount(source_c.as_ptr(), target_c.as_ptr(), fstype_c.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(format!("mount {target}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn load_module(path: &str) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let params = c"";
    // SAFETY: the fd is open for the call's duration and params is a valid empty C string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("load {path}: {error}"));
        }
    }
    Ok(())
}

fn find_port() -> Option<PathBuf> {
    fs::read_dir("/sys/class/virtio-ports").ok()?.flatten().find_map(|entry| {
        let name = fs::read_to_string(entry.path().join("name")).ok()?;
        (name.trim() == PORT_NAME).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// While no host client is connected, the port polls POLLHUP: wait until it clears.
fn wait_for_host(file: &File) -> Result<(), String> {
    let connected = wait_for(Duration::from_secs(30), || {
        let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: pfd is a valid pollfd array of length 1 for the call's duration.
        let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
        (rc > 0 && pfd.revents & libc::POLLHUP == 0).then_some(())
    });
    connected.ok_or_else(|| "host never connected to the agent port".into())
}

fn read_line(file: &mut File) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while Instant::now() < deadline {
        match file.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => return String::from_utf8(line).map_err(|e| e.to_string()),
            Ok(1) => line.push(byte[0]),
            // 0: no host connected right now.
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read port: {e}")),
        }
    }
    Err("no line from the host".into())
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
