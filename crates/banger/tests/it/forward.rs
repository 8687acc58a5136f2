//! Port forwards through the CLI and the API, on VMs that are not running (no guest needed):
//! add, list, remove, `--publish`, conflicts, bad specs, and durability across a daemon restart.

use crate::harness::{pid_alive, Env};

/// `(forward, state)` pairs of a VM's `vm forward --list --json`.
fn forwards(env: &Env, vm: &str) -> Vec<(String, String)> {
    let list = env.banger(&["vm", "forward", vm, "--list", "--json"]).ok().json();
    assert_eq!(list["vm"], vm);
    list["forwards"]
        .as_array()
        .expect("forwards")
        .iter()
        .map(|f| {
            let spec = format!("{}:{}:{}", f["host_addr"].as_str().unwrap_or("?"), f["host_port"], f["guest_port"]);
            (spec, f["state"].as_str().unwrap_or("?").to_owned())
        })
        .collect()
}

fn specs(env: &Env, vm: &str) -> Vec<String> {
    forwards(env, vm).into_iter().map(|(spec, _)| spec).collect()
}

#[test]
fn forwards_are_added_listed_and_removed() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    let added = env.banger(&["vm", "forward", "web", "18080:80", "0.0.0.0:18443:443"]).ok();
    assert_eq!(added.stdout, "127.0.0.1:18080 -> web:80\n0.0.0.0:18443 -> web:443\n");
    assert!(added.stderr.contains("web is not running; its forwards listen whenever it runs"), "{}", added.stderr);
    assert_eq!(
        forwards(&env, "web"),
        [("127.0.0.1:18080:80".to_owned(), "inactive".to_owned()), ("0.0.0.0:18443:443".into(), "inactive".into())]
    );
    let table = env.banger(&["vm", "forward", "web"]).ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("FORWARD") && lines[0].contains("STATE"), "{table}");
    assert!(lines[1].starts_with("127.0.0.1:18080 -> web:80") && lines[1].contains("inactive"), "{table}");

    let removed = env.banger(&["vm", "forward", "web", "--remove", "18080"]).ok();
    assert_eq!(removed.stdout, "127.0.0.1:18080 -> web:80\n");
    assert_eq!(specs(&env, "web"), ["0.0.0.0:18443:443"]);
    env.banger(&["vm", "forward", "web", "--remove", "0.0.0.0:18443"]).ok();
    assert!(specs(&env, "web").is_empty());
    env.banger(&["vm", "forward", "web", "--remove", "18080"])
        .fails(1, "vm 'web' has no forward on host port 18080; see `banger vm forward web --list`");
}

#[test]
fn a_taken_host_port_is_refused_naming_its_owner() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    env.banger(&["vm", "create", "db"]).ok();
    env.banger(&["vm", "forward", "web", "18080:80"]).ok();
    let fix = "is already forwarded to web:80; remove that with `banger vm forward web --remove 127.0.0.1:18080`";
    env.banger(&["vm", "forward", "db", "18080:5432"]).fails(1, &format!("host port 127.0.0.1:18080 {fix}"));
    // A wildcard takes the port on every address, so it overlaps too.
    env.banger(&["vm", "forward", "db", "0.0.0.0:18080:5432"]).fails(1, "is already forwarded to web:80");
    env.banger(&["vm", "forward", "web", "18080:81"]).fails(1, "is already forwarded to web:80");
    assert!(specs(&env, "db").is_empty());
    // Another address on the same port is a different socket.
    env.banger(&["vm", "forward", "db", "127.0.0.2:18080:5432"]).ok();
    env.banger(&["vm", "forward", "web", "127.0.0.2:18081:80", "127.0.0.3:18081:80"]).ok();
    env.banger(&["vm", "forward", "web", "--remove", "18081"])
        .fails(1, "vm 'web' has forwards on 127.0.0.2:18081 and 127.0.0.3:18081; say which");
    let (code, body) = env.request("POST", "/v1/vms/db/forwards", r#"{"host_port":18080,"guest_port":1}"#);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains(r#""code":"conflict""#), "{body}");
}

