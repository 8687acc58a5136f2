//! Egress state the network service owns: each running guest's policy, the addresses DNS
//! answers opened for it (mirrored in its nft sets, so a ruleset reload keeps them), and its
//! denial log — a ring of [`RING`] entries per VM behind a token bucket ([`RATE_PER_SEC`],
//! burst [`BURST`]), so a guest that is refused in a loop cannot grow the daemon. The lock here
//! is a leaf: never held across an await.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use banger_core::egress::{is_restricted, EgressPolicy, Verdict};
use banger_host::net::egress::{learn_script, EgressGuest, Learned, NFLOG_GROUP, NFLOG_PREFIX};
use banger_host::net::nflog::{NflogSocket, Refused};
use banger_host::net::{HostNet, NetlinkNet};
use banger_proto::{EgressDenial, EgressLog, LearnedAddress};

/// Denials kept per VM.
pub const RING: usize = 256;
/// Denials recorded per VM per second, on average.
pub const RATE_PER_SEC: f64 = 50.0;
/// Denials recorded per VM in a burst.
pub const BURST: f64 = 100.0;

#[derive(Debug)]
struct Guest {
    vm: String,
    policy: EgressPolicy,
    /// (address, port) → (name, until).
    learned: BTreeMap<(Ipv4Addr, Option<u16>), (String, Instant)>,
    log: VecDeque<EgressDenial>,
    next_seq: u64,
    suppressed: u64,
    tokens: f64,
    refilled: Instant,
}

/// A denial to record (the time, VM and sequence number are filled in).
#[derive(Debug, Clone)]
pub struct Denial {
    /// `dns`, `tcp`, `udp`, `icmp`, `http`, `tls`.
    pub protocol: &'static str,
    /// Destination address.
    pub address: Option<Ipv4Addr>,
    /// Destination port.
    pub port: Option<u16>,
    /// The name involved.
    pub name: Option<String>,
    /// The rule or reason.
    pub rule: String,
    /// `refused`, `reset` or `rejected`.
    pub decision: &'static str,
}

/// Every running guest's egress state, keyed by its address. See the module doc.
#[derive(Default)]
pub struct EgressBook {
    guests: Mutex<BTreeMap<Ipv4Addr, Guest>>,
    /// Woken at each recorded denial (`vm network log --follow`).
    pub changed: tokio::sync::Notify,
}

impl EgressBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Ipv4Addr, Guest>> {
        self.guests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the book hold exactly `running` (address, VM name, policy); a guest whose policy
    /// changed forgets what DNS opened for it. Returns each guest's nft description.
    pub fn sync(&self, running: &[(Ipv4Addr, String, EgressPolicy)]) -> Vec<EgressGuest> {
        let mut guests = self.lock();
        guests.retain(|ip, g| running.iter().any(|(r, name, _)| r == ip && *name == g.vm));
        let now = Instant::now();
        running
            .iter()
            .map(|(ip, name, policy)| {
                let g = guests.entry(*ip).or_insert_with(|| Guest {
                    vm: name.clone(),
                    policy: policy.clone(),
                    learned: BTreeMap::new(),
                    log: VecDeque::new(),
                    next_seq: 1,
                    suppressed: 0,
                    tokens: BURST,
                    refilled: now,
                });
                if g.policy != *policy {
                    g.policy = policy.clone();
                    g.learned.clear();
                }
                g.learned.retain(|_, (_, until)| *until > now);
                let learned = g
                    .learned
                    .iter()
                    .map(|(&(addr, port), (_, until))| Learned {
                        addr,
                        port,
                        timeout_secs: u32::try_from(until.duration_since(now).as_secs()).unwrap_or(u32::MAX).max(1),
                    })
                    .collect();
                EgressGuest { ip: *ip, policy: policy.clone(), learned }
            })
            .collect()
    }

