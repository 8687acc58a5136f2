//! A real OCI pull: Debian's `docker-registry` on 127.0.0.1, an image pushed with `skopeo`,
//! pulled with [`pull_image`] through the real `mkfs.ext4`, then read back with `debugfs`.
//!
//! Gated by `BANGER_REAL_GUEST=1`: without it the test returns at once; with it a missing
//! prerequisite (`apt-get install -y docker-registry skopeo e2fsprogs`, root) fails the test.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_image::host::SystemHost;
use banger_image::oci::{parse_source, pull_image, OciSource};
use banger_image::rootfs::{is_clean_ext4, ImageSource};
use sha2::{Digest, Sha256};

fn enabled() -> bool {
    std::env::var("BANGER_REAL_GUEST").is_ok_and(|v| v == "1")
}

fn require(what: &str, ok: bool) {
    assert!(ok, "BANGER_REAL_GUEST=1 but {what}");
}

fn tool_exists(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n")
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A registry process with its own data dir and config; stopped and removed when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        fs::create_dir(&data).expect("data dir");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                data.display()
            ),
        )
        .expect("config");
        let log = File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry starts");
        let registry = Self { child, port, dir };
        let up = wait_until(Duration::from_secs(20), || {
            let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
            let request = format!("GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
            let mut response = String::new();
            stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_string(&mut response).is_ok()
                && response.starts_with("HTTP/1.1 200")
        });
        assert!(up, "docker-registry did not answer on 127.0.0.1:{port}: {}", registry.log());
        registry
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn add(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, mode: u32, data: &[u8], link: Option<&str>) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    if let Some(link) = link {
        h.set_link_name(link).expect("link name");
    }
    b.append_data(&mut h, name, data).expect("append");
}

/// A one-layer OCI layout holding a small tree, tagged `v1`.
fn write_layout(dir: &Path) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, tar::EntryType::Directory, "bin", 0o755, b"", None);
    add(&mut b, tar::EntryType::Regular, "bin/hello", 0o755, b"#!/bin/sh\necho hello\n", None);
    add(&mut b, tar::EntryType::Regular, "bin/su", 0o4755, b"su", None);
    add(&mut b, tar::EntryType::Symlink, "bin/sh", 0o777, b"", Some("/bin/hello"));
    add(&mut b, tar::EntryType::Directory, "etc", 0o755, b"", None);
    add(&mut b, tar::EntryType::Regular, "etc/os-release", 0o644, b"ID=banger-test\n", None);
    add(&mut b, tar::EntryType::Directory, "etc/ssh", 0o755, b"", None);
    add(&mut b, tar::EntryType::Regular, "etc/ssh/ssh_host_ed25519_key", 0o600, b"secret", None);
    add(&mut b, tar::EntryType::Regular, "usr/share/filler", 0o644, &vec![7u8; 4 << 20], None);
    let tar = b.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let layer = gz.finish().expect("gzip");

    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("layout");
    let put = |data: &[u8]| {
        let digest = sha256(data);
        fs::write(blobs.join(&digest[7..]), data).expect("blob");
        digest
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]},
    }))
    .expect("json");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(&layer), "size": layer.len()}],
    }))
    .expect("json");
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }]});
    fs::write(layout.join("index.json"), serde_json::to_vec(&index).expect("json")).expect("index");
    fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    layout
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs").args(["-R", request]).arg(image).output().expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn real_pull_from_a_local_registry() {
    if !enabled() {
        return;
    }
    for tool in ["docker-registry", "skopeo", "mkfs.ext4", "debugfs"] {
        require(
            &format!("`{tool}` is missing (apt-get install -y docker-registry skopeo e2fsprogs)"),
            tool_exists(tool),
        );
    }
    require("not running as root (owners and xattrs need it)", is_root());
    let registry = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let layout = write_layout(work.path());
    let reference = format!("127.0.0.1:{}/test/img:v1", registry.port);
    let push = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo runs");
    assert!(push.status.success(), "skopeo copy failed: {}", String::from_utf8_lossy(&push.stderr));

    let images = work.path().join("images");
    let source = parse_source(&reference, true);
    assert!(matches!(source, OciSource::Registry { insecure: true, .. }));
    let start = Instant::now();
    let mut stages = Vec::new();
    let image = pull_image(&SystemHost::new(), &images, "real-oci", &source, &mut |s| {
        stages.push((s.to_owned(), start.elapsed()))
    })
    .unwrap_or_else(|e| {
        let mut chain = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            chain.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        panic!("pull failed: {chain} (registry log: {})", registry.log())
    });
    let took = start.elapsed();
    eprintln!("oci pull: {took:.2?} total; stages {stages:?}");
    eprintln!(
        "oci image: {} bytes ({} MiB), content {} bytes",
        image.manifest.size_bytes,
        image.manifest.size_bytes >> 20,
        image.manifest.content_bytes
    );
    assert!(matches!(&image.manifest.source, ImageSource::Oci { reference: r, digest: Some(_) } if *r == reference));
    assert!(is_clean_ext4(&image.path).expect("read image"));
    assert_eq!(debugfs(&image.path, "cat /bin/hello"), "#!/bin/sh\necho hello\n");
    assert_eq!(debugfs(&image.path, "cat /etc/hostname"), "banger\n");
    assert_eq!(debugfs(&image.path, "cat /etc/os-release"), "ID=banger-test\n");
    let su = debugfs(&image.path, "stat /bin/su");
    assert!(su.contains("Mode:  04755"), "{su}");
    let ssh = debugfs(&image.path, "ls /etc/ssh");
    assert!(!ssh.contains("ssh_host_"), "{ssh}");
    assert!(debugfs(&image.path, "ls /etc").contains("banger"));
    assert!(debugfs(&image.path, "stat /bin/sh").contains("Fast link dest: \"/bin/hello\""));
    drop(registry);
}
