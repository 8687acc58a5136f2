//! `banger-agent serve --unix PATH`: every request kind, stdio, signals, large output, and
//! what a disconnect does to running commands.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use banger_proto::agent::{AgentRequest, AgentResponse, ExitStatus, Frame, FrameKind};

use crate::client::Client;

/// The agent serving on a socket in a temp dir; killed on drop.
pub struct Agent {
    child: Child,
    socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_banger-agent"))
            .args(["serve", "--unix"])
            .arg(&socket)
            .env("BANGER_SESSION_DIR", dir.path().join("sessions"))
            .spawn()
            .expect("start the agent");
        wait_until(Duration::from_secs(10), || socket.exists());
        Self { child, socket, dir }
    }

    pub fn connect(&self) -> Client {
        // The socket file appears at bind, a moment before listen: retry a refused connect.
        let start = Instant::now();
        loop {
            match Client::connect(&self.socket) {
                Ok(client) => return client,
                Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "condition not met within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn ping_answers_with_version_and_kernel() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let pong = client.call(&AgentRequest::Ping).expect("io").expect("pong");
    let AgentResponse::Pong { version, uptime_ms, kernel } = pong else { panic!("not a pong: {pong:?}") };
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert!(uptime_ms > 0);
    assert!(!kernel.is_empty());
}

#[test]
fn exec_streams_stdout_stderr_and_the_exit_code() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let out = client.exec(&["sh", "-c", "echo out; echo err >&2; exit 7"], None).expect("exec");
    assert!(out.pid.is_some_and(|p| p > 1));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status, Some(ExitStatus { code: 7, signal: None }));
}

#[test]
fn exec_defaults_cwd_env_and_null_stdin() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let out = client.exec(&["sh", "-c", "echo $HOME $TERM; cat; echo end"], None).expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/root xterm-256color\nend\n");
    let channel = client
        .open(&AgentRequest::Exec(banger_proto::agent::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "pwd; echo $X".into()],
            env: vec![("X".into(), "y".into())],
            cwd: Some("/tmp".into()),
            stdin: false,
            tty: None,
            container: None,
        }))
        .expect("open");
    let out = client.finish(channel).expect("exec");
    assert_eq!(out.stdout, b"/tmp\ny\n");
}

#[test]
fn stdin_is_forwarded_until_eof() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let input: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let out = client.exec(&["cat"], Some(&input)).expect("exec");
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "stdin came back altered");
    assert_eq!(out.status, Some(ExitStatus { code: 0, signal: None }));
}

#[test]
fn ten_megabytes_of_output_arrive_intact() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let out = client.exec(&["seq", "1", "1500000"], None).expect("exec");
    let expected: String = (1..=1_500_000).map(|i| format!("{i}\n")).collect();
    assert!(out.stdout.len() > 10_000_000);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected.as_bytes(), "output came back altered");
    assert_eq!(out.status.map(|s| s.code), Some(0));
}

#[test]
fn missing_and_unrunnable_commands_exit_127_and_126() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let out = client.exec(&["no-such-command-banger"], None).expect("exec");
    assert_eq!(out.pid, None);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "banger-agent: no-such-command-banger: command not found\n");
    assert_eq!(out.status, Some(ExitStatus { code: 127, signal: None }));
    let out = client.exec(&["/etc/hostname"], None).expect("exec");
    assert_eq!(out.status.map(|s| s.code), Some(126));
    assert!(!out.stderr.is_empty());
}

#[test]
fn a_signal_ends_the_whole_command() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let channel = client.start(&["sleep", "100"], false).expect("start");
    let started = client.next(channel).expect("started");
    assert!(matches!(crate::client::answer(&started), Ok(AgentResponse::Started { .. })));
    let start = Instant::now();
    client.signal(channel, 15).expect("signal");
    let out = client.finish(channel).expect("finish");
    assert_eq!(out.status, Some(ExitStatus { code: 143, signal: Some(15) }));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn channels_run_concurrently() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let slow = client.start(&["sh", "-c", "sleep 1; echo slow"], false).expect("start");
    let start = Instant::now();
    let pong = client.call(&AgentRequest::Ping).expect("io");
    assert!(pong.is_ok());
    let quick = client.exec(&["echo", "quick"], None).expect("exec");
    assert_eq!(quick.stdout, b"quick\n");
    assert!(start.elapsed() < Duration::from_millis(900), "ping and exec waited for the slow command");
    assert_eq!(client.finish(slow).expect("slow").stdout, b"slow\n");
}

