//! `banger_host::net` against the real kernel, in a private network namespace per test: bridge,
//! pooled TAPs, the nft ruleset, teardown, and the pooled-vs-cold TAP timing.
//!
//! How the namespace is made: the test re-runs this binary with `--exact <test>` and
//! [`CHILD_ENV`] set; the child `unshare(CLONE_NEWNET)`s its test thread, checks that it really
//! left the host's namespace, and does everything (netlink socket, `/dev/net/tun`, `nft`) from
//! that thread on a current-thread runtime. The namespace has no reference outside the child, so
//! the kernel deletes it, with any interface or table left in it, when the child exits — even
//! on a panic or a kill. The tests still tear down and check that nothing is left.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_core::net::{is_banger_tap, tap_name, IfName, Subnet};
use banger_host::net::{
    create_attached_tap, ensure_bridge, open_guest_script, ruleset, teardown, FakeNet, GuestPort, HostNet,
    HostNetError, NetlinkNet, NftConfig, PortForward, Protocol, TapPool, REMOVE_SCRIPT,
};
use futures_util::TryStreamExt;

const CHILD_ENV: &str = "BANGER_TEST_NETNS_CHILD";
/// The parent's (the host's) network namespace, which the child must not be in.
const PARENT_NS_ENV: &str = "BANGER_TEST_PARENT_NETNS";

/// The inode of a network namespace link such as `/proc/thread-self/ns/net`.
fn netns_id(path: &str) -> String {
    std::fs::read_link(path).unwrap_or_else(|e| panic!("read {path}: {e}")).display().to_string()
}

/// Runs `body` in a private network namespace (see the module doc). `test` is the test's path
/// as libtest names it (`net::name`).
fn in_private_netns<F, Fut>(test: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        let host_ns = std::env::var(PARENT_NS_ENV).expect("parent namespace id");
        let before = netns_id("/proc/thread-self/ns/net");
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            panic!("cannot make a private network namespace ({e}); the net tests need root (CAP_NET_ADMIN)");
        }
        let after = netns_id("/proc/thread-self/ns/net");
        assert!(after != before && after != host_ns, "still in the host's network namespace ({after})");
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(body());
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .env(PARENT_NS_ENV, netns_id("/proc/thread-self/ns/net"))
        .output()
        .expect("run the test in a child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- child stderr ---\n{stderr}");
    assert!(out.status.success(), "child failed ({})\n--- stdout ---\n{stdout}", out.status);
    assert!(stdout.contains("1 passed"), "the child ran no test:\n{stdout}");
}

/// The IPv4 addresses of `link`, read back through netlink.
async fn addrs_of(link: &str) -> Vec<(Ipv4Addr, u8)> {
    let (conn, handle, _) = rtnetlink::new_connection().expect("netlink");
    let driver = tokio::spawn(conn);
    let index = handle
        .link()
        .get()
        .match_name(link)
        .execute()
        .try_next()
        .await
        .expect("get link")
        .expect("link exists")
        .header
        .index;
    let msgs: Vec<_> =
        handle.address().get().set_link_index_filter(index).execute().try_collect().await.expect("addrs");
    driver.abort();
    msgs.iter()
        .flat_map(|m| {
            m.attributes.iter().filter_map(move |a| match a {
                rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(v4)) => {
                    Some((*v4, m.header.prefix_len))
                }
                _ => None,
            })
        })
        .collect()
}

fn table_block<'a>(script: &'a str, header: &str) -> &'a str {
    let start = script.find(header).unwrap_or_else(|| panic!("{header} in script"));
    let len = script[start..].find("\n}\n").expect("end of table") + 3;
    &script[start..start + len]
}

