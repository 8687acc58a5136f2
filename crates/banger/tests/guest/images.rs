//! Images end to end: the default image, copy-on-write roots, the work disk, promote, and an
//! OCI pull from a real local registry.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::wait_until;
use crate::template::{env_from, template};

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

#[test]
fn the_default_image_boots_and_has_git() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let run = env.banger(&["vm", "run", "--rm", "--", "git", "--version"]).ok();
    assert!(run.stdout.starts_with("git version "), "{}", run.stdout);
}

#[test]
fn the_base_image_never_changes_while_vms_write_all_over_root() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let image = env.banger(&["image", "show", "minimal", "--json"]).ok().json();
    let rootfs = PathBuf::from(image["rootfs"].as_str().expect("rootfs"));
    let rootfs = env.state.join("images/minimal").join(rootfs.file_name().expect("file name"));
    let before = sha256(&rootfs);
    assert_eq!(Some(before.as_str()), image["sha256"].as_str(), "recorded checksum");
    let script = "rm -rf /usr/share/doc /etc/motd && dd if=/dev/zero of=/big bs=1M count=32 2>/dev/null \
                  && echo changed > /etc/issue && sync && cat /etc/issue";
    let run = env.banger(&["vm", "run", "--rm", "--image", "minimal", "--", "sh", "-c", script]).ok();
    assert_eq!(run.stdout, "changed\n");
    assert_eq!(sha256(&rootfs), before, "the base image file is unchanged");
    let again = env.banger(&["vm", "run", "--rm", "--image", "minimal", "--", "cat", "/etc/issue"]).ok();
    assert_ne!(again.stdout, "changed\n", "another vm sees the pristine base");
}

#[test]
fn files_in_root_survive_stop_and_start_on_the_work_disk() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "keeper", "--image", "minimal", "--disk", "1G"]).ok();
    env.banger(&["vm", "start", "keeper"]).ok();
    let mounts = env.banger(&["vm", "exec", "keeper", "-n", "--", "sh", "-c", "grep ' /root ' /proc/mounts"]).ok();
    assert!(mounts.stdout.contains("/dev/vdc"), "/root is the work disk: {}", mounts.stdout);
    let size = env.banger(&["vm", "exec", "keeper", "-n", "--", "sh", "-c", "df -m /root | tail -1"]).ok();
    let total: u64 = size.stdout.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!((900..=1024).contains(&total), "work disk grown to --disk: {}", size.stdout);
    let dotfiles =
        env.banger(&["vm", "exec", "keeper", "-n", "--", "sh", "-c", "ls -a /root; stat -c %a /root/.ssh"]).ok();
    assert!(dotfiles.stdout.contains(".bashrc") && dotfiles.stdout.contains("700"), "{}", dotfiles.stdout);
    env.banger(&["vm", "exec", "keeper", "-n", "--", "sh", "-c", "echo kept > /root/note && sync"]).ok();
    env.banger(&["vm", "stop", "keeper"]).ok();
    env.banger(&["vm", "start", "keeper"]).ok();
    let note = env.banger(&["vm", "exec", "keeper", "-n", "--", "cat", "/root/note"]).ok();
    assert_eq!(note.stdout, "kept\n");
    env.banger(&["vm", "stop", "keeper"]).ok();
    env.banger(&["vm", "delete", "keeper"]).ok();
}

