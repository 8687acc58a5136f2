//! Per-VM egress chains in `inet banger` (see `banger_core::egress` for the policy).
//!
//! Each networked VM gets a chain `eg_A_B_C_D` (its address) that the forward chain jumps to, by
//! one verdict-map lookup on the source address, for traffic from the bridge to anywhere but the
//! bridge. In order: `deny` address rules refuse; `closed` refuses everything; `allow` address
//! rules return (the forward chain then decides as before: NAT accept, or refuse without NAT);
//! the restricted ranges (link-local, loopback, private, shared, multicast) refuse; `open`
//! returns; `allowlist` returns for the addresses DNS answers opened (two sets with per-element
//! timeouts: `egs_…` for any port, `egp_…` keyed by address and port) and refuses the rest.
//!
//! A refusal is immediate: TCP gets a reset, everything else ICMP admin-prohibited, after an
//! NFLOG copy to group [`NFLOG_GROUP`] with the prefix `bgeg` (the daemon reads it for the
//! denial log). The log statement is rate-limited by the kernel so a guest cannot flood it.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use banger_core::egress::{EgressMode, EgressPolicy, HostMatch, HostRule, ALWAYS_REFUSED};

use super::nft::TABLE;

/// The NFLOG group refusals are copied to.
pub const NFLOG_GROUP: u16 = 7716;

/// Prefix of the NFLOG copies of refusals: `bgeg` (the rule follows after a space).
pub const NFLOG_PREFIX: &str = "bgeg";

/// One VM's egress chain: its address, policy and the addresses DNS answers opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressGuest {
    /// The guest's address (what the forward chain matches on).
    pub ip: Ipv4Addr,
    /// Its policy.
    pub policy: EgressPolicy,
    /// Addresses its allowed names resolved to, still open.
    pub learned: Vec<Learned>,
}

/// An address opened by a DNS answer, for `timeout_secs` more seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Learned {
    /// The address.
    pub addr: Ipv4Addr,
    /// The only port it is open for, if the rule named one.
    pub port: Option<u16>,
    /// Seconds left (at least 1).
    pub timeout_secs: u32,
}

fn tag(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "_")
}

/// The chain name of guest `ip`.
pub fn chain_name(ip: Ipv4Addr) -> String {
    format!("eg_{}", tag(ip))
}

fn set_any(ip: Ipv4Addr) -> String {
    format!("egs_{}", tag(ip))
}

fn set_port(ip: Ipv4Addr) -> String {
    format!("egp_{}", tag(ip))
}

fn element(l: &Learned) -> String {
    match l.port {
        Some(port) => format!("{} . {port} timeout {}s", l.addr, l.timeout_secs.max(1)),
        None => format!("{} timeout {}s", l.addr, l.timeout_secs.max(1)),
    }
}

fn match_of(rule: &HostRule) -> Option<String> {
    let HostMatch::Net { addr, prefix_len } = rule.host else { return None };
    let daddr = if prefix_len == 32 { format!("ip daddr {addr}") } else { format!("ip daddr {addr}/{prefix_len}") };
    Some(match rule.port {
        Some(port) => format!("{daddr} meta l4proto {{ tcp, udp }} th dport {port}"),
        None => daddr,
    })
}