#[test]
fn bridge_pool_ruleset_and_teardown() {
    in_private_netns("net::bridge_pool_ruleset_and_teardown", || async {
        let net = Arc::new(NetlinkNet::connect().expect("netlink"));
        let bridge = IfName::default();
        let subnet = Subnet::default();

        ensure_bridge(&*net, &bridge, &subnet).await.expect("bridge");
        ensure_bridge(&*net, &bridge, &subnet).await.expect("bridge again (idempotent)");
        let state = net.link("banger0").await.expect("query").expect("bridge exists");
        assert_eq!(state.kind.as_deref(), Some("bridge"));
        assert!(state.up);
        assert_eq!(addrs_of("banger0").await, [(subnet.gateway(), subnet.prefix_len())]);

        let pool = Arc::new(TapPool::new(Arc::clone(&net), "banger0", 2, None));
        assert_eq!(pool.fill().await.expect("fill"), 2);
        let taps = [pool.take().expect("first"), pool.take().expect("second")];
        assert_eq!(taps, ["bgpool0", "bgpool1"]);
        for tap in &taps {
            let s = net.link(tap).await.expect("query").expect("tap exists");
            assert_eq!(s.kind.as_deref(), Some("tun"), "{s:?}");
            assert_eq!(s.controller.as_deref(), Some("banger0"), "{tap} is enslaved to the bridge");
            assert!(s.up, "{s:?}");
            // Read back independently of the code under test (iproute2's JSON view).
            let out = Command::new("ip").args(["-d", "-j", "link", "show", "dev", tap]).output().expect("ip");
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
            assert_eq!(json[0]["linkinfo"]["info_slave_data"]["isolated"], true, "{tap} is an isolated port");
        }
        for (key, value) in banger_host::net::bridge_sysctls(&bridge) {
            let read = std::fs::read_to_string(format!("/proc/sys/{key}")).expect("sysctl");
            assert_eq!(read.trim(), value, "{key}");
        }

        let mut config = NftConfig::new(bridge.clone(), subnet);
        config.nat = true;
        config.uplink = Some(IfName::new("eth0").expect("name"));
        config.open_guests = [Ipv4Addr::new(172, 30, 0, 3)].into();
        config.forwards = vec![PortForward {
            protocol: Protocol::Tcp,
            host_addr: None,
            host_port: 8080,
            guest: Ipv4Addr::new(172, 30, 0, 2),
            guest_port: 80,
        }];
        let script = ruleset(&config);
        net.apply_nft(&script).await.expect("apply");
        net.apply_nft(&script).await.expect("apply again (idempotent)");
        // nft lists exactly what we generated: the text is already in its canonical form.
        let listed = net.list_nft_table("inet", "banger").await.expect("list").expect("table exists");
        assert_eq!(listed, table_block(&script, "table inet banger {"), "the table as nft lists it");
        let bridge_table = net.list_nft_table("bridge", "banger").await.expect("list").expect("bridge table");
        assert!(bridge_table.contains("set guest_ip") && bridge_table.contains("counter"), "{bridge_table}");

        let err = net.apply_nft("table inet banger {\n\tchain input { bogus }\n}\n").await.expect_err("bad script");
        assert!(matches!(&err, HostNetError::Nft { stderr, .. } if stderr.contains("syntax error")), "{err:?}");
        let listed = net.list_nft_table("inet", "banger").await.expect("list").expect("table");
        assert_eq!(listed, table_block(&script, "table inet banger {"), "a failed load changes nothing");

        net.apply_nft(&open_guest_script(Ipv4Addr::new(172, 30, 0, 3), false)).await.expect("close guest");
        net.apply_nft(&open_guest_script(Ipv4Addr::new(172, 30, 0, 3), false)).await.expect("close twice");
        let listed = net.list_nft_table("inet", "banger").await.expect("list").expect("table");
        assert!(!listed.contains("172.30.0.3"), "{listed}");

        for tap in &taps {
            pool.release(tap).await.expect("release");
        }
        assert_eq!(pool.idle(), 2, "released taps are pooled again");

        let deleted = teardown(&*net, &bridge).await.expect("teardown");
        assert_eq!(deleted, ["bgpool0", "bgpool1", "banger0"]);
        assert_eq!(teardown(&*net, &bridge).await.expect("teardown again"), Vec::<String>::new());
        let left: Vec<String> = net.links().await.expect("links").into_iter().map(|l| l.name).collect();
        assert_eq!(left, ["lo"], "nothing but loopback is left");
        assert_eq!(net.list_nft_table("inet", "banger").await.expect("list"), None);
        assert_eq!(net.list_nft_table("bridge", "banger").await.expect("list"), None);
        net.apply_nft(REMOVE_SCRIPT).await.expect("removing nothing is fine");
    });
}

