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
    match tokio::time::timeout(MEMINFO_TIMEOUT, read_meminfo(agent)).await {
        Ok(Some(text)) => parse(&text),
        Ok(None) => None,
        Err(_) => {
            tracing::debug!("the guest's /proc/meminfo did not come within {MEMINFO_TIMEOUT:?}");
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
    use super::*;

    #[test]
    fn parses_total_and_available() {
        let text = "MemTotal:         493256 kB\nMemFree:          400000 kB\nMemAvailable:     431220 kB\n";
        assert_eq!(parse(text), Some(GuestMemInfo { total_kib: 493_256, available_kib: 431_220 }));
        assert_eq!(parse("MemTotal: 1 kB\n"), None, "both or nothing");
        assert_eq!(parse("MemTotal: lots\nMemAvailable: 1 kB\n"), None);
        assert_eq!(parse(""), None);
    }
}
