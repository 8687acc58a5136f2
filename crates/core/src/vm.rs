//! The durable VM record (what a VM *is*) and its pure state machine. What is currently true of a
//! running VM (VMM pid, tap, sockets) is not here: that lives with the daemon's handle cache.

use serde::{Deserialize, Serialize};

/// What the user wants the VM to be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// The VM should be running.
    Running,
    /// The VM should not be running.
    Stopped,
}

/// What banger last observed the VM doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// Recorded, never booted.
    Created,
    /// Booting: VMM started, agent not yet ready.
    Starting,
    /// Booted and its agent answered.
    Running,
    /// Running, with its vCPUs paused (`banger vm pause`).
    Paused,
    /// Shutting down.
    Stopping,
    /// Not running; its disks are kept.
    Stopped,
    /// The last start or run failed; see `last_error`.
    Failed,
}

impl ObservedState {
    /// The state's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Created, Self::Starting, Self::Running, Self::Paused, Self::Stopping, Self::Stopped, Self::Failed]
            .into_iter()
            .find(|v| v.as_str() == s)
    }

    /// Whether a VMM may exist for a VM in this state.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Paused | Self::Stopping)
    }
}

impl DesiredState {
    /// The state's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Self::Running),
            "stopped" => Some(Self::Stopped),
            _ => None,
        }
    }
}

/// What a VM is made of; the part of a record a user chooses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Root filesystem image name.
    pub image: String,
    /// Kernel name.
    pub kernel: String,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Work disk size in MiB.
    pub disk_mib: u64,
    /// The VMM that runs it.
    pub vmm: crate::config::VmmKind,
    /// Whether it gets a NIC on banger's bridge (`--no-network` turns it off); without one it
    /// is reachable through the agent channel only.
    #[serde(default = "yes")]
    pub network: bool,
    /// Whether it may reach, and be reached by, other guests and any host port
    /// (`--allow-vm-traffic`).
    #[serde(default)]
    pub allow_vm_traffic: bool,
}

fn yes() -> bool {
    true
}

/// The durable record of a VM, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Random id, 16 hex digits.
    pub id: String,
    /// Unique name, a DNS label.
    pub name: String,
    /// What the VM is made of.
    #[serde(flatten)]
    pub spec: VmSpec,
    /// What the user asked for.
    pub desired_state: DesiredState,
    /// What banger last saw.
    pub state: ObservedState,
    /// Guest IPv4 address, once networking allocates one.
    pub guest_ip: Option<String>,
    /// The VM's own directory; every per-VM path derives from it.
    pub vm_dir: String,
    /// When the record was made (RFC 3339).
    pub created_at: String,
    /// When the record last changed (RFC 3339).
    pub updated_at: String,
    /// The last failure, if the VM is `failed` or a stop went wrong.
    pub last_error: Option<String>,
}

/// Deterministic per-VM paths, all under the VM's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPaths {
    /// The VM's directory.
    pub dir: String,
    /// Serial console log.
    pub console_log: String,
    /// Transient handles scratch file (pid, sockets, tap).
    pub handles: String,
    /// Copy-on-write overlay disk for the root filesystem.
    pub overlay_disk: String,
    /// Work disk mounted at /root.
    pub work_disk: String,
}

impl VmRecord {
    /// The VM's deterministic paths.
    pub fn paths(&self) -> VmPaths {
        let d = self.vm_dir.trim_end_matches('/');
        VmPaths {
            dir: d.to_owned(),
            console_log: format!("{d}/console.log"),
            handles: format!("{d}/handles.json"),
            overlay_disk: format!("{d}/overlay.ext4"),
            work_disk: format!("{d}/work.ext4"),
        }
    }
}

/// Something that happens to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// A start was requested.
    Start,
    /// The guest agent answered: the VM is up.
    Booted,
    /// A stop was requested.
    Stop,
    /// The VMM process went away.
    Exited,
    /// Start or run failed.
    Fail,
    /// Its spec is being changed.
    Modify,
    /// It is being deleted.
    Delete,
    /// Its vCPUs are being paused.
    Pause,
    /// Its paused vCPUs are being resumed.
    Resume,
}