#[test]
fn bad_specs_are_usage_errors_and_bad_bodies_get_a_400() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    for (spec, says) in [
        ("80", "is not [HOST_ADDR:]HOST_PORT:GUEST_PORT"),
        ("99999:80", "host port '99999' in '99999:80' is not a number from 1 to 65535"),
        ("8080:0", "guest port '0'"),
        ("localhost:8080:80", "host address 'localhost' in 'localhost:8080:80' is not an IP address"),
        ("8080:80/udp", "protocol 'udp' in '8080:80/udp' is not supported"),
    ] {
        let run = env.banger(&["vm", "forward", "web", spec]);
        assert_eq!(run.code, 2, "{spec}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{spec}: {}", run.stderr);
    }
    let run = env.banger(&["vm", "create", "other", "--publish", "80"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert_eq!(env.banger(&["vm", "forward", "web", "--remove", "nope"]).code, 2);
    assert_eq!(env.banger(&["vm", "forward", "web", "1:1", "--remove", "1"]).code, 2, "add and remove at once");
    for (body, says) in [
        (r#"{"host_port":0,"guest_port":80}"#, "host port '0'"),
        (r#"{"host_port":8080,"guest_port":80,"protocol":"udp"}"#, "invalid request body"),
        (r#"{"host_addr":"localhost","host_port":8080,"guest_port":80}"#, "invalid request body"),
        (r#"{"host_port":8080,"guest_port":80,"extra":1}"#, "invalid request body"),
    ] {
        let (code, answer) = env.request("POST", "/v1/vms/web/forwards", body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    let (code, answer) = env.request("DELETE", "/v1/vms/web/forwards/http", "");
    assert_eq!(code, 400, "{answer}");
    env.banger(&["vm", "forward", "nope", "1:1"]).fails(1, "no vm 'nope'");
    assert!(specs(&env, "web").is_empty());
}

#[test]
fn publish_records_forwards_with_the_vm_and_delete_takes_them_away() {
    let env = Env::new();
    let created = env.banger(&["vm", "create", "api", "--publish", "18081:80", "-p", "[::1]:18082:8080"]).ok();
    assert!(
        created.stderr.contains("forward 127.0.0.1:18081 -> api:80 listens whenever api runs"),
        "{}",
        created.stderr
    );
    assert_eq!(specs(&env, "api"), ["127.0.0.1:18081:80", "::1:18082:8080"]);
    // Overlapping --publish flags, or one taken by another vm: refused before anything is written.
    env.banger(&["vm", "create", "twin", "-p", "18083:80", "-p", "0.0.0.0:18083:81"])
        .fails(1, "both take host port 18083");
    env.banger(&["vm", "create", "twin", "-p", "18081:80"]).fails(1, "is already forwarded to api:80");
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(1), "no vm 'twin' was recorded");

    env.banger(&["vm", "delete", "api"]).ok();
    // The port is free again: the forwards went with their vm.
    env.banger(&["vm", "create", "next", "-p", "18081:80"]).ok();
    assert_eq!(specs(&env, "next"), ["127.0.0.1:18081:80"]);
}

#[test]
fn forwards_survive_a_daemon_restart() {
    let env = Env::new();
    env.banger(&["vm", "create", "keep"]).ok();
    env.banger(&["vm", "forward", "keep", "18090:90"]).ok();
    env.banger(&["daemon", "stop"]).ok();
    assert!(env.daemon_pid().is_none_or(|pid| !pid_alive(pid)));
    let list = env.banger(&["vm", "forward", "keep", "--json"]).ok();
    assert!(list.stderr.contains("started bangerd"), "{}", list.stderr);
    assert_eq!(forwards(&env, "keep"), [("127.0.0.1:18090:90".to_owned(), "inactive".to_owned())]);
    let openapi = env.request("GET", "/v1/openapi.json", "").1;
    assert!(openapi.contains("/v1/vms/{vm}/forwards/{host_port}") && openapi.contains("ForwardView"), "{openapi}");
}
