//! banger's nftables rules, generated as text from an [`NftConfig`] by the pure [`ruleset`].
//!
//! Two tables. `bridge banger` is the anti-spoofing layer: every frame a guest port (a TAP on
//! banger's bridge) sends must carry the Ethernet source MAC of the VM bound to that TAP, and be
//! IPv4 from the VM's address or ARP whose sender MAC and IP are the VM's; anything else (IPv6,
//! VLAN tags, other ether types, frames from a TAP bound to no VM) is dropped before the bridge
//! learns from it or the host sees it. The bindings are two concatenated sets keyed by the TAP's
//! name, so the check is one hash lookup per frame whatever the number of VMs.
//!
//! `inet banger` does guest→host filtering (`input`), routing to, from and between guests
//! (`forward`), published ports (`prerouting`/`output` DNAT) and egress masquerade
//! (`postrouting`). banger's bridge ports are isolated and the host answers ARP for every guest
//! (see `bridge_sysctls`), so guest↔guest traffic is routed through the host and meets the
//! `forward` chain, which refuses it for every protocol (TCP reset, ICMP admin-prohibited) unless
//! one side is an open guest, with NAT on or off. Guests never reach 169.254.0.0/16 (link-local,
//! cloud metadata), and the DNS port on the bridge address answers only what arrives on the
//! bridge.
//!
//! A generated script starts by creating and deleting both tables, so loading it with
//! `nft -f -` replaces banger's rules atomically, whether or not they were loaded before.
//! [`REMOVE_SCRIPT`] removes them just as idempotently. Nothing outside these tables is touched.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use banger_core::net::{IfName, Subnet, POOL_TAP_PREFIX, TAP_PREFIX};

/// Name of banger's tables (one in the `inet` family, one in the `bridge` family).
pub const TABLE: &str = "banger";

/// Removes banger's tables if they exist and does nothing otherwise (`nft -f -`).
pub const REMOVE_SCRIPT: &str =
    "table inet banger\ndelete table inet banger\ntable bridge banger\ndelete table bridge banger\n";

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    fn keyword(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A guest port published on the host through DNAT. It applies to traffic arriving from other
/// machines and to host-originated traffic to a non-loopback host address; `127.0.0.1` cannot be
/// DNATed to a guest without `route_localnet`, so the daemon proxies loopback in user space.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortForward {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Only traffic to this host address; `None` means any local address.
    pub host_addr: Option<Ipv4Addr>,
    /// The host port.
    pub host_port: u16,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// The guest port.
    pub guest_port: u16,
}

/// Link-local addresses, where clouds put their metadata service: never reachable from a guest.
pub const LINK_LOCAL: &str = "169.254.0.0/16";

/// One guest port: the TAP a running VM was given and the only source MAC and IPv4 address it
/// may send from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPort {
    /// The TAP device (a bridge port).
    pub tap: String,
    /// The VM's MAC address.
    pub mac: [u8; 6],
    /// The VM's address.
    pub ip: Ipv4Addr,
}

/// What the ruleset enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftConfig {
    /// banger's bridge.
    pub bridge: IfName,
    /// The bridge subnet; the host is its gateway address.
    pub subnet: Subnet,
    /// Masquerade guest traffic leaving the host (config `nat`).
    pub nat: bool,
    /// The interface guest egress leaves through; `None` means any interface but the bridge.
    pub uplink: Option<IfName>,
    /// The port banger's DNS server listens on at the gateway address (53).
    pub dns_port: u16,
    /// Guests opened with `--allow-vm-traffic`: they may reach, and be reached by, other guests,
    /// and may reach any host port.
    pub open_guests: BTreeSet<Ipv4Addr>,
    /// Published ports.
    pub forwards: Vec<PortForward>,
    /// The guest ports bound to running VMs; a port not listed here forwards nothing.
    pub ports: Vec<GuestPort>,
    /// banger turned forwarding on for the uplink (for NAT replies): forward nothing else that
    /// arrives there, so the host does not become a router it was not before.
    pub guard_uplink: bool,
    /// Each networked running VM's egress policy (`super::egress`).
    pub egress: Vec<super::egress::EgressGuest>,
    /// The HTTP/HTTPS name-checking proxy and the guests redirected to it.
    pub proxy: Option<super::egress::ProxyRedirect>,
}

impl NftConfig {
    /// The default policy for `bridge` and `subnet`: no NAT, guests isolated from each other
    /// and from every host port but DNS, nothing published.
    pub fn new(bridge: IfName, subnet: Subnet) -> Self {
        Self {
            bridge,
            subnet,
            nat: false,
            uplink: None,
            dns_port: 53,
            open_guests: BTreeSet::new(),
            forwards: Vec::new(),
            ports: Vec::new(),
            guard_uplink: false,
            egress: Vec::new(),
            proxy: None,
        }
    }
}

