//! Port forwards: a host address and port whose connections reach a port inside a VM. Parsing
//! the `[HOST_ADDR:]HOST_PORT:GUEST_PORT` notation of `banger vm forward` and `--publish`, and
//! the rule for which forwards cannot coexist. No I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The host address a forward listens on when the spec names none: this host only.
pub const DEFAULT_HOST_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The transport a forward relays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardProtocol {
    /// TCP, the only one so far.
    #[default]
    Tcp,
}

impl ForwardProtocol {
    /// The name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }
}

fn default_host_addr() -> IpAddr {
    DEFAULT_HOST_ADDR
}

/// One forward: connections to `host_addr:host_port` on the host reach `guest_port` in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Host address to listen on [default: 127.0.0.1, this host only; 0.0.0.0 for every
    /// interface].
    #[serde(default = "default_host_addr")]
    pub host_addr: IpAddr,
    /// Host port, 1-65535.
    pub host_port: u16,
    /// Port in the guest, 1-65535.
    pub guest_port: u16,
    /// Transport [default: tcp].
    #[serde(default)]
    pub protocol: ForwardProtocol,
}

/// Why a forward spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardSpecError {
    /// Not of the form `[HOST_ADDR:]HOST_PORT:GUEST_PORT`.
    #[error("'{0}' is not [HOST_ADDR:]HOST_PORT:GUEST_PORT; e.g. 8080:80 or 0.0.0.0:8443:443")]
    Shape(String),
    /// A port that is not a number from 1 to 65535.
    #[error("{which} port '{text}' in '{spec}' is not a number from 1 to 65535")]
    Port {
        /// `host` or `guest`.
        which: &'static str,
        /// The offending text.
        text: String,
        /// The whole spec.
        spec: String,
    },
    /// A host address that is not an IP address.
    #[error("host address '{text}' in '{spec}' is not an IP address; use 127.0.0.1 (this host only), 0.0.0.0 (every interface) or [::1]")]
    Address {
        /// The offending text.
        text: String,
        /// The whole spec.
        spec: String,
    },
    /// A protocol other than TCP.
    #[error("protocol '{text}' in '{spec}' is not supported; only tcp forwards exist so far")]
    Protocol {
        /// The offending text.
        text: String,
        /// The whole spec.
        spec: String,
    },
}

fn port(which: &'static str, text: &str, spec: &str) -> Result<u16, ForwardSpecError> {
    let bad = || ForwardSpecError::Port { which, text: text.to_owned(), spec: spec.to_owned() };
    // Digits only: `u16::from_str` would also take a leading '+'.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)
}

impl PortForward {
    /// A TCP forward.
    pub fn tcp(host_addr: IpAddr, host_port: u16, guest_port: u16) -> Self {
        Self { host_addr, host_port, guest_port, protocol: ForwardProtocol::Tcp }
    }

    /// Parses `[HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp]`; an IPv6 host address goes in brackets
    /// (`[::1]:8080:80`).
    pub fn parse(spec: &str) -> Result<Self, ForwardSpecError> {
        let text = spec.trim();
        let (body, protocol) = match text.rsplit_once('/') {
            Some((body, proto)) => {
                let protocol = ForwardProtocol::parse(&proto.to_ascii_lowercase())
                    .ok_or_else(|| ForwardSpecError::Protocol { text: proto.to_owned(), spec: spec.to_owned() })?;
                (body, protocol)
            }
            None => (text, ForwardProtocol::Tcp),
        };
        let (addr_text, ports) = if let Some(rest) = body.strip_prefix('[') {
            let (addr, after) = rest.split_once(']').ok_or_else(|| ForwardSpecError::Shape(spec.to_owned()))?;
            let ports = after.strip_prefix(':').ok_or_else(|| ForwardSpecError::Shape(spec.to_owned()))?;
            (Some(addr), ports)
        } else {
            match body.matches(':').count() {
                1 => (None, body),
                2 => body
                    .split_once(':')
                    .map(|(a, p)| (Some(a), p))
                    .ok_or_else(|| ForwardSpecError::Shape(spec.into()))?,
                _ => return Err(ForwardSpecError::Shape(spec.to_owned())),
            }
        };
        let (host, guest) = ports.split_once(':').ok_or_else(|| ForwardSpecError::Shape(spec.to_owned()))?;
        let host_addr = match addr_text {
            None => DEFAULT_HOST_ADDR,
            Some(a) => IpAddr::from_str(a)
                .map_err(|_| ForwardSpecError::Address { text: a.to_owned(), spec: spec.to_owned() })?,
        };
        Ok(Self { host_addr, host_port: port("host", host, spec)?, guest_port: port("guest", guest, spec)?, protocol })
    }

