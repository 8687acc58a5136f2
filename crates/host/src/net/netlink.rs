//! [`NetlinkNet`]: [`HostNet`] on Linux. Links and addresses go through rtnetlink (never by
//! parsing `ip` output), TAP devices through the `/dev/net/tun` ioctls, rulesets through `nft`.
//! Everything happens in the network namespace the socket was opened in (and, for TAPs and
//! `nft`, of the calling thread), which is what lets tests run in a private namespace.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoBridgePort, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use super::{HostNet, HostNetError, LinkState};

/// The Linux host network, through one rtnetlink socket. Must be created inside a tokio runtime
/// (the socket's driver runs as a task of it); dropping it stops that task.
#[derive(Debug)]
pub struct NetlinkNet {
    handle: Handle,
    driver: JoinHandle<()>,
}

impl Drop for NetlinkNet {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) if msg.code.is_some() => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

fn nl(op: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> HostNetError {
    let link = link.to_owned();
    move |e| HostNetError::Netlink { op, link, source: to_io(e) }
}

fn is_enodev(e: &rtnetlink::Error) -> bool {
    is_errno(e, libc::ENODEV)
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(msg) if msg.raw_code().abs() == errno)
}

/// A static bridge forwarding entry (`bridge fdb add MAC dev LINK master static`): state NOARP,
/// for the port's controller (the bridge), not the port itself.
fn fdb_message(index: u32, lla: &[u8]) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Noarp;
    msg.header.flags = NeighbourFlags::Controller;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(lla.to_vec()));
    msg
}

fn lla_of(msg: &NeighbourMessage) -> Option<Vec<u8>> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(lla) => Some(lla.clone()),
        _ => None,
    })
}

impl NetlinkNet {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn connect() -> Result<Self, HostNetError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(HostNetError::Connect)?;
        let driver = tokio::spawn(connection);
        Ok(Self { handle, driver })
    }

    async fn get_by_name(&self, name: &str) -> Result<Option<LinkMessage>, HostNetError> {
        match self.handle.link().get().match_name(name).execute().try_next().await {
            Ok(msg) => Ok(msg),
            Err(e) if is_enodev(&e) => Ok(None),
            Err(e) => Err(nl("look up", name)(e)),
        }
    }

    async fn index_of(&self, name: &str) -> Result<u32, HostNetError> {
        match self.get_by_name(name).await? {
            Some(msg) => Ok(msg.header.index),
            None => Err(HostNetError::NoSuchLink(name.to_owned())),
        }
    }

    async fn name_of_index(&self, index: u32) -> Result<Option<String>, HostNetError> {
        match self.handle.link().get().match_index(index).execute().try_next().await {
            Ok(msg) => Ok(msg.as_ref().and_then(name_of)),
            Err(e) if is_enodev(&e) => Ok(None),
            Err(e) => Err(nl("look up", &format!("index {index}"))(e)),
        }
    }

    async fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, HostNetError> {
        let mut cmd = tokio::process::Command::new("nft");
        cmd.args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(HostNetError::NftSpawn)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            match pipe.write_all(text.as_bytes()).await {
                // nft stopped reading because it failed: its status and stderr say why.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                other => other.map_err(HostNetError::NftSpawn)?,
            }
            // Dropping the pipe sends EOF.
        }
        child.wait_with_output().await.map_err(HostNetError::NftSpawn)
    }
}

fn name_of(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn kind_of(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        }),
        _ => None,
    })
}

fn controller_of(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

fn state_of(msg: &LinkMessage, controller: Option<String>) -> LinkState {
    LinkState {
        name: name_of(msg).unwrap_or_default(),
        index: msg.header.index,
        kind: kind_of(msg),
        controller,
        up: msg.header.flags.contains(LinkFlags::Up),
        alias: msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfAlias(alias) => Some(alias.clone()),
            _ => None,
        }),
    }
}

impl HostNet for NetlinkNet {
    async fn create_bridge(&self, name: &str) -> Result<(), HostNetError> {
        let req = self.handle.link().add(LinkBridge::new(name).build());
        req.execute().await.map_err(nl("create bridge", name))
    }

    async fn set_addr(&self, link: &str, addr: Ipv4Addr, prefix_len: u8) -> Result<(), HostNetError> {
        let index = self.index_of(link).await?;
        let req = self.handle.address().add(index, IpAddr::V4(addr), prefix_len).replace();
        req.execute().await.map_err(nl("set address on", link))
    }

    async fn set_mac(&self, link: &str, mac: [u8; 6]) -> Result<(), HostNetError> {
        let req = self.handle.link().set(LinkUnspec::new_with_name(link).address(mac.to_vec()).build());
        req.execute().await.map_err(nl("set address of", link))
    }

    async fn set_alias(&self, link: &str, alias: &str) -> Result<(), HostNetError> {
        let req = self.handle.link().set(LinkUnspec::new_with_name(link).alias(alias).build());
        req.execute().await.map_err(nl("set alias of", link))
    }

    async fn link_up(&self, link: &str) -> Result<(), HostNetError> {
        let req = self.handle.link().set(LinkUnspec::new_with_name(link).up().build());
        req.execute().await.map_err(|e| {
            if is_enodev(&e) {
                HostNetError::NoSuchLink(link.to_owned())
            } else {
                nl("set up", link)(e)
            }
        })
    }

