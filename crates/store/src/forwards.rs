//! The `forwards` table: each VM's port forwards, keyed by the host address and port they listen
//! on. Rows go when their VM's row goes (`ON DELETE CASCADE`).

use std::net::IpAddr;

use banger_core::{ForwardProtocol, ForwardRecord, PortForward};
use rusqlite::{params, Row};

use crate::{is_unique_violation, Store, StoreError};

const COLUMNS: &str = "vm_id, host_addr, host_port, guest_port, protocol";

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt { kind: "forward", detail }
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<ForwardRecord, StoreError>> {
    let vm_id: String = row.get(0)?;
    let addr: String = row.get(1)?;
    let host_port: i64 = row.get(2)?;
    let guest_port: i64 = row.get(3)?;
    let protocol: String = row.get(4)?;
    let record = (|| {
        let port = |p: i64| u16::try_from(p).map_err(|_| corrupt(format!("{vm_id}: port {p}")));
        Ok(ForwardRecord {
            forward: PortForward {
                host_addr: addr.parse::<IpAddr>().map_err(|_| corrupt(format!("{vm_id}: host address {addr:?}")))?,
                host_port: port(host_port)?,
                guest_port: port(guest_port)?,
                protocol: ForwardProtocol::parse(&protocol)
                    .ok_or_else(|| corrupt(format!("{vm_id}: protocol {protocol:?}")))?,
            },
            vm_id: vm_id.clone(),
        })
    })();
    Ok(record)
}

impl Store {
    /// Records a forward of VM `vm_id`; a taken host address and port gives
    /// [`StoreError::ForwardTaken`], an unknown VM [`StoreError::NotFound`].
    pub fn insert_forward(&self, vm_id: &str, forward: &PortForward) -> Result<(), StoreError> {
        self.insert_forwards(vm_id, std::slice::from_ref(forward))
    }

    /// Records several forwards of VM `vm_id` in one transaction: all or none.
    pub fn insert_forwards(&self, vm_id: &str, forwards: &[PortForward]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for f in forwards {
            let inserted = tx.execute(
                &format!("INSERT INTO forwards ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                params![vm_id, f.host_addr.to_string(), f.host_port, f.guest_port, f.protocol.as_str()],
            );
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(StoreError::ForwardTaken {
                        host_addr: f.host_addr.to_string(),
                        host_port: f.host_port,
                    });
                }
                Err(rusqlite::Error::SqliteFailure(f, _))
                    if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
                {
                    return Err(StoreError::NotFound { kind: "vm", reference: vm_id.to_owned() });
                }
                Err(e) => return Err(e.into()),
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The forwards of VM `vm_id`, or of every VM when `None`, by host port then address.
    pub fn list_forwards(&self, vm_id: Option<&str>) -> Result<Vec<ForwardRecord>, StoreError> {
        let conn = self.conn();
        let order = "ORDER BY host_port, host_addr";
        let rows = match vm_id {
            Some(id) => {
                let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM forwards WHERE vm_id = ?1 {order}"))?;
                let rows = stmt.query_map([id], from_row)?.collect::<Result<Vec<_>, _>>()?;
                rows
            }
            None => {
                let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM forwards {order}"))?;
                let rows = stmt.query_map([], from_row)?.collect::<Result<Vec<_>, _>>()?;
                rows
            }
        };
        rows.into_iter().collect()
    }

    /// Removes VM `vm_id`'s forward on `host_addr:host_port`.
    pub fn delete_forward(&self, vm_id: &str, host_addr: IpAddr, host_port: u16) -> Result<(), StoreError> {
        let deleted = self.conn().execute(
            "DELETE FROM forwards WHERE vm_id = ?1 AND host_addr = ?2 AND host_port = ?3",
            params![vm_id, host_addr.to_string(), host_port],
        )?;
        match deleted {
            0 => Err(StoreError::NotFound { kind: "forward", reference: format!("{host_addr}:{host_port}") }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vms::tests::vm;

    fn fwd(s: &str) -> PortForward {
        PortForward::parse(s).expect("spec")
    }

    #[test]
    fn crud_round_trip_and_cascade() {
        let store = Store::open_in_memory().expect("open");
        let web = vm("web");
        let db = vm("db");
        store.insert_vm(&web).expect("web");
        store.insert_vm(&db).expect("db");
        store.insert_forwards(&web.id, &[fwd("8080:80"), fwd("[::1]:8443:443")]).expect("insert");
        store.insert_forward(&db.id, &fwd("0.0.0.0:5432:5432")).expect("insert");
        let web_fwds: Vec<PortForward> =
            store.list_forwards(Some(&web.id)).expect("list").into_iter().map(|r| r.forward).collect();
        assert_eq!(web_fwds, [fwd("8080:80"), fwd("[::1]:8443:443")]);
        assert_eq!(store.list_forwards(None).expect("all").len(), 3);

        store.delete_forward(&web.id, fwd("8080:80").host_addr, 8080).expect("delete");
        let missing = store.delete_forward(&web.id, fwd("8080:80").host_addr, 8080);
        assert!(matches!(missing, Err(StoreError::NotFound { kind: "forward", .. })), "{missing:?}");
        // Another VM's forward is not this VM's to delete.
        assert!(store.delete_forward(&web.id, fwd("0.0.0.0:1:1").host_addr, 5432).is_err());

        store.delete_vm(&web.id).expect("delete vm");
        let left = store.list_forwards(None).expect("all");
        assert_eq!(left.len(), 1, "the vm's forwards went with it: {left:?}");
        assert_eq!(left[0].vm_id, db.id);
    }

    #[test]
    fn a_taken_host_port_or_unknown_vm_is_refused_and_nothing_is_half_written() {
        let store = Store::open_in_memory().expect("open");
        let web = vm("web");
        store.insert_vm(&web).expect("web");
        store.insert_forward(&web.id, &fwd("8080:80")).expect("first");
        let err = store.insert_forwards(&web.id, &[fwd("9090:90"), fwd("127.0.0.1:8080:81")]);
        assert!(matches!(err, Err(StoreError::ForwardTaken { host_port: 8080, .. })), "{err:?}");
        assert_eq!(store.list_forwards(None).expect("all").len(), 1, "9090 was rolled back");
        let err = store.insert_forward("nosuchvm", &fwd("7070:70"));
        assert!(matches!(err, Err(StoreError::NotFound { kind: "vm", .. })), "{err:?}");
    }
}