    /// Checks a forward that did not come through [`PortForward::parse`] (e.g. an API body).
    pub fn validate(&self) -> Result<(), ForwardSpecError> {
        for (which, p) in [("host", self.host_port), ("guest", self.guest_port)] {
            if p == 0 {
                return Err(ForwardSpecError::Port { which, text: "0".into(), spec: self.to_string() });
            }
        }
        Ok(())
    }

    /// Where it listens.
    pub fn host_socket(&self) -> SocketAddr {
        SocketAddr::new(self.host_addr, self.host_port)
    }

    /// Whether both cannot listen at once: the same port, and the same address or either one
    /// a wildcard (a wildcard listener takes the port on every address).
    pub fn overlaps(&self, other: &Self) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.host_addr == other.host_addr
                || self.host_addr.is_unspecified()
                || other.host_addr.is_unspecified())
    }

    /// `127.0.0.1:8080 -> web:80`, as the CLI prints it.
    pub fn describe(&self, vm: &str) -> String {
        format!("{} -> {vm}:{}", self.host_socket(), self.guest_port)
    }
}

impl fmt::Display for PortForward {
    /// The spec notation, always with the address: `127.0.0.1:8080:80`, `[::1]:8080:80`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host_socket(), self.guest_port)
    }
}

impl FromStr for PortForward {
    type Err = ForwardSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Parses `[HOST_ADDR:]HOST_PORT`, the way a forward is named for removal: `8080`,
/// `0.0.0.0:8080`, `[::1]:8080`.
pub fn parse_host_port(text: &str) -> Result<(Option<IpAddr>, u16), ForwardSpecError> {
    let trimmed = text.trim();
    if let Ok(addr) = SocketAddr::from_str(trimmed) {
        return Ok((Some(addr.ip()), port("host", &addr.port().to_string(), text)?));
    }
    match trimmed.rsplit_once(':') {
        None => Ok((None, port("host", trimmed, text)?)),
        Some((addr, p)) => {
            let ip = IpAddr::from_str(addr.trim_start_matches('[').trim_end_matches(']'))
                .map_err(|_| ForwardSpecError::Address { text: addr.to_owned(), spec: text.to_owned() })?;
            Ok((Some(ip), port("host", p, text)?))
        }
    }
}

/// A stored forward: the VM it belongs to and the forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRecord {
    /// The VM's id.
    pub vm_id: String,
    /// The forward.
    pub forward: PortForward,
}

