//! A port forward on the wire, sent by `POST /v1/vms/{vm}/forwards` and `POST /v1/vms`
//! (`publish`) and shown in answers, with the conversions to and from the model
//! (`banger_core::forward`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The transport a forward relays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForwardProtocol {
    /// TCP, the only one so far.
    #[default]
    Tcp,
}

impl ForwardProtocol {
    /// The name as sent and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
        }
    }
}

fn default_host_addr() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// One forward: connections to `host_addr:host_port` on the host reach `guest_port` in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Host address to listen on [default: 127.0.0.1, this host only; 0.0.0.0 for every
    /// interface].
    #[serde(default = "default_host_addr")]
    #[schema(value_type = String, example = "127.0.0.1")]
    pub host_addr: IpAddr,
    /// Host port, 1-65535.
    pub host_port: u16,
    /// Port in the guest, 1-65535.
    pub guest_port: u16,
    /// Transport [default: tcp].
    #[serde(default)]
    pub protocol: ForwardProtocol,
}

impl PortForward {
    /// `127.0.0.1:8080 -> web:80`, as the CLI prints it.
    pub fn describe(&self, vm: &str) -> String {
        format!("{} -> {vm}:{}", SocketAddr::new(self.host_addr, self.host_port), self.guest_port)
    }
}

impl From<banger_core::ForwardProtocol> for ForwardProtocol {
    fn from(p: banger_core::ForwardProtocol) -> Self {
        match p {
            banger_core::ForwardProtocol::Tcp => Self::Tcp,
        }
    }
}

impl From<ForwardProtocol> for banger_core::ForwardProtocol {
    fn from(p: ForwardProtocol) -> Self {
        match p {
            ForwardProtocol::Tcp => Self::Tcp,
        }
    }
}

impl From<banger_core::PortForward> for PortForward {
    fn from(f: banger_core::PortForward) -> Self {
        let banger_core::PortForward { host_addr, host_port, guest_port, protocol } = f;
        Self { host_addr, host_port, guest_port, protocol: protocol.into() }
    }
}

/// The daemon still checks the ports (`banger_core::PortForward::validate`): the wire lets 0
/// through, as it always did, so that the refusal names the fix.
impl From<PortForward> for banger_core::PortForward {
    fn from(f: PortForward) -> Self {
        let PortForward { host_addr, host_port, guest_port, protocol } = f;
        Self { host_addr, host_port, guest_port, protocol: protocol.into() }
    }
}