    /// Records a denial for guest `ip` (dropped past the rate limit; the ring keeps the newest).
    pub fn record(&self, ip: Ipv4Addr, d: Denial) {
        {
            let mut guests = self.lock();
            let Some(g) = guests.get_mut(&ip) else { return };
            let now = Instant::now();
            g.tokens = (g.tokens + now.duration_since(g.refilled).as_secs_f64() * RATE_PER_SEC).min(BURST);
            g.refilled = now;
            if g.tokens < 1.0 {
                g.suppressed += 1;
                return;
            }
            g.tokens -= 1.0;
            if g.log.len() == RING {
                g.log.pop_front();
            }
            let seq = g.next_seq;
            g.next_seq += 1;
            tracing::info!(vm = %g.vm, protocol = d.protocol, address = ?d.address, port = ?d.port, name = ?d.name,
                rule = %d.rule, "egress denied");
            g.log.push_back(EgressDenial {
                seq,
                time: banger_core::time::now_rfc3339(),
                vm: g.vm.clone(),
                protocol: d.protocol.to_owned(),
                address: d.address.map(|a| a.to_string()),
                port: d.port,
                name: d.name,
                rule: d.rule,
                decision: d.decision.to_owned(),
            });
        }
        self.changed.notify_waiters();
    }

    /// Guest `vm`'s denials after `after` (none when it does not run).
    pub fn log(&self, vm: &str, after: u64) -> EgressLog {
        let guests = self.lock();
        let Some(g) = guests.values().find(|g| g.vm == vm) else { return EgressLog::default() };
        EgressLog {
            denials: g.log.iter().filter(|d| d.seq > after).cloned().collect(),
            suppressed: g.suppressed,
            next: g.log.back().map_or(after, |d| d.seq.max(after)),
        }
    }

    /// What DNS opened for `vm`, still open.
    pub fn learned(&self, vm: &str) -> Vec<LearnedAddress> {
        let guests = self.lock();
        let now = Instant::now();
        guests
            .values()
            .filter(|g| g.vm == vm)
            .flat_map(|g| g.learned.iter())
            .filter(|(_, (_, until))| *until > now)
            .map(|(&(addr, port), (name, until))| LearnedAddress {
                address: addr.to_string(),
                port,
                name: name.clone(),
                expires_in_secs: until.duration_since(now).as_secs(),
            })
            .collect()
    }

    /// Whether guest `src` may reach `dst:port` having sent `name` (HTTP Host or TLS SNI): the
    /// name must pass the policy, and the address must be one the guest may reach by address or
    /// that a DNS answer opened for it. `Err` holds the rule that refused.
    pub fn allows_connection(&self, src: Ipv4Addr, dst: Ipv4Addr, port: u16, name: Option<&str>) -> Result<(), String> {
        let guests = self.lock();
        let g = guests.get(&src).ok_or_else(|| "not a running guest".to_owned())?;
        if let Some(Verdict::Deny(rule)) = name.map(|n| g.policy.check_name(n, Some(port))) {
            return Err(rule);
        }
        match g.policy.check_addr(dst, Some(port)) {
            Verdict::Allow(_) => Ok(()),
            Verdict::Deny(rule) if rule == "not in allowlist" => {
                let now = Instant::now();
                let learned = g
                    .learned
                    .iter()
                    .any(|(&(a, p), (_, until))| a == dst && p.is_none_or(|p| p == port) && *until > now);
                if learned {
                    Ok(())
                } else {
                    Err(rule)
                }
            }
            Verdict::Deny(rule) => Err(rule),
        }
    }

    fn policy_of(&self, ip: Ipv4Addr) -> Option<EgressPolicy> {
        self.lock().get(&ip).map(|g| g.policy.clone())
    }
}

impl EgressBook {
    /// Records a packet the kernel refused (a copy from `eg_refuse`), with the rule that refused
    /// it found again from the guest's policy.
    pub fn record_refused(&self, r: Refused) {
        let Some(policy) = self.policy_of(r.src) else { return };
        let rule = match policy.check_addr(r.dst, r.port) {
            Verdict::Deny(rule) => rule,
            Verdict::Allow(_) => "not opened by an allowed name".to_owned(),
        };
        let (protocol, decision) = match r.protocol {
            6 => ("tcp", "reset"),
            17 => ("udp", "rejected"),
            1 => ("icmp", "rejected"),
            _ => ("ip", "rejected"),
        };
        self.record(r.src, Denial { protocol, address: Some(r.dst), port: r.port, name: None, rule, decision });
    }
}

