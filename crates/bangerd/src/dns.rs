//! Guest DNS: answers `NAME.<domain>` from the running VMs' addresses and forwards every other
//! question to the configured upstreams (the host's resolvers by default; none when forwarding
//! is off, and then other names are REFUSED).
//!
//! Clients: the daemon binds both sockets to the bridge device (`SO_BINDTODEVICE`), so only what
//! arrives on the bridge is read, and answers only the addresses of running guests (`gate`),
//! each within a query rate and a cap on its forwarded questions in flight. Anything else gets
//! no answer.
//!
//! Protocol: plain DNS (RFC 1035) over UDP and TCP on one address, normally the bridge gateway.
//! Names under the domain are answered authoritatively from an in-memory map (A records with a
//! 5 s TTL, NXDOMAIN for an unknown VM, an empty NOERROR for other record types). Any other
//! question is asked again of the upstreams, in order, over UDP (over TCP when the UDP answer is
//! truncated), within a 2 s budget; when no upstream answers in time the guest gets SERVFAIL.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::net::NetError;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::A;
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::proto::ProtoError;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub mod egress;
mod gate;
use gate::Gate;
pub use gate::{Clients, Limits};

/// The domain VM names live under when the configuration does not choose one: `NAME.vm`.
pub const DEFAULT_DOMAIN: &str = "vm";

/// TTL of the answers for VM names, in seconds: short, since VMs come and go.
pub const RECORD_TTL: u32 = 5;

/// Time allowed to all the upstreams together before the guest gets SERVFAIL. Guest resolvers
/// retry on their own, so failing fast beats making them wait for their own timeout.
const FORWARD_BUDGET: Duration = Duration::from_secs(2);

/// Forwarded questions in flight at once; past this a guest gets SERVFAIL at once rather than
/// the daemon running out of file descriptors.
const MAX_FORWARDS_IN_FLIGHT: usize = 256;

/// EDNS payload size advertised upstream: the DNS flag day 2020 value, which avoids IP
/// fragmentation.
const UPSTREAM_PAYLOAD: u16 = 1232;

/// Largest DNS message over UDP we read from an upstream.
const UDP_RECEIVE_BUFFER: usize = 4096;

/// A guest TCP connection that sends no request for this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Responses queued per guest TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

/// Tries at finding a port free for both UDP and TCP when the configuration asks for port 0.
const EPHEMERAL_BIND_TRIES: u32 = 8;

/// What the DNS server serves and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Address for both the UDP socket and the TCP listener (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Domain the VM names live under, without the VM name: "vm" serves `NAME.vm`.
    pub domain: String,
    /// Resolvers that answer every other name, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Whether other names are forwarded at all; when not, they are REFUSED.
    pub forward: bool,
    /// Read only what arrives on this device (`SO_BINDTODEVICE`), when set.
    pub device: Option<String>,
    /// Whom to answer.
    pub clients: Clients,
    /// Per-client limits.
    pub limits: Limits,
}

impl DnsConfig {
    /// A configuration serving [`DEFAULT_DOMAIN`] on `listen` to anyone, forwarding to
    /// `upstreams`.
    pub fn new(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            listen,
            domain: DEFAULT_DOMAIN.to_owned(),
            upstreams,
            forward: true,
            device: None,
            clients: Clients::Any,
            limits: Limits::default(),
        }
    }
}

