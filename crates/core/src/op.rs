//! The record of an asynchronous operation (a VM create, later image pulls): its named stages
//! with elapsed times, its outcome, and the pure rules for advancing it.

use serde::{Deserialize, Serialize};

use crate::time::{age, now_rfc3339};

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    /// Still working.
    Running,
    /// Finished well.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped on request.
    Cancelled,
    /// The daemon stopped while it ran.
    Interrupted,
}

impl OpState {
    /// The state's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled, Self::Interrupted]
            .into_iter()
            .find(|v| v.as_str() == s)
    }

    /// Whether the operation has ended.
    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }
}

/// Where a stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Under way.
    Running,
    /// Finished well.
    Done,
    /// Where the operation failed or was cancelled.
    Failed,
}

/// One named step of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Short name, e.g. `reserve`.
    pub name: String,
    /// Where it stands.
    pub state: StageState,
    /// When it began (RFC 3339).
    pub started_at: String,
    /// How long it took, or has taken so far, in milliseconds.
    pub elapsed_ms: u64,
    /// Problems that did not fail the stage (e.g. a `sync_files` entry whose host file is missing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// What a tool run by the stage printed (a Dockerfile step's output), at most
    /// [`MAX_STAGE_OUTPUT`] lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output: Vec<String>,
}

/// Output lines kept per stage; past it one line says the rest was dropped.
pub const MAX_STAGE_OUTPUT: usize = 500;

/// An asynchronous operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRecord {
    /// Random id.
    pub id: String,
    /// What it does, e.g. `vm.create`.
    pub kind: String,
    /// What it works on, e.g. a VM name.
    pub target: String,
    /// Where it stands.
    pub state: OpState,
    /// Its stages, in order.
    pub stages: Vec<StageRecord>,
    /// Why it failed.
    pub error: Option<String>,
    /// The id of what it made (e.g. the VM id), once it succeeded.
    pub result_id: Option<String>,
    /// When it began (RFC 3339).
    pub created_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
    /// Total elapsed milliseconds, so far or in all.
    pub elapsed_ms: u64,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl OperationRecord {
    /// How far it has got, as a follower sees it: its stages and its warnings, counted. A long
    /// poll answers when this changes (or the operation ends).
    pub fn progress(&self) -> (usize, usize) {
        (self.stages.len(), self.stages.iter().map(|s| s.warnings.len() + s.output.len()).sum())
    }

    /// A fresh running operation with no stages yet.
    pub fn begin(id: String, kind: &str, target: &str) -> Self {
        Self {
            id,
            kind: kind.to_owned(),
            target: target.to_owned(),
            state: OpState::Running,
            stages: Vec::new(),
            error: None,
            result_id: None,
            created_at: now_rfc3339(),
            finished_at: None,
            elapsed_ms: 0,
        }
    }

    /// Closes the running stage (if any) as `Done` and opens `name`.
    pub fn enter_stage(&mut self, name: &str) {
        self.close_stage(StageState::Done);
        self.stages.push(StageRecord {
            name: name.to_owned(),
            state: StageState::Running,
            started_at: now_rfc3339(),
            elapsed_ms: 0,
            warnings: Vec::new(),
            output: Vec::new(),
        });
    }

    /// Appends output lines to the current (last) stage, up to [`MAX_STAGE_OUTPUT`].
    pub fn output(&mut self, lines: &[String]) {
        let Some(stage) = self.stages.last_mut() else { return };
        for line in lines {
            match stage.output.len() {
                n if n < MAX_STAGE_OUTPUT => stage.output.push(line.clone()),
                n if n == MAX_STAGE_OUTPUT => stage.output.push("… (more output dropped)".into()),
                _ => return,
            }
        }
    }

    /// Records a warning on the current (last) stage; dropped when there is no stage yet.
    pub fn warn(&mut self, message: &str) {
        if let Some(stage) = self.stages.last_mut() {
            stage.warnings.push(message.to_owned());
        }
    }

    fn close_stage(&mut self, outcome: StageState) {
        if let Some(stage) = self.stages.last_mut().filter(|s| s.state == StageState::Running) {
            stage.state = outcome;
            stage.elapsed_ms = ms(age(&stage.started_at));
        }
    }

    /// Ends the operation in `state` (a terminal one), closing the running stage accordingly.
    /// An operation that already ended keeps its first outcome.
    pub fn finish(&mut self, state: OpState, error: Option<String>, result_id: Option<String>) {
        if self.state.is_terminal() || !state.is_terminal() {
            return;
        }
        self.close_stage(if state == OpState::Succeeded { StageState::Done } else { StageState::Failed });
        self.state = state;
        self.error = error;
        self.result_id = result_id;
        self.finished_at = Some(now_rfc3339());
        self.elapsed_ms = ms(age(&self.created_at));
    }

    /// Refreshes the elapsed times of a running operation and its running stage.
    pub fn refresh_elapsed(&mut self) {
        if self.state == OpState::Running {
            self.elapsed_ms = ms(age(&self.created_at));
            if let Some(stage) = self.stages.last_mut().filter(|s| s.state == StageState::Running) {
                stage.elapsed_ms = ms(age(&stage.started_at));
            }
        }
    }

    /// The running stage's name, if any.
    pub fn current_stage(&self) -> Option<&str> {
        self.stages.last().filter(|s| s.state == StageState::Running).map(|s| s.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_advance_and_close() {
        let mut op = OperationRecord::begin("1".into(), "vm.create", "web");
        op.enter_stage("validate");
        op.enter_stage("reserve");
        assert_eq!(op.current_stage(), Some("reserve"));
        assert_eq!(op.stages[0].state, StageState::Done);
        op.finish(OpState::Succeeded, None, Some("abc".into()));
        assert_eq!(op.state, OpState::Succeeded);
        assert!(op.stages.iter().all(|s| s.state == StageState::Done));
        assert!(op.finished_at.is_some());
        assert!(op.stages.iter().all(|s| s.warnings.is_empty()));
        op.finish(OpState::Failed, Some("late".into()), None);
        assert_eq!(op.state, OpState::Succeeded, "first outcome sticks");
    }

    #[test]
    fn warnings_attach_to_the_current_stage_and_are_omitted_when_empty() {
        let mut op = OperationRecord::begin("1".into(), "vm.start", "web");
        op.warn("before any stage");
        op.enter_stage("disks");
        op.enter_stage("guest-files");
        op.warn("~/.npmrc does not exist; skipped");
        assert_eq!(op.stages[1].warnings, ["~/.npmrc does not exist; skipped"]);
        let json = serde_json::to_value(&op).expect("json");
        assert!(json["stages"][0].get("warnings").is_none(), "{json}");
        let back: OperationRecord = serde_json::from_value(json).expect("parse");
        assert_eq!(back.stages[0].warnings, Vec::<String>::new());
        assert_eq!(back.stages[1].warnings.len(), 1);
    }

    #[test]
    fn failure_marks_the_running_stage() {
        let mut op = OperationRecord::begin("1".into(), "vm.create", "web");
        op.enter_stage("reserve");
        op.finish(OpState::Cancelled, Some("cancelled by user".into()), None);
        assert_eq!(op.stages[0].state, StageState::Failed);
        assert_eq!(op.current_stage(), None);
        assert!(OpState::Cancelled.is_terminal());
        assert_eq!(OpState::parse("interrupted"), Some(OpState::Interrupted));
    }
}
