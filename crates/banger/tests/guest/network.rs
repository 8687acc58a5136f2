//! Guest networking end to end, in the env's private network namespace: addresses, names
//! through banger's DNS, guest↔guest and guest→host isolation, `--allow-vm-traffic`, forwards,
//! `vm ssh`, and a clean host afterwards.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::{wait_until, Env};
use crate::template::{env_from, template};

/// What a TCP connect from `vm` to `addr:port` gives: "open", "refused" or another error.
pub(crate) fn connect_from(env: &Env, vm: &str, addr: &str, port: u16) -> String {
    let script = format!(
        "import socket\ntry:\n socket.create_connection(('{addr}', {port}), timeout=5); print('open')\n\
         except ConnectionRefusedError: print('refused')\nexcept Exception as e: print(type(e).__name__)"
    );
    env.banger(&["vm", "exec", vm, "--", "python3", "-c", &script]).ok().stdout.trim().to_owned()
}

/// Starts an HTTP server on `port` in `vm`, in the background, and waits until it listens.
fn serve_http(env: &Env, vm: &str, port: u16) {
    let cmd = format!("cd /etc && setsid -f python3 -m http.server {port} </dev/null >/dev/null 2>&1");
    env.banger(&["vm", "exec", vm, "--", "sh", "-c", &cmd]).ok();
    wait_until(&format!("{vm} listens on {port}"), Duration::from_secs(30), || {
        let ports = env.banger(&["vm", "ports", vm, "--json"]).ok().json();
        ports["ports"].as_array().into_iter().flatten().any(|p| p["port"] == port)
    });
}

/// An HTTP/1.0 GET of `/` on 127.0.0.1:`port` from this thread (which is in the env's
/// namespace): the whole answer.
fn http_get(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the forward");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    answer
}

pub(crate) fn ip_of(env: &Env, vm: &str) -> String {
    let shown = env.banger(&["vm", "show", vm, "--json"]).ok().json();
    shown["guest_ip"].as_str().unwrap_or_else(|| panic!("{vm} has no address: {shown}")).to_owned()
}

