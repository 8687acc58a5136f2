//! Sessions over a real agent channel: they outlive the host connection (exec processes do
//! not), an attach with stdin is exclusive and a disconnect frees it, logs stream and follow.

use std::time::Duration;

use banger_proto::agent::session::{GuestSessionStatus, SessionOp, SessionStart, SessionState};
use banger_proto::agent::{AgentRequest, AgentResponse, ExitStatus, Frame, FrameKind};

use crate::client::{answer, Client};
use crate::serve::{wait_until, Agent};

fn session(op: SessionOp) -> AgentRequest {
    AgentRequest::Session(op)
}

fn start(client: &mut Client, id: &str, argv: &[&str], stdin: bool) -> SessionState {
    let req = SessionStart {
        id: id.into(),
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        cwd: Some("/".into()),
        stdin,
        ..Default::default()
    };
    match client.call(&session(SessionOp::Start(req))).expect("io") {
        Ok(AgentResponse::Session(state)) => state,
        other => panic!("not a session: {other:?}"),
    }
}

fn list(client: &mut Client) -> Vec<SessionState> {
    match client.call(&session(SessionOp::List)).expect("io") {
        Ok(AgentResponse::Sessions { sessions }) => sessions,
        other => panic!("not sessions: {other:?}"),
    }
}

fn attach(client: &mut Client, id: &str, stdin: bool) -> (u32, Frame) {
    let channel = client.open(&session(SessionOp::Attach { id: id.into(), stdin })).expect("open");
    let first = client.next(channel).expect("first frame");
    (channel, first)
}

/// Output frames of `channel` until `want` has been seen on stdout.
fn read_until(client: &mut Client, channel: u32, want: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(want) {
        let frame = client.next(channel).expect("frame");
        match frame.kind {
            FrameKind::Stdout => seen.push_str(&String::from_utf8_lossy(&frame.payload)),
            FrameKind::Stderr => {}
            other => panic!("unexpected {other:?} while waiting for {want:?}; seen {seen:?}"),
        }
    }
    seen
}

#[test]
fn a_session_outlives_its_host_and_stdin_attach_is_exclusive() {
    let agent = Agent::start();
    let mut host = agent.connect();
    // The loop ends when its stdin closes: with the agent, at the latest.
    let state = start(&mut host, "s1", &["sh", "-c", "while read l; do echo got:$l; done; echo bye"], true);
    assert_eq!(state.status, GuestSessionStatus::Running, "{state:?}");
    let pid = state.pid.expect("pid");

    let (channel, first) = attach(&mut host, "s1", true);
    assert!(matches!(answer(&first), Ok(AgentResponse::Session(SessionState { stdin_attached: true, .. }))));
    host.stdin(channel, b"one\n").expect("stdin");
    read_until(&mut host, channel, "got:one\n");
    let (_, refused) = attach(&mut host, "s1", true);
    let message = answer(&refused).expect_err("a second stdin attach is refused");
    assert!(message.contains("already attached"), "{message}");
    let (watch, first) = attach(&mut host, "s1", false);
    assert!(answer(&first).is_ok(), "watching without stdin is allowed");
    host.send(&Frame::new(watch, FrameKind::Close, Vec::new())).expect("detach the watcher");
    assert_eq!(read_frames_until_close(&mut host, watch), "got:one\n", "replay, then Close");

    // The host goes away mid-attach: its attach ends, the session does not.
    drop(host);
    let mut host = agent.connect();
    let sessions = list(&mut host);
    assert_eq!(sessions.len(), 1);
    assert_eq!((sessions[0].status, sessions[0].pid), (GuestSessionStatus::Running, Some(pid)));
    assert!(!sessions[0].stdin_attached, "the disconnect freed stdin");

    let (channel, first) = attach(&mut host, "s1", true);
    assert!(answer(&first).is_ok());
    read_until(&mut host, channel, "got:one\n");
    host.stdin(channel, b"two\n").expect("stdin");
    read_until(&mut host, channel, "got:two\n");
    host.send(&Frame::new(channel, FrameKind::Close, Vec::new())).expect("detach");
    let rest = read_frames_until_close(&mut host, channel);
    assert!(!rest.contains("bye"), "detaching left the session running: {rest:?}");

    // Logs hold everything; stdin closing (by a new holder) ends the loop.
    let logs = host.open(&session(SessionOp::Logs { id: "s1".into(), stderr: false, follow: false })).expect("logs");
    assert_eq!(collect_log(&mut host, logs).0, "got:one\ngot:two\n");
    let (channel, _) = attach(&mut host, "s1", true);
    host.stdin(channel, b"").expect("close stdin");
    loop {
        let frame = host.next(channel).expect("frame");
        if frame.kind == FrameKind::Exit {
            assert_eq!(frame.parse::<ExitStatus>("exit").expect("exit"), ExitStatus { code: 0, signal: None });
            break;
        }
    }
    let sessions = list(&mut host);
    assert_eq!(sessions[0].status, GuestSessionStatus::Exited);
    let log = std::fs::read_to_string(agent.dir.path().join("sessions/s1/stdout")).expect("log file");
    assert_eq!(log, "got:one\ngot:two\nbye\n");
}

