//! The `sessions` table: each VM's guest sessions, names unique per VM. Rows go when their VM's
//! row goes (`ON DELETE CASCADE`). Arguments, environment and tags are stored as JSON text.

use std::collections::BTreeMap;

use banger_core::session::{apply, SessionEvent};
use banger_core::{SessionRecord, SessionStatus, StdinMode};
use rusqlite::{params, Row};

use crate::{find_by_reference, is_unique_violation, Lookup, Store, StoreError};

const COLUMNS: &str = "id, vm_id, name, command, args, cwd, env, tags, stdin_mode, status, pid, exit_code, \
                       exit_signal, launch_stage, launch_message, error, created_at, started_at, ended_at, updated_at";

const ACTIVE: &str = "status IN ('starting', 'running', 'stopping')";

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt { kind: "session", detail }
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<SessionRecord, StoreError>> {
    let id: String = row.get(0)?;
    let args: String = row.get(4)?;
    let env: String = row.get(6)?;
    let tags: String = row.get(7)?;
    let stdin: String = row.get(8)?;
    let status: String = row.get(9)?;
    let pid: Option<i64> = row.get(10)?;
    let record = (|| -> Result<SessionRecord, StoreError> {
        let json = |what: &str, text: &str| corrupt(format!("{id}: {what} {text:?}"));
        Ok(SessionRecord {
            vm_id: row.get(1)?,
            name: row.get(2)?,
            command: row.get(3)?,
            args: serde_json::from_str(&args).map_err(|_| json("args", &args))?,
            cwd: row.get(5)?,
            env: serde_json::from_str::<BTreeMap<String, String>>(&env).map_err(|_| json("env", &env))?,
            tags: serde_json::from_str::<BTreeMap<String, String>>(&tags).map_err(|_| json("tags", &tags))?,
            stdin_mode: StdinMode::parse(&stdin).ok_or_else(|| json("stdin mode", &stdin))?,
            status: SessionStatus::parse(&status).ok_or_else(|| json("status", &status))?,
            pid: pid.map(|p| u32::try_from(p).map_err(|_| corrupt(format!("{id}: pid {p}")))).transpose()?,
            exit_code: row.get(11)?,
            exit_signal: row.get(12)?,
            launch_stage: row.get(13)?,
            launch_message: row.get(14)?,
            error: row.get(15)?,
            created_at: row.get(16)?,
            started_at: row.get(17)?,
            ended_at: row.get(18)?,
            updated_at: row.get(19)?,
            id: id.clone(),
        })
    })();
    Ok(record)
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Vectors and maps of strings always serialise.
    serde_json::to_string(value).unwrap_or_default()
}

fn write(conn: &rusqlite::Connection, s: &SessionRecord, insert: bool) -> Result<usize, StoreError> {
    let sql = if insert {
        format!("INSERT INTO sessions ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)")
    } else {
        "UPDATE sessions SET vm_id = ?2, name = ?3, command = ?4, args = ?5, cwd = ?6, env = ?7, tags = ?8, \
         stdin_mode = ?9, status = ?10, pid = ?11, exit_code = ?12, exit_signal = ?13, launch_stage = ?14, \
         launch_message = ?15, error = ?16, created_at = ?17, started_at = ?18, ended_at = ?19, updated_at = ?20 \
         WHERE id = ?1"
            .to_owned()
    };
    let written = conn.execute(
        &sql,
        params![
            s.id,
            s.vm_id,
            s.name,
            s.command,
            to_json(&s.args),
            s.cwd,
            to_json(&s.env),
            to_json(&s.tags),
            s.stdin_mode.as_str(),
            s.status.as_str(),
            s.pid,
            s.exit_code,
            s.exit_signal,
            s.launch_stage,
            s.launch_message,
            s.error,
            s.created_at,
            s.started_at,
            s.ended_at,
            s.updated_at,
        ],
    );
    match written {
        Ok(n) => Ok(n),
        Err(e) if is_unique_violation(&e) => Err(StoreError::NameTaken { kind: "session", name: s.name.clone() }),
        Err(rusqlite::Error::SqliteFailure(f, _)) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => {
            Err(StoreError::NotFound { kind: "vm", reference: s.vm_id.clone() })
        }
        Err(e) => Err(e.into()),
    }
}

