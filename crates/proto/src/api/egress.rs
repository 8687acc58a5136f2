//! A VM's egress policy and its denial log on the wire (`GET`/`PUT /v1/vms/{vm}/network`,
//! `GET /v1/vms/{vm}/network/log`, `egress` in `POST /v1/vms`), with the conversions from the
//! model (`banger_core::egress`). Rules travel as their text (`*.pypi.org`, `10.0.0.0/8:443`);
//! the daemon parses them and refuses a bad one with 400.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a VM may reach by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// Anything but link-local, loopback, private and shared ranges (and `deny`).
    #[default]
    Open,
    /// Only what `allow` names.
    Allowlist,
    /// Nothing outside the host; banger's own channel (exec, files) keeps working.
    Closed,
}

/// A VM's egress policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// The default for what no rule names.
    pub mode: EgressMode,
    /// Allowed hosts: `api.github.com`, `*.pypi.org`, `198.18.0.1`, `10.0.0.0/8`, each
    /// optionally with `:PORT`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Refused hosts, same forms; deny wins over allow.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `PUT /v1/vms/{vm}/network`: what to change; omitted fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetEgressRequest {
    /// The new mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<EgressMode>,
    /// The new `allow` list (replaces the old one; `[]` empties it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// The new `deny` list (replaces the old one; `[]` empties it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
}

/// `GET /v1/vms/{vm}/network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EgressView {
    /// The VM's name.
    pub vm: String,
    /// Its policy.
    pub policy: EgressPolicy,
    /// Whether the policy is in force right now (the VM runs with a NIC).
    pub enforced: bool,
    /// Addresses its guest may reach because an allowed name resolved to them, with the seconds
    /// each has left.
    pub learned: Vec<LearnedAddress>,
}

/// An address opened by a DNS answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LearnedAddress {
    /// The IPv4 address.
    pub address: String,
    /// The port it is open for, when the rule named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The name whose answer opened it.
    pub name: String,
    /// Seconds until it closes again.
    pub expires_in_secs: u64,
}

/// One refused connection or name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EgressDenial {
    /// Position in the VM's log (increases by one per denial, also past dropped ones).
    pub seq: u64,
    /// When (RFC 3339).
    pub time: String,
    /// The VM's name.
    pub vm: String,
    /// `dns`, `tcp`, `udp`, `icmp`, `http` or `tls`.
    pub protocol: String,
    /// The destination address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The destination port, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The name asked for (DNS), or sent (HTTP Host, TLS SNI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The rule or reason that decided: `deny RULE`, `not in allowlist`, `mode closed`,
    /// `restricted range`.
    pub rule: String,
    /// What was done: `refused` (DNS REFUSED), `reset` (TCP reset) or `rejected` (ICMP
    /// admin-prohibited).
    pub decision: String,
}

/// `GET /v1/vms/{vm}/network/log`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EgressLog {
    /// The denials after `after`, oldest first (at most the ring's size).
    pub denials: Vec<EgressDenial>,
    /// Denials not recorded because the VM went over the log's rate limit, since the daemon
    /// started.
    pub suppressed: u64,
    /// The `seq` to ask after for the next page (`--follow`).
    pub next: u64,
}

impl From<banger_core::egress::EgressMode> for EgressMode {
    fn from(m: banger_core::egress::EgressMode) -> Self {
        use banger_core::egress::EgressMode as M;
        match m {
            M::Open => Self::Open,
            M::Allowlist => Self::Allowlist,
            M::Closed => Self::Closed,
        }
    }
}

impl From<EgressMode> for banger_core::egress::EgressMode {
    fn from(m: EgressMode) -> Self {
        match m {
            EgressMode::Open => Self::Open,
            EgressMode::Allowlist => Self::Allowlist,
            EgressMode::Closed => Self::Closed,
        }
    }
}

impl From<banger_core::egress::EgressPolicy> for EgressPolicy {
    fn from(p: banger_core::egress::EgressPolicy) -> Self {
        let text = |rules: Vec<banger_core::egress::HostRule>| rules.iter().map(ToString::to_string).collect();
        Self { mode: p.mode.into(), allow: text(p.allow), deny: text(p.deny) }
    }
}

impl EgressPolicy {
    /// The model's policy; a rule that does not parse, or too many, is an error that names it.
    pub fn to_model(&self) -> Result<banger_core::egress::EgressPolicy, banger_core::egress::EgressError> {
        banger_core::egress::EgressPolicy::parse(self.mode.into(), &self.allow, &self.deny)
    }
}