/// The sets and chains of every guest's egress, and the shared refusal chain: text inside the
/// `table inet banger { ... }` block.
pub fn egress_blocks(out: &mut String, guests: &[EgressGuest]) {
    if guests.is_empty() {
        return;
    }
    // Refusals: one NFLOG copy (rate-limited), then a reset or admin-prohibited.
    let _ = write!(
        out,
        "\n\tchain eg_refuse {{
\t\tlimit rate 200/second burst 400 packets log prefix \"{NFLOG_PREFIX} \" group {NFLOG_GROUP}
\t\tmeta l4proto tcp reject with tcp reset
\t\treject with icmpx admin-prohibited
\t}}
"
    );
    let restricted: Vec<String> = ALWAYS_REFUSED.iter().map(|(a, l)| format!("{a}/{l}")).collect();
    for g in guests {
        let (any, port) = (set_any(g.ip), set_port(g.ip));
        let _ = write!(out, "\n\tset {any} {{\n\t\ttype ipv4_addr\n\t\tflags timeout\n");
        let list: Vec<String> = g.learned.iter().filter(|l| l.port.is_none()).map(element).collect();
        if !list.is_empty() {
            let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(", "));
        }
        let _ = write!(out, "\t}}\n\n\tset {port} {{\n\t\ttype ipv4_addr . inet_service\n\t\tflags timeout\n");
        let list: Vec<String> = g.learned.iter().filter(|l| l.port.is_some()).map(element).collect();
        if !list.is_empty() {
            let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(", "));
        }
        let _ = write!(out, "\t}}\n\n\tchain {} {{\n", chain_name(g.ip));
        for m in g.policy.deny.iter().filter_map(match_of) {
            let _ = writeln!(out, "\t\t{m} goto eg_refuse");
        }
        if g.policy.mode == EgressMode::Closed {
            out.push_str("\t\tgoto eg_refuse\n\t}\n");
            continue;
        }
        for m in g.policy.allow.iter().filter_map(match_of) {
            let _ = writeln!(out, "\t\t{m} return");
        }
        let _ = writeln!(out, "\t\tip daddr {{ {} }} goto eg_refuse", restricted.join(", "));
        if g.policy.mode == EgressMode::Open {
            out.push_str("\t\treturn\n\t}\n");
            continue;
        }
        let _ = write!(
            out,
            "\t\tip daddr @{any} return
\t\tmeta l4proto {{ tcp, udp }} ip daddr . th dport @{port} return
\t\tgoto eg_refuse
\t}}
"
        );
    }
}

/// The forward-chain rule that sends each guest's outgoing traffic to its chain (empty when
/// there is no guest).
pub fn dispatch_rule(bridge: &str, guests: &[EgressGuest]) -> String {
    if guests.is_empty() {
        return String::new();
    }
    let map: Vec<String> = guests.iter().map(|g| format!("{} : jump {}", g.ip, chain_name(g.ip))).collect();
    format!("\t\tiifname \"{bridge}\" oifname != \"{bridge}\" ip saddr vmap {{ {} }}\n", map.join(", "))
}

/// Guests whose HTTP (80) and HTTPS (443) connections leaving the bridge are redirected to the
/// daemon's name-checking proxy on the bridge address, port `port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRedirect {
    /// The proxy's port on the bridge address.
    pub port: u16,
    /// The guests redirected (those whose policy names hosts).
    pub guests: Vec<Ipv4Addr>,
}

/// The input-chain rule that lets redirected connections reach the proxy.
pub fn proxy_input_rule(gw: Ipv4Addr, proxy: Option<&ProxyRedirect>) -> String {
    match proxy {
        Some(p) if !p.guests.is_empty() => format!("\t\tip daddr {gw} tcp dport {} ct status dnat accept\n", p.port),
        _ => String::new(),
    }
}

/// The nat chain that redirects (empty without guests to redirect): per redirected guest, its
/// `deny` address rules first (not redirected, so the forward chain refuses them at once), then
/// only destinations it may reach by address (its `allow` address rules and the addresses DNS
/// answers opened), so a connection to anything else is still refused at connect time.
pub fn proxy_chain(bridge: &str, guests: &[EgressGuest], proxy: Option<&ProxyRedirect>) -> String {
    let Some(p) = proxy.filter(|p| !p.guests.is_empty()) else { return String::new() };
    let mut out =
        String::from("\n\tchain egress_proxy {\n\t\ttype nat hook prerouting priority dstnat - 5; policy accept;\n");
    let web = "tcp dport { 80, 443 }";
    for g in guests.iter().filter(|g| p.guests.contains(&g.ip)) {
        let from = format!("iifname \"{bridge}\" ip saddr {}", g.ip);
        for m in g.policy.deny.iter().filter_map(match_of) {
            let _ = writeln!(out, "\t\t{from} {m} return");
        }
        let redirect = format!("redirect to :{}", p.port);
        for rule in &g.policy.allow {
            let HostMatch::Net { addr, prefix_len } = rule.host else { continue };
            let ports = match rule.port {
                None => web.to_owned(),
                Some(port @ (80 | 443)) => format!("tcp dport {port}"),
                Some(_) => continue,
            };
            let _ = writeln!(out, "\t\t{from} ip daddr {addr}/{prefix_len} {ports} {redirect}");
        }
        let _ = writeln!(out, "\t\t{from} ip daddr @{} {web} {redirect}", set_any(g.ip));
        let _ = writeln!(out, "\t\t{from} {web} ip daddr . tcp dport @{} {redirect}", set_port(g.ip));
    }
    out.push_str("\t}\n");
    out
}

