//! What the pages watch live:
//!
//! - `GET /events`: server-sent events, one `fleet` event holding every VM (its view and, while
//!   it runs, its CPU time, memory and uptime) and the running operations; sent at once, then
//!   again whenever it changes (checked every [`TICK`]). A page makes one request for the whole
//!   fleet, however many VMs there are.
//! - `GET /events/vms/{vm}`: the same for one VM (`vm` events: view, stats, console tail, its
//!   running operations); `gone` when it is deleted.
//! - `GET /ws/vms/{vm}/terminal?rows=&cols=&csrf=`: a websocket to a login shell on a guest pty.
//!   Browser → daemon: binary messages are keystrokes, text messages `{"rows":R,"cols":C}`
//!   resize. Daemon → browser: binary messages are the terminal's output, a final text message
//!   `{"exit":CODE}` or `{"error":"..."}`. The shell runs through the exec relay
//!   (`http/exec.rs`) over an in-memory pipe, so guest output is credited back only as the
//!   browser takes it: a slow browser holds the shell back, the daemon buffers at most the
//!   pipe and one frame.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use banger_proto::agent::{AgentFailure, AgentRequest, Decoder, ExecRequest, ExitStatus, Frame, FrameKind, TtySize};
use banger_proto::{OpState, OperationRecord, VmStats, VmView};
use futures_util::stream::Stream;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::Ctx;
use crate::daemon::Daemon;
use crate::http::ApiFailure;

/// How often the streams look for a change.
const TICK: Duration = Duration::from_secs(1);
/// Console lines a VM page shows.
const CONSOLE_TAIL: usize = 200;
/// The in-memory pipe between the websocket and the exec relay.
const PIPE_BYTES: usize = 64 * 1024;
/// The largest message a browser may send (keystrokes, a paste, a resize).
const MAX_MESSAGE: usize = 64 * 1024;

/// One VM as the dashboard shows it.
#[derive(Debug, Serialize)]
struct VmRow {
    #[serde(flatten)]
    view: VmView,
    stats: Option<VmStats>,
}

/// The `fleet` event.
#[derive(Debug, Serialize)]
struct Fleet {
    vms: Vec<VmRow>,
    operations: Vec<OperationRecord>,
}

/// The `vm` event.
#[derive(Debug, Serialize)]
struct OneVm {
    vm: VmRow,
    console: String,
    operations: Vec<OperationRecord>,
}

/// A VM's row: its view, and its resource use while it runs.
async fn row(d: &Daemon, view: VmView) -> VmRow {
    let stats = if view.alive { d.vms.host_stats(&view.record.id).await.ok() } else { None };
    VmRow { view, stats }
}

/// Polled every [`TICK`] by each open page: from memory, never the store's whole history.
fn running_ops(d: &Daemon, target: Option<&str>) -> Vec<OperationRecord> {
    d.fleet
        .ops
        .in_memory()
        .into_iter()
        .map(OperationRecord::from)
        .filter(|op| op.state == OpState::Running && target.is_none_or(|t| op.target == t))
        .collect()
}

/// The fleet now, as JSON.
async fn fleet(d: &Daemon) -> Result<String, String> {
    let views = d.vms.list_views().map_err(|e| format!("cannot list VMs: {e}"))?;
    let mut vms = Vec::with_capacity(views.len());
    for view in views {
        vms.push(row(d, view).await);
    }
    serde_json::to_string(&Fleet { vms, operations: running_ops(d, None) }).map_err(|e| e.to_string())
}

/// One VM now, as JSON; `None` when it is gone.
async fn one_vm(d: &Daemon, reference: &str) -> Result<Option<String>, String> {
    let Ok(record) = d.fleet.store.find_vm(reference) else { return Ok(None) };
    let name = record.name.clone();
    let vm = row(d, d.vms.vm_view(record)).await;
    let console = d.vms.logs(&name, Some(CONSOLE_TAIL)).map(|l| l.text).unwrap_or_default();
    let event = OneVm { vm, console, operations: running_ops(d, Some(&name)) };
    serde_json::to_string(&event).map(Some).map_err(|e| e.to_string())
}

