//! `banger vm cp` and the file routes with a real guest: a tree with modes, an executable and a
//! symlink goes in and comes back with equal sha256 sums; a guest symlink pointing out and a
//! hostile tar on stdin are refused; a 64 MiB file streams both ways while bangerd stays small.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::forward::VmGuard;
use crate::harness::{Env, Run};
use crate::hostile_flow::status_bytes;
use crate::template::{env_from, template};

/// The tree's listing (path, type, mode, link target) and every file's sha256, as the same
/// shell script prints them on the host and in the guest.
const MANIFEST: &str = "cd \"$1\" && find . -printf '%p %y %m %l\\n' | LC_ALL=C sort && \
                        find . -type f | LC_ALL=C sort | xargs sha256sum";

fn host_manifest(dir: &Path) -> String {
    let out = Command::new("sh").args(["-c", MANIFEST, "manifest"]).arg(dir).output().expect("run sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn guest_manifest(env: &Env, vm: &str, dir: &str) -> String {
    env.banger(&["vm", "exec", vm, "-n", "--", "sh", "-c", MANIFEST, "manifest", dir]).ok().stdout
}

fn make_tree(root: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::create_dir_all(root.join("sub/deep")).expect("mkdir");
    std::fs::create_dir_all(root.join("private")).expect("mkdir");
    std::fs::write(root.join("a.txt"), "alpha\n").expect("write");
    std::fs::write(root.join("bin/run.sh"), "#!/bin/sh\necho ran-in-the-guest\n").expect("write");
    mode(&root.join("bin/run.sh"), 0o755);
    std::fs::write(root.join("sub/deep/secret"), vec![7u8; 100_000]).expect("write");
    mode(&root.join("sub/deep/secret"), 0o600);
    mode(&root.join("private"), 0o700);
    std::os::unix::fs::symlink("bin/run.sh", root.join("run")).expect("symlink");
    std::os::unix::fs::symlink("../a.txt", root.join("sub/up")).expect("symlink");
}

/// A tar stream whose one entry is named `name` (written into the header bytes: the `tar`
/// crate's setters refuse `..`).
fn hostile_tar(name: &str, kind: u8, link: &str) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..107].copy_from_slice(b"0000644");
    for field in [108..115, 116..123] {
        header[field].copy_from_slice(b"0000000");
    }
    let size: &[u8] = if kind == b'0' { b"00000000004" } else { b"00000000000" };
    header[124..135].copy_from_slice(size);
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = kind;
    header[157..157 + link.len()].copy_from_slice(link.as_bytes());
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = header.to_vec();
    if kind == b'0' {
        let mut data = [0u8; 512];
        data[..4].copy_from_slice(b"pwnd");
        out.extend_from_slice(&data);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn cp_with_stdin(env: &Env, args: &[&str], stdin: &[u8]) -> Run {
    let mut child =
        env.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    child.stdin.take().expect("stdin").write_all(stdin).expect("write stdin");
    Run::from(child.wait_with_output().expect("wait"))
}

#[test]
fn cp_round_trips_a_tree_and_refuses_escapes() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "cp", "--image", "minimal", "--no-network"]).ok();
    let _guard = VmGuard(&env, "cp");
    env.banger(&["vm", "start", "cp"]).ok();
    let host = env.dir.path().join("host");
    make_tree(&host.join("tree"));
    let original = host_manifest(&host.join("tree"));

    // In: into an existing directory, as `docker cp` does.
    env.banger(&["vm", "cp", host.join("tree").to_str().expect("utf-8"), "cp:/root/"]).ok();
    assert_eq!(guest_manifest(&env, "cp", "/root/tree"), original, "the tree in the guest");
    let ran = env.banger(&["vm", "exec", "cp", "-n", "--", "/root/tree/run"]).ok();
    assert_eq!(ran.stdout.trim(), "ran-in-the-guest", "the executable kept its mode through the symlink");

    // Out: into an existing directory, and a directory's contents as a new one.
    let back = env.dir.path().join("back");
    std::fs::create_dir(&back).expect("mkdir");
    env.banger(&["vm", "cp", "cp:/root/tree", back.to_str().expect("utf-8")]).ok();
    assert_eq!(host_manifest(&back.join("tree")), original, "the tree back on the host");
    let renamed = env.dir.path().join("renamed");
    env.banger(&["vm", "cp", "cp:/root/tree/.", renamed.to_str().expect("utf-8")]).ok();
    assert_eq!(host_manifest(&renamed), original, "SRC/. into a new directory");
    // A single file becomes the named file.
    let one = env.dir.path().join("one.txt");
    env.banger(&["vm", "cp", "cp:/root/tree/a.txt", one.to_str().expect("utf-8")]).ok();
    assert_eq!(std::fs::read_to_string(&one).expect("read"), "alpha\n");

    // A guest symlink pointing out is refused on the host, and nothing lands outside.
    env.banger(&["vm", "exec", "cp", "-n", "--", "ln", "-s", "/etc/shadow", "/root/tree/evil"]).ok();
    let out = env.dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let refused = env.banger(&["vm", "cp", "cp:/root/tree", out.to_str().expect("utf-8")]).fails(1, "tree/evil");
    assert!(refused.stderr.contains("points outside"), "{}", refused.stderr);
    assert!(std::fs::symlink_metadata(out.join("tree/evil")).is_err(), "the link was not made");

    // Hostile tars on stdin are refused in the guest, naming the entry.
    let up = cp_with_stdin(&env, &["vm", "cp", "-", "cp:/root/tree"], &hostile_tar("../escaped", b'0', ""));
    let up = up.fails(1, "../escaped");
    assert!(up.stderr.contains("'..'"), "{}", up.stderr);
    let link = cp_with_stdin(&env, &["vm", "cp", "-", "cp:/root/tree"], &hostile_tar("l", b'2', "/etc"));
    link.fails(1, "points outside");
    let ls = env.banger(&["vm", "exec", "cp", "-n", "--", "sh", "-c", "ls /root/escaped /root/tree/l 2>&1; true"]).ok();
    assert!(ls.stdout.matches("No such file").count() == 2, "nothing landed: {}", ls.stdout);

    // `-` both ways: a tar on stdout goes back in through stdin.
    let tar = env.cmd(&["vm", "cp", "cp:/root/tree/sub", "-"]).output().expect("run");
    assert!(tar.status.success(), "{}", String::from_utf8_lossy(&tar.stderr));
    env.banger(&["vm", "exec", "cp", "-n", "--", "mkdir", "/root/piped"]).ok();
    cp_with_stdin(&env, &["vm", "cp", "-", "cp:/root/piped"], &tar.stdout).ok();
    let piped = guest_manifest(&env, "cp", "/root/piped/sub");
    assert!(piped.contains("./up l 777 ../a.txt") && piped.contains("./deep/secret f 600"), "{piped}");

    // The routes' refusals: missing path, wrong kind, non-empty directory, relative path, '/'.
    let (code, body) = env.request("GET", "/v1/vms/cp/files/stat?path=/root/nope", "");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("not_found"), "{body}");
    let (code, body) = env.request("GET", "/v1/vms/cp/files/list?path=/root/tree/a.txt", "");
    assert_eq!(code, 400, "{body}");
    let (code, body) = env.request("DELETE", "/v1/vms/cp/files?path=/root/tree", "");
    assert_eq!(code, 409, "{body}");
    let (code, body) = env.request("GET", "/v1/vms/cp/files/stat?path=root", "");
    assert_eq!(code, 400, "{body}");
    let (code, body) = env.request("DELETE", "/v1/vms/cp/files?path=/&recursive=true", "");
    assert_eq!(code, 400, "{body}");
    let (code, body) = env.request("GET", "/v1/vms/cp/files/list?path=/root/tree", "");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("json");
    let names: Vec<&str> =
        list["entries"].as_array().expect("entries").iter().filter_map(|e| e["path"].as_str()).collect();
    assert_eq!(
        names,
        [
            "/root/tree/a.txt",
            "/root/tree/bin",
            "/root/tree/evil",
            "/root/tree/private",
            "/root/tree/run",
            "/root/tree/sub"
        ]
    );
    let (code, body) = env.request("DELETE", "/v1/vms/cp/files?path=/root/tree/run", "");
    assert_eq!(code, 204, "{body}");
    let (code, _) = env.request("GET", "/v1/vms/cp/files/stat?path=/root/tree/bin/run.sh", "");
    assert_eq!(code, 200, "removing a symlink leaves its target");

    // Contents both ways, mkdir, and the archive's destination check.
    let put = "/v1/vms/cp/files/content?path=/root/new/dir/h.txt&mode=384&parents=true";
    let (code, body) = env.request("PUT", put, "hello world");
    assert_eq!(code, 200, "{body}");
    let stat: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (stat["kind"].as_str(), stat["size"].as_u64(), stat["mode"].as_u64()),
        (Some("file"), Some(11), Some(384))
    );
    let whole = raw_response(&env, "GET /v1/vms/cp/files/content?path=/root/new/dir/h.txt&limit=5");
    assert!(whole.starts_with("HTTP/1.1 200"), "{whole}");
    assert!(whole.to_ascii_lowercase().contains("x-banger-file-size: 11"), "{whole}");
    assert!(whole.contains("hello") && !whole.contains("hello world"), "at most the limit: {whole}");
    let (code, body) = env.request("GET", "/v1/vms/cp/files/content?path=/root/new", "");
    assert_eq!(code, 400, "a directory has no contents: {body}");
    let (code, body) =
        env.request("POST", "/v1/vms/cp/files/mkdir", r#"{"path":"/root/m/n","parents":true,"mode":448}"#);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""kind":"dir""#) && body.contains(r#""mode":448"#), "{body}");
    let (code, body) = env.request("PUT", "/v1/vms/cp/files/archive?path=/root/missing", "");
    assert_eq!(code, 404, "{body}");
}

