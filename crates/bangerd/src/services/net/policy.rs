//! The egress policy of one VM through the network service: read, change (in force at once on
//! a running VM: the store first, then the ruleset and the DNS gate), and the denial log with a
//! long poll for `--follow`.

use std::time::Duration;

use banger_core::egress::EgressPolicy;
use banger_core::VmRecord;
use banger_proto::{EgressLog, EgressView, SetEgressRequest};

use super::{Net, NetError};

impl Net {
    /// VM `vm`'s policy, whether it is enforced now, and what DNS opened for it.
    pub fn egress_view(&self, vm: &VmRecord) -> Result<EgressView, NetError> {
        let policy = self.fleet.store.egress_policy(&vm.id)?;
        let enforced = vm.spec.network && self.fleet.alive(vm);
        Ok(EgressView { vm: vm.name.clone(), policy: policy.into(), enforced, learned: self.egress.learned(&vm.name) })
    }

    /// Changes VM `vm`'s policy (given fields replace, others are kept); on a running VM the
    /// new rules are in force when this returns, and what DNS opened under the old policy is
    /// closed.
    pub async fn set_egress(&self, vm: &VmRecord, req: SetEgressRequest) -> Result<EgressView, NetError> {
        let current = self.fleet.store.egress_policy(&vm.id)?;
        let text = |rules: &[banger_core::egress::HostRule]| rules.iter().map(ToString::to_string).collect::<Vec<_>>();
        let mode = req.mode.map_or(current.mode, Into::into);
        let allow = req.allow.unwrap_or_else(|| text(&current.allow));
        let deny = req.deny.unwrap_or_else(|| text(&current.deny));
        let policy = EgressPolicy::parse(mode, &allow, &deny)?;
        self.fleet.store.set_egress_policy(&vm.id, &policy)?;
        tracing::info!(vm = %vm.name, %policy, "egress policy changed");
        self.sync(None).await?;
        self.egress_view(vm)
    }

    /// VM `vm`'s denials after `after`; with a `wait`, answers as soon as there is one (or when
    /// the wait ends).
    pub async fn egress_log(&self, vm: &VmRecord, after: u64, wait: Duration) -> EgressLog {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.egress.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let log = self.egress.log(&vm.name, after);
            if !log.denials.is_empty() || tokio::time::Instant::now() >= deadline {
                return log;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.egress.log(&vm.name, after);
            }
        }
    }
}
