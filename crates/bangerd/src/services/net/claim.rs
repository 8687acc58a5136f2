//! One daemon's guest network per network namespace. The bridge, the `bgpool*` TAPs, the
//! `inet banger` table and the DNS port on the bridge address are names every daemon in a
//! namespace would share, so the first daemon to bring its network up claims the namespace:
//! it binds an abstract unix socket (abstract socket names are per network namespace and vanish
//! with their owner, even on `kill -9`) and answers every connection with its state dir. A
//! second daemon in the same namespace is refused with that state dir in the message; run it
//! in a namespace of its own (`ip netns exec`) instead.

use std::io::Read as _;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;

/// The abstract socket name of the claim.
pub const CLAIM_NAME: &str = "banger/guest-network";

/// Why the namespace could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another daemon owns it.
    #[error("another bangerd (state dir {owner}) runs guests in this network namespace; stop it (`banger --state-dir {owner} daemon stop`) or run this daemon in a network namespace of its own (`ip netns exec NAME bangerd ...`)")]
    Taken {
        /// The owner's state dir, as it says.
        owner: String,
    },
    /// The socket could not be made.
    #[error("cannot claim the network namespace for banger's guest network")]
    Io(#[source] std::io::Error),
}

/// The claim, held while the network is up; dropping it releases the name.
#[derive(Debug)]
pub struct Claim {
    answerer: JoinHandle<()>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.answerer.abort();
    }
}

/// Claims this network namespace for the daemon of `state_dir` under `name` (tests pass their
/// own; the daemon uses [`CLAIM_NAME`]).
pub fn claim(name: &str, state_dir: &Path) -> Result<Claim, ClaimError> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(ClaimError::Io)?;
    match UnixListener::bind_addr(&addr) {
        Ok(listener) => {
            listener.set_nonblocking(true).map_err(ClaimError::Io)?;
            let listener = tokio::net::UnixListener::from_std(listener).map_err(ClaimError::Io)?;
            let answer = state_dir.display().to_string();
            let answerer = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt as _;
                        let mut stream = stream;
                        let _ = stream.write_all(format!("{answer}\n").as_bytes()).await;
                    });
                }
            });
            Ok(Claim { answerer })
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(ClaimError::Taken { owner: owner(&addr) }),
        Err(e) => Err(ClaimError::Io(e)),
    }
}

/// What the owner of the claim at `addr` says its state dir is (bounded: one short line).
fn owner(addr: &SocketAddr) -> String {
    let asked = || -> std::io::Result<String> {
        let mut stream = UnixStream::connect_addr(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = Vec::new();
        std::io::Read::take(&mut stream, 4096).read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).trim().to_owned())
    };
    match asked() {
        Ok(dir) if !dir.is_empty() && !dir.contains('\0') => PathBuf::from(dir).display().to_string(),
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_in_one_namespace_names_the_owner_and_a_dropped_one_is_free() {
        let name = format!("banger-test/claim-{}-{}", std::process::id(), banger_core::new_id());
        let first = claim(&name, Path::new("/var/lib/first")).expect("first claim");
        let second = tokio::task::spawn_blocking({
            let name = name.clone();
            move || claim(&name, Path::new("/var/lib/second"))
        })
        .await
        .expect("join");
        let e = second.expect_err("taken");
        assert!(matches!(&e, ClaimError::Taken { owner } if owner == "/var/lib/first"), "{e}");
        assert!(e.to_string().contains("ip netns exec"), "{e}");
        drop(first);
        tokio::task::yield_now().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match claim(&name, Path::new("/var/lib/second")) {
                Ok(_) => break,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "still taken: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
