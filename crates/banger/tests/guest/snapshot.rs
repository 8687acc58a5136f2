//! Memory snapshots under QEMU (TCG here): pause and resume keep a guest process alive; one
//! snapshot forked twice gives two forks with identities of their own, the snapshot's files and
//! a corrected clock; ten forks of one snapshot run at once, each with its own identity; warm
//! start forks the first `vm run`'s snapshot. Prints the measured times.

use std::time::{Duration, Instant};

use crate::harness::{wait_until, Env};
use crate::template::{env_from, template};

/// `sh -c SCRIPT` in `vm`, its stdout trimmed.
fn sh(env: &Env, vm: &str, script: &str) -> String {
    env.banger(&["vm", "exec", vm, "-n", "--", "sh", "-c", script]).ok().stdout.trim().to_owned()
}

fn state_of(env: &Env, vm: &str) -> String {
    env.banger(&["vm", "show", vm, "--json"]).ok().json()["state"].as_str().unwrap_or_default().to_owned()
}

fn ip_of(env: &Env, vm: &str) -> String {
    let shown = env.banger(&["vm", "show", vm, "--json"]).ok().json();
    shown["guest_ip"].as_str().unwrap_or_else(|| panic!("{vm} has no address: {shown}")).to_owned()
}

/// What identifies a guest, read inside it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    hostname: String,
    mac: String,
    addr: String,
    host_key: String,
    machine_id: String,
}

fn identity(env: &Env, vm: &str) -> Seen {
    let link = sh(env, vm, "ip -o link show eth0");
    let mac = link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap_or_default().to_owned();
    let addr = sh(env, vm, "ip -4 -o addr show eth0");
    let addr = addr.split_whitespace().skip_while(|w| *w != "inet").nth(1).unwrap_or_default().to_owned();
    Seen {
        hostname: sh(env, vm, "hostname"),
        mac,
        addr,
        host_key: sh(env, vm, "cut -d' ' -f1-2 /etc/ssh/ssh_host_ed25519_key.pub"),
        machine_id: sh(env, vm, "cat /etc/machine-id 2>/dev/null || true"),
    }
}

#[test]
fn pause_and_resume_keep_a_running_process_alive() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "sleeper", "--image", "debian-bookworm", "--memory", "512M"]).ok();
    env.banger(&["vm", "start", "sleeper"]).ok();
    let counter = "echo $$ > /root/counter.pid; i=0; while :; do i=$((i+1)); echo $i > /root/count; sleep 0.2; done";
    sh(&env, "sleeper", &format!("setsid -f sh -c '{counter}' </dev/null >/dev/null 2>&1"));
    wait_until("the counter counts", Duration::from_secs(30), || {
        sh(&env, "sleeper", "cat /root/count 2>/dev/null || echo 0").parse::<u64>().unwrap_or(0) >= 3
    });
    let pid = sh(&env, "sleeper", "cat /root/counter.pid");
    let before: u64 = sh(&env, "sleeper", "cat /root/count").parse().expect("count");

    let paused = env.banger(&["vm", "pause", "sleeper", "--json"]).ok().json();
    assert_eq!(paused["state"], "paused");
    assert_eq!(state_of(&env, "sleeper"), "paused");
    // Four seconds paused: a running counter would have gone up by ~20.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(state_of(&env, "sleeper"), "paused");
    env.banger(&["vm", "pause", "sleeper"]).fails(1, "already paused");
    let resumed = env.banger(&["vm", "resume", "sleeper", "--json"]).ok().json();
    assert_eq!(resumed["state"], "running");

    let after: u64 = sh(&env, "sleeper", "cat /root/count").parse().expect("count");
    assert!(after < before + 8, "the counter ran while paused: {before} -> {after}");
    assert_eq!(sh(&env, "sleeper", "cat /root/counter.pid"), pid, "same process");
    assert_eq!(sh(&env, "sleeper", &format!("kill -0 {pid} && echo alive")), "alive");
    wait_until("the counter counts on", Duration::from_secs(30), || {
        sh(&env, "sleeper", "cat /root/count").parse::<u64>().unwrap_or(0) > after + 3
    });
    // The clock was set on resume.
    let guest: i64 = sh(&env, "sleeper", "date +%s").parse().expect("date");
    let host = i64::try_from(std::time::UNIX_EPOCH.elapsed().expect("clock").as_secs()).expect("secs");
    assert!((guest - host).abs() <= 3, "guest clock {guest} vs host {host}");

    // A paused VM stops and deletes.
    env.banger(&["vm", "pause", "sleeper"]).ok();
    env.banger(&["vm", "stop", "sleeper"]).ok();
    assert_eq!(state_of(&env, "sleeper"), "stopped");
    env.banger(&["vm", "delete", "sleeper"]).ok();
}

