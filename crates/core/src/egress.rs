//! A VM's egress policy: what its guest may reach outside the host, by name or by address.
//!
//! A policy has a [`EgressMode`] and two lists of [`HostRule`]s, `allow` and `deny`. A rule is a
//! domain (`api.github.com`), a wildcard (`*.pypi.org`: every name below `pypi.org`, not
//! `pypi.org` itself), an IPv4 address or a CIDR, each optionally with `:PORT`. Deny wins over
//! allow. Link-local (169.254.0.0/16, cloud metadata), loopback, the private and shared ranges and
//! the host's own addresses are refused in every mode unless an *address* rule (not a name)
//! allows them, so a name that resolves to one (DNS rebinding) opens nothing.
//!
//! Pure: matching and parsing only; the daemon turns a policy into nftables sets and DNS answers.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a VM may reach by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// Anything but the always-refused ranges (and the `deny` rules).
    #[default]
    Open,
    /// Only what an `allow` rule names (and no `deny` rule refuses).
    Allowlist,
    /// Nothing: only banger's own channel (exec, files, sessions) and VM names work.
    Closed,
}

impl EgressMode {
    /// The mode's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Allowlist => "allowlist",
            Self::Closed => "closed",
        }
    }
}

impl fmt::Display for EgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EgressMode {
    type Err = EgressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "allowlist" => Ok(Self::Allowlist),
            "closed" => Ok(Self::Closed),
            _ => Err(EgressError::Mode(s.to_owned())),
        }
    }
}

/// Why a policy or one of its rules was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// The mode is not one of the three.
    #[error("unknown network mode '{0}'; use open, allowlist or closed")]
    Mode(String),
    /// A rule could not be parsed.
    #[error("invalid host rule '{input}': {reason}; use a domain (api.github.com), a wildcard (*.pypi.org), an IPv4 address or a CIDR (10.0.0.0/8), each optionally with :PORT")]
    Rule {
        /// What was given.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Too many rules in one list.
    #[error("too many {list} rules ({count}); at most {MAX_RULES}")]
    TooMany {
        /// `allow` or `deny`.
        list: &'static str,
        /// How many were given.
        count: usize,
    },
}

/// Most rules a policy's `allow` or `deny` list may hold (each becomes rules and set elements).
pub const MAX_RULES: usize = 256;

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostMatch {
    /// One name, lower case, without a final dot.
    Domain(String),
    /// Every name strictly below this suffix (`*.pypi.org` holds `pypi.org`).
    Wildcard(String),
    /// An address range; a single address is a /32.
    Net {
        /// The network address (host bits clear).
        addr: Ipv4Addr,
        /// Prefix length, 0..=32.
        prefix_len: u8,
    },
}

/// One `allow` or `deny` entry: what it matches and, optionally, the only port it covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostRule {
    /// Name, wildcard or address range.
    pub host: HostMatch,
    /// The one destination port it covers; `None` means every port.
    pub port: Option<u16>,
}

impl HostRule {
    /// Whether it names a domain or wildcard (rather than addresses).
    pub fn is_name(&self) -> bool {
        !matches!(self.host, HostMatch::Net { .. })
    }

    /// Whether it covers `port` (any port when it names none, or when `port` is unknown).
    pub fn covers_port(&self, port: Option<u16>) -> bool {
        match (self.port, port) {
            (Some(mine), Some(theirs)) => mine == theirs,
            _ => true,
        }
    }

    /// Whether name `name` (any case, final dot allowed) matches, ignoring the port.
    pub fn matches_name(&self, name: &str) -> bool {
        let name = normalize_name(name);
        match &self.host {
            HostMatch::Domain(d) => *d == name,
            HostMatch::Wildcard(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
            HostMatch::Net { .. } => false,
        }
    }

    /// Whether address `addr` falls in the rule's range, ignoring the port.
    pub fn matches_addr(&self, addr: Ipv4Addr) -> bool {
        match self.host {
            HostMatch::Net { addr: net, prefix_len } => in_net(addr, net, prefix_len),
            _ => false,
        }
    }
}

fn in_net(addr: Ipv4Addr, net: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix_len)) };
    u32::from(addr) & mask == u32::from(net)
}

fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn valid_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl FromStr for HostRule {
    type Err = EgressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| EgressError::Rule { input: input.to_owned(), reason };
        let text = input.trim();
        if text.is_empty() {
            return Err(invalid("it is empty"));
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) => {
                let port: u16 = port.parse().map_err(|_| invalid("the port is not a number from 1 to 65535"))?;
                if port == 0 {
                    return Err(invalid("the port is not a number from 1 to 65535"));
                }
                (host, Some(port))
            }
            None => (text, None),
        };
        let host = if let Some((addr, len)) = host.split_once('/') {
            let addr: Ipv4Addr = addr.parse().map_err(|_| invalid("a CIDR needs an IPv4 address before the /"))?;
            let prefix_len: u8 = len.parse().map_err(|_| invalid("the prefix length is not a number"))?;
            if prefix_len > 32 {
                return Err(invalid("the prefix length is more than 32"));
            }
            if !in_net(addr, addr, prefix_len) {
                return Err(invalid("host bits are set; use the network address"));
            }
            HostMatch::Net { addr, prefix_len }
        } else if let Ok(addr) = host.parse::<Ipv4Addr>() {
            HostMatch::Net { addr, prefix_len: 32 }
        } else if host.contains(|c: char| c.is_ascii_digit() || c == '.')
            && host.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(invalid("not a valid IPv4 address"));
        } else if let Some(suffix) = host.strip_prefix("*.") {
            let suffix = normalize_name(suffix);
            if !valid_domain(&suffix) {
                return Err(invalid("the part after *. is not a domain name"));
            }
            HostMatch::Wildcard(suffix)
        } else {
            let name = normalize_name(host);
            if name.contains('*') {
                return Err(invalid("a wildcard must be a leading *."));
            }
            if !valid_domain(&name) {
                return Err(invalid("not a domain name (letters, digits, '-', '_' and dots)"));
            }
            HostMatch::Domain(name)
        };
        Ok(Self { host, port })
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostMatch::Domain(d) => f.write_str(d)?,
            HostMatch::Wildcard(s) => write!(f, "*.{s}")?,
            HostMatch::Net { addr, prefix_len: 32 } => write!(f, "{addr}")?,
            HostMatch::Net { addr, prefix_len } => write!(f, "{addr}/{prefix_len}")?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for HostRule {
    type Error = EgressError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HostRule> for String {
    fn from(r: HostRule) -> Self {
        r.to_string()
    }
}

/// Ranges no rule of kind "name" can open: link-local (cloud metadata), loopback, "this
/// network", the private (RFC 1918) and shared (RFC 6598) ranges, multicast and reserved.
pub const ALWAYS_REFUSED: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Whether `addr` is in one of the [`ALWAYS_REFUSED`] ranges.
pub fn is_restricted(addr: Ipv4Addr) -> bool {
    ALWAYS_REFUSED.iter().any(|&(net, len)| in_net(addr, net, len))
}

/// The outcome of checking a destination against a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, by this rule (`None`: the mode allows it).
    Allow(Option<HostRule>),
    /// Refused, with the reason (`deny RULE`, `not allowed`, `closed`, `restricted range`).
    Deny(String),
}

impl Verdict {
    /// Whether it allows.
    pub fn allowed(&self) -> bool {
        matches!(self, Self::Allow(_))
    }
}

/// A VM's egress policy. See the module doc.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EgressPolicy {
    /// The default for what no rule names.
    pub mode: EgressMode,
    /// What is allowed (in `allowlist` mode, the only things).
    #[serde(default)]
    pub allow: Vec<HostRule>,
    /// What is refused whatever else says; deny wins.
    #[serde(default)]
    pub deny: Vec<HostRule>,
}

