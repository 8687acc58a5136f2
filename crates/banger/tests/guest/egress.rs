//! Egress policy on real guests: an "outside" namespace (addresses from 198.18.0.0/15 only)
//! behind a NAT uplink runs an HTTP server on several addresses and a small authoritative DNS
//! server for the test names; banger's DNS forwards to it (the daemon's namespace gets a
//! resolv.conf naming it). Each check runs in the guest and reports what a connect gave and how
//! long it took.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{wait_until, Env};
use crate::network::{ip, Outside};
use crate::template::{env_from, template};

/// An authoritative DNS server for the test names on 198.18.0.2:53 (UDP), TTL 60, NXDOMAIN for
/// others. `cdn.test` shares `allowed.test`'s address.
const DNS_SERVER: &str = r"
import socket, struct
Z = {'allowed.test': '198.18.0.10', 'cdn.test': '198.18.0.10', 'denied.test': '198.18.0.11',
     'a.wild.test': '198.18.0.12', 'b.a.wild.test': '198.18.0.12', 'wild.test': '198.18.0.13'}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('198.18.0.2', 53))
while True:
    q, a = s.recvfrom(4096)
    try:
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
            i += 1 + q[i]
        qtype = struct.unpack('!H', q[i + 1:i + 3])[0]
        end = i + 5
        addr = Z.get('.'.join(labels))
        flags = 0x8400 | (struct.unpack('!H', q[2:4])[0] & 0x0100) | (0 if addr else 3)
        an = 1 if addr and qtype == 1 else 0
        r = q[:2] + struct.pack('!HHHHH', flags, 1, an, 0, 0) + q[12:end]
        if an:
            r += b'\xc0\x0c' + struct.pack('!HHIH', 1, 1, 60, 4) + socket.inet_aton(addr)
        s.sendto(r, a)
    except Exception:
        pass
";

/// A TLS server on 198.18.0.10:443 (any SNI; a self-made certificate in argv[1], key in
/// argv[2]) that answers every connection with `hello`.
const TLS_SERVER: &str = r"
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('198.18.0.10', 443)); l.listen(64)
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True); t.sendall(b'hello'); t.close()
    except Exception:
        c.close()
while True:
    c, _ = l.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
";

/// Run in the guest: for each `SNI` argument, a TLS handshake with 198.18.0.10:443 sending that
/// name (no verification: the name check is banger's, not the certificate's), then for each
/// `Host` an HTTP GET to 198.18.0.10:80 with that Host header: one line `kind name result ms`.
const NAME_PROBE: &str = r"
import socket, ssl, sys, time
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
for name in sys.argv[1:]:
    for kind in ('tls', 'http'):
        t = time.monotonic()
        try:
            s = socket.create_connection(('198.18.0.10', 443 if kind == 'tls' else 80), timeout=5)
            if kind == 'tls':
                s = ctx.wrap_socket(s, server_hostname=name); r = 'ok' if s.recv(5) == b'hello' else 'other'
            else:
                s.sendall(b'GET / HTTP/1.0\r\nHost: ' + name.encode() + b'\r\n\r\n')
                r = 'ok' if s.recv(12).startswith(b'HTTP/1.0 200') else 'other'
        except (ConnectionResetError, BrokenPipeError):
            r = 'reset'
        except ssl.SSLError as e:
            r = 'reset' if 'EOF' in str(e) or 'reset' in str(e).lower() else 'SSLError'
        except Exception as e:
            r = type(e).__name__
        print(kind, name, r, int((time.monotonic() - t) * 1000))
";

/// Run in the guest: for each `host:port` argument, one line `host:port result ms` where result
/// is `open`, `refused` (TCP reset), `unreachable` (ICMP admin-prohibited), `noname` (the name
/// did not resolve) or the error's type.
const PROBE: &str = r"
import errno, socket, sys, time
for target in sys.argv[1:]:
    host, port = target.rsplit(':', 1)
    t = time.monotonic()
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        r = 'open'
    except ConnectionRefusedError:
        r = 'refused'
    except socket.gaierror:
        r = 'noname'
    except OSError as e:
        r = 'unreachable' if e.errno == 113 else errno.errorcode.get(e.errno, type(e).__name__)
    except Exception as e:
        r = type(e).__name__
    print(target, r, int((time.monotonic() - t) * 1000))
";

/// What each target gave, with the time it took in ms.
fn probe(env: &Env, vm: &str, targets: &[&str]) -> Vec<(String, String, u64)> {
    let mut args = vec!["vm", "exec", vm, "--", "python3", "-c", PROBE];
    args.extend_from_slice(targets);
    let out = env.banger(&args).ok().stdout;
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_owned(), f[1].to_owned(), f[2].parse().unwrap_or(u64::MAX))
        })
        .collect()
}

