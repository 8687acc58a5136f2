//! The file service's streams against fake agents on the real socket: credit follows the
//! consumer of a guest stream (a slow reader holds the guest to one window), and an upload
//! keeps at most [`UPLOAD_WINDOW`] unacknowledged by a guest that does not read on.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use banger_proto::agent::{
    ack_payload, parse_ack, AgentRequest, AgentResponse, Frame, FrameKind, STREAM_CHUNK, WINDOW,
};
use banger_proto::fs::{FileKind, FileStat};
use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::*;
use crate::agent_conn::FrameReader;

/// What a fake agent saw.
#[derive(Default)]
struct Seen {
    /// Streamed bytes it sent (a `read`), or `Data` bytes it received (a `write`).
    bytes: AtomicUsize,
    /// The host sent `Close`.
    closed: AtomicBool,
    /// A `write` may be acknowledged and answered.
    release: AtomicBool,
    /// `Data` of a `write` received and not yet acknowledged.
    unacked: AtomicUsize,
}

/// Serves one connection: a `read` streams `total` bytes within its credit (as the real agent
/// does) then an empty `Data`; a `write` takes `Data` without acknowledging it until
/// `seen.release`, then acknowledges all and answers `Stat`.
async fn fake_agent(listener: UnixListener, total: usize, seen: Arc<Seen>) {
    let Ok((stream, _)) = listener.accept().await else { return };
    let (mut rd, mut wr) = stream.into_split();
    let (out, mut outgoing) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if wr.write_all(&frame.encode()).await.is_err() {
                return;
            }
        }
    });
    // Each channel's credit, as the real agent keeps it.
    let mut credits: std::collections::HashMap<u32, Arc<tokio::sync::Semaphore>> = Default::default();
    let mut frames = FrameReader::new(&mut rd);
    // Acknowledges what a `write` took, once released (the host is stalled by then).
    let ack = |ch: u32, out: &mpsc::UnboundedSender<Frame>, seen: &Seen| {
        let n = seen.unacked.swap(0, Ordering::SeqCst);
        if n > 0 {
            let _ = out.send(Frame::new(ch, FrameKind::Ack, ack_payload(n)));
        }
    };
    while let Some(f) = frames.next().await {
        let ch = f.channel;
        match f.kind {
            FrameKind::Request => match f.parse::<AgentRequest>("request") {
                Ok(AgentRequest::Read { .. }) => {
                    let _ =
                        out.send(Frame::json(ch, FrameKind::Response, &AgentResponse::Opened { size: total as u64 }));
                    let credit =
                        Arc::clone(credits.entry(ch).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(WINDOW))));
                    let (out, seen) = (out.clone(), Arc::clone(&seen));
                    tokio::spawn(async move {
                        let mut left = total;
                        while left > 0 {
                            let n = left.min(STREAM_CHUNK);
                            let n32 = u32::try_from(n).expect("fits");
                            let Ok(permit) = credit.acquire_many(n32).await else { return };
                            permit.forget();
                            seen.bytes.fetch_add(n, Ordering::SeqCst);
                            let _ = out.send(Frame::new(ch, FrameKind::Data, vec![b'x'; n]));
                            left -= n;
                        }
                        let _ = out.send(Frame::new(ch, FrameKind::Data, Vec::new()));
                    });
                }
                Ok(AgentRequest::Write { .. }) => {
                    let (out, seen) = (out.clone(), Arc::clone(&seen));
                    tokio::spawn(async move {
                        until("the release", || seen.release.load(Ordering::SeqCst)).await;
                        ack(ch, &out, &seen);
                    });
                }
                other => panic!("unexpected request {other:?}"),
            },
            FrameKind::Ack => {
                if let Some(credit) = credits.get(&ch) {
                    credit.add_permits(parse_ack(&f.payload).unwrap_or(0));
                }
            }
            FrameKind::Close => seen.closed.store(true, Ordering::SeqCst),
            FrameKind::Data if f.payload.is_empty() => {
                until("the release", || seen.release.load(Ordering::SeqCst)).await;
                ack(ch, &out, &seen);
                let stat = FileStat {
                    path: "/f".into(),
                    kind: FileKind::File,
                    size: seen.bytes.load(Ordering::SeqCst) as u64,
                    mode: 0o644,
                    mtime: 0,
                    link_target: None,
                };
                let _ = out.send(Frame::json(ch, FrameKind::Response, &AgentResponse::Stat(stat)));
            }
            FrameKind::Data => {
                seen.bytes.fetch_add(f.payload.len(), Ordering::SeqCst);
                seen.unacked.fetch_add(f.payload.len(), Ordering::SeqCst);
                // Acknowledged only once released: until then the host must stop at its window.
                if seen.release.load(Ordering::SeqCst) {
                    ack(ch, &out, &seen);
                }
            }
            _ => {}
        }
    }
}

fn target_at(dir: &tempfile::TempDir) -> (Target, UnixListener) {
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    (Target { vm: "t".into(), agent: Arc::new(AgentConn::new(socket)) }, listener)
}