fn set_block(out: &mut String, elements: &BTreeSet<Ipv4Addr>) {
    out.push_str("\tset open_guests {\n\t\ttype ipv4_addr\n");
    if !elements.is_empty() {
        let list: Vec<String> = elements.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(", "));
    }
    out.push_str("\t}\n");
}

/// The `bridge banger` table: per-port source checks (see the module doc).
fn bridge_table(out: &mut String, config: &NftConfig) {
    let mac = |m: &[u8; 6]| banger_core::net::format_mac(*m);
    let elements = |out: &mut String, items: Vec<String>| {
        if !items.is_empty() {
            let _ = writeln!(out, "\t\telements = {{ {} }}", items.join(", "));
        }
    };
    out.push_str("table bridge banger {\n\tset guest_ip {\n\t\ttype ifname . ether_addr . ipv4_addr\n");
    elements(out, config.ports.iter().map(|p| format!("\"{}\" . {} . {}", p.tap, mac(&p.mac), p.ip)).collect());
    out.push_str("\t}\n\n\tset guest_arp {\n\t\ttype ifname . ether_addr . ether_addr . ipv4_addr\n");
    elements(
        out,
        config.ports.iter().map(|p| format!("\"{}\" . {} . {} . {}", p.tap, mac(&p.mac), mac(&p.mac), p.ip)).collect(),
    );
    // Priority -300 runs before the bridge's own filter chains and before it learns. Guest
    // ports are known by their names (`meta ibrname` needs a module Debian's kernel may lack).
    let _ = write!(
        out,
        "\t}}

\tchain prerouting {{
\t\ttype filter hook prerouting priority -300; policy accept;
\t\tiifname \"{TAP_PREFIX}*\" jump guest_port
\t\tiifname \"{POOL_TAP_PREFIX}*\" jump guest_port
\t}}

\tchain guest_port {{
\t\tether type ip iifname . ether saddr . ip saddr @guest_ip accept
\t\tether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . ether saddr . arp saddr ether . arp saddr ip @guest_arp accept
\t\tcounter drop
\t}}
}}
"
    );
}

/// The whole nft script for `config` (see the module doc for what it does and why).
pub fn ruleset(config: &NftConfig) -> String {
    let br = config.bridge.as_str();
    let net = config.subnet;
    let gw = net.gateway();
    let dns = config.dns_port;
    let mut out = String::from("# banger's nftables rules; generated, load with `nft -f -`\n");
    out.push_str(REMOVE_SCRIPT);
    bridge_table(&mut out, config);

    out.push_str("table inet banger {\n");
    set_block(&mut out, &config.open_guests);
    // Before the forward chain that jumps to them: nft resolves a jump when it reads it.
    super::egress::egress_blocks(&mut out, &config.egress);

    let proxy_input = super::egress::proxy_input_rule(gw, config.proxy.as_ref());
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname != \"{br}\" ip daddr {gw} meta l4proto {{ tcp, udp }} th dport {dns} drop
\t\tiifname != \"{br}\" accept
\t\tct state established,related accept
\t\tip daddr {LINK_LOCAL} reject with icmpx admin-prohibited
\t\tip saddr @open_guests accept
\t\tip daddr {gw} udp dport {dns} accept
\t\tip daddr {gw} tcp dport {dns} accept
{proxy_input}\t\tip daddr {gw} icmp type echo-request accept
\t\tmeta l4proto tcp reject with tcp reset
\t\treject with icmpx admin-prohibited
\t}}

\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tct state established,related accept
\t\tiifname \"{br}\" ip daddr {LINK_LOCAL} reject with icmpx admin-prohibited
\t\tiifname \"{br}\" oifname \"{br}\" ip saddr @open_guests accept
\t\tiifname \"{br}\" oifname \"{br}\" ip daddr @open_guests accept
\t\tiifname \"{br}\" oifname \"{br}\" meta l4proto tcp reject with tcp reset
\t\tiifname \"{br}\" oifname \"{br}\" reject with icmpx admin-prohibited
"
    );
    out.push_str(&super::egress::dispatch_rule(br, &config.egress));
    if config.guard_uplink {
        let _ = match &config.uplink {
            Some(up) => writeln!(out, "\t\tiifname \"{up}\" oifname != \"{br}\" drop"),
            None => writeln!(out, "\t\tiifname != \"{br}\" oifname != \"{br}\" drop"),
        };
    }
    if config.nat {
        let _ = match &config.uplink {
            Some(up) => writeln!(out, "\t\tiifname \"{br}\" oifname \"{up}\" ip saddr {net} accept"),
            None => writeln!(out, "\t\tiifname \"{br}\" oifname != \"{br}\" ip saddr {net} accept"),
        };
    }
    if !config.forwards.is_empty() {
        let _ = writeln!(out, "\t\toifname \"{br}\" ct status dnat accept");
    }
    let _ = write!(
        out,
        "\t\tiifname \"{br}\" reject with icmpx admin-prohibited
\t\toifname \"{br}\" drop
\t}}
"
    );

    if !config.forwards.is_empty() {
        let rules = |out: &mut String, output: bool| {
            for f in &config.forwards {
                let proto = f.protocol.keyword();
                let dest = match f.host_addr {
                    Some(addr) => format!("ip daddr {addr}"),
                    None if output => "fib daddr type local ip daddr != 127.0.0.0/8".to_owned(),
                    None => "fib daddr type local".to_owned(),
                };
                let _ =
                    writeln!(out, "\t\t{dest} {proto} dport {} dnat ip to {}:{}", f.host_port, f.guest, f.guest_port);
            }
        };
        out.push_str("\n\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n");
        rules(&mut out, false);
        out.push_str("\t}\n\n\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n");
        rules(&mut out, true);
        out.push_str("\t}\n");
    }

    if config.nat {
        out.push_str("\n\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
        let _ = match &config.uplink {
            Some(up) => writeln!(out, "\t\tip saddr {net} oifname \"{up}\" masquerade"),
            None => writeln!(out, "\t\tip saddr {net} oifname != \"{br}\" masquerade"),
        };
        out.push_str("\t}\n");
    }
    out.push_str(&super::egress::proxy_chain(br, &config.egress, config.proxy.as_ref()));
    out.push_str("}\n");

    out
}

