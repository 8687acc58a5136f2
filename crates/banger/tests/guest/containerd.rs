//! banger as a containerd runtime (`containerd-shim-banger-v2`), driven by Debian's real
//! `containerd` and `ctr` (scripts/deps --test): containerd runs on a root, state dir and
//! socket of its own inside the test's network namespace, with the workspace's shim first on
//! its `PATH` and the test daemon's socket in its environment. The image is an OCI archive the
//! test builds from busybox-static and imports with `ctr image import`. The harness here
//! (`Containerd`, `busybox_archive`) also serves the CRI test (`cri.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{banger_exe, wait_until, Env, Run};
use crate::template::{env_from, sha256, template};

pub const RUNTIME: &str = "io.containerd.banger.v2";
pub const IMAGE: &str = "docker.io/library/banger-busybox:test";
/// TCG boots under load take long: a task's whole life gets this much.
const TASK_TIMEOUT: Duration = Duration::from_secs(240);

/// A containerd of the test's own.
pub struct Containerd<'a> {
    env: &'a Env,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl<'a> Containerd<'a> {
    /// Without its CRI plugin (`ctr` only).
    fn start(env: &'a Env) -> Self {
        Self::start_with(env, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n", "")
    }

    /// With top-level keys `top` and then `tables` (TOML) in its config.
    pub fn start_with(env: &'a Env, top: &str, tables: &str) -> Self {
        for tool in ["containerd", "ctr", "busybox", "mkfs.ext4", "script", "nsenter"] {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
            assert!(found.is_ok_and(|o| o.status.success()), "{tool} is missing: run scripts/deps --test");
        }
        let dir = env.dir.path().join("containerd");
        std::fs::create_dir_all(&dir).expect("containerd dir");
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n{top}\
             [grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n{tables}",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).expect("config");
        let mut me = Self { env, dir, child: None };
        me.launch();
        me
    }

    fn launch(&mut self) {
        // The workspace's shim, found by containerd as `containerd-shim-banger-v2` on PATH.
        let bin_dir = banger_exe().parent().expect("target dir").to_path_buf();
        let shim = bin_dir.join("containerd-shim-banger-v2");
        assert!(shim.is_file(), "{} is missing: run `cargo build --workspace --bins`", shim.display());
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let log = std::fs::File::create(self.dir.join("containerd.log")).expect("log");
        // Only the network namespace: `ip netns exec` would also give it a private mount
        // namespace with a fresh /sys, hiding the host's cgroup mounts from runc.
        let mut command = match &self.env.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("containerd");
                c
            }
            None => Command::new("containerd"),
        };
        let child = command
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .env("PATH", path)
            .env("BANGER_SOCKET", &self.env.socket)
            .env("BANGER_STATE_DIR", &self.env.state)
            .env("BANGER_SHIM_IMAGE", "minimal")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.child = Some(child);
        wait_until("containerd to answer", Duration::from_secs(60), || self.ctr(&["version"]).code == 0);
    }

    /// Stops containerd (SIGTERM; its shims and their tasks go on).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `nsenter` execs containerd: the pid is containerd's.
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.env.in_netns("ctr");
        c.arg("--address").arg(self.dir.join("containerd.sock")).args(args).stdin(Stdio::null());
        c
    }

    pub fn ctr(&self, args: &[&str]) -> Run {
        Run::from(self.ctr_cmd(args).output().expect("run ctr"))
    }

    /// Live shim processes of this containerd.
    pub fn shims(&self) -> Vec<i32> {
        let sock = self.dir.join("containerd.sock").display().to_string();
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                line.contains("containerd-shim-banger-v2")
                    && line.contains(&sock)
                    && crate::harness::pid_alive(*pid as u32)
            })
            .collect()
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        self.stop();
        for pid in self.shims() {
            // Its socket (`-socket unix:///run/containerd/s/HASH`) goes with it.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> =
                cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let socket = args.iter().skip_while(|a| *a != "-socket").nth(1).cloned();
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            if let Some(path) = socket.as_deref().map(|s| s.trim_start_matches("unix://")) {
                let _ = std::fs::remove_file(path);
            }
        }
        // What a failed run left mounted under containerd's dirs (a bundle rootfs, a CRI
        // sandbox's shm; containerd shares the host's mount namespace), deepest first.
        let prefix = format!("{}/", self.dir.display());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut left: Vec<&str> =
            mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in left {
            let _ = Command::new("umount").arg("-l").arg(mount).stderr(Stdio::null()).status();
        }
    }
}

