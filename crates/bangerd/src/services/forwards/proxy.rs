//! The forward proxy: listeners on host addresses whose connections are copied both ways to a
//! port in a VM. Each accepted connection opens an [`Upstream`]: TCP to the guest's own address
//! when the VM has one, else a tunnel through its agent (`Tunnel::connect`). An upstream
//! that fails (nothing listening in the guest) resets the client, as a closed port would; so
//! does a guest connection that fails midway. [`Forwarder`] keeps the listeners of running VMs
//! (a leaf lock).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_core::{PortForward, VmRecord};
use banger_proto::ForwardState;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::agent_conn::{AgentConn, AgentError};
use banger_core::error_chain as chain;

/// Copy buffer per direction of a proxied connection.
const COPY_BUF: usize = 64 * 1024;
/// How long a TCP connect to a guest address may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// A host address could not be listened on.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Something else listens there.
    #[error("cannot listen on {addr}: the address is already in use; pick another host port, or stop what listens there (`ss -ltnp 'sport = :{}'` shows it)", .addr.port())]
    InUse {
        /// The address.
        addr: SocketAddr,
    },
    /// A privileged port without the privilege.
    #[error("cannot listen on {addr}: permission denied; host ports below 1024 need root or CAP_NET_BIND_SERVICE, so pick one of 1024 or more")]
    Denied {
        /// The address.
        addr: SocketAddr,
    },
    /// An address no interface has.
    #[error("cannot listen on {addr}: no interface of this host has address {}; use 127.0.0.1 (this host only) or 0.0.0.0 (every interface)", .addr.ip())]
    NoSuchAddress {
        /// The address.
        addr: SocketAddr,
    },
    /// Anything else.
    #[error("cannot listen on {addr}")]
    Other {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Listens on `addr` (with `SO_REUSEADDR`, so connections of an earlier listener lingering in
/// `TIME_WAIT` do not block it). Synchronous; needs a tokio runtime.
pub fn listen(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let classify = |source: io::Error| match source.kind() {
        io::ErrorKind::AddrInUse => ListenError::InUse { addr },
        io::ErrorKind::PermissionDenied => ListenError::Denied { addr },
        io::ErrorKind::AddrNotAvailable => ListenError::NoSuchAddress { addr },
        _ => ListenError::Other { addr, source },
    };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(classify)?;
    socket.set_reuseaddr(true).map_err(classify)?;
    socket.bind(addr).map_err(classify)?;
    socket.listen(1024).map_err(classify)
}

/// A byte stream to the guest.
pub trait GuestStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> GuestStream for T {}

/// Where a forward's connections go.
#[derive(Clone)]
pub enum Upstream {
    /// TCP to this address at the guest port: the guest's own address (or, in tests, a local
    /// server).
    Tcp(IpAddr),
    /// A tunnel through the VM's agent.
    Agent(Arc<AgentConn>),
    /// A networked guest: TCP to its address, and when that is refused (a service listening on
    /// the guest's loopback only), a tunnel through its agent.
    Guest(IpAddr, Arc<AgentConn>),
}

/// An upstream connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP to the guest address failed.
    #[error("cannot connect to {addr}")]
    Tcp {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agent could not open a tunnel.
    #[error("cannot open a tunnel to guest port {port}")]
    Agent {
        /// The guest port.
        port: u16,
        /// Why.
        #[source]
        source: AgentError,
    },
}

impl Upstream {
    /// Opens a connection to `port` in the guest.
    pub async fn open(&self, port: u16) -> Result<Box<dyn GuestStream>, UpstreamError> {
        match self {
            Self::Tcp(ip) => {
                let addr = SocketAddr::new(*ip, port);
                let connect = tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(addr)).await;
                let stream = connect
                    .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
                    .map_err(|source| UpstreamError::Tcp { addr, source })?;
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
            }
            Self::Agent(conn) => match crate::tunnel::Tunnel::connect(conn, port).await {
                Ok(tunnel) => Ok(Box::new(tunnel)),
                Err(source) => Err(UpstreamError::Agent { port, source }),
            },
            Self::Guest(ip, conn) => match Box::pin(Self::Tcp(*ip).open(port)).await {
                Err(UpstreamError::Tcp { source, .. }) if source.kind() == io::ErrorKind::ConnectionRefused => {
                    Box::pin(Self::Agent(Arc::clone(conn)).open(port)).await
                }
                other => other,
            },
        }
    }
}

/// Relays one accepted connection.
async fn relay(mut client: TcpStream, upstream: Upstream, guest_port: u16, vm: Arc<str>) {
    let _ = client.set_nodelay(true);
    let mut guest = match upstream.open(guest_port).await {
        Ok(guest) => guest,
        Err(e) => {
            tracing::info!(vm = %vm, guest_port, error = %chain(&e), "forwarded connection refused");
            // A reset, as if the port were closed.
            let _ = client.set_zero_linger();
            return;
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut guest, COPY_BUF, COPY_BUF).await {
        Ok((to_guest, to_host)) => {
            tracing::debug!(vm = %vm, guest_port, to_guest, to_host, "forwarded connection done")
        }
        Err(e) => {
            tracing::debug!(vm = %vm, guest_port, error = %e, "forwarded connection failed");
            let _ = client.set_zero_linger();
        }
    }
}

/// Accepts on `listener` until aborted; aborting also ends every connection it accepted.
async fn accept_loop(listener: TcpListener, upstream: Upstream, guest_port: u16, vm: Arc<str>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    tracing::debug!(vm = %vm, %peer, guest_port, "forwarded connection");
                    connections.spawn(relay(client, upstream.clone(), guest_port, vm.clone()));
                }
                Err(e) => {
                    // Out of fds or the like: let it pass rather than spin.
                    tracing::warn!(vm = %vm, error = %e, "accepting a forwarded connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Starts serving a bound listener: connections go to `guest_port` through `upstream`.
pub fn serve(listener: TcpListener, upstream: Upstream, guest_port: u16, vm: &str) -> JoinHandle<()> {
    tokio::spawn(accept_loop(listener, upstream, guest_port, Arc::from(vm)))
}

enum Slot {
    Listening(JoinHandle<()>),
    Failed(String),
}

struct Active {
    forward: PortForward,
    slot: Slot,
}

/// The listeners of running VMs, by VM id. A VM has an entry from activation to deactivation,
/// even with no forwards.
#[derive(Default)]
pub struct Forwarder {
    vms: Mutex<HashMap<String, Vec<Active>>>,
}

/// Aborts listener tasks and waits until they are gone, so their ports are free on return.
async fn stop_all(slots: Vec<Active>) {
    for active in slots {
        if let Slot::Listening(task) = active.slot {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Forwarder {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Active>>> {
        self.vms.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `vm_id`'s forwards are active (the VM runs).
    pub fn is_active(&self, vm_id: &str) -> bool {
        self.map().contains_key(vm_id)
    }

    /// Listens for every forward of a running VM; a forward that cannot bind is kept as failed
    /// (and logged). Replaces what was active for the VM.
    pub async fn activate(&self, vm: &VmRecord, forwards: &[PortForward], upstream: &Upstream) {
        self.deactivate(&vm.id).await;
        let active = forwards
            .iter()
            .map(|forward| {
                let slot = match listen(forward.host_socket()) {
                    Ok(listener) => {
                        tracing::info!(vm = %vm.name, forward = %forward.describe(&vm.name), "forward listening");
                        Slot::Listening(serve(listener, upstream.clone(), forward.guest_port, &vm.name))
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm.name, error = %e, "forward cannot listen");
                        Slot::Failed(e.to_string())
                    }
                };
                Active { forward: *forward, slot }
            })
            .collect();
        self.map().insert(vm.id.clone(), active);
    }

    /// Adds a listening forward to an active VM.
    pub fn insert(&self, vm_id: &str, forward: PortForward, task: JoinHandle<()>) {
        let mut map = self.map();
        match map.get_mut(vm_id) {
            Some(list) => list.push(Active { forward, slot: Slot::Listening(task) }),
            // Deactivated meanwhile (cannot happen under the VM lock): do not leak the listener.
            None => task.abort(),
        }
    }

    /// Stops one forward's listener.
    pub async fn remove(&self, vm_id: &str, forward: &PortForward) {
        let removed = {
            let mut map = self.map();
            let Some(list) = map.get_mut(vm_id) else { return };
            let (gone, kept) = std::mem::take(list).into_iter().partition(|a| a.forward == *forward);
            *list = kept;
            gone
        };
        stop_all(removed).await;
    }

    /// Stops every listener of a VM.
    pub async fn deactivate(&self, vm_id: &str) {
        let removed = self.map().remove(vm_id).unwrap_or_default();
        stop_all(removed).await;
    }

    /// Whether `forward` of `vm_id` listens now, and why not when it failed.
    pub fn state(&self, vm_id: &str, forward: &PortForward) -> (ForwardState, Option<String>) {
        let map = self.map();
        let found = map.get(vm_id).and_then(|list| list.iter().find(|a| a.forward == *forward));
        match found.map(|a| &a.slot) {
            Some(Slot::Listening(_)) => (ForwardState::Listening, None),
            Some(Slot::Failed(why)) => (ForwardState::Failed, Some(why.clone())),
            None => (ForwardState::Inactive, None),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// An echo server on 127.0.0.1 that upper-cases, and closes its side after the client's EOF.
    pub(crate) async fn echo_server() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if s.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                            return;
                        }
                    }
                    let _ = s.write_all(b"|BYE").await;
                });
            }
        });
        port
    }

    async fn proxy_to(port: u16) -> (SocketAddr, JoinHandle<()>) {
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("addr");
        (addr, serve(listener, Upstream::Tcp("127.0.0.1".parse().expect("ip")), port, "test"))
    }

    #[tokio::test]
    async fn bytes_and_half_closes_cross_the_proxy() {
        let (addr, task) = proxy_to(echo_server().await).await;
        let mut clients = Vec::new();
        for i in 0..5u8 {
            clients.push(tokio::spawn(async move {
                let mut c = TcpStream::connect(addr).await.expect("connect");
                let payload: Vec<u8> = (0..200_000u32).map(|n| b'a' + ((n + u32::from(i)) % 26) as u8).collect();
                c.write_all(&payload).await.expect("write");
                c.shutdown().await.expect("half-close");
                let mut back = Vec::new();
                c.read_to_end(&mut back).await.expect("read");
                let mut want = payload.to_ascii_uppercase();
                want.extend_from_slice(b"|BYE");
                assert!(back == want, "client {i}: {} bytes back", back.len());
            }));
        }
        for c in clients {
            c.await.expect("client");
        }
        task.abort();
        let _ = task.await;
        assert!(TcpStream::connect(addr).await.is_err(), "an aborted forward no longer listens");
    }

    #[tokio::test]
    async fn an_upstream_that_refuses_resets_the_client() {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
        let (addr, _task) = proxy_to(closed).await;
        let mut c = TcpStream::connect(addr).await.expect("the host side accepts");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("not hung");
        match read {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            Ok(n) => assert_eq!(n, 0, "no bytes from a refused upstream"),
        }
    }

    #[tokio::test]
    async fn binding_errors_name_the_address_and_the_fix() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let err = listen(addr).expect_err("in use");
        assert!(matches!(err, ListenError::InUse { .. }));
        let message = err.to_string();
        assert!(message.starts_with(&format!("cannot listen on {addr}: the address is already in use")), "{message}");
        assert!(message.contains(&format!("sport = :{}", addr.port())), "{message}");
        let err = listen("192.0.2.1:8080".parse().expect("addr")).expect_err("not ours");
        assert!(err.to_string().contains("no interface of this host has address 192.0.2.1"), "{err}");
    }

    pub(crate) fn test_vm() -> VmRecord {
        VmRecord {
            id: "f00df00df00df00d".into(),
            name: "web".into(),
            spec: banger_core::VmSpec {
                image: "i".into(),
                kernel: "k".into(),
                vcpus: 1,
                memory_mib: 256,
                disk_mib: 256,
                vmm: banger_core::config::VmmKind::Qemu,
                network: true,
                allow_vm_traffic: false,
            },
            desired_state: banger_core::DesiredState::Running,
            state: banger_core::ObservedState::Running,
            guest_ip: None,
            vm_dir: "/nonexistent".into(),
            created_at: String::new(),
            updated_at: String::new(),
            last_error: None,
        }
    }

    #[tokio::test]
    async fn the_forwarder_tracks_listening_and_failed_forwards_and_frees_ports() {
        let echo = echo_server().await;
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let free = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free").port();
        let good = PortForward::tcp("127.0.0.1".parse().expect("ip"), free, echo);
        let bad = PortForward::tcp("127.0.0.1".parse().expect("ip"), held.local_addr().expect("addr").port(), echo);
        let vm = test_vm();
        let f = Forwarder::default();
        assert_eq!(f.state(&vm.id, &good), (ForwardState::Inactive, None));
        let upstream = Upstream::Tcp("127.0.0.1".parse().expect("ip"));
        f.activate(&vm, &[good, bad], &upstream).await;
        assert!(f.is_active(&vm.id));
        assert_eq!(f.state(&vm.id, &good).0, ForwardState::Listening);
        let (state, why) = f.state(&vm.id, &bad);
        assert_eq!(state, ForwardState::Failed);
        assert!(why.is_some_and(|w| w.contains("already in use")));
        let mut c = TcpStream::connect(good.host_socket()).await.expect("connect");
        c.write_all(b"hi").await.expect("write");
        c.shutdown().await.expect("eof");
        let mut back = String::new();
        c.read_to_string(&mut back).await.expect("read");
        assert_eq!(back, "HI|BYE");
        // Activating again replaces the listeners; the port is rebound at once.
        f.activate(&vm, &[good], &upstream).await;
        assert_eq!(f.state(&vm.id, &good).0, ForwardState::Listening);
        f.remove(&vm.id, &good).await;
        assert_eq!(f.state(&vm.id, &good).0, ForwardState::Inactive);
        listen(good.host_socket()).expect("a removed forward's port is free at once");
        f.deactivate(&vm.id).await;
        assert!(!f.is_active(&vm.id));
    }
}
