//! Every bad input gets a clear one-line error naming the fix, a non-zero exit, and no change
//! to the store.

use crate::harness::{wait_until, Env};

fn vm_names(env: &Env) -> Vec<String> {
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    list["vms"].as_array().expect("vms").iter().filter_map(|v| v["name"].as_str().map(str::to_owned)).collect()
}

fn op_count(env: &Env) -> usize {
    env.banger(&["op", "list", "--json"]).ok().json()["operations"].as_array().map_or(0, Vec::len)
}

#[test]
fn invalid_names_are_refused_without_writing() {
    let env = Env::new();
    for bad in ["Web", "web_1", "-web", "web-", "a.b", &"a".repeat(64)] {
        env.banger(&["vm", "create", "--", bad]).fails(1, "invalid name");
    }
    env.banger(&["vm", "create", "ok", "--image", "../etc"]).fails(1, "invalid image name");
    env.banger(&["vm", "create", "ok", "--cpus", "0"]).fails(1, "vcpus 0 is out of range");
    assert_eq!(env.banger(&["vm", "create", "ok", "--vmm", "xen"]).code, 2, "an unknown vmm is a usage error");
    assert!(vm_names(&env).is_empty());
    assert_eq!(op_count(&env), 0);
}

/// `--vmm firecracker` where Firecracker cannot run: refused, saying why and how to fix it,
/// from the CLI's create and from the daemon's own `--vmm`.
#[test]
fn firecracker_where_it_cannot_run_says_why() {
    let env = Env::new();
    std::fs::create_dir_all(&env.state).expect("state dir");
    // A binary that is surely missing, so the answer does not depend on this host.
    std::fs::write(env.state.join("config.toml"), "firecracker_bin = \"/nonexistent/banger-firecracker\"\n")
        .expect("config");
    let run = env.banger(&["vm", "create", "ok", "--vmm", "firecracker"]).fails(
        1,
        "firecracker cannot run on this host: firecracker binary \"/nonexistent/banger-firecracker\" not found; \
         install a firecracker release binary (v1.16) on PATH or set `firecracker_bin` in config.toml",
    );
    assert!(run.stderr.contains("or use --vmm qemu"), "{}", run.stderr);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(run.stderr.contains("nested PVM (kvm_pvm is loaded)"), "{}", run.stderr);
    }
    assert!(vm_names(&env).is_empty());
    env.banger(&["daemon", "stop"]).ok();

    let out = env.bangerd().arg("--vmm").arg("firecracker").output().expect("run bangerd");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("firecracker cannot run on this host") && stderr.contains("--vmm qemu"), "{stderr}");
}

#[test]
fn duplicate_names_are_refused_without_writing() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    env.banger(&["vm", "create", "web"]).fails(1, "a vm named 'web' already exists; pick another name");
    assert_eq!(vm_names(&env), ["web"]);
    assert_eq!(op_count(&env), 1);
}

#[test]
fn unknown_vms_name_the_list_command() {
    let env = Env::new();
    env.banger(&["vm", "show", "nope"]).fails(1, "no vm 'nope'; see `banger vm list`");
    env.banger(&["vm", "set", "nope", "--cpus", "2"]).fails(1, "no vm 'nope'");
    env.banger(&["vm", "delete", "nope"]).fails(1, "no vm 'nope'");
    // A reference cannot escape its path segment.
    env.banger(&["vm", "show", "../health"]).fails(1, "no vm '../health'");
}

#[test]
fn malformed_json_gets_a_400_and_changes_nothing() {
    let env = Env::new();
    env.banger(&["daemon", "start"]).ok();
    for body in ["{not json", "[]", r#"{"name": 5}"#, r#"{"name": "x", "cpus": 2}"#, ""] {
        let (code, answer) = env.request("POST", "/v1/vms", body);
        assert_eq!(code, 400, "{body}: {answer}");
        let err: serde_json::Value = serde_json::from_str(&answer).expect("error body is JSON");
        assert_eq!(err["code"], "invalid_request");
        let msg = err["message"].as_str().unwrap_or_default();
        assert!(msg.contains("invalid request body") && msg.contains("openapi.json"), "{msg}");
    }
    let (code, answer) = env.request("PATCH", "/v1/vms/x", "{{");
    assert!(code == 400 || code == 404, "{code} {answer}");
    let (code, answer) = env.request("GET", "/v1/nowhere", "");
    assert_eq!(code, 404);
    assert!(answer.contains("not_found"));
    assert!(vm_names(&env).is_empty());
    assert_eq!(op_count(&env), 0);
}

