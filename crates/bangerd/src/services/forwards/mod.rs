//! Port forwards: durable (the `forwards` table), listening only while their VM runs.
//!
//! The lifecycle calls [`Forwards::activate`] once a VM is running (and at start-up for adopted
//! VMs) and [`Forwards::deactivate`] when it stops; the listeners and the proxy are in
//! [`proxy`]. Adding a forward takes the VM's lock, then a reservation [`Claim`] for one check,
//! one bind and one insert, so a port taken by another program is refused before anything is
//! recorded.

pub mod proxy;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use banger_core::error_chain as chain;
use banger_core::forward::first_overlap;
use banger_core::{ForwardSpecError, PortForward, VmRecord};
use banger_proto::{ForwardList, ForwardState, ForwardView};
use banger_store::StoreError;

use self::proxy::{listen, serve, Forwarder, ListenError, Upstream};
use crate::locks::Claim;
use crate::services::Fleet;

/// Why a forward could not be added, listed or removed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardsError {
    /// The store failed, or has no such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The forward itself is invalid.
    #[error(transparent)]
    Spec(#[from] ForwardSpecError),
    /// The host address cannot be listened on.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Another forward takes the host port.
    #[error("{what} already forwarded to {owner}:{guest_port}; remove that with `banger vm forward {owner} --remove {have}` or pick another host port")]
    Taken {
        /// "host port A is" or "host port A overlaps B, which is".
        what: String,
        /// The VM that has it.
        owner: String,
        /// Its guest port.
        guest_port: u16,
        /// Its host address.
        have: SocketAddr,
    },
    /// Two forwards of one request take the same host port.
    #[error("--publish {a} and --publish {b} both take host port {port}; give them different host ports")]
    PublishOverlap {
        /// The first.
        a: String,
        /// The second.
        b: String,
        /// The port.
        port: u16,
    },
    /// The VM has no forward there.
    #[error("vm '{vm}' has no forward on {on}; see `banger vm forward {vm} --list`")]
    NoSuchForward {
        /// The VM.
        vm: String,
        /// "host port N" or "ADDR:N".
        on: String,
    },
    /// The VM forwards that port on several addresses.
    #[error("vm '{vm}' has forwards on {addrs}; say which, e.g. --remove {first}")]
    Ambiguous {
        /// The VM.
        vm: String,
        /// The addresses.
        addrs: String,
        /// The first of them.
        first: String,
    },
}

/// The forwards service.
pub struct Forwards {
    fleet: Arc<Fleet>,
    forwarder: Forwarder,
}

impl Forwards {
    /// The service over `fleet`; nothing listens yet.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet, forwarder: Forwarder::default() }
    }
}

impl Forwards {
    /// Where `vm`'s forwarded connections go: its own address when it has a NIC (falling back
    /// to its agent for loopback-only services), else its agent.
    fn upstream_for(&self, vm: &VmRecord) -> Upstream {
        let ip = vm.guest_ip.as_deref().and_then(|ip| ip.split('/').next()).and_then(|ip| ip.parse().ok());
        match ip.filter(|_| vm.spec.network) {
            Some(ip) => Upstream::Guest(ip, self.fleet.agent_for(vm)),
            None => Upstream::Agent(self.fleet.agent_for(vm)),
        }
    }

    fn forward_view(&self, vm: &VmRecord, forward: PortForward) -> ForwardView {
        let (state, error) = self.forwarder.state(&vm.id, &forward);
        ForwardView { forward: forward.into(), vm: vm.name.clone(), state, error }
    }

