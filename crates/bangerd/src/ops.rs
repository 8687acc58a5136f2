//! The one registry of asynchronous operations: begin → named stages with elapsed times →
//! succeed, fail or cancel → prune. Running operations live in memory with a cancel flag; every
//! change is also written to the store, so `banger op list` survives a restart and an operation
//! cut short by a dying daemon shows up as `interrupted`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use banger_core::{new_id, OpState, OperationRecord};
use banger_store::Store;
use tokio::sync::Notify;

/// Why an operation could not be read or cancelled.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The store failed, or has no such operation.
    #[error(transparent)]
    Store(#[from] banger_store::StoreError),
    /// It has ended already.
    #[error("operation {id} already {state}")]
    NotRunning {
        /// The operation.
        id: String,
        /// How it ended.
        state: &'static str,
    },
}

/// A cancellation request, checked at stage boundaries and awaitable inside long stages.
#[derive(Default)]
pub struct CancelFlag {
    set: AtomicBool,
    notify: Notify,
}

impl CancelFlag {
    /// Requests cancellation.
    pub fn cancel(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Whether cancellation was requested.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Resolves once cancellation is requested.
    pub async fn cancelled(&self) {
        loop {
            let wait = self.notify.notified();
            if self.is_set() {
                return;
            }
            wait.await;
        }
    }
}

/// The operation was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

struct Entry {
    record: OperationRecord,
    cancel: Arc<CancelFlag>,
}

/// The registry.
pub struct OpRegistry {
    running: Mutex<HashMap<String, Entry>>,
    store: Arc<Store>,
    /// Woken on every change of any operation (long polls of `wait_change`).
    changed: Notify,
}

/// The worker's side of one operation.
pub struct OpHandle {
    id: String,
    registry: Arc<OpRegistry>,
    cancel: Arc<CancelFlag>,
}

impl OpRegistry {
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        Arc::new(Self { running: Mutex::new(HashMap::new()), store, changed: Notify::new() })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, record: &OperationRecord) {
        if let Err(e) = self.store.upsert_operation(record) {
            tracing::warn!(op = %record.id, error = %banger_core::error_chain(&e), "cannot persist operation");
        }
    }

    /// Begins an operation of `kind` on `target`.
    pub fn begin(self: &Arc<Self>, kind: &str, target: &str) -> OpHandle {
        let record = OperationRecord::begin(new_id(), kind, target);
        let cancel = Arc::new(CancelFlag::default());
        self.persist(&record);
        let id = record.id.clone();
        self.map().insert(id.clone(), Entry { record, cancel: cancel.clone() });
        OpHandle { id, registry: self.clone(), cancel }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut OperationRecord)) -> Option<OperationRecord> {
        let snapshot = {
            let mut map = self.map();
            let entry = map.get_mut(id)?;
            f(&mut entry.record);
            let snapshot = entry.record.clone();
            if snapshot.state.is_terminal() {
                map.remove(id);
            }
            snapshot
        };
        self.persist(&snapshot);
        self.changed.notify_waiters();
        Some(snapshot)
    }

    /// Operation `reference` once it differs from what the caller has seen (`seen`: how many
    /// stages and warnings), once it has ended, or after `wait`, whichever comes first.
    pub async fn wait_change(
        &self,
        reference: &str,
        seen: (usize, usize),
        wait: std::time::Duration,
    ) -> Result<OperationRecord, OpsError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so a change between the two is not missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let record = self.get(reference)?;
            if record.state.is_terminal() || record.progress() != seen {
                return Ok(record);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(record);
            }
        }
    }

    /// An operation by id or id prefix, running or finished.
    pub fn get(&self, reference: &str) -> Result<OperationRecord, OpsError> {
        {
            let map = self.map();
            let mut hits = map.values().filter(|e| e.record.id.starts_with(reference));
            if let Some(hit) = hits.next() {
                if hits.next().is_none() {
                    let mut record = hit.record.clone();
                    record.refresh_elapsed();
                    return Ok(record);
                }
            }
        }
        Ok(self.store.find_operation(reference)?)
    }

    /// The operations of this daemon still in memory (the running ones), oldest first, as
    /// [`OpRegistry::list`] orders them; read without touching the store.
    pub fn in_memory(&self) -> Vec<OperationRecord> {
        let mut ops: Vec<OperationRecord> = self
            .map()
            .values()
            .map(|entry| {
                let mut record = entry.record.clone();
                record.refresh_elapsed();
                record
            })
            .collect();
        ops.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        ops
    }

    /// Every kept operation, oldest first, running ones with fresh elapsed times.
    pub fn list(&self) -> Result<Vec<OperationRecord>, OpsError> {
        let mut all = self.store.list_operations()?;
        let map = self.map();
        for op in &mut all {
            if let Some(entry) = map.get(&op.id) {
                *op = entry.record.clone();
                op.refresh_elapsed();
            }
        }
        Ok(all)
    }

    /// Requests cancellation. The worker notices at its next stage boundary; a finished
    /// operation is refused.
    pub fn cancel(&self, reference: &str) -> Result<OperationRecord, OpsError> {
        let record = self.get(reference)?;
        if record.state.is_terminal() {
            return Err(OpsError::NotRunning { id: record.id, state: record.state.as_str() });
        }
        if let Some(entry) = self.map().get(&record.id) {
            entry.cancel.cancel();
        }
        Ok(record)
    }

    /// Forgets finished operations older than `retention`; returns how many.
    pub fn prune(&self, retention: std::time::Duration) -> usize {
        let cutoff = std::time::SystemTime::now().checked_sub(retention).unwrap_or(std::time::UNIX_EPOCH);
        match self.store.prune_operations(&banger_core::time::format_rfc3339(cutoff)) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %banger_core::error_chain(&e), "cannot prune operations");
                0
            }
        }
    }
}