#[test]
fn one_snapshot_forked_twice_gives_two_distinct_forks() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.enter_netns();
    env.banger(&["vm", "create", "src", "--image", "debian-bookworm", "--memory", "512M"]).ok();
    let cold = Instant::now();
    env.banger(&["vm", "start", "src"]).ok();
    let cold = cold.elapsed();
    sh(&env, "src", "echo from-the-source > /root/before.txt && sync");

    let taken = Instant::now();
    let snap = env.banger(&["vm", "snapshot", "src", "--name", "base", "--json"]).ok().json();
    let taken = taken.elapsed();
    assert_eq!(snap["name"], "base");
    assert_eq!(snap["source_vm_name"], "src");
    assert_eq!(snap["memory_mib"], 512);
    let size = snap["size_bytes"].as_u64().expect("size");
    assert!(size > 0, "{snap}");
    // A fresh QEMU guest's memory is a file on tmpfs: the snapshot is its device state plus a
    // sparse frozen copy of that file (lazy restores).
    let src_id = env.banger(&["vm", "show", "src", "--json"]).ok().json()["id"].as_str().expect("id").to_owned();
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self"));
    let src_memory = std::path::PathBuf::from(format!("/dev/shm/banger-mem-{uid}/{src_id}.mem"));
    assert!(!src_memory.exists(), "unlinked once qemu runs: {}", src_memory.display());
    let snap_dir = std::path::PathBuf::from(snap["dir"].as_str().expect("dir"));
    let state_len = std::fs::metadata(snap_dir.join("state.bin")).expect("state").len();
    assert!(state_len < 1 << 20, "device state only: {state_len} bytes");
    assert_eq!(std::fs::metadata(snap_dir.join("state.mem")).expect("memory").len(), 512 << 20);
    assert_eq!(state_of(&env, "src"), "running", "the source runs on");
    sh(&env, "src", "echo later > /root/after-source.txt");
    let listed = env.banger(&["snapshot", "list", "--json"]).ok().json();
    assert_eq!(listed["snapshots"].as_array().map(Vec::len), Some(1), "{listed}");

    // The forks start at least five seconds after the snapshot: their clocks must be set.
    std::thread::sleep(Duration::from_secs(5));
    let forked = Instant::now();
    env.banger(&["vm", "fork", "base", "--name", "fork-a"]).ok();
    let fork_ready = forked.elapsed();
    // Where a fork's time goes, for the measurement line below.
    let ops = env.banger(&["op", "list", "--json"]).ok().json();
    let op = ops["operations"].as_array().and_then(|o| o.iter().rev().find(|o| o["target"] == "fork-a")).cloned();
    let stages: Vec<String> = op.expect("the fork's operation")["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["elapsed_ms"].as_u64().unwrap_or(0) >= 10)
        .map(|s| format!("{} {}ms", s["name"].as_str().unwrap_or("?"), s["elapsed_ms"]))
        .collect();
    let host_now = i64::try_from(std::time::UNIX_EPOCH.elapsed().expect("clock").as_secs()).expect("secs");
    let guest_now: i64 = sh(&env, "fork-a", "date +%s").parse().expect("date");
    assert!((guest_now - host_now).abs() <= 3, "fork clock {guest_now} vs host {host_now}");
    env.banger(&["vm", "create", "--from-snapshot", "base", "fork-b"]).ok();
    env.banger(&["vm", "start", "fork-b"]).ok();

    let (src, a, b) = (identity(&env, "src"), identity(&env, "fork-a"), identity(&env, "fork-b"));
    assert_eq!((a.hostname.as_str(), b.hostname.as_str()), ("fork-a", "fork-b"));
    for (name, seen) in [("fork-a", &a), ("fork-b", &b)] {
        assert_eq!(seen.addr.split('/').next(), Some(ip_of(&env, name).as_str()), "{name}: {seen:?}");
        let shown = env.banger(&["vm", "show", name, "--json"]).ok().json();
        assert_eq!(shown["origin_snapshot"], "base");
        let pinned = std::fs::read_to_string(
            std::path::Path::new(shown["paths"]["dir"].as_str().expect("dir")).join("ssh_host_ed25519_key.pub"),
        )
        .expect("pinned key");
        assert!(pinned.starts_with(&seen.host_key), "{name} serves its own pinned key: {pinned} vs {}", seen.host_key);
    }
    for field in [
        |s: &Seen| s.mac.clone(),
        |s: &Seen| s.addr.clone(),
        |s: &Seen| s.host_key.clone(),
        |s: &Seen| s.machine_id.clone(),
    ] {
        let (x, y, z) = (field(&src), field(&a), field(&b));
        assert!(!y.is_empty() && x != y && y != z && x != z, "distinct: {src:?} {a:?} {b:?}");
    }

    // Each fork resolves by its own name, and ssh reaches it with its pinned host key.
    for (from, to) in [("fork-a", "fork-b"), ("fork-b", "fork-a"), ("fork-a", "fork-a"), ("src", "fork-b")] {
        let out = sh(&env, from, &format!("getent hosts {to}.vm"));
        assert!(out.starts_with(&format!("{} ", ip_of(&env, to))), "{from} resolves {to}.vm: {out:?}");
    }
    assert_eq!(env.banger(&["vm", "ssh", "fork-b", "--", "hostname"]).ok().stdout.trim(), "fork-b");

    // Files: the snapshot's are in both forks; later writes stay with their writer.
    for fork in ["fork-a", "fork-b"] {
        assert_eq!(sh(&env, fork, "cat /root/before.txt"), "from-the-source", "{fork}");
        assert_eq!(sh(&env, fork, "test -e /root/after-source.txt && echo yes || echo no"), "no", "{fork}");
    }
    sh(&env, "fork-a", "echo mine > /root/a-only.txt && sync");
    assert_eq!(sh(&env, "fork-b", "test -e /root/a-only.txt && echo yes || echo no"), "no");
    assert_eq!(sh(&env, "src", "test -e /root/a-only.txt && echo yes || echo no"), "no");
    assert_eq!(sh(&env, "fork-a", "cat /root/a-only.txt"), "mine");

    // The snapshot cannot go while forks exist.
    let shown = env.banger(&["snapshot", "show", "base", "--json"]).ok().json();
    assert_eq!(shown["forks"], serde_json::json!(["fork-a", "fork-b"]));
    env.banger(&["snapshot", "delete", "base"]).fails(1, "has forks (fork-a, fork-b)");

    eprintln!(
        "measured: cold boot-to-ready {:.2}s; snapshot {:.2}s, {:.1} MiB; fork-to-ready {:.2}s ({:.3} x cold; {})",
        cold.as_secs_f64(),
        taken.as_secs_f64(),
        size as f64 / 1048576.0,
        fork_ready.as_secs_f64(),
        fork_ready.as_secs_f64() / cold.as_secs_f64(),
        stages.join(", ")
    );

    // A fork of a fork: fork-a runs on the snapshot's memory mapped privately, so its own
    // snapshot is saved whole (the format before lazy memory), and a fork of that works too.
    let of_a = env.banger(&["vm", "snapshot", "fork-a", "--name", "of-a", "--json"]).ok().json();
    let of_a_dir = std::path::PathBuf::from(of_a["dir"].as_str().expect("dir"));
    assert!(!of_a_dir.join("state.mem").exists(), "a whole state: {of_a}");
    env.banger(&["vm", "fork", "of-a", "--name", "fork-aa"]).ok();
    assert_eq!(sh(&env, "fork-aa", "cat /root/a-only.txt"), "mine");
    assert_eq!(identity(&env, "fork-aa").hostname, "fork-aa");
    env.banger(&["vm", "stop", "fork-aa"]).ok();
    env.banger(&["vm", "delete", "fork-aa"]).ok();
    env.banger(&["snapshot", "delete", "of-a"]).ok();

    for vm in ["fork-a", "fork-b", "src"] {
        env.banger(&["vm", "stop", vm]).ok();
        env.banger(&["vm", "delete", vm]).ok();
    }
    env.banger(&["snapshot", "delete", "base"]).ok();
    assert_eq!(std::fs::read_dir(env.state.join("snapshots")).expect("snapshots dir").count(), 0);
}