#[test]
fn bad_query_strings_and_path_parameters_get_a_json_400() {
    let env = Env::new();
    env.banger(&["daemon", "start"]).ok();
    for (method, path, what) in [
        ("GET", "/v1/vms/x/logs?tail=-1", "invalid query string"),
        ("POST", "/v1/vms/x/stop?force=maybe", "invalid query string"),
        ("GET", "/v1/operations/x?wait_ms=soon", "invalid query string"),
        ("POST", "/v1/vms/x/sessions/y/kill?wait_secs=-1", "invalid query string"),
        ("GET", "/v1/vms/x/sessions/y/logs?follow=7", "invalid query string"),
        ("GET", "/v1/vms/%FF", "invalid path parameter"),
        ("GET", "/v1/vms/x/sessions/%C3%28", "invalid path parameter"),
    ] {
        let (code, answer) = env.request(method, path, "");
        assert_eq!(code, 400, "{method} {path}: {answer}");
        let err: serde_json::Value = serde_json::from_str(&answer).expect("error body is JSON");
        assert_eq!(err["code"], "invalid_request", "{method} {path}: {answer}");
        let msg = err["message"].as_str().unwrap_or_default();
        assert!(msg.starts_with(what) && msg.contains("openapi.json"), "{method} {path}: {msg}");
    }
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let env = Env::new();
    env.banger(&["vm", "create", "keep"]).ok();
    let pid = env.daemon_pid().expect("first daemon");
    let out = env.bangerd().output().expect("run bangerd");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("another bangerd (pid {pid}) already serves state dir")), "{stderr}");
    assert!(stderr.contains("banger daemon stop"), "{stderr}");
    assert_eq!(env.daemon_pid(), Some(pid), "the first daemon keeps running");
    assert_eq!(vm_names(&env), ["keep"]);
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let env = Env::new();
    std::fs::create_dir_all(env.socket.parent().expect("parent")).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(&env.socket).expect("bind"));
    assert!(env.socket.exists(), "a socket file nobody listens on");
    std::fs::create_dir_all(&env.state).expect("mkdir");
    std::fs::write(env.state.join("bangerd.lock"), "999999\n").expect("stale lock");
    let run = env.banger(&["vm", "list"]).ok();
    assert!(run.stderr.contains("started bangerd"), "{}", run.stderr);
    let log = std::fs::read_to_string(env.state.join("bangerd.log")).expect("log");
    assert!(log.contains("removing stale socket"), "{log}");
}

#[test]
fn a_non_socket_at_the_socket_path_is_not_clobbered() {
    let env = Env::new();
    std::fs::create_dir_all(env.socket.parent().expect("parent")).expect("mkdir");
    std::fs::write(&env.socket, "precious").expect("write");
    env.banger(&["vm", "list"]).fails(1, "is not a socket; remove it or pass another --socket");
    assert_eq!(std::fs::read_to_string(&env.socket).expect("kept"), "precious");
}

#[test]
fn an_unwritable_state_dir_is_reported() {
    let env = Env::new();
    let blocker = env.dir.path().join("file");
    std::fs::write(&blocker, "").expect("write");
    let mut cmd = env.cmd(&["vm", "list"]);
    cmd.env("BANGER_STATE_DIR", blocker.join("state"));
    let out = cmd.output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot create state dir") && stderr.contains("--state-dir"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    assert_eq!(env.banger(&["vm", "create"]).code, 2);
    assert_eq!(env.banger(&["vm", "create", "x", "--memory", "lots"]).code, 2);
    assert_eq!(env.banger(&["nonsense"]).code, 2);
    assert!(env.daemon_pid().is_none(), "usage errors do not start the daemon");
}

#[test]
fn running_operations_can_be_cancelled_or_finish() {
    // A create is quick here; cancel races it. Either outcome must leave a consistent store:
    // a cancelled create leaves no VM, a finished one leaves exactly one.
    let env = Env::new();
    env.banger(&["daemon", "start"]).ok();
    let (code, body) = env.request("POST", "/v1/vms", r#"{"name":"racy"}"#);
    assert_eq!(code, 202, "{body}");
    let op: serde_json::Value = serde_json::from_str(&body).expect("op");
    let id = op["id"].as_str().expect("id").to_owned();
    let _ = env.request("POST", &format!("/v1/operations/{id}/cancel"), "");
    let mut last = serde_json::Value::Null;
    wait_until("operation end", std::time::Duration::from_secs(10), || {
        let (_, body) = env.request("GET", &format!("/v1/operations/{id}"), "");
        last = serde_json::from_str(&body).unwrap_or_default();
        last["state"] != "running"
    });
    match last["state"].as_str() {
        Some("succeeded") => assert_eq!(vm_names(&env), ["racy"]),
        Some("cancelled") => assert!(vm_names(&env).is_empty()),
        other => panic!("unexpected end {other:?}: {last}"),
    }
}
