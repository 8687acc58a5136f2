//! [`FakeNet`]: an in-memory [`HostNet`] that behaves like the kernel for the operations banger
//! uses (names are unique, attach needs both links, delete is idempotent) and records every call.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use super::{HostNet, HostNetError, LinkState};

/// One call made on a [`FakeNet`], with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    /// [`HostNet::create_bridge`].
    CreateBridge {
        /// Bridge name.
        name: String,
    },
    /// [`HostNet::set_addr`].
    SetAddr {
        /// Link name.
        link: String,
        /// Address.
        addr: Ipv4Addr,
        /// Prefix length.
        prefix_len: u8,
    },
    /// [`HostNet::set_mac`].
    SetMac {
        /// Link name.
        link: String,
        /// The address.
        mac: [u8; 6],
    },
    /// [`HostNet::set_alias`].
    SetAlias {
        /// Link name.
        link: String,
        /// The alias.
        alias: String,
    },
    /// [`HostNet::link_up`].
    LinkUp {
        /// Link name.
        link: String,
    },
    /// [`HostNet::create_tap`].
    CreateTap {
        /// TAP name.
        name: String,
        /// Owning uid.
        owner: Option<u32>,
    },
    /// [`HostNet::attach`].
    Attach {
        /// Link name.
        link: String,
        /// Bridge name.
        bridge: String,
    },
    /// [`HostNet::isolate_port`].
    IsolatePort {
        /// Link name.
        link: String,
    },
    /// [`HostNet::bind_port_mac`].
    BindPortMac {
        /// Link name.
        link: String,
        /// The MAC it is bound to, if any.
        mac: Option<[u8; 6]>,
    },
    /// [`HostNet::set_sysctl`].
    SetSysctl {
        /// Key under `/proc/sys`, with `/` separators.
        key: String,
        /// Value written.
        value: String,
    },
    /// [`HostNet::read_sysctl`].
    ReadSysctl {
        /// Key under `/proc/sys`.
        key: String,
    },
    /// [`HostNet::delete_link`].
    DeleteLink {
        /// Link name.
        name: String,
    },
    /// [`HostNet::link_exists`].
    LinkExists {
        /// Link name.
        name: String,
    },
    /// [`HostNet::link`].
    Link {
        /// Link name.
        name: String,
    },
    /// [`HostNet::links`].
    Links,
    /// [`HostNet::apply_nft`].
    ApplyNft {
        /// The script.
        script: String,
    },
    /// [`HostNet::list_nft_table`].
    ListNftTable {
        /// Table family.
        family: String,
        /// Table name.
        name: String,
    },
}

#[derive(Debug, Clone)]
struct FakeLink {
    index: u32,
    kind: &'static str,
    up: bool,
    controller: Option<String>,
    isolated: bool,
    bound_mac: Option<[u8; 6]>,
    alias: Option<String>,
    addrs: Vec<(Ipv4Addr, u8)>,
}

type FailWhen = Box<dyn Fn(&NetCall) -> bool + Send>;

#[derive(Default)]
struct State {
    calls: Vec<NetCall>,
    links: BTreeMap<String, FakeLink>,
    next_index: u32,
    tables: BTreeMap<(String, String), String>,
    sysctls: BTreeMap<String, String>,
    fail_when: Vec<FailWhen>,
}

/// An in-memory host network. nft scripts are interpreted only as far as banger's own scripts
/// need: `table F N { ... }` blocks (the closing brace at column 0) create or replace a table,
/// `delete table F N` removes one, and a bare `table F N` creates an empty one. A call is
/// recorded and takes effect when the method is called, not when its future is awaited.
#[derive(Default)]
pub struct FakeNet {
    state: Mutex<State>,
}

impl std::fmt::Debug for FakeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("FakeNet").field("calls", &s.calls).field("links", &s.links).finish_non_exhaustive()
    }
}

fn os_err(op: &'static str, link: &str, errno: i32) -> HostNetError {
    HostNetError::Netlink { op, link: link.to_owned(), source: io::Error::from_raw_os_error(errno) }
}

impl FakeNet {
    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<NetCall> {
        self.lock().calls.clone()
    }

    /// Forgets the recorded calls (the simulated state stays).
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Makes the next call that matches `pred` fail with `EIO`, once.
    pub fn fail_next(&self, pred: impl Fn(&NetCall) -> bool + Send + 'static) {
        self.lock().fail_when.push(Box::new(pred));
    }

