//! A stand-in for Firecracker's API server: HTTP/1.1 on a unix socket, every request checked
//! against the spec ([`Swagger`]), answered the way Firecracker answers (`204`, `200` with
//! `InstanceInfo` for `GET /`, or `400` with `{"fault_message"}`), and recorded.
//!
//! The fake `firecracker` executable ([`FakeBinary`]) is a shell script: it records its
//! arguments and pid, points the `--api-sock` path it is given at this server with a symlink,
//! and then waits (`exec tail -f` of a file in the VM dir, so its command line names the VM dir
//! as a real Firecracker's does). Requests therefore go through the driver's real HTTP client
//! over a real unix socket.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use crate::swagger::Swagger;

/// One request the server saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// `PUT`, `PATCH`, `GET`.
    pub method: String,
    /// The path.
    pub path: String,
    /// The JSON body, if any.
    pub body: Option<Value>,
}

impl Seen {
    /// `METHOD /path`.
    pub fn call(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// How the server misbehaves, like a Firecracker would.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Refuse this call (`PUT /actions InstanceStart` is written `PUT /actions:InstanceStart`)
    /// with `400` and this fault message.
    pub refuse: Option<(String, String)>,
    /// On this call, kill the fake process and close the connection without an answer.
    pub die_on: Option<String>,
    /// On `InstanceStart`, write a guest fault into the log first (then answer 204).
    pub fault_on_start: bool,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    violations: Vec<String>,
    log_path: Option<PathBuf>,
    metrics_path: Option<PathBuf>,
    state: &'static str,
    /// The fake process the state belongs to: a new one starts "Not started".
    pid: Option<String>,
}

/// A running contract server.
pub struct ContractServer {
    /// Its socket.
    pub socket: PathBuf,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ContractServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The log line a real Firecracker writes when a guest cannot run under KVM.
pub const FAULT_LINE: &str = "2026-11-02T10:01:00.000000001 [fc:fc_vcpu 0:ERROR:src/vmm/src/vstate/vcpu.rs:500] \
                              Failure during vcpu run: Received KVM_EXIT_INTERNAL_ERROR signal";

impl ContractServer {
    /// Serves on `socket` with `script`; `pidfile` is where the fake binary writes its pid.
    pub fn start(socket: PathBuf, script: Script, pidfile: PathBuf) -> Self {
        let listener = UnixListener::bind(&socket).expect("bind the contract socket");
        let state = Arc::new(Mutex::new(State { state: "Not started", ..State::default() }));
        let spec = Arc::new(Swagger::load());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (state, spec, script, pidfile) = (shared.clone(), spec.clone(), script.clone(), pidfile.clone());
                tokio::spawn(async move { serve(stream, &state, &spec, &script, &pidfile).await });
            }
        });
        Self { socket, state, task }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("state").seen.clone()
    }

    /// `METHOD /path` of every request but the readiness probes (`GET /`).
    pub fn calls(&self) -> Vec<String> {
        self.seen().iter().filter(|s| s.call() != "GET /").map(Seen::call).collect()
    }

    /// The body of the last request to `path`.
    pub fn body(&self, path: &str) -> Value {
        self.seen().iter().rev().find(|s| s.path == path).and_then(|s| s.body.clone()).unwrap_or(Value::Null)
    }

    /// Requests that broke the spec.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().expect("state").violations.clone()
    }
}

/// Reads one HTTP/1.1 request: method, path, content type, body.
async fn read_request(
    stream: &mut UnixStream,
    buffer: &mut Vec<u8>,
) -> Option<(String, String, Option<String>, Vec<u8>)> {
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let (method, path) = (request_line.next()?.to_owned(), request_line.next()?.to_owned());
    let mut length = 0usize;
    let mut content_type = None;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "content-type" => content_type = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    let body_start = head_end + 4;
    while buffer.len() < body_start + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[body_start..body_start + length].to_vec();
    buffer.drain(..body_start + length);
    Some((method, path, content_type, body))
}

fn response(status: u16, body: Option<Value>) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        _ => "Bad Request",
    };
    match body {
        None => format!("HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n")
            .into_bytes(),
        Some(body) => {
            let text = body.to_string();
            format!(
                "HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )
            .into_bytes()
        }
    }
}

fn fault(message: &str) -> Vec<u8> {
    response(400, Some(serde_json::json!({ "fault_message": message })))
}

