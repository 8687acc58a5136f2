//! The `egress_policies` table: each VM's egress policy as JSON. Rows go when their VM's row goes
//! (`ON DELETE CASCADE`); a VM without one is `open` (it was made before policies existed).

use banger_core::egress::EgressPolicy;
use rusqlite::{params, OptionalExtension as _};

use crate::{Store, StoreError};

impl Store {
    /// VM `vm_id`'s egress policy (`open` when it has none recorded).
    pub fn egress_policy(&self, vm_id: &str) -> Result<EgressPolicy, StoreError> {
        let text: Option<String> = self
            .conn()
            .query_row("SELECT policy FROM egress_policies WHERE vm_id = ?1", [vm_id], |r| r.get(0))
            .optional()?;
        match text {
            None => Ok(EgressPolicy::default()),
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt { kind: "egress policy", detail: format!("{vm_id}: {e}") }),
        }
    }

    /// Records VM `vm_id`'s egress policy, replacing the one it had; an unknown VM gives
    /// [`StoreError::NotFound`].
    pub fn set_egress_policy(&self, vm_id: &str, policy: &EgressPolicy) -> Result<(), StoreError> {
        let text = serde_json::to_string(policy)
            .map_err(|e| StoreError::Corrupt { kind: "egress policy", detail: format!("{vm_id}: {e}") })?;
        let result = self.conn().execute(
            "INSERT INTO egress_policies (vm_id, policy) VALUES (?1, ?2) \
             ON CONFLICT (vm_id) DO UPDATE SET policy = excluded.policy",
            params![vm_id, text],
        );
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::NotFound { kind: "vm", reference: vm_id.to_owned() })
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use banger_core::egress::{EgressMode, EgressPolicy};

    use crate::Store;

    #[test]
    fn policies_are_kept_replaced_and_go_with_their_vm() {
        let store = Store::open_in_memory().expect("store");
        let vm = crate::vms::tests::vm("web");
        store.insert_vm(&vm).expect("insert");
        assert_eq!(store.egress_policy(&vm.id).expect("default"), EgressPolicy::default());
        let p = EgressPolicy::parse(EgressMode::Allowlist, &["*.pypi.org".into()], &["1.2.3.4:22".into()]).expect("p");
        store.set_egress_policy(&vm.id, &p).expect("set");
        assert_eq!(store.egress_policy(&vm.id).expect("get"), p);
        let closed = EgressPolicy { mode: EgressMode::Closed, ..EgressPolicy::default() };
        store.set_egress_policy(&vm.id, &closed).expect("replace");
        assert_eq!(store.egress_policy(&vm.id).expect("get"), closed);
        assert!(store.set_egress_policy("nope", &closed).is_err());
        store.delete_vm(&vm.id).expect("delete");
        let rows: i64 =
            store.conn().query_row("SELECT count(*) FROM egress_policies", [], |r| r.get(0)).expect("count");
        assert_eq!(rows, 0);
    }
}