impl EgressPolicy {
    /// A policy from its parts, with the lists checked for size and deduplicated in order.
    pub fn new(mode: EgressMode, allow: Vec<HostRule>, deny: Vec<HostRule>) -> Result<Self, EgressError> {
        let dedup = |list: Vec<HostRule>, name| {
            let mut out: Vec<HostRule> = Vec::with_capacity(list.len());
            for rule in list {
                if !out.contains(&rule) {
                    out.push(rule);
                }
            }
            if out.len() > MAX_RULES {
                return Err(EgressError::TooMany { list: name, count: out.len() });
            }
            Ok(out)
        };
        Ok(Self { mode, allow: dedup(allow, "allow")?, deny: dedup(deny, "deny")? })
    }

    /// Parses rule texts (`--allow-host`, `--deny-host`) into a policy.
    pub fn parse(mode: EgressMode, allow: &[String], deny: &[String]) -> Result<Self, EgressError> {
        let rules = |list: &[String]| list.iter().map(|s| s.parse()).collect::<Result<Vec<HostRule>, _>>();
        Self::new(mode, rules(allow)?, rules(deny)?)
    }

    /// Whether the guest may resolve `name` (for `port`, when known): DNS answers and the
    /// proxy's Host/SNI check use this.
    pub fn check_name(&self, name: &str, port: Option<u16>) -> Verdict {
        if let Some(rule) = self.deny.iter().find(|r| r.matches_name(name) && r.covers_port(port)) {
            return Verdict::Deny(format!("deny {rule}"));
        }
        match self.mode {
            EgressMode::Closed => Verdict::Deny("mode closed".to_owned()),
            EgressMode::Open => Verdict::Allow(None),
            EgressMode::Allowlist => match self.allow.iter().find(|r| r.matches_name(name) && r.covers_port(port)) {
                Some(rule) => Verdict::Allow(Some(rule.clone())),
                None => Verdict::Deny("not in allowlist".to_owned()),
            },
        }
    }

    /// Whether the guest may connect to `addr:port` by address alone (ignoring what names it
    /// learned), as the nftables rules decide it.
    pub fn check_addr(&self, addr: Ipv4Addr, port: Option<u16>) -> Verdict {
        if let Some(rule) = self.deny.iter().find(|r| r.matches_addr(addr) && r.covers_port(port)) {
            return Verdict::Deny(format!("deny {rule}"));
        }
        if self.mode == EgressMode::Closed {
            return Verdict::Deny("mode closed".to_owned());
        }
        if let Some(rule) = self.allow.iter().find(|r| r.matches_addr(addr) && r.covers_port(port)) {
            return Verdict::Allow(Some(rule.clone()));
        }
        if is_restricted(addr) {
            return Verdict::Deny("restricted range".to_owned());
        }
        match self.mode {
            EgressMode::Open => Verdict::Allow(None),
            _ => Verdict::Deny("not in allowlist".to_owned()),
        }
    }

    /// The name rules (domains, wildcards) of `allow`.
    pub fn allowed_names(&self) -> impl Iterator<Item = &HostRule> {
        self.allow.iter().filter(|r| r.is_name())
    }

    /// Whether any rule names a domain or wildcard (then HTTP/HTTPS names are checked).
    pub fn has_name_rules(&self) -> bool {
        self.allow.iter().chain(&self.deny).any(HostRule::is_name)
    }
}