/// A cloneable way to report stages from a blocking thread.
#[derive(Clone)]
pub struct StageSink {
    id: String,
    registry: Arc<OpRegistry>,
    cancel: Arc<CancelFlag>,
}

impl StageSink {
    /// Enters stage `name` (a no-op once the operation ended).
    pub fn stage(&self, name: &str) {
        self.registry.update(&self.id, |r| r.enter_stage(name));
    }

    /// Whether cancellation was requested.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_set()
    }

    /// Appends output lines to the current stage (batch them: each call is a store write).
    pub fn output(&self, lines: &[String]) {
        if !lines.is_empty() {
            self.registry.update(&self.id, |r| r.output(lines));
        }
    }
}

impl OpHandle {
    /// A sink for stages reported from elsewhere (e.g. a blocking build).
    pub fn sink(&self) -> StageSink {
        StageSink { id: self.id.clone(), registry: self.registry.clone(), cancel: self.cancel.clone() }
    }

    /// The operation's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The operation's record now.
    pub fn snapshot(&self) -> Result<OperationRecord, OpsError> {
        self.registry.get(&self.id)
    }

    /// The cancel flag, for long stages that want to select on it.
    pub fn cancel_flag(&self) -> Arc<CancelFlag> {
        self.cancel.clone()
    }

    /// Enters stage `name`, unless cancellation was requested.
    pub fn stage(&self, name: &str) -> Result<(), Cancelled> {
        if self.cancel.is_set() {
            return Err(Cancelled);
        }
        self.registry.update(&self.id, |r| r.enter_stage(name));
        Ok(())
    }

    /// Records a warning on the current stage: something went wrong that does not fail the
    /// operation (the CLI prints it).
    pub fn warn(&self, message: &str) {
        self.registry.update(&self.id, |r| r.warn(message));
    }

    /// Ends the operation well.
    pub fn succeed(self, result_id: Option<String>) {
        self.registry.update(&self.id, |r| r.finish(OpState::Succeeded, None, result_id));
    }

    /// Ends the operation with `error`.
    pub fn fail(self, error: String) {
        self.registry.update(&self.id, |r| r.finish(OpState::Failed, Some(error), None));
    }

    /// Ends the operation as cancelled.
    pub fn cancelled(self) {
        self.registry.update(&self.id, |r| r.finish(OpState::Cancelled, Some("cancelled on request".into()), None));
    }
}

