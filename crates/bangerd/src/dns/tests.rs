//! The DNS server's unit tests, on loopback.
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
    let len = tokio::time::timeout(TEST_TIMEOUT, socket.recv(&mut buf)).await.expect("answer in time").expect("recv");
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
    let expected: Vec<SocketAddr> =
        ["127.0.0.53:53", "192.0.2.1:53", "[2001:db8::1]:53", "192.0.2.2:53"].map(|s| s.parse().expect("addr")).into();
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
