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

use crate::net;
use crate::serve::Link;

/// Where banger's copy of the host key lives on the work disk (see init.rs).
const BANGER_HOST_KEY_DIR: &str = "/root/.banger";
/// sshd's directory.
const SSH_DIR: &str = "/etc/ssh";
/// The host key file name.
const HOST_KEY_NAME: &str = "ssh_host_ed25519_key";

/// Serves one `reidentify` channel.
pub fn serve(link: &Link, identity: &Identity) {
    let started = std::time::Instant::now();
    let failures = apply(identity, Path::new("/"));
    log!("identity applied in {} ms ({} failed)", started.elapsed().as_millis(), failures.len());
    if failures.is_empty() {
        let _ = link.json(FrameKind::Response, &AgentResponse::Ok);
    } else {
        link.fail(&failures.join("; "));
    }
    link.finish();
}

/// Applies `identity` to the system whose root is `root` (tests pass a temp dir: then only
/// file steps run). Returns what failed.
pub fn apply(identity: &Identity, root: &Path) -> Vec<String> {
    let live = root == Path::new("/");
    let mut failures = Vec::new();
    if live {
        if let Err(e) = set_clock(identity.time_unix_ms) {
            failures.push(format!("cannot set the clock: {e}"));
        }
    }
    if let (true, Some(n)) = (live, &identity.net) {
        let started = std::time::Instant::now();
        match net::readdress("eth0", &n.mac, &n.cidr, n.gateway.as_deref()) {
            Ok(()) => log!("eth0: now {} ({}) in {} ms", n.cidr, n.mac, started.elapsed().as_millis()),
            Err(e) => failures.push(format!("cannot readdress eth0: {e}")),
        }
    }
    if let Some(dns) = identity.net.as_ref().and_then(|n| n.dns.as_deref()) {
        let text: String = dns.split(',').filter(|s| !s.is_empty()).map(|s| format!("nameserver {s}\n")).collect();
        let path = root.join("etc/resolv.conf");
        let _ = std::fs::remove_file(&path);
        if let Err(e) = std::fs::write(&path, text) {
            failures.push(format!("cannot write /etc/resolv.conf: {e}"));
        }
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
    }
    if let Some(id) = &identity.machine_id {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            failures.push(format!("machine id '{id}' is not 32 hex digits"));
        } else if let Err(e) = std::fs::write(root.join("etc/machine-id"), format!("{id}\n")) {
            failures.push(format!("cannot write /etc/machine-id: {e}"));
        }
    }
    if let Some(key) = &identity.host_key {
        match install_key(key, root) {
            Ok(()) => {}
            Err(e) => failures.push(format!("cannot install the ssh host key: {e}")),
        }
    }
    failures
}

fn set_clock(unix_ms: u64) -> nix::Result<()> {
    let time = TimeSpec::from_duration(Duration::from_millis(unix_ms));
    clock_settime(ClockId::CLOCK_REALTIME, time)
}

/// Writes the key into banger's directory on the work disk, then installs it for sshd.
fn install_key(key: &HostKey, root: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let banger = root.join(BANGER_HOST_KEY_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&banger)?;
    let private = banger.join(HOST_KEY_NAME);
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&private)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(key.private_key.as_bytes())?;
    std::fs::write(banger.join(format!("{HOST_KEY_NAME}.pub")), format!("{}\n", key.public_key.trim()))?;
    crate::init::install_host_key(&banger, &root.join(SSH_DIR.trim_start_matches('/'))).map(drop)
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
        assert_eq!(read("root/.banger/ssh_host_ed25519_key"), "PRIVATE\n");
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