/// Why the DNS server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The domain is not a valid DNS name.
    #[error("invalid DNS domain '{domain}'")]
    InvalidDomain {
        /// The domain as configured.
        domain: String,
        /// What the parser objected to.
        #[source]
        source: ProtoError,
    },
    /// The domain is empty, which would make every name a VM name.
    #[error("the DNS domain is empty; set it to a name such as '{DEFAULT_DOMAIN}'")]
    EmptyDomain,
    /// A socket could not be bound.
    #[error("cannot listen for DNS over {transport}: {hint}")]
    Bind {
        /// "udp" or "tcp".
        transport: &'static str,
        /// The address that failed.
        addr: SocketAddr,
        /// What to do about it, naming the address.
        hint: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The sockets could not be bound to the bridge device.
    #[error("cannot bind the DNS sockets to device `{device}` (SO_BINDTODEVICE needs root or CAP_NET_RAW)")]
    Device {
        /// The device.
        device: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The bound socket's address could not be read back.
    #[error("cannot read the address of the DNS socket")]
    LocalAddr(#[source] io::Error),
    /// A server task failed before or while shutting down.
    #[error("the DNS server stopped with an error")]
    Stopped(#[source] NetError),
}

/// Why a forwarded question got no answer; logged, and the guest gets SERVFAIL.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("no upstream DNS server is configured")]
    NoUpstreams,
    #[error("too many forwarded questions in flight")]
    Busy,
    #[error("this client has too many forwarded questions in flight")]
    ClientBusy,
    #[error("cannot encode the upstream query")]
    Encode(#[source] ProtoError),
    #[error("upstream {upstream} did not answer in time")]
    Timeout { upstream: SocketAddr },
    #[error("upstream {upstream} over {transport} failed")]
    Io {
        upstream: SocketAddr,
        transport: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("upstream {upstream} sent an answer that does not match the question over tcp")]
    Mismatch { upstream: SocketAddr },
}

/// The running DNS server: a UDP socket and a TCP listener on one address, each served by a task.
///
/// Dropping it aborts the tasks, which frees the sockets; [`DnsServer::shutdown`] does the same
/// and waits for it.
pub struct DnsServer {
    egress: Arc<std::sync::OnceLock<Arc<dyn egress::EgressGate>>>,
    zone: Arc<Zone>,
    gate: Arc<Gate>,
    server: Server<Handler>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").field("local_addr", &self.local_addr).field("zone", &self.zone).finish()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `config.listen` and starts serving, with no VM names yet.
    pub async fn start(config: DnsConfig) -> Result<Self, DnsError> {
        let domain = parse_domain(&config.domain)?;
        let (udp, tcp, local_addr) = bind(config.listen).await?;
        if let Some(device) = &config.device {
            for fd in [udp.as_raw_fd(), tcp.as_raw_fd()] {
                bind_to_device(fd, device).map_err(|source| DnsError::Device { device: device.clone(), source })?;
            }
        }
        let upstreams: Vec<SocketAddr> = config
            .upstreams
            .into_iter()
            .filter(|upstream| {
                let is_self = *upstream == local_addr;
                if is_self {
                    tracing::warn!(%upstream, "ignoring the DNS server's own address as an upstream");
                }
                !is_self
            })
            .collect();
        let upstreams = if config.forward { upstreams } else { Vec::new() };
        if !config.forward {
            tracing::info!(%local_addr, "DNS forwarding is off; guests can only resolve VM names");
        } else if upstreams.is_empty() {
            tracing::warn!(%local_addr, "no upstream DNS server; guests can only resolve VM names");
        }
        let zone = Arc::new(Zone { domain, records: RwLock::new(Arc::default()) });
        let gate = Arc::new(Gate::new(config.clients, config.limits));
        let egress = Arc::new(std::sync::OnceLock::new());
        let handler = Handler {
            egress: Arc::clone(&egress),
            zone: Arc::clone(&zone),
            gate: Arc::clone(&gate),
            upstreams,
            forward: config.forward,
            forward_slots: Semaphore::new(MAX_FORWARDS_IN_FLIGHT),
        };
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        tracing::info!(%local_addr, domain = %zone.domain, "DNS server listening");
        Ok(Self { egress, zone, gate, server, local_addr })
    }

    /// The address actually bound, for both UDP and TCP (useful when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces every VM name at once: `records` maps VM names (without the domain) to their
    /// addresses, which are also the clients answered under [`Clients::Guests`]. Names are
    /// matched case-insensitively.
    pub fn set_records(&self, records: BTreeMap<String, Ipv4Addr>) {
        self.gate.set_guests(records.values().map(|ip| IpAddr::V4(*ip)).collect());
        let records: BTreeMap<String, Ipv4Addr> =
            records.into_iter().map(|(name, addr)| (name.to_ascii_lowercase(), addr)).collect();
        tracing::debug!(count = records.len(), "DNS records replaced");
        *self.zone.records.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(records);
    }

    /// Puts foreign names under `gate` (egress policies); once only, later calls are ignored.
    pub fn set_egress(&self, gate: Arc<dyn egress::EgressGate>) {
        let _ = self.egress.set(gate);
    }

    /// Stops the tasks and waits until both sockets are closed.
    pub async fn shutdown(mut self) -> Result<(), DnsError> {
        let result = self.server.shutdown_gracefully().await.map_err(DnsError::Stopped);
        tracing::info!(local_addr = %self.local_addr, "DNS server stopped");
        result
    }
}

/// Parses resolv.conf text and returns its nameservers on port 53, in order, without duplicates
/// and without the `exclude`d addresses (the daemon's own listen address, to avoid a loop).
/// Addresses that do not parse, such as link-local ones with a `%zone`, are skipped.
pub fn host_upstreams(resolv_conf: &str, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    let mut upstreams = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        let Ok(ip) = word.parse::<IpAddr>() else {
            tracing::debug!(nameserver = word, "skipping a resolv.conf nameserver that is not a plain address");
            continue;
        };
        let upstream = SocketAddr::new(ip, 53);
        if !exclude.contains(&ip) && !upstreams.contains(&upstream) {
            upstreams.push(upstream);
        }
    }
    upstreams
}

fn parse_domain(domain: &str) -> Result<LowerName, DnsError> {
    let trimmed = domain.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(DnsError::EmptyDomain);
    }
    let name = Name::from_ascii(format!("{trimmed}."))
        .map_err(|source| DnsError::InvalidDomain { domain: domain.to_owned(), source })?;
    Ok(LowerName::from(name))
}

/// Binds the UDP socket, then TCP on the same port. With port 0 the UDP port may be taken for TCP,
/// so that case tries again with another port.
async fn bind(listen: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), DnsError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let udp = UdpSocket::bind(listen).await.map_err(|source| bind_error("udp", listen, source))?;
        let addr = udp.local_addr().map_err(DnsError::LocalAddr)?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp, addr)),
            Err(e) if listen.port() == 0 && e.kind() == io::ErrorKind::AddrInUse && tries < EPHEMERAL_BIND_TRIES => {
                tracing::debug!(%addr, "ephemeral DNS port taken for tcp; trying another");
            }
            Err(source) => return Err(bind_error("tcp", addr, source)),
        }
    }
}

