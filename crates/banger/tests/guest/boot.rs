//! `vm run` end to end: output, exit codes, stdin, bulk output, --rm, two VMs at once.

use std::io::Write as _;
use std::process::Stdio;

use crate::template::{env_from, template};

#[test]
fn uname_prints_the_kernel_release_and_exit_codes_propagate() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let kernels = env.banger(&["kernel", "list", "--json"]).ok().json();
    let release = kernels["kernels"][0]["release"].as_str().expect("release").to_owned();
    let run = env.banger(&["vm", "run", "--rm", "--image", "minimal", "--", "uname", "-r"]).ok();
    assert_eq!(run.stdout.trim(), release);
    let seven =
        env.banger(&["vm", "run", "--rm", "--image", "minimal", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(seven.code, 7, "{}", seven.stderr);
    assert_eq!(seven.stdout, "out\n");
    assert!(seven.stderr.contains("err\n"), "{}", seven.stderr);
    let missing = env.banger(&["vm", "run", "--rm", "--image", "minimal", "--", "no-such-command-here"]);
    assert_eq!(missing.code, 127, "{}", missing.stderr);
    assert!(missing.stderr.contains("command not found"), "{}", missing.stderr);
}

#[test]
fn stdin_is_forwarded_and_ten_megabytes_arrive_intact() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "io", "--image", "minimal"]).ok();
    env.banger(&["vm", "start", "io"]).ok();
    let mut child = env
        .cmd(&["vm", "exec", "io", "--", "sh", "-c", "tr a-z A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(b"hello from the host\n").expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO FROM THE HOST\n");

    // 10 MiB of random bytes; the guest prints their sha256 on stderr.
    let script = "head -c 10485760 /dev/urandom > /tmp/r && sha256sum /tmp/r | cut -d' ' -f1 >&2 && cat /tmp/r";
    let out = env.cmd(&["vm", "exec", "io", "-n", "--", "sh", "-c", script]).output().expect("exec");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), 10 * 1024 * 1024);
    let guest_sum = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let mut sum = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    sum.stdin.take().expect("stdin").write_all(&out.stdout).expect("write");
    let host_sum = String::from_utf8_lossy(&sum.wait_with_output().expect("wait").stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(host_sum, guest_sum);
    env.banger(&["vm", "stop", "io"]).ok();
    env.banger(&["vm", "delete", "io"]).ok();
}

#[test]
fn rm_leaves_nothing_behind() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "run", "--rm", "--name", "gone", "--image", "minimal", "--", "true"]).ok();
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(0));
    let vms_dir = env.state.join("vms");
    assert_eq!(std::fs::read_dir(&vms_dir).expect("vms dir").count(), 0, "no files under the vm dirs");
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().expect("ps");
    assert!(!String::from_utf8_lossy(&ps.stdout).contains(&vms_dir.display().to_string()), "no vmm left");
}

#[test]
fn two_vms_run_at_the_same_time() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["daemon", "start"]).ok();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| env.banger(&["vm", "create", "left", "--image", "minimal"]).ok());
        let b = s.spawn(|| env.banger(&["vm", "create", "right", "--image", "minimal"]).ok());
        (a.join(), b.join())
    });
    assert!(a.is_ok() && b.is_ok());
    std::thread::scope(|s| {
        let a = s.spawn(|| env.banger(&["vm", "start", "left"]).ok());
        let b = s.spawn(|| env.banger(&["vm", "start", "right"]).ok());
        assert!(a.join().is_ok() && b.join().is_ok());
    });
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    let running =
        list["vms"].as_array().expect("vms").iter().filter(|v| v["state"] == "running" && v["alive"] == true).count();
    assert_eq!(running, 2);
    for name in ["left", "right"] {
        let run = env.banger(&["vm", "exec", name, "-n", "--", "hostname"]).ok();
        assert_eq!(run.stdout.trim(), name);
    }
    for name in ["left", "right"] {
        env.banger(&["vm", "stop", name]).ok();
        env.banger(&["vm", "delete", name]).ok();
    }
}