#[test]
fn files_round_trip_with_mode() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blob");
    let path = path.to_str().expect("utf-8");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let written = client.write_file(path, 0o600, &data).expect("io").expect("written");
    assert_eq!(written, AgentResponse::Written { size: data.len() as u64 });
    let (back, response) = client.read_file(path).expect("io").expect("read");
    assert!(back == data, "file came back altered");
    assert_eq!(response, AgentResponse::File { size: data.len() as u64, mode: 0o600 });
    let missing = client.read_file("/nonexistent/banger").expect("io");
    assert!(missing.expect_err("missing").contains("/nonexistent/banger"));
    let dir_err = client.write_file("/nonexistent/dir/f", 0o644, b"x").expect("io");
    assert!(dir_err.is_err());
    // The agent still serves after the failures.
    assert!(client.call(&AgentRequest::Ping).expect("io").is_ok());
}

#[test]
fn ports_lists_a_listening_socket() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let AgentResponse::Ports { ports } = client.call(&AgentRequest::Ports).expect("io").expect("ports") else {
        panic!("not ports")
    };
    assert!(
        ports.iter().any(|p| p.proto == "tcp" && p.port == port && p.address == "127.0.0.1"),
        "{port} missing from {ports:?}"
    );
}

#[test]
fn a_disconnect_kills_the_connections_processes_and_a_new_host_is_served() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let channel = client.start(&["sh", "-c", "sleep 100 & sleep 100"], false).expect("start");
    let started = client.next(channel).expect("started");
    let Ok(AgentResponse::Started { pid }) = crate::client::answer(&started) else { panic!("not started") };
    assert!(alive(pid));
    drop(client);
    wait_until(Duration::from_secs(10), || !alive(pid));
    let mut client = agent.connect();
    let out = client.exec(&["echo", "again"], None).expect("exec");
    assert_eq!(out.stdout, b"again\n");
}

#[test]
fn restarted_channel_ids_act_as_a_reconnect() {
    // What a quick reconnect over virtio-serial looks like to the agent: no HUP, the stream
    // just goes on with channel ids starting at 1 again.
    let agent = Agent::start();
    let mut client = agent.connect();
    let channel = client.start(&["sleep", "100"], false).expect("start");
    let Ok(AgentResponse::Started { pid }) = crate::client::answer(&client.next(channel).expect("started")) else {
        panic!("not started")
    };
    client.set_next_channel(1);
    assert!(client.call(&AgentRequest::Ping).expect("io").is_ok());
    wait_until(Duration::from_secs(10), || !alive(pid));
    let out = client.exec(&["echo", "new"], None).expect("exec");
    assert_eq!(out.stdout, b"new\n");
}

#[test]
fn bad_requests_and_bad_frames_get_errors_and_serving_goes_on() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send(&Frame::new(1, FrameKind::Request, b"{not json".to_vec())).expect("send");
    let frame = client.next(1).expect("answer");
    assert_eq!(frame.kind, FrameKind::Error);
    // A frame with an unknown kind byte: the stream is out of step, reported on channel 0.
    let mut bad = Frame::new(2, FrameKind::Data, Vec::new()).encode();
    bad[8] = 99;
    client.raw(&bad).expect("send");
    let frame = client.next(0).expect("channel 0");
    assert_eq!(frame.kind, FrameKind::Error);
    assert!(client.call(&AgentRequest::Ping).expect("io").is_ok());
}

#[test]
fn shutdown_answers_ok_and_ends_a_standalone_agent() {
    let mut agent = Agent::start();
    let mut client = agent.connect();
    assert_eq!(client.call(&AgentRequest::Shutdown).expect("io"), Ok(AgentResponse::Ok));
    let start = Instant::now();
    loop {
        if let Some(status) = agent.child.try_wait().expect("wait") {
            assert!(status.success());
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "agent still running");
        std::thread::sleep(Duration::from_millis(10));
    }
}
