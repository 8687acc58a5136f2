//! Guest floods against a deliberately slow host client: `cat /dev/zero` through `vm exec`, and
//! an endless stream of zeros through a port forward (the agent tunnel), each read at about
//! 1 MB/s for ~20 s. Credit-based flow control must hold the guest back: bangerd's resident
//! memory (VmRSS sampled from /proc, and VmHWM at the end) stays under 100 MB, and the VM and
//! daemon still answer afterwards.

use std::io::Read as _;
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::forward::{free_port, VmGuard};
use crate::harness::wait_until;
use crate::template::{env_from, template};

/// The bound the daemon must stay under.
const RSS_LIMIT: u64 = 100 << 20;
/// How long the slow clients read.
const FLOOD_FOR: Duration = Duration::from_secs(20);

/// `field` (`VmRSS`, `VmHWM`) of process `pid`, in bytes.
pub(crate) fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon runs");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Reads `reader` at about 1 MB/s (64 KiB every 60 ms) until `until`; the bytes read.
fn slow_read(mut reader: impl std::io::Read, until: Instant) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while Instant::now() < until {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
        // The throttle of a slow client, not a wait for a condition.
        std::thread::sleep(Duration::from_millis(60));
    }
    total
}

#[test]
fn a_flood_read_by_a_slow_client_leaves_the_daemon_small() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.enter_netns();
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:9000");
    env.banger(&["vm", "create", "flood", "--image", "debian-bookworm", "--publish", &publish]).ok();
    let _guard = VmGuard(&env, "flood");
    env.banger(&["vm", "start", "flood"]).ok();
    let pid = env.daemon_pid().expect("the daemon runs");
    let before = status_bytes(pid, "VmRSS");

    // A guest server that writes zeros to whoever connects, for ever.
    let zeros = "import socket,threading\n\
                 s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('127.0.0.1', 9000)); s.listen(4)\n\
                 def serve(c):\n    z=bytes(1<<20)\n    try:\n        while True: c.sendall(z)\n    except OSError: pass\n\
                 while True:\n    c,_=s.accept(); threading.Thread(target=serve,args=(c,),daemon=True).start()\n";
    let serve = "setsid python3 -c \"$0\" >/dev/null 2>&1 </dev/null &";
    env.banger(&["vm", "exec", "flood", "-n", "--", "sh", "-c", serve, zeros]).ok();
    let mut tcp = None;
    wait_until("the zero server answers through the forward", Duration::from_secs(60), || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut first = [0u8; 1];
        let ok = s.read_exact(&mut first).is_ok();
        if ok {
            tcp = Some(s);
        }
        ok
    });
    let tcp = tcp.expect("connected");

    let mut exec = env
        .cmd(&["vm", "exec", "flood", "-n", "--", "cat", "/dev/zero"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run banger vm exec");
    let stdout = exec.stdout.take().expect("stdout");
    let until = Instant::now() + FLOOD_FOR;
    let exec_reader = std::thread::spawn(move || slow_read(stdout, until));
    let tcp_reader = std::thread::spawn(move || slow_read(tcp, until));

    let mut peak = 0;
    let mut samples = 0;
    while Instant::now() < until {
        peak = peak.max(status_bytes(pid, "VmRSS"));
        samples += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let (exec_read, tcp_read) = (exec_reader.join().expect("exec reader"), tcp_reader.join().expect("tcp reader"));
    let hwm = status_bytes(pid, "VmHWM");
    let _ = exec.kill();
    let _ = exec.wait();
    eprintln!(
        "bangerd VmRSS before {} KiB, peak of {samples} samples during the floods {} KiB, VmHWM {} KiB; \
         the slow clients read {} KiB (exec) and {} KiB (forward)",
        before / 1024,
        peak / 1024,
        hwm / 1024,
        exec_read / 1024,
        tcp_read / 1024
    );
    assert!(exec_read > 1 << 20 && tcp_read > 1 << 20, "both floods reached their clients");
    assert!(peak < RSS_LIMIT, "bangerd's RSS reached {} KiB during the floods", peak / 1024);
    assert!(hwm < RSS_LIMIT, "bangerd's VmHWM is {} KiB", hwm / 1024);

    // The VM and the daemon go on: the killed client's command ended, a new exec answers.
    let out = env.banger(&["vm", "exec", "flood", "-n", "--", "echo", "still-here"]).ok();
    assert_eq!(out.stdout.trim(), "still-here");
}
