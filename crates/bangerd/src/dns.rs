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
        let handler = Handler {
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
        Ok(Self { zone, gate, server, local_addr })
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
                match self.forward(request, query).await {
                    Ok(upstream) => {
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
mod tests {
    use super::*;

    use hickory_server::proto::op::Query;
    use std::time::Instant as StdInstant;

    /// Upper bound for any single test exchange, so a bug fails a test instead of hanging it.
    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    fn loopback() -> SocketAddr {
        (Ipv4Addr::LOCALHOST, 0).into()
    }

    fn records(entries: &[(&str, [u8; 4])]) -> BTreeMap<String, Ipv4Addr> {
        entries.iter().map(|(name, ip)| ((*name).to_owned(), Ipv4Addr::from(*ip))).collect()
    }

    async fn start(domain: &str, upstreams: Vec<SocketAddr>) -> DnsServer {
        let config = DnsConfig { domain: domain.to_owned(), ..DnsConfig::new(loopback(), upstreams) };
        DnsServer::start(config).await.expect("start dns server")
    }

    fn query(name: &str, record_type: RecordType) -> Message {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).expect("query name"), record_type));
        message
    }

    async fn ask_udp_raw(server: SocketAddr, message: &Message) -> Message {
        let socket = UdpSocket::bind(loopback()).await.expect("bind client");
        socket.connect(server).await.expect("connect");
        socket.send(&message.to_vec().expect("encode")).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let len =
            tokio::time::timeout(TEST_TIMEOUT, socket.recv(&mut buf)).await.expect("answer in time").expect("recv");
        let answer = Message::from_vec(&buf[..len]).expect("decode answer");
        assert_eq!(answer.metadata.id, message.metadata.id);
        answer
    }

    async fn udp(server: SocketAddr, name: &str, record_type: RecordType) -> Message {
        ask_udp_raw(server, &query(name, record_type)).await
    }

    async fn tcp(server: SocketAddr, name: &str, record_type: RecordType) -> Message {
        let message = query(name, record_type);
        let answer = tokio::time::timeout(TEST_TIMEOUT, ask_tcp(server, &message.to_vec().expect("encode")))
            .await
            .expect("answer in time")
            .expect("tcp exchange");
        assert_eq!(answer.metadata.id, message.metadata.id);
        answer
    }

    fn addresses(answer: &Message) -> Vec<Ipv4Addr> {
        answer
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn known_name_resolves_over_udp_and_tcp_case_insensitively() {
        let server = start("vm", vec![]).await;
        server.set_records(records(&[("web", [192, 0, 2, 5]), ("Mixed", [192, 0, 2, 6])]));
        let addr = server.local_addr();

        let answer = udp(addr, "web.vm.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.metadata.authoritative);
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 5)]);
        assert_eq!(answer.answers[0].ttl, RECORD_TTL);

        let answer = tcp(addr, "WEB.Vm", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 5)]);
        assert_eq!(answer.answers[0].name.to_ascii(), "WEB.Vm.", "the answer keeps the asker's case");

        let answer = udp(addr, "mixed.VM", RecordType::A).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 6)], "map keys are case-insensitive too");
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn unknown_names_are_nxdomain_and_other_types_empty() {
        let server = start("vm.", vec![]).await;
        server.set_records(records(&[("web", [192, 0, 2, 5])]));
        let addr = server.local_addr();

        for name in ["nope.vm.", "a.web.vm."] {
            let answer = udp(addr, name, RecordType::A).await;
            assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(answer.metadata.authoritative, "{name}");
            assert!(answer.answers.is_empty(), "{name}");
        }
        let answer = tcp(addr, "nope.vm.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);

        for record_type in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            let answer = udp(addr, "web.vm.", record_type).await;
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError, "{record_type}");
            assert!(answer.answers.is_empty(), "{record_type}");
        }
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn set_records_replaces_the_whole_map() {
        let server = start("vm", vec![]).await;
        let addr = server.local_addr();
        server.set_records(records(&[("web", [192, 0, 2, 5])]));
        assert_eq!(addresses(&udp(addr, "web.vm", RecordType::A).await), [Ipv4Addr::new(192, 0, 2, 5)]);

        server.set_records(records(&[("db", [192, 0, 2, 9])]));
        let answer = udp(addr, "web.vm", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain, "a removed name is gone");
        assert_eq!(addresses(&udp(addr, "db.vm", RecordType::A).await), [Ipv4Addr::new(192, 0, 2, 9)]);

        server.set_records(BTreeMap::new());
        let answer = udp(addr, "db.vm", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn foreign_names_are_forwarded_to_the_upstream() {
        let upstream = start("up", vec![]).await;
        upstream.set_records(records(&[("x", [192, 0, 2, 7])]));
        let server = start("vm", vec![upstream.local_addr()]).await;
        server.set_records(records(&[("web", [192, 0, 2, 5])]));
        let addr = server.local_addr();

        let answer = udp(addr, "x.up.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 7)]);
        assert!(!answer.metadata.authoritative, "forwarded answers are not ours");
        assert!(answer.metadata.recursion_available);

        let answer = tcp(addr, "X.UP", RecordType::A).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 7)]);

        let answer = udp(addr, "missing.up.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain, "the upstream's NXDOMAIN is passed on");

        let answer = udp(addr, "web.vm.", RecordType::A).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 5)], "own names are still served");

        server.shutdown().await.expect("shutdown");
        upstream.shutdown().await.expect("shutdown upstream");
    }

    #[tokio::test]
    async fn refused_upstream_is_skipped_for_the_next() {
        let closed = {
            let socket = UdpSocket::bind(loopback()).await.expect("bind");
            socket.local_addr().expect("local addr")
        };
        let upstream = start("up", vec![]).await;
        upstream.set_records(records(&[("x", [192, 0, 2, 7])]));
        let server = start("vm", vec![closed, upstream.local_addr()]).await;

        let started = StdInstant::now();
        let answer = udp(server.local_addr(), "x.up.", RecordType::A).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 7)]);
        assert!(started.elapsed() < Duration::from_millis(900), "took {:?}", started.elapsed());
        server.shutdown().await.expect("shutdown");
        upstream.shutdown().await.expect("shutdown upstream");
    }

    /// An upstream that answers every UDP query truncated and the TCP retry in full.
    async fn truncating_upstream(answer_addr: Ipv4Addr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let udp = UdpSocket::bind(loopback()).await.expect("bind udp");
        let addr = udp.local_addr().expect("local addr");
        let tcp = TcpListener::bind(addr).await.expect("bind tcp on the same port");
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let (len, from) = udp.recv_from(&mut buf).await.expect("udp query");
            let query = Message::from_vec(&buf[..len]).expect("decode udp query");
            let mut truncated = Message::response(query.metadata.id, OpCode::Query);
            truncated.metadata.truncation = true;
            truncated.add_queries(query.queries.clone());
            udp.send_to(&truncated.to_vec().expect("encode"), from).await.expect("udp answer");

            let (mut stream, _) = tcp.accept().await.expect("tcp retry");
            let len = stream.read_u16().await.expect("length");
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await.expect("tcp query");
            let query = Message::from_vec(&buf).expect("decode tcp query");
            let mut full = Message::response(query.metadata.id, OpCode::Query);
            full.add_queries(query.queries.clone());
            let name = query.queries[0].name().clone();
            full.add_answer(Record::from_rdata(name, 60, RData::A(A(answer_addr))));
            let bytes = full.to_vec().expect("encode");
            let len = u16::try_from(bytes.len()).expect("short answer");
            stream.write_all(&len.to_be_bytes()).await.expect("write length");
            stream.write_all(&bytes).await.expect("write answer");
        });
        (addr, task)
    }

    #[tokio::test]
    async fn truncated_upstream_answer_is_retried_over_tcp() {
        let (upstream, fake) = truncating_upstream(Ipv4Addr::new(192, 0, 2, 8)).await;
        let server = start("vm", vec![upstream]).await;
        let answer = udp(server.local_addr(), "big.example.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(!answer.metadata.truncation);
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 8)]);
        tokio::time::timeout(TEST_TIMEOUT, fake).await.expect("fake upstream done").expect("fake upstream ok");
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn silent_upstream_gives_servfail_within_the_budget() {
        let silent = UdpSocket::bind(loopback()).await.expect("bind silent upstream");
        let server = start("vm", vec![silent.local_addr().expect("local addr")]).await;

        let started = StdInstant::now();
        let answer = udp(server.local_addr(), "example.com.", RecordType::A).await;
        let elapsed = started.elapsed();
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert!(elapsed < Duration::from_millis(2500), "took {elapsed:?}");
        assert!(elapsed >= Duration::from_millis(1500), "gave up too early: {elapsed:?}");

        let mut buf = [0u8; 512];
        let (len, _) = silent.try_recv_from(&mut buf).expect("the upstream was asked");
        let asked = Message::from_vec(&buf[..len]).expect("decode forwarded query");
        assert_eq!(asked.queries[0].name().to_ascii(), "example.com.");
        assert!(asked.metadata.recursion_desired);
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn no_upstream_gives_servfail_at_once() {
        let server = start("vm", vec![]).await;
        let started = StdInstant::now();
        let answer = tcp(server.local_addr(), "example.com.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn edns_queries_get_edns_answers() {
        let server = start("vm", vec![]).await;
        server.set_records(records(&[("web", [192, 0, 2, 5])]));
        let mut message = query("web.vm.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        message.set_edns(edns);
        let answer = ask_udp_raw(server.local_addr(), &message).await;
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 5)]);
        assert_eq!(answer.edns.as_ref().map(Edns::max_payload), Some(1232));
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn shutdown_frees_both_sockets() {
        let server = start("vm", vec![]).await;
        let addr = server.local_addr();
        server.shutdown().await.expect("shutdown");
        UdpSocket::bind(addr).await.expect("udp port free again");
        TcpListener::bind(addr).await.expect("tcp port free again");
    }

    #[tokio::test]
    async fn dropping_frees_both_sockets() {
        let server = start("vm", vec![]).await;
        let addr = server.local_addr();
        drop(server);
        // The aborted tasks drop their sockets when the runtime next runs them.
        let deadline = StdInstant::now() + TEST_TIMEOUT;
        loop {
            let udp = UdpSocket::bind(addr).await;
            let tcp = TcpListener::bind(addr).await;
            if udp.is_ok() && tcp.is_ok() {
                break;
            }
            assert!(StdInstant::now() < deadline, "sockets still bound: udp {udp:?}, tcp {tcp:?}");
            drop((udp, tcp));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn busy_address_error_names_it() {
        let taken = UdpSocket::bind(loopback()).await.expect("bind");
        let addr = taken.local_addr().expect("local addr");
        let error = DnsServer::start(DnsConfig::new(addr, vec![])).await.expect_err("address in use");
        assert!(matches!(error, DnsError::Bind { transport: "udp", addr: a, .. } if a == addr), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(&format!("another DNS server already listens on {addr}")), "{message}");
    }

    #[tokio::test]
    async fn bad_domains_are_refused() {
        for domain in ["", ".", "  "] {
            let config = DnsConfig { domain: domain.to_owned(), ..DnsConfig::new(loopback(), vec![]) };
            let error = DnsServer::start(config).await.expect_err("empty domain");
            assert!(matches!(error, DnsError::EmptyDomain), "{domain:?}: {error:?}");
        }
        let config = DnsConfig { domain: "a..b".to_owned(), ..DnsConfig::new(loopback(), vec![]) };
        let error = DnsServer::start(config).await.expect_err("bad domain");
        assert!(matches!(error, DnsError::InvalidDomain { .. }), "{error:?}");
    }

    #[test]
    fn zone_lookup_rules() {
        let zone = Zone { domain: parse_domain("vm").expect("domain"), records: RwLock::default() };
        *zone.records.write().expect("lock") = Arc::new(records(&[("web", [192, 0, 2, 5])]));
        let name = |s: &str| LowerName::from(Name::from_ascii(s).expect("name"));
        assert_eq!(zone.lookup(&name("web.vm."), RecordType::A), Lookup::Address(Ipv4Addr::new(192, 0, 2, 5)));
        assert_eq!(zone.lookup(&name("Web.VM."), RecordType::ANY), Lookup::Address(Ipv4Addr::new(192, 0, 2, 5)));
        assert_eq!(zone.lookup(&name("web.vm."), RecordType::AAAA), Lookup::NoData);
        assert_eq!(zone.lookup(&name("vm."), RecordType::A), Lookup::NoData);
        assert_eq!(zone.lookup(&name("db.vm."), RecordType::A), Lookup::NxDomain);
        assert_eq!(zone.lookup(&name("x.web.vm."), RecordType::A), Lookup::NxDomain);
        assert_eq!(zone.lookup(&name("web.vm.example."), RecordType::A), Lookup::Foreign);
        assert_eq!(zone.lookup(&name("notvm."), RecordType::A), Lookup::Foreign);
        assert_eq!(zone.lookup(&name("example.com."), RecordType::A), Lookup::Foreign);
    }

    #[test]
    fn host_upstreams_reads_nameservers() {
        let resolv_conf = "\
# Generated by NetworkManager
search example.internal
nameserver 127.0.0.53
; nameserver 192.0.2.99
nameserver\t192.0.2.1   # trailing comment
nameserver 2001:db8::1
nameserver fe80::1%eth0
nameserver 192.0.2.1
nameserver
nameserver not-an-address
  nameserver 192.0.2.2
nameserver 172.30.0.1
options edns0 trust-ad
";
        let exclude = [IpAddr::V4(Ipv4Addr::new(172, 30, 0, 1))];
        let upstreams = host_upstreams(resolv_conf, &exclude);
        let expected: Vec<SocketAddr> = ["127.0.0.53:53", "192.0.2.1:53", "[2001:db8::1]:53", "192.0.2.2:53"]
            .map(|s| s.parse().expect("addr"))
            .into();
        assert_eq!(upstreams, expected);
        assert!(host_upstreams("", &[]).is_empty());
        assert!(host_upstreams("search vm\noptions ndots:1\n", &[]).is_empty());
    }

    #[tokio::test]
    async fn only_guests_get_answers_under_the_guest_policy() {
        let config = DnsConfig { clients: Clients::Guests, ..DnsConfig::new(loopback(), vec![]) };
        let server = DnsServer::start(config).await.expect("start");
        let guest = Ipv4Addr::new(127, 0, 0, 2);
        server.set_records(records(&[("web", [192, 0, 2, 5]), ("me", guest.octets())]));
        let stranger = UdpSocket::bind(loopback()).await.expect("bind stranger");
        stranger.connect(server.local_addr()).await.expect("connect");
        stranger.send(&query("web.vm.", RecordType::A).to_vec().expect("encode")).await.expect("send");
        // A guest asks after the stranger and is answered...
        let socket = UdpSocket::bind((guest, 0)).await.expect("bind guest");
        socket.connect(server.local_addr()).await.expect("connect");
        let mine = query("web.vm.", RecordType::A);
        socket.send(&mine.to_vec().expect("encode")).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let len = tokio::time::timeout(TEST_TIMEOUT, socket.recv(&mut buf)).await.expect("in time").expect("recv");
        let answer = Message::from_vec(&buf[..len]).expect("decode");
        assert_eq!(answer.metadata.id, mine.metadata.id);
        assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 5)]);
        // ...while the stranger never is (a bounded look: an answer, however late, fails it).
        let late = tokio::time::timeout(Duration::from_millis(300), stranger.recv(&mut buf)).await;
        assert!(late.is_err(), "a non-guest address got an answer");
    }

    #[tokio::test]
    async fn other_names_are_refused_when_forwarding_is_off() {
        let upstream = loopback();
        let config = DnsConfig { forward: false, ..DnsConfig::new(loopback(), vec![upstream]) };
        let server = DnsServer::start(config).await.expect("start");
        server.set_records(records(&[("web", [192, 0, 2, 5])]));
        let answer = udp(server.local_addr(), "example.org.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
        assert!(!answer.metadata.recursion_available);
        assert_eq!(addresses(&udp(server.local_addr(), "web.vm.", RecordType::A).await), [Ipv4Addr::new(192, 0, 2, 5)]);
    }
}