#[test]
fn a_promoted_vm_becomes_an_image_with_its_changes() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "source", "--image", "minimal"]).ok();
    env.banger(&["vm", "start", "source"]).ok();
    let script = "echo promoted > /etc/promoted && rm /etc/debian_version && sync";
    env.banger(&["vm", "exec", "source", "-n", "--", "sh", "-c", script]).ok();
    env.banger(&["image", "promote", "source", "--name", "promoted"]).fails(1, "stop it first");
    env.banger(&["vm", "stop", "source"]).ok();
    env.banger(&["image", "promote", "source", "--name", "promoted"]).ok();
    let shown = env.banger(&["image", "show", "promoted", "--json"]).ok().json();
    assert!(shown["source"].as_str().is_some_and(|s| s.contains("promote")), "{shown}");
    let script = "cat /etc/promoted; test -e /etc/debian_version && echo still-there || echo removed";
    let run = env.banger(&["vm", "run", "--rm", "--image", "promoted", "--", "sh", "-c", script]).ok();
    assert_eq!(run.stdout, "promoted\nremoved\n");
    env.banger(&["image", "delete", "minimal"]).fails(1, "used by vm source");
    env.banger(&["vm", "delete", "source"]).ok();
}

/// Debian's `docker-registry` on 127.0.0.1, stopped (and its data removed) on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// A registry on 127.0.0.1 of `env`'s network namespace, where its daemon pulls from.
    fn start(env: &crate::harness::Env) -> Self {
        let dir = tempfile::Builder::new().prefix("banger-registry-").tempdir().expect("tempdir");
        // The namespace is fresh: any port is free in it.
        let port = 5000;
        let config = dir.path().join("config.yml");
        let data = dir.path().join("data");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                data.display()
            ),
        )
        .expect("config");
        let child = env
            .in_netns("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is missing; run scripts/deps --test");
        wait_until("the registry listens", Duration::from_secs(20), || {
            let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
            env.in_netns("bash").args(["-c", &probe]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        });
        Self { child, port, _dir: dir }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_image_pushed_to_a_local_registry_is_pulled_and_boots() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    // A tiny rootfs: busybox and its applets, as a tarball.
    let root = env.dir.path().join("rootfs");
    for d in ["bin", "etc", "root", "tmp", "proc", "sys", "dev", "run"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static is missing; run scripts/deps --test");
    for applet in ["sh", "echo", "cat", "uname", "ls"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    std::fs::write(root.join("etc/greeting"), "hello from oci\n").expect("write");
    let tarball = env.dir.path().join("rootfs.tar");
    let tar = Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tarball).arg(".").status().expect("tar");
    assert!(tar.success());
    let registry = Registry::start(&env);
    let reference = format!("127.0.0.1:{}/banger-test/busybox:1", registry.port);
    let push = env
        .in_netns("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("tarball:{}", tarball.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo is missing; run scripts/deps --test");
    assert!(push.status.success(), "skopeo push: {}", String::from_utf8_lossy(&push.stderr));
    env.banger(&["image", "pull", &reference, "--insecure", "--name", "bb"]).ok();
    let shown = env.banger(&["image", "show", "bb", "--json"]).ok().json();
    assert!(shown["source"].as_str().is_some_and(|s| s.contains(&reference)), "{shown}");
    let run = env.banger(&["vm", "run", "--rm", "--image", "bb", "--", "cat", "/etc/greeting"]).ok();
    assert_eq!(run.stdout, "hello from oci\n");
    env.banger(&["image", "pull", &reference, "--insecure", "--name", "bb"]).fails(1, "already exists");
}

#[test]
fn the_default_image_runs_sshd_and_ports_lists_it() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "listener"]).ok();
    env.banger(&["vm", "start", "listener"]).ok();
    wait_until("sshd listens on 22", Duration::from_secs(60), || {
        let ports = env.banger(&["vm", "ports", "listener", "--json"]).ok().json();
        ports["ports"].as_array().into_iter().flatten().any(|p| p["port"] == 22 && p["proto"] == "tcp")
    });
    let table = env.banger(&["vm", "ports", "listener"]).ok().stdout;
    assert!(table.starts_with("PROTO") && table.contains("22"), "{table}");
    env.banger(&["vm", "stop", "listener"]).ok();
    env.banger(&["vm", "ports", "listener"]).fails(1, "is not running");
    env.banger(&["vm", "delete", "listener"]).ok();
}
