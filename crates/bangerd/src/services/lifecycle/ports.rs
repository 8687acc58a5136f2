//! Waiting, once the agent answers, for the ports the VM's image declares
//! (`dev.banger.ports`): each must accept a TCP connection on the guest's loopback, reached
//! through the agent (so a VM without a network waits the same way), within [`PORT_WAIT`].

use std::time::{Duration, Instant};

use banger_core::VmRecord;

use super::{Lifecycle, LifecycleError};
use crate::ops::OpHandle;
use crate::tunnel::Tunnel;

/// How long a start waits for the image's ports, all together. Generous: under TCG on a busy
/// host a big service is slow to listen (the `agent` image's opencode, a 185 MB binary, took
/// over 180 s on 2 cores at load 10); a service that never listens still fails the start.
pub const PORT_WAIT: Duration = Duration::from_secs(600);
/// Pause between two tries of a port that refused.
const RETRY: Duration = Duration::from_millis(250);

impl Lifecycle {
    /// Waits until every port in `ports` answers in `vm`'s guest; fails naming the first port
    /// that did not within [`PORT_WAIT`], or when the start is cancelled or the VMM exits.
    pub(super) async fn wait_ports(&self, op: &OpHandle, vm: &VmRecord, ports: &[u16]) -> Result<(), LifecycleError> {
        op.stage("ports")?;
        let deadline = Instant::now() + PORT_WAIT;
        let agent = self.fleet.agent_for(vm);
        let cancel = op.cancel_flag();
        for &port in ports {
            loop {
                let last = match Tunnel::connect(&agent, port).await {
                    Ok(tunnel) => {
                        drop(tunnel);
                        break;
                    }
                    Err(e) => e.to_string(),
                };
                if !self.fleet.alive(vm) {
                    return Err(LifecycleError::PortNotReady {
                        vm: vm.name.clone(),
                        port,
                        why: "the vmm exited".into(),
                    });
                }
                if Instant::now() >= deadline {
                    let why = format!("no answer within {}s ({last})", PORT_WAIT.as_secs());
                    return Err(LifecycleError::PortNotReady { vm: vm.name.clone(), port, why });
                }
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    () = cancel.cancelled() => return Err(LifecycleError::Cancelled),
                }
            }
        }
        Ok(())
    }
}
