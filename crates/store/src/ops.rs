//! The `operations` table: finished and running operations, so that `banger op list` survives
//! a daemon restart. Stages are stored as a JSON array.

use banger_core::{OpState, OperationRecord};
use rusqlite::{params, Row};

use crate::{find_by_reference, Lookup, Store, StoreError};

const COLUMNS: &str = "id, kind, target, state, stages, error, result_id, created_at, finished_at, elapsed_ms";

fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<OperationRecord, StoreError>> {
    let id: String = row.get(0)?;
    let state: String = row.get(3)?;
    let stages: String = row.get(4)?;
    let elapsed: i64 = row.get(9)?;
    let corrupt = |detail: String| StoreError::Corrupt { kind: "operation", detail };
    let Some(state) = OpState::parse(&state) else {
        return Ok(Err(corrupt(format!("{id}: state {state:?}"))));
    };
    let stages = match serde_json::from_str(&stages) {
        Ok(s) => s,
        Err(e) => return Ok(Err(corrupt(format!("{id}: stages: {e}")))),
    };
    Ok(Ok(OperationRecord {
        kind: row.get(1)?,
        target: row.get(2)?,
        state,
        stages,
        error: row.get(5)?,
        result_id: row.get(6)?,
        created_at: row.get(7)?,
        finished_at: row.get(8)?,
        elapsed_ms: u64::try_from(elapsed).unwrap_or(0),
        id,
    }))
}

impl Store {
    /// Inserts or replaces an operation.
    pub fn upsert_operation(&self, op: &OperationRecord) -> Result<(), StoreError> {
        let stages = serde_json::to_string(&op.stages)
            .map_err(|e| StoreError::Corrupt { kind: "operation", detail: e.to_string() })?;
        self.conn().execute(
            &format!("INSERT OR REPLACE INTO operations ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
            params![
                op.id,
                op.kind,
                op.target,
                op.state.as_str(),
                stages,
                op.error,
                op.result_id,
                op.created_at,
                op.finished_at,
                i64::try_from(op.elapsed_ms).unwrap_or(i64::MAX),
            ],
        )?;
        Ok(())
    }

    /// Finds an operation by id or unique id prefix.
    pub fn find_operation(&self, reference: &str) -> Result<OperationRecord, StoreError> {
        let lookup = Lookup {
            select: format!("SELECT {COLUMNS} FROM operations WHERE "),
            scope: &[],
            by_name: false,
            kind: "operation",
            read: from_row,
        };
        find_by_reference(&self.conn(), &lookup, reference)
    }

    /// Every stored operation, oldest first.
    pub fn list_operations(&self) -> Result<Vec<OperationRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM operations ORDER BY created_at, id"))?;
        let rows = stmt.query_map([], from_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    /// Deletes finished operations that ended before `cutoff` (RFC 3339); returns how many.
    pub fn prune_operations(&self, cutoff: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM operations WHERE state != 'running' AND finished_at IS NOT NULL AND finished_at < ?1",
            [cutoff],
        )?)
    }

    /// Marks operations left `running` by a previous daemon as `interrupted`; returns how many.
    pub fn interrupt_running_operations(&self, now: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE operations SET state = 'interrupted', finished_at = ?1, \
             error = 'the daemon stopped while this operation ran' WHERE state = 'running'",
            [now],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_round_trip_prune_and_interrupt() {
        let store = Store::open_in_memory().expect("open");
        let mut done = OperationRecord::begin("aaaa000000000001".into(), "vm.create", "web");
        done.enter_stage("reserve");
        done.finish(OpState::Succeeded, None, Some("vmid".into()));
        store.upsert_operation(&done).expect("done");
        let mut running = OperationRecord::begin("bbbb000000000002".into(), "vm.create", "db");
        running.enter_stage("reserve");
        store.upsert_operation(&running).expect("running");

        assert_eq!(store.find_operation("aaaa").expect("prefix"), done);
        assert_eq!(store.list_operations().expect("list").len(), 2);

        assert_eq!(store.interrupt_running_operations("2099-01-01T00:00:00.000Z").expect("interrupt"), 1);
        assert_eq!(store.find_operation("bbbb").expect("b").state, OpState::Interrupted);

        assert_eq!(store.prune_operations("2000-01-01T00:00:00.000Z").expect("none"), 0);
        assert_eq!(store.prune_operations("2100-01-01T00:00:00.000Z").expect("all"), 2);
        assert!(store.list_operations().expect("list").is_empty());
    }
}