fn bind_error(transport: &'static str, addr: SocketAddr, source: io::Error) -> DnsError {
    let hint = match source.kind() {
        io::ErrorKind::AddrInUse => format!(
            "another DNS server already listens on {addr} (dnsmasq? systemd-resolved? another bangerd?); \
             stop it or give banger another bridge address"
        ),
        io::ErrorKind::PermissionDenied => {
            format!("binding {addr} needs root or CAP_NET_BIND_SERVICE for ports below 1024")
        }
        io::ErrorKind::AddrNotAvailable => {
            format!("{} is not an address of this host; is the bridge up?", addr.ip())
        }
        _ => format!("cannot bind {addr}"),
    };
    DnsError::Bind { transport, addr, hint, source }
}

/// `SO_BINDTODEVICE`: the socket reads only what arrives on `device`.
fn bind_to_device(fd: std::os::fd::RawFd, device: &str) -> io::Result<()> {
    let name = std::ffi::CString::new(device).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = name.as_bytes_with_nul();
    let len = nix::libc::socklen_t::try_from(bytes.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the call; the
    // option value points at `len` readable bytes of a NUL-terminated name that outlives it.
    let rc = unsafe {
        nix::libc::setsockopt(fd, nix::libc::SOL_SOCKET, nix::libc::SO_BINDTODEVICE, bytes.as_ptr().cast(), len)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The VM names: the domain and the current name -> address map.
#[derive(Debug)]
struct Zone {
    domain: LowerName,
    /// Swapped whole by `set_records`; readers clone the `Arc` and never hold the lock long.
    records: RwLock<Arc<BTreeMap<String, Ipv4Addr>>>,
}

/// What the zone says about a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Not under the domain: ask upstream.
    Foreign,
    /// A VM's address.
    Address(Ipv4Addr),
    /// The name exists but has no record of the asked type.
    NoData,
    /// No such VM.
    NxDomain,
}

impl Zone {
    fn lookup(&self, name: &LowerName, record_type: RecordType) -> Lookup {
        if !self.domain.zone_of(name) {
            return Lookup::Foreign;
        }
        match name.num_labels().saturating_sub(self.domain.num_labels()) {
            0 => Lookup::NoData,
            1 => {
                let Some(label) = name.iter().next() else { return Lookup::NxDomain };
                let label = String::from_utf8_lossy(label).to_ascii_lowercase();
                let records = Arc::clone(&self.records.read().unwrap_or_else(PoisonError::into_inner));
                match records.get(&label) {
                    Some(addr) if matches!(record_type, RecordType::A | RecordType::ANY) => Lookup::Address(*addr),
                    Some(_) => Lookup::NoData,
                    None => Lookup::NxDomain,
                }
            }
            _ => Lookup::NxDomain,
        }
    }
}

/// hickory's request handler: the zone for VM names, the upstreams for the rest.
struct Handler {
    egress: Arc<std::sync::OnceLock<Arc<dyn egress::EgressGate>>>,
    zone: Arc<Zone>,
    gate: Arc<Gate>,
    upstreams: Vec<SocketAddr>,
    forward: bool,
    forward_slots: Semaphore,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response: R) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        if !self.gate.admit(request.src().ip(), std::time::Instant::now()) {
            // No answer at all (not even REFUSED): nothing to reflect or amplify.
            tracing::trace!(src = %request.src(), "DNS question not admitted");
            metadata.response_code = ResponseCode::Refused;
            return ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() });
        }
        let edns = response_edns(request);
        metadata.recursion_available = self.forward;
        if request.metadata.op_code != OpCode::Query {
            metadata.response_code = ResponseCode::NotImp;
            return send(request, edns.as_ref(), metadata, &[], &[], &[], response).await;
        }
        let [query] = request.queries.queries() else {
            metadata.response_code = ResponseCode::FormErr;
            return send(request, edns.as_ref(), metadata, &[], &[], &[], response).await;
        };

        metadata.authoritative = true;
        match self.zone.lookup(query.name(), query.query_type()) {
            Lookup::Address(addr) => {
                let answer = Record::from_rdata(query.original().name().clone(), RECORD_TTL, RData::A(A(addr)));
                send(request, edns.as_ref(), metadata, &[answer], &[], &[], response).await
            }
            Lookup::NoData => send(request, edns.as_ref(), metadata, &[], &[], &[], response).await,
            Lookup::NxDomain => {
                metadata.response_code = ResponseCode::NXDomain;
                send(request, edns.as_ref(), metadata, &[], &[], &[], response).await
            }
            Lookup::Foreign if !self.forward => {
                metadata.authoritative = false;
                metadata.recursion_available = false;
                metadata.response_code = ResponseCode::Refused;
                send(request, edns.as_ref(), metadata, &[], &[], &[], response).await
            }
            Lookup::Foreign => {
                metadata.authoritative = false;
                let client = request.src().ip();
                let gate = self.egress.get();
                let name = query.name().to_string();
                if gate.is_some_and(|g| !g.allows_name(client, &name)) {
                    // At once, so the guest's lookup fails now rather than after its timeout.
                    metadata.response_code = ResponseCode::Refused;
                    return send(request, edns.as_ref(), metadata, &[], &[], &[], response).await;
                }
                match self.forward(request, query).await {
                    Ok(upstream) => {
                        if let Some(gate) = gate {
                            gate.opened(client, &name, egress::answered_addresses(&upstream)).await;
                        }
                        metadata.response_code = upstream.metadata.response_code;
                        metadata.authentic_data = upstream.metadata.authentic_data;
                        if u16::from(metadata.response_code) > 0x0f && edns.is_none() {
                            // An extended code cannot be said without EDNS.
                            metadata.response_code = ResponseCode::ServFail;
                        }
                        let Message { answers, authorities, additionals, .. } = upstream;
                        send(request, edns.as_ref(), metadata, &answers, &authorities, &additionals, response).await
                    }
                    Err(error) => {
                        tracing::debug!(name = %query.name(), query_type = %query.query_type(), %error,
                            "forwarding failed; answering SERVFAIL");
                        metadata.response_code = ResponseCode::ServFail;
                        send(request, edns.as_ref(), metadata, &[], &[], &[], response).await
                    }
                }
            }
        }
    }
}