    /// Refuses `forward` when a stored forward takes its host port. Call under the reservation
    /// lock.
    fn check_forward_free(&self, _claim: &Claim<'_>, forward: &PortForward) -> Result<(), ForwardsError> {
        let taken = self.fleet.store.list_forwards(None)?.into_iter().find(|r| r.forward.overlaps(forward));
        let Some(taken) = taken else { return Ok(()) };
        let owner = self.fleet.store.find_vm(&taken.vm_id).map(|vm| vm.name).unwrap_or(taken.vm_id);
        let (want, have) = (forward.host_socket(), taken.forward.host_socket());
        let what = if want == have {
            format!("host port {want} is")
        } else {
            format!("host port {want} overlaps {have}, which is")
        };
        Err(ForwardsError::Taken { what, owner, guest_port: taken.forward.guest_port, have })
    }

    /// Validates the forwards of a new VM: each valid, none overlapping another or a stored one.
    pub fn check_publish(&self, publish: &[PortForward]) -> Result<(), ForwardsError> {
        for forward in publish {
            forward.validate()?;
        }
        if let Some((a, b)) = first_overlap(publish) {
            return Err(ForwardsError::PublishOverlap { a: a.to_string(), b: b.to_string(), port: b.host_port });
        }
        let claim = self.fleet.reservations.claim();
        publish.iter().try_for_each(|f| self.check_forward_free(&claim, f))
    }

    /// Records the forwards of a new VM (under the reservation lock, all or none).
    pub fn claim(&self, vm: &VmRecord, publish: &[PortForward]) -> Result<(), ForwardsError> {
        if publish.is_empty() {
            return Ok(());
        }
        let claim = self.fleet.reservations.claim();
        publish.iter().try_for_each(|f| self.check_forward_free(&claim, f))?;
        self.fleet.store.insert_forwards(&vm.id, publish)?;
        Ok(())
    }

    /// Adds a forward to a VM. When the VM runs it listens at once, and a host address that
    /// cannot be bound refuses the forward (nothing is recorded).
    pub async fn add(&self, reference: &str, forward: PortForward) -> Result<ForwardView, ForwardsError> {
        forward.validate()?;
        let id = self.fleet.store.find_vm(reference)?.id;
        let _guard = self.fleet.locks.lock(&id).await;
        let vm = self.fleet.store.find_vm(&id)?;
        let active = self.forwarder.is_active(&vm.id);
        let listener = {
            let claim = self.fleet.reservations.claim();
            self.check_forward_free(&claim, &forward)?;
            let listener = if active { Some(listen(forward.host_socket())?) } else { None };
            self.fleet.store.insert_forward(&vm.id, &forward)?;
            listener
        };
        if let Some(listener) = listener {
            let task = serve(listener, self.upstream_for(&vm), forward.guest_port, &vm.name);
            self.forwarder.insert(&vm.id, forward, task);
        }
        tracing::info!(vm = %vm.name, forward = %forward.describe(&vm.name), listening = active, "forward added");
        Ok(self.forward_view(&vm, forward))
    }

    /// A VM's forwards.
    pub fn list(&self, reference: &str) -> Result<ForwardList, ForwardsError> {
        let vm = self.fleet.store.find_vm(reference)?;
        let forwards = self
            .fleet
            .store
            .list_forwards(Some(&vm.id))?
            .into_iter()
            .map(|r| self.forward_view(&vm, r.forward))
            .collect();
        Ok(ForwardList { vm: vm.name, forwards })
    }