/// Writes an OCI image archive of a busybox-static root (with `/banger-marker`) named [`IMAGE`]
/// and returns its path.
fn busybox_archive(dir: &Path) -> PathBuf {
    busybox_image(dir, IMAGE, &["sh"])
}

/// Writes an OCI image archive of a busybox-static root (with `/banger-marker`) named `name`
/// whose command is `cmd`, in a directory of its own under `dir`; returns its path.
pub fn busybox_image(dir: &Path, name: &str, cmd: &[&str]) -> PathBuf {
    let dir = &dir.join(format!("image-{}", sha256(name.as_bytes())));
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("bin");
    for sub in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(sub)).expect("dir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for applet in ["sh", "echo", "cat", "sleep", "uname", "tty", "id", "pwd", "ls", "true", "mkdir", "touch", "test"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet");
    }
    std::fs::write(root.join("banger-marker"), "inside the container\n").expect("marker");
    let layer = dir.join("layer.tar");
    let tar = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .expect("tar");
    assert!(tar.success(), "tar of the layer");
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let blob = |bytes: &[u8]| -> (String, usize) {
        let digest = sha256(bytes);
        std::fs::write(blobs.join(&digest), bytes).expect("blob");
        (format!("sha256:{digest}"), bytes.len())
    };
    let (layer_digest, layer_size) = blob(&std::fs::read(&layer).expect("layer"));
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": manifest_size, "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "test"}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index");
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let archive = dir.join("busybox-oci.tar");
    let tar = Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&archive).arg(".").status().expect("tar");
    assert!(tar.success(), "tar of the layout");
    archive
}