    /// The addresses the fake has on `link`.
    pub fn addrs(&self, link: &str) -> Vec<(Ipv4Addr, u8)> {
        self.lock().links.get(link).map(|l| l.addrs.clone()).unwrap_or_default()
    }

    /// Whether `link` is an isolated bridge port.
    pub fn is_isolated(&self, link: &str) -> bool {
        self.lock().links.get(link).is_some_and(|l| l.isolated)
    }

    /// The MAC bridge port `link` is bound to, if any.
    pub fn bound_mac(&self, link: &str) -> Option<[u8; 6]> {
        self.lock().links.get(link).and_then(|l| l.bound_mac)
    }

    /// The value last written to sysctl `key`, if any.
    pub fn sysctl(&self, key: &str) -> Option<String> {
        self.lock().sysctls.get(key).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a failed test assertion.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `call`, then runs `f` on the state unless an injected failure matches.
    fn record<T>(
        &self,
        call: NetCall,
        op: &'static str,
        link: &str,
        f: impl FnOnce(&mut State) -> Result<T, HostNetError>,
    ) -> Result<T, HostNetError> {
        let mut s = self.lock();
        s.calls.push(call.clone());
        if let Some(i) = s.fail_when.iter().position(|p| p(&call)) {
            drop(s.fail_when.remove(i));
            return Err(os_err(op, link, libc::EIO));
        }
        f(&mut s)
    }
}

impl State {
    fn add_link(&mut self, name: &str, kind: &'static str, op: &'static str) -> Result<(), HostNetError> {
        if self.links.contains_key(name) {
            return Err(os_err(op, name, libc::EEXIST));
        }
        self.next_index += 1;
        let link = FakeLink {
            index: self.next_index,
            kind,
            up: false,
            controller: None,
            isolated: false,
            bound_mac: None,
            alias: None,
            addrs: Vec::new(),
        };
        self.links.insert(name.to_owned(), link);
        Ok(())
    }

    fn link_mut(&mut self, name: &str) -> Result<&mut FakeLink, HostNetError> {
        self.links.get_mut(name).ok_or_else(|| HostNetError::NoSuchLink(name.to_owned()))
    }

    fn state_of(&self, name: &str, l: &FakeLink) -> LinkState {
        LinkState {
            name: name.to_owned(),
            index: l.index,
            kind: Some(l.kind.to_owned()),
            controller: l.controller.clone(),
            up: l.up,
            alias: l.alias.clone(),
        }
    }

    fn apply_script(&mut self, script: &str) {
        let mut lines = script.lines();
        while let Some(line) = lines.next() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["delete", "table", family, name] => {
                    self.tables.remove(&(family.to_string(), name.to_string()));
                }
                ["table", family, name] => {
                    self.tables.entry((family.to_string(), name.to_string())).or_default();
                }
                ["table", family, name, "{"] => {
                    let mut body = format!("{line}\n");
                    for inner in lines.by_ref() {
                        body.push_str(inner);
                        body.push('\n');
                        if inner.starts_with('}') {
                            break;
                        }
                    }
                    self.tables.insert((family.to_string(), name.to_string()), body);
                }
                _ => {}
            }
        }
    }
}

fn ready<T: Send>(v: T) -> impl Future<Output = T> + Send {
    std::future::ready(v)
}