/// Waits (up to 30 s) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_guest_stream_is_credited_only_as_its_consumer_takes_it() {
    const TOTAL: usize = 4 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let (t, listener) = target_at(&dir);
    let seen = Arc::new(Seen::default());
    tokio::spawn(fake_agent(listener, TOTAL, Arc::clone(&seen)));
    let mut channel = open(&t, &AgentRequest::Read { path: "/f".into(), limit: None }).await.expect("open");
    channel.manual_credit();
    let first = first_frame(&t, &mut channel).await.expect("first frame");
    assert!(matches!(answer_of(&t, &first), Ok(AgentResponse::Opened { size }) if size == TOTAL as u64));
    let mut stream = GuestStream::new(t.vm.clone(), channel, None, End::EmptyData, None);

    // Nobody reads: the guest sends one window and no more.
    until("the first window", || seen.bytes.load(Ordering::SeqCst) == WINDOW).await;
    let mut taken = 0usize;
    while let Some(piece) = stream.next().await {
        let piece = piece.expect("data");
        // What the guest sent is never more than what was consumed before this poll, plus a
        // window (the piece just taken is not consumed until the next poll).
        assert!(seen.bytes.load(Ordering::SeqCst) <= taken + WINDOW, "sent past the consumer's credit");
        taken += piece.len();
    }
    assert_eq!(taken, TOTAL);
    assert!(!seen.closed.load(Ordering::SeqCst), "a stream read to its end needs no close");
}

#[tokio::test]
async fn a_stream_cut_by_its_limit_or_dropped_closes_the_channel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (t, listener) = target_at(&dir);
    let seen = Arc::new(Seen::default());
    tokio::spawn(fake_agent(listener, 1 << 20, Arc::clone(&seen)));
    let mut channel = open(&t, &AgentRequest::Read { path: "/f".into(), limit: Some(100) }).await.expect("open");
    channel.manual_credit();
    let _opened = first_frame(&t, &mut channel).await.expect("opened");
    let stream = GuestStream::new(t.vm.clone(), channel, None, End::EmptyData, Some(100));
    let pieces: Vec<_> = stream.collect().await;
    let bytes: usize = pieces.into_iter().map(|p| p.expect("data").len()).sum();
    assert_eq!(bytes, 100, "no more than the limit, whatever the guest sends");
    until("the close", || seen.closed.load(Ordering::SeqCst)).await;
    // A stream its consumer drops half way (the HTTP client went away) closes its channel too.
    seen.closed.store(false, Ordering::SeqCst);
    let mut channel = open(&t, &AgentRequest::Read { path: "/f".into(), limit: None }).await.expect("open");
    channel.manual_credit();
    let _opened = first_frame(&t, &mut channel).await.expect("opened");
    let mut stream = GuestStream::new(t.vm.clone(), channel, None, End::EmptyData, None);
    assert!(stream.next().await.is_some_and(|p| p.is_ok()), "a first piece");
    drop(stream);
    until("the close of a dropped stream", || seen.closed.load(Ordering::SeqCst)).await;
}

#[tokio::test]
async fn an_upload_stops_at_its_window_until_the_guest_acknowledges() {
    const TOTAL: usize = 16 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let (t, listener) = target_at(&dir);
    let seen = Arc::new(Seen::default());
    tokio::spawn(fake_agent(listener, 0, Arc::clone(&seen)));
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let body = futures_util::stream::iter((0..TOTAL / STREAM_CHUNK).map(move |_| {
        counter.fetch_add(STREAM_CHUNK, Ordering::SeqCst);
        Ok::<_, std::io::Error>(vec![b'u'; STREAM_CHUNK])
    }));
    let request = AgentRequest::Write { path: "/f".into(), mode: 0o644, parents: false };
    let upload = tokio::spawn({
        let t = Target { vm: t.vm.clone(), agent: Arc::clone(&t.agent) };
        async move { upload(&t, &request, body).await }
    });
    // The guest acknowledges nothing: the daemon stops pulling the body at its window.
    until("a window in flight", || seen.bytes.load(Ordering::SeqCst) >= UPLOAD_WINDOW).await;
    let (got, took) = (seen.bytes.load(Ordering::SeqCst), pulled.load(Ordering::SeqCst));
    assert!(got <= UPLOAD_WINDOW + STREAM_CHUNK, "the guest got {got} bytes unacknowledged");
    assert!(took <= UPLOAD_WINDOW + 2 * STREAM_CHUNK, "the body was read {took} bytes ahead");
    // Once it acknowledges, the rest flows and the answer comes.
    seen.release.store(true, Ordering::SeqCst);
    let answer = tokio::time::timeout(Duration::from_secs(30), upload).await.expect("in time").expect("task");
    assert!(matches!(answer, Ok(AgentResponse::Stat(ref s)) if s.size == TOTAL as u64), "{answer:?}");
}
