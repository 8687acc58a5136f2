//! `connect`: a TCP tunnel from the host to a port on the guest's loopback (127.0.0.1, then
//! ::1 when that refuses). Two threads per tunnel: the session thread connects and pumps the
//! socket into `Data` frames; a writer thread feeds the host's `Data` into the socket.
//!
//! An empty `Data` is EOF for its direction: the guest's is sent when the socket reads EOF, the
//! host's `shutdown(Write)`s the socket. Once both have passed, the channel's route goes. A
//! socket error ends the channel with `Error`; the host's `Close` (or the host connection
//! ending) drops the route's sender, and the writer then closes the socket both ways.
//!
//! Flow control: the pump's `Data` waits for the channel's credit (`Link::send`, opened by the
//! host's `Ack`s); the writer acknowledges what it has written into the socket, so the host
//! never has more than a window in flight towards it either.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use banger_proto::agent::{ack_payload, AgentResponse, FrameKind, ACK_EVERY};

use crate::channel::Link;

/// How long a connect to the loopback may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes per `Data` frame sent to the host.
const CHUNK: usize = 64 * 1024;
/// The guest → host direction has sent its EOF.
const GUEST_EOF: u8 = 1;
/// The host → guest direction has received its EOF.
const HOST_EOF: u8 = 2;

/// Connects to `port` on the loopback: 127.0.0.1 first, then ::1 when IPv4 refuses (a server
/// bound to ::1 only).
fn connect(port: u16) -> Result<TcpStream, String> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(stream) => Ok(stream),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            TcpStream::connect_timeout(&SocketAddr::from((Ipv6Addr::LOCALHOST, port)), CONNECT_TIMEOUT).map_err(|_| {
                format!("connection refused on guest port {port}; nothing listens there (see `banger vm ports`)")
            })
        }
        Err(e) => Err(format!("cannot connect to guest port {port}: {e}")),
    }
}

/// Marks one direction closed; true for the second of the two, which ends the channel.
fn close_half(state: &AtomicU8, mine: u8) -> bool {
    let before = state.fetch_or(mine, Ordering::SeqCst);
    (before | mine) == (GUEST_EOF | HOST_EOF) && (before & mine) == 0
}

/// Serves one `connect` channel; `input` carries the host's `Data` payloads.
pub fn session(link: Link, port: u16, input: mpsc::Receiver<Vec<u8>>) {
    let stream = match connect(port) {
        Ok(stream) => stream,
        Err(message) => {
            link.fail(&message);
            return link.finish();
        }
    };
    let _ = stream.set_nodelay(true);
    let address = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(e) => {
            link.fail(&format!("cannot use the connection to guest port {port}: {e}"));
            return link.finish();
        }
    };
    if link.json(FrameKind::Response, &AgentResponse::Connected { address }).is_err() {
        let _ = stream.shutdown(Shutdown::Both);
        return link.finish();
    }
    let state = Arc::new(AtomicU8::new(0));
    let (their_link, their_state) = (link.clone(), Arc::clone(&state));
    let spawned = std::thread::Builder::new().name("tunnel-in".into()).spawn(move || {
        feed(writer, &their_link, &their_state, port, &input);
        // However the writer ended, the pump must not wait for credit any more.
        their_link.stop_streaming();
    });
    if let Err(e) = spawned {
        link.fail(&format!("cannot start a thread: {e}"));
        let _ = stream.shutdown(Shutdown::Both);
        return link.finish();
    }
    pump(stream, &link, &state, port);
}

/// Guest socket → host, until EOF or an error.
fn pump(mut stream: TcpStream, link: &Link, state: &AtomicU8, port: u16) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                if link.send(FrameKind::Data, Vec::new()).is_err() {
                    let _ = stream.shutdown(Shutdown::Both);
                    return link.finish();
                }
                if close_half(state, GUEST_EOF) {
                    link.finish();
                }
                return;
            }
            Ok(n) => {
                if link.send(FrameKind::Data, buf[..n].to_vec()).is_err() {
                    // The host has gone: nobody reads on.
                    let _ = stream.shutdown(Shutdown::Both);
                    return link.finish();
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // Reading after our own `shutdown(Both)` (a `Close`) lands here too; the host
                // has stopped listening then, so the frame goes nowhere.
                link.fail(&format!("the connection to guest port {port} failed: {e}"));
                let _ = stream.shutdown(Shutdown::Both);
                return link.finish();
            }
        }
    }
}

/// Host → guest socket: payloads until the empty one (EOF), then waits for the route to go.
fn feed(mut stream: TcpStream, link: &Link, state: &AtomicU8, port: u16, input: &mpsc::Receiver<Vec<u8>>) {
    let mut open = true;
    let mut unacked = 0;
    loop {
        let Ok(chunk) = input.recv() else {
            // The route went: the host sent `Close`, its connection ended, or the tunnel
            // finished. Either way the socket is done.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        };
        if !open {
            continue;
        }
        if chunk.is_empty() {
            open = false;
            let _ = stream.shutdown(Shutdown::Write);
            if close_half(state, HOST_EOF) {
                link.finish();
                return;
            }
            continue;
        }
        if let Err(e) = stream.write_all(&chunk) {
            link.fail(&format!("the connection to guest port {port} failed: {e}"));
            let _ = stream.shutdown(Shutdown::Both);
            link.finish();
            return;
        }
        unacked += chunk.len();
        if unacked >= ACK_EVERY {
            let _ = link.send(FrameKind::Ack, ack_payload(unacked));
            unacked = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_half_to_close_ends_the_channel() {
        let state = AtomicU8::new(0);
        assert!(!close_half(&state, GUEST_EOF));
        assert!(!close_half(&state, GUEST_EOF), "the same half twice is not the end");
        assert!(close_half(&state, HOST_EOF));
        assert!(!close_half(&state, HOST_EOF), "only once");
        let state = AtomicU8::new(0);
        assert!(!close_half(&state, HOST_EOF));
        assert!(close_half(&state, GUEST_EOF));
    }

    #[test]
    fn a_closed_port_is_refused_with_its_number() {
        use nix::sys::socket::{bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
        // A port held by a bound socket that never listens: nothing else can take it meanwhile
        // (a port freed for the test could be taken by another process before the connect).
        let held = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
        bind(std::os::fd::AsRawFd::as_raw_fd(&held), &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind");
        let port = getsockname::<SockaddrIn>(std::os::fd::AsRawFd::as_raw_fd(&held)).expect("name").port();
        let err = connect(port).expect_err("nothing listens");
        assert!(err.starts_with(&format!("connection refused on guest port {port}")), "{err}");
    }
}
