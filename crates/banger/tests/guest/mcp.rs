//! `banger mcp` end to end: the official MCP Python SDK's client (`tests/mcp/client.py`, the SDK
//! installed by `scripts/mcp-python`) starts `banger mcp` over stdio against a real daemon and a
//! real guest, lists the tools (their names and input schemas checked against
//! `tests/mcp/tools.snapshot.json`), creates a sandbox, writes a Python file, runs it, reads the
//! file it wrote, forks the sandbox, and deletes both; a call on a missing sandbox is a tool
//! error carrying the daemon's message; a `sandbox_run` cancelled mid-command leaves nothing.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{banger_exe, bangerd_exe};
use crate::template::{env_from, template};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A python3 with the MCP SDK (installed once into the test cache).
fn mcp_python() -> String {
    let script = manifest_dir().join("../../scripts/mcp-python");
    let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run scripts/mcp-python");
    assert!(
        out.status.success(),
        "real-guest tier: scripts/mcp-python could not provide the MCP Python SDK (see above)"
    );
    String::from_utf8(out.stdout).expect("utf-8 path").trim().to_owned()
}

/// The tools' names and input schemas, as reviewed; `BANGER_UPDATE_SNAPSHOTS=1` rewrites it.
fn check_tools_snapshot(listed: &Value) {
    let file = manifest_dir().join("tests/mcp/tools.snapshot.json");
    if std::env::var("BANGER_UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        let text = serde_json::to_string_pretty(listed).expect("json") + "\n";
        std::fs::write(&file, text).expect("write the snapshot");
    }
    let reviewed: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read the snapshot")).expect("json");
    assert!(
        *listed == reviewed,
        "the MCP tools differ from {}; review the change and re-record it with BANGER_UPDATE_SNAPSHOTS=1\nlisted: {}",
        file.display(),
        serde_json::to_string_pretty(listed).unwrap_or_default()
    );
}

fn value<'a>(report: &'a Value, step: &str) -> &'a Value {
    let r = &report[step];
    assert_eq!(r["is_error"], false, "{step} failed: {r}");
    &r["value"]
}