/// Reads the kernel's copies of refused packets into `book` until aborted; `None` (logged)
/// when the NFLOG socket cannot be bound (refusals then still happen, unlogged).
pub fn spawn_nflog_reader(book: Arc<EgressBook>) -> Option<tokio::task::JoinHandle<()>> {
    let socket = match NflogSocket::bind(NFLOG_GROUP, NFLOG_PREFIX) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::warn!(error = %e, group = NFLOG_GROUP, "cannot read refused packets (nfnetlink_log); connection denials go unlogged");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        // One datagram at a time into a fixed buffer; the kernel's socket buffer bounds the rest.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match socket.recv(&mut buf).await {
                Ok(batch) => batch.into_iter().for_each(|r| book.record_refused(r)),
                Err(e) => {
                    tracing::warn!(error = %e, "nflog socket failed; connection denials go unlogged");
                    return;
                }
            }
        }
    }))
}

/// Where a guest finds its own recent denials (JSON lines, newest last).
pub const GUEST_DENIALS: &str = "/run/banger/egress-denials";
/// Denials written to the guest's file.
pub const GUEST_DENIALS_KEPT: usize = 32;
/// At most one write of a guest's file per this interval (guest I/O is not free, and a guest
/// refused in a loop must not make the daemon write in a loop).
pub const GUEST_WRITE_INTERVAL: Duration = Duration::from_secs(1);

impl EgressBook {
    /// The guests whose log moved past what `written` says was mirrored: (VM, newest seq, file
    /// text of the newest [`GUEST_DENIALS_KEPT`] denials).
    fn unmirrored(&self, written: &BTreeMap<String, u64>) -> Vec<(String, u64, String)> {
        let guests = self.lock();
        guests
            .values()
            .filter_map(|g| {
                let newest = g.log.back()?.seq;
                if written.get(&g.vm).is_some_and(|&w| w >= newest) {
                    return None;
                }
                let skip = g.log.len().saturating_sub(GUEST_DENIALS_KEPT);
                let mut text = String::new();
                for d in g.log.iter().skip(skip) {
                    text.push_str(&serde_json::to_string(d).unwrap_or_default());
                    text.push('\n');
                }
                Some((g.vm.clone(), newest, text))
            })
            .collect()
    }
}

/// Mirrors each running guest's newest denials into [`GUEST_DENIALS`] in the guest, through
/// its agent (`files`), at most once per [`GUEST_WRITE_INTERVAL`] and only when they changed.
/// No lock is held across the writes. Runs until aborted.
pub fn spawn_guest_mirror(
    book: Arc<EgressBook>,
    files: Arc<crate::services::files::Files>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut written: BTreeMap<String, u64> = BTreeMap::new();
        loop {
            let notified = book.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            for (vm, newest, text) in book.unmirrored(&written) {
                let body = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(text.into_bytes())]);
                match files.write(&vm, GUEST_DENIALS, Some(0o644), true, body).await {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(vm, error = %banger_core::error_chain(&e), "cannot write the guest's denial file")
                    }
                }
                written.insert(vm, newest);
            }
            notified.await;
            tokio::time::sleep(GUEST_WRITE_INTERVAL).await;
        }
    })
}

/// The DNS server's gate over the book: see `crate::dns::egress`.
pub struct DnsGate {
    /// The book.
    pub book: Arc<EgressBook>,
    /// Where learned addresses are loaded.
    pub net: Arc<NetlinkNet>,
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

#[async_trait::async_trait]
impl crate::dns::egress::EgressGate for DnsGate {
    fn allows_name(&self, client: IpAddr, name: &str) -> bool {
        let Some(ip) = v4(client) else { return false };
        let Some(policy) = self.book.policy_of(ip) else { return true };
        match policy.check_name(name, None) {
            Verdict::Allow(_) => true,
            Verdict::Deny(rule) => {
                let name = name.trim_end_matches('.').to_owned();
                self.book.record(
                    ip,
                    Denial { protocol: "dns", address: None, port: None, name: Some(name), rule, decision: "refused" },
                );
                false
            }
        }
    }