/// An nft script that opens (`open = true`) or closes one guest's traffic without reloading
/// the ruleset, by editing the `open_guests` set. Closing a guest that is not
/// open, or opening one twice, is not an error.
pub fn open_guest_script(guest: Ipv4Addr, open: bool) -> String {
    let mut out = String::new();
    // Adding first makes the delete valid when the element is absent.
    let _ = writeln!(out, "add element inet {TABLE} open_guests {{ {guest} }}");
    if !open {
        let _ = writeln!(out, "delete element inet {TABLE} open_guests {{ {guest} }}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    fn name(s: &str) -> IfName {
        IfName::new(s).expect("name")
    }

    #[test]
    fn default_ruleset() {
        insta::assert_snapshot!(ruleset(&NftConfig::new(IfName::default(), Subnet::default())));
    }

    #[test]
    fn ruleset_with_nat_open_guests_and_forwards() {
        let mut config = NftConfig::new(name("br-dev"), "10.77.0.0/16".parse().expect("subnet"));
        config.nat = true;
        config.uplink = Some(name("eth0"));
        config.guard_uplink = true;
        config.open_guests = [ip("10.77.0.9"), ip("10.77.0.3")].into();
        config.forwards = vec![
            PortForward {
                protocol: Protocol::Tcp,
                host_addr: None,
                host_port: 8080,
                guest: ip("10.77.0.3"),
                guest_port: 80,
            },
            PortForward {
                protocol: Protocol::Udp,
                host_addr: Some(ip("192.0.2.10")),
                host_port: 5353,
                guest: ip("10.77.0.9"),
                guest_port: 53,
            },
        ];
        config.ports = vec![
            GuestPort { tap: "bgpool0".into(), mac: [0x52, 0x54, 0, 0, 0, 3], ip: ip("10.77.0.3") },
            GuestPort { tap: "bgpool4".into(), mac: [0x52, 0x54, 0, 0, 0, 9], ip: ip("10.77.0.9") },
        ];
        insta::assert_snapshot!(ruleset(&config));
    }

    #[test]
    fn nat_without_uplink_masquerades_out_of_anything_but_the_bridge() {
        let mut config = NftConfig::new(IfName::default(), Subnet::default());
        config.nat = true;
        let text = ruleset(&config);
        assert!(text.contains("ip saddr 172.30.0.0/20 oifname != \"banger0\" masquerade"), "{text}");
        assert!(text.contains("iifname \"banger0\" oifname != \"banger0\" ip saddr 172.30.0.0/20 accept"), "{text}");
        // Guest to guest is refused for every protocol before the NAT accept (UDP got through it).
        let refuse = text.find("oifname \"banger0\" reject with icmpx").expect("guest-to-guest refusal");
        assert!(refuse < text.find("172.30.0.0/20 accept").expect("nat accept"), "{text}");
        assert!(!text.contains("type nat hook prerouting"), "{text}");
    }

    #[test]
    fn ruleset_is_idempotent_to_load() {
        let text = ruleset(&NftConfig::new(IfName::default(), Subnet::default()));
        // Create-then-delete of both tables precedes every definition.
        let first_def = text.find("table inet banger {").expect("definition");
        assert_eq!(text.find(REMOVE_SCRIPT), Some(text.find('\n').expect("header") + 1));
        assert!(text.find(REMOVE_SCRIPT).expect("prefix") < first_def);
    }

    #[test]
    fn open_and_close_one_guest() {
        assert_eq!(open_guest_script(ip("172.30.0.4"), true), "add element inet banger open_guests { 172.30.0.4 }\n");
        let close = open_guest_script(ip("172.30.0.4"), false);
        assert_eq!(close.lines().filter(|l| l.starts_with("delete element")).count(), 1);
    }
}
