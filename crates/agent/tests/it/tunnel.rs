//! `connect` tunnels through a real agent to TCP servers on this host's loopback: bytes both
//! ways, half-closes in either order, a refused port, and `Close`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use banger_proto::agent::{ack_payload, parse_ack, AgentRequest, AgentResponse, Frame, FrameKind, TUNNEL_WINDOW};

use crate::client::{answer, Client};
use crate::serve::Agent;

/// Opens a tunnel to `port` and checks the `Connected` answer.
fn open(client: &mut Client, port: u16) -> u32 {
    let channel = client.open(&AgentRequest::Connect { port }).expect("open");
    let first = client.next(channel).expect("answer");
    match answer(&first) {
        Ok(AgentResponse::Connected { address }) => assert!(address.ends_with(&format!(":{port}")), "{address}"),
        other => panic!("expected connected, got {other:?}"),
    }
    channel
}

/// Reads `Data` frames until the empty one, acknowledging them; returns the bytes and the
/// bytes the agent acknowledged meanwhile.
fn read_to_eof(client: &mut Client, channel: u32) -> (Vec<u8>, usize) {
    let mut got = Vec::new();
    let mut acked = 0;
    loop {
        let frame = client.next(channel).expect("frame");
        match frame.kind {
            FrameKind::Ack => acked += parse_ack(&frame.payload).expect("ack payload"),
            FrameKind::Data if frame.payload.is_empty() => return (got, acked),
            FrameKind::Data => {
                got.extend_from_slice(&frame.payload);
                client.send(&Frame::new(channel, FrameKind::Ack, ack_payload(frame.payload.len()))).expect("ack");
            }
            _ => panic!("unexpected {frame:?}"),
        }
    }
}

fn data(client: &mut Client, channel: u32, bytes: &[u8]) {
    client.send(&Frame::new(channel, FrameKind::Data, bytes.to_vec())).expect("send");
}

#[test]
fn bytes_cross_both_ways_and_the_host_half_close_reaches_the_server() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.manual_acks();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // The server reads to EOF (so it needs the host's half-close), then answers and closes.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        let reply = format!("got {} bytes, sum {}", got.len(), got.iter().map(|b| u64::from(*b)).sum::<u64>());
        s.write_all(reply.as_bytes()).expect("write");
    });
    let channel = open(&mut client, port);
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(100_000) {
        data(&mut client, channel, chunk);
    }
    data(&mut client, channel, &[]);
    let (reply, acked) = read_to_eof(&mut client, channel);
    let sum: u64 = payload.iter().map(|b| u64::from(*b)).sum();
    assert_eq!(String::from_utf8(reply).expect("utf-8"), format!("got 3000000 bytes, sum {sum}"));
    assert!(acked > 2_000_000 && acked <= payload.len(), "the agent acknowledged what it wrote: {acked}");
    server.join().expect("server");
    // The channel is over; the agent serves on.
    assert!(client.call(&AgentRequest::Ping).expect("io").is_ok());
}

#[test]
fn the_server_closing_first_arrives_as_eof_and_the_host_can_still_send() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.manual_acks();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.write_all(b"hello").expect("write");
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut rest = String::new();
        s.read_to_string(&mut rest).expect("read");
        rest
    });
    let channel = open(&mut client, port);
    assert_eq!(read_to_eof(&mut client, channel).0, b"hello");
    data(&mut client, channel, b"late words");
    data(&mut client, channel, &[]);
    assert_eq!(server.join().expect("server"), "late words");
    assert!(client.call(&AgentRequest::Ping).expect("io").is_ok());
}

#[test]
fn a_closed_port_is_refused_by_number() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.manual_acks();
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let channel = client.open(&AgentRequest::Connect { port }).expect("open");
    let err = answer(&client.next(channel).expect("answer")).expect_err("refused");
    assert!(err.starts_with(&format!("connection refused on guest port {port}")), "{err}");
}

#[test]
fn close_drops_the_server_connection_at_once() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.manual_acks();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let channel = open(&mut client, port);
    let (mut server, _) = listener.accept().expect("accept");
    server.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    data(&mut client, channel, b"partial");
    client.send(&Frame::new(channel, FrameKind::Close, Vec::new())).expect("close");
    let mut got = Vec::new();
    server.read_to_end(&mut got).expect("the server sees EOF, not a timeout");
    assert_eq!(got, b"partial");
    // A disconnect does the same to every open tunnel.
    let channel = open(&mut client, port);
    let (mut second, _) = listener.accept().expect("accept");
    second.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = channel;
    drop(client);
    let mut rest = Vec::new();
    second.read_to_end(&mut rest).expect("EOF after the host went away");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "the listener itself is untouched");
}

#[test]
fn the_agent_sends_one_window_until_the_host_acknowledges() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.manual_acks();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let total = 4 * TUNNEL_WINDOW + 1000;
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.write_all(&vec![b'z'; total]).expect("write");
    });
    let channel = open(&mut client, port);
    // Whatever arrives before the agent stops for want of an ack.
    let mut got = 0;
    client.set_timeout(Duration::from_millis(500)).expect("timeout");
    while let Ok(frame) = client.next(channel) {
        assert_eq!(frame.kind, FrameKind::Data);
        got += frame.payload.len();
    }
    client.set_timeout(Duration::from_secs(30)).expect("timeout");
    // At most a window, and nearly all of it (a read of up to 64 KiB must fit whole).
    assert!(got <= TUNNEL_WINDOW && got > TUNNEL_WINDOW - 64 * 1024, "{got} bytes before an ack");
    client.send(&Frame::new(channel, FrameKind::Ack, ack_payload(got))).expect("ack");
    let (rest, _) = read_to_eof(&mut client, channel);
    assert_eq!(got + rest.len(), total);
    server.join().expect("server");
    data(&mut client, channel, &[]);
    assert!(client.call(&AgentRequest::Ping).expect("io").is_ok());
}
