//! The prepared templates: a state dir holding the pulled kernel and the built images, and
//! one that adds the catalog's `agent` image (built from `images/agent/Dockerfile`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::harness::Env;

/// Bump when the catalog's kernel or image recipes change. The store's schema version is part of
/// the key too: a daemon of another schema (an older or a newer checkout sharing the cache) must
/// not migrate, or be refused by, this one's template.
///
/// A template is written once: prepared under an exclusive lock, its daemon stopped and gone,
/// then marked ready (the marker names its images). Once ready, nothing starts a daemon on it
/// again, so the databases that tests copy out of it never change under them. (v1 templates
/// were re-opened by every test process, and a copy taken while another process's daemon wrote
/// to it came out malformed.)
const TEMPLATE_KEY: &str = "template-v3-debian-6.1-cloud-minimal";
/// The images every template holds.
const TEMPLATE_IMAGES: &[&str] = &["minimal", "debian-bookworm"];

pub fn enabled() -> bool {
    std::env::var("BANGER_REAL_GUEST").is_ok_and(|v| v == "1")
}

/// Skips (returns `None`) when the tier is off; otherwise the template, prepared once.
pub fn template() -> Option<&'static Path> {
    if !enabled() {
        eprintln!("real-guest tier off: set BANGER_REAL_GUEST=1 to run it");
        return None;
    }
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    Some(TEMPLATE.get_or_init(|| {
        crate::harness::sweep_stale_netns();
        prepare()
    }))
}

fn require(program: &str, fix: &str) {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {program}")).output().is_ok_and(|o| o.status.success());
    assert!(found, "real-guest tier: {program} is missing; {fix}");
}

/// `BANGER_TEST_CACHE`, default `~/.cache/banger-test`.
fn cache_dir() -> PathBuf {
    std::env::var_os("BANGER_TEST_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/banger-test"),
        PathBuf::from,
    )
}

fn template_key() -> String {
    format!("{TEMPLATE_KEY}-schema{}", banger_store::SCHEMA_VERSION)
}

fn prepare() -> PathBuf {
    require("qemu-system-x86_64", "run scripts/deps (apt-get install qemu-system-x86)");
    require("mmdebstrap", "run scripts/deps (apt-get install mmdebstrap)");
    require("mkfs.ext4", "run scripts/deps (apt-get install e2fsprogs)");
    let agent = std::env::var_os("BANGER_AGENT").map(PathBuf::from);
    assert!(
        agent.as_ref().is_some_and(|a| a.is_file()),
        "real-guest tier: BANGER_AGENT must name the static banger-agent (scripts/test builds it)"
    );
    let cache = cache_dir();
    let key = template_key();
    let dir = cache.join(&key);
    let state = dir.join("state");
    let ready = dir.join("ready");
    let marker = TEMPLATE_IMAGES.join(",");
    std::fs::create_dir_all(&dir).expect("cache dir");
    // One preparer at a time, across test processes too.
    let lock = std::fs::File::create(cache.join(format!("{key}.lock"))).expect("lock file");
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).expect("flock");
    if std::fs::read_to_string(&ready).is_ok_and(|m| m == marker) {
        return state;
    }
    let env = Env::at(state.clone(), dir.join("bangerd.sock"));
    let kernels = env.banger(&["kernel", "list", "--json"]).ok().json();
    if kernels["kernels"].as_array().is_none_or(Vec::is_empty) {
        let started = std::time::Instant::now();
        env.banger(&["kernel", "pull", "debian-6.1-cloud"]).ok();
        eprintln!("template: kernel pulled in {:.1}s", started.elapsed().as_secs_f64());
    }
    let images = env.banger(&["image", "list", "--json"]).ok().json();
    let have: Vec<&str> =
        images["images"].as_array().into_iter().flatten().filter_map(|i| i["name"].as_str()).collect();
    for image in TEMPLATE_IMAGES.iter().filter(|i| !have.contains(i)) {
        let started = std::time::Instant::now();
        env.banger(&["image", "build", image]).ok();
        eprintln!("template: image {image} built in {:.1}s", started.elapsed().as_secs_f64());
    }
    env.banger(&["daemon", "stop"]).ok();
    // Ready only once the daemon is gone: until then it may still write its database.
    crate::harness::wait_until("the template's daemon to exit", std::time::Duration::from_secs(60), || {
        env.daemon_pid().is_none()
    });
    std::fs::write(&ready, marker).expect("template ready marker");
    state
}