/// The first two forwards of `forwards` that overlap, if any.
pub fn first_overlap(forwards: &[PortForward]) -> Option<(PortForward, PortForward)> {
    forwards.iter().enumerate().find_map(|(i, a)| forwards[i + 1..].iter().find(|b| a.overlaps(b)).map(|b| (*a, *b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn specs_parse_with_and_without_an_address() {
        assert_eq!(PortForward::parse("8080:80"), Ok(PortForward::tcp(DEFAULT_HOST_ADDR, 8080, 80)));
        assert_eq!(PortForward::parse("0.0.0.0:8443:443"), Ok(PortForward::tcp(ip("0.0.0.0"), 8443, 443)));
        assert_eq!(PortForward::parse(" 10.0.0.5:1:65535/tcp "), Ok(PortForward::tcp(ip("10.0.0.5"), 1, 65535)));
        assert_eq!(
            PortForward::parse("[::1]:8080:80/TCP"),
            Ok(PortForward::tcp(IpAddr::V6(Ipv6Addr::LOCALHOST), 8080, 80))
        );
        assert_eq!(PortForward::parse("[::]:80:80"), Ok(PortForward::tcp(ip("::"), 80, 80)));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let err = |s: &str| PortForward::parse(s).expect_err(s).to_string();
        for shape in ["80", "", "a:b:c:d", "[::1]8080:80", "[::1:8080:80", "1:2:3:4"] {
            assert!(err(shape).contains("is not [HOST_ADDR:]HOST_PORT:GUEST_PORT"), "{shape}: {}", err(shape));
        }
        assert_eq!(err("99999:80"), "host port '99999' in '99999:80' is not a number from 1 to 65535");
        assert_eq!(err("8080:0"), "guest port '0' in '8080:0' is not a number from 1 to 65535");
        assert!(err("8080:+80").contains("guest port '+80'"));
        assert!(err(":80").contains("host port ''"));
        assert!(err("localhost:8080:80").contains("host address 'localhost'"));
        assert!(err("localhost:8080:80").contains("use 127.0.0.1"));
        assert!(err("::1:8080:80").contains("is not [HOST_ADDR:]HOST_PORT:GUEST_PORT"));
        assert!(err("8080:80/udp").contains("protocol 'udp'"));
    }

    #[test]
    fn host_ports_parse_with_an_optional_address() {
        assert_eq!(parse_host_port("8080"), Ok((None, 8080)));
        assert_eq!(parse_host_port("0.0.0.0:8080"), Ok((Some(ip("0.0.0.0")), 8080)));
        assert_eq!(parse_host_port("[::1]:8080"), Ok((Some(ip("::1")), 8080)));
        assert!(parse_host_port("0").is_err());
        assert!(parse_host_port("x:80").expect_err("bad address").to_string().contains("host address 'x'"));
        assert!(parse_host_port("1.2.3.4:99999").expect_err("bad port").to_string().contains("host port '99999'"));
    }

    #[test]
    fn display_round_trips() {
        for s in ["127.0.0.1:8080:80", "[::1]:8080:80", "0.0.0.0:1:2"] {
            let f = PortForward::parse(s).expect("parse");
            assert_eq!(f.to_string(), s);
            assert_eq!(PortForward::parse(&f.to_string()), Ok(f));
        }
        assert_eq!(PortForward::parse("8080:80").expect("parse").describe("web"), "127.0.0.1:8080 -> web:80");
    }

    #[test]
    fn overlaps_follow_the_kernel_bind_rules() {
        let f = |s: &str| PortForward::parse(s).expect(s);
        assert!(f("8080:80").overlaps(&f("127.0.0.1:8080:81")));
        assert!(f("8080:80").overlaps(&f("0.0.0.0:8080:80")));
        assert!(f("[::]:8080:80").overlaps(&f("10.0.0.1:8080:80")));
        assert!(!f("8080:80").overlaps(&f("8081:80")));
        assert!(!f("127.0.0.1:8080:80").overlaps(&f("127.0.0.2:8080:80")));
        assert_eq!(first_overlap(&[f("1:1"), f("2:2"), f("0.0.0.0:2:3")]), Some((f("2:2"), f("0.0.0.0:2:3"))));
        assert_eq!(first_overlap(&[f("1:1"), f("2:2")]), None);
    }

    #[test]
    fn json_defaults_the_address_and_protocol() {
        let f: PortForward = serde_json::from_str(r#"{"host_port": 8080, "guest_port": 80}"#).expect("json");
        assert_eq!(f, PortForward::tcp(DEFAULT_HOST_ADDR, 8080, 80));
        let json = serde_json::to_string(&f).expect("json");
        assert_eq!(json, r#"{"host_addr":"127.0.0.1","host_port":8080,"guest_port":80,"protocol":"tcp"}"#);
        assert!(serde_json::from_str::<PortForward>(r#"{"host_port":1,"guest_port":1,"protocol":"udp"}"#).is_err());
        let zero: PortForward = serde_json::from_str(r#"{"host_port": 0, "guest_port": 80}"#).expect("json");
        assert!(zero.validate().is_err());
    }
}
