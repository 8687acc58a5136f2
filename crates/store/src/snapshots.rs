//! The `snapshots` table, and the `vms.origin_snapshot` column that ties a fork to the snapshot
//! it was started from (a foreign key: a snapshot with forks cannot be deleted).

use banger_core::config::VmmKind;
use banger_core::SnapshotRecord;
use rusqlite::{params, OptionalExtension, Row};

use crate::{find_by_reference, is_unique_violation, Lookup, Pending, Store, StoreError};

const COLUMNS: &str = "id, name, source_vm_id, source_vm_name, image, kernel, vcpus, memory_mib, disk_mib, vmm, \
                       network, dir, size_bytes, warm_key, created_at";

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt { kind: "snapshot", detail }
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<SnapshotRecord, StoreError>> {
    let id: String = row.get(0)?;
    let vcpus: i64 = row.get(6)?;
    let memory: i64 = row.get(7)?;
    let disk: i64 = row.get(8)?;
    let vmm: String = row.get(9)?;
    let size: i64 = row.get(12)?;
    let record = (|| -> Result<SnapshotRecord, StoreError> {
        Ok(SnapshotRecord {
            name: row.get(1)?,
            source_vm_id: row.get(2)?,
            source_vm_name: row.get(3)?,
            image: row.get(4)?,
            kernel: row.get(5)?,
            vcpus: u32::try_from(vcpus).map_err(|_| corrupt(format!("{id}: vcpus {vcpus}")))?,
            memory_mib: u64::try_from(memory).map_err(|_| corrupt(format!("{id}: memory {memory}")))?,
            disk_mib: u64::try_from(disk).map_err(|_| corrupt(format!("{id}: disk {disk}")))?,
            vmm: VmmKind::parse(&vmm).ok_or_else(|| corrupt(format!("{id}: vmm {vmm:?}")))?,
            network: row.get(10)?,
            dir: row.get(11)?,
            size_bytes: u64::try_from(size).unwrap_or(0),
            warm_key: row.get(13)?,
            created_at: row.get(14)?,
            id: id.clone(),
        })
    })();
    Ok(record)
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Records a complete snapshot; a taken name (or warm key) gives [`StoreError::NameTaken`].
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        self.insert_snapshot_as(s, None)
    }

    /// Records a snapshot, complete (`None`) or with an unfinished step (one being made holds
    /// its name and warm key but is not found, listed or forked until [`Self::complete_snapshot`]).
    pub fn insert_snapshot_as(&self, s: &SnapshotRecord, pending: Option<Pending>) -> Result<(), StoreError> {
        let result = self.conn().execute(
            &format!(
                "INSERT INTO snapshots ({COLUMNS}, pending) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
            ),
            params![
                s.id,
                s.name,
                s.source_vm_id,
                s.source_vm_name,
                s.image,
                s.kernel,
                s.vcpus,
                i64_of(s.memory_mib),
                i64_of(s.disk_mib),
                s.vmm.as_str(),
                s.network,
                s.dir,
                i64_of(s.size_bytes),
                s.warm_key,
                s.created_at,
                pending.map(Pending::as_str),
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::NameTaken { kind: "snapshot", name: s.name.clone() }),
            Err(e) => Err(e.into()),
        }
    }

    /// Marks snapshot `id` complete, with its size (known once its files are written).
    pub fn complete_snapshot(&self, id: &str, size_bytes: u64) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE snapshots SET size_bytes = ?2, pending = NULL WHERE id = ?1",
            params![id, i64_of(size_bytes)],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound { kind: "snapshot", reference: id.to_owned() });
        }
        Ok(())
    }

    /// Sets a recorded snapshot's size (known once its files are written).
    pub fn set_snapshot_size(&self, id: &str, size_bytes: u64) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .execute("UPDATE snapshots SET size_bytes = ?2 WHERE id = ?1", params![id, i64_of(size_bytes)])?;
        if changed == 0 {
            return Err(StoreError::NotFound { kind: "snapshot", reference: id.to_owned() });
        }
        Ok(())
    }

    /// Finds a complete snapshot by exact name, exact id, or unique id prefix (in that order).
    pub fn find_snapshot(&self, reference: &str) -> Result<SnapshotRecord, StoreError> {
        let lookup = Lookup {
            select: format!("SELECT {COLUMNS} FROM snapshots WHERE pending IS NULL AND "),
            scope: &[],
            by_name: true,
            kind: "snapshot",
            read: from_row,
        };
        find_by_reference(&self.conn(), &lookup, reference)
    }

    /// The complete warm-start snapshot recorded for `warm_key`, if any (one being made is
    /// never chosen: its files are not all there).
    pub fn find_warm_snapshot(&self, warm_key: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM snapshots WHERE warm_key = ?1 AND pending IS NULL"),
                [warm_key],
                from_row,
            )
            .optional()?
            .transpose()
    }

    /// Every complete snapshot, oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {COLUMNS} FROM snapshots WHERE pending IS NULL ORDER BY created_at, name"))?;
        let rows = stmt.query_map([], from_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    /// Deletes a snapshot's row by id. A snapshot that forks still name is refused by the
    /// foreign key (check [`Self::snapshot_forks`] first for a clear message).
    pub fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        match self.conn().execute("DELETE FROM snapshots WHERE id = ?1", [id])? {
            0 => Err(StoreError::NotFound { kind: "snapshot", reference: id.to_owned() }),
            _ => Ok(()),
        }
    }

    /// Records that VM `vm_id` was started from snapshot `snapshot_id` (or, with `None`, from none).
    pub fn set_vm_origin(&self, vm_id: &str, snapshot_id: Option<&str>) -> Result<(), StoreError> {
        let changed =
            self.conn().execute("UPDATE vms SET origin_snapshot = ?2 WHERE id = ?1", params![vm_id, snapshot_id])?;
        if changed == 0 {
            return Err(StoreError::NotFound { kind: "vm", reference: vm_id.to_owned() });
        }
        Ok(())
    }

    /// The id of the snapshot VM `vm_id` was started from, if any.
    pub fn vm_origin(&self, vm_id: &str) -> Result<Option<String>, StoreError> {
        let found: Option<Option<String>> =
            self.conn().query_row("SELECT origin_snapshot FROM vms WHERE id = ?1", [vm_id], |r| r.get(0)).optional()?;
        found.ok_or_else(|| StoreError::NotFound { kind: "vm", reference: vm_id.to_owned() })
    }

    /// For every VM forked from a snapshot that still exists: the VM's id and the snapshot's
    /// name (one query for a whole listing).
    pub fn vm_origin_names(&self) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT v.id, s.name FROM vms v JOIN snapshots s ON s.id = v.origin_snapshot WHERE s.pending IS NULL",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The names of the VMs started from snapshot `snapshot_id`, sorted.
    pub fn snapshot_forks(&self, snapshot_id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name FROM vms WHERE origin_snapshot = ?1 ORDER BY name")?;
        let rows = stmt.query_map([snapshot_id], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vms::tests::vm;

    pub(crate) fn snapshot(name: &str) -> SnapshotRecord {
        let id = banger_core::new_id();
        SnapshotRecord {
            dir: format!("/tmp/snapshots/{id}"),
            id,
            name: name.into(),
            source_vm_id: "0123456789abcdef".into(),
            source_vm_name: "web".into(),
            image: "debian-bookworm".into(),
            kernel: "debian-6.1-cloud".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 2048,
            vmm: VmmKind::Qemu,
            network: true,
            size_bytes: 0,
            warm_key: None,
            created_at: banger_core::time::now_rfc3339(),
        }
    }

    #[test]
    fn crud_round_trip() {
        let store = Store::open_in_memory().expect("open");
        let mut s = snapshot("base");
        store.insert_snapshot(&s).expect("insert");
        assert_eq!(store.find_snapshot("base").expect("by name"), s);
        assert_eq!(store.find_snapshot(&s.id).expect("by id"), s);
        assert_eq!(store.find_snapshot(&s.id[..6]).expect("by prefix"), s);
        store.set_snapshot_size(&s.id, 4096).expect("size");
        s.size_bytes = 4096;
        assert_eq!(store.list_snapshots().expect("list"), vec![s.clone()]);
        let dup = store.insert_snapshot(&snapshot("base")).err();
        assert!(matches!(dup, Some(StoreError::NameTaken { kind: "snapshot", .. })), "{dup:?}");
        store.delete_snapshot(&s.id).expect("delete");
        assert!(matches!(store.find_snapshot("base"), Err(StoreError::NotFound { .. })));
        assert!(matches!(store.delete_snapshot(&s.id), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn warm_snapshots_are_found_by_key_and_unique() {
        let store = Store::open_in_memory().expect("open");
        let mut w = snapshot("warm-1");
        w.warm_key = Some("k1".into());
        store.insert_snapshot(&w).expect("insert");
        assert_eq!(store.find_warm_snapshot("k1").expect("find"), Some(w));
        assert_eq!(store.find_warm_snapshot("k2").expect("find"), None);
        let mut again = snapshot("warm-2");
        again.warm_key = Some("k1".into());
        assert!(matches!(store.insert_snapshot(&again), Err(StoreError::NameTaken { .. })));
    }

    #[test]
    fn forks_pin_their_snapshot() {
        let store = Store::open_in_memory().expect("open");
        let s = snapshot("base");
        store.insert_snapshot(&s).expect("snapshot");
        let (a, b) = (vm("fork-a"), vm("fork-b"));
        store.insert_vm(&a).expect("a");
        store.insert_vm(&b).expect("b");
        assert_eq!(store.vm_origin(&a.id).expect("origin"), None);
        store.set_vm_origin(&b.id, Some(&s.id)).expect("origin b");
        store.set_vm_origin(&a.id, Some(&s.id)).expect("origin a");
        assert_eq!(store.vm_origin(&a.id).expect("origin"), Some(s.id.clone()));
        assert_eq!(store.snapshot_forks(&s.id).expect("forks"), ["fork-a", "fork-b"]);
        // The foreign key refuses deleting a snapshot forks name.
        assert!(store.delete_snapshot(&s.id).is_err());
        store.delete_vm(&a.id).expect("delete a");
        store.set_vm_origin(&b.id, None).expect("clear b");
        assert!(store.snapshot_forks(&s.id).expect("forks").is_empty());
        store.delete_snapshot(&s.id).expect("now deletable");
        assert!(matches!(store.set_vm_origin("nope", None), Err(StoreError::NotFound { .. })));
        // An unknown snapshot cannot be named as an origin.
        assert!(store.set_vm_origin(&b.id, Some("0000000000000000")).is_err());
    }
}
