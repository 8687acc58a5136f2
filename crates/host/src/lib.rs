//! Host side effects behind narrow traits, with Linux implementations and recording fakes:
//! where banger keeps its files, process liveness, the per-VM handles scratch file, the daemon's
//! lock file, and the probes `banger doctor` runs.

pub mod doctor;
pub mod handles;
pub mod lockfile;
pub mod net;
pub mod paths;
pub mod probe;
pub mod process;

pub use handles::VmHandles;
pub use paths::Layout;
pub use probe::{HostProbe, LinuxProbe};