impl Store {
    /// Records a new session; a name its VM already uses gives [`StoreError::NameTaken`], an
    /// unknown VM [`StoreError::NotFound`].
    pub fn insert_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        write(&self.conn(), session, true).map(|_| ())
    }

    /// Replaces an existing session's row (matched by id).
    pub fn update_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        match write(&self.conn(), session, false)? {
            0 => Err(StoreError::NotFound { kind: "session", reference: session.id.clone() }),
            _ => Ok(()),
        }
    }

    /// Finds one of VM `vm_id`'s sessions by exact name, exact id, or unique id prefix.
    pub fn find_session(&self, vm_id: &str, reference: &str) -> Result<SessionRecord, StoreError> {
        let lookup = Lookup {
            select: format!("SELECT {COLUMNS} FROM sessions WHERE vm_id = ?1 AND "),
            scope: &[vm_id],
            by_name: true,
            kind: "session",
            read: from_row,
        };
        find_by_reference(&self.conn(), &lookup, reference)
    }

    /// VM `vm_id`'s sessions, oldest first.
    pub fn list_sessions(&self, vm_id: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {COLUMNS} FROM sessions WHERE vm_id = ?1 ORDER BY created_at, name"))?;
        let rows = stmt.query_map([vm_id], from_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    /// Marks every session of VM `vm_id` that is not over yet as failed with `reason` (its VM
    /// stopped), in one transaction. Returns how many changed.
    pub fn fail_active_sessions(&self, vm_id: &str, reason: &str, now: &str) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let active = {
            let mut stmt = tx.prepare(&format!("SELECT {COLUMNS} FROM sessions WHERE vm_id = ?1 AND {ACTIVE}"))?;
            let rows = stmt.query_map([vm_id], from_row)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().collect::<Result<Vec<_>, _>>()?
        };
        let mut changed = 0;
        for mut session in active {
            if apply(&mut session, SessionEvent::Lost { reason: reason.to_owned() }, now) {
                write(&tx, &session, false)?;
                changed += 1;
            }
        }
        tx.commit()?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vms::tests::vm;

    fn session(vm_id: &str, name: &str) -> SessionRecord {
        let now = banger_core::time::now_rfc3339();
        SessionRecord {
            id: banger_core::new_id(),
            vm_id: vm_id.to_owned(),
            name: name.to_owned(),
            command: "sh".into(),
            args: vec!["-c".into(), "echo 'hi there'".into()],
            cwd: Some("/srv".into()),
            env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "x=y".into())]),
            tags: BTreeMap::from([("team".into(), "web".into())]),
            stdin_mode: StdinMode::Pipe,
            status: SessionStatus::Starting,
            pid: None,
            exit_code: None,
            exit_signal: None,
            launch_stage: None,
            launch_message: None,
            error: None,
            created_at: now.clone(),
            started_at: None,
            ended_at: None,
            updated_at: now,
        }
    }

    #[test]
    fn crud_round_trip_lookup_and_cascade() {
        let store = Store::open_in_memory().expect("open");
        let web = vm("web");
        let db = vm("db");
        store.insert_vm(&web).expect("web");
        store.insert_vm(&db).expect("db");
        let mut a = session(&web.id, "server");
        store.insert_session(&a).expect("insert");
        store.insert_session(&session(&db.id, "server")).expect("same name in another vm");
        assert_eq!(store.find_session(&web.id, "server").expect("by name"), a);
        assert_eq!(store.find_session(&web.id, &a.id).expect("by id"), a);
        assert_eq!(store.find_session(&web.id, &a.id[..5]).expect("by prefix"), a);
        assert!(matches!(store.find_session(&db.id, &a.id), Err(StoreError::NotFound { kind: "session", .. })));

        a.status = SessionStatus::Exited;
        a.pid = Some(4242);
        a.exit_code = Some(143);
        a.exit_signal = Some(15);
        a.ended_at = Some(banger_core::time::now_rfc3339());
        store.update_session(&a).expect("update");
        assert_eq!(store.find_session(&web.id, "server").expect("again"), a);
        assert_eq!(store.list_sessions(&web.id).expect("list"), [a.clone()]);

        store.delete_vm(&web.id).expect("delete vm");
        assert!(store.list_sessions(&web.id).expect("list").is_empty(), "the vm's sessions went with it");
        assert_eq!(store.list_sessions(&db.id).expect("list").len(), 1);
        assert!(matches!(store.update_session(&a), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn names_are_unique_per_vm_and_the_vm_must_exist() {
        let store = Store::open_in_memory().expect("open");
        let web = vm("web");
        store.insert_vm(&web).expect("web");
        store.insert_session(&session(&web.id, "job")).expect("first");
        let err = store.insert_session(&session(&web.id, "job"));
        assert!(matches!(err, Err(StoreError::NameTaken { kind: "session", .. })), "{err:?}");
        let err = store.insert_session(&session("0000000000000000", "job"));
        assert!(matches!(err, Err(StoreError::NotFound { kind: "vm", .. })), "{err:?}");
        let mut b = session(&web.id, "b");
        let mut c = session(&web.id, "c");
        b.id = "abc0000000000001".into();
        c.id = "abc0000000000002".into();
        store.insert_session(&b).expect("b");
        store.insert_session(&c).expect("c");
        assert!(matches!(store.find_session(&web.id, "abc"), Err(StoreError::Ambiguous { .. })));
    }

    #[test]
    fn a_stopped_vm_fails_only_its_active_sessions() {
        let store = Store::open_in_memory().expect("open");
        let web = vm("web");
        let db = vm("db");
        store.insert_vm(&web).expect("web");
        store.insert_vm(&db).expect("db");
        let running = {
            let mut s = session(&web.id, "running");
            s.status = SessionStatus::Running;
            s.pid = Some(10);
            s
        };
        let exited = {
            let mut s = session(&web.id, "exited");
            s.status = SessionStatus::Exited;
            s.exit_code = Some(0);
            s
        };
        let other = session(&db.id, "other");
        for s in [&running, &exited, &other] {
            store.insert_session(s).expect("insert");
        }
        assert_eq!(store.fail_active_sessions(&web.id, "vm is not running", "now").expect("fail"), 1);
        let failed = store.find_session(&web.id, "running").expect("running");
        assert_eq!(failed.status, SessionStatus::Failed);
        assert_eq!(failed.error.as_deref(), Some("vm is not running"));
        assert_eq!((failed.ended_at.as_deref(), failed.updated_at.as_str()), (Some("now"), "now"));
        assert_eq!(store.find_session(&web.id, "exited").expect("exited"), exited, "ended ones keep their outcome");
        assert_eq!(store.find_session(&db.id, "other").expect("other"), other, "other vms are untouched");
        assert_eq!(store.fail_active_sessions(&web.id, "vm is not running", "later").expect("again"), 0);
    }
}
