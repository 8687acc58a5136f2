//! Host side effects behind narrow traits, with Linux implementations and recording fakes:
//! making banger's directories (the paths are `banger_core::Layout`), process liveness, the per-VM handles scratch file, the daemon's
//! lock file, and the probes `banger doctor` runs.

pub mod doctor;
pub mod handles;
pub mod lockfile;
pub mod net;
pub mod paths;
pub mod probe;
pub mod process;

pub use banger_core::Layout;
pub use handles::VmHandles;
pub use probe::{HostProbe, LinuxProbe};