impl Handler {
    /// Asks the upstreams in order, sharing [`FORWARD_BUDGET`] among those not yet tried.
    async fn forward(&self, request: &Request, query: &LowerQuery) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let _client_slot = self.gate.forward_slot(request.src().ip()).ok_or(ForwardError::ClientBusy)?;
        let _slot = self.forward_slots.try_acquire().map_err(|_| ForwardError::Busy)?;

        let mut upstream_query = Message::query();
        upstream_query.metadata.recursion_desired = true;
        upstream_query.metadata.checking_disabled = request.metadata.checking_disabled;
        upstream_query.add_query(query.original().clone());
        let mut edns = Edns::new();
        edns.set_max_payload(UPSTREAM_PAYLOAD);
        edns.set_dnssec_ok(request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok));
        upstream_query.set_edns(edns);
        let bytes = upstream_query.to_vec().map_err(ForwardError::Encode)?;
        let expected = Expected { id: upstream_query.metadata.id, query };

        let deadline = Instant::now() + FORWARD_BUDGET;
        let mut last_error = ForwardError::NoUpstreams;
        for (index, &upstream) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let untried = u32::try_from(self.upstreams.len() - index).unwrap_or(u32::MAX);
            let share = left / untried;
            match tokio::time::timeout(share, ask(upstream, &bytes, &expected)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(error)) => last_error = error,
                Err(_) => last_error = ForwardError::Timeout { upstream },
            }
            tracing::debug!(%upstream, error = %last_error, "upstream DNS server failed");
        }
        Err(last_error)
    }
}