/// Waits for `ctr task ls` to show task `id` in `status`; on a timeout, says what it showed
/// and what containerd logged.
pub fn wait_status(cd: &Containerd<'_>, id: &str, status: &str) {
    let deadline = Instant::now() + TASK_TIMEOUT;
    loop {
        let ls = cd.ctr(&["task", "ls"]);
        let found = ls.stdout.lines().any(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.first() == Some(&id) && f.get(2) == Some(&status)
        });
        if found {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(cd.dir.join("containerd.log")).unwrap_or_default();
            let tail: Vec<_> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            panic!(
                "task {id} not {status}; ctr task ls: {}{}\ncontainerd.log:\n{}",
                ls.stdout,
                ls.stderr,
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Nothing of the tasks is left: no VM, no shim, no mount under containerd's dirs, no tap.
pub fn nothing_left(env: &Env, cd: &Containerd<'_>) {
    wait_until("the shims to exit", Duration::from_secs(30), || cd.shims().is_empty());
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(0), "vms left: {list}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir = cd.dir.display().to_string();
    assert!(!mounts.contains(&dir), "a mount under {dir} is left");
    let links = env.in_netns("ip").args(["-o", "link"]).output().expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert!(!links.contains("tap"), "a tap is left: {links}");
}

#[test]
fn ctr_runs_tasks_in_banger_vms() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let started = Instant::now();
    env.banger(&["daemon", "start"]).ok();
    let mut cd = Containerd::start(&env);
    let archive = busybox_archive(env.dir.path());
    cd.ctr(&["image", "import", &archive.display().to_string()]).ok();
    let run = |id: &str, args: &[&str]| {
        let mut all = vec!["run", "--runtime", RUNTIME, "--rm", IMAGE, id];
        all.extend_from_slice(args);
        cd.ctr(&all)
    };

    // The guest kernel, not the host's.
    let kernels = env.banger(&["kernel", "list", "--json"]).ok().json();
    let release = kernels["kernels"][0]["release"].as_str().expect("release").to_owned();
    let host =
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output().expect("uname").stdout).trim().to_owned();
    let uname = run("uname", &["uname", "-r"]).ok();
    assert_eq!(uname.stdout.trim(), release);
    assert_ne!(uname.stdout.trim(), host);

    // Exit codes come back; the process sees the container's root, env and cwd.
    let seven = run("seven", &["sh", "-c", "cat /banger-marker; echo \"$PATH $(pwd)\"; echo err >&2; exit 7"]);
    assert_eq!(seven.code, 7, "{}", seven.stderr);
    assert_eq!(seven.stdout, "inside the container\n/bin /\n");
    assert!(seven.stderr.contains("err"), "{}", seven.stderr);
    eprintln!("containerd: run, exit codes done at {:?}", started.elapsed());

    // A second process with `ctr task exec`; `ctr task kill` ends the task with its signal.
    let mut long = cd
        .ctr_cmd(&["run", "--runtime", RUNTIME, "--rm", IMAGE, "long", "sleep", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr run");
    wait_status(&cd, "long", "RUNNING");
    let exec = cd.ctr(&["task", "exec", "--exec-id", "second", "long", "sh", "-c", "cat /banger-marker; id -u"]).ok();
    assert_eq!(exec.stdout, "inside the container\n0\n");
    let pids = cd.ctr(&["task", "ps", "long"]).ok();
    assert!(pids.stdout.lines().count() >= 2, "{}", pids.stdout);
    cd.ctr(&["task", "kill", "-s", "SIGKILL", "long"]).ok();
    let deadline = Instant::now() + TASK_TIMEOUT;
    let status = loop {
        if let Some(status) = long.try_wait().expect("wait ctr") {
            break status;
        }
        assert!(Instant::now() < deadline, "ctr run did not end after the kill");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(137), "killed by SIGKILL");
    eprintln!("containerd: exec, kill done at {:?}", started.elapsed());

    // A TTY (`ctr run -t`) on a terminal of its own.
    let ctr_line = format!(
        "ip netns exec {} ctr --address {} run -t --runtime {RUNTIME} --rm {IMAGE} tty tty",
        env.netns.as_deref().unwrap_or_default(),
        cd.dir.join("containerd.sock").display()
    );
    let tty = Run::from(Command::new("script").args(["-qec", &ctr_line, "/dev/null"]).output().expect("script"));
    assert_eq!(tty.code, 0, "{} {}", tty.stdout, tty.stderr);
    assert!(tty.stdout.contains("/dev/pts/"), "{}", tty.stdout);
    eprintln!("containerd: tty done at {:?}", started.elapsed());

    // A containerd restart while a task runs: the task is found again and kill still works.
    // A detached task's FIFOs stay behind once ctr exits: keep them in the test's dir, not in
    // ctr's default /run/containerd/fifo.
    let fifos = cd.dir.join("fifo");
    let fifo_dir = fifos.to_str().expect("utf-8 path");
    cd.ctr(&["run", "-d", "--fifo-dir", fifo_dir, "--runtime", RUNTIME, IMAGE, "kept", "sleep", "1000"]).ok();
    wait_status(&cd, "kept", "RUNNING");
    cd.stop();
    cd.launch();
    wait_status(&cd, "kept", "RUNNING");
    cd.ctr(&["task", "kill", "-s", "SIGKILL", "kept"]).ok();
    wait_status(&cd, "kept", "STOPPED");
    cd.ctr(&["task", "rm", "kept"]).ok();
    cd.ctr(&["container", "rm", "kept"]).ok();
    eprintln!("containerd: restart done at {:?}", started.elapsed());

    nothing_left(&env, &cd);
    eprintln!("containerd: all done in {:?}", started.elapsed());
}