async fn serve(mut stream: UnixStream, state: &Mutex<State>, spec: &Swagger, script: &Script, pidfile: &Path) {
    let mut buffer = Vec::new();
    while let Some((method, path, content_type, raw)) = read_request(&mut stream, &mut buffer).await {
        let body: Option<Value> = if raw.is_empty() { None } else { serde_json::from_slice(&raw).ok() };
        let mut violations = spec.check(&method, &path, body.as_ref());
        if !raw.is_empty() && body.is_none() {
            violations.push(format!("{method} {path}: the body is not JSON"));
        }
        if body.is_some() && content_type.as_deref() != Some("application/json") {
            violations.push(format!("{method} {path}: content-type {content_type:?} is not application/json"));
        }
        let action = body.as_ref().and_then(|b| b["action_type"].as_str()).map(str::to_owned);
        let key = match &action {
            Some(action) => format!("{method} {path}:{action}"),
            None => format!("{method} {path}"),
        };
        {
            let mut s = state.lock().expect("state");
            let pid = std::fs::read_to_string(pidfile).ok().map(|p| p.trim().to_owned());
            if pid != s.pid {
                s.pid = pid;
                s.state = "Not started";
            }
            s.seen.push(Seen { method: method.clone(), path: path.clone(), body: body.clone() });
            s.violations.extend(violations.iter().cloned());
            if path == "/logger" {
                s.log_path = body.as_ref().and_then(|b| b["log_path"].as_str()).map(PathBuf::from);
            }
            if path == "/metrics" {
                s.metrics_path = body.as_ref().and_then(|b| b["metrics_path"].as_str()).map(PathBuf::from);
            }
        }
        if script.die_on.as_deref() == Some(key.as_str()) {
            if let Some(pid) = std::fs::read_to_string(pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            return;
        }
        let answer = if !violations.is_empty() {
            fault(&format!("contract violation: {}", violations.join("; ")))
        } else if let Some((_, message)) = script.refuse.as_ref().filter(|(call, _)| *call == key) {
            fault(message)
        } else {
            respond(&method, &path, action.as_deref(), body.as_ref(), state, script)
        };
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Firecracker's answer to a request that fits the spec.
fn respond(
    method: &str,
    path: &str,
    action: Option<&str>,
    body: Option<&Value>,
    state: &Mutex<State>,
    script: &Script,
) -> Vec<u8> {
    let mut s = state.lock().expect("state");
    let text = |field: &str| body.and_then(|b| b[field].as_str()).unwrap_or_default().to_owned();
    match (method, path, action) {
        ("GET", "/", _) => response(
            200,
            Some(serde_json::json!({
                "app_name": "Firecracker", "id": "contract", "state": s.state, "vmm_version": "1.16.1"
            })),
        ),
        (_, "/actions", Some("InstanceStart")) => {
            if script.fault_on_start {
                if let Some(log) = &s.log_path {
                    let _ = std::fs::write(log, format!("{FAULT_LINE}\n"));
                }
            }
            s.state = "Running";
            response(204, None)
        }
        (_, "/actions", Some("FlushMetrics")) => {
            if let Some(metrics) = &s.metrics_path {
                use std::io::Write as _;
                let line = serde_json::json!({
                    "utc_timestamp_ms": 1, "block": {"read_bytes": 4096, "write_bytes": 512},
                    "net": {"rx_bytes_count": 100, "tx_bytes_count": 50},
                    "vsock": {"rx_bytes_count": 10, "tx_bytes_count": 20}, "vcpu": {"failures": 0}
                });
                let file = std::fs::OpenOptions::new().append(true).create(true).open(metrics);
                let _ = file.and_then(|mut f| writeln!(f, "{line}"));
            }
            response(204, None)
        }
        // Firecracker's run states: "Not started", "Running", "Paused".
        ("PATCH", "/vm", _) => match (s.state, text("state").as_str()) {
            ("Not started", _) => fault("The requested operation is not supported before starting the microVM."),
            (_, "Paused") => {
                s.state = "Paused";
                response(204, None)
            }
            (_, _) => {
                s.state = "Running";
                response(204, None)
            }
        },
        ("PUT", "/snapshot/create", _) => {
            if s.state != "Paused" {
                return fault("Cannot save the microVM state: the microVM is not paused.");
            }
            // Firecracker writes both files.
            let written = std::fs::write(text("snapshot_path"), "vmstate")
                .and_then(|()| std::fs::write(text("mem_file_path"), "memory"));
            match written {
                Ok(()) => response(204, None),
                Err(error) => fault(&format!("Cannot create the snapshot files: {error}")),
            }
        }
        ("PUT", "/snapshot/load", _) => {
            if s.state != "Not started" {
                return fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.");
            }
            let memory = body.map(|b| b["mem_backend"]["backend_path"].as_str().unwrap_or_default().to_owned());
            for file in [Some(text("snapshot_path")), memory].into_iter().flatten() {
                if !Path::new(&file).is_file() {
                    return fault(&format!("Load snapshot error: cannot open {file}: No such file or directory"));
                }
            }
            let resume = body.and_then(|b| b["resume_vm"].as_bool()).unwrap_or(false);
            s.state = if resume { "Running" } else { "Paused" };
            response(204, None)
        }
        _ => response(204, None),
    }
}

/// A fake `firecracker` (or `jailer`) executable.
pub struct FakeBinary {
    /// The script.
    pub path: PathBuf,
    /// Where it records its arguments, one per line.
    pub args: PathBuf,
    /// Where it writes its pid.
    pub pidfile: PathBuf,
}

impl FakeBinary {
    /// A script in `dir` that links `--api-sock` to `server` and waits; with `fail`, it prints
    /// that on stderr and exits 1 instead.
    pub fn write(dir: &Path, name: &str, server: &Path, vm_dir: &Path, fail: Option<&str>) -> Self {
        let path = dir.join(name);
        let args = dir.join(format!("{name}.args"));
        let pidfile = dir.join(format!("{name}.pid"));
        let keepalive = vm_dir.join("fake-vmm.keepalive");
        std::fs::write(&keepalive, "").expect("keepalive file");
        let fail = fail.map(|message| format!("echo '{message}' >&2\nexit 1\n")).unwrap_or_default();
        let script = format!(
            "#!/bin/sh\n\
             printf '%s\\n' \"$@\" > '{args}'\n\
             echo $$ > '{pid}'\n\
             api=''\n\
             while [ $# -gt 0 ]; do\n  if [ \"$1\" = --api-sock ]; then api=\"$2\"; fi\n  shift\ndone\n\
             {fail}\
             ln -s '{server}' \"$api\" || exit 3\n\
             exec tail -f '{keepalive}'\n",
            args = args.display(),
            pid = pidfile.display(),
            server = server.display(),
            keepalive = keepalive.display(),
        );
        std::fs::write(&path, script).expect("write the fake binary");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        Self { path, args, pidfile }
    }

    /// The arguments it was started with.
    pub fn recorded_args(&self) -> Vec<String> {
        std::fs::read_to_string(&self.args).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    /// Its pid, once started.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pidfile).ok()?.trim().parse().ok()
    }
}
