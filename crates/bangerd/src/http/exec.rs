//! `POST /v1/vms/{vm}/exec`: runs a command in a VM with its stdio streamed both ways. The
//! client asks for an HTTP upgrade (`Upgrade: banger-exec`); after `101 Switching Protocols`
//! both sides speak the agent channel's framing (`banger_proto::agent`) on channel 1:
//!
//! - client → daemon: first a `Request` frame holding an `exec` request, then `Stdin` (empty =
//!   EOF), `Signal` and, for an exec with `tty`, `Resize` frames (sizes out of
//!   1..=`TtySize::MAX` are refused at the request and dropped after it);
//! - daemon → client: the agent's `Response(started)`, `Stdout`, `Stderr`, then `Exit` or
//!   `Error`, after which the daemon closes the stream.
//!
//! The daemon relays between that stream and a channel of the VM's agent connection. If the
//! client goes away before the command ends, the command is killed. Output is credited back
//! to the guest only once written to the client, so a slow client holds the command back
//! (its pipe fills) instead of growing the daemon.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use banger_proto::agent::{AgentFailure, AgentRequest, Decoder, Frame, FrameKind, SignalRequest, TtySize};
use banger_proto::ApiError;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{path, ApiFailure, PathParams};
use crate::agent_conn::AgentConn;
use crate::daemon::Daemon;

/// The upgrade protocol name.
pub const EXEC_PROTOCOL: &str = "banger-exec";

/// The `Upgrade` value of an exec.
#[derive(Debug, utoipa::ToSchema)]
#[expect(dead_code, reason = "a schema only: the one value the header may carry")]
pub(super) enum ExecUpgrade {
    /// The exec protocol.
    #[schema(rename = "banger-exec")]
    BangerExec,
}

