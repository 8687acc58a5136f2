//! Unfinished steps: the `pending` column of `vms`, `snapshots`, `kernels` and `images`.
//!
//! Files and rows cannot change in one transaction, so every step that makes or removes files
//! first records its intent here: a row is inserted *being made* before its files are written and
//! marked complete after; a row is marked *being deleted* before its files go and removed after.
//! A crash in between leaves a row that says what was under way, and the daemon's start-up sweep
//! finishes or rolls it back. Rows being made are not found by the ordinary lookups of kernels,
//! images and snapshots (their files are not all there yet).

use rusqlite::params;

use crate::{Store, StoreError};

/// What is under way for a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Its files are being made (for a VM: its directory, host key and, for a fork, the copies
    /// of its snapshot's disks).
    Making,
    /// Its files are being removed; the row goes last.
    Deleting,
}

impl Pending {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Making => "making",
            Self::Deleting => "deleting",
        }
    }

    /// The value of stored text.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "making" => Some(Self::Making),
            "deleting" => Some(Self::Deleting),
            _ => None,
        }
    }
}

/// A table whose rows own files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `vms` (key: id; files: `vm_dir`).
    Vms,
    /// `snapshots` (key: id; files: `dir`).
    Snapshots,
    /// `kernels` (key: name; files: `dir`).
    Kernels,
    /// `images` (key: name; files: the directory of `rootfs`).
    Images,
}

impl Table {
    fn sql(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Vms => ("vms", "id", "vm_dir"),
            Self::Snapshots => ("snapshots", "id", "dir"),
            Self::Kernels => ("kernels", "name", "dir"),
            Self::Images => ("images", "name", "rootfs"),
        }
    }
}

/// One row of a [`Table`], complete or not, as the sweep sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    /// Its id or name.
    pub key: String,
    /// Where its files are (for images, the rootfs file).
    pub path: String,
    /// What is under way, if anything.
    pub pending: Option<Pending>,
}

impl Store {
    /// Sets (or, with `None`, clears) what is under way for row `key` of `table`.
    pub fn set_pending(&self, table: Table, key: &str, pending: Option<Pending>) -> Result<(), StoreError> {
        let (name, key_column, _) = table.sql();
        let changed = self.conn().execute(
            &format!("UPDATE {name} SET pending = ?2 WHERE {key_column} = ?1"),
            params![key, pending.map(Pending::as_str)],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound { kind: name, reference: key.to_owned() });
        }
        Ok(())
    }

    /// Every row of `table`, complete or not.
    pub fn rows_of(&self, table: Table) -> Result<Vec<PendingRow>, StoreError> {
        let (name, key_column, path_column) = table.sql();
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {key_column}, {path_column}, pending FROM {name}"))?;
        let rows = stmt
            .query_map([], |r| {
                let pending: Option<String> = r.get(2)?;
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, pending))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(key, path, pending)| {
                let pending =
                    match pending {
                        None => None,
                        Some(p) => Some(Pending::parse(&p).ok_or_else(|| StoreError::Corrupt {
                            kind: name,
                            detail: format!("{key}: pending {p:?}"),
                        })?),
                    };
                Ok(PendingRow { key, path, pending })
            })
            .collect()
    }

    /// Removes row `key` of `table`, whatever it is (the sweep's roll-back; forwards and
    /// sessions of a VM go with it). `Ok(false)` if there was none.
    pub fn remove_row(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let (name, key_column, _) = table.sql();
        Ok(self.conn().execute(&format!("DELETE FROM {name} WHERE {key_column} = ?1"), [key])? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshots::tests::snapshot;
    use crate::vms::tests::vm;

    #[test]
    fn rows_being_made_are_not_found_until_complete() {
        let store = Store::open_in_memory().expect("store");
        let s = snapshot("warm");
        let s = banger_core::SnapshotRecord { warm_key: Some("k".into()), ..s };
        store.insert_snapshot_as(&s, Some(Pending::Making)).expect("insert");
        assert!(store.find_warm_snapshot("k").expect("find").is_none(), "not chosen while being made");
        assert!(store.find_snapshot("warm").is_err());
        assert!(store.list_snapshots().expect("list").is_empty());
        let taken = store.insert_snapshot(&s).expect_err("its name is held");
        assert!(matches!(taken, StoreError::NameTaken { .. }), "{taken}");
        let rows = store.rows_of(Table::Snapshots).expect("rows");
        assert_eq!(rows, [PendingRow { key: s.id.clone(), path: s.dir.clone(), pending: Some(Pending::Making) }]);
        store.complete_snapshot(&s.id, 42).expect("complete");
        assert_eq!(store.find_warm_snapshot("k").expect("find").map(|f| f.size_bytes), Some(42));

        let v = vm("fork");
        store.insert_vm_as(&v, Some(&s.id), Some(Pending::Making)).expect("insert vm");
        assert_eq!(store.vm_origin(&v.id).expect("origin").as_deref(), Some(s.id.as_str()));
        assert_eq!(store.rows_of(Table::Vms).expect("rows")[0].pending, Some(Pending::Making));
        store.set_pending(Table::Vms, &v.id, Some(Pending::Deleting)).expect("deleting");
        assert_eq!(store.rows_of(Table::Vms).expect("rows")[0].pending, Some(Pending::Deleting));
        assert!(store.remove_row(Table::Vms, &v.id).expect("remove"));
        assert!(!store.remove_row(Table::Vms, &v.id).expect("again"));
    }
}
