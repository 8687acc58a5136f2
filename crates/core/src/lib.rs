//! banger's model: what a VM, an image, a kernel and an operation *are*, how names and sizes are
//! validated, and the pure state transitions of a VM. Nothing here performs I/O beyond reading the
//! clock and the system RNG.

pub mod artifact;
pub mod config;
pub mod id;
pub mod name;
pub mod op;
pub mod size;
pub mod time;
pub mod vm;

pub use artifact::{ImageRecord, InitMode, KernelRecord};
pub use config::Config;
pub use id::new_id;
pub use name::{validate_artifact_name, validate_name, NameError};
pub use op::{OpState, OperationRecord, StageRecord, StageState};
pub use vm::{DesiredState, ObservedState, TransitionError, VmEvent, VmRecord, VmSpec};
