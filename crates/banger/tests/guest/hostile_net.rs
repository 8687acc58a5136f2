//! Hostile guests on the network, on real guests, TAPs and nftables in the env's private
//! namespace: guest↔guest refused for UDP, ICMP and TCP with NAT off, on without an uplink and
//! on with one; a guest that takes another's MAC, then its address, reaches nothing new while
//! the victim keeps its forwards, its address and its `NAME.vm`; the DNS server answers guests
//! only.

use std::process::Command;
use std::time::Duration;

use crate::harness::{wait_until, Env};
use crate::network::{connect_from, host_http_server, ip, ip_of, start_all, Outside};
use crate::template::{env_from, template};

/// A Python probe run in guest `vm`: one word on stdout.
fn probe(env: &Env, vm: &str, script: &str) -> String {
    env.banger(&["vm", "exec", vm, "--", "python3", "-c", script]).ok().stdout.trim().to_owned()
}

/// A UDP datagram to `addr:port`, waiting 3 s for the echo: "echo", "timeout" or the error's type.
fn udp_from(env: &Env, vm: &str, addr: &str, port: u16) -> String {
    probe(
        env,
        vm,
        &format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n\
             try:\n s.connect(('{addr}', {port})); s.send(b'ping'); print('echo' if s.recv(64) == b'ping' else 'other')\n\
             except socket.timeout: print('timeout')\nexcept Exception as e: print(type(e).__name__)"
        ),
    )
}

/// One ICMP echo request to `addr` over a raw socket, waiting 3 s: "reply", "timeout", or
/// "unreachable" when an ICMP error comes back.
fn icmp_from(env: &Env, vm: &str, addr: &str) -> String {
    probe(env, vm, &ICMP_PROBE.replace("ADDR", addr))
}

/// The script of [`icmp_from`]; `ADDR` is replaced by the destination.
const ICMP_PROBE: &str = r"
import socket, struct, time
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
hdr = struct.pack('!BBHHH', 8, 0, 0, 0x4242, 1) + b'bangerpg'
s.sendto(hdr[:2] + struct.pack('!H', csum(hdr)) + hdr[4:], ('ADDR', 0))
end = time.time() + 3
try:
    while True:
        s.settimeout(max(0.01, end - time.time()))
        data, src = s.recvfrom(2048)
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and src[0] == 'ADDR':
            print('reply')
            break
        if icmp[0] == 3:
            print('unreachable')
            break
except socket.timeout:
    print('timeout')
";

/// Starts, in the background of `vm`, a UDP echo server and an HTTP server whose page is the
/// VM's hostname, both on `port`, and waits until both listen.
fn serve(env: &Env, vm: &str, port: u16) {
    let udp = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', {port}))\n\
         while True:\n d, a = s.recvfrom(64); s.sendto(d, a)"
    );
    let cmd = format!(
        "mkdir -p /tmp/www && hostname > /tmp/www/index.html && \
         cd /tmp/www && setsid -f python3 -m http.server {port} </dev/null >/dev/null 2>&1; \
         setsid -f python3 -c \"$0\" </dev/null >/dev/null 2>&1"
    );
    env.banger(&["vm", "exec", vm, "--", "sh", "-c", &cmd, &udp]).ok();
    wait_until(&format!("{vm} listens on {port}"), Duration::from_secs(30), || {
        let ports = env.banger(&["vm", "ports", vm, "--json"]).ok().json();
        let listed = ports["ports"].as_array().into_iter().flatten().filter(|p| p["port"] == port).count();
        listed >= 2
    });
}

/// The MAC of `vm`'s eth0, as the guest reports it.
fn mac_of(env: &Env, vm: &str) -> String {
    env.banger(&["vm", "exec", vm, "--", "cat", "/sys/class/net/eth0/address"]).ok().stdout.trim().to_owned()
}