impl fmt::Display for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mode.as_str())?;
        let list = |rules: &[HostRule]| rules.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        if !self.allow.is_empty() {
            write!(f, " allow={}", list(&self.allow))?;
        }
        if !self.deny.is_empty() {
            write!(f, " deny={}", list(&self.deny))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> HostRule {
        s.parse().expect(s)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect(s)
    }

    #[test]
    fn rules_parse_and_print_back() {
        for text in [
            "api.github.com",
            "*.pypi.org",
            "198.18.0.1",
            "10.0.0.0/8",
            "api.github.com:443",
            "*.x.test:80",
            "1.2.3.0/24:53",
        ] {
            assert_eq!(rule(text).to_string(), text);
        }
        assert_eq!(rule("API.GitHub.com.").to_string(), "api.github.com");
        assert_eq!(rule("1.2.3.4").host, HostMatch::Net { addr: ip("1.2.3.4"), prefix_len: 32 });
    }

    #[test]
    fn bad_rules_say_why() {
        for (text, why) in [
            ("", "empty"),
            ("a.test:0", "port"),
            ("a.test:99999", "port"),
            ("a.test:x", "port"),
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0/33", "more than 32"),
            ("300.1.1.1", "IPv4"),
            ("a.*.test", "leading"),
            ("*.", "after *."),
            ("exa mple.com", "domain"),
            ("-bad.test", "domain"),
        ] {
            let err = text.parse::<HostRule>().expect_err(text).to_string();
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains("optionally with :PORT"), "{err}");
        }
        assert!("nope".parse::<EgressMode>().expect_err("mode").to_string().contains("open, allowlist or closed"));
    }

    #[test]
    fn wildcards_match_subdomains_not_the_parent() {
        let w = rule("*.wild.test");
        assert!(w.matches_name("a.wild.test") && w.matches_name("A.B.Wild.Test."));
        assert!(!w.matches_name("wild.test") && !w.matches_name("evilwild.test") && !w.matches_name("wild.test.evil"));
        let d = rule("allowed.test");
        assert!(d.matches_name("ALLOWED.test.") && !d.matches_name("x.allowed.test"));
    }

    #[test]
    fn deny_wins_and_modes_decide_the_rest() {
        let p = EgressPolicy::parse(
            EgressMode::Allowlist,
            &["*.wild.test".into(), "allowed.test:443".into(), "198.18.5.0/24".into(), "10.1.2.3".into()],
            &["bad.wild.test".into(), "198.18.5.7".into()],
        )
        .expect("policy");
        assert!(p.check_name("a.wild.test", Some(80)).allowed());
        assert_eq!(p.check_name("bad.wild.test", None), Verdict::Deny("deny bad.wild.test".into()));
        assert!(!p.check_name("wild.test", None).allowed());
        assert!(p.check_name("allowed.test", Some(443)).allowed());
        assert!(!p.check_name("allowed.test", Some(80)).allowed());
        assert!(p.check_addr(ip("198.18.5.9"), Some(22)).allowed());
        assert_eq!(p.check_addr(ip("198.18.5.7"), Some(22)), Verdict::Deny("deny 198.18.5.7".into()));
        assert!(!p.check_addr(ip("198.18.6.1"), None).allowed());
        // An explicit address rule opens a private address; nothing else does.
        assert!(p.check_addr(ip("10.1.2.3"), None).allowed());
        let open = EgressPolicy::default();
        assert!(open.check_addr(ip("198.18.6.1"), None).allowed() && open.check_name("anything.test", None).allowed());
        for restricted in ["169.254.169.254", "10.0.0.1", "192.168.1.1", "127.0.0.1", "172.16.0.1", "100.64.0.1"] {
            assert_eq!(open.check_addr(ip(restricted), None), Verdict::Deny("restricted range".into()), "{restricted}");
        }
        let closed = EgressPolicy::parse(EgressMode::Closed, &["allowed.test".into()], &[]).expect("policy");
        assert!(
            !closed.check_name("allowed.test", None).allowed() && !closed.check_addr(ip("198.18.0.1"), None).allowed()
        );
    }

    #[test]
    fn lists_are_bounded_and_deduplicated() {
        let many: Vec<String> = (0..=MAX_RULES).map(|i| format!("h{i}.test")).collect();
        assert!(matches!(EgressPolicy::parse(EgressMode::Allowlist, &many, &[]), Err(EgressError::TooMany { .. })));
        let p = EgressPolicy::parse(EgressMode::Allowlist, &["a.test".into(), "A.test".into()], &[]).expect("p");
        assert_eq!(p.allow.len(), 1);
        let json = serde_json::to_string(&p).expect("json");
        assert_eq!(json, r#"{"mode":"allowlist","allow":["a.test"],"deny":[]}"#);
        assert_eq!(serde_json::from_str::<EgressPolicy>(&json).expect("back"), p);
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"mode":"allowlist","allow":["a b"]}"#).is_err());
    }
}