impl HostNet for FakeNet {
    fn create_bridge(&self, name: &str) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::CreateBridge { name: name.to_owned() };
        ready(self.record(call, "create bridge", name, |s| s.add_link(name, "bridge", "create bridge")))
    }

    fn set_addr(
        &self,
        link: &str,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::SetAddr { link: link.to_owned(), addr, prefix_len };
        ready(self.record(call, "set address on", link, |s| {
            let l = s.link_mut(link)?;
            if !l.addrs.contains(&(addr, prefix_len)) {
                l.addrs.push((addr, prefix_len));
            }
            Ok(())
        }))
    }

    fn set_mac(&self, link: &str, mac: [u8; 6]) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::SetMac { link: link.to_owned(), mac };
        ready(self.record(call, "set address of", link, |s| s.link_mut(link).map(|_| ())))
    }

    fn set_alias(&self, link: &str, alias: &str) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::SetAlias { link: link.to_owned(), alias: alias.to_owned() };
        ready(self.record(call, "set alias of", link, |s| {
            s.link_mut(link)?.alias = Some(alias.to_owned());
            Ok(())
        }))
    }

    fn link_up(&self, link: &str) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::LinkUp { link: link.to_owned() };
        ready(self.record(call, "set up", link, |s| {
            s.link_mut(link)?.up = true;
            Ok(())
        }))
    }

    fn create_tap(&self, name: &str, owner: Option<u32>) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::CreateTap { name: name.to_owned(), owner };
        ready(self.record(call, "create tap", name, |s| match s.links.get(name) {
            // TUNSETIFF on an existing persistent TAP attaches to it, like the kernel.
            Some(l) if l.kind == "tun" => Ok(()),
            Some(_) => Err(os_err("create tap", name, libc::EINVAL)),
            None => s.add_link(name, "tun", "create tap"),
        }))
    }

    fn attach(&self, link: &str, bridge: &str) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::Attach { link: link.to_owned(), bridge: bridge.to_owned() };
        ready(self.record(call, "attach", link, |s| {
            match s.links.get(bridge) {
                None => return Err(HostNetError::NoSuchLink(bridge.to_owned())),
                Some(b) if b.kind != "bridge" => return Err(os_err("attach", link, libc::EOPNOTSUPP)),
                Some(_) => {}
            }
            s.link_mut(link)?.controller = Some(bridge.to_owned());
            Ok(())
        }))
    }

    fn isolate_port(&self, link: &str) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::IsolatePort { link: link.to_owned() };
        ready(self.record(call, "isolate", link, |s| {
            let l = s.link_mut(link)?;
            if l.controller.is_none() {
                return Err(os_err("isolate", link, libc::EOPNOTSUPP));
            }
            l.isolated = true;
            Ok(())
        }))
    }

    fn bind_port_mac(&self, link: &str, mac: Option<[u8; 6]>) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::BindPortMac { link: link.to_owned(), mac };
        ready(self.record(call, "bind", link, |s| {
            let l = s.link_mut(link)?;
            if l.controller.is_none() {
                return Err(os_err("bind", link, libc::EOPNOTSUPP));
            }
            l.bound_mac = mac;
            Ok(())
        }))
    }

    fn set_sysctl(&self, key: &str, value: &str) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::SetSysctl { key: key.to_owned(), value: value.to_owned() };
        ready(self.record(call, "sysctl", key, |s| {
            s.sysctls.insert(key.to_owned(), value.to_owned());
            Ok(())
        }))
    }

    fn read_sysctl(&self, key: &str) -> impl Future<Output = Result<String, HostNetError>> + Send {
        let call = NetCall::ReadSysctl { key: key.to_owned() };
        ready(self.record(call, "sysctl", key, |s| Ok(s.sysctls.get(key).cloned().unwrap_or_else(|| "0".to_owned()))))
    }

    fn delete_link(&self, name: &str) -> impl Future<Output = Result<bool, HostNetError>> + Send {
        let call = NetCall::DeleteLink { name: name.to_owned() };
        ready(self.record(call, "delete", name, |s| {
            let existed = s.links.remove(name).is_some();
            for l in s.links.values_mut() {
                if l.controller.as_deref() == Some(name) {
                    l.controller = None;
                }
            }
            Ok(existed)
        }))
    }

    fn link_exists(&self, name: &str) -> impl Future<Output = Result<bool, HostNetError>> + Send {
        let call = NetCall::LinkExists { name: name.to_owned() };
        ready(self.record(call, "look up", name, |s| Ok(s.links.contains_key(name))))
    }

    fn link(&self, name: &str) -> impl Future<Output = Result<Option<LinkState>, HostNetError>> + Send {
        let call = NetCall::Link { name: name.to_owned() };
        ready(self.record(call, "look up", name, |s| Ok(s.links.get(name).map(|l| s.state_of(name, l)))))
    }

    fn links(&self) -> impl Future<Output = Result<Vec<LinkState>, HostNetError>> + Send {
        ready(
            self.record(NetCall::Links, "list", "*", |s| {
                Ok(s.links.iter().map(|(name, l)| s.state_of(name, l)).collect())
            }),
        )
    }

    fn apply_nft(&self, script: &str) -> impl Future<Output = Result<(), HostNetError>> + Send {
        let call = NetCall::ApplyNft { script: script.to_owned() };
        ready(self.record(call, "nft -f", "-", |s| {
            s.apply_script(script);
            Ok(())
        }))
    }

    fn list_nft_table(
        &self,
        family: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, HostNetError>> + Send {
        let call = NetCall::ListNftTable { family: family.to_owned(), name: name.to_owned() };
        ready(
            self.record(call, "nft list table", name, |s| {
                Ok(s.tables.get(&(family.to_owned(), name.to_owned())).cloned())
            }),
        )
    }
}