/// Forks at once: ten forks of one snapshot, started concurrently, all run with identities of
/// their own (host name, MAC, address, machine id) and resolve one another; their QEMUs map the
/// snapshot's memory instead of each loading it (each holds far less than the guest's 512 MiB).
#[test]
fn ten_forks_of_one_snapshot_run_at_once_with_distinct_identities() {
    const FORKS: usize = 10;
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.enter_netns();
    env.banger(&["vm", "create", "origin", "--image", "debian-bookworm", "--memory", "512M"]).ok();
    env.banger(&["vm", "start", "origin"]).ok();
    sh(&env, "origin", "echo shared-before > /root/before.txt && sync");
    env.banger(&["vm", "snapshot", "origin", "--name", "many"]).ok();
    env.banger(&["vm", "stop", "origin"]).ok();

    let names: Vec<String> = (0..FORKS).map(|i| format!("many-{i}")).collect();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let env = &env;
        let forks: Vec<_> = names
            .iter()
            .map(|name| scope.spawn(move || env.banger(&["vm", "fork", "many", "--name", name]).ok()))
            .collect();
        for fork in forks {
            fork.join().expect("a fork thread");
        }
    });
    let all_ready = started.elapsed();

    let seen: Vec<Seen> = names.iter().map(|name| identity(&env, name)).collect();
    for (name, s) in names.iter().zip(&seen) {
        assert_eq!(&s.hostname, name);
        assert_eq!(state_of(&env, name), "running");
        assert_eq!(s.addr.split('/').next(), Some(ip_of(&env, name).as_str()), "{name}: {s:?}");
        assert_eq!(sh(&env, name, "cat /root/before.txt"), "shared-before", "{name}");
    }
    for field in [|s: &Seen| s.mac.clone(), |s: &Seen| s.addr.clone(), |s: &Seen| s.machine_id.clone()] {
        let mut values: Vec<String> = seen.iter().map(field).collect();
        assert!(values.iter().all(|v| !v.is_empty()), "{seen:?}");
        values.sort();
        values.dedup();
        assert_eq!(values.len(), FORKS, "distinct: {seen:?}");
    }
    // Neighbours by name, both ways round the ring.
    for i in 0..FORKS {
        let next = &names[(i + 1) % FORKS];
        let out = sh(&env, &names[i], &format!("getent hosts {next}.vm"));
        assert!(out.starts_with(&format!("{} ", ip_of(&env, next))), "{} resolves {next}.vm: {out:?}", names[i]);
    }
    // Each QEMU holds what its guest touched, not a loaded copy of the whole 512 MiB.
    let mut rss_mib = Vec::new();
    for name in &names {
        let shown = env.banger(&["vm", "show", name, "--json"]).ok().json();
        let dir = std::path::PathBuf::from(shown["paths"]["dir"].as_str().expect("dir"));
        let pid: u32 = std::fs::read_to_string(dir.join("vmm.pid")).expect("pidfile").trim().parse().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        rss_mib.push(kib / 1024);
    }
    assert!(rss_mib.iter().all(|mib| *mib < 400), "a fork loaded its whole memory: {rss_mib:?} MiB");
    eprintln!(
        "measured: {FORKS} concurrent forks ready in {:.2}s; fork QEMU RSS {:?} MiB",
        all_ready.as_secs_f64(),
        rss_mib
    );

    let mut doomed = vec!["vm", "delete", "--force"];
    doomed.extend(names.iter().map(String::as_str));
    env.banger(&doomed).ok();
    env.banger(&["vm", "delete", "origin"]).ok();
    env.banger(&["snapshot", "delete", "many"]).ok();
    let listed = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(listed["vms"].as_array().map(Vec::len), Some(0), "{listed}");
}