/// A fresh env whose state dir shares the template's kernels and images (hard links). Its
/// daemon and VMs run in a network namespace of their own.
pub fn env_from(template: &Path) -> Env {
    fill(Env::new_in_netns(), template)
}

fn fill(env: Env, template: &Path) -> Env {
    std::fs::create_dir_all(&env.state).expect("state dir");
    for sub in ["kernels", "images"] {
        let status =
            Command::new("cp").arg("-al").arg(template.join(sub)).arg(env.state.join(sub)).status().expect("cp");
        assert!(status.success(), "cp -al {sub}");
    }
    for db in ["banger.db", "banger.db-wal", "banger.db-shm"] {
        if template.join(db).exists() {
            std::fs::copy(template.join(db), env.state.join(db)).expect("copy db");
        }
    }
    env
}

/// Bump when what an agent template holds changes in a way its inputs below do not show.
///
/// The catalog's `agent` image takes minutes to build (apt and npm), so it is built once per
/// machine into a template of its own: the base template's kernels and images (hard links) and
/// database (a copy), plus `agent`. Its key is a hash of everything that decides the image: this
/// string, the base template's key (store schema included), the kernel's release (its modules go
/// into the image), the base image's checksum and `images/agent/Dockerfile` itself. What apt and
/// npm serve is not pinned: delete `agent-*` under the cache dir to build from today's archives.
const AGENT_KEY: &str = "agent-v1";

/// Whether the `agent` image test runs: on with the real-guest tier, off with
/// `BANGER_AGENT_IMAGE=0` (quick local runs).
pub fn agent_image_enabled() -> bool {
    std::env::var("BANGER_AGENT_IMAGE").as_deref() != Ok("0")
}

/// The agent template's state dir (built now when the cache has none for this key) and whether
/// it was already there.
pub fn agent_template(base: &Path) -> (PathBuf, bool) {
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/agent/Dockerfile");
    let kernel = json_file(&base.join("kernels/debian-6.1-cloud/kernel.json"));
    let image = json_file(&base.join("images/debian-bookworm/image.json"));
    let inputs = format!(
        "{AGENT_KEY}\ntemplate {}\nkernel {}\nbase debian-bookworm {}\nDockerfile {}\n",
        template_key(),
        kernel["release"].as_str().expect("the template's kernel has a release"),
        image["sha256"].as_str().expect("the template's debian-bookworm has a sha256"),
        sha256(&std::fs::read(&dockerfile).expect("images/agent/Dockerfile")),
    );
    let key = format!("{AGENT_KEY}-{}", &sha256(inputs.as_bytes())[..16]);
    let cache = cache_dir();
    let dir = cache.join(&key);
    let state = dir.join("state");
    let ready = dir.join("ready");
    let lock = std::fs::File::create(cache.join(format!("{key}.lock"))).expect("lock file");
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).expect("flock");
    if std::fs::read_to_string(&ready).is_ok_and(|m| m == "agent") {
        return (state, true);
    }
    // What an earlier, failed preparation left. A run killed mid-build (Ctrl-C) never ran its
    // env's drop: stop its daemon (this env's drop does) before removing its state.
    if dir.exists() {
        drop(Env::at(state.clone(), dir.join("bangerd.sock")));
        std::fs::remove_dir_all(&dir).expect("remove a half-made agent template");
    }
    std::fs::create_dir_all(&dir).expect("agent template dir");
    std::fs::write(dir.join("inputs"), &inputs).expect("agent template inputs");
    // The build's RUN steps fetch from apt and npm, so this daemon runs in the host's network
    // namespace; it only builds (no VM), and it is stopped before the template is marked ready.
    let env = fill(Env::at(state.clone(), dir.join("bangerd.sock")), base);
    let started = std::time::Instant::now();
    env.banger(&["image", "build", "agent"]).ok();
    eprintln!("agent template: image agent built in {:.1}s (cold cache)", started.elapsed().as_secs_f64());
    env.banger(&["daemon", "stop"]).ok();
    crate::harness::wait_until("the agent template's daemon to exit", std::time::Duration::from_secs(60), || {
        env.daemon_pid().is_none()
    });
    std::fs::write(&ready, "agent").expect("agent template ready marker");
    (state, false)
}

fn json_file(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Hex sha256 of `bytes` (coreutils' `sha256sum`: no hashing crate among the test's dependencies).
pub fn sha256(bytes: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().expect("stdin").write_all(bytes).expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("sha256sum output").to_owned()
}