/// An HTTP server on the host (in the env's namespace) at `addr:port`, listening when this
/// returns; the caller kills it.
pub(crate) fn host_http_server(env: &Env, addr: &str, port: u16) -> std::process::Child {
    let server = env
        .in_netns("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("host http server");
    wait_until("the host server listens", Duration::from_secs(20), || {
        let probe = format!("exec 3<>/dev/tcp/{addr}/{port}");
        env.in_netns("bash").args(["-c", &probe]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    });
    server
}

/// Starts VMs concurrently (each `vm start` waits for its agent).
pub(crate) fn start_all(env: &Env, names: &[&str]) {
    let children: Vec<_> = names
        .iter()
        .map(|n| env.cmd(&["vm", "start", n]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn"))
        .collect();
    for (child, name) in children.into_iter().zip(names) {
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "vm start {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn names_isolation_forwards_ssh_and_a_clean_host() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.enter_netns();
    env.banger(&["vm", "create", "alpha"]).ok();
    env.banger(&["vm", "create", "beta"]).ok();
    env.banger(&["vm", "create", "gamma", "--allow-vm-traffic"]).ok();
    env.banger(&["vm", "create", "delta", "--no-network"]).ok();
    start_all(&env, &["alpha", "beta", "gamma", "delta"]);
    let (a, b, g) = (ip_of(&env, "alpha"), ip_of(&env, "beta"), ip_of(&env, "gamma"));
    assert!(a != b && b != g && a != g, "distinct addresses: {a} {b} {g}");

    // Each resolves the others' NAME.vm through banger's DNS.
    for (from, to, ip) in [("alpha", "beta", &b), ("beta", "alpha", &a), ("alpha", "gamma", &g)] {
        let out = env.banger(&["vm", "exec", from, "--", "getent", "hosts", &format!("{to}.vm")]).ok().stdout;
        assert!(out.starts_with(&format!("{ip} ")), "{from} resolves {to}.vm: {out:?}");
    }
    let unknown = env.banger(&["vm", "exec", "alpha", "--", "getent", "hosts", "nosuch.vm"]);
    assert_eq!(unknown.code, 2, "an unknown name does not resolve: {}", unknown.stdout);

    // Guest→guest TCP is refused by default and allowed with --allow-vm-traffic.
    serve_http(&env, "beta", 8080);
    serve_http(&env, "gamma", 8080);
    assert_eq!(connect_from(&env, "alpha", &b, 8080), "refused", "alpha→beta");
    assert_eq!(connect_from(&env, "alpha", &g, 8080), "open", "alpha→gamma (gamma is open)");
    assert_eq!(connect_from(&env, "gamma", &b, 8080), "open", "gamma→beta (gamma is open)");

    // A host port other than DNS is refused from a guest (an HTTP server on the gateway).
    let gateway = "172.30.0.1";
    let mut host_server = host_http_server(&env, gateway, 8099);
    assert_eq!(connect_from(&env, "alpha", gateway, 8099), "refused", "alpha→host:8099");
    assert_eq!(connect_from(&env, "gamma", gateway, 8099), "open", "an open guest reaches host ports");
    let _ = host_server.kill();
    let _ = host_server.wait();

    // A guest HTTP server through `vm forward`: over the guest's address, and over the agent
    // channel for a VM without a NIC.
    let delta = env.banger(&["vm", "show", "delta", "--json"]).ok().json();
    assert!(delta["guest_ip"].is_null(), "--no-network gives no address: {delta}");
    let nic = env.banger(&["vm", "exec", "delta", "--", "sh", "-c", "ls /sys/class/net"]).ok().stdout;
    assert_eq!(nic.split_whitespace().collect::<Vec<_>>(), ["lo"], "no NIC in a --no-network guest");
    serve_http(&env, "delta", 8080);
    env.banger(&["vm", "forward", "beta", "127.0.0.1:18080:8080"]).ok();
    env.banger(&["vm", "forward", "delta", "127.0.0.1:18081:8080"]).ok();
    for port in [18080, 18081] {
        let answer = http_get(port);
        assert!(answer.starts_with("HTTP/1.0 200") && answer.contains("hostname"), "forward {port}: {answer}");
    }

    // `vm ssh` over the bridge, with the pinned host key (run in the namespace, like any client).
    let ssh = env.banger(&["vm", "ssh", "alpha", "--", "hostname"]).ok();
    assert_eq!(ssh.stdout.trim(), "alpha");

    // Once every VM is deleted and the daemon stopped, no TAP, bridge or nft table is left.
    for vm in ["alpha", "beta", "gamma", "delta"] {
        env.banger(&["vm", "stop", vm]).ok();
        env.banger(&["vm", "delete", vm]).ok();
    }
    env.banger(&["daemon", "stop"]).ok();
    let links = env.in_netns("ip").args(["-br", "link"]).output().expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.lines().map(|l| l.split_whitespace().next().unwrap_or("")).collect::<Vec<_>>(), ["lo"], "{links}");
    let rules = env.in_netns("nft").args(["list", "ruleset"]).output().expect("nft");
    assert_eq!(String::from_utf8_lossy(&rules.stdout).trim(), "", "no nft table is left");
}

/// A second namespace the test makes and deletes: the "outside" a NAT uplink leads to.
pub(crate) struct Outside(pub(crate) String);

impl Outside {
    /// Namespace `{ns}-{suffix}` linked to `ns` by a veth: `host.0` with address `host.1` in
    /// `ns`, `eth0` with `peer` in the new one; both up.
    pub(crate) fn linked(ns: &str, suffix: &str, host: (&str, &str), peer: &str) -> Self {
        let outside = Outside(format!("{ns}-{suffix}"));
        ip(&["netns", "add", &outside.0]);
        ip(&["-n", &outside.0, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "link", "add", host.0, "type", "veth", "peer", "name", "eth0", "netns", &outside.0]);
        ip(&["-n", ns, "addr", "add", host.1, "dev", host.0]);
        ip(&["-n", ns, "link", "set", host.0, "up"]);
        ip(&["-n", &outside.0, "addr", "add", peer, "dev", "eth0"]);
        ip(&["-n", &outside.0, "link", "set", "eth0", "up"]);
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        crate::harness::delete_netns(&self.0);
    }
}

pub(crate) fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

#[test]
fn nat_masquerades_guest_egress_out_of_the_uplink() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let ns = env.netns.clone().expect("the env has a namespace");
    // The env's namespace gets an uplink (a veth) into a test-made "outside" namespace holding a
    // web server; nothing leads further.
    let outside = Outside::linked(&ns, "out", ("up0", "10.99.0.1/24"), "10.99.0.2/24");
    let log = env.dir.path().join("outside.log");
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &outside.0, "python3", "-m", "http.server", "8000", "--bind", "10.99.0.2"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("outside server");

    std::fs::create_dir_all(&env.state).expect("state dir");
    std::fs::write(env.state.join("config.toml"), "nat = true\nuplink = \"up0\"\negress_allow = [\"10.99.0.2\"]\n")
        .expect("config");
    env.banger(&["vm", "create", "egress"]).ok();
    env.banger(&["vm", "start", "egress"]).ok();
    let fetch = "import urllib.request; print(urllib.request.urlopen('http://10.99.0.2:8000/', timeout=10).status)";
    let out = env.banger(&["vm", "exec", "egress", "--", "python3", "-c", fetch]).ok().stdout;
    assert_eq!(out.trim(), "200", "the guest reaches the outside through NAT");
    let seen = std::fs::read_to_string(&log).expect("server log");
    assert!(seen.contains("10.99.0.1 "), "the outside sees the uplink's address (masquerade): {seen}");
    assert!(!seen.contains("172.30.0."), "no guest address leaks out: {seen}");
    env.banger(&["vm", "stop", "egress"]).ok();
    env.banger(&["vm", "delete", "egress"]).ok();
    let _ = server.kill();
    let _ = server.wait();
}