/// A stream of `what` events: `next` is polled every [`TICK`] and sent when it changed;
/// `Ok(None)` ends the stream with a `gone` event.
fn changes<F, Fut>(next: F, what: &'static str) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Option<String>, String>> + Send,
{
    struct Watch<F> {
        next: F,
        last: Option<String>,
        first: bool,
        done: bool,
    }
    let start = Watch { next, last: None, first: true, done: false };
    futures_util::stream::unfold(start, move |mut w| async move {
        if w.done {
            return None;
        }
        loop {
            if !w.first {
                tokio::time::sleep(TICK).await;
            }
            w.first = false;
            match (w.next)().await {
                Ok(Some(json)) if w.last.as_deref() == Some(json.as_str()) => continue,
                Ok(Some(json)) => {
                    let event = Event::default().event(what).data(&json);
                    w.last = Some(json);
                    return Some((Ok(event), w));
                }
                Ok(None) => {
                    w.done = true;
                    return Some((Ok(Event::default().event("gone").data("{}")), w));
                }
                Err(why) => {
                    let data = serde_json::json!({ "error": why }).to_string();
                    return Some((Ok(Event::default().event("problem").data(data)), w));
                }
            }
        }
    })
}

/// `GET /events`.
pub(super) async fn fleet_events(State(ctx): State<Arc<Ctx>>) -> Response {
    let d = ctx.daemon.clone();
    let stream = changes(
        move || {
            let d = d.clone();
            async move { fleet(&d).await.map(Some) }
        },
        "fleet",
    );
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// `GET /events/vms/{vm}`.
pub(super) async fn vm_events(State(ctx): State<Arc<Ctx>>, Path(vm): Path<String>) -> Response {
    let d = ctx.daemon.clone();
    let stream = changes(
        move || {
            let (d, vm) = (d.clone(), vm.clone());
            async move { one_vm(&d, &vm).await }
        },
        "vm",
    );
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct TermQuery {
    rows: Option<u16>,
    cols: Option<u16>,
}

/// The shell a terminal runs: bash when the image has it, else sh; a login shell either way.
const SHELL: &str = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";

/// `GET /ws/vms/{vm}/terminal`.
pub(super) async fn terminal(
    State(ctx): State<Arc<Ctx>>,
    Path(vm): Path<String>,
    q: Result<Query<TermQuery>, QueryRejection>,
    ws: WebSocketUpgrade,
) -> Response {
    let Ok(Query(q)) = q else {
        return ApiFailure::invalid("rows and cols must be numbers of 1 to 4096").into_response();
    };
    let size = TtySize { rows: q.rows.unwrap_or(TtySize::DEFAULT.rows), cols: q.cols.unwrap_or(TtySize::DEFAULT.cols) };
    if let Some(why) = size.check() {
        return ApiFailure::invalid(why).into_response();
    }
    let conn = match ctx.daemon.fleet.running_agent(&vm) {
        Ok((_, conn)) => conn,
        Err(e) => return ApiFailure::from(e).into_response(),
    };
    ws.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE).on_upgrade(move |socket| async move {
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let relay = tokio::spawn(async move { crate::http::exec::relay(theirs, &conn).await });
        bridge(socket, ours, size).await;
        // Our end is dropped: the relay sees EOF and kills a shell still running.
        if let Err(e) = relay.await {
            tracing::warn!(error = %e, "terminal relay failed");
        }
    })
}

/// Why a terminal ended, for the browser.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum End {
    Exit(i32),
    Error(String),
}

/// Moves keystrokes and resizes from `socket` into the exec stream `pipe`, and the shell's
/// output back, until either side ends.
async fn bridge(mut socket: WebSocket, mut pipe: tokio::io::DuplexStream, size: TtySize) {
    let exec = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), SHELL.into()],
        env: vec![("TERM".into(), "xterm-256color".into())],
        cwd: None,
        stdin: true,
        tty: Some(size),
        container: None,
    };
    if pipe.write_all(&Frame::json(1, FrameKind::Request, &AgentRequest::Exec(exec)).encode()).await.is_err() {
        return;
    }
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let end = loop {
        tokio::select! {
            msg = socket.recv() => {
                let frames: Vec<Frame> = match msg {
                    Some(Ok(Message::Binary(keys))) => banger_proto::agent::chunks(&keys)
                        .map(|c| Frame::new(1, FrameKind::Stdin, c.to_vec()))
                        .collect(),
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<TtySize>(text.as_str()) {
                        Ok(size) if size.check().is_none() => vec![Frame::json(1, FrameKind::Resize, &size)],
                        _ => {
                            tracing::debug!("dropped a terminal message that is no size");
                            Vec::new()
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Vec::new(),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                for f in frames {
                    if pipe.write_all(&f.encode()).await.is_err() {
                        return;
                    }
                }
            }
            n = pipe.read(&mut buf) => {
                let n = match n { Ok(0) | Err(_) => break None, Ok(n) => n };
                decoder.push(&buf[..n]);
                let mut ended = None;
                while let Ok(Some(f)) = decoder.next_frame() {
                    if matches!(f.kind, FrameKind::Stdout | FrameKind::Stderr) {
                        if socket.send(Message::Binary(f.payload.into())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    ended = match f.kind {
                        FrameKind::Exit => Some(End::Exit(f.parse::<ExitStatus>("exit").map_or(-1, |s| s.code))),
                        FrameKind::Error => Some(End::Error(
                            f.parse::<AgentFailure>("error").map_or_else(|e| e.to_string(), |a| a.message),
                        )),
                        _ => ended,
                    };
                }
                if ended.is_some() {
                    break ended;
                }
            }
        }
    };
    let end = end.unwrap_or_else(|| End::Error("the terminal's stream ended".into()));
    if let Ok(text) = serde_json::to_string(&end) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}