#[test]
fn an_mcp_client_creates_writes_runs_reads_forks_and_deletes_sandboxes() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let python = mcp_python();
    let client = manifest_dir().join("tests/mcp/client.py");
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = env
        .in_netns(&python)
        .arg(&client)
        .args(["scenario", banger_exe().to_str().expect("path"), "debian-bookworm"])
        .env("BANGER_STATE_DIR", &env.state)
        .env("BANGER_SOCKET", &env.socket)
        .env("BANGER_BANGERD", bangerd_exe())
        .stdout(out.reopen().expect("reopen"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the MCP client");
    // Each call in the client has its own deadline; this one bounds the whole run.
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the MCP client") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the MCP scenario did not end within 900 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(out.path()).expect("report");
    assert!(status.success(), "the MCP client failed ({status}); its report: {text}");
    let report: Value = serde_json::from_str(&text).expect("a JSON report");

    assert_eq!(report["server"], "banger");
    check_tools_snapshot(&report["tools"]);

    // A missing sandbox: a tool error with the daemon's message, not a protocol error.
    let missing = &report["exec_missing"];
    assert_eq!(missing["is_error"], true, "{missing}");
    assert_eq!(missing["value"]["code"], "not_found", "{missing}");
    assert!(missing["text"].as_str().is_some_and(|t| t.contains("nope")), "{missing}");
    assert_eq!(missing["value"]["command_for_user"], "banger vm exec nope --no-stdin -- true");

    let created = value(&report, "create");
    assert_eq!(created["name"], "mcp1");
    assert_eq!(created["state"], "running");
    assert_eq!(created["dns_name"], "mcp1.vm");
    assert!(created["ip"].is_string(), "{created}");
    assert_eq!(created["command_for_user"], "banger vm create mcp1 --image debian-bookworm && banger vm start mcp1");

    let written = value(&report, "write");
    assert_eq!(written["stat"]["kind"], "file", "{written}");
    let ran = value(&report, "run");
    assert_eq!(ran["exit_code"], 0, "{ran}");
    assert!(ran["stdout"].as_str().is_some_and(|s| s.starts_with("hello from 3.")), "{ran}");
    assert_eq!(ran["command_for_user"], "banger vm exec mcp1 --no-stdin -- python3 /root/hello.py");

    // The file the program wrote, whole, cut at 6 bytes, and as base64.
    let expected = format!("sha256 {}\n", sha256_of_digits());
    let read = value(&report, "read");
    assert_eq!(read["content"], expected.as_str(), "{read}");
    assert_eq!(read["truncated"], false);
    let cut = value(&report, "read_cut");
    let size = expected.len();
    assert_eq!(cut["content"], format!("sha256…[truncated: {size} bytes in all; see command_for_user]"), "{cut}");
    assert_eq!((cut["truncated"].as_bool(), cut["size"].as_u64()), (Some(true), Some(size as u64)));
    let b64 = value(&report, "read_b64");
    assert_eq!(b64["encoding"], "base64");
    assert_eq!(b64["content"], base64_of(expected.as_bytes()));

    // 3 MB of output: 1,000 bytes kept, the rest counted, the command not held back.
    let flood = value(&report, "flood");
    assert_eq!((flood["exit_code"].as_i64(), flood["truncated"].as_bool()), (Some(0), Some(true)), "{flood}");
    assert_eq!(flood["stdout_bytes"], 3_000_000);
    assert_eq!(
        flood["stdout"],
        format!("{}…[truncated: 3,000,000 bytes in all; see command_for_user]", "x".repeat(1000))
    );
    let stdin = value(&report, "stdin");
    assert_eq!(stdin["stdout"], "5\n", "{stdin}");

    // In the background: a session whose stdin got the text, its log read back.
    let bg = value(&report, "background");
    assert_eq!(bg["status"], "running", "{bg}");
    assert_eq!(bg["command_for_user"], "banger session start mcp1 --stdin pipe -- cat");
    let logs = value(&report, "background_logs");
    assert_eq!((logs["status"].as_str(), logs["exit_code"].as_i64()), (Some("exited"), Some(0)), "{logs}");
    assert_eq!(logs["log"], "hello session\n");
    assert_eq!(
        logs["command_for_user"],
        format!("banger session logs mcp1 {}", bg["session"].as_str().unwrap_or_default())
    );

    // The fork has the parent's disk: the file is there.
    let fork = value(&report, "fork");
    assert_eq!((fork["name"].as_str(), fork["state"].as_str()), (Some("mcp2"), Some("running")), "{fork}");
    assert!(fork["command_for_user"].as_str().is_some_and(|c| c.contains("&& banger vm fork ")), "{fork}");
    assert_eq!(value(&report, "fork_read")["stdout"], expected.as_str());

    assert_eq!(value(&report, "delete_fork")["deleted"], true);
    assert_eq!(value(&report, "delete")["deleted"], true);
    assert_eq!(value(&report, "list")["sandboxes"], serde_json::json!([]));
    // A sandbox_run cancelled mid-command, its client gone: the server deleted its sandbox
    // before it exited.
    assert!(report["cancelled_run"].as_str().is_some_and(|n| n.starts_with("run-")), "{}", report["cancelled_run"]);
    let vms = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(vms["vms"], serde_json::json!([]), "nothing is left");
}

/// What the guest's program hashes: the digits of 0..1000, as in `client.py`.
fn sha256_of_digits() -> String {
    let data: String = (0..1000).map(|i| i.to_string()).collect();
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().expect("stdin").write_all(data.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("digest").to_owned()
}

fn base64_of(bytes: &[u8]) -> String {
    let out =
        Command::new("base64").arg("-w0").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().expect("stdin").write_all(bytes)?;
            c.wait_with_output()
        });
    String::from_utf8(out.expect("base64").stdout).expect("ascii")
}