    async fn create_tap(&self, name: &str, owner: Option<u32>) -> Result<(), HostNetError> {
        // A handful of syscalls that do not block: run them on the calling thread, which also
        // keeps the device in this thread's network namespace.
        super::tun::create_persistent_tap(name, owner)
            .map_err(|source| HostNetError::Tap { name: name.to_owned(), source })
    }

    async fn attach(&self, link: &str, bridge: &str) -> Result<(), HostNetError> {
        let controller = self.index_of(bridge).await?;
        let msg = LinkUnspec::new_with_name(link).controller(controller).build();
        self.handle.link().set(msg).execute().await.map_err(|e| {
            if is_enodev(&e) {
                HostNetError::NoSuchLink(link.to_owned())
            } else {
                nl("attach", link)(e)
            }
        })
    }

    async fn isolate_port(&self, link: &str) -> Result<(), HostNetError> {
        let index = self.index_of(link).await?;
        let msg = LinkBridgePort::new(index)
            .append_info_data(InfoBridgePort::Isolated(true))
            .append_info_data(InfoBridgePort::Learning(false))
            .append_info_data(InfoBridgePort::UnicastFlood(false))
            .build();
        self.handle.link().set_port(msg).execute().await.map_err(nl("isolate bridge port", link))
    }

    async fn bind_port_mac(&self, link: &str, mac: Option<[u8; 6]>) -> Result<(), HostNetError> {
        let index = self.index_of(link).await?;
        let dump = self.handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
        let entries: Vec<NeighbourMessage> =
            dump.try_collect().await.map_err(nl("list forwarding entries of", link))?;
        for entry in entries {
            // Only static entries banger made: the port's own (permanent) and multicast entries stay.
            if entry.header.ifindex != index || entry.header.state != NeighbourState::Noarp {
                continue;
            }
            let Some(lla) = lla_of(&entry) else { continue };
            if mac.is_some_and(|m| m[..] == lla[..]) {
                continue;
            }
            match self.handle.neighbours().del(fdb_message(index, &lla)).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::ENOENT) => {}
                Err(e) => return Err(nl("delete forwarding entry of", link)(e)),
            }
        }
        if let Some(mac) = mac {
            let mut req = self.handle.neighbours().add_bridge(index, &mac).replace();
            *req.message_mut() = fdb_message(index, &mac);
            req.execute().await.map_err(nl("add forwarding entry to", link))?;
        }
        Ok(())
    }

    async fn set_sysctl(&self, key: &str, value: &str) -> Result<(), HostNetError> {
        // On the calling thread, not a blocking pool: `/proc/sys/net` is the calling thread's
        // network namespace, and a one-line procfs write does not block.
        let path = std::path::Path::new("/proc/sys").join(key);
        std::fs::write(&path, value).map_err(|source| HostNetError::Sysctl { key: key.to_owned(), source })
    }

    async fn read_sysctl(&self, key: &str) -> Result<String, HostNetError> {
        // The calling thread's namespace, as for `set_sysctl`.
        let path = std::path::Path::new("/proc/sys").join(key);
        std::fs::read_to_string(&path)
            .map(|v| v.trim().to_owned())
            .map_err(|source| HostNetError::Sysctl { key: key.to_owned(), source })
    }

    async fn delete_link(&self, name: &str) -> Result<bool, HostNetError> {
        let Some(msg) = self.get_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(msg.header.index).execute().await {
            Ok(()) => Ok(true),
            // Deleted by someone else in between: the goal is reached all the same.
            Err(e) if is_enodev(&e) => Ok(false),
            Err(e) => Err(nl("delete", name)(e)),
        }
    }

    async fn link_exists(&self, name: &str) -> Result<bool, HostNetError> {
        Ok(self.get_by_name(name).await?.is_some())
    }

    async fn link(&self, name: &str) -> Result<Option<LinkState>, HostNetError> {
        let Some(msg) = self.get_by_name(name).await? else {
            return Ok(None);
        };
        let controller = match controller_of(&msg) {
            Some(index) => self.name_of_index(index).await?,
            None => None,
        };
        Ok(Some(state_of(&msg, controller)))
    }

    async fn links(&self) -> Result<Vec<LinkState>, HostNetError> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await.map_err(nl("list", "*"))?;
        let names: std::collections::HashMap<u32, String> =
            msgs.iter().filter_map(|m| Some((m.header.index, name_of(m)?))).collect();
        Ok(msgs.iter().map(|m| state_of(m, controller_of(m).and_then(|i| names.get(&i).cloned()))).collect())
    }

    async fn apply_nft(&self, script: &str) -> Result<(), HostNetError> {
        let out = self.nft(&["-f", "-"], Some(script)).await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(HostNetError::Nft {
                args: "-f -".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    async fn list_nft_table(&self, family: &str, name: &str) -> Result<Option<String>, HostNetError> {
        let out = self.nft(&["list", "table", family, name], None).await?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if out.status.success() {
            Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
        } else if stderr.contains("No such file or directory") {
            Ok(None)
        } else {
            Err(HostNetError::Nft {
                args: format!("list table {family} {name}"),
                status: out.status.to_string(),
                stderr,
            })
        }
    }
}
