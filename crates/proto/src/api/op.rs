//! An asynchronous operation on the wire (what every `202` answers and
//! `GET /v1/operations/{op}` polls), with the conversion from the model (`banger_core::op`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
    /// The state's name as sent and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }

    /// Whether the operation has ended.
    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }
}

/// Where a stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
    /// What a tool run by the stage printed (a Dockerfile step's output; at most 500 lines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output: Vec<String>,
}

/// An asynchronous operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

impl OperationRecord {
    /// How far it has got, as a follower sees it: its stages and its warnings and output
    /// lines, counted (the `stages` and `warnings` of a long poll).
    pub fn progress(&self) -> (usize, usize) {
        (self.stages.len(), self.stages.iter().map(|s| s.warnings.len() + s.output.len()).sum())
    }

    /// The running stage's name, if any.
    pub fn current_stage(&self) -> Option<&str> {
        self.stages.last().filter(|s| s.state == StageState::Running).map(|s| s.name.as_str())
    }
}

impl From<banger_core::OpState> for OpState {
    fn from(s: banger_core::OpState) -> Self {
        use banger_core::OpState as M;
        match s {
            M::Running => Self::Running,
            M::Succeeded => Self::Succeeded,
            M::Failed => Self::Failed,
            M::Cancelled => Self::Cancelled,
            M::Interrupted => Self::Interrupted,
        }
    }
}

impl From<banger_core::StageState> for StageState {
    fn from(s: banger_core::StageState) -> Self {
        use banger_core::StageState as M;
        match s {
            M::Running => Self::Running,
            M::Done => Self::Done,
            M::Failed => Self::Failed,
        }
    }
}

impl From<banger_core::StageRecord> for StageRecord {
    fn from(s: banger_core::StageRecord) -> Self {
        let banger_core::StageRecord { name, state, started_at, elapsed_ms, warnings, output } = s;
        Self { name, state: state.into(), started_at, elapsed_ms, warnings, output }
    }
}

impl From<banger_core::OperationRecord> for OperationRecord {
    fn from(o: banger_core::OperationRecord) -> Self {
        let banger_core::OperationRecord {
            id,
            kind,
            target,
            state,
            stages,
            error,
            result_id,
            created_at,
            finished_at,
            elapsed_ms,
        } = o;
        Self {
            id,
            kind,
            target,
            state: state.into(),
            stages: stages.into_iter().map(Into::into).collect(),
            error,
            result_id,
            created_at,
            finished_at,
            elapsed_ms,
        }
    }
}
