//! `tty` execs and sessions through the agent binary: a pty of the asked size, resizes, typed
//! input, Ctrl-C as a byte, and the last output before the exit.

use banger_proto::agent::session::{SessionOp, SessionStart};
use banger_proto::agent::{AgentRequest, AgentResponse, ExecRequest, ExitStatus, Frame, FrameKind, TtySize};

use crate::client::Client;
use crate::serve::Agent;

/// `Stdout` of `channel` until `want` has come; everything seen.
fn read_until(client: &mut Client, channel: u32, seen: &mut String, want: &str) {
    while !seen.contains(want) {
        let frame = client.next(channel).expect("frame");
        match frame.kind {
            FrameKind::Stdout => seen.push_str(&String::from_utf8_lossy(&frame.payload)),
            FrameKind::Response => {}
            other => panic!("unexpected {other:?} while waiting for {want:?}; seen {seen:?}"),
        }
    }
}

fn resize(client: &mut Client, channel: u32, rows: u16, cols: u16) {
    client.send(&Frame::json(channel, FrameKind::Resize, &TtySize { rows, cols })).expect("resize");
}

#[test]
fn a_tty_exec_follows_resizes_takes_typed_input_and_ends_with_its_last_output() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let script = "stty size; echo ready; read line; stty size; echo got:$line; \
                  trap 'echo interrupted; exit 9' INT; echo waiting; while :; do sleep 0.05; done";
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        stdin: true,
        tty: Some(TtySize { rows: 30, cols: 100 }),
        ..Default::default()
    };
    let channel = client.open(&AgentRequest::Exec(request)).expect("open");
    let mut seen = String::new();
    read_until(&mut client, channel, &mut seen, "ready");
    assert!(seen.contains("30 100\r\n"), "{seen:?}");
    // Out of range: ignored (the daemon refuses these before they get here).
    resize(&mut client, channel, 0, 10);
    resize(&mut client, channel, 45, 140);
    client.stdin(channel, b"hello\r").expect("type");
    read_until(&mut client, channel, &mut seen, "got:hello");
    assert!(seen.contains("hello\r\n"), "the terminal echoes what is typed: {seen:?}");
    assert!(seen.contains("45 140\r\n"), "{seen:?}");
    read_until(&mut client, channel, &mut seen, "waiting");
    client.stdin(channel, b"\x03").expect("Ctrl-C");
    let out = client.finish(channel).expect("the command ends");
    let rest = String::from_utf8_lossy(&out.stdout);
    assert!(rest.contains("interrupted"), "the last output comes before the exit: {rest:?}");
    assert!(out.stderr.is_empty(), "stdout and stderr are one stream");
    assert_eq!(out.status, Some(ExitStatus { code: 9, signal: None }));
}

#[test]
fn a_tty_session_logs_the_terminal_and_its_stdin_attach_types_and_resizes() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let start = SessionStart {
        id: "t1".into(),
        argv: vec!["sh".into(), "-c".into(), "echo up; read a; stty size; echo typed:$a; exit 4".into()],
        cwd: Some("/".into()),
        tty: Some(TtySize { rows: 20, cols: 60 }),
        ..Default::default()
    };
    match client.call(&AgentRequest::Session(SessionOp::Start(start))).expect("io") {
        Ok(AgentResponse::Session(state)) => assert!(state.failure.is_none(), "{state:?}"),
        other => panic!("not a session: {other:?}"),
    }
    let channel =
        client.open(&AgentRequest::Session(SessionOp::Attach { id: "t1".into(), stdin: true })).expect("attach");
    let mut seen = String::new();
    read_until(&mut client, channel, &mut seen, "up");
    resize(&mut client, channel, 50, 70);
    client.stdin(channel, b"abc\r").expect("type");
    // An attach client's end of input does not end a terminal's.
    client.stdin(channel, b"").expect("eof");
    read_until(&mut client, channel, &mut seen, "typed:abc");
    assert!(seen.contains("50 70\r\n"), "{seen:?}");
    loop {
        let frame = client.next(channel).expect("frame");
        if frame.kind == FrameKind::Exit {
            assert_eq!(frame.parse::<ExitStatus>("exit").expect("exit").code, 4);
            break;
        }
    }
    let log = std::fs::read_to_string(agent.dir.path().join("sessions/t1/stdout")).expect("log");
    assert!(log.contains("up\r\n") && log.contains("typed:abc\r\n"), "{log:?}");
    assert_eq!(std::fs::read(agent.dir.path().join("sessions/t1/stderr")).expect("stderr log"), b"");
}