/// A transition the state machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The VM must be stopped for this.
    #[error("vm is {0}; stop it first with `banger vm stop`")]
    MustBeStopped(&'static str),
    /// The VM is already in the requested state or on its way there.
    #[error("vm is already {0}")]
    Already(&'static str),
    /// No such transition.
    #[error("cannot {event} a vm that is {state}")]
    Invalid {
        /// The event, in words.
        event: &'static str,
        /// The current state.
        state: &'static str,
    },
}

/// The next observed state after `event`, or why `event` is not allowed in `state`.
pub fn transition(state: ObservedState, event: &VmEvent) -> Result<ObservedState, TransitionError> {
    use ObservedState as S;
    use VmEvent as E;
    match (state, event) {
        (S::Created | S::Stopped | S::Failed, E::Start) => Ok(S::Starting),
        (S::Starting | S::Running | S::Paused, E::Start) => Err(TransitionError::Already(state.as_str())),
        (S::Starting, E::Booted) => Ok(S::Running),
        (S::Starting | S::Running | S::Paused, E::Stop) => Ok(S::Stopping),
        (S::Running, E::Pause) => Ok(S::Paused),
        (S::Paused, E::Pause) => Err(TransitionError::Already("paused")),
        (S::Paused, E::Resume) => Ok(S::Running),
        (S::Running, E::Resume) => Err(TransitionError::Already("running")),
        (S::Stopping, E::Stop) => Err(TransitionError::Already("stopping")),
        (S::Created | S::Stopped | S::Failed, E::Stop) => Err(TransitionError::Already(state.as_str())),
        (S::Running | S::Paused | S::Stopping, E::Exited) => Ok(S::Stopped),
        (S::Starting, E::Exited) => Ok(S::Failed),
        (_, E::Fail) => Ok(S::Failed),
        (S::Created | S::Stopped | S::Failed, E::Modify | E::Delete) => Ok(state),
        (S::Starting | S::Running | S::Paused | S::Stopping, E::Modify | E::Delete) => {
            Err(TransitionError::MustBeStopped(state.as_str()))
        }
        (_, ev) => Err(TransitionError::Invalid { event: event_word(ev), state: state.as_str() }),
    }
}

fn event_word(e: &VmEvent) -> &'static str {
    match e {
        VmEvent::Start => "start",
        VmEvent::Booted => "mark booted",
        VmEvent::Stop => "stop",
        VmEvent::Exited => "mark exited",
        VmEvent::Fail => "mark failed",
        VmEvent::Modify => "modify",
        VmEvent::Delete => "delete",
        VmEvent::Pause => "pause",
        VmEvent::Resume => "resume",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ObservedState as S;

    #[test]
    fn lifecycle_happy_path() {
        let mut s = S::Created;
        for (ev, want) in [
            (VmEvent::Start, S::Starting),
            (VmEvent::Booted, S::Running),
            (VmEvent::Stop, S::Stopping),
            (VmEvent::Exited, S::Stopped),
            (VmEvent::Start, S::Starting),
            (VmEvent::Fail, S::Failed),
            (VmEvent::Modify, S::Failed),
        ] {
            s = transition(s, &ev).unwrap_or_else(|e| panic!("{ev:?} from {s:?}: {e}"));
            assert_eq!(s, want);
        }
    }

    #[test]
    fn running_vms_cannot_be_modified_or_deleted() {
        for s in [S::Starting, S::Running, S::Paused, S::Stopping] {
            assert!(matches!(transition(s, &VmEvent::Modify), Err(TransitionError::MustBeStopped(_))));
            assert!(matches!(transition(s, &VmEvent::Delete), Err(TransitionError::MustBeStopped(_))));
        }
        for s in [S::Created, S::Stopped, S::Failed] {
            assert_eq!(transition(s, &VmEvent::Delete), Ok(s));
        }
    }

    #[test]
    fn pause_and_resume() {
        assert_eq!(transition(S::Running, &VmEvent::Pause), Ok(S::Paused));
        assert_eq!(transition(S::Paused, &VmEvent::Resume), Ok(S::Running));
        assert_eq!(transition(S::Paused, &VmEvent::Stop), Ok(S::Stopping));
        assert_eq!(transition(S::Paused, &VmEvent::Exited), Ok(S::Stopped));
        assert!(matches!(transition(S::Paused, &VmEvent::Pause), Err(TransitionError::Already(_))));
        assert!(matches!(transition(S::Running, &VmEvent::Resume), Err(TransitionError::Already(_))));
        for s in [S::Created, S::Starting, S::Stopping, S::Stopped, S::Failed] {
            assert!(transition(s, &VmEvent::Pause).is_err(), "{s:?}");
            assert!(transition(s, &VmEvent::Resume).is_err(), "{s:?}");
        }
        assert!(S::Paused.is_active());
    }

    #[test]
    fn refusals() {
        assert!(transition(S::Created, &VmEvent::Booted).is_err());
        assert!(transition(S::Stopped, &VmEvent::Stop).is_err());
        assert!(transition(S::Running, &VmEvent::Start).is_err());
        assert_eq!(transition(S::Starting, &VmEvent::Exited), Ok(S::Failed));
    }

    #[test]
    fn state_names_round_trip() {
        for s in [S::Created, S::Starting, S::Running, S::Paused, S::Stopping, S::Stopped, S::Failed] {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
        assert_eq!(DesiredState::parse("running"), Some(DesiredState::Running));
        assert_eq!(S::parse("nope"), None);
    }
}
