//! The streaming session routes.
//!
//! `GET /v1/vms/{vm}/sessions/{session}/logs?stderr=BOOL&follow=BOOL`: the log file's bytes as
//! the response body (`application/octet-stream`, chunked); with `follow`, the body goes on
//! until the session ends. A client that hangs up stops the follow in the guest.
//!
//! `POST /v1/vms/{vm}/sessions/{session}/attach?stdin=BOOL` with `Upgrade: banger-attach`:
//! after `101 Switching Protocols` both sides speak the agent channel's framing on channel 1,
//! as for exec (`exec.rs`):
//!
//! - daemon → client: `Response(session)` once attached; the logs' tails, then live `Stdout` and
//!   `Stderr`; then `Exit` (the session ended), `Close` (detached) or `Error` (refused, e.g. a
//!   second attach with stdin, or the client fell behind);
//! - client → daemon: `Stdin` (empty closes the session's stdin), `Signal`, `Resize` (a `tty`
//!   session's stdin holder; sizes out of range are dropped) and `Close` to detach. A client that simply goes away is detached too: a session never ends because its
//!   client did.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use banger_proto::agent::session::SessionOp;
use banger_proto::agent::{AgentFailure, AgentRequest, Decoder, Frame, FrameKind};
use banger_proto::ApiError;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{path, query, ApiFailure, PathParams, QueryParams};
use crate::agent_conn::{AgentConn, Channel};
use crate::daemon::Daemon;

/// The attach upgrade's protocol name.
pub const ATTACH_PROTOCOL: &str = "banger-attach";

/// Query of the logs route.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// stderr instead of stdout.
    #[serde(default)]
    stderr: bool,
    /// Keep streaming until the session ends.
    #[serde(default)]
    follow: bool,
}

/// Query of the attach route.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AttachQuery {
    /// Take the session's stdin (only for `pipe` and `tty` sessions; exclusive).
    #[serde(default)]
    stdin: bool,
}

fn not_running(vm: &str) -> ApiFailure {
    ApiFailure::conflict(format!(
        "vm '{vm}' is not running; session logs live in the guest, so start it with `banger vm start {vm}` to read them"
    ))
}

/// A channel that tells the agent to stop (`Close`) if dropped before its end.
struct Closing {
    channel: Channel,
    done: bool,
}

impl Closing {
    /// The channel has ended: nothing to stop on drop.
    fn ended(&mut self) {
        self.done = true;
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.channel.send(FrameKind::Close, Vec::new());
        }
    }
}

