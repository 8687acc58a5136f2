//! Hostile agents on the real socket: peers that speak the real framing but ignore credit,
//! send frames over the size limit, or fill the daemon with what nobody reads. Each test
//! checks that the offending channel is closed, that what the daemon holds stays bounded, and
//! that other channels and other VMs go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_proto::agent::{
    parse_ack, AgentRequest, AgentResponse, ExecRequest, ExitStatus, Frame, FrameKind, MAX_PAYLOAD, WINDOW,
};
use banger_vmm::AgentEndpoint;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::{AgentConn, Channel, FrameReader, Limits};

/// Bytes a flood sends.
const FLOOD: usize = 256 << 20;

/// What the hostile agent saw and did.
#[derive(Default)]
struct Seen {
    /// Bytes it flooded.
    flooded: AtomicUsize,
    /// Channels the host closed.
    closes: std::sync::Mutex<Vec<u32>>,
    /// The oversize frame has been sent whole.
    oversize_sent: std::sync::atomic::AtomicBool,
}

fn exec(argv: &str) -> AgentRequest {
    AgentRequest::Exec(ExecRequest { argv: vec![argv.into()], ..Default::default() })
}

/// Serves one connection. An exec's `argv[0]` picks the behaviour:
/// - `flood`: maximal `Stdout` frames, ignoring credit, until [`FLOOD`] bytes;
/// - `oversize`: one frame claiming 64 MiB (its bytes follow), then `Exit`;
/// - `chatter`: maximal `Response` frames (control frames need no credit), until [`FLOOD`];
/// - `window`: exactly one window of `Stdout`, then nothing;
/// - anything else: three windows of `Stdout` within the host's credit, then `Exit`.
async fn hostile_agent(stream: UnixStream, seen: Arc<Seen>) {
    let (mut rd, mut wr) = stream.into_split();
    let (out, mut outgoing) = mpsc::channel::<Vec<u8>>(4);
    tokio::spawn(async move {
        while let Some(bytes) = outgoing.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    // Polite channels: bytes still to send, bytes in flight.
    let mut polite: std::collections::HashMap<u32, (usize, usize)> = Default::default();
    let mut frames = FrameReader::new(&mut rd);
    while let Some(f) = frames.next().await {
        let ch = f.channel;
        match (f.kind, f.parse::<AgentRequest>("request")) {
            (FrameKind::Request, Ok(AgentRequest::Exec(req))) => {
                let started = Frame::json(ch, FrameKind::Response, &AgentResponse::Started { pid: ch });
                let _ = out.send(started.encode()).await;
                let (out, seen) = (out.clone(), Arc::clone(&seen));
                match req.argv[0].as_str() {
                    "flood" | "chatter" => {
                        let kind = if req.argv[0] == "flood" { FrameKind::Stdout } else { FrameKind::Response };
                        let frame = Frame::new(ch, kind, vec![b'z'; MAX_PAYLOAD]).encode();
                        tokio::spawn(async move {
                            // Until FLOOD bytes (so that later frames are not interleaved).
                            while seen.flooded.load(Ordering::SeqCst) < FLOOD && out.send(frame.clone()).await.is_ok() {
                                seen.flooded.fetch_add(MAX_PAYLOAD, Ordering::SeqCst);
                            }
                        });
                    }
                    "oversize" => {
                        tokio::spawn(async move {
                            let len = 64u32 << 20;
                            let mut header = len.to_be_bytes().to_vec();
                            header.extend_from_slice(&ch.to_be_bytes());
                            header.push(FrameKind::Stdout as u8);
                            let _ = out.send(header).await;
                            let mut left = usize::try_from(len).unwrap_or(0) - 5;
                            while left > 0 {
                                let n = left.min(MAX_PAYLOAD);
                                if out.send(vec![b'o'; n]).await.is_err() {
                                    return;
                                }
                                seen.flooded.fetch_add(n, Ordering::SeqCst);
                                left -= n;
                            }
                            let exit = Frame::json(ch, FrameKind::Exit, &ExitStatus { code: 0, signal: None });
                            let _ = out.send(exit.encode()).await;
                            seen.oversize_sent.store(true, Ordering::SeqCst);
                        });
                    }
                    "window" => {
                        for _ in 0..WINDOW / (64 * 1024) {
                            let _ = out.send(Frame::new(ch, FrameKind::Stdout, vec![b'w'; 64 * 1024]).encode()).await;
                        }
                    }
                    _ => {
                        let state = polite.entry(ch).or_insert((3 * WINDOW, 0));
                        send_polite(&out, ch, state).await;
                    }
                }
            }
            (FrameKind::Ack, _) => {
                if let (Some(state), Some(n)) = (polite.get_mut(&ch), parse_ack(&f.payload)) {
                    state.1 = state.1.saturating_sub(n);
                    send_polite(&out, ch, state).await;
                }
            }
            (FrameKind::Close, _) => seen.closes.lock().expect("closes").push(ch),
            _ => {}
        }
    }
}

/// Sends a polite channel's output while it has credit; `Exit` once all is sent.
async fn send_polite(out: &mpsc::Sender<Vec<u8>>, ch: u32, state: &mut (usize, usize)) {
    while state.0 > 0 && state.1.saturating_add(64 * 1024) <= WINDOW {
        let _ = out.send(Frame::new(ch, FrameKind::Stdout, vec![b'p'; 64 * 1024]).encode()).await;
        state.0 -= 64 * 1024;
        state.1 += 64 * 1024;
    }
    if state.0 == 0 && state.1 != usize::MAX {
        state.1 = usize::MAX; // done: nothing more, ever
        let _ = out.send(Frame::json(ch, FrameKind::Exit, &ExitStatus { code: 0, signal: None }).encode()).await;
    }
}

struct Vm {
    conn: AgentConn,
    seen: Arc<Seen>,
    _dir: tempfile::TempDir,
}

fn vm(limits: Limits) -> Vm {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let seen = Arc::new(Seen::default());
    let theirs = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(hostile_agent(stream, Arc::clone(&theirs)));
        }
    });
    Vm { conn: AgentConn::with_limits(AgentEndpoint::Unix(path), limits), seen, _dir: dir }
}

