//! banger's model: what a VM, an image, a kernel and an operation *are*, how names and sizes are
//! validated, the pure state transitions of a VM, and where banger keeps its files ([`Layout`]).
//! Nothing here performs I/O beyond reading the clock, the system RNG and, for
//! [`Layout::resolve`], the process's effective uid, environment and current directory.

pub mod artifact;
pub mod config;
pub mod egress;
pub mod forward;
pub mod id;
pub mod layout;
pub mod name;
pub mod net;
pub mod op;
pub mod session;
pub mod size;
pub mod snapshot;
pub mod time;
pub mod vm;

pub use artifact::{ImageRecord, InitMode, KernelRecord};
pub use config::Config;
pub use forward::{ForwardProtocol, ForwardRecord, ForwardSpecError, PortForward};
pub use id::new_id;
pub use layout::{Layout, LayoutEnv};
pub use name::{validate_artifact_name, validate_name, NameError};
pub use op::{OpState, OperationRecord, StageRecord, StageState};
pub use session::{SessionRecord, SessionStatus, StdinMode};
pub use snapshot::SnapshotRecord;
pub use vm::{DesiredState, ObservedState, TransitionError, VmEvent, VmRecord, VmSpec};

/// An error with its whole `source()` chain on one line: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}
