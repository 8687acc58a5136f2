//! Real guests: boot the Debian cloud kernel under QEMU with an initramfs whose `/init` is the
//! static `vmm-test-init` (crates/vmm/test-guest-init), and check the console, the agent channel,
//! disk order, self power-off and `quit`.
//!
//! Gated: runs only when `BANGER_REAL_GUEST=1`. It then needs `BANGER_TEST_KERNEL_DEB` (a
//! `linux-image-*-cloud-amd64` .deb), `qemu-system-x86_64` and cargo; a missing one fails the test.
//! Run with `BANGER_REAL_GUEST=1 BANGER_TEST_KERNEL_DEB=/path/linux-image-....deb cargo test -p
//! banger-vmm --test it -- --nocapture` to see the timings.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_image::initramfs::build_guest_initramfs;
use banger_image::kernel::extract_kernel_deb;
use banger_image::modinfo::ModuleIndex;
use banger_vmm::{
    select, DiskSpec, HostFacts, LaunchSpec, Launched, QemuDriver, QmpClient, StopOutcome, Vmm, VmmChoice,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// What the test init prints first on the console.
const MARKER: &str = "BANGER-TEST-INIT: started";
/// Modules the guest needs for disks and the agent port.
const MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_console"];
/// Disk sizes in MiB, all different so the guest's report shows their order.
const DISK_MIB: [u64; 3] = [8, 16, 24];
/// Bound on any wait for the guest (TCG is slow, and the host may be busy).
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const BOOTS: usize = 3;

/// Returns whether real-guest tests are enabled; panics if they are but a prerequisite is missing.
fn enabled() -> bool {
    if std::env::var("BANGER_REAL_GUEST").as_deref() != Ok("1") {
        eprintln!("real-guest test not run: set BANGER_REAL_GUEST=1 to run it");
        return false;
    }
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        qemu.is_ok_and(|out| out.status.success()),
        "BANGER_REAL_GUEST=1 but qemu-system-x86_64 does not run; install it with `apt-get install qemu-system-x86`"
    );
    true
}

fn kernel_deb() -> PathBuf {
    let deb = std::env::var_os("BANGER_TEST_KERNEL_DEB").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "BANGER_REAL_GUEST=1 but BANGER_TEST_KERNEL_DEB is unset; point it at a linux-image-*-cloud-amd64 .deb \
             (`apt-get download linux-image-cloud-amd64`)"
        )
    });
    assert!(deb.is_file(), "BANGER_TEST_KERNEL_DEB={} is not a file", deb.display());
    deb
}

/// Builds the static test init with `+crt-static` into the test's target tmpdir (cached there).
fn build_test_init() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-guest-init/Cargo.toml");
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm-test-init");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--release", "--target", "x86_64-unknown-linux-gnu", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("cargo runs (needed to build the test init)");
    assert!(status.success(), "building {} failed", manifest.display());
    target_dir.join("x86_64-unknown-linux-gnu/release/vmm-test-init")
}

/// Kernel, initramfs and disks shared by the boots, in a temp dir removed on drop.
struct Fixture {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    initramfs: PathBuf,
    disks: Vec<PathBuf>,
}

fn fixture() -> Fixture {
    let deb = kernel_deb();
    let init = build_test_init();
    let dir = tempfile::Builder::new().prefix("banger-vmm-it").tempdir().expect("temp dir");
    let started = Instant::now();
    let kernel = extract_kernel_deb(&deb, &dir.path().join("kernel")).expect("kernel package unpacks");
    let mut index = ModuleIndex::scan(&kernel.modules).expect("module tree scans");
    if let Some(config) = &kernel.config {
        index = index.with_config(config).expect("kernel config reads");
    }
    let order = index.load_order(MODULES).expect("modules found");
    let initramfs = dir.path().join("initramfs.cpio.gz");
    build_guest_initramfs(&init, &kernel.release, &order.modules, &initramfs).expect("initramfs builds");
    let module_names: Vec<_> = order.modules.iter().map(|m| m.name.as_str()).collect();
    eprintln!("fixture: kernel {} modules {module_names:?} in {:?}", kernel.release, started.elapsed());

    let disks = DISK_MIB
        .iter()
        .enumerate()
        .map(|(i, mib)| {
            let path = dir.path().join(format!("disk{i}.img"));
            std::fs::File::create(&path).and_then(|f| f.set_len(mib << 20)).expect("disk image");
            path
        })
        .collect();
    Fixture { kernel: kernel.vmlinuz, dir, initramfs, disks }
}

