//! `banger session` without a guest: what is refused, with which message, through the CLI and
//! the raw API; and the empty list's JSON shape.

use crate::harness::Env;

#[test]
fn sessions_need_a_running_vm_and_name_the_fix() {
    let env = Env::new();
    env.banger(&["session", "list", "nope"]).fails(1, "no vm 'nope'; see `banger vm list`");
    env.banger(&["vm", "create", "web"]).ok();
    env.banger(&["session", "start", "web", "--", "sleep", "60"])
        .fails(1, "vm 'web' is not running; start it with `banger vm start web`");
    let list = env.banger(&["session", "list", "web", "--json"]).ok().json();
    assert_eq!(list, serde_json::json!({ "vm": "web", "sessions": [] }));
    let table = env.banger(&["session", "ls", "web"]).ok().stdout;
    assert!(table.starts_with("NAME") && table.contains("STATUS") && table.contains("COMMAND"), "{table}");
    assert_eq!(table.lines().count(), 1, "{table}");
    let missing = "vm 'web' has no session 'job'; see `banger session list web`";
    env.banger(&["session", "show", "web", "job"]).fails(1, missing);
    env.banger(&["session", "logs", "web", "job"]).fails(1, missing);
    env.banger(&["session", "attach", "web", "job"]).fails(1, missing);
    env.banger(&["session", "stop", "web", "job"]).fails(1, missing);
    env.banger(&["session", "kill", "web", "job"]).fails(1, missing);
}

#[test]
fn bad_session_arguments_are_refused_before_anything_is_recorded() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    // Usage errors: clap's exit code 2.
    env.banger(&["session", "start", "web", "--stdin", "open", "--", "sh"]).fails_plain(2);
    env.banger(&["session", "start", "web", "--stdin", "pipe", "--tty", "--", "sh"]).fails_plain(2);
    env.banger(&["session", "start", "web", "--env", "NOEQUALS", "--", "sh"]).fails_plain(2);
    env.banger(&["session", "start", "web"]).fails_plain(2);
    // Checked by the daemon before it looks at the VM's state.
    env.banger(&["session", "start", "web", "--name", "Bad_Name", "--", "sh"]).fails(1, "invalid session name");
    env.banger(&["session", "start", "web", "--cwd", "relative/dir", "--", "sh"])
        .fails(1, "working directory 'relative/dir' is not an absolute path");
    let list = env.banger(&["session", "list", "web", "--json"]).ok().json();
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(0));
    let help = env.banger(&["session", "--help"]).ok().stdout;
    for verb in ["start", "list", "show", "logs", "attach", "stop", "kill"] {
        assert!(help.contains(verb), "{verb} missing from help:\n{help}");
    }
}

#[test]
fn the_api_refuses_bad_bodies_and_plain_attach_requests() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    let (code, body) = env.request("POST", "/v1/vms/web/sessions", "{not json");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("StartSessionRequest"), "{body}");
    let (code, body) = env.request("POST", "/v1/vms/web/sessions", r#"{"command":"sh","bogus":1}"#);
    assert_eq!(code, 400, "{body}");
    let (code, body) = env.request("POST", "/v1/vms/web/sessions", r#"{"command":""}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("needs a command"), "{body}");
    let (code, body) = env.request("POST", "/v1/vms/web/sessions", r#"{"command":"sh","stdin":"open"}"#);
    assert_eq!(code, 400, "{body}");
    let tty_size = r#"{"command":"sh","tty_size":{"rows":24,"cols":80}}"#;
    let (code, body) = env.request("POST", "/v1/vms/web/sessions", tty_size);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("only for a session with stdin 'tty'"), "{body}");
    let tiny = r#"{"command":"sh","stdin":"tty","tty_size":{"rows":0,"cols":80}}"#;
    let (code, body) = env.request("POST", "/v1/vms/web/sessions", tiny);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("out of range"), "{body}");
    let (code, body) = env.request("POST", "/v1/vms/web/sessions", r#"{"command":"sh","stdin":"pipe"}"#);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("is not running"), "{body}");
    let (code, body) = env.request("POST", "/v1/vms/web/sessions/job/attach", "");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("Upgrade: banger-attach"), "{body}");
    let (code, body) = env.request("GET", "/v1/vms/web/sessions/job/logs", "");
    assert_eq!(code, 404, "{body}");
    let (code, body) = env.request("GET", "/v1/openapi.json", "");
    assert_eq!(code, 200);
    for path in ["/v1/vms/{vm}/sessions", "/v1/vms/{vm}/sessions/{session}/kill", "StartSessionRequest"] {
        assert!(body.contains(path), "{path} missing from the OpenAPI document");
    }
}
