//! The daemon's HTTP/JSON API types for guest sessions (`/v1/vms/{vm}/sessions/...`).

use std::collections::BTreeMap;

use crate::{SessionRecord, StdinMode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/vms/{vm}/sessions`: start a supervised process in a running VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSessionRequest {
    /// Unique within the VM, a DNS label [default: the command's name and the id's first digits].
    pub name: Option<String>,
    /// The program, looked up on the guest's `PATH`.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Absolute working directory in the guest [default: /root]; it must exist.
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Free-form labels, kept with the session.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// `closed` (/dev/null), `pipe` (attaches may write to it) or `tty` (a pseudo-terminal,
    /// typed into and resized by the attach holding it) [default: closed].
    #[serde(default)]
    pub stdin: StdinMode,
    /// A `tty` session's first window size [default: 24 rows, 80 columns]; refused with
    /// another stdin mode.
    #[serde(default)]
    pub tty_size: Option<crate::agent::TtySize>,
}

/// A session as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// The durable record (its status refreshed from the guest when read).
    #[serde(flatten)]
    pub record: SessionRecord,
    /// The VM's name.
    pub vm: String,
    /// Its stdout log in the guest.
    pub stdout_path: String,
    /// Its stderr log in the guest.
    pub stderr_path: String,
}

/// `GET /v1/vms/{vm}/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionList {
    /// The VM's name.
    pub vm: String,
    /// Its sessions, oldest first.
    pub sessions: Vec<SessionView>,
}
