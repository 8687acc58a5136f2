//! The prepared template: a state dir holding the pulled kernel and the built image.

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
const TEMPLATE_KEY: &str = "template-v2-debian-6.1-cloud-minimal";
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

fn prepare() -> PathBuf {
    require("qemu-system-x86_64", "run scripts/deps (apt-get install qemu-system-x86)");
    require("mmdebstrap", "run scripts/deps (apt-get install mmdebstrap)");
    require("mkfs.ext4", "run scripts/deps (apt-get install e2fsprogs)");
    let agent = std::env::var_os("BANGER_AGENT").map(PathBuf::from);
    assert!(
        agent.as_ref().is_some_and(|a| a.is_file()),
        "real-guest tier: BANGER_AGENT must name the static banger-agent (scripts/test builds it)"
    );
    let cache = std::env::var_os("BANGER_TEST_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/banger-test"),
        PathBuf::from,
    );
    let key = format!("{TEMPLATE_KEY}-schema{}", banger_store::SCHEMA_VERSION);
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

/// [`env_from`] with the daemon in the host's network namespace: only for tests whose daemon
/// must reach the network itself (a Dockerfile build's RUN steps fetching from apt and npm) and
/// whose VMs are all `--no-network` (so nothing is made in the host's namespace).
pub fn env_from_in_host_netns(template: &Path) -> Env {
    fill(Env::new(), template)
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
