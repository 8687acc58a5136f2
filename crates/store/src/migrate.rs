//! Versioned schema migrations. `PRAGMA user_version` holds the number of migrations applied;
//! each runs in its own transaction, so a failure leaves the previous version intact.

use rusqlite::Connection;

use crate::StoreError;

/// The migrations, in order. Never edit a released one; append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE kernels (
        name        TEXT PRIMARY KEY,
        version     TEXT NOT NULL,
        release     TEXT NOT NULL,
        source      TEXT NOT NULL,
        dir         TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE images (
        name        TEXT PRIMARY KEY,
        source      TEXT NOT NULL,
        init_mode   TEXT NOT NULL DEFAULT 'fast',
        rootfs      TEXT NOT NULL,
        work_seed   TEXT,
        sha256      TEXT,
        size_bytes  INTEGER NOT NULL DEFAULT 0,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE vms (
        id             TEXT PRIMARY KEY,
        name           TEXT NOT NULL UNIQUE,
        image          TEXT NOT NULL,
        kernel         TEXT NOT NULL,
        vcpus          INTEGER NOT NULL CHECK (vcpus > 0),
        memory_mib     INTEGER NOT NULL CHECK (memory_mib > 0),
        disk_mib       INTEGER NOT NULL CHECK (disk_mib > 0),
        desired_state  TEXT NOT NULL,
        state          TEXT NOT NULL,
        guest_ip       TEXT UNIQUE,
        vm_dir         TEXT NOT NULL,
        created_at     TEXT NOT NULL,
        updated_at     TEXT NOT NULL,
        last_error     TEXT
    );
    CREATE TABLE operations (
        id           TEXT PRIMARY KEY,
        kind         TEXT NOT NULL,
        target       TEXT NOT NULL,
        state        TEXT NOT NULL,
        stages       TEXT NOT NULL,
        error        TEXT,
        result_id    TEXT,
        created_at   TEXT NOT NULL,
        finished_at  TEXT,
        elapsed_ms   INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX operations_created ON operations (created_at);
    "#,
    // 2: each VM records the VMM that runs it.
    r#"
    ALTER TABLE vms ADD COLUMN vmm TEXT NOT NULL DEFAULT 'qemu';
    "#,
    // 3: port forwards
    r#"
    CREATE TABLE forwards (
        vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        host_addr   TEXT NOT NULL,
        host_port   INTEGER NOT NULL,
        guest_port  INTEGER NOT NULL,
        protocol    TEXT NOT NULL DEFAULT 'tcp',
        PRIMARY KEY (host_addr, host_port)
    );
    CREATE INDEX forwards_vm ON forwards (vm_id);
    "#,
    // 4: networking choices per VM (`--no-network`, `--allow-vm-traffic`).
    r#"
    ALTER TABLE vms ADD COLUMN network INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE vms ADD COLUMN allow_vm_traffic INTEGER NOT NULL DEFAULT 0;
    "#,
    // 5: guest sessions
    r#"
    CREATE TABLE sessions (
        id              TEXT PRIMARY KEY,
        vm_id           TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        name            TEXT NOT NULL,
        command         TEXT NOT NULL,
        args            TEXT NOT NULL,
        cwd             TEXT,
        env             TEXT NOT NULL,
        tags            TEXT NOT NULL,
        stdin_mode      TEXT NOT NULL,
        status          TEXT NOT NULL,
        pid             INTEGER,
        exit_code       INTEGER,
        exit_signal     INTEGER,
        launch_stage    TEXT,
        launch_message  TEXT,
        error           TEXT,
        created_at      TEXT NOT NULL,
        started_at      TEXT,
        ended_at        TEXT,
        updated_at      TEXT NOT NULL,
        UNIQUE (vm_id, name)
    );
    CREATE INDEX sessions_vm ON sessions (vm_id, created_at);
    "#,
    // 6: memory snapshots, and the snapshot each fork was started from.
    r#"
    CREATE TABLE snapshots (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        source_vm_id    TEXT NOT NULL,
        source_vm_name  TEXT NOT NULL,
        image           TEXT NOT NULL,
        kernel          TEXT NOT NULL,
        vcpus           INTEGER NOT NULL CHECK (vcpus > 0),
        memory_mib      INTEGER NOT NULL CHECK (memory_mib > 0),
        disk_mib        INTEGER NOT NULL CHECK (disk_mib > 0),
        vmm             TEXT NOT NULL,
        network         INTEGER NOT NULL,
        dir             TEXT NOT NULL,
        size_bytes      INTEGER NOT NULL DEFAULT 0,
        warm_key        TEXT UNIQUE,
        created_at      TEXT NOT NULL
    );
    ALTER TABLE vms ADD COLUMN origin_snapshot TEXT REFERENCES snapshots(id);
    CREATE INDEX vms_origin_snapshot ON vms (origin_snapshot);
    "#,
    // 7: unfinished steps: a row being made (its files are not all there yet) or being deleted
    // (its files may be partly gone). NULL when complete. The daemon's start-up sweep finishes or
    // rolls back every row that has one.
    r#"
    ALTER TABLE vms ADD COLUMN pending TEXT;
    ALTER TABLE snapshots ADD COLUMN pending TEXT;
    ALTER TABLE kernels ADD COLUMN pending TEXT;
    ALTER TABLE images ADD COLUMN pending TEXT;
    "#,
    // 8: each VM's egress policy (JSON of `banger_core::egress::EgressPolicy`); a VM without a
    // row (made before this migration) is `open`.
    r#"
    CREATE TABLE egress_policies (
        vm_id   TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        policy  TEXT NOT NULL
    );
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub(crate) fn apply(conn: &mut Connection, shown: &str) -> Result<(), StoreError> {
    let open_err = |source| StoreError::Open { path: shown.to_owned(), source };
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(open_err)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::TooNew { path: shown.to_owned(), found: current, supported: SCHEMA_VERSION });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
        let version = index + 1;
        let tx = conn.transaction().map_err(open_err)?;
        tx.execute_batch(sql).map_err(open_err)?;
        tx.pragma_update(None, "user_version", i64::try_from(version).unwrap_or(i64::MAX)).map_err(open_err)?;
        tx.commit().map_err(open_err)?;
        tracing::info!(version, "store migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    #[test]
    fn migrates_an_empty_database_to_the_latest_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("banger.db");
        let store = Store::open(&path).expect("open");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        assert_eq!(store.journal_mode().expect("mode"), "wal");
        let tables: Vec<String> = {
            let conn = store.conn();
            let mut stmt =
                conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").expect("prepare");
            let rows = stmt.query_map([], |r| r.get(0)).expect("query");
            rows.collect::<Result<_, _>>().expect("rows")
        };
        for table in ["forwards", "images", "kernels", "operations", "sessions", "snapshots", "vms"] {
            assert!(tables.iter().any(|t| t == table), "{table} missing from {tables:?}");
        }
        let fk: i64 = store.conn().query_row("PRAGMA foreign_keys", [], |r| r.get(0)).expect("fk");
        assert_eq!(fk, 1);
        drop(store);
        // Re-opening applies nothing and keeps the version.
        let again = Store::open(&path).expect("reopen");
        assert_eq!(again.schema_version().expect("version"), SCHEMA_VERSION);
    }

    #[test]
    fn upgrades_a_version_1_database_keeping_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("banger.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(MIGRATIONS[0]).expect("v1");
            conn.pragma_update(None, "user_version", 1).expect("set");
            conn.execute(
                "INSERT INTO vms (id, name, image, kernel, vcpus, memory_mib, disk_mib, desired_state, state, vm_dir, \
                 created_at, updated_at) VALUES ('aaaa', 'old', 'i', 'k', 1, 512, 2048, 'stopped', 'created', '/v', 't', 't')",
                [],
            )
            .expect("row");
        }
        let store = Store::open(&path).expect("migrate");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        let vm = store.find_vm("old").expect("kept");
        assert_eq!(vm.spec.vmm, banger_core::config::VmmKind::Qemu);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("banger.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 5).expect("set");
        }
        let err = Store::open(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("upgrade banger"), "{err}");
    }
}
