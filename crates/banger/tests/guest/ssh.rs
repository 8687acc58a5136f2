//! SSH material in a real guest (`debian-bookworm`, which has sshd): the installation key in
//! `authorized_keys`, the host key banger pinned installed as sshd's, the CLI's git identity in
//! `~/.gitconfig`, a `sync_files` entry, and a real ssh login through the agent channel (a
//! ProxyCommand of `banger vm exec`, the way to reach a `--no-network` VM; `vm ssh` over the
//! bridge is in `network.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{wait_until, Env, Run};
use crate::template::{env_from, template};

/// The first two fields of a public key line: type and key, without the comment.
fn key_of(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// The CLI with `home` as its `$HOME`, git's global config and its working directory.
fn cli(env: &Env, home: &Path, args: &[&str]) -> Run {
    let mut cmd = env.cmd(args);
    cmd.env("HOME", home)
        .env("GIT_CONFIG_GLOBAL", home.join(".gitconfig"))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .current_dir(home);
    Run::from(cmd.output().expect("run banger"))
}

fn exec(env: &Env, vm: &str, script: &str) -> String {
    env.banger(&["vm", "exec", vm, "-n", "--", "sh", "-c", script]).ok().stdout
}

#[test]
fn the_guest_gets_the_keys_the_git_identity_and_synced_files() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let home = env.dir.path().join("home");
    std::fs::create_dir_all(home.join(".config/banger-test")).expect("home");
    std::fs::write(home.join(".config/banger-test/synced.txt"), "synced from the host\n").expect("write");
    std::fs::write(home.join(".gitconfig"), "[user]\n\tname = Guest Tester\n\temail = guest@example.com\n")
        .expect("gitconfig");
    std::fs::write(
        env.state.join("config.toml"),
        "sync_files = [\"~/.config/banger-test/synced.txt\", \"~/.config/banger-test/synced.txt:notes/copy.txt\", \
         \"~/no-such-file\"]\n",
    )
    .expect("config");
    // The daemon inherits this $HOME: `~/` in sync_files is this home.
    cli(&env, &home, &["daemon", "start"]).ok();
    cli(&env, &home, &["vm", "create", "dev", "--image", "debian-bookworm"]).ok();
    let started = cli(&env, &home, &["vm", "start", "dev"]).ok();
    assert!(
        started.stderr.contains("warning: sync_files: ") && started.stderr.contains("no-such-file does not exist"),
        "{}",
        started.stderr
    );
    let ops = env.banger(&["op", "list", "--json"]).ok().json();
    let start = ops["operations"].as_array().and_then(|o| o.last()).expect("start op").clone();
    let stage = start["stages"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "guest-files")).cloned();
    let stage = stage.expect("a guest-files stage");
    eprintln!("guest-files stage: {} ms", stage["elapsed_ms"]);
    assert_eq!(stage["warnings"].as_array().map(Vec::len), Some(1), "{stage}");

    // The installation key may log in as root.
    let installation = std::fs::read_to_string(env.state.join("ssh/id_ed25519.pub")).expect("installation key");
    let authorized = exec(&env, "dev", "cat /root/.ssh/authorized_keys; stat -c %a /root/.ssh/authorized_keys");
    assert!(authorized.lines().any(|l| l == installation.trim()), "{authorized}");
    assert!(authorized.ends_with("600\n"), "{authorized}");

    // sshd's host key is the one banger pinned.
    let vm = env.banger(&["vm", "show", "dev", "--json"]).ok().json();
    let vm_dir = PathBuf::from(vm["vm_dir"].as_str().expect("vm_dir"));
    let pinned = std::fs::read_to_string(vm_dir.join("ssh_host_ed25519_key.pub")).expect("host key");
    let guest = exec(&env, "dev", "cat /etc/ssh/ssh_host_ed25519_key.pub");
    assert_eq!(key_of(&guest), key_of(&pinned));
    assert_eq!(exec(&env, "dev", "stat -c %a /etc/ssh/ssh_host_ed25519_key").trim(), "600");
    let known = std::fs::read_to_string(env.state.join("ssh/known_hosts")).expect("known_hosts");
    assert_eq!(known, format!("dev.vm {}\n", key_of(&pinned)));
    // sshd came up on that key without generating any.
    wait_until("sshd to listen on port 22", Duration::from_secs(60), || {
        let ports = env.banger(&["vm", "ports", "dev", "--json"]).ok().json();
        ports["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["port"] == 22))
    });
    let console = env.banger(&["vm", "logs", "dev"]).ok().stdout;
    let line = |needle: &str| console.lines().find(|l| l.contains(needle)).unwrap_or_default().to_owned();
    eprintln!("{}\n{}", line("ssh host key installed"), line("sshd started"));
    assert!(!console.contains("ssh-keygen"), "{console}");
    assert_eq!(exec(&env, "dev", "ls /etc/ssh | grep -c '^ssh_host_' || true").trim(), "2", "only banger's key");

    // The git identity the CLI saw in its $HOME.
    assert_eq!(exec(&env, "dev", "git config --global user.name").trim(), "Guest Tester");
    assert_eq!(exec(&env, "dev", "git config --global user.email").trim(), "guest@example.com");

    // sync_files: default guest path (relative to $HOME) and an explicit one.
    assert_eq!(exec(&env, "dev", "cat /root/.config/banger-test/synced.txt"), "synced from the host\n");
    assert_eq!(exec(&env, "dev", "cat /root/notes/copy.txt"), "synced from the host\n");

    // A real login: ssh with the installation key and strict checking against the pinned key,
    // tunnelled to the guest's port 22 through `banger vm exec`.
    let proxy = format!(
        "{} vm exec dev -- bash -c 'exec 3<>/dev/tcp/127.0.0.1/22; cat <&3 & exec cat >&3'",
        crate::harness::banger_exe().display()
    );
    let ssh = |alias: &str| {
        Command::new("ssh")
            .args(["-i", &env.state.join("ssh/id_ed25519").display().to_string()])
            .args(["-o", &format!("UserKnownHostsFile={}", env.state.join("ssh/known_hosts").display())])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", &format!("HostKeyAlias={alias}")])
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=60", "-F", "/dev/null"])
            .args(["-o", &format!("ProxyCommand={proxy}")])
            .args(["-l", "root", "--", "dev.vm", "echo", "hello over ssh from $(hostname)"])
            .env("BANGER_STATE_DIR", &env.state)
            .env("BANGER_SOCKET", &env.socket)
            .output()
            .expect("ssh (install openssh-client)")
    };
    let out = ssh("dev.vm");
    assert!(out.status.success(), "ssh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over ssh from dev\n");
    // Pinned means pinned: under another name the same key is refused.
    let out = ssh("other.vm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"), "{out:?}");

    env.banger(&["vm", "stop", "dev"]).ok();
    env.banger(&["vm", "delete", "dev"]).ok();
    assert_eq!(std::fs::read_to_string(env.state.join("ssh/known_hosts")).expect("known_hosts"), "");
}
