//! Crashes and interruptions: a killed daemon, a killed VMM, Ctrl-C during `vm run`, a guest
//! that never becomes ready, unknown artifacts.

use std::time::Duration;

use crate::harness::{pid_alive, wait_until};
use crate::template::{env_from, template};

fn vmm_pid(env: &crate::harness::Env, vm: &str) -> u32 {
    let shown = env.banger(&["vm", "show", vm, "--json"]).ok().json();
    let handles =
        std::fs::read_to_string(shown["paths"]["handles"].as_str().expect("handles path")).expect("handles.json");
    let h: serde_json::Value = serde_json::from_str(&handles).expect("json");
    u32::try_from(h["pid"].as_u64().expect("pid")).expect("pid fits")
}

fn kill9(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
}

#[test]
fn a_killed_daemon_adopts_the_running_vm_on_the_next_call() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "survivor", "--image", "minimal"]).ok();
    env.banger(&["vm", "start", "survivor"]).ok();
    let qemu = vmm_pid(&env, "survivor");
    let daemon = env.daemon_pid().expect("daemon");
    kill9(daemon);
    wait_until("daemon death", Duration::from_secs(10), || !pid_alive(daemon));
    assert!(pid_alive(qemu), "the vm outlives its daemon");
    let run = env.banger(&["vm", "exec", "survivor", "-n", "--", "echo", "still here"]).ok();
    assert!(run.stderr.contains("started bangerd"), "{}", run.stderr);
    assert_eq!(run.stdout, "still here\n");
    let shown = env.banger(&["vm", "show", "survivor", "--json"]).ok().json();
    assert_eq!(shown["state"], "running");
    env.banger(&["vm", "stop", "survivor"]).ok();
    assert!(!pid_alive(qemu));
    env.banger(&["vm", "delete", "survivor"]).ok();
}

#[test]
fn a_killed_vmm_is_reported_stopped_and_cleaned_up() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "victim", "--image", "minimal"]).ok();
    env.banger(&["vm", "start", "victim"]).ok();
    let shown = env.banger(&["vm", "show", "victim", "--json"]).ok().json();
    let dir = std::path::PathBuf::from(shown["vm_dir"].as_str().expect("dir"));
    kill9(vmm_pid(&env, "victim"));
    wait_until("vm reported stopped", Duration::from_secs(15), || {
        env.banger(&["vm", "show", "victim", "--json"]).ok().json()["state"] == "stopped"
    });
    for leftover in ["handles.json", "qmp.sock", "agent.sock", "vmm.pid"] {
        assert!(!dir.join(leftover).exists(), "{leftover} left behind");
    }
    let shown = env.banger(&["vm", "show", "victim", "--json"]).ok().json();
    assert!(shown["last_error"].as_str().is_some_and(|e| e.contains("exited")), "{shown}");
    env.banger(&["vm", "exec", "victim", "--", "true"]).fails(1, "is not running");
    // It starts again from its disks.
    env.banger(&["vm", "start", "victim"]).ok();
    env.banger(&["vm", "stop", "victim"]).ok();
    env.banger(&["vm", "delete", "victim"]).ok();
}

#[test]
fn ctrl_c_during_run_stops_and_removes_the_vm() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["daemon", "start"]).ok();
    let child = env
        .cmd(&["vm", "run", "--rm", "--name", "interrupted", "--image", "minimal", "--", "sleep", "600"])
        .spawn()
        .expect("spawn");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    wait_until("the vm runs", Duration::from_secs(120), || {
        let shown = env.banger(&["vm", "show", "interrupted", "--json"]);
        shown.code == 0 && shown.json()["state"] == "running"
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130));
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(0));
    assert_eq!(std::fs::read_dir(env.state.join("vms")).expect("vms").count(), 0);
}

#[test]
fn unknown_artifacts_name_the_fix() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "run", "--rm", "--kernel", "no-such-kernel", "--image", "minimal", "--", "true"])
        .fails(1, "banger kernel pull no-such-kernel");
    env.banger(&["vm", "run", "--rm", "--image", "no-such-image", "--", "true"])
        .fails(1, "banger image list --catalog");
    env.banger(&["kernel", "pull", "x", "--from", "/etc/hostname"]).fails(1, "not a Debian kernel package");
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(0), "failed runs leave no vm");
}