/// What an upstream answer must match: our query id and the question.
struct Expected<'q> {
    id: u16,
    query: &'q LowerQuery,
}

impl Expected<'_> {
    fn matches(&self, answer: &Message) -> bool {
        answer.metadata.id == self.id
            && answer.metadata.message_type == MessageType::Response
            && match answer.queries.as_slice() {
                [q] => {
                    LowerName::from(q.name()) == *self.query.name()
                        && q.query_type() == self.query.query_type()
                        && q.query_class() == self.query.query_class()
                }
                _ => false,
            }
    }
}

/// One upstream: UDP, then TCP if the UDP answer was truncated.
async fn ask(upstream: SocketAddr, query: &[u8], expected: &Expected<'_>) -> Result<Message, ForwardError> {
    let answer = ask_udp(upstream, query, expected).await.map_err(|source| ForwardError::Io {
        upstream,
        transport: "udp",
        source,
    })?;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    let answer =
        ask_tcp(upstream, query).await.map_err(|source| ForwardError::Io { upstream, transport: "tcp", source })?;
    if expected.matches(&answer) {
        Ok(answer)
    } else {
        Err(ForwardError::Mismatch { upstream })
    }
}

async fn ask_udp(upstream: SocketAddr, query: &[u8], expected: &Expected<'_>) -> io::Result<Message> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected, so the kernel drops datagrams from anyone else and reports ICMP refusals.
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; UDP_RECEIVE_BUFFER];
    loop {
        let len = socket.recv(&mut buf).await?;
        match Message::from_vec(buf.get(..len).unwrap_or_default()) {
            Ok(answer) if expected.matches(&answer) => return Ok(answer),
            Ok(_) => tracing::debug!(%upstream, "ignoring an upstream answer to another question"),
            Err(error) => tracing::debug!(%upstream, %error, "ignoring a malformed upstream answer"),
        }
    }
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Message> {
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query longer than 65535 bytes"))?;
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Message::from_vec(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Our EDNS for the response: present only when the guest used EDNS, echoing its payload size
/// (so hickory truncates UDP answers to what the guest accepts) and DO bit.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|theirs| {
        let mut ours = Edns::new();
        ours.set_max_payload(theirs.max_payload().max(512));
        ours.set_dnssec_ok(theirs.flags().dnssec_ok);
        ours
    })
}

async fn send<R: ResponseHandler>(
    request: &Request,
    edns: Option<&Edns>,
    metadata: Metadata,
    answers: &[Record],
    authorities: &[Record],
    additionals: &[Record],
    mut response: R,
) -> ResponseInfo {
    let message = MessageResponseBuilder::new(&request.queries, edns).build(
        metadata,
        answers.iter(),
        authorities.iter(),
        std::iter::empty(),
        additionals.iter(),
    );
    match response.send_response(message).await {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(src = %request.src(), %error, "cannot send a DNS response");
            let mut failed = metadata;
            failed.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata: failed, counts: HeaderCounts::default() })
        }
    }
}

#[cfg(test)]
mod tests;
