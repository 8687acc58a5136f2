//! The daemon's guest network: banger's bridge, the warm TAP pool, the nftables table and the
//! guest DNS server, brought up on first need and torn down when the daemon stops.
//!
//! Nothing is touched on the host until a networked VM boots (or a running one is adopted), so
//! a daemon that only manages records or images never creates a bridge. Bring-up is idempotent
//! and serialised by `up`; [`Net::sync`] republishes the ruleset, each running VM's binding of
//! its TAP to its MAC and address (a static forwarding entry plus the `bridge banger` source
//! checks) and the DNS records from the set of running VMs, and is serialised by `sync_lock`.
//! Both are leaf locks: no VM lock is held while they are taken.
//!
//! The bridge carries its owner's state dir in its alias. A daemon that starts with no running
//! networked VM removes a bridge (with its TAPs and tables) that names its own state dir and
//! that no live daemon claims: what a killed daemon left behind. Another state dir's bridge is
//! never touched.

pub mod claim;
pub mod egress;
mod policy;
pub mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use banger_core::net::{format_mac, mac_for, IfName, Subnet};
use banger_core::VmRecord;
use banger_host::net::{
    ensure_bridge, ruleset, teardown, uplink_forwarding_key, GuestPort, HostNet, HostNetError, NetlinkNet, NftConfig,
    TapPool,
};
use tokio::task::JoinHandle;

use crate::dns::{DnsConfig, DnsServer};
use crate::locks::Claim;
use crate::services::Fleet;

