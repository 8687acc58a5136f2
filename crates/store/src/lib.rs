//! banger's durable store: one SQLite database (WAL, foreign keys on) holding what VMs, images,
//! kernels and operations *are*. Transient handles (pids, taps, sockets) never come here.
//!
//! Every method takes the connection mutex for one short statement or transaction; nothing slow
//! runs under it.

mod artifacts;
mod egress;
mod forwards;
mod migrate;
mod ops;
mod pending;
mod sessions;
mod snapshots;
mod vms;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension as _};

pub use migrate::{MIGRATIONS, SCHEMA_VERSION};
pub use pending::{Pending, PendingRow, Table};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or migrated.
    #[error("cannot open the store at {path}")]
    Open {
        /// The database file.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer banger.
    #[error("the store at {path} has schema version {found}, newer than this banger's {supported}; upgrade banger")]
    TooNew {
        /// The database file.
        path: String,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// A unique name is already taken.
    #[error("a {kind} named '{name}' already exists")]
    NameTaken {
        /// `vm`, `image`, `kernel`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A host address and port already has a forward.
    #[error("{host_addr}:{host_port} already has a forward")]
    ForwardTaken {
        /// The host address.
        host_addr: String,
        /// The host port.
        host_port: u16,
    },
    /// No row matches.
    #[error("no {kind} '{reference}'")]
    NotFound {
        /// `vm`, `operation`, ...
        kind: &'static str,
        /// What was looked up.
        reference: String,
    },
    /// An id prefix matches more than one row.
    #[error("'{reference}' matches more than one {kind}; give more of the id or the full name")]
    Ambiguous {
        /// `vm`, `operation`, ...
        kind: &'static str,
        /// What was looked up.
        reference: String,
    },
    /// A stored row could not be read back.
    #[error("corrupt {kind} row: {detail}")]
    Corrupt {
        /// The table's item kind.
        kind: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Any other SQLite failure.
    #[error("store query failed")]
    Sqlite(#[from] rusqlite::Error),
}

/// The store: a single SQLite connection behind a mutex.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let conn = Connection::open(path).map_err(|source| StoreError::Open { path: shown.clone(), source })?;
        Self::init(conn, &shown)
    }

    /// An in-memory store, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn =
            Connection::open_in_memory().map_err(|source| StoreError::Open { path: ":memory:".into(), source })?;
        Self::init(conn, ":memory:")
    }

    fn init(mut conn: Connection, shown: &str) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: shown.to_owned(), source };
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        migrate::apply(&mut conn, shown)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn().query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// The journal mode SQLite reports (`wal` once opened on a file).
    pub fn journal_mode(&self) -> Result<String, StoreError> {
        Ok(self.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0))?)
    }
}

/// A row decoder: SQLite's own failure outside, a row that does not read back inside.
type RowReader<T> = fn(&rusqlite::Row<'_>) -> rusqlite::Result<Result<T, StoreError>>;

/// What [`find_by_reference`] looks in.
struct Lookup<'a, T> {
    /// `SELECT columns FROM table WHERE `, ending with any scope condition and its ` AND `.
    select: String,
    /// The scope condition's parameters (`?1`, ...); the reference comes after them.
    scope: &'a [&'a str],
    /// Whether rows have a `name` to match before the id.
    by_name: bool,
    /// The item kind in errors (`vm`, `snapshot`, ...).
    kind: &'static str,
    read: RowReader<T>,
}

/// Finds one row by exact name (when the table has names), exact id, or unique id prefix, in
/// that order; an ambiguous prefix and no match are errors naming `lookup.kind`.
fn find_by_reference<T>(conn: &Connection, lookup: &Lookup<'_, T>, reference: &str) -> Result<T, StoreError> {
    let Lookup { select, scope, by_name, kind, read } = lookup;
    let n = scope.len() + 1;
    let args = || rusqlite::params_from_iter(scope.iter().copied().chain(std::iter::once(reference)));
    let columns: &[&str] = if *by_name { &["name", "id"] } else { &["id"] };
    for column in columns {
        if let Some(found) = conn.query_row(&format!("{select}{column} = ?{n}"), args(), *read).optional()? {
            return found;
        }
    }
    if banger_core::id::looks_like_id_prefix(reference) {
        let mut stmt = conn.prepare(&format!("{select}id LIKE ?{n} || '%' LIMIT 2"))?;
        let mut found = stmt.query_map(args(), *read)?.collect::<Result<Vec<_>, _>>()?;
        if found.len() > 1 {
            return Err(StoreError::Ambiguous { kind, reference: reference.to_owned() });
        }
        if let Some(found) = found.pop() {
            return found;
        }
    }
    Err(StoreError::NotFound { kind, reference: reference.to_owned() })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
        || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}