/// A DNS question for `name` (type A) sent from this thread's namespace by `runner` (a command
/// prefix), waiting 3 s: "answer" or "timeout".
fn dns_probe(runner: &mut Command, server: &str, name: &str) -> String {
    let script = format!(
        "import socket, struct\n\
         q = struct.pack('!HHHHHH', 0x5151, 0x0100, 1, 0, 0, 0) + b''.join(bytes([len(l)]) + l.encode() for l in '{name}'.split('.')) + b'\\0' + struct.pack('!HH', 1, 1)\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n\
         try:\n s.sendto(q, ('{server}', 53)); d = s.recv(512); print('answer' if d[:2] == b'\\x51\\x51' else 'other')\n\
         except socket.timeout: print('timeout')\nexcept Exception as e: print(type(e).__name__)"
    );
    let out = runner.args(["python3", "-c", &script]).output().expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn guests_reach_each_other_by_no_protocol_in_any_nat_mode() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let ns = env.netns.clone().expect("the env has a namespace");
    env.enter_netns();
    // The uplink for the third mode: a veth into a namespace that leads nowhere.
    let _uplink = Outside::linked(&ns, "up", ("up0", "10.97.0.1/24"), "10.97.0.2/24");
    std::fs::create_dir_all(&env.state).expect("state dir");
    env.banger(&["vm", "create", "alpha"]).ok();
    env.banger(&["vm", "create", "beta"]).ok();
    start_all(&env, &["alpha", "beta"]);
    let (a, b) = (ip_of(&env, "alpha"), ip_of(&env, "beta"));
    serve(&env, "beta", 7000);
    serve(&env, "alpha", 7000);

    for config in ["nat = false\n", "nat = true\n", "nat = true\nuplink = \"up0\"\n"] {
        // Each mode is a daemon restart: the running guests are adopted and their rules rebuilt.
        std::fs::write(env.state.join("config.toml"), config).expect("config");
        env.banger(&["daemon", "stop"]).ok();
        let shown = env.banger(&["config", "show", "--json"]).ok().json();
        assert_eq!(shown["config"]["nat"], config.contains("true"), "{config}: {shown}");
        // The host reaches both guests (so the servers answer and the probes work)...
        let udp = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)\n\
                 s.sendto(b'ping', ('{b}', 7000)); print(s.recv(64).decode())"
                ),
            ])
            .output()
            .expect("python3");
        assert_eq!(String::from_utf8_lossy(&udp.stdout).trim(), "ping", "{config}: host→beta udp echo");
        // ...the guests reach each other by nothing.
        for (from, to) in [("alpha", &b), ("beta", &a)] {
            assert_eq!(connect_from(&env, from, to, 7000), "refused", "{config}: {from}→{to} tcp");
            let udp = udp_from(&env, from, to, 7000);
            assert_ne!(udp, "echo", "{config}: {from}→{to} udp");
            let icmp = icmp_from(&env, from, to);
            assert_ne!(icmp, "reply", "{config}: {from}→{to} icmp");
            // Link-local (cloud metadata) is refused as well.
            assert_ne!(connect_from(&env, from, "169.254.169.254", 80), "open", "{config}: {from}→metadata");
        }
        // A guest still pings its gateway: the probes themselves work.
        assert_eq!(icmp_from(&env, "alpha", "172.30.0.1"), "reply", "{config}: alpha→gateway icmp");
    }
    for vm in ["alpha", "beta"] {
        env.banger(&["vm", "stop", "--force", vm]).ok();
        env.banger(&["vm", "delete", vm]).ok();
    }
}