#[test]
fn a_guest_that_never_answers_times_out_with_its_console() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    // One second is far too short for a TCG boot: the agent cannot answer in time.
    std::fs::write(env.state.join("config.toml"), "boot_timeout_secs = 1\n").expect("config");
    let run = env.banger(&["vm", "run", "--rm", "--name", "slow", "--image", "minimal", "--", "true"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("did not become ready within 1 s"), "{}", run.stderr);
    assert!(run.stderr.contains("last console lines"), "{}", run.stderr);
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(0), "--rm removes the failed vm");
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().expect("ps");
    let vms_dir = env.state.join("vms").display().to_string();
    assert!(!String::from_utf8_lossy(&ps.stdout).lines().any(|l| l.contains(&vms_dir)), "no vmm left");
}

/// The stages the running `vm.start` of `vm` has entered, if one runs.
fn start_stages(env: &crate::harness::Env, vm: &str) -> Option<Vec<String>> {
    let ops = env.banger(&["op", "list", "--json"]).ok().json();
    let op = ops["operations"].as_array()?.iter().rev().find(|o| o["kind"] == "vm.start" && o["target"] == vm)?.clone();
    let stages = op["stages"].as_array()?.iter().filter_map(|s| s["name"].as_str().map(str::to_owned)).collect();
    Some(stages)
}

#[test]
fn a_stop_during_a_start_cancels_it_and_leaves_no_vmm() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "racer", "--image", "minimal"]).ok();
    // Once at the start's first stage (before anything is launched), once while the guest boots.
    for wait_for in ["kernel", "agent"] {
        let start = env.cmd(&["vm", "start", "racer"]).spawn().expect("spawn vm start");
        wait_until(&format!("the start reaches its {wait_for} stage"), Duration::from_secs(120), || {
            start_stages(&env, "racer").is_some_and(|s| s.iter().any(|n| n == wait_for))
        });
        env.banger(&["vm", "stop", "racer"]).ok();
        let out = start.wait_with_output().expect("vm start ends");
        assert_ne!(out.status.code(), Some(0), "the start was cancelled: {}", String::from_utf8_lossy(&out.stderr));
        let shown = env.banger(&["vm", "show", "racer", "--json"]).ok().json();
        assert_eq!(shown["state"], "stopped", "{shown}");
        let vm_dir = shown["vm_dir"].as_str().expect("dir").to_owned();
        let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().expect("ps");
        assert!(!String::from_utf8_lossy(&ps.stdout).lines().any(|l| l.contains(&vm_dir)), "no vmm left");
        env.banger(&["vm", "stop", "racer"]).ok();
    }
    // And it is a vm like any other after that.
    env.banger(&["vm", "start", "racer"]).ok();
    env.banger(&["vm", "exec", "racer", "--", "true"]).ok();
    env.banger(&["vm", "stop", "racer"]).ok();
    env.banger(&["vm", "delete", "racer"]).ok();
}

#[test]
fn delete_force_stops_and_deletes_several_running_vms() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    for name in ["doomed-a", "doomed-b"] {
        env.banger(&["vm", "create", name, "--image", "minimal"]).ok();
        env.banger(&["vm", "start", name]).ok();
    }
    env.banger(&["vm", "create", "idle", "--image", "minimal"]).ok();
    env.banger(&["vm", "delete", "doomed-a"]).fails(1, "stop it first");
    let deleted = env.banger(&["vm", "delete", "--force", "doomed-a", "doomed-b", "idle"]).ok();
    assert_eq!(deleted.stdout.lines().collect::<Vec<_>>(), ["doomed-a", "doomed-b", "idle"]);
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(0));
    let vms_dir = env.state.join("vms").display().to_string();
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().expect("ps");
    assert!(!String::from_utf8_lossy(&ps.stdout).lines().any(|l| l.contains(&vms_dir)), "no vmm left");
    env.banger(&["vm", "delete", "--force", "no-such-vm"]).fails(1, "no vm 'no-such-vm'");
}
