//! `banger mcp` spoken to as raw JSON-RPC over its stdin and stdout, against a real daemon
//! without guests: every stdout line is a protocol message; a failure of the daemon is a tool
//! error (`isError`) carrying its message and `command_for_user`, and so are arguments that do
//! not fit the schema; an unknown tool is a protocol error; closing stdin ends the server. (The real-guest tier drives it
//! with the official Python SDK: `tests/guest/mcp.rs`.)

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::Env;

struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    next_id: u64,
}

impl Server {
    fn start(env: &Env) -> Self {
        let mut child = env
            .cmd(&["mcp"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start banger mcp");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self { child, stdin, lines, next_id: 1 }
    }

    fn send(&mut self, message: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{message}").expect("write to banger mcp");
        stdin.flush().expect("flush");
    }

    /// Sends a request and returns its answer (a message with its id).
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no answer to {method} within 60 s"));
            let message: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("stdout carried a non-JSON line ({e}): {line}"));
            assert_eq!(message["jsonrpc"], "2.0", "{message}");
            if message["id"] == id {
                return message;
            }
        }
    }

    fn call(&mut self, tool: &str, arguments: Value) -> Value {
        self.request("tools/call", json!({ "name": tool, "arguments": arguments }))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn banger_mcp_speaks_json_rpc_on_stdio_with_tool_errors_for_the_daemons_refusals() {
    let env = Env::new();
    let mut server = Server::start(&env);
    let init = server.request(
        "initialize",
        json!({ "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": { "name": "it", "version": "0" } }),
    );
    assert_eq!(init["result"]["serverInfo"]["name"], "banger", "{init}");
    assert!(init["result"]["capabilities"]["tools"].is_object(), "{init}");
    server.send(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }));

    let tools = server.request("tools/list", json!({}));
    let names: Vec<&str> =
        tools["result"]["tools"].as_array().expect("tools").iter().filter_map(|t| t["name"].as_str()).collect();
    for name in ["sandbox_create", "sandbox_exec", "fs_read", "session_write", "sandbox_fork", "workspace_export"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert_eq!(names.len(), 26, "{names:?}");

    // A read: structured content with command_for_user.
    let listed = server.call("sandbox_list", json!({}));
    let result = &listed["result"];
    assert_eq!(result["isError"], false, "{listed}");
    assert_eq!(result["structuredContent"], json!({ "sandboxes": [], "command_for_user": "banger vm list" }));

    // The daemon refuses: a tool error with its code and message, not a protocol error.
    let missing = server.call("sandbox_exec", json!({ "name": "nope", "command": ["true"] }));
    let result = &missing["result"];
    assert_eq!(result["isError"], true, "{missing}");
    assert_eq!(result["structuredContent"]["code"], "not_found", "{missing}");
    assert_eq!(result["structuredContent"]["command_for_user"], "banger vm exec nope --no-stdin -- true");
    let text = result["content"][0]["text"].as_str().expect("text");
    assert!(text.contains("nope") && text.contains("banger vm exec nope"), "{text}");

    // Arguments checked before the daemon is asked: a tool error that names the fix.
    let relative = server.call("fs_read", json!({ "name": "web", "path": "etc/hosts" }));
    assert_eq!(relative["result"]["isError"], true, "{relative}");
    assert!(relative["result"]["structuredContent"]["error"].as_str().is_some_and(|e| e.contains("/root/etc/hosts")));

    // Arguments that do not fit the schema: a tool error naming what is wrong, so the model
    // can correct itself (as MCP 2025-11-25 asks); an unknown tool: a JSON-RPC error.
    let malformed = server.call("sandbox_exec", json!({ "name": 5 }));
    assert_eq!(malformed["result"]["isError"], true, "{malformed}");
    let text = malformed["result"]["content"][0]["text"].as_str().expect("text");
    assert!(text.contains("expected a string"), "{text}");
    let unknown = server.call("no_such_tool", json!({}));
    assert!(unknown["error"]["code"].is_i64(), "{unknown}");

    // The end of stdin ends the server.
    drop(server.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "banger mcp did not exit within 30 s of the end of its stdin");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