fn result_of<'a>(results: &'a [(String, String, u64)], target: &str) -> (&'a str, u64) {
    let r = results.iter().find(|r| r.0 == target).unwrap_or_else(|| panic!("{target} not probed: {results:?}"));
    (r.1.as_str(), r.2)
}

/// The daemon's namespace resolves through the outside DNS server: `ip netns exec` mounts
/// `/etc/netns/NS/resolv.conf` over `/etc/resolv.conf`. Removed on drop.
struct Resolver(PathBuf);

impl Resolver {
    fn new(ns: &str) -> Self {
        let dir = PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&dir).expect("/etc/netns dir");
        std::fs::write(dir.join("resolv.conf"), "nameserver 198.18.0.2\n").expect("resolv.conf");
        Self(dir)
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn in_outside(outside: &Outside, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &outside.0])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn in the outside namespace")
}

fn denials(env: &Env, vm: &str) -> Vec<serde_json::Value> {
    let log = env.banger(&["vm", "network", vm, "log", "--json"]).ok().json();
    log["denials"].as_array().cloned().unwrap_or_default()
}

#[test]
fn egress_policy_by_name_and_address_refuses_at_once_and_changes_live() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let ns = env.netns.clone().expect("the env has a namespace");
    let _resolver = Resolver::new(&ns);
    let outside = Outside::linked(&ns, "eg", ("eg0", "198.18.0.1/24"), "198.18.0.2/24");
    for addr in ["198.18.0.10/24", "198.18.0.11/24", "198.18.0.12/24", "198.18.0.13/24", "198.18.0.20/24"] {
        ip(&["-n", &outside.0, "addr", "add", addr, "dev", "eth0"]);
    }
    // A default route out, so that a refusal is the policy's and not a missing route's.
    ip(&["-n", &ns, "route", "add", "default", "via", "198.18.0.2"]);
    let (cert, key) = (env.dir.path().join("cert.pem"), env.dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=allowed.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl (scripts/deps --test)");
    assert!(made.success(), "openssl could not make a certificate");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let _servers = Killed(vec![
        in_outside(&outside, &["python3", "-m", "http.server", "80", "--bind", "0.0.0.0"]),
        in_outside(&outside, &["python3", "-c", DNS_SERVER]),
        in_outside(&outside, &["python3", "-c", TLS_SERVER, &cert, &key]),
    ]);
    wait_until("the outside servers listen", Duration::from_secs(20), || {
        let out = Command::new("ip").args(["netns", "exec", &outside.0, "ss", "-Hlntu"]).output().expect("ss");
        let text = String::from_utf8_lossy(&out.stdout);
        text.contains("198.18.0.2:53") && text.contains(":80 ") && text.contains("198.18.0.10:443")
    });

    std::fs::create_dir_all(&env.state).expect("state dir");
    std::fs::write(env.state.join("config.toml"), "nat = true\nuplink = \"eg0\"\n").expect("config");
    let allow = ["--allow-host", "allowed.test", "--allow-host", "*.wild.test"];
    let mut create = vec!["vm", "create", "eg", "--network-mode", "allowlist", "--deny-host", "denied.test"];
    create.extend_from_slice(&allow);
    env.banger(&create).ok();
    let shown = env.banger(&["vm", "show", "eg"]).ok().stdout;
    assert!(shown.contains("allowlist allow=allowed.test,*.wild.test deny=denied.test"), "{shown}");
    env.banger(&["vm", "start", "eg"]).ok();

    let targets = [
        "allowed.test:80",
        "a.wild.test:80",
        "b.a.wild.test:80",
        "wild.test:80",
        "denied.test:80",
        "cdn.test:80",
        "198.18.0.20:80",
        "198.18.0.11:80",
        "169.254.169.254:80",
        "198.18.0.1:80",
        "172.30.0.1:22",
    ];
    let r = probe(&env, "eg", &targets);
    for open in ["allowed.test:80", "a.wild.test:80", "b.a.wild.test:80"] {
        assert_eq!(result_of(&r, open).0, "open", "{open}: {r:?}");
    }
    for (target, want) in [
        ("wild.test:80", "noname"),
        ("denied.test:80", "noname"),
        ("cdn.test:80", "noname"),
        ("198.18.0.20:80", "refused"),
        ("198.18.0.11:80", "refused"),
        ("169.254.169.254:80", "unreachable"),
        ("198.18.0.1:80", "refused"),
        ("172.30.0.1:22", "refused"),
    ] {
        let (got, ms) = result_of(&r, target);
        assert_eq!(got, want, "{target}: {r:?}");
        assert!(ms < 100, "{target} took {ms} ms to fail: {r:?}");
    }

    let log = denials(&env, "eg");
    let has = |name: &str, rule: &str| {
        log.iter()
            .any(|d| d["protocol"] == "dns" && d["name"] == name && d["rule"] == rule && d["decision"] == "refused")
    };
    assert!(has("denied.test", "deny denied.test"), "{log:?}");
    assert!(has("wild.test", "not in allowlist"), "{log:?}");
    // Names on a shared address: the address is open (allowed.test resolved to it), but HTTP
    // Host and TLS SNI are checked by name (cdn.test shares allowed.test's address).
    let out =
        env.banger(&["vm", "exec", "eg", "--", "python3", "-c", NAME_PROBE, "allowed.test", "cdn.test"]).ok().stdout;
    let named: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    let outcome = |kind: &str, name: &str| {
        let line =
            named.iter().find(|f| f[0] == kind && f[1] == name).unwrap_or_else(|| panic!("{kind} {name}: {out}"));
        (line[2].to_owned(), line[3].parse::<u64>().unwrap_or(u64::MAX))
    };
    assert_eq!(outcome("tls", "allowed.test").0, "ok", "{out}");
    assert_eq!(outcome("http", "allowed.test").0, "ok", "{out}");
    for kind in ["tls", "http"] {
        let (got, ms) = outcome(kind, "cdn.test");
        assert_eq!(got, "reset", "{kind} with a denied name: {out}");
        assert!(ms < 100, "{kind} cdn.test took {ms} ms to fail: {out}");
    }
    wait_until("the name denials are logged", Duration::from_secs(10), || {
        let log = denials(&env, "eg");
        ["tls", "http"].iter().all(|p| {
            log.iter().any(|d| d["protocol"] == *p && d["name"] == "cdn.test" && d["address"] == "198.18.0.10")
        })
    });

    // Connection refusals reach the log through the kernel's NFLOG copies (read asynchronously).
    wait_until("the refused connection is logged", Duration::from_secs(10), || {
        denials(&env, "eg").iter().any(|d| {
            d["protocol"] == "tcp"
                && d["address"] == "198.18.0.20"
                && d["port"] == 80
                && d["rule"] == "not in allowlist"
                && d["decision"] == "reset"
        })
    });
    // The guest reads its own recent denials (written through its agent, at most once a second).
    wait_until("the guest sees its denials", Duration::from_secs(15), || {
        let seen = env.banger(&["vm", "exec", "eg", "--", "cat", "/run/banger/egress-denials"]);
        seen.code == 0 && seen.stdout.contains("\"name\":\"denied.test\"") && seen.stdout.contains("\"198.18.0.20\"")
    });
    let net = env.banger(&["vm", "network", "eg", "show", "--json"]).ok().json();
    assert_eq!(net["enforced"], true, "{net}");
    let learned = net["learned"].as_array().cloned().unwrap_or_default();
    assert!(learned.iter().any(|l| l["address"] == "198.18.0.10" && l["name"] == "allowed.test"), "{net}");

    // A change on the running VM is in force when the command returns.
    let mut set = vec!["vm", "network", "eg", "set", "--allow-host", "198.18.0.20:80"];
    set.extend_from_slice(&allow);
    env.banger(&set).ok();
    let r = probe(&env, "eg", &["198.18.0.20:80", "allowed.test:80"]);
    assert_eq!(result_of(&r, "198.18.0.20:80").0, "open", "{r:?}");
    assert_eq!(result_of(&r, "allowed.test:80").0, "open", "{r:?}");

    // Closed: nothing leaves, banger's own channel still works.
    env.banger(&["vm", "network", "eg", "set", "--mode", "closed"]).ok();
    let r = probe(&env, "eg", &["198.18.0.20:80", "allowed.test:80", "198.18.0.10:80"]);
    assert_eq!(result_of(&r, "198.18.0.20:80").0, "refused", "{r:?}");
    assert_eq!(result_of(&r, "allowed.test:80").0, "noname", "{r:?}");
    assert_eq!(result_of(&r, "198.18.0.10:80").0, "refused", "what DNS opened is closed again: {r:?}");
    let echoed = env.banger(&["vm", "exec", "eg", "--", "echo", "still-here"]).ok().stdout;
    assert_eq!(echoed.trim(), "still-here");

    env.banger(&["vm", "stop", "--force", "eg"]).ok();
    env.banger(&["vm", "delete", "eg"]).ok();
}