/// A session's stdout (or stderr) log, as a stream of bytes.
///
/// With `follow`, the body goes on until the session ends. The VM must run: the logs live in
/// the guest.
#[utoipa::path(get, path = "/v1/vms/{vm}/sessions/{session}/logs", tag = "sessions",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("session" = String, Path, description = "name, id or id prefix"), LogsQuery),
    responses(
        (status = 200, description = "the log's bytes, streamed (chunked)", content_type = "application/octet-stream",
            body = String),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub async fn logs(
    State(d): State<Arc<Daemon>>,
    params: PathParams<(String, String)>,
    q: QueryParams<LogsQuery>,
) -> Result<Response, ApiFailure> {
    let ((vm, session), q) = (path(params)?, query(q)?);
    let (vm, agent, session) = d.sessions.find(&vm, &session).await?;
    let agent = agent.ok_or_else(|| not_running(&vm.name))?;
    let request = AgentRequest::Session(SessionOp::Logs { id: session.id.clone(), stderr: q.stderr, follow: q.follow });
    let channel = agent.open(&request).await.map_err(|e| ApiFailure::internal(banger_core::error_chain(&e)))?;
    let mut stream = Closing { channel, done: false };
    // The first frame decides the status: an error before any byte is a proper error answer.
    let first = loop {
        let frame = stream.channel.recv().await;
        match frame {
            None => return Err(ApiFailure::internal("the agent connection was lost (did the vm stop?)")),
            Some(f) if f.kind == FrameKind::Data => break Some(Bytes::from(f.payload)),
            Some(f) if f.kind == FrameKind::Response => {
                stream.ended();
                break None;
            }
            Some(f) if f.kind == FrameKind::Error => {
                stream.ended();
                let message = f.parse::<AgentFailure>("error").map_or_else(|e| e.to_string(), |f| f.message);
                return Err(if message.starts_with("no session") {
                    ApiFailure::not_found(format!("{message}; see `banger session list {}`", vm.name))
                } else {
                    ApiFailure::internal(message)
                });
            }
            Some(_) => {}
        }
    };
    let body = futures_util::stream::unfold((stream, first), |(mut stream, first)| async move {
        if let Some(bytes) = first {
            return Some((Ok(bytes), (stream, None)));
        }
        if stream.done {
            return None;
        }
        loop {
            let Some(frame) = stream.channel.recv().await else {
                stream.ended();
                return Some((Err(std::io::Error::other("the agent connection was lost")), (stream, None)));
            };
            match frame.kind {
                FrameKind::Data => return Some((Ok(Bytes::from(frame.payload)), (stream, None))),
                FrameKind::Response => {
                    stream.ended();
                    return None;
                }
                FrameKind::Error => {
                    stream.ended();
                    let message = frame.parse::<AgentFailure>("error").map_or_else(|e| e.to_string(), |f| f.message);
                    return Some((Err(std::io::Error::other(message)), (stream, None)));
                }
                _ => {}
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(body))
        .map_err(|e| ApiFailure::internal(e.to_string()))
}

/// The `Upgrade` value of an attach.
#[derive(Debug, utoipa::ToSchema)]
#[expect(dead_code, reason = "a schema only: the one value the header may carry")]
pub(super) enum AttachUpgrade {
    /// The attach protocol.
    #[schema(rename = "banger-attach")]
    BangerAttach,
}

/// Attaches to a running session's stdio over an HTTP upgrade.
///
/// The client sends `Connection: upgrade` and `Upgrade: banger-attach`. After `101 Switching
/// Protocols` the connection leaves HTTP: both sides speak the agent channel's framing (see the
/// module docs of `http/attach.rs`), which this document does not describe. A refusal before
/// the upgrade is an ordinary `{code, message}` answer.
#[utoipa::path(post, path = "/v1/vms/{vm}/sessions/{session}/attach", tag = "sessions",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("session" = String, Path, description = "name, id or id prefix"), AttachQuery,
        ("Connection" = String, Header, description = "`upgrade`"),
        ("Upgrade" = inline(AttachUpgrade), Header, description = "the protocol to switch to: `banger-attach`")),
    responses(
        (status = 101, description = "switched to `banger-attach`: the stream carries agent frames from here on, outside HTTP",
            headers(("Connection" = String, description = "`upgrade`"), ("Upgrade" = String, description = "`banger-attach`"))),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub async fn attach(
    State(d): State<Arc<Daemon>>,
    params: PathParams<(String, String)>,
    q: QueryParams<AttachQuery>,
    mut req: Request,
) -> Response {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(ATTACH_PROTOCOL));
    if !wants_upgrade {
        return ApiFailure::invalid(format!("attach needs `Connection: upgrade` and `Upgrade: {ATTACH_PROTOCOL}`"))
            .into_response();
    }
    let ((vm, session), q) = match path(params).and_then(|params| Ok((params, query(q)?))) {
        Ok(parsed) => parsed,
        Err(e) => return e.into_response(),
    };
    let (vm, agent, session) = match d.sessions.find(&vm, &session).await {
        Ok(found) => found,
        Err(e) => return ApiFailure::from(e).into_response(),
    };
    let Some(agent) = agent else {
        return ApiFailure::conflict(format!(
            "vm '{}' is not running; its sessions ended with it (see `banger session list {}`)",
            vm.name, vm.name
        ))
        .into_response();
    };
    if session.status.is_terminal() {
        return ApiFailure::conflict(format!(
            "session '{}' has ended ({}); read its output with `banger session logs {} {}`",
            session.name,
            session.status.as_str(),
            vm.name,
            session.name
        ))
        .into_response();
    }
    let request = AgentRequest::Session(SessionOp::Attach { id: session.id.clone(), stdin: q.stdin });
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => relay(TokioIo::new(upgraded), &agent, &request).await,
            Err(e) => tracing::warn!(error = %e, "attach upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, ATTACH_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn send(io: &mut (impl AsyncWrite + Unpin), frame: Frame) -> bool {
    io.write_all(&frame.encode()).await.is_ok() && io.flush().await.is_ok()
}

/// Relays one attach between the client stream `io` and the agent.
async fn relay(mut io: impl AsyncRead + AsyncWrite + Unpin, conn: &AgentConn, request: &AgentRequest) {
    let channel = match conn.open(request).await {
        Ok(c) => c,
        Err(e) => {
            let failure = AgentFailure { message: banger_core::error_chain(&e) };
            let _ = send(&mut io, Frame::json(1, FrameKind::Error, &failure)).await;
            return;
        }
    };
    let mut agent = Closing { channel, done: false };
    // Output is credited back to the guest only once written to the client.
    agent.channel.manual_credit();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = io.read(&mut buf) => {
                let n = match read {
                    // The client went away: detach (the `Closing` drop says so); the session runs on.
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                while let Ok(Some(f)) = decoder.next_frame() {
                    let allowed = [FrameKind::Stdin, FrameKind::Signal, FrameKind::Close];
                    if super::exec::passes(f.kind, &f.payload, &allowed)
                        && agent.channel.send(f.kind, f.payload).is_err()
                    {
                        break;
                    }
                }
            }
            frame = agent.channel.recv() => {
                let Some(mut frame) = frame else {
                    agent.ended();
                    let failure = AgentFailure { message: "the agent connection was lost (did the vm stop?)".into() };
                    let _ = send(&mut io, Frame::json(1, FrameKind::Error, &failure)).await;
                    return;
                };
                let last = matches!(frame.kind, FrameKind::Exit | FrameKind::Error | FrameKind::Close);
                agent.done |= last;
                let streamed = if frame.kind.is_credited() { frame.payload.len() } else { 0 };
                frame.channel = 1;
                if !send(&mut io, frame).await {
                    return;
                }
                agent.channel.consumed(streamed);
                if last {
                    let _ = io.shutdown().await;
                    return;
                }
            }
        }
    }
}