/// The same sequence on the kernel and on [`FakeNet`] gives the same outcomes, so tests that use
/// the fake describe the real thing.
#[test]
fn fake_agrees_with_the_kernel() {
    async fn outcomes<N: HostNet>(net: &N) -> Vec<String> {
        fn show<T: std::fmt::Debug>(r: Result<T, HostNetError>) -> String {
            match r {
                Ok(v) => format!("ok {v:?}"),
                Err(HostNetError::NoSuchLink(l)) => format!("no such link {l}"),
                Err(e) => format!("errno {:?}", e.errno()),
            }
        }
        vec![
            show(net.create_bridge("bgtest0").await),
            show(net.create_bridge("bgtest0").await),
            show(net.link_exists("bgtest0").await),
            show(net.create_tap("bgtap7", None).await),
            show(net.create_tap("bgtap7", None).await),
            format!("tap over a bridge fails: {}", net.create_tap("bgtest0", None).await.is_err()),
            show(net.attach("bgtap7", "nothere0").await),
            show(net.attach("bgtap7", "bgtest0").await),
            show(net.link("bgtap7").await.map(|l| l.map(|l| (l.kind, l.controller, l.up)))),
            show(net.link("nothere0").await),
            show(net.delete_link("bgtap7").await),
            show(net.delete_link("bgtap7").await),
            show(net.delete_link("bgtest0").await),
        ]
    }
    in_private_netns("net::fake_agrees_with_the_kernel", || async {
        let real = outcomes(&NetlinkNet::connect().expect("netlink")).await;
        let fake = outcomes(&FakeNet::default()).await;
        assert_eq!(real, fake);
        assert_eq!(real[1], format!("errno {:?}", Some(libc::EEXIST)));
    });
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Time to get a ready TAP (attached, up) from the warm pool vs making one cold; median of 20.
#[test]
fn pooled_tap_beats_cold_create() {
    in_private_netns("net::pooled_tap_beats_cold_create", || async {
        const N: usize = 20;
        let net = Arc::new(NetlinkNet::connect().expect("netlink"));
        let bridge = IfName::default();
        ensure_bridge(&*net, &bridge, &Subnet::default()).await.expect("bridge");

        let mut cold = Vec::new();
        for i in 0..N {
            let name = tap_name(u32::try_from(i).expect("small"));
            let t = Instant::now();
            create_attached_tap(&*net, &name, None, "banger0").await.expect("cold tap");
            cold.push(t.elapsed());
        }

        let pool = TapPool::new(Arc::clone(&net), "banger0", N, None);
        let t = Instant::now();
        pool.fill().await.expect("fill");
        let fill = t.elapsed();
        let mut pooled = Vec::new();
        let mut taken = BTreeSet::new();
        for _ in 0..N {
            let t = Instant::now();
            let tap = pool.take().expect("pool has taps");
            pooled.push(t.elapsed());
            taken.insert(tap);
        }
        assert_eq!(taken.len(), N);

        let (cold, pooled) = (median(cold), median(pooled));
        eprintln!(
            "tap timing (median of {N}): cold create+attach+up {cold:?}, pooled take {pooled:?}, \
             fill of {N} {fill:?}"
        );
        assert!(pooled < cold, "pooled {pooled:?} should beat cold {cold:?}");

        let deleted = teardown(&*net, &bridge).await.expect("teardown");
        assert_eq!(deleted.iter().filter(|n| is_banger_tap(n)).count(), 2 * N);
        let left: Vec<String> = net.links().await.expect("links").into_iter().map(|l| l.name).collect();
        assert_eq!(left, ["lo"]);
    });
}

/// Opens the existing TAP `name` (as a VMM does) and returns its fd: frames written to it are
/// frames the guest sends.
fn open_tap(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    nix::ioctl_write_ptr_bad!(
        tun_set_iff,
        nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
        IfReq
    );
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
    let flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI).expect("tap flags fit");
    let mut req = IfReq { name: [0; 16], flags, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `tun` is an open /dev/net/tun fd that outlives the call; `req` is a valid 40-byte
    // `struct ifreq` with a NUL-terminated name.
    unsafe { tun_set_iff(tun.as_raw_fd(), &req) }.expect("TUNSETIFF");
    let flags = nix::fcntl::fcntl(tun.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).expect("flags");
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(tun.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).expect("nonblocking");
    tun
}

/// An ARP request "who has `target`" from `sender_mac`/`sender_ip`, with Ethernet source
/// `eth_src`.
fn arp_request(eth_src: [u8; 6], sender_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// Whether an ARP reply for `asker` comes out of `tap` within 5 s of sending `request` (sent
/// again every 200 ms: the port may still be coming up when the fd is opened).
fn arp_reply_seen(tap: &mut std::fs::File, request: &[u8], asker: Ipv4Addr) -> bool {
    use std::io::{Read as _, Write as _};
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut resend = Instant::now();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if Instant::now() >= resend {
            tap.write_all(request).expect("write");
            resend = Instant::now() + Duration::from_millis(200);
        }
        match tap.read(&mut buf) {
            Ok(n)
                if n >= 42 && buf[12..14] == [0x08, 0x06] && buf[20..22] == [0, 2] && buf[38..42] == asker.octets() =>
            {
                return true;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("read tap: {e}"),
        }
    }
    false
}

/// The packets the `guest_port` chain dropped, read from nft.
fn dropped() -> u64 {
    let out = Command::new("nft").args(["list", "chain", "bridge", "banger", "guest_port"]).output().expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The static forwarding entries of `dev`, as iproute2 shows them.
fn static_fdb(dev: &str) -> Vec<String> {
    let out = Command::new("bridge").args(["-j", "fdb", "show", "dev", dev]).output().expect("bridge");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bridge -j output");
    json.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["state"] == "static")
        .filter_map(|e| e["mac"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn guest_ports_forward_only_their_vms_mac_and_address() {
    in_private_netns("net::guest_ports_forward_only_their_vms_mac_and_address", || async {
        let net = Arc::new(NetlinkNet::connect().expect("netlink"));
        let bridge = IfName::default();
        let subnet = Subnet::default();
        ensure_bridge(&*net, &bridge, &subnet).await.expect("bridge");
        let pool = TapPool::new(Arc::clone(&net), "banger0", 2, None);
        pool.fill().await.expect("fill");
        let (tap0, tap1) = (pool.take().expect("tap0"), pool.take().expect("tap1"));
        // The bridge keeps its own MAC whatever ports come and go (guests cache it as the gateway's).
        let out = Command::new("ip").args(["-j", "link", "show", "dev", "banger0"]).output().expect("ip");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        let fixed = banger_core::net::format_mac(banger_host::net::bridge_mac(&bridge));
        assert_eq!(json[0]["address"], fixed.as_str(), "the bridge's MAC");
        for tap in [&tap0, &tap1] {
            let out = Command::new("ip").args(["-d", "-j", "link", "show", "dev", tap]).output().expect("ip");
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
            let port = &json[0]["linkinfo"]["info_slave_data"];
            assert_eq!(
                (&port["isolated"], &port["learning"], &port["flood"]),
                (&true.into(), &false.into(), &false.into()),
                "{tap}: {port}"
            );
        }
        let (mac0, mac1) = ([0x52, 0x54, 0, 0, 0, 2], [0x52, 0x54, 0, 0, 0, 3]);
        let (ip0, ip1) = (Ipv4Addr::new(172, 30, 0, 2), Ipv4Addr::new(172, 30, 0, 3));

        // Static entries: one per port, replaced on rebind, gone on unbind.
        net.bind_port_mac(&tap0, Some(mac1)).await.expect("bind");
        net.bind_port_mac(&tap0, Some(mac0)).await.expect("rebind");
        net.bind_port_mac(&tap1, Some(mac1)).await.expect("bind tap1");
        assert_eq!(static_fdb(&tap0), ["52:54:00:00:00:02"]);
        assert_eq!(static_fdb(&tap1), ["52:54:00:00:00:03"]);

        let mut config = NftConfig::new(bridge.clone(), subnet);
        config.ports = vec![
            GuestPort { tap: tap0.clone(), mac: mac0, ip: ip0 },
            GuestPort { tap: tap1.clone(), mac: mac1, ip: ip1 },
        ];
        net.apply_nft(&ruleset(&config)).await.expect("apply");
        let gw = subnet.gateway();
        let mut fd0 = open_tap(&tap0);
        let mut fd1 = open_tap(&tap1);
        use std::io::Write as _;

        // The bound VM is answered.
        assert!(arp_reply_seen(&mut fd0, &arp_request(mac0, mac0, ip0, gw), ip0), "the host answers the bound guest");
        // tap1's port is up too (a frame to a port still coming up is lost before any rule).
        assert!(arp_reply_seen(&mut fd1, &arp_request(mac1, mac1, ip1, gw), ip1), "the host answers tap1");
        assert_eq!(dropped(), 0);

        // tap1's guest takes tap0's address, then its MAC too, then sends IPv6: all dropped, one
        // by one, and the bridge learns nothing.
        let spoofs: [(&str, Vec<u8>); 4] = [
            ("another's ip in arp", arp_request(mac1, mac1, ip0, gw)),
            ("another's mac", arp_request(mac0, mac0, ip0, gw)),
            ("arp sender mac not the frame's", arp_request(mac1, mac0, ip1, gw)),
            ("ipv6", {
                let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
                f.extend_from_slice(&mac1);
                f.extend_from_slice(&[0x86, 0xdd]);
                f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 59, 64]);
                f.extend_from_slice(&[0; 32]);
                f
            }),
        ];
        for (i, (what, frame)) in spoofs.iter().enumerate() {
            fd1.write_all(frame).expect("write");
            let deadline = Instant::now() + Duration::from_secs(5);
            while dropped() < u64::try_from(i + 1).expect("small") {
                assert!(Instant::now() < deadline, "{what}: not dropped");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        assert_eq!(static_fdb(&tap0), ["52:54:00:00:00:02"], "the victim's entry stays");
        let fdb = Command::new("bridge").args(["fdb", "show", "dev", &tap1]).output().expect("bridge");
        assert!(!String::from_utf8_lossy(&fdb.stdout).contains("52:54:00:00:00:02"), "nothing learned on tap1");
        // tap1's guest is still answered as itself.
        assert!(arp_reply_seen(&mut fd1, &arp_request(mac1, mac1, ip1, gw), ip1), "the host answers tap1 as itself");

        // An unbound port forwards nothing.
        config.ports.truncate(1);
        net.apply_nft(&ruleset(&config)).await.expect("apply");
        net.bind_port_mac(&tap1, None).await.expect("unbind");
        assert!(static_fdb(&tap1).is_empty());
        let before = dropped();
        fd1.write_all(&arp_request(mac1, mac1, ip1, gw)).expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        while dropped() == before {
            assert!(Instant::now() < deadline, "a frame from an unbound port was not dropped");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Cost of what a VM start or stop adds (printed, not asserted): rebinding a port, and
        // loading the whole ruleset with 1,000 bound ports.
        let t = Instant::now();
        net.bind_port_mac(&tap1, Some(mac1)).await.expect("bind");
        let bind = t.elapsed();
        let mut big = config.clone();
        big.ports = (0..1000u16)
            .map(|i| {
                let [hi, lo] = i.to_be_bytes();
                GuestPort { tap: format!("bgpool{i}"), mac: [2, 0, 0, 0, hi, lo], ip: Ipv4Addr::new(172, 30, hi, lo) }
            })
            .collect();
        let script = ruleset(&big);
        let t = Instant::now();
        net.apply_nft(&script).await.expect("apply 1000 ports");
        eprintln!("bind_port_mac {bind:?}; nft load with 1000 bound ports {:?}", t.elapsed());
        drop((fd0, fd1));
        teardown(&*net, &bridge).await.expect("teardown");
        let left: Vec<String> = net.links().await.expect("links").into_iter().map(|l| l.name).collect();
        assert_eq!(left, ["lo"]);
    });
}

#[test]
fn egress_chains_load_learn_and_expire() {
    use banger_core::egress::{EgressMode, EgressPolicy};
    use banger_host::net::egress::{learn_script, EgressGuest, Learned};
    in_private_netns("net::egress_chains_load_learn_and_expire", || async {
        let net = NetlinkNet::connect().expect("netlink");
        let bridge = IfName::default();
        ensure_bridge(&net, &bridge, &Subnet::default()).await.expect("bridge");
        let guest = Ipv4Addr::new(172, 30, 0, 2);
        let policy = EgressPolicy::parse(
            EgressMode::Allowlist,
            &["allowed.test".into(), "198.18.1.0/24:443".into()],
            &["198.18.1.9".into()],
        )
        .expect("policy");
        let mut config = NftConfig::new(bridge.clone(), Subnet::default());
        config.nat = true;
        let learned = vec![Learned { addr: Ipv4Addr::new(198, 18, 0, 10), port: None, timeout_secs: 600 }];
        config.egress = vec![EgressGuest { ip: guest, policy, learned }];
        config.proxy = Some(banger_host::net::egress::ProxyRedirect { port: 40080, guests: vec![guest] });
        net.apply_nft(&ruleset(&config)).await.expect("apply the ruleset with an egress chain and the proxy redirect");
        let listed = net.list_nft_table("inet", "banger").await.expect("list").expect("table");
        assert!(listed.contains("ip saddr vmap { 172.30.0.2 : jump eg_172_30_0_2 }"), "{listed}");
        assert!(listed.contains("198.18.0.10 timeout 10m"), "the learned address survives a reload: {listed}");
        // A DNS answer opens an address at once, for a port; learning it again refreshes it.
        let more = [Learned { addr: Ipv4Addr::new(198, 18, 0, 11), port: Some(80), timeout_secs: 1 }];
        net.apply_nft(&learn_script(guest, &more)).await.expect("learn");
        net.apply_nft(&learn_script(guest, &more)).await.expect("learn again");
        let listed = net.list_nft_table("inet", "banger").await.expect("list").expect("table");
        assert!(listed.contains("198.18.0.11 . 80 timeout 1s"), "{listed}");
        // The kernel drops it when its timeout passes (waited for as a condition).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = net.list_nft_table("inet", "banger").await.expect("list").expect("table");
            if !listed.contains("198.18.0.11 . 80") {
                break;
            }
            assert!(Instant::now() < deadline, "the learned element never expired: {listed}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        teardown(&net, &bridge).await.expect("teardown");
    });
}

#[test]
fn nflog_copies_of_refused_packets_reach_the_reader() {
    use banger_host::net::egress::{NFLOG_GROUP, NFLOG_PREFIX};
    use banger_host::net::nflog::NflogSocket;
    in_private_netns("net::nflog_copies_of_refused_packets_reach_the_reader", || async {
        let run = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().is_ok_and(|s| s.success());
            assert!(ok, "ip {}", args.join(" "));
        };
        run(&["link", "set", "lo", "up"]);
        let socket = NflogSocket::bind(NFLOG_GROUP, NFLOG_PREFIX).expect("bind the nflog group");
        let net = NetlinkNet::connect().expect("netlink");
        let rule = format!(
            "table inet bgtest {{\n\tchain out {{\n\t\ttype filter hook output priority 0; policy accept;\n\t\t\
             ip daddr 127.0.0.20 log prefix \"{NFLOG_PREFIX} \" group {NFLOG_GROUP} reject with icmpx admin-prohibited\n\t}}\n}}\n"
        );
        net.apply_nft(&rule).await.expect("a logging rule");
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        let _ = udp.send_to(b"x", "127.0.0.20:5353");
        let mut buf = vec![0u8; 65536];
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let batch = socket.recv(&mut buf).await.expect("recv");
                if let Some(r) = batch.into_iter().next() {
                    return r;
                }
            }
        })
        .await
        .expect("a copy of the refused packet within 5 s");
        assert_eq!((got.dst, got.protocol, got.port), (Ipv4Addr::new(127, 0, 0, 20), 17, Some(5353)), "{got:?}");
        net.apply_nft("table inet bgtest\ndelete table inet bgtest\n").await.expect("remove");
    });
}