/// The whole raw answer (head and body) to `request_line`.
fn raw_response(env: &Env, request_line: &str) -> String {
    use std::io::Read as _;
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "{request_line} HTTP/1.1\r\nHost: bangerd\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Runs `banger args` while sampling bangerd's VmRSS; (elapsed, peak).
fn sampled(env: &Env, pid: u32, args: &[&str]) -> (Duration, u64) {
    let started = Instant::now();
    let mut child = env.cmd(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut peak = 0;
    loop {
        peak = peak.max(status_bytes(pid, "VmRSS"));
        if let Some(status) = child.try_wait().expect("wait") {
            let took = started.elapsed();
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
            assert!(status.success(), "banger {args:?} failed: {stderr}");
            return (took, peak);
        }
        // The sampling interval, not a wait for a condition.
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_64_mib_file_streams_both_ways_with_the_daemon_small() {
    const SIZE: usize = 64 << 20;
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "big", "--image", "minimal", "--no-network", "--disk", "1G"]).ok();
    let _guard = VmGuard(&env, "big");
    env.banger(&["vm", "start", "big"]).ok();
    let pid = env.daemon_pid().expect("the daemon runs");
    // Incompressible bytes (xorshift), so no layer can shortcut them.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let file = env.dir.path().join("big.bin");
    std::fs::write(&file, &data).expect("write");
    let sum = |out: &str| out.split_whitespace().next().unwrap_or_default().to_owned();
    let host_sum =
        sum(&String::from_utf8_lossy(&Command::new("sha256sum").arg(&file).output().expect("sha256sum").stdout));
    let before = status_bytes(pid, "VmRSS");

    let (took_in, peak_in) = sampled(&env, pid, &["vm", "cp", file.to_str().expect("utf-8"), "big:/root/big.bin"]);
    let guest_sum = env.banger(&["vm", "exec", "big", "-n", "--", "sha256sum", "/root/big.bin"]).ok().stdout;
    assert_eq!(sum(&guest_sum), host_sum, "the file in the guest");
    let back = env.dir.path().join("back.bin");
    let (took_out, peak_out) = sampled(&env, pid, &["vm", "cp", "big:/root/big.bin", back.to_str().expect("utf-8")]);
    let back_sum =
        String::from_utf8_lossy(&Command::new("sha256sum").arg(&back).output().expect("sha256sum").stdout).into_owned();
    assert_eq!(sum(&back_sum), host_sum, "the file back on the host");
    let hwm = status_bytes(pid, "VmHWM");
    let mbps = |took: Duration| SIZE as f64 / 1e6 / took.as_secs_f64();
    eprintln!(
        "vm cp of 64 MiB: in {:.2} s ({:.1} MB/s), out {:.2} s ({:.1} MB/s); bangerd VmRSS before {} KiB, \
         peak in {} KiB, peak out {} KiB, VmHWM {} KiB",
        took_in.as_secs_f64(),
        mbps(took_in),
        took_out.as_secs_f64(),
        mbps(took_out),
        before / 1024,
        peak_in / 1024,
        peak_out / 1024,
        hwm / 1024
    );
    // Buffering the file would take 64 MiB; the windows (4 MiB up, 256 KiB down) and hyper's
    // buffers take a few.
    let bound = before + (32 << 20);
    assert!(
        peak_in.max(peak_out) < bound,
        "bangerd grew from {} to {} KiB",
        before / 1024,
        peak_in.max(peak_out) / 1024
    );
    assert!(hwm < bound, "bangerd's VmHWM is {} KiB (before: {} KiB)", hwm / 1024, before / 1024);
}
