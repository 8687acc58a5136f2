//! Real kernel pull through apt and real `minimal` image build with mmdebstrap.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use banger_image::host::SystemHost;
use banger_image::initramfs::build_guest_initramfs;
use banger_image::kernel::pull::{pull_kernel, KernelPull};
use banger_image::rootfs::{build_image, is_clean_ext4, sha256_file, ImageBuild};

fn enabled() -> bool {
    std::env::var("BANGER_REAL_GUEST").is_ok_and(|v| v == "1")
}

fn require(what: &str, ok: bool) {
    assert!(ok, "BANGER_REAL_GUEST=1 but {what}");
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n")
}

fn tool_exists(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

fn dir_bytes(dir: &Path) -> u64 {
    let out = Command::new("du").args(["-sb"]).arg(dir).output().expect("du runs");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Records each stage's wall time from the progress callback.
struct Stages {
    last: Option<(String, Instant)>,
    done: Vec<(String, Duration)>,
}

impl Stages {
    fn new() -> Self {
        Self { last: None, done: Vec::new() }
    }
    fn enter(&mut self, stage: &str) {
        self.finish();
        self.last = Some((stage.to_owned(), Instant::now()));
    }
    fn finish(&mut self) {
        if let Some((stage, start)) = self.last.take() {
            self.done.push((stage, start.elapsed()));
        }
    }
    fn report(mut self, what: &str) {
        self.finish();
        for (stage, took) in &self.done {
            eprintln!("{what}: {stage} {took:.2?}");
        }
    }
}

#[test]
fn real_kernel_pull_through_apt() {
    if !enabled() {
        return;
    }
    require("apt-cache is missing", tool_exists("apt-cache"));
    require("not running as root (apt-get download and the kernels directory need it)", is_root());
    let root = tempfile::tempdir().expect("tempdir");
    let kernels = root.path().join("kernels");
    let mut stages = Stages::new();
    let pull = KernelPull::catalog("debian-6.1-cloud").expect("catalog entry");
    let kernel = pull_kernel(&SystemHost::new(), &kernels, &pull, &mut |s| stages.enter(s))
        .unwrap_or_else(|e| panic!("kernel pull failed (run `apt-get update` first?): {e}"));
    stages.report("kernel pull");
    eprintln!(
        "kernel: {} {} release {}; dir {} bytes; vmlinuz {} bytes; vmlinux {} bytes; {} modules",
        kernel.package.as_deref().unwrap_or("?"),
        kernel.version.as_deref().unwrap_or("?"),
        kernel.release,
        dir_bytes(&kernel.dir),
        std::fs::metadata(&kernel.vmlinuz).map(|m| m.len()).unwrap_or(0),
        std::fs::metadata(&kernel.vmlinux).map(|m| m.len()).unwrap_or(0),
        kernel.modules.len(),
    );
    assert!(kernel.package.as_deref().is_some_and(|p| p.starts_with("linux-image-6.1.0-")));
    assert!(kernel.release.ends_with("-cloud-amd64"));
    let names: Vec<_> = kernel.modules.iter().map(|m| m.name.as_str()).collect();
    for needed in ["virtio_mmio", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport", "overlay"] {
        assert!(names.contains(&needed), "{needed} missing from {names:?}");
    }
    assert_eq!(std::fs::read_dir(&kernels).expect("kernels dir").count(), 1, "staging left behind");
    // The daemon's next step works from what was published.
    let out = root.path().join("initramfs.cpio.gz");
    // A stand-in for the static agent (a dynamic program like /bin/true is refused as /init).
    let init = root.path().join("init");
    std::fs::write(&init, b"\x7fELF stand-in for the static agent").expect("init");
    let summary =
        build_guest_initramfs(&init, &kernel.release, &kernel.modules, &out).expect("initramfs from the pulled kernel");
    eprintln!("initramfs: {} bytes gzip", summary.gzip_bytes);
}

#[test]
fn real_minimal_image_build() {
    if !enabled() {
        return;
    }
    require("not running as root (mmdebstrap --mode=root needs it)", is_root());
    require("mmdebstrap is missing; run `apt-get install mmdebstrap`", tool_exists("mmdebstrap"));
    require("mkfs.ext4 is missing; run `apt-get install e2fsprogs`", tool_exists("mkfs.ext4"));
    let root = tempfile::tempdir().expect("tempdir");
    let images = root.path().join("images");
    let mut stages = Stages::new();
    let build = ImageBuild::catalog("minimal").expect("catalog entry");
    let image = build_image(&SystemHost::new(), &images, &build, &mut |s| stages.enter(s))
        .unwrap_or_else(|e| panic!("image build failed: {e:#?}"));
    stages.report("minimal image");
    eprintln!(
        "image: {} bytes apparent, {} bytes on disk, content {} bytes, sha256 {}",
        image.manifest.size_bytes,
        dir_bytes(&image.dir),
        image.manifest.content_bytes,
        image.manifest.sha256
    );
    assert!(is_clean_ext4(&image.path).expect("read image"));
    assert_eq!(sha256_file(&image.path).expect("hash"), image.manifest.sha256);
    assert_eq!(std::fs::read_dir(&images).expect("images dir").count(), 1, "staging left behind");
    // Look inside without mounting: debugfs reads the image.
    if tool_exists("debugfs") {
        let cat = |path: &str| {
            let out = Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(&image.path).output();
            out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
        };
        assert_eq!(cat("/etc/hostname"), "banger\n");
        let ls = Command::new("debugfs").args(["-R", "ls -l /etc/banger"]).arg(&image.path).output().expect("debugfs");
        assert!(ls.status.success());
        let ssh = Command::new("debugfs").args(["-R", "ls /etc/ssh"]).arg(&image.path).output().expect("debugfs");
        assert!(!String::from_utf8_lossy(&ssh.stdout).contains("ssh_host_"));
    }
}
