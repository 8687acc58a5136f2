//! Port forwards into a real guest through the agent tunnel: a web server in the guest reached
//! from the host via `--publish` and `vm forward`, a busy host port, a guest port nothing
//! listens on, a daemon restart (the adopted VM's forwards listen again), and stop.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::{wait_until, Env};
use crate::template::{env_from, sha256, template};

/// Stops and deletes a VM when the test ends, pass or fail, so no VMM outlives it.
pub(crate) struct VmGuard<'a>(pub(crate) &'a Env, pub(crate) &'a str);

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.banger(&["vm", "stop", "--force", self.1]);
        let _ = self.0.banger(&["vm", "delete", self.1]);
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// An HTTP/1.0 GET on 127.0.0.1:`port`: the status line and the body.
fn get(port: u16, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::InvalidData)?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, answer[split + 4..].to_vec()))
}

fn states(env: &Env, vm: &str) -> Vec<(u64, String)> {
    let list = env.banger(&["vm", "forward", vm, "--json"]).ok().json();
    let forwards = list["forwards"].as_array().expect("forwards").iter();
    forwards.map(|f| (f["host_port"].as_u64().unwrap_or(0), f["state"].as_str().unwrap_or("?").to_owned())).collect()
}

#[test]
fn a_guest_web_server_is_reached_through_port_forwards() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    // The daemon listens in the env's namespace: so must the test's sockets.
    env.enter_netns();
    let (published, added, refused) = (free_port(), free_port(), free_port());
    let publish = format!("127.0.0.1:{published}:8000");
    env.banger(&["vm", "create", "web", "--image", "debian-bookworm", "--publish", &publish]).ok();
    let _guard = VmGuard(&env, "web");
    env.banger(&["vm", "start", "web"]).ok();
    assert_eq!(states(&env, "web"), [(u64::from(published), "listening".to_owned())]);

    // Nothing listens on 8000 yet: the connection is accepted on the host, then reset.
    let (status, _) = get(published, "/").unwrap_or_else(|e| (e.kind().to_string(), Vec::new()));
    assert!(!status.starts_with("HTTP"), "no server yet, yet got {status}");

    let prepare = "mkdir -p /srv/www && echo forwarded > /srv/www/banger-marker \
                   && head -c 10485760 /dev/urandom > /srv/www/blob && sha256sum /srv/www/blob | cut -d' ' -f1";
    let guest_sum = env.banger(&["vm", "exec", "web", "-n", "--", "sh", "-c", prepare]).ok().stdout.trim().to_owned();
    let serve = "setsid python3 -m http.server 8000 --directory /srv/www >/tmp/http.log 2>&1 </dev/null &";
    env.banger(&["vm", "exec", "web", "-n", "--", "sh", "-c", serve]).ok();
    let mut listing = String::new();
    wait_until("the guest web server answers through the forward", Duration::from_secs(60), || {
        match get(published, "/") {
            Ok((status, body)) if status.contains("200") => {
                listing = String::from_utf8_lossy(&body).into_owned();
                true
            }
            _ => false,
        }
    });
    assert!(listing.contains("Directory listing") && listing.contains("banger-marker"), "{listing}");

    // Latency of a small request through the tunnel, one connection each.
    let mut times = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let (status, body) = get(published, "/banger-marker").expect("get");
        times.push(start.elapsed());
        assert!(status.contains("200") && body == b"forwarded\n", "{status}");
    }
    times.sort();
    eprintln!(
        "forward: 20 GETs through the agent tunnel: median {:.1} ms, min {:.1} ms, max {:.1} ms",
        times[10].as_secs_f64() * 1000.0,
        times[0].as_secs_f64() * 1000.0,
        times[19].as_secs_f64() * 1000.0
    );
    // Bulk: 10 MiB, checked end to end.
    let start = Instant::now();
    let (status, blob) = get(published, "/blob").expect("blob");
    let took = start.elapsed();
    assert!(status.contains("200"), "{status}");
    assert_eq!(blob.len(), 10 * 1024 * 1024);
    assert_eq!(sha256(&blob), guest_sum, "the blob arrived intact");
    eprintln!("forward: 10 MiB in {:.2} s ({:.1} MiB/s)", took.as_secs_f64(), 10.0 / took.as_secs_f64());
    // Several clients at once.
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..8).map(|_| s.spawn(|| get(published, "/banger-marker"))).collect();
        for c in clients {
            let (status, body) = c.join().expect("thread").expect("get");
            assert!(status.contains("200") && body == b"forwarded\n", "{status}");
        }
    });

    // Added while running: listens at once.
    let spec = format!("127.0.0.1:{added}:8000");
    let out = env.banger(&["vm", "forward", "web", &spec]).ok();
    assert_eq!(out.stdout, format!("127.0.0.1:{added} -> web:8000\n"));
    assert!(get(added, "/banger-marker").expect("get").0.contains("200"));
    // A host port something else holds is refused and not recorded.
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = holder.local_addr().expect("addr").port();
    env.banger(&["vm", "forward", "web", &format!("127.0.0.1:{busy}:8000")])
        .fails(1, &format!("cannot listen on 127.0.0.1:{busy}: the address is already in use"));
    assert!(!states(&env, "web").iter().any(|(p, _)| *p == u64::from(busy)));
    // A guest port nothing listens on: accepted on the host, then closed at once.
    env.banger(&["vm", "forward", "web", &format!("{refused}:9")]).ok();
    let mut c = TcpStream::connect(("127.0.0.1", refused)).expect("the host side listens");
    c.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut buf = [0u8; 8];
    assert!(c.read(&mut buf).map_or(true, |n| n == 0), "no bytes from a closed guest port");

    // A restarted daemon adopts the running VM and listens for its forwards again.
    env.banger(&["daemon", "stop"]).ok();
    assert!(TcpStream::connect(("127.0.0.1", published)).is_err(), "no daemon, no listener");
    let listed = states(&env, "web");
    assert!(listed.iter().all(|(_, state)| state == "listening"), "{listed:?}");
    assert!(get(published, "/banger-marker").expect("get after restart").0.contains("200"));

    // Stopped: kept, not listening.
    env.banger(&["vm", "stop", "web"]).ok();
    assert!(TcpStream::connect(("127.0.0.1", published)).is_err());
    assert!(states(&env, "web").iter().all(|(_, state)| state == "inactive"));
    env.banger(&["vm", "delete", "web"]).ok();
}