    /// Removes a VM's forward on `host_port` (and `host_addr`, needed only when the VM has
    /// forwards on that port on several addresses).
    pub async fn remove(
        &self,
        reference: &str,
        host_port: u16,
        host_addr: Option<IpAddr>,
    ) -> Result<ForwardView, ForwardsError> {
        let id = self.fleet.store.find_vm(reference)?.id;
        let _guard = self.fleet.locks.lock(&id).await;
        let vm = self.fleet.store.find_vm(&id)?;
        let matching: Vec<PortForward> = self
            .fleet
            .store
            .list_forwards(Some(&vm.id))?
            .into_iter()
            .map(|r| r.forward)
            .filter(|f| f.host_port == host_port && host_addr.is_none_or(|a| a == f.host_addr))
            .collect();
        let forward = match matching.as_slice() {
            [one] => *one,
            [] => {
                let on = host_addr.map_or_else(|| format!("host port {host_port}"), |a| format!("{a}:{host_port}"));
                return Err(ForwardsError::NoSuchForward { vm: vm.name, on });
            }
            several => {
                let addrs: Vec<String> = several.iter().map(|f| f.host_socket().to_string()).collect();
                let first = addrs.first().cloned().unwrap_or_default();
                return Err(ForwardsError::Ambiguous { vm: vm.name, addrs: addrs.join(" and "), first });
            }
        };
        let view = self.forward_view(&vm, forward);
        self.fleet.store.delete_forward(&vm.id, forward.host_addr, forward.host_port)?;
        self.forwarder.remove(&vm.id, &forward).await;
        tracing::info!(vm = %vm.name, forward = %forward.describe(&vm.name), "forward removed");
        Ok(ForwardView { state: ForwardState::Inactive, error: None, ..view })
    }

    /// Starts listening for `vm`'s forwards; the lifecycle calls it once the VM runs (under its
    /// VM lock), and start-up for adopted VMs. A forward that cannot bind is logged and shown as
    /// failed; it does not fail the start.
    pub async fn activate(&self, vm: &VmRecord) {
        let forwards = match self.fleet.store.list_forwards(Some(&vm.id)) {
            Ok(records) => records.into_iter().map(|r| r.forward).collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!(vm = %vm.name, error = %chain(&e), "cannot read the vm's forwards");
                Vec::new()
            }
        };
        self.forwarder.activate(vm, &forwards, &self.upstream_for(vm)).await;
    }

    /// Stops listening for `vm`'s forwards (they stay recorded); the lifecycle calls it when the
    /// VM stops or fails to start.
    pub async fn deactivate(&self, vm: &VmRecord) {
        self.forwarder.deactivate(&vm.id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::proxy::tests::{echo_server, test_vm};
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn a_running_vms_forward_that_cannot_bind_is_refused_and_not_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Forwards::new(crate::services::testing::fleet(dir.path()));
        let vm = VmRecord { guest_ip: Some("127.0.0.1".into()), ..test_vm() };
        d.fleet.store.insert_vm(&vm).expect("vm");
        // Stopped: recorded, inactive, nothing bound.
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = PortForward::tcp("127.0.0.1".parse().expect("ip"), held.local_addr().expect("addr").port(), 80);
        let view = d.add("web", busy).await.expect("a stopped vm's forward is only recorded");
        assert_eq!(view.state, ForwardState::Inactive);
        d.remove("web", busy.host_port, None).await.expect("remove");
        // Running (activated, as the lifecycle does once it is): the bind decides.
        d.activate(&vm).await;
        let err = d.add("web", busy).await.expect_err("the port is taken");
        assert!(matches!(err, ForwardsError::Listen(ListenError::InUse { .. })), "{err}");
        assert!(err.to_string().contains("already in use"), "{err}");
        assert!(d.list("web").expect("list").forwards.is_empty(), "nothing recorded");
        let echo = echo_server().await;
        let free = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free").port();
        let good = PortForward::tcp("127.0.0.1".parse().expect("ip"), free, echo);
        assert_eq!(d.add("web", good).await.expect("add").state, ForwardState::Listening);
        // The vm has a guest address (here this host), so connections go there directly.
        let mut c = TcpStream::connect(good.host_socket()).await.expect("connect");
        c.write_all(b"direct").await.expect("write");
        c.shutdown().await.expect("eof");
        let mut back = String::new();
        c.read_to_string(&mut back).await.expect("read");
        assert_eq!(back, "DIRECT|BYE");
        d.deactivate(&vm).await;
        assert_eq!(d.list("web").expect("list").forwards[0].state, ForwardState::Inactive);
        assert!(TcpStream::connect(good.host_socket()).await.is_err(), "deactivated: not listening");
    }
}