/// Runs a command in a running VM, its stdio streamed both ways over an HTTP upgrade.
///
/// The client sends `Connection: upgrade` and `Upgrade: banger-exec`. After `101 Switching
/// Protocols` the connection leaves HTTP: both sides speak the agent channel's framing
/// (`banger_proto::agent`; see the module docs of `http/exec.rs`), which this document does
/// not describe. A refusal before the upgrade is an ordinary `{code, message}` answer.
#[utoipa::path(post, path = "/v1/vms/{vm}/exec",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("Connection" = String, Header, description = "`upgrade`"),
        ("Upgrade" = inline(ExecUpgrade), Header, description = "the protocol to switch to: `banger-exec`")),
    responses(
        (status = 101, description = "switched to `banger-exec`: the stream carries agent frames from here on, outside HTTP",
            headers(("Connection" = String, description = "`upgrade`"), ("Upgrade" = String, description = "`banger-exec`"))),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub async fn exec(State(d): State<Arc<Daemon>>, vm: PathParams<String>, mut req: Request) -> Response {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(EXEC_PROTOCOL));
    if !wants_upgrade {
        return ApiFailure::invalid(format!("exec needs `Connection: upgrade` and `Upgrade: {EXEC_PROTOCOL}`"))
            .into_response();
    }
    let vm = match path(vm) {
        Ok(vm) => vm,
        Err(e) => return e.into_response(),
    };
    let conn = match d.fleet.running_agent(&vm) {
        Ok((_, conn)) => conn,
        Err(e) => return ApiFailure::from(e).into_response(),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => relay(TokioIo::new(upgraded), &conn).await,
            Err(e) => tracing::warn!(error = %e, "exec upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, EXEC_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn send(io: &mut (impl AsyncWrite + Unpin), frame: Frame) -> bool {
    io.write_all(&frame.encode()).await.is_ok() && io.flush().await.is_ok()
}

/// Sends the client a final error frame.
async fn refuse(io: &mut (impl AsyncWrite + Unpin), message: impl Into<String>) {
    let frame = Frame::json(1, FrameKind::Error, &AgentFailure { message: message.into() });
    let _ = send(io, frame).await;
}

/// Whether a client's frame of `kind` goes on to the agent: `allowed` kinds, and `Resize`
/// only with a size in range (a bad one is dropped with a warning).
pub(super) fn passes(kind: FrameKind, payload: &[u8], allowed: &[FrameKind]) -> bool {
    if kind == FrameKind::Resize {
        return match TtySize::parse_resize(payload) {
            Ok(_) => true,
            Err(why) => {
                tracing::warn!(%why, "dropped a client's resize");
                false
            }
        };
    }
    allowed.contains(&kind)
}

/// Passes the client's stdin, signal and resize frames waiting in `decoder` on to the agent.
fn forward_input(decoder: &mut Decoder, channel: &crate::agent_conn::Channel) {
    while let Ok(Some(f)) = decoder.next_frame() {
        if passes(f.kind, &f.payload, &[FrameKind::Stdin, FrameKind::Signal])
            && channel.send(f.kind, f.payload).is_err()
        {
            break;
        }
    }
}

/// Relays one exec between the client stream `io` and the agent.
pub async fn relay(mut io: impl AsyncRead + AsyncWrite + Unpin, conn: &AgentConn) {
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    // The first frame must be the exec request.
    let request = loop {
        match decoder.next_frame() {
            Ok(Some(f)) if f.kind == FrameKind::Request => match f.parse::<AgentRequest>("request") {
                Ok(AgentRequest::Exec(e)) if e.tty.and_then(TtySize::check).is_some() => {
                    let why = e.tty.and_then(TtySize::check).unwrap_or_default();
                    return refuse(&mut io, format!("{why}; check the terminal's size (`stty size`)")).await;
                }
                Ok(r @ AgentRequest::Exec(_)) => break r,
                Ok(_) => return refuse(&mut io, "only exec requests are relayed here").await,
                Err(e) => return refuse(&mut io, e.to_string()).await,
            },
            Ok(Some(_)) => return refuse(&mut io, "the first frame must be an exec request").await,
            Ok(None) => {}
            Err(e) => return refuse(&mut io, e.to_string()).await,
        }
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => decoder.push(&buf[..n]),
        }
    };
    let mut channel = match conn.open(&request).await {
        Ok(c) => c,
        Err(e) => return refuse(&mut io, e.to_string()).await,
    };
    channel.manual_credit();
    // Frames the client sent right behind the request (its stdin and the stdin's end, often in
    // the same read on a busy host) are already in the decoder: pass them on now, not at the
    // next read from the client, which may never come.
    forward_input(&mut decoder, &channel);
    let mut client_open = true;
    loop {
        tokio::select! {
            read = io.read(&mut buf), if client_open => {
                let n = match read {
                    Ok(0) | Err(_) => {
                        // The client went away: nobody will read the output, end the command.
                        let _ = channel.send(FrameKind::Signal, serde_json::to_vec(&SignalRequest { signal: 9 }).unwrap_or_default());
                        client_open = false;
                        continue;
                    }
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                forward_input(&mut decoder, &channel);
            }
            frame = channel.recv() => {
                let Some(mut frame) = frame else {
                    refuse(&mut io, "the agent connection was lost (did the vm stop?)").await;
                    return;
                };
                let last = matches!(frame.kind, FrameKind::Exit | FrameKind::Error);
                let streamed = if frame.kind.is_credited() { frame.payload.len() } else { 0 };
                frame.channel = 1;
                if client_open && !send(&mut io, frame).await {
                    client_open = false;
                }
                // Written (or nobody reads any more, and the command is being killed).
                channel.consumed(streamed);
                if last {
                    let _ = io.shutdown().await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use banger_proto::agent::{AgentResponse, ExitStatus};
    use tokio::net::UnixListener;

    use super::*;

    /// An agent that starts any exec, echoes its stdin to stdout and exits 3 at the stdin's end.
    async fn echo_agent(listener: UnixListener) {
        let Ok((stream, _)) = listener.accept().await else { return };
        let (mut rd, mut wr) = stream.into_split();
        let (mut d, mut buf) = (Decoder::default(), vec![0u8; 4096]);
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                return;
            }
            d.push(&buf[..n]);
            while let Ok(Some(f)) = d.next_frame() {
                let reply = match f.kind {
                    FrameKind::Request => {
                        Frame::json(f.channel, FrameKind::Response, &AgentResponse::Started { pid: 1 })
                    }
                    FrameKind::Stdin if f.payload.is_empty() => {
                        Frame::json(f.channel, FrameKind::Exit, &ExitStatus { code: 3, signal: None })
                    }
                    FrameKind::Stdin => Frame::new(f.channel, FrameKind::Stdout, f.payload),
                    _ => continue,
                };
                if wr.write_all(&reply.encode()).await.is_err() {
                    return;
                }
            }
        }
    }

    #[test]
    fn resizes_pass_only_in_range() {
        let ok = serde_json::to_vec(&TtySize { rows: 50, cols: 200 }).expect("json");
        let huge = br#"{"rows":65535,"cols":80}"#;
        let allowed = [FrameKind::Stdin];
        assert!(passes(FrameKind::Resize, &ok, &allowed));
        assert!(!passes(FrameKind::Resize, huge, &allowed));
        assert!(!passes(FrameKind::Resize, b"garbage", &allowed));
        assert!(passes(FrameKind::Stdin, b"x", &allowed) && !passes(FrameKind::Ack, b"", &allowed));
    }

    /// On a busy host the request, the stdin and the stdin's end arrive in one read: the command
    /// still gets them all and ends (it used to wait for a next read that never came).
    #[tokio::test]
    async fn stdin_sent_in_the_same_read_as_the_request_reaches_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        tokio::spawn(echo_agent(UnixListener::bind(&path).expect("bind")));
        let conn = AgentConn::new(path);
        let (mut client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move { relay(server, &conn).await });
        let mut bytes = Frame::json(1, FrameKind::Request, &AgentRequest::Exec(Default::default())).encode();
        bytes.extend(Frame::new(1, FrameKind::Stdin, b"hello".to_vec()).encode());
        bytes.extend(Frame::new(1, FrameKind::Stdin, Vec::new()).encode());
        client.write_all(&bytes).await.expect("one write");

        let (mut d, mut buf, mut out) = (Decoder::default(), vec![0u8; 4096], Vec::new());
        let exit = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                while let Ok(Some(f)) = d.next_frame() {
                    match f.kind {
                        FrameKind::Stdout => out.extend(f.payload),
                        FrameKind::Exit => return f.parse::<ExitStatus>("exit").expect("exit status"),
                        _ => {}
                    }
                }
                let n = client.read(&mut buf).await.expect("read");
                assert!(n > 0, "the relay closed before the command's exit");
                d.push(&buf[..n]);
            }
        })
        .await
        .expect("the command ends: its stdin and the end of it reached it");
        assert_eq!(exit.code, 3);
        assert_eq!(out, b"hello");
    }
}
