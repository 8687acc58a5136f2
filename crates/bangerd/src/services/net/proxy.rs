//! The egress name check for HTTP and HTTPS: guests whose policy names hosts have their TCP
//! port 80 and 443 connections redirected (nft `redirect`) to this listener on the bridge
//! address. It reads the original destination (`SO_ORIGINAL_DST`), then at most [`PEEK_MAX`]
//! bytes within [`PEEK_DEADLINE`]: the HTTP `Host` header or the TLS ClientHello's SNI (no TLS
//! interception: the bytes are only looked at). The name must pass the policy, and the address
//! must be one the VM may reach (an address rule, or opened by a DNS answer). Then it connects to
//! the original destination and splices both ways; otherwise the guest gets a TCP reset and the
//! denial is logged. At most [`MAX_CONNECTIONS`] connections are handled at once.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::egress::{Denial, EgressBook};

/// Most bytes read before the name must be known (a ClientHello fits one 16 KiB record).
pub const PEEK_MAX: usize = 16 * 1024 + 5;
/// Time the guest has to send its Host header or ClientHello.
pub const PEEK_DEADLINE: Duration = Duration::from_secs(5);
/// Time allowed to reach the original destination.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Connections handled at once.
pub const MAX_CONNECTIONS: usize = 256;

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet.
    More,
    /// The name sent (`None`: the protocol was recognised but carried none).
    Name(Option<String>),
    /// Neither HTTP nor a TLS ClientHello.
    Unknown,
}

/// The `Host` of an HTTP/1 request head (without its port).
pub fn http_host(data: &[u8]) -> Peek {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if data.len() >= PEEK_MAX { Peek::Unknown } else { Peek::More };
    };
    let Ok(head) = std::str::from_utf8(&data[..end]) else { return Peek::Unknown };
    let host = head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case("host").then(|| value.trim())
    });
    Peek::Name(host.map(|h| {
        let h = h.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(h, |(h, _)| h);
        h.trim_end_matches('.').to_ascii_lowercase()
    }))
}

/// The SNI host name of a TLS ClientHello in its first record.
pub fn tls_sni(data: &[u8]) -> Peek {
    if data.len() < 5 {
        return Peek::More;
    }
    if data[0] != 22 || data[1] != 3 {
        return Peek::Unknown;
    }
    let record_len = usize::from(u16::from_be_bytes([data[3], data[4]]));
    if data.len() < 5 + record_len {
        return Peek::More;
    }
    let hello = &data[5..5 + record_len];
    sni_of(hello).unwrap_or(Peek::Unknown)
}

fn sni_of(h: &[u8]) -> Option<Peek> {
    let take = |p: &mut usize, n: usize| -> Option<std::ops::Range<usize>> {
        let r = *p..p.checked_add(n)?;
        (r.end <= h.len()).then(|| {
            *p = r.end;
            r
        })
    };
    let u16_at = |r: std::ops::Range<usize>| usize::from(u16::from_be_bytes([h[r.start], h[r.start + 1]]));
    let mut p = 0;
    if h.first() != Some(&1) {
        return None;
    }
    take(&mut p, 4)?; // handshake type and length
    take(&mut p, 2 + 32)?; // version, random
    let sid = usize::from(h[take(&mut p, 1)?.start]);
    take(&mut p, sid)?;
    let suites = take(&mut p, 2)?;
    take(&mut p, u16_at(suites))?;
    let comp = usize::from(h[take(&mut p, 1)?.start]);
    take(&mut p, comp)?;
    if p == h.len() {
        return Some(Peek::Name(None));
    }
    let ext_len = take(&mut p, 2)?;
    let end = p.checked_add(u16_at(ext_len))?.min(h.len());
    while p + 4 <= end {
        let kind = u16_at(take(&mut p, 2)?);
        let len = u16_at(take(&mut p, 2)?);
        let body = take(&mut p, len)?;
        if kind == 0 && body.len() >= 5 && h[body.start + 2] == 0 {
            let name_len = usize::from(u16::from_be_bytes([h[body.start + 3], h[body.start + 4]]));
            let name = h.get(body.start + 5..body.start + 5 + name_len)?;
            let name = std::str::from_utf8(name).ok()?;
            return Some(Peek::Name(Some(name.trim_end_matches('.').to_ascii_lowercase())));
        }
    }
    Some(Peek::Name(None))
}