/// Why the guest network could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A host network operation failed.
    #[error("host network")]
    Host(#[from] HostNetError),
    /// The DNS server could not start.
    #[error("guest dns server")]
    Dns(#[from] crate::dns::DnsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] banger_store::StoreError),
    /// Another daemon runs guests in this network namespace.
    #[error(transparent)]
    Claim(#[from] claim::ClaimError),
    /// Every guest address of the subnet is taken.
    #[error(transparent)]
    Exhausted(banger_core::net::NetError),
    /// A bad egress policy.
    #[error("invalid egress policy")]
    Egress(#[from] banger_core::egress::EgressError),
}

/// A running VM as the network sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetGuest {
    /// Its name (its DNS name is `NAME.<domain>`).
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Whether it was opened with `--allow-vm-traffic`.
    pub open: bool,
    /// The TAP it was given (known once its handles are published).
    pub tap: Option<String>,
    /// Its MAC address, the only one its TAP forwards from.
    pub mac: [u8; 6],
    /// Its egress policy.
    pub egress: banger_core::egress::EgressPolicy,
}

/// What a networked VM is given at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNic {
    /// The host TAP device (a pool device).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// Kernel command-line parameters for the agent (`banger.ip=`, `banger.gw=`, `banger.dns=`).
    pub kernel_args: Vec<String>,
}

struct Up {
    /// This daemon's claim on the network namespace.
    _claim: claim::Claim,
    net: Arc<NetlinkNet>,
    /// The uplink forwarding sysctl banger turned on for NAT (restored at teardown).
    flipped_forwarding: Option<String>,
    pool: Arc<TapPool<NetlinkNet>>,
    refiller: JoinHandle<()>,
    dns: DnsServer,
    /// Reads refused packets into the denial log.
    nflog: Option<JoinHandle<()>>,
    /// Writes each guest's recent denials into it.
    mirror: Option<JoinHandle<()>>,
    /// The HTTP/HTTPS name-checking proxy (with NAT on).
    proxy: Option<JoinHandle<()>>,
}

/// The guest network service. See the module doc.
pub struct Net {
    fleet: Arc<Fleet>,
    bridge: IfName,
    subnet: Subnet,
    nat: bool,
    uplink: Option<IfName>,
    pool_size: usize,
    domain: String,
    dns_forward: bool,
    up: tokio::sync::Mutex<Option<Up>>,
    /// Whether the ruleset guards an uplink whose forwarding banger turned on.
    guard_uplink: std::sync::atomic::AtomicBool,
    /// Serialises [`Net::sync`]; holds the TAPs it bound, with their MACs.
    sync_lock: tokio::sync::Mutex<BTreeMap<String, [u8; 6]>>,
    /// Running guests' egress policies, DNS-opened addresses and denial logs (a leaf lock).
    pub egress: Arc<egress::EgressBook>,
    /// The guest file service, for the denials each guest can read (set by the daemon).
    guest_files: std::sync::OnceLock<Arc<crate::services::files::Files>>,
    /// The name-checking proxy's port on the bridge address (0: not running).
    proxy_port: std::sync::atomic::AtomicU16,
}

impl Net {
    /// The service for the fleet's config; touches nothing yet.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        let config = &fleet.config;
        Self {
            bridge: config.bridge.clone(),
            subnet: config.bridge_subnet,
            nat: config.nat,
            uplink: config.uplink_name().ok().flatten(),
            pool_size: usize::try_from(config.tap_pool_size).unwrap_or(0),
            domain: config.dns_domain.clone(),
            dns_forward: config.dns_forward,
            up: tokio::sync::Mutex::new(None),
            guard_uplink: std::sync::atomic::AtomicBool::new(false),
            sync_lock: tokio::sync::Mutex::new(BTreeMap::new()),
            egress: Arc::default(),
            guest_files: std::sync::OnceLock::new(),
            proxy_port: std::sync::atomic::AtomicU16::new(0),
            fleet,
        }
    }

    /// Lets the network write each guest's recent denials into it (`/run/banger/egress-denials`).
    pub fn set_guest_files(&self, files: Arc<crate::services::files::Files>) {
        let _ = self.guest_files.set(files);
    }

    /// The bridge subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// Brings the bridge, the ruleset (nothing open yet), the DNS server and the TAP pool up,
    /// unless they are. `in_use` names pool devices that running VMs hold (after a restart).
    pub async fn ensure_up(&self, in_use: &BTreeSet<String>) -> Result<(), NetError> {
        let mut up = self.up.lock().await;
        if up.is_some() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let claim = claim::claim(claim::CLAIM_NAME, &self.fleet.layout.state_dir)?;
        let net = Arc::new(NetlinkNet::connect()?);
        ensure_bridge(&*net, &self.bridge, &self.subnet).await?;
        net.set_alias(self.bridge.as_str(), &self.owner_tag()).await?;
        let flipped_forwarding = self.enable_nat_forwarding(&net).await?;
        self.guard_uplink.store(flipped_forwarding.is_some(), std::sync::atomic::Ordering::SeqCst);
        net.apply_nft(&ruleset(&self.nft_config(BTreeSet::new()))).await?;
        let upstreams = std::fs::read_to_string("/etc/resolv.conf")
            .map(|text| crate::dns::host_upstreams(&text, &[self.subnet.gateway().into()]))
            .unwrap_or_default();
        let listen = SocketAddr::from((self.subnet.gateway(), 53));
        let dns = DnsServer::start(DnsConfig {
            domain: self.domain.clone(),
            forward: self.dns_forward,
            device: Some(self.bridge.to_string()),
            clients: crate::dns::Clients::Guests,
            ..DnsConfig::new(listen, upstreams)
        })
        .await?;
        dns.set_egress(Arc::new(egress::DnsGate { book: Arc::clone(&self.egress), net: Arc::clone(&net) }));
        let pool = Arc::new(TapPool::new(Arc::clone(&net), self.bridge.as_str(), self.pool_size, None));
        let adopted = pool.adopt(in_use).await?;
        let refiller = pool.spawn_refiller();
        tracing::info!(bridge = %self.bridge, subnet = %self.subnet, dns = %dns.local_addr(), adopted, pool = self.pool_size,
            elapsed_ms = started.elapsed().as_millis(), "guest network up");
        let nflog = egress::spawn_nflog_reader(Arc::clone(&self.egress));
        let mirror =
            self.guest_files.get().map(|f| egress::spawn_guest_mirror(Arc::clone(&self.egress), Arc::clone(f)));
        let proxy = if self.nat {
            match proxy::start(self.subnet.gateway(), Arc::clone(&self.egress)).await {
                Ok((port, task)) => {
                    self.proxy_port.store(port, std::sync::atomic::Ordering::SeqCst);
                    Some(task)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the egress name proxy; HTTP/HTTPS names go unchecked");
                    None
                }
            }
        } else {
            None
        };
        *up = Some(Up { _claim: claim, net, flipped_forwarding, pool, refiller, dns, nflog, mirror, proxy });
        Ok(())
    }

    /// With NAT on, replies arriving on the uplink must be forwarded too (IPv4 checks the input
    /// device). Returns the sysctl banger turned on, if it was off.
    async fn enable_nat_forwarding(&self, net: &NetlinkNet) -> Result<Option<String>, NetError> {
        if !self.nat {
            return Ok(None);
        }
        let key = uplink_forwarding_key(self.uplink.as_ref());
        if net.read_sysctl(&key).await? == "1" {
            return Ok(None);
        }
        if self.uplink.is_none() {
            tracing::warn!("nat without `uplink`: enabling IPv4 forwarding on every interface; set uplink to limit it");
        }
        net.set_sysctl(&key, "1").await?;
        Ok(Some(key))
    }

    /// A NIC for `vm` (which must have a guest address): a TAP from the warm pool (made on the
    /// spot when the pool is empty), its MAC and the agent's network parameters.
    pub async fn nic_for(&self, vm: &VmRecord, ip: Ipv4Addr) -> Result<GuestNic, NetError> {
        self.ensure_up(&BTreeSet::new()).await?;
        let pool = {
            let up = self.up.lock().await;
            up.as_ref().map(|u| Arc::clone(&u.pool))
        };
        let pool = pool.ok_or_else(|| HostNetError::NoSuchLink(self.bridge.to_string()))?;
        let tap = pool.take_or_create().await?;
        let gw = self.subnet.gateway();
        Ok(GuestNic {
            tap,
            mac: format_mac(mac_for(&vm.id)),
            kernel_args: vec![
                format!("banger.ip={ip}/{}", self.subnet.prefix_len()),
                format!("banger.gw={gw}"),
                format!("banger.dns={gw}"),
            ],
        })
    }

    /// The alias banger gives its bridge: the owning state dir (hashed if too long for an alias).
    fn owner_tag(&self) -> String {
        let dir = self.fleet.layout.state_dir.display().to_string();
        if dir.len() <= 200 {
            format!("banger:{dir}")
        } else {
            format!("banger:#{}", format_mac(mac_for(&dir)))
        }
    }

    /// Removes what a killed daemon of this state dir left: its bridge (found by its alias),
    /// banger's TAPs and tables, unless the network is up here or another live daemon claims
    /// this namespace. Run at start-up when no networked VM was adopted; failures are logged.
    pub async fn sweep_leftovers(&self) {
        let up = self.up.lock().await;
        if up.is_some() {
            return;
        }
        let result = async {
            let net = NetlinkNet::connect()?;
            let Some(bridge) = net.link(self.bridge.as_str()).await? else { return Ok(None) };
            if bridge.alias.as_deref() != Some(self.owner_tag().as_str()) {
                tracing::debug!(bridge = %self.bridge, alias = ?bridge.alias, "bridge is not this state dir's; left alone");
                return Ok(None);
            }
            let claim = match claim::claim(claim::CLAIM_NAME, &self.fleet.layout.state_dir) {
                Ok(claim) => claim,
                Err(claim::ClaimError::Taken { owner }) => {
                    tracing::info!(%owner, "another daemon runs the guest network here; nothing swept");
                    return Ok(None);
                }
                Err(e) => return Err(NetError::Claim(e)),
            };
            let deleted = teardown(&net, &self.bridge).await?;
            drop(claim);
            Ok::<_, NetError>(Some(deleted))
        }
        .await;
        match result {
            Ok(Some(deleted)) => tracing::info!(?deleted, "removed the guest network a killed daemon left"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %banger_core::error_chain(&e), "cannot sweep a left-over guest network"),
        }
    }

    /// Gives a stopped VM's TAP back to the pool (or deletes it when the pool is full). Its
    /// binding goes first, so that no other VM can take the device while it still forwards the
    /// old VM's MAC and address.
    pub async fn release_tap(&self, tap: &str) {
        if let Err(e) = self.sync(Some(tap)).await {
            tracing::error!(tap, error = %banger_core::error_chain(&e), "cannot unbind a released tap");
        }
        let pool = self.up.lock().await.as_ref().map(|u| Arc::clone(&u.pool));
        let result = match pool {
            Some(pool) => pool.release(tap).await,
            // The network was never brought up by this daemon: delete the device outright.
            None => match NetlinkNet::connect() {
                Ok(net) => net.delete_link(tap).await.map(|_| ()),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            tracing::warn!(tap, error = %banger_core::error_chain(&e), "cannot release tap device");
        }
    }

    /// Publishes the ruleset and DNS records for every running networked VM ([`Net::guests`])
    /// but the one on `without_tap` (being released). A no-op while the network is down.
    ///
    /// The set of VMs is read under `sync_lock`, never before it: a publication read earlier
    /// could otherwise be applied after a newer one and take a just-started VM's name, address
    /// binding and rules away again until the next change.
    pub async fn sync(&self, without_tap: Option<&str>) -> Result<(), NetError> {
        let mut bound = self.sync_lock.lock().await;
        let running: Vec<NetGuest> = match without_tap {
            Some(tap) => self.guests().into_iter().filter(|g| g.tap.as_deref() != Some(tap)).collect(),
            None => self.guests(),
        };
        let running = running.as_slice();
        let (net, records) = {
            let up = self.up.lock().await;
            let Some(up) = up.as_ref() else { return Ok(()) };
            let records: BTreeMap<String, Ipv4Addr> = running.iter().map(|g| (g.name.clone(), g.ip)).collect();
            up.dns.set_records(records.clone());
            (Arc::clone(&up.net), records)
        };
        let open: BTreeSet<Ipv4Addr> = running.iter().filter(|g| g.open).map(|g| g.ip).collect();
        let ports: Vec<GuestPort> =
            running.iter().filter_map(|g| Some(GuestPort { tap: g.tap.clone()?, mac: g.mac, ip: g.ip })).collect();
        // New bindings before the rules that let their frames through; old ones after.
        for port in &ports {
            if bound.get(&port.tap) != Some(&port.mac) {
                net.bind_port_mac(&port.tap, Some(port.mac)).await?;
                bound.insert(port.tap.clone(), port.mac);
            }
        }
        let mut config = self.nft_config(open);
        config.ports = ports;
        let policies: Vec<_> = running.iter().map(|g| (g.ip, g.name.clone(), g.egress.clone())).collect();
        config.egress = self.egress.sync(&policies);
        let port = self.proxy_port.load(std::sync::atomic::Ordering::SeqCst);
        if port != 0 {
            let named = |g: &&NetGuest| {
                g.egress.mode == banger_core::egress::EgressMode::Allowlist && g.egress.has_name_rules()
            };
            let guests = running.iter().filter(named).map(|g| g.ip).collect();
            config.proxy = Some(banger_host::net::egress::ProxyRedirect { port, guests });
        }
        net.apply_nft(&ruleset(&config)).await?;
        let gone: Vec<String> =
            bound.keys().filter(|tap| !config.ports.iter().any(|p| &p.tap == *tap)).cloned().collect();
        for tap in gone {
            match net.bind_port_mac(&tap, None).await {
                Ok(()) | Err(HostNetError::NoSuchLink(_)) => {
                    bound.remove(&tap);
                }
                Err(e) => tracing::warn!(tap, error = %banger_core::error_chain(&e), "cannot unbind a tap"),
            }
        }
        tracing::debug!(records = records.len(), "guest network rules and names published");
        Ok(())
    }

    /// Tears the network down (daemon stop). With VMs still running, only the idle pool goes:
    /// their bridge, TAPs, rules and addresses stay so that they keep working, and the next
    /// daemon adopts them.
    pub async fn shutdown(&self, vms_running: bool) {
        let Some(up) = self.up.lock().await.take() else { return };
        up.refiller.abort();
        self.proxy_port.store(0, std::sync::atomic::Ordering::SeqCst);
        for task in [&up.nflog, &up.mirror, &up.proxy].into_iter().flatten() {
            task.abort();
        }
        if let Err(e) = up.dns.shutdown().await {
            tracing::warn!(error = %banger_core::error_chain(&e), "dns server did not stop cleanly");
        }
        if vms_running {
            match up.pool.drain().await {
                Ok(deleted) => tracing::info!(?deleted, "vms still run: kept the bridge and rules, drained the pool"),
                Err(e) => tracing::warn!(error = %banger_core::error_chain(&e), "cannot drain the tap pool"),
            }
            return;
        }
        match teardown(&*up.net, &self.bridge).await {
            Ok(deleted) => tracing::info!(?deleted, "guest network torn down"),
            Err(e) => tracing::error!(error = %banger_core::error_chain(&e), "cannot tear the guest network down"),
        }
        if let Some(key) = &up.flipped_forwarding {
            if let Err(e) = up.net.set_sysctl(key, "0").await {
                tracing::warn!(key, error = %banger_core::error_chain(&e), "cannot turn uplink forwarding back off");
            }
        }
    }

    fn nft_config(&self, open: BTreeSet<Ipv4Addr>) -> NftConfig {
        let mut config = NftConfig::new(self.bridge.clone(), self.subnet);
        config.nat = self.nat;
        config.uplink = self.uplink.clone();
        config.open_guests = open;
        config.guard_uplink = self.guard_uplink.load(std::sync::atomic::Ordering::SeqCst);
        config
    }

    /// Every running networked VM, as the network publishes it.
    pub fn guests(&self) -> Vec<NetGuest> {
        let vms = match self.fleet.store.list_vms() {
            Ok(vms) => vms,
            Err(e) => {
                tracing::warn!(error = %banger_core::error_chain(&e), "cannot list vms for the network");
                return Vec::new();
            }
        };
        vms.into_iter()
            .filter(|vm| vm.spec.network && self.fleet.alive(vm))
            .filter_map(|vm| {
                let ip = vm.guest_ip.as_deref()?.parse().ok()?;
                let tap = self.fleet.handles.get(&vm).and_then(|h| h.tap);
                let egress = self.fleet.store.egress_policy(&vm.id).unwrap_or_else(|e| {
                    // Closed rather than open when the policy cannot be read.
                    tracing::error!(vm = %vm.name, error = %banger_core::error_chain(&e), "cannot read egress policy; closing");
                    banger_core::egress::EgressPolicy { mode: banger_core::egress::EgressMode::Closed, ..Default::default() }
                });
                Some(NetGuest { mac: mac_for(&vm.id), tap, name: vm.name, ip, open: vm.spec.allow_vm_traffic, egress })
            })
            .collect()
    }

    /// Republishes rules and DNS names after a VM started or stopped; failures are logged (the
    /// previous rules stay in force, and they are closed by default).
    pub async fn publish(&self) {
        if let Err(e) = self.sync(None).await {
            tracing::error!(error = %banger_core::error_chain(&e), "cannot publish guest network rules");
        }
    }

    /// The lowest free guest address of the bridge subnet, under the reservation lock.
    pub fn allocate_guest_ip(&self, _claim: &Claim<'_>) -> Result<Ipv4Addr, NetError> {
        let used: BTreeSet<Ipv4Addr> =
            self.fleet.store.list_vms()?.iter().filter_map(|v| v.guest_ip.as_deref()?.parse().ok()).collect();
        banger_core::net::allocate(&self.subnet, &used).map_err(NetError::Exhausted)
    }

    /// The guest address of networked VM `vm`, allocated now if it has none or its address is
    /// outside the configured subnet (after a config change). Stored at once.
    pub fn ensure_guest_ip(&self, vm: &VmRecord) -> Result<Ipv4Addr, NetError> {
        let current = vm.guest_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        if let Some(ip) = current.filter(|ip| self.subnet.is_guest_addr(*ip)) {
            return Ok(ip);
        }
        let claim = self.fleet.reservations.claim();
        self.fleet.store.set_guest_ip(&vm.id, None)?;
        let ip = self.allocate_guest_ip(&claim)?;
        self.fleet.store.set_guest_ip(&vm.id, Some(&ip.to_string()))?;
        tracing::info!(vm = %vm.name, %ip, "guest address allocated");
        Ok(ip)
    }
}