#[test]
fn a_guest_that_takes_anothers_mac_then_its_address_reaches_nothing_new() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.enter_netns();
    // The victim is open (`--allow-vm-traffic`): its address would be worth stealing.
    env.banger(&["vm", "create", "victim", "--allow-vm-traffic"]).ok();
    env.banger(&["vm", "create", "thief"]).ok();
    start_all(&env, &["victim", "thief"]);
    let victim_ip = ip_of(&env, "victim");
    let thief_ip = ip_of(&env, "thief");
    let victim_mac = mac_of(&env, "victim");
    serve(&env, "victim", 8080);
    serve(&env, "thief", 8080);
    env.banger(&["vm", "forward", "victim", "127.0.0.1:18090:8080"]).ok();
    // A host port only an open guest may reach.
    let gateway = "172.30.0.1";
    let mut host_server = host_http_server(&env, gateway, 8099);

    let victim_is_served = |when: &str| {
        let page = http_get(&format!("{victim_ip}:8080"));
        assert!(page.ends_with("victim\n"), "{when}: the victim's address reaches the victim: {page:?}");
        let page = http_get("127.0.0.1:18090");
        assert!(page.ends_with("victim\n"), "{when}: the victim's forward reaches the victim: {page:?}");
        let resolved = env.banger(&["vm", "exec", "victim", "--", "getent", "hosts", "victim.vm"]).ok().stdout;
        assert!(resolved.starts_with(&format!("{victim_ip} ")), "{when}: victim.vm: {resolved:?}");
    };
    victim_is_served("before");
    assert_eq!(connect_from(&env, "victim", gateway, 8099), "open", "the open victim reaches host ports");
    assert_eq!(connect_from(&env, "thief", gateway, 8099), "refused", "the thief does not");

    // Only the address first (the thief keeps its MAC).
    let steal_ip = format!(
        "ip addr del {thief_ip}/20 dev eth0 && ip addr add {victim_ip}/20 dev eth0 && \
         ip route replace default via {gateway}"
    );
    env.banger(&["vm", "exec", "thief", "--", "sh", "-c", &steal_ip]).ok();
    assert_ne!(connect_from(&env, "thief", gateway, 8099), "open", "a stolen address opens nothing");
    assert_ne!(connect_from(&env, "thief", gateway, 53), "open", "a stolen address is dropped at the port");
    victim_is_served("after the thief took the address");

    // Then the MAC too: every frame it sends carries the victim's MAC and address.
    let steal_mac = format!(
        "ip link set dev eth0 down && ip link set dev eth0 address {victim_mac} && ip link set dev eth0 up && \
         ip route replace default via {gateway}"
    );
    env.banger(&["vm", "exec", "thief", "--", "sh", "-c", &steal_mac]).ok();
    assert_eq!(mac_of(&env, "thief"), victim_mac);
    assert_ne!(connect_from(&env, "thief", gateway, 8099), "open", "with the victim's MAC and address");
    assert_ne!(icmp_from(&env, "thief", gateway), "reply", "the thief reaches not even the gateway");
    assert_ne!(udp_from(&env, "thief", gateway, 53), "echo");
    // Whatever the thief sent, the host's traffic for the victim still reaches the victim.
    victim_is_served("after the thief took the MAC");
    let _ = host_server.kill();
    let _ = host_server.wait();
    for vm in ["victim", "thief"] {
        env.banger(&["vm", "stop", "--force", vm]).ok();
        env.banger(&["vm", "delete", vm]).ok();
    }
}

/// An HTTP/1.0 GET of `/` on `addr` from this thread: the body.
fn http_get(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or(answer)
}

