//! The `vms` table.

use banger_core::config::VmmKind;
use banger_core::{DesiredState, ObservedState, VmRecord, VmSpec};
use rusqlite::{params, Row};

use crate::{find_by_reference, is_unique_violation, Lookup, Pending, Store, StoreError};

const COLUMNS: &str = "id, name, image, kernel, vcpus, memory_mib, disk_mib, desired_state, state, guest_ip, vm_dir, \
                       created_at, updated_at, last_error, vmm, network, allow_vm_traffic";

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt { kind: "vm", detail }
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<VmRecord, StoreError>> {
    let desired: String = row.get(7)?;
    let state: String = row.get(8)?;
    let vcpus: i64 = row.get(4)?;
    let memory: i64 = row.get(5)?;
    let disk: i64 = row.get(6)?;
    let id: String = row.get(0)?;
    let vmm: String = row.get(14)?;
    let network: bool = row.get(15)?;
    let allow_vm_traffic: bool = row.get(16)?;
    let record = (|| -> Result<VmRecord, StoreError> {
        Ok(VmRecord {
            spec: VmSpec {
                image: row.get(2)?,
                kernel: row.get(3)?,
                vcpus: u32::try_from(vcpus).map_err(|_| corrupt(format!("{id}: vcpus {vcpus}")))?,
                memory_mib: u64::try_from(memory).map_err(|_| corrupt(format!("{id}: memory {memory}")))?,
                disk_mib: u64::try_from(disk).map_err(|_| corrupt(format!("{id}: disk {disk}")))?,
                vmm: VmmKind::parse(&vmm).ok_or_else(|| corrupt(format!("{id}: vmm {vmm:?}")))?,
                network,
                allow_vm_traffic,
            },
            desired_state: DesiredState::parse(&desired)
                .ok_or_else(|| corrupt(format!("{id}: desired state {desired:?}")))?,
            state: ObservedState::parse(&state).ok_or_else(|| corrupt(format!("{id}: state {state:?}")))?,
            name: row.get(1)?,
            guest_ip: row.get(9)?,
            vm_dir: row.get(10)?,
            created_at: row.get(11)?,
            updated_at: row.get(12)?,
            last_error: row.get(13)?,
            id: id.clone(),
        })
    })();
    Ok(record)
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Inserts a new, complete VM; a taken name gives [`StoreError::NameTaken`].
    pub fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.insert_vm_as(vm, None, None)
    }

    /// Inserts a new VM, complete (`None`) or with an unfinished step, started from snapshot
    /// `origin` if any, in one statement; a taken name gives [`StoreError::NameTaken`].
    pub fn insert_vm_as(
        &self,
        vm: &VmRecord,
        origin: Option<&str>,
        pending: Option<Pending>,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        let result = conn.execute(
            &format!(
                "INSERT INTO vms ({COLUMNS}, origin_snapshot, pending) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
            ),
            params![
                vm.id,
                vm.name,
                vm.spec.image,
                vm.spec.kernel,
                vm.spec.vcpus,
                i64_of(vm.spec.memory_mib),
                i64_of(vm.spec.disk_mib),
                vm.desired_state.as_str(),
                vm.state.as_str(),
                vm.guest_ip,
                vm.vm_dir,
                vm.created_at,
                vm.updated_at,
                vm.last_error,
                vm.spec.vmm.as_str(),
                vm.spec.network,
                vm.spec.allow_vm_traffic,
                origin,
                pending.map(Pending::as_str),
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::NameTaken { kind: "vm", name: vm.name.clone() }),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets only VM `id`'s guest address (leaving the rest of its row as it is now).
    pub fn set_guest_ip(&self, id: &str, ip: Option<&str>) -> Result<(), StoreError> {
        let changed = self.conn().execute("UPDATE vms SET guest_ip = ?2 WHERE id = ?1", params![id, ip])?;
        if changed == 0 {
            return Err(StoreError::NotFound { kind: "vm", reference: id.to_owned() });
        }
        Ok(())
    }

    /// Replaces an existing VM's row (matched by id).
    pub fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let conn = self.conn();
        let changed = conn.execute(
            "UPDATE vms SET name = ?2, image = ?3, kernel = ?4, vcpus = ?5, memory_mib = ?6, disk_mib = ?7, \
             desired_state = ?8, state = ?9, guest_ip = ?10, vm_dir = ?11, updated_at = ?12, last_error = ?13, vmm = ?14, \
             network = ?15, allow_vm_traffic = ?16 \
             WHERE id = ?1",
            params![
                vm.id,
                vm.name,
                vm.spec.image,
                vm.spec.kernel,
                vm.spec.vcpus,
                i64_of(vm.spec.memory_mib),
                i64_of(vm.spec.disk_mib),
                vm.desired_state.as_str(),
                vm.state.as_str(),
                vm.guest_ip,
                vm.vm_dir,
                vm.updated_at,
                vm.last_error,
                vm.spec.vmm.as_str(),
                vm.spec.network,
                vm.spec.allow_vm_traffic,
            ],
        );
        match changed {
            Ok(0) => Err(StoreError::NotFound { kind: "vm", reference: vm.id.clone() }),
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::NameTaken { kind: "vm", name: vm.name.clone() }),
            Err(e) => Err(e.into()),
        }
    }

    /// Finds a VM by exact name, exact id, or unique id prefix (in that order).
    pub fn find_vm(&self, reference: &str) -> Result<VmRecord, StoreError> {
        let lookup = Lookup {
            select: format!("SELECT {COLUMNS} FROM vms WHERE "),
            scope: &[],
            by_name: true,
            kind: "vm",
            read: from_row,
        };
        find_by_reference(&self.conn(), &lookup, reference)
    }

    /// Every VM, oldest first.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM vms ORDER BY created_at, name"))?;
        let rows = stmt.query_map([], from_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    /// Deletes a VM's row by id.
    pub fn delete_vm(&self, id: &str) -> Result<(), StoreError> {
        match self.conn().execute("DELETE FROM vms WHERE id = ?1", [id])? {
            0 => Err(StoreError::NotFound { kind: "vm", reference: id.to_owned() }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn vm(name: &str) -> VmRecord {
        let id = banger_core::new_id();
        VmRecord {
            vm_dir: format!("/tmp/vms/{id}"),
            id,
            name: name.into(),
            spec: VmSpec {
                image: "debian-bookworm".into(),
                kernel: "debian-6.1-cloud".into(),
                vcpus: 1,
                memory_mib: 512,
                disk_mib: 2048,
                vmm: VmmKind::Qemu,
                network: true,
                allow_vm_traffic: false,
            },
            desired_state: DesiredState::Stopped,
            state: ObservedState::Created,
            guest_ip: None,
            created_at: banger_core::time::now_rfc3339(),
            updated_at: banger_core::time::now_rfc3339(),
            last_error: None,
        }
    }

    #[test]
    fn crud_round_trip() {
        let store = Store::open_in_memory().expect("open");
        let mut a = vm("alpha");
        store.insert_vm(&a).expect("insert");
        assert_eq!(store.find_vm("alpha").expect("by name"), a);
        assert_eq!(store.find_vm(&a.id).expect("by id"), a);
        assert_eq!(store.find_vm(&a.id[..6]).expect("by prefix"), a);
        a.spec.vcpus = 4;
        a.state = ObservedState::Stopped;
        store.update_vm(&a).expect("update");
        assert_eq!(store.find_vm("alpha").expect("again").spec.vcpus, 4);
        assert_eq!(store.list_vms().expect("list").len(), 1);
        store.delete_vm(&a.id).expect("delete");
        assert!(matches!(store.find_vm("alpha"), Err(StoreError::NotFound { .. })));
        assert!(matches!(store.delete_vm(&a.id), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn names_are_unique() {
        let store = Store::open_in_memory().expect("open");
        store.insert_vm(&vm("web")).expect("first");
        let err = store.insert_vm(&vm("web")).err();
        assert!(matches!(err, Some(StoreError::NameTaken { kind: "vm", .. })), "{err:?}");
        assert_eq!(store.list_vms().expect("list").len(), 1);
    }

    #[test]
    fn ambiguous_prefixes_are_refused() {
        let store = Store::open_in_memory().expect("open");
        let mut a = vm("a");
        let mut b = vm("b");
        a.id = "abc0000000000001".into();
        b.id = "abc0000000000002".into();
        store.insert_vm(&a).expect("a");
        store.insert_vm(&b).expect("b");
        assert!(matches!(store.find_vm("abc"), Err(StoreError::Ambiguous { .. })));
        assert_eq!(store.find_vm("abc0000000000002").expect("full id").name, "b");
    }
}