#[test]
fn warm_start_forks_the_first_runs_snapshot() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    std::fs::write(env.state.join("config.toml"), "warm_start = true\n").expect("config");
    let first = Instant::now();
    let run = env.banger(&["vm", "run", "--rm", "--name", "warm-one", "--", "hostname"]).ok();
    let first = first.elapsed();
    assert_eq!(run.stdout.trim(), "warm-one");
    let listed = env.banger(&["snapshot", "list", "--json"]).ok().json();
    let warm: Vec<&serde_json::Value> = listed["snapshots"].as_array().into_iter().flatten().collect();
    assert_eq!(warm.len(), 1, "one warm-start snapshot: {listed}");
    assert!(warm[0]["warm_key"].is_string(), "{listed}");

    let second = Instant::now();
    let run = env.banger(&["vm", "run", "--rm", "--name", "warm-two", "--", "sh", "-c", "hostname; date +%s"]).ok();
    let second = second.elapsed();
    let mut lines = run.stdout.lines();
    assert_eq!(lines.next(), Some("warm-two"), "{}", run.stdout);
    let guest: i64 = lines.next().and_then(|l| l.parse().ok()).expect("date");
    let host = i64::try_from(std::time::UNIX_EPOCH.elapsed().expect("clock").as_secs()).expect("secs");
    assert!((guest - host).abs() <= 3, "warm fork clock {guest} vs host {host}");
    let ops = env.banger(&["op", "list", "--json"]).ok().json();
    let last = ops["operations"].as_array().and_then(|o| o.iter().rev().find(|o| o["target"] == "warm-two"));
    let stages: Vec<&str> = last.expect("the second run's create").as_object().expect("op")["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(stages.contains(&"restore") && stages.contains(&"identity"), "a warm run restores: {stages:?}");
    // A different shape does not use it (and keeps its own).
    let other = env.banger(&["vm", "run", "--rm", "--name", "warm-big", "--cpus", "2", "--", "nproc"]).ok();
    assert_eq!(other.stdout.trim(), "2");
    let listed = env.banger(&["snapshot", "list", "--json"]).ok().json();
    assert_eq!(listed["snapshots"].as_array().map(Vec::len), Some(2), "{listed}");
    eprintln!(
        "measured: warm start: first run (cold boot + snapshot) {:.2}s, second run (fork) {:.2}s",
        first.as_secs_f64(),
        second.as_secs_f64()
    );
    for s in listed["snapshots"].as_array().into_iter().flatten() {
        env.banger(&["snapshot", "delete", s["name"].as_str().expect("name")]).ok();
    }
}
