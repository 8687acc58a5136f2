//! The guest's own view of its memory for `vm stats`: `MemTotal` and `MemAvailable` of its
//! `/proc/meminfo`, read through the agent's `read` channel. The guest is untrusted: at most
//! [`MEMINFO_CAP`] bytes are taken (the agent is asked for no more, and more is not kept),
//! within [`MEMINFO_TIMEOUT`]; anything else reads as "no figure".

use std::time::Duration;

use banger_proto::agent::{AgentRequest, AgentResponse, FrameKind};

use crate::agent_conn::AgentConn;

/// The most bytes of `/proc/meminfo` taken from the guest (a real one is ~1.5 KB).
pub const MEMINFO_CAP: usize = 16 * 1024;
/// How long the read may take.
pub const MEMINFO_TIMEOUT: Duration = Duration::from_secs(3);

/// The guest's memory as it sees it, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMemInfo {
    /// `MemTotal`.
    pub total_kib: u64,
    /// `MemAvailable`.
    pub available_kib: u64,
}

/// Reads the guest's `/proc/meminfo` through `agent`; `None` when it cannot (no agent, a
/// timeout, a malformed answer).
pub async fn guest_meminfo(agent: &AgentConn) -> Option<GuestMemInfo> {
    guest_meminfo_within(agent, MEMINFO_TIMEOUT).await
}

async fn guest_meminfo_within(agent: &AgentConn, timeout: Duration) -> Option<GuestMemInfo> {
    match tokio::time::timeout(timeout, read_meminfo(agent)).await {
        Ok(Some(text)) => parse(&text),
        Ok(None) => None,
        Err(_) => {
            tracing::debug!("the guest's /proc/meminfo did not come within {timeout:?}");
            None
        }
    }
}

async fn read_meminfo(agent: &AgentConn) -> Option<String> {
    let limit = Some(MEMINFO_CAP as u64);
    let mut channel = agent.open(&AgentRequest::Read { path: "/proc/meminfo".into(), limit }).await.ok()?;
    let mut bytes = Vec::new();
    while let Some(frame) = channel.recv().await {
        match frame.kind {
            FrameKind::Response => match serde_json::from_slice::<AgentResponse>(&frame.payload).ok()? {
                AgentResponse::Opened { .. } => {}
                _ => return None,
            },
            FrameKind::Data if frame.payload.is_empty() => break,
            FrameKind::Data => {
                let room = MEMINFO_CAP.saturating_sub(bytes.len());
                bytes.extend_from_slice(&frame.payload[..frame.payload.len().min(room)]);
                if bytes.len() >= MEMINFO_CAP {
                    break;
                }
            }
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text.
pub fn parse(text: &str) -> Option<GuestMemInfo> {
    let field = |name: &str| -> Option<u64> {
        let value = text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    };
    Some(GuestMemInfo { total_kib: field("MemTotal")?, available_kib: field("MemAvailable")? })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use banger_proto::agent::{parse_ack, Frame, STREAM_CHUNK, WINDOW};
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::UnixListener;

    use super::*;
    use crate::agent_conn::FrameReader;

    /// A hostile guest: answers a `read` with a valid head, then streams without end (within
    /// the credit the host grants, as it must, or the host would close the connection); or,
    /// when `silent`, opens the stream and sends nothing. Counts the bytes it sent.
    async fn hostile_agent(listener: UnixListener, silent: bool, sent: Arc<AtomicUsize>) {
        let Ok((stream, _)) = listener.accept().await else { return };
        let (mut rd, mut wr) = stream.into_split();
        let mut frames = FrameReader::new(&mut rd);
        let Some(request) = frames.next().await else { return };
        let ch = request.channel;
        let opened = Frame::json(ch, FrameKind::Response, &AgentResponse::Opened { size: 0 });
        if wr.write_all(&opened.encode()).await.is_err() || silent {
            // Keep the connection open and quiet.
            while frames.next().await.is_some() {}
            return;
        }
        let mut credit = WINDOW;
        let mut head = b"MemTotal: 1000 kB\nMemAvailable: 500 kB\n".to_vec();
        loop {
            while credit >= STREAM_CHUNK {
                let mut chunk = std::mem::take(&mut head);
                chunk.resize(STREAM_CHUNK, b'x');
                if wr.write_all(&Frame::new(ch, FrameKind::Data, chunk).encode()).await.is_err() {
                    return;
                }
                sent.fetch_add(STREAM_CHUNK, Ordering::SeqCst);
                credit -= STREAM_CHUNK;
            }
            match frames.next().await {
                Some(f) if f.kind == FrameKind::Ack => credit += parse_ack(&f.payload).unwrap_or(0),
                Some(_) => {}
                None => return,
            }
        }
    }

    fn agent_at(dir: &tempfile::TempDir) -> (AgentConn, UnixListener) {
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        (AgentConn::new(socket), listener)
    }

    #[tokio::test]
    async fn an_endless_meminfo_is_cut_at_the_cap_and_the_guest_held_to_its_credit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (agent, listener) = agent_at(&dir);
        let sent = Arc::new(AtomicUsize::new(0));
        tokio::spawn(hostile_agent(listener, false, Arc::clone(&sent)));
        let info = guest_meminfo_within(&agent, Duration::from_secs(60)).await;
        assert_eq!(info, Some(GuestMemInfo { total_kib: 1000, available_kib: 500 }));
        // The host took one chunk past its cap at most and granted credit for no more.
        assert!(
            sent.load(Ordering::SeqCst) <= MEMINFO_CAP + WINDOW + STREAM_CHUNK,
            "sent {}",
            sent.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn a_silent_guest_gives_no_figure_within_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (agent, listener) = agent_at(&dir);
        tokio::spawn(hostile_agent(listener, true, Arc::new(AtomicUsize::new(0))));
        assert_eq!(guest_meminfo_within(&agent, Duration::from_millis(300)).await, None);
    }

    #[test]
    fn parses_total_and_available() {
        let text = "MemTotal:         493256 kB\nMemFree:          400000 kB\nMemAvailable:     431220 kB\n";
        assert_eq!(parse(text), Some(GuestMemInfo { total_kib: 493_256, available_kib: 431_220 }));
        assert_eq!(parse("MemTotal: 1 kB\n"), None, "both or nothing");
        assert_eq!(parse("MemTotal: lots\nMemAvailable: 1 kB\n"), None);
        assert_eq!(parse(""), None);
    }
}
