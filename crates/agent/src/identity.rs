//! `reidentify`: what a guest restored from a memory snapshot must change before it is used.
//! Its clock is as old as the snapshot; a fork also still carries the source's MAC, address,
//! hostname, ssh host key and machine id. Steps run in that order (the clock first, so logs and
//! key files get current times); each failure is collected and reported, the rest still run.
//!
//! sshd need not be restarted for the new host key: it re-executes itself for every connection
//! (its default `rexec` mode), and that child reads the host key files anew.

use std::path::Path;
use std::time::Duration;

use banger_proto::agent::{AgentResponse, FrameKind, HostKey, Identity};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

use crate::channel::Link;
use crate::net;

/// sshd's directory.
const SSH_DIR: &str = "/etc/ssh";
/// The host key file name.
const HOST_KEY_NAME: &str = "ssh_host_ed25519_key";

/// Serves one `reidentify` channel.
pub fn serve(link: &Link, identity: &Identity) {
    let started = std::time::Instant::now();
    let mut steps = Steps::default();
    let failures = apply_timed(identity, Path::new("/"), &mut steps);
    let elapsed = started.elapsed().as_millis();
    // Answer first: a console line costs a restored guest milliseconds under TCG.
    if failures.is_empty() {
        let _ = link.json(FrameKind::Response, &AgentResponse::Ok);
    } else {
        link.fail(&failures.join("; "));
    }
    link.finish();
    log!("identity applied in {elapsed} ms ({} failed; {})", failures.len(), steps.0.join(", "));
}

/// Applies `identity` to the system whose root is `root` (tests pass a temp dir: then only
/// file steps run). Returns what failed.
#[cfg(test)]
pub fn apply(identity: &Identity, root: &Path) -> Vec<String> {
    apply_timed(identity, root, &mut Steps::default())
}

/// How long each step of an identity change took, for the console log.
#[derive(Default)]
struct Steps(Vec<String>, Option<std::time::Instant>);

impl Steps {
    /// Records the time since the previous mark as `step`.
    fn mark(&mut self, step: &str) {
        let now = std::time::Instant::now();
        if let Some(last) = self.1 {
            self.0.push(format!("{step} {} ms", now.duration_since(last).as_millis()));
        }
        self.1 = Some(now);
    }
}

fn apply_timed(identity: &Identity, root: &Path, steps: &mut Steps) -> Vec<String> {
    steps.mark("start");
    let live = root == Path::new("/");
    let mut failures = Vec::new();
    if live {
        if let Err(e) = set_clock(identity.time_unix_ms) {
            failures.push(format!("cannot set the clock: {e}"));
        }
    }
    steps.mark("clock");
    if let (true, Some(n)) = (live, &identity.net) {
        if let Err(e) = net::readdress("eth0", &n.mac, &n.cidr, n.gateway.as_deref()) {
            failures.push(format!("cannot readdress eth0: {e}"));
        }
        steps.mark(&format!("eth0 {} {}", n.cidr, n.mac));
    }
    if let Some(dns) = identity.net.as_ref().and_then(|n| n.dns.as_deref()) {
        let text: String = dns.split(',').filter(|s| !s.is_empty()).map(|s| format!("nameserver {s}\n")).collect();
        let path = root.join("etc/resolv.conf");
        // A fork on the same bridge keeps its name server: leave the file alone then.
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            let _ = std::fs::remove_file(&path);
            if let Err(e) = std::fs::write(&path, text) {
                failures.push(format!("cannot write /etc/resolv.conf: {e}"));
            }
        }
        steps.mark("resolv.conf");
    }
    if let Some(name) = &identity.hostname {
        if live {
            if let Err(e) = nix::unistd::sethostname(name) {
                failures.push(format!("cannot set the hostname: {e}"));
            }
        }
        if let Err(e) = std::fs::write(root.join("etc/hostname"), format!("{name}\n")) {
            failures.push(format!("cannot write /etc/hostname: {e}"));
        }
        steps.mark("hostname");
    }
    if let Some(id) = &identity.machine_id {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            failures.push(format!("machine id '{id}' is not 32 hex digits"));
        } else if let Err(e) = std::fs::write(root.join("etc/machine-id"), format!("{id}\n")) {
            failures.push(format!("cannot write /etc/machine-id: {e}"));
        }
        steps.mark("machine-id");
    }
    if let Some(key) = &identity.host_key {
        match install_key(key, root) {
            Ok(()) => {}
            Err(e) => failures.push(format!("cannot install the ssh host key: {e}")),
        }
        steps.mark("host key");
    }
    failures
}

fn set_clock(unix_ms: u64) -> nix::Result<()> {
    let time = TimeSpec::from_duration(Duration::from_millis(unix_ms));
    clock_settime(ClockId::CLOCK_REALTIME, time)
}

/// Installs the key for sshd (which re-reads it for every connection). banger's copy on the
/// work disk is left to the daemon, which rewrites it before the VM's next boot: under TCG every
/// file a restored guest touches costs milliseconds of fresh translation.
fn install_key(key: &HostKey, root: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let dir = root.join(SSH_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&dir)?;
    let private = dir.join(HOST_KEY_NAME);
    // Never readable by others, not even for a moment; an existing file is tightened too.
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&private)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(key.private_key.as_bytes())?;
    let public = dir.join(format!("{HOST_KEY_NAME}.pub"));
    std::fs::write(&public, format!("{}\n", key.public_key.trim()))?;
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::agent::NetIdentity;

    #[test]
    fn files_of_an_identity_are_written_under_the_root() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("etc/ssh")).expect("etc");
        std::fs::write(root.path().join("etc/resolv.conf"), "nameserver 9.9.9.9\n").expect("resolv");
        let identity = Identity {
            time_unix_ms: 1,
            hostname: Some("fork-a".into()),
            net: Some(NetIdentity {
                mac: "52:54:00:00:00:09".into(),
                cidr: "172.30.0.9/24".into(),
                gateway: Some("172.30.0.1".into()),
                dns: Some("172.30.0.1".into()),
            }),
            host_key: Some(HostKey {
                private_key: "PRIVATE\n".into(),
                public_key: "ssh-ed25519 AAAA root@fork-a".into(),
            }),
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
        };
        assert_eq!(apply(&identity, root.path()), Vec::<String>::new());
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).expect(p);
        assert_eq!(read("etc/hostname"), "fork-a\n");
        assert_eq!(read("etc/resolv.conf"), "nameserver 172.30.0.1\n");
        assert_eq!(read("etc/machine-id"), "0123456789abcdef0123456789abcdef\n");
        assert_eq!(read("etc/ssh/ssh_host_ed25519_key"), "PRIVATE\n");
        assert_eq!(read("etc/ssh/ssh_host_ed25519_key.pub"), "ssh-ed25519 AAAA root@fork-a\n");
        assert!(!root.path().join("root/.banger").exists(), "the work disk's copy is the daemon's");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(root.path().join("etc/ssh/ssh_host_ed25519_key")).expect("meta").permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn a_bad_machine_id_is_reported_and_the_rest_still_applies() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("etc")).expect("etc");
        let identity = Identity { hostname: Some("b".into()), machine_id: Some("nope".into()), ..Default::default() };
        let failures = apply(&identity, root.path());
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("32 hex digits"));
        assert_eq!(std::fs::read_to_string(root.path().join("etc/hostname")).expect("hostname"), "b\n");
    }
}