impl Drop for OpHandle {
    fn drop(&mut self) {
        // A worker that panicked or returned without an outcome must not leave the operation
        // running forever.
        self.registry
            .update(&self.id, |r| r.finish(OpState::Failed, Some("operation ended without an outcome".into()), None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_core::StageState;

    fn registry() -> Arc<OpRegistry> {
        OpRegistry::new(Arc::new(Store::open_in_memory().expect("store")))
    }

    #[tokio::test]
    async fn a_long_poll_answers_at_the_next_change_or_its_deadline() {
        use std::time::{Duration, Instant};
        let reg = registry();
        let op = reg.begin("vm.create", "web");
        let id = op.id().to_owned();
        let seen = (reg.get(&id).expect("op").stages.len(), 0);
        let started = Instant::now();
        let same = reg.wait_change(&id, seen, Duration::from_millis(60)).await.expect("wait");
        assert!(started.elapsed() >= Duration::from_millis(60), "nothing changed: it waited");
        assert_eq!(same.stages.len(), seen.0);

        let waiter = {
            let (reg, id) = (reg.clone(), id.clone());
            tokio::spawn(async move { reg.wait_change(&id, seen, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        op.stage("reserve").expect("stage");
        let changed = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("task");
        assert_eq!(changed.expect("record").stages.len(), seen.0 + 1);

        op.warn("a warning");
        let warned = reg.wait_change(&id, (seen.0 + 1, 0), Duration::from_secs(30)).await.expect("wait");
        assert_eq!(warned.stages.last().map(|s| s.warnings.len()), Some(1));

        op.succeed(None);
        let started = Instant::now();
        let ended = reg.wait_change(&id, (seen.0 + 1, 1), Duration::from_secs(30)).await.expect("wait");
        assert!(ended.state.is_terminal() && started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn stages_are_recorded_with_elapsed_times() {
        let reg = registry();
        let op = reg.begin("vm.create", "web");
        let id = op.id().to_owned();
        op.stage("validate").expect("validate");
        std::thread::sleep(std::time::Duration::from_millis(15));
        op.stage("reserve").expect("reserve");
        op.warn("careful");
        let mid = reg.get(&id).expect("get");
        assert_eq!(mid.stages[1].warnings, ["careful"]);
        assert_eq!(mid.state, OpState::Running);
        assert_eq!(mid.current_stage(), Some("reserve"));
        assert!(mid.stages[0].elapsed_ms >= 15, "{:?}", mid.stages);
        op.succeed(Some("vm1".into()));
        let done = reg.get(&id).expect("get done");
        assert_eq!(done.state, OpState::Succeeded);
        assert_eq!(done.result_id.as_deref(), Some("vm1"));
        assert!(done.stages.iter().all(|s| s.state == StageState::Done));
        assert_eq!(reg.list().expect("list").len(), 1);
    }

    #[test]
    fn cancel_stops_at_the_next_stage() {
        let reg = registry();
        let op = reg.begin("vm.create", "web");
        let id = op.id().to_owned();
        op.stage("reserve").expect("reserve");
        let seen = reg.cancel(&id[..8]).expect("cancel by prefix");
        assert_eq!(seen.state, OpState::Running);
        assert_eq!(op.stage("prepare"), Err(Cancelled));
        op.cancelled();
        let done = reg.get(&id).expect("get");
        assert_eq!(done.state, OpState::Cancelled);
        assert_eq!(done.stages.last().map(|s| s.state), Some(StageState::Failed));
        assert!(reg.cancel(&id).is_err(), "a finished operation cannot be cancelled");
    }

    #[tokio::test]
    async fn cancelled_future_wakes() {
        let reg = registry();
        let op = reg.begin("vm.create", "web");
        let id = op.id().to_owned();
        let waiter = tokio::spawn(async move {
            op.cancel_flag().cancelled().await;
            op.cancelled();
        });
        tokio::task::yield_now().await;
        reg.cancel(&id).expect("cancel");
        tokio::time::timeout(std::time::Duration::from_secs(2), waiter).await.expect("woke").expect("join");
        assert_eq!(reg.get(&id).expect("get").state, OpState::Cancelled);
    }

    #[test]
    fn dropped_handles_fail_and_prune_forgets_old_ones() {
        let reg = registry();
        let op = reg.begin("vm.create", "web");
        let id = op.id().to_owned();
        drop(op);
        assert_eq!(reg.get(&id).expect("get").state, OpState::Failed);
        assert_eq!(reg.prune(std::time::Duration::from_secs(3600)), 0, "recent ones are kept");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(reg.prune(std::time::Duration::ZERO), 1);
        assert!(reg.get(&id).is_err());
    }
}