    async fn opened(&self, client: IpAddr, name: &str, answers: Vec<(Ipv4Addr, u32)>) {
        let Some(ip) = v4(client) else { return };
        let Some(policy) = self.book.policy_of(ip) else { return };
        if policy.mode != banger_core::egress::EgressMode::Allowlist {
            return;
        }
        let name = name.trim_end_matches('.').to_owned();
        let rules: Vec<Option<u16>> =
            policy.allowed_names().filter(|r| r.matches_name(&name)).map(|r| r.port).collect();
        let mut learned = Vec::new();
        for (addr, ttl) in answers {
            if is_restricted(addr) && !policy.check_addr(addr, None).allowed() {
                // A public name pointing into a private range (DNS rebinding) opens nothing.
                self.book.record(
                    ip,
                    Denial {
                        protocol: "dns",
                        address: Some(addr),
                        port: None,
                        name: Some(name.clone()),
                        rule: "restricted range".into(),
                        decision: "refused",
                    },
                );
                continue;
            }
            if policy.deny.iter().any(|r| r.matches_addr(addr) && r.port.is_none()) {
                continue;
            }
            for port in &rules {
                learned.push(Learned { addr, port: *port, timeout_secs: ttl });
            }
        }
        if learned.is_empty() {
            return;
        }
        {
            let mut guests = self.book.lock();
            let Some(g) = guests.get_mut(&ip) else { return };
            let now = Instant::now();
            for l in &learned {
                let until = now + Duration::from_secs(u64::from(l.timeout_secs));
                g.learned.insert((l.addr, l.port), (name.clone(), until));
            }
        }
        if let Err(e) = self.net.apply_nft(&learn_script(ip, &learned)).await {
            tracing::warn!(guest = %ip, name, error = %banger_core::error_chain(&e), "cannot open answered addresses");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> Ipv4Addr {
        Ipv4Addr::new(172, 30, 0, 2)
    }

    fn denial() -> Denial {
        Denial { protocol: "tcp", address: None, port: Some(1), name: None, rule: "x".into(), decision: "reset" }
    }

    #[test]
    fn the_log_is_a_bounded_rate_limited_ring() {
        let book = EgressBook::default();
        book.sync(&[(ip(), "web".into(), EgressPolicy::default())]);
        for _ in 0..10_000 {
            book.record(ip(), denial());
        }
        let log = book.log("web", 0);
        assert!(log.denials.len() <= RING, "{}", log.denials.len());
        assert!(log.suppressed >= 10_000 - RING as u64 - 1_000, "{}", log.suppressed);
        assert_eq!(log.next, log.denials.last().map_or(0, |d| d.seq));
        assert!(book.log("web", log.next).denials.is_empty());
        // A guest that stops is forgotten with its log.
        book.sync(&[]);
        assert!(book.log("web", 0).denials.is_empty());
    }

    #[test]
    fn a_policy_change_forgets_learned_addresses() {
        let book = EgressBook::default();
        let open = EgressPolicy::default();
        book.sync(&[(ip(), "web".into(), open.clone())]);
        book.lock()
            .get_mut(&ip())
            .expect("guest")
            .learned
            .insert((Ipv4Addr::new(198, 18, 0, 1), None), ("a.test".into(), Instant::now() + Duration::from_secs(60)));
        assert_eq!(book.sync(&[(ip(), "web".into(), open)])[0].learned.len(), 1, "kept across a reload");
        let closed = EgressPolicy { mode: banger_core::egress::EgressMode::Closed, ..EgressPolicy::default() };
        assert!(book.sync(&[(ip(), "web".into(), closed)])[0].learned.is_empty());
    }
}