#[test]
fn the_dns_server_answers_guests_only() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let ns = env.netns.clone().expect("the env has a namespace");
    env.banger(&["vm", "create", "guest"]).ok();
    env.banger(&["vm", "start", "guest"]).ok();
    let resolved = env.banger(&["vm", "exec", "guest", "--", "getent", "hosts", "guest.vm"]).ok().stdout;
    assert!(resolved.starts_with(&format!("{} ", ip_of(&env, "guest"))), "a guest is answered: {resolved:?}");

    // The host itself (over loopback) is no guest.
    assert_eq!(dns_probe(&mut env.in_netns("env"), "172.30.0.1", "guest.vm"), "timeout", "the host's own query");

    // Neighbours on a veth, one with an address outside the subnet, one with an address inside
    // it that no VM holds.
    let outside = Outside::linked(&ns, "nb", ("nb0", "10.96.0.1/24"), "10.96.0.2/24");
    ip(&["-n", &outside.0, "addr", "add", "172.30.15.200/32", "dev", "eth0"]);
    ip(&["-n", &outside.0, "route", "add", "172.30.0.1/32", "via", "10.96.0.1", "src", "10.96.0.2"]);
    let from_outside = || {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &outside.0]);
        c
    };
    // The path works (the gateway address refuses a TCP port to the neighbour)...
    let probe = Command::new("ip")
        .args(["netns", "exec", &outside.0, "python3", "-c"])
        .arg("import socket; s = socket.create_connection(('172.30.0.1', 22), timeout=3)")
        .output()
        .expect("python3");
    let refused = String::from_utf8_lossy(&probe.stderr);
    assert!(refused.contains("ConnectionRefused"), "the neighbour reaches the gateway address: {refused}");
    // ...but DNS is not answered, from either address.
    assert_eq!(dns_probe(&mut from_outside(), "172.30.0.1", "guest.vm"), "timeout", "a neighbour outside the subnet");
    ip(&["-n", &outside.0, "route", "replace", "172.30.0.1/32", "via", "10.96.0.1", "src", "172.30.15.200"]);
    assert_eq!(dns_probe(&mut from_outside(), "172.30.0.1", "guest.vm"), "timeout", "a neighbour inside the subnet");
    // And the guest still is.
    let resolved = env.banger(&["vm", "exec", "guest", "--", "getent", "hosts", "guest.vm"]).ok().stdout;
    assert!(!resolved.is_empty(), "the guest is still answered");
    env.banger(&["vm", "stop", "--force", "guest"]).ok();
    env.banger(&["vm", "delete", "guest"]).ok();
}

/// The links of namespace `ns`, by name.
fn links_in(ns: &str) -> Vec<String> {
    let out = Command::new("ip").args(["-n", ns, "-br", "link"]).output().expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

#[test]
fn a_killed_daemons_network_is_swept_by_the_next_one_on_its_state_dir_only() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let ns = env.netns.clone().expect("the env has a namespace");
    env.banger(&["vm", "create", "gone"]).ok();
    env.banger(&["vm", "start", "gone"]).ok();
    // kill -9 the daemon, then its VMM: the bridge, pool TAPs and tables stay behind.
    let daemon = env.daemon_pid().expect("daemon pid");
    let stats = env.banger(&["vm", "stats", "gone", "--json"]).ok().json();
    let vmm = stats["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or_else(|| panic!("no pid: {stats}"));
    for pid in [daemon, vmm] {
        let raw = i32::try_from(pid).expect("pid fits");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), nix::sys::signal::Signal::SIGKILL);
        wait_until(&format!("pid {pid} gone"), Duration::from_secs(30), || !crate::harness::pid_alive(pid));
    }
    let left = links_in(&ns);
    assert!(left.iter().any(|l| l == "banger0") && left.iter().any(|l| l.starts_with("bgpool")), "{left:?}");

    // The next daemon on this state dir runs no VM: it removes them.
    env.banger(&["vm", "list"]).ok();
    assert_eq!(links_in(&ns), ["lo"], "the left-over network is swept");
    let rules = env.in_netns("nft").args(["list", "ruleset"]).output().expect("nft");
    assert_eq!(String::from_utf8_lossy(&rules.stdout).trim(), "", "no nft table is left");

    // Another state dir's bridge is left alone.
    env.banger(&["daemon", "stop"]).ok();
    ip(&["-n", &ns, "link", "add", "banger0", "type", "bridge"]);
    ip(&["-n", &ns, "link", "set", "banger0", "alias", "banger:/var/lib/someone-else"]);
    env.banger(&["vm", "list"]).ok();
    assert_eq!(links_in(&ns), ["lo", "banger0"], "another state dir's bridge stays");
    ip(&["-n", &ns, "link", "del", "banger0"]);
}