/// Reads `channel` to its end: (streamed bytes, the final frame's kind and payload text).
async fn drain(channel: &mut Channel) -> (usize, FrameKind, String) {
    let mut bytes = 0;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), channel.recv())
            .await
            .expect("the channel ends in time")
            .expect("the connection stays up");
        match frame.kind {
            FrameKind::Stdout | FrameKind::Stderr | FrameKind::Data => bytes += frame.payload.len(),
            FrameKind::Exit | FrameKind::Error => {
                return (bytes, frame.kind, String::from_utf8_lossy(&frame.payload).into_owned())
            }
            _ => {}
        }
    }
}

/// This process's resident set, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS");
    kb * 1024
}

async fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_ignores_credit_loses_its_channel_and_nothing_else() {
    let hostile = vm(Limits::default());
    let other = vm(Limits::default());
    let rss_before = rss();

    let mut flood = hostile.conn.open(&exec("flood")).await.expect("open");
    let (bytes, kind, text) = drain(&mut flood).await;
    assert_eq!((bytes, kind), (0, FrameKind::Error), "a maximal frame is over the window: {text}");
    assert!(text.contains("ignores flow control") && text.contains("banger closed the channel"), "{text}");
    wait_until("the agent to be told", Duration::from_secs(10), || {
        hostile.seen.closes.lock().expect("closes").contains(&flood.id())
    })
    .await;

    // The flood goes on at the socket; the daemon drops it as it comes. Meanwhile a polite
    // channel of the same VM and an exec on another VM both work.
    let mut polite = hostile.conn.open(&exec("polite")).await.expect("open polite");
    let mut elsewhere = other.conn.open(&exec("polite")).await.expect("open elsewhere");
    assert_eq!(drain(&mut polite).await.0, 3 * WINDOW);
    assert_eq!(drain(&mut elsewhere).await.0, 3 * WINDOW);
    wait_until("the flood sent", Duration::from_secs(60), || hostile.seen.flooded.load(Ordering::SeqCst) >= FLOOD)
        .await;
    let grown = rss().saturating_sub(rss_before);
    assert!(grown < 64 << 20, "the daemon grew by {grown} bytes while 256 MiB were flooded at it");
    assert!(hostile.conn.buffered() <= WINDOW, "held {}", hostile.conn.buffered());

    // A frame over the size limit: skipped as it streams in, never buffered; its channel closed.
    let mut oversize = hostile.conn.open(&exec("oversize")).await.expect("open oversize");
    let (_, kind, text) = drain(&mut oversize).await;
    assert_eq!(kind, FrameKind::Error);
    assert!(text.contains("over the limit"), "{text}");
    // (The fake agent's frames must not land inside the oversize one's bytes.)
    wait_until("the oversize frame sent", Duration::from_secs(60), || {
        hostile.seen.oversize_sent.load(Ordering::SeqCst)
    })
    .await;
    assert!(hostile.conn.buffered() <= WINDOW, "held {}", hostile.conn.buffered());
    let mut after = hostile.conn.open(&exec("polite")).await.expect("open after");
    assert_eq!(drain(&mut after).await.0, 3 * WINDOW, "the stream stays in step after an oversize frame");
}

#[tokio::test]
async fn control_floods_and_the_vm_cap_close_channels_and_release_what_they_held() {
    // Room for three windows and their small `Started` answers.
    let limits = Limits { vm_buffer: 3 * WINDOW + 4096, ..Limits::default() };
    let v = vm(limits);
    // Nobody reads these: each holds its window.
    let mut full = Vec::new();
    for _ in 0..3 {
        full.push(v.conn.open(&exec("window")).await.expect("open"));
    }
    wait_until("three windows held", Duration::from_secs(10), || v.conn.buffered() >= 3 * WINDOW).await;
    let mut over = v.conn.open(&exec("window")).await.expect("open");
    let (_, kind, text) = drain(&mut over).await;
    assert_eq!(kind, FrameKind::Error);
    assert!(text.contains("pass the cap"), "{text}");
    assert!(v.conn.buffered() <= limits.vm_buffer, "held {}", v.conn.buffered());
    drop(full);
    wait_until("the dropped channels' bytes released", Duration::from_secs(10), || v.conn.buffered() < 64 * 1024).await;

    // Control frames need no credit, but only MAX_PAYLOAD of them wait per channel.
    let mut chatter = v.conn.open(&exec("chatter")).await.expect("open");
    let id = chatter.id();
    // Nobody reads it until the daemon has closed it.
    wait_until("the chatter closed", Duration::from_secs(10), || v.seen.closes.lock().expect("closes").contains(&id))
        .await;
    let (_, kind, text) = loop {
        let f = tokio::time::timeout(Duration::from_secs(30), chatter.recv()).await.expect("in time").expect("up");
        if f.kind == FrameKind::Error {
            break ((), f.kind, String::from_utf8_lossy(&f.payload).into_owned());
        }
    };
    assert_eq!(kind, FrameKind::Error);
    assert!(text.contains("control frames"), "{text}");
    drop(chatter);
    assert!(v.conn.buffered() < 64 * 1024, "held {}", v.conn.buffered());
}