/// Stdout of an attach channel until the agent's `Close`.
fn read_frames_until_close(client: &mut Client, channel: u32) -> String {
    let mut seen = String::new();
    loop {
        let frame = client.next(channel).expect("frame");
        match frame.kind {
            FrameKind::Close => return seen,
            FrameKind::Stdout => seen.push_str(&String::from_utf8_lossy(&frame.payload)),
            FrameKind::Stderr => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A logs channel's bytes and its final state.
fn collect_log(client: &mut Client, channel: u32) -> (String, SessionState) {
    let mut data = Vec::new();
    loop {
        let frame = client.next(channel).expect("frame");
        match frame.kind {
            FrameKind::Data => data.extend_from_slice(&frame.payload),
            _ => match answer(&frame) {
                Ok(AgentResponse::Session(state)) => return (String::from_utf8_lossy(&data).into_owned(), state),
                other => panic!("unexpected end of the log: {other:?}"),
            },
        }
    }
}

#[test]
fn logs_follow_until_the_end_and_signals_give_128_plus_n() {
    let agent = Agent::start();
    let mut host = agent.connect();
    start(&mut host, "f1", &["sh", "-c", "echo a; echo oops >&2; sleep 1; echo b"], false);
    let follow = host.open(&session(SessionOp::Logs { id: "f1".into(), stderr: false, follow: true })).expect("open");
    let (text, state) = collect_log(&mut host, follow);
    assert_eq!(text, "a\nb\n");
    assert_eq!(state.status, GuestSessionStatus::Exited);
    assert_eq!(state.exit, Some(ExitStatus { code: 0, signal: None }));
    let err = host.open(&session(SessionOp::Logs { id: "f1".into(), stderr: true, follow: false })).expect("open");
    assert_eq!(collect_log(&mut host, err).0, "oops\n");

    start(&mut host, "t1", &["sleep", "30"], false);
    let signal = session(SessionOp::Signal { id: "t1".into(), signal: 15 });
    assert!(matches!(host.call(&signal).expect("io"), Ok(AgentResponse::Session(_))));
    wait_until(Duration::from_secs(10), || {
        list(&mut host).iter().any(|s| s.id == "t1" && s.status == GuestSessionStatus::Exited)
    });
    let t1 = list(&mut host).into_iter().find(|s| s.id == "t1").expect("t1");
    assert_eq!(t1.exit, Some(ExitStatus { code: 143, signal: Some(15) }));

    let unknown = host.call(&session(SessionOp::Signal { id: "nope".into(), signal: 9 })).expect("io");
    assert!(unknown.expect_err("unknown").contains("no session nope"));
    let failed = start(&mut host, "m1", &["no-such-command-banger"], false);
    assert_eq!(failed.status, GuestSessionStatus::Failed);
    assert_eq!(failed.failure.map(|f| f.stage).as_deref(), Some("command"));
}

#[test]
fn logs_of_a_session_from_an_earlier_boot_are_still_served() {
    let agent = Agent::start();
    let old = agent.dir.path().join("sessions/0123456789abcdef");
    std::fs::create_dir_all(&old).expect("mkdir");
    std::fs::write(old.join("stdout"), "from before\n").expect("write");
    let mut host = agent.connect();
    let channel = host
        .open(&session(SessionOp::Logs { id: "0123456789abcdef".into(), stderr: false, follow: true }))
        .expect("open");
    let data = host.next(channel).expect("data");
    assert_eq!((data.kind, data.payload.as_slice()), (FrameKind::Data, b"from before\n".as_slice()));
    assert_eq!(answer(&host.next(channel).expect("end")), Ok(AgentResponse::Ok));
    let missing =
        host.open(&session(SessionOp::Logs { id: "feed".into(), stderr: true, follow: false })).expect("open");
    let message = answer(&host.next(missing).expect("error")).expect_err("unknown");
    assert!(message.contains("no session feed"), "{message}");
}
