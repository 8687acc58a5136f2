//! The host side of guest networking: banger's bridge, TAP devices (with a warm pool) and its
//! nftables tables, behind the narrow [`HostNet`] trait. [`NetlinkNet`] is the Linux
//! implementation (rtnetlink plus the `/dev/net/tun` ioctls, `nft` for rulesets), [`FakeNet`] a
//! recording fake; the pure model (subnet, addresses, MACs, names) is `banger_core::net`.

use std::future::Future;
use std::io;
use std::net::Ipv4Addr;

use banger_core::net::{is_banger_tap, IfName, Subnet};

pub mod egress;
mod fake;
mod netlink;
pub mod nflog;
pub mod nft;
mod pool;
mod tun;

pub use fake::{FakeNet, NetCall};
pub use netlink::NetlinkNet;
pub use nft::{open_guest_script, ruleset, GuestPort, NftConfig, PortForward, Protocol, LINK_LOCAL, REMOVE_SCRIPT};
pub use pool::TapPool;

/// A failed host networking operation; the source holds the errno or tool output.
#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    /// The netlink socket could not be opened.
    #[error("could not open a netlink socket")]
    Connect(#[source] io::Error),
    /// A netlink request failed.
    #[error("{op} `{link}`")]
    Netlink {
        /// What was attempted, e.g. "create bridge".
        op: &'static str,
        /// The link it was attempted on.
        link: String,
        /// The kernel's answer (an errno where there is one).
        #[source]
        source: io::Error,
    },
    /// A link the operation needs does not exist.
    #[error("network interface `{0}` does not exist")]
    NoSuchLink(String),
    /// Creating a TAP device through `/dev/net/tun` failed.
    #[error("create tap `{name}` through /dev/net/tun")]
    Tap {
        /// The TAP device's name.
        name: String,
        /// The ioctl's errno.
        #[source]
        source: io::Error,
    },
    /// A sysctl could not be written.
    #[error("write sysctl net/{key}")]
    Sysctl {
        /// The key under `/proc/sys`.
        key: String,
        /// The write's error.
        #[source]
        source: io::Error,
    },
    /// `nft` could not be run.
    #[error("could not run `nft` (is the nftables package installed?)")]
    NftSpawn(#[source] io::Error),
    /// `nft` ran and failed.
    #[error("`nft {args}` failed ({status}): {stderr}")]
    Nft {
        /// The arguments it was given.
        args: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
}

impl HostNetError {
    /// The errno behind a netlink or TAP error, if any (e.g. `EEXIST`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { source, .. } | Self::Tap { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// What banger needs to know about one network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// Its name.
    pub name: String,
    /// Its kernel index.
    pub index: u32,
    /// Its kind as netlink reports it (`bridge`, `tun`, ...), when reported.
    pub kind: Option<String>,
    /// The name of the bridge (or other controller) it is attached to, if any.
    pub controller: Option<String>,
    /// Whether it is administratively up.
    pub up: bool,
    /// Its alias (`ip link set NAME alias TEXT`), if set; banger marks its bridge's owner there.
    pub alias: Option<String>,
}

/// Host network effects banger needs. Every method is one kernel operation (or one `nft` run);
/// policies such as idempotent setup live in free functions over this trait, so that they are
/// tested against [`FakeNet`].
pub trait HostNet: Send + Sync {
    /// Creates a bridge named `name` (down, no address). Fails with `EEXIST` if a link of that
    /// name exists.
    fn create_bridge(&self, name: &str) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Gives `link` the address `addr/prefix_len`, replacing the same address if present.
    fn set_addr(
        &self,
        link: &str,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Sets the hardware address of `link`.
    fn set_mac(&self, link: &str, mac: [u8; 6]) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Sets the alias of `link` (free text, at most 255 bytes).
    fn set_alias(&self, link: &str, alias: &str) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Sets `link` administratively up.
    fn link_up(&self, link: &str) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Creates a persistent TAP device `name` (`IFF_TAP | IFF_NO_PI`), owned by uid `owner` when
    /// given so that an unprivileged VMM can open it. An existing persistent TAP of that name is
    /// reused; any other link of that name makes it fail.
    fn create_tap(&self, name: &str, owner: Option<u32>) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Attaches `link` to the bridge `bridge`.
    fn attach(&self, link: &str, bridge: &str) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Makes bridge port `link` a guest port: isolated (the bridge forwards nothing between two
    /// isolated ports, so guest↔guest traffic has to be routed through the host and its
    /// firewall), with learning off (a guest cannot move another's forwarding entry to itself)
    /// and unknown-unicast flooding off (frames for a MAC with no static entry reach no guest).
    fn isolate_port(&self, link: &str) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Binds bridge port `link` to `mac`: a static forwarding entry for `mac` on that port,
    /// replacing any other static entry the port had; `None` removes them all (the port is
    /// bound to no VM).
    fn bind_port_mac(&self, link: &str, mac: Option<[u8; 6]>) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Writes `value` to `/proc/sys/KEY` (per network namespace for `net/...` keys).
    fn set_sysctl(&self, key: &str, value: &str) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Reads `/proc/sys/KEY`, trimmed.
    fn read_sysctl(&self, key: &str) -> impl Future<Output = Result<String, HostNetError>> + Send;
    /// Deletes `name`; deleting a link that does not exist succeeds (returns `false`).
    fn delete_link(&self, name: &str) -> impl Future<Output = Result<bool, HostNetError>> + Send;
    /// Whether a link called `name` exists.
    fn link_exists(&self, name: &str) -> impl Future<Output = Result<bool, HostNetError>> + Send;
    /// The state of `name`, or `None` if it does not exist.
    fn link(&self, name: &str) -> impl Future<Output = Result<Option<LinkState>, HostNetError>> + Send;
    /// Every link in the namespace.
    fn links(&self) -> impl Future<Output = Result<Vec<LinkState>, HostNetError>> + Send;
    /// Loads an nftables script as one transaction (`nft -f -`).
    fn apply_nft(&self, script: &str) -> impl Future<Output = Result<(), HostNetError>> + Send;
    /// Lists one table (`nft list table FAMILY NAME`); `None` if it does not exist.
    fn list_nft_table(
        &self,
        family: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, HostNetError>> + Send;
}

/// Makes sure the bridge exists with the gateway address of `subnet` and [`bridge_mac`], and is
/// up. Idempotent: run it at every daemon start.
pub async fn ensure_bridge<N: HostNet>(net: &N, bridge: &IfName, subnet: &Subnet) -> Result<(), HostNetError> {
    if !net.link_exists(bridge.as_str()).await? {
        net.create_bridge(bridge.as_str()).await?;
    }
    net.set_addr(bridge.as_str(), subnet.gateway(), subnet.prefix_len()).await?;
    net.set_mac(bridge.as_str(), bridge_mac(bridge)).await?;
    for (key, value) in bridge_sysctls(bridge) {
        net.set_sysctl(&key, value).await?;
    }
    net.link_up(bridge.as_str()).await
}

/// The bridge's fixed MAC address (locally administered, derived from its name). A bridge with
/// no address of its own takes its ports' lowest, which changes as pool TAPs come and go; guests
/// would then send to a gateway MAC nobody has, and with flooding off nothing would get it.
pub fn bridge_mac(bridge: &IfName) -> [u8; 6] {
    banger_core::net::mac_for(&format!("bridge/{bridge}"))
}

/// The forwarding sysctl that NAT needs besides the bridge's: IPv4 forwards a packet only when its
/// *input* device forwards, so replies arriving on the uplink need it there (`all` when no
/// uplink is named).
pub fn uplink_forwarding_key(uplink: Option<&IfName>) -> String {
    format!("net/ipv4/conf/{}/forwarding", uplink.map_or("all", IfName::as_str))
}

/// The sysctls of banger's bridge. Its ports are isolated, so the host answers ARP for every
/// guest (`proxy_arp` + `proxy_arp_pvlan`) and routes guest↔guest traffic itself, where the
/// `inet banger` forward chain decides (refusing by default). Forwarding is enabled for traffic
/// arriving on the bridge only (IPv4 checks the input device); redirects are off because guests
/// cannot reach each other directly.
pub fn bridge_sysctls(bridge: &IfName) -> Vec<(String, &'static str)> {
    let b = bridge.as_str();
    vec![
        (format!("net/ipv4/conf/{b}/forwarding"), "1"),
        (format!("net/ipv4/conf/{b}/proxy_arp"), "1"),
        (format!("net/ipv4/conf/{b}/proxy_arp_pvlan"), "1"),
        (format!("net/ipv4/conf/{b}/send_redirects"), "0"),
    ]
}

/// Makes a TAP device the slow way (create, attach to `bridge`, up): what a VM create costs
/// when the pool is empty. A half-made device is deleted again on failure.
pub async fn create_attached_tap<N: HostNet>(
    net: &N,
    name: &str,
    owner: Option<u32>,
    bridge: &str,
) -> Result<(), HostNetError> {
    net.create_tap(name, owner).await?;
    let rest = async {
        net.attach(name, bridge).await?;
        net.isolate_port(name).await?;
        net.link_up(name).await
    };
    if let Err(e) = rest.await {
        if let Err(cleanup) = net.delete_link(name).await {
            tracing::warn!(tap = name, error = %banger_core::error_chain(&cleanup), "could not delete half-made tap");
        }
        return Err(e);
    }
    Ok(())
}

/// Removes everything banger made on the host network: its nft tables, every banger TAP device
/// (per-VM and pool) and the bridge. Idempotent; returns the links it deleted.
pub async fn teardown<N: HostNet>(net: &N, bridge: &IfName) -> Result<Vec<String>, HostNetError> {
    net.apply_nft(REMOVE_SCRIPT).await?;
    let mut deleted = Vec::new();
    for link in net.links().await? {
        if is_banger_tap(&link.name) && net.delete_link(&link.name).await? {
            deleted.push(link.name);
        }
    }
    if net.delete_link(bridge.as_str()).await? {
        deleted.push(bridge.to_string());
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
    }

    #[test]
    fn ensure_bridge_creates_once_then_only_refreshes() {
        let net = FakeNet::default();
        let bridge = IfName::default();
        let subnet = Subnet::default();
        block_on(ensure_bridge(&net, &bridge, &subnet)).expect("first");
        let first = net.calls().len();
        block_on(ensure_bridge(&net, &bridge, &subnet)).expect("second");
        let calls = net.calls();
        assert!(!calls[first..].iter().any(|c| matches!(c, NetCall::CreateBridge { .. })), "created twice");
        assert_eq!(net.sysctl("net/ipv4/conf/banger0/proxy_arp_pvlan").as_deref(), Some("1"));
        assert_eq!(net.sysctl("net/ipv4/conf/banger0/forwarding").as_deref(), Some("1"));
        assert_eq!(calls.last(), Some(&NetCall::LinkUp { link: "banger0".into() }));
        let gw = subnet.gateway();
        let b = || "banger0".to_owned();
        assert_eq!(
            calls[..3],
            [
                NetCall::LinkExists { name: b() },
                NetCall::CreateBridge { name: b() },
                NetCall::SetAddr { link: b(), addr: gw, prefix_len: subnet.prefix_len() },
            ]
        );
        let state = block_on(net.link("banger0")).expect("link").expect("exists");
        assert!(state.up && state.kind.as_deref() == Some("bridge"));
    }

    #[test]
    fn half_made_tap_is_deleted_when_attach_fails() {
        let net = FakeNet::default();
        let err = block_on(create_attached_tap(&net, "bgtap0", None, "missing0")).expect_err("no bridge");
        assert!(matches!(err, HostNetError::NoSuchLink(ref l) if l == "missing0"), "{err:?}");
        assert_eq!(net.calls().last(), Some(&NetCall::DeleteLink { name: "bgtap0".into() }));
        assert!(!block_on(net.link_exists("bgtap0")).expect("query"));
    }

    #[test]
    fn teardown_removes_banger_links_and_tables_only() {
        let net = FakeNet::default();
        let bridge = IfName::default();
        block_on(async {
            ensure_bridge(&net, &bridge, &Subnet::default()).await?;
            create_attached_tap(&net, "bgtap3", None, "banger0").await?;
            create_attached_tap(&net, "bgpool0", Some(1000), "banger0").await?;
            net.create_tap("usertap", None).await?;
            net.apply_nft("table inet banger {\n}\n").await
        })
        .expect("setup");
        let deleted = block_on(teardown(&net, &bridge)).expect("teardown");
        assert_eq!(deleted, ["bgpool0", "bgtap3", "banger0"]);
        assert!(block_on(net.link_exists("usertap")).expect("query"));
        assert_eq!(block_on(net.list_nft_table("inet", "banger")).expect("list"), None);
        assert_eq!(block_on(teardown(&net, &bridge)).expect("again"), Vec::<String>::new());
    }
}