impl Fixture {
    fn spec(&self, name: &str, extra: &[&str]) -> LaunchSpec {
        let vm_dir = self.dir.path().join(name);
        std::fs::create_dir(&vm_dir).expect("vm dir");
        let mut spec = LaunchSpec::new(name, name, &vm_dir, &self.kernel, &self.initramfs);
        spec.memory_mib = 256;
        spec.disks = vec![
            DiskSpec::read_only(&self.disks[0]),
            DiskSpec::writable(&self.disks[1]),
            DiskSpec::writable(&self.disks[2]),
        ];
        spec.kernel_args = extra.iter().map(|arg| (*arg).to_owned()).collect();
        spec
    }
}

/// Kills the VMM (and reaps it) if the test ends early.
struct VmGuard {
    driver: Arc<dyn Vmm>,
    pid: u32,
    vm_dir: PathBuf,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        if self.driver.kill(self.pid, &self.vm_dir).unwrap_or(false) {
            eprintln!("guard: killed vmm {}", self.pid);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while (self.driver.is_alive(self.pid, &self.vm_dir) || Path::new(&format!("/proc/{}", self.pid)).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Connects to the agent socket, reads the hello, and does one ping/pong.
async fn agent_hello(launched: &Launched) -> (String, Instant) {
    let stream = UnixStream::connect(&launched.agent_socket).await.expect("agent socket accepts");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let hello = tokio::time::timeout(GUEST_TIMEOUT, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no hello on the agent socket within {GUEST_TIMEOUT:?}; {}", console(launched)))
        .expect("agent socket reads")
        .unwrap_or_else(|| panic!("agent socket closed; {}", console(launched)));
    let at = Instant::now();
    write.write_all(b"ping 42\n").await.expect("agent socket writes");
    let pong = tokio::time::timeout(GUEST_TIMEOUT, lines.next_line()).await.expect("pong in time").expect("reads");
    assert_eq!(pong.as_deref(), Some("pong 42"), "{}", console(launched));
    (hello, at)
}

fn console(launched: &Launched) -> String {
    let text = std::fs::read_to_string(&launched.console_log).unwrap_or_default();
    let stderr = std::fs::read_to_string(launched.vm_dir.join("vmm.stderr")).unwrap_or_default();
    format!("console log:\n{text}\nvmm stderr:\n{stderr}")
}

fn expected_hello() -> String {
    let disks: Vec<_> = DISK_MIB
        .iter()
        .zip(["vda", "vdb", "vdc"])
        .enumerate()
        .map(|(i, (mib, name))| format!("{name}:ro={}:sectors={}", u8::from(i == 0), mib * 2048))
        .collect();
    format!("BANGER-AGENT-HELLO {}", disks.join(","))
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_talks_and_stops() {
    if !enabled() {
        return;
    }
    let fixture = fixture();
    let host = HostFacts::probe();
    let selection = select(VmmChoice::Auto, &host).expect("qemu selectable");
    eprintln!("host: {host:?} -> {selection:?}");
    let driver: Arc<dyn Vmm> = selection.driver();
    let mut figures = Vec::new();

    // Guests that power themselves off.
    for boot in 1..=BOOTS {
        let spec = fixture.spec(&format!("vm{boot}"), &[]);
        let started = Instant::now();
        let launched = driver.launch(&spec).await.expect("qemu launches");
        let qmp_ready = started.elapsed();
        let _guard = VmGuard { driver: driver.clone(), pid: launched.pid, vm_dir: spec.vm_dir.clone() };
        if boot == 1 {
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", launched.pid)).expect("cmdline");
            let args: Vec<_> = cmdline.split(|&b| b == 0).map(String::from_utf8_lossy).collect();
            eprintln!("qemu command line: {}", args.join(" "));
        }
        let (hello, hello_at) = agent_hello(&launched).await;
        assert_eq!(hello, expected_hello(), "{}", console(&launched));
        // This guest powers off right after its hello: under load the VMM may be gone before
        // its stats are read (the staying guest below checks them for certain).
        let stats = match driver.stats(launched.pid) {
            Ok(stats) => Some(stats),
            Err(banger_vmm::StatsError::NotRunning { .. }) => None,
            Err(e) => panic!("stats of vmm {}: {e}", launched.pid),
        };
        let exited = driver.wait_exit(launched.pid, &spec.vm_dir, GUEST_TIMEOUT).await;
        let exit_at = started.elapsed();
        assert!(exited, "guest did not power off; {}", console(&launched));
        assert!(!Path::new(&format!("/proc/{}", launched.pid)).exists(), "vmm reaped");
        assert!(console(&launched).contains(MARKER), "{}", console(&launched));
        figures.push((qmp_ready, hello_at - started, exit_at, stats));
    }

    // A guest that stays up: `stop` ends it with QMP `quit`.
    let spec = fixture.spec("vm-quit", &["banger.test=stay"]);
    let launched = driver.launch(&spec).await.expect("qemu launches");
    let _guard = VmGuard { driver: driver.clone(), pid: launched.pid, vm_dir: spec.vm_dir.clone() };
    let (hello, _) = agent_hello(&launched).await;
    assert_eq!(hello, expected_hello());
    let stats = driver.stats(launched.pid).expect("stats of a running vmm");
    assert!(stats.rss_kib > 0 && stats.cpu_time_ms > 0, "{stats:?}");
    // The console line may trail the agent's answer: wait for it.
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while !console(&launched).contains("BANGER-TEST-INIT: staying up") {
        assert!(Instant::now() < deadline, "guest never said it stays up; {}", console(&launched));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut qmp = QmpClient::connect(&launched.control_socket, Duration::from_secs(5)).await.expect("qmp");
    let status = qmp.query_status().await.expect("query-status");
    assert!(status.running, "{status:?}");
    drop(qmp);
    let quit_started = Instant::now();
    let outcome = driver
        .stop(launched.pid, &spec.vm_dir, &launched.control_socket, Duration::from_secs(10))
        .await
        .expect("vmm stops");
    let quit_took = quit_started.elapsed();
    assert_eq!(outcome, StopOutcome::Quit);
    assert!(!driver.is_alive(launched.pid, &spec.vm_dir));
    assert!(!Path::new(&format!("/proc/{}", launched.pid)).exists(), "vmm reaped");

    eprintln!("boot | qmp ready | agent hello | process exit | vmm cpu | vmm rss");
    for (i, (qmp_ready, hello, exit, stats)) in figures.iter().enumerate() {
        let (cpu, rss) = match stats {
            Some(s) => (format!("{} ms", s.cpu_time_ms), format!("{} MiB", s.rss_kib / 1024)),
            None => ("- (exited first)".to_owned(), "-".to_owned()),
        };
        eprintln!("{} | {} | {} | {} | {cpu} | {rss}", i + 1, secs(*qmp_ready), secs(*hello), secs(*exit));
    }
    eprintln!("quit over qmp -> process gone: {}", secs(quit_took));
    // Leave nothing running from this test's VM dirs.
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let needle = fixture.dir.path().as_os_str().as_encoded_bytes();
        assert!(!cmdline.windows(needle.len()).any(|w| w == needle), "left behind: {:?}", entry.path());
    }
}

/// `QemuDriver` is usable directly too (without `select`).
#[test]
fn driver_constructs() {
    let driver = QemuDriver::new(banger_vmm::Accel::Tcg, Some(1_000_000));
    assert!(driver.kernel_cmdline(&[]).contains("tsc_early_khz=1000000"));
}

/// Connects to the agent socket of a guest whose hello was read already and does one ping/pong.
async fn ping(launched: &Launched, n: u32) {
    let stream = UnixStream::connect(&launched.agent_socket).await.expect("agent socket accepts");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(format!("ping {n}\n").as_bytes()).await.expect("agent socket writes");
    let pong = tokio::time::timeout(GUEST_TIMEOUT, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no pong within {GUEST_TIMEOUT:?}; {}", console(launched)))
        .expect("reads");
    assert_eq!(pong, Some(format!("pong {n}")), "{}", console(launched));
}

/// Reads the hello only: the guest then waits for its one ping, which a restored copy answers.
async fn hello_only(launched: &Launched) {
    let stream = UnixStream::connect(&launched.agent_socket).await.expect("agent socket accepts");
    let mut lines = BufReader::new(stream).lines();
    let hello = tokio::time::timeout(GUEST_TIMEOUT, lines.next_line()).await.expect("hello in time").expect("reads");
    assert_eq!(hello, Some(expected_hello()), "{}", console(launched));
}

fn digest(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum runs");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

/// Snapshots of a guest whose memory is a shared file hold the device state only plus a frozen
/// sparse copy of the memory; a fork maps that copy privately, runs, and never writes into it.
/// A guest with anonymous memory is still saved and restored whole. Prints both restores'
/// figures (512 MiB guests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_snapshots_share_a_frozen_memory_file() {
    if !enabled() {
        return;
    }
    let fixture = fixture();
    let driver: Arc<dyn Vmm> = select(VmmChoice::Qemu, &HostFacts::probe()).expect("qemu selectable").driver();
    let shm = tempfile::Builder::new().prefix("banger-vmm-it").tempdir_in("/dev/shm").expect("tmpfs dir");
    let mut figures = Vec::new();
    for lazy in [true, false] {
        let name = if lazy { "lazy" } else { "whole" };
        let mut spec = fixture.spec(&format!("src-{name}"), &[]);
        spec.memory_mib = 512;
        spec.memory_file = lazy.then(|| shm.path().join("src.mem"));
        let source = driver.launch(&spec).await.expect("qemu launches");
        let _source_guard = VmGuard { driver: driver.clone(), pid: source.pid, vm_dir: spec.vm_dir.clone() };
        hello_only(&source).await;
        assert!(!shm.path().join("src.mem").exists(), "unlinked once qemu runs: its memory goes with qemu");
        let state = fixture.dir.path().join(format!("snap-{name}/state.bin"));
        std::fs::create_dir(state.parent().expect("parent")).expect("snapshot dir");
        driver.pause(&source.control_socket).await.expect("pause");
        let t = Instant::now();
        driver.snapshot(&source.control_socket, &state).await.expect("snapshot");
        let saved_in = t.elapsed();
        let memory = banger_vmm::snapshot_memory_file(&state);
        assert_eq!(memory.is_file(), lazy, "a memory file beside the state only for a file-backed guest");
        let state_bytes = std::fs::metadata(&state).expect("state").len();
        if lazy {
            assert!(state_bytes < 1 << 20, "device state only: {state_bytes} bytes");
            assert_eq!(std::fs::metadata(&memory).expect("memory").len(), 512 << 20);
        }
        let frozen = lazy.then(|| digest(&memory));
        // The source runs on and answers its ping: its own file changes, the copy must not.
        driver.resume(&source.control_socket).await.expect("resume");
        ping(&source, 1).await;

        let mut fork_spec = fixture.spec(&format!("fork-{name}"), &[]);
        fork_spec.memory_mib = 512;
        let t = Instant::now();
        let fork = driver.restore(&fork_spec, &state).await.expect("restore");
        let _fork_guard = VmGuard { driver: driver.clone(), pid: fork.pid, vm_dir: fork_spec.vm_dir.clone() };
        driver.resume(&fork.control_socket).await.expect("resume the fork");
        ping(&fork, 2).await;
        let ready_in = t.elapsed();
        let rss = driver.stats(fork.pid).expect("stats").rss_kib;
        if lazy {
            let cmdline =
                String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", fork.pid)).expect("cmdline"))
                    .replace('\0', " ");
            assert!(cmdline.contains(",share=off"), "{cmdline}");
        }
        for launched in [&fork, &source] {
            let dir = &launched.vm_dir;
            let outcome = driver.stop(launched.pid, dir, &launched.control_socket, Duration::from_secs(10)).await;
            assert!(outcome.is_ok(), "{outcome:?}");
        }
        if let Some(frozen) = frozen {
            assert_eq!(digest(&memory), frozen, "the fork wrote into the snapshot's memory file");
        }
        figures.push((name, state_bytes, saved_in, ready_in, rss));
    }
    eprintln!("memory | state bytes | snapshot | restore to pong | fork rss");
    for (name, bytes, saved, ready, rss) in figures {
        eprintln!("{name} | {bytes} | {} | {} | {} MiB", secs(saved), secs(ready), rss / 1024);
    }
}