/// Starts the listener on `addr` (port 0: any free port); returns the port and the task.
pub async fn start(addr: Ipv4Addr, book: Arc<EgressBook>) -> std::io::Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind((addr, 0)).await?;
    let port = listener.local_addr()?.port();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                refuse(stream);
                continue;
            };
            let book = Arc::clone(&book);
            tokio::spawn(async move {
                handle(stream, peer, &book).await;
                drop(slot);
            });
        }
    });
    Ok((port, task))
}

/// Closes with a reset (SO_LINGER 0), so the guest's client fails at once.
fn refuse(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

fn original_dst(stream: &TcpStream) -> Option<SocketAddrV4> {
    let addr = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Some(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)))
}

async fn handle(mut guest: TcpStream, peer: SocketAddr, book: &EgressBook) {
    let (SocketAddr::V4(peer), Some(dst)) = (peer, original_dst(&guest)) else { return refuse(guest) };
    let tls = dst.port() == 443;
    let mut buf = Vec::with_capacity(4096);
    let peeked = tokio::time::timeout(PEEK_DEADLINE, async {
        let mut chunk = [0u8; 4096];
        loop {
            let verdict = if tls { tls_sni(&buf) } else { http_host(&buf) };
            if verdict != Peek::More || buf.len() >= PEEK_MAX {
                return verdict;
            }
            let want = chunk.len().min(PEEK_MAX - buf.len());
            match guest.read(&mut chunk[..want]).await {
                Ok(0) | Err(_) => return Peek::Unknown,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .unwrap_or(Peek::Unknown);
    let name = match peeked {
        Peek::Name(name) => name,
        Peek::More | Peek::Unknown => None,
    };
    if let Err(rule) = book.allows_connection(*peer.ip(), *dst.ip(), dst.port(), name.as_deref()) {
        let protocol = if tls { "tls" } else { "http" };
        book.record(
            *peer.ip(),
            Denial { protocol, address: Some(*dst.ip()), port: Some(dst.port()), name, rule, decision: "reset" },
        );
        return refuse(guest);
    }
    let Ok(Ok(mut upstream)) = tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(dst)).await else {
        return refuse(guest);
    };
    if upstream.write_all(&buf).await.is_err() {
        return refuse(guest);
    }
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_hosts_are_read_from_complete_heads_only() {
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHost: Allowed.Test:8080\r\n"), Peek::More);
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: Allowed.Test:8080\r\n\r\n"),
            Peek::Name(Some("allowed.test".into()))
        );
        assert_eq!(http_host(b"GET / HTTP/1.0\r\n\r\n"), Peek::Name(None));
        assert_eq!(http_host(&vec![b'a'; PEEK_MAX]), Peek::Unknown);
    }

    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let n = name.as_bytes();
            let len = u16::try_from(n.len()).expect("len");
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&(len + 5).to_be_bytes());
            ext.extend_from_slice(&(len + 3).to_be_bytes());
            ext.push(0);
            ext.extend_from_slice(&len.to_be_bytes());
            ext.extend_from_slice(n);
        }
        ext.extend_from_slice(&[0, 10, 0, 2, 0, 0]);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&u16::try_from(ext.len()).expect("len").to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&u16::try_from(hs.len()).expect("len").to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn sni_is_read_from_a_client_hello() {
        let hello = client_hello(Some("CDN.test"));
        assert_eq!(tls_sni(&hello), Peek::Name(Some("cdn.test".into())));
        assert_eq!(tls_sni(&hello[..hello.len() - 1]), Peek::More);
        assert_eq!(tls_sni(&client_hello(None)), Peek::Name(None));
        assert_eq!(tls_sni(b"GET / HTTP/1.1\r\n"), Peek::Unknown);
        // Lying lengths inside the record end in Unknown or a name, never a panic.
        let mut bad = client_hello(Some("a.test"));
        for i in 9..bad.len() {
            let saved = bad[i];
            bad[i] = 0xff;
            let _ = tls_sni(&bad);
            bad[i] = saved;
        }
    }
}