/// An nft script that opens `learned` for guest `ip` at once (DNS answers), refreshing the
/// timeout of an address already open. The guest's sets must exist (its chain is loaded).
pub fn learn_script(ip: Ipv4Addr, learned: &[Learned]) -> String {
    let mut out = String::new();
    for l in learned {
        let set = if l.port.is_some() { set_port(ip) } else { set_any(ip) };
        let key = match l.port {
            Some(port) => format!("{} . {port}", l.addr),
            None => l.addr.to_string(),
        };
        // Add, delete, add: valid whether or not it was there, and the timeout starts afresh.
        let _ = writeln!(out, "add element inet {TABLE} {set} {{ {key} }}");
        let _ = writeln!(out, "delete element inet {TABLE} {set} {{ {key} }}");
        let _ = writeln!(out, "add element inet {TABLE} {set} {{ {} }}", element(l));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_core::egress::EgressMode;

    fn guest(mode: EgressMode, allow: &[&str], deny: &[&str]) -> EgressGuest {
        let s = |l: &[&str]| l.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        EgressGuest {
            ip: "172.30.0.2".parse().expect("ip"),
            policy: EgressPolicy::parse(mode, &s(allow), &s(deny)).expect("policy"),
            learned: vec![
                Learned { addr: "198.18.0.10".parse().expect("ip"), port: None, timeout_secs: 30 },
                Learned { addr: "198.18.0.11".parse().expect("ip"), port: Some(443), timeout_secs: 0 },
            ],
        }
    }

    #[test]
    fn allowlist_chain_orders_deny_allow_restricted_learned() {
        let mut out = String::new();
        let g = guest(EgressMode::Allowlist, &["allowed.test", "10.0.0.0/8:443"], &["198.18.0.99"]);
        egress_blocks(&mut out, std::slice::from_ref(&g));
        insta::assert_snapshot!(out);
        assert_eq!(
            dispatch_rule("banger0", &[g]),
            "\t\tiifname \"banger0\" oifname != \"banger0\" ip saddr vmap { 172.30.0.2 : jump eg_172_30_0_2 }\n"
        );
    }

    #[test]
    fn closed_refuses_after_deny_and_open_returns_after_restricted() {
        let mut out = String::new();
        egress_blocks(&mut out, &[guest(EgressMode::Closed, &["1.2.3.4"], &[])]);
        assert!(out.contains("chain eg_172_30_0_2 {\n\t\tgoto eg_refuse\n\t}"), "{out}");
        let mut out = String::new();
        egress_blocks(&mut out, &[]);
        assert_eq!(out, "");
        egress_blocks(&mut out, &[guest(EgressMode::Open, &[], &[])]);
        assert!(out.contains("169.254.0.0/16") && out.contains("goto eg_refuse\n\t\treturn\n\t}"), "{out}");
        assert_eq!(dispatch_rule("banger0", &[]), "");
    }

    #[test]
    fn learning_refreshes_the_timeout() {
        let script = learn_script(
            "172.30.0.2".parse().expect("ip"),
            &[Learned { addr: "198.18.0.10".parse().expect("ip"), port: Some(80), timeout_secs: 60 }],
        );
        assert_eq!(
            script,
            "add element inet banger egp_172_30_0_2 { 198.18.0.10 . 80 }\n\
             delete element inet banger egp_172_30_0_2 { 198.18.0.10 . 80 }\n\
             add element inet banger egp_172_30_0_2 { 198.18.0.10 . 80 timeout 60s }\n"
        );
    }
}
