//! The Firecracker slot: selectable by name, not built yet. Launching and control fail with an
//! error that names the fix; process-level checks work as for any VMM, so a daemon can still
//! see and kill a Firecracker process it finds.

use std::path::Path;
use std::time::Duration;

use crate::process::{self, Children, StatsError, VmmStats};
use crate::qemu::LaunchError;
use crate::select::VmmKind;
use crate::spec::LaunchSpec;
use crate::{ControlError, Launched, Vmm, VmmFuture};

/// Placeholder for the Firecracker driver.
#[derive(Debug, Default)]
pub struct FirecrackerDriver {
    children: Children,
}

impl Vmm for FirecrackerDriver {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn launch<'a>(&'a self, _spec: &'a LaunchSpec) -> VmmFuture<'a, Result<Launched, LaunchError>> {
        Box::pin(async { Err(LaunchError::Unsupported { kind: VmmKind::Firecracker }) })
    }

    fn is_alive(&self, pid: u32, vm_dir: &Path) -> bool {
        self.children.is_alive(pid, vm_dir)
    }

    fn quit<'a>(&'a self, _control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        Box::pin(async { Err(ControlError::Unsupported { kind: VmmKind::Firecracker }) })
    }

    fn kill(&self, pid: u32, vm_dir: &Path) -> Result<bool, ControlError> {
        process::kill(pid, vm_dir).map_err(|source| ControlError::Signal { pid, source })
    }

    fn wait_exit<'a>(&'a self, pid: u32, vm_dir: &'a Path, timeout: Duration) -> VmmFuture<'a, bool> {
        Box::pin(self.children.wait_exit(pid, vm_dir, timeout))
    }

    fn stats(&self, pid: u32) -> Result<VmmStats, StatsError> {
        process::stats(pid)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[tokio::test]
    async fn snapshot_methods_default_to_not_supported() {
        let driver = FirecrackerDriver::default();
        let socket = Path::new("/v/api.sock");
        for error in [
            driver.pause(socket).await.unwrap_err(),
            driver.resume(socket).await.unwrap_err(),
            driver.snapshot(socket, Path::new("/s/state")).await.unwrap_err(),
        ] {
            assert!(matches!(error, ControlError::NotSupported { kind: VmmKind::Firecracker, .. }), "{error:?}");
            assert!(error.to_string().contains("not supported by the firecracker vmm"), "{error}");
        }
        let spec = LaunchSpec::new("id", "vm", Path::new("/v"), "/k", "/i");
        let error = driver.restore(&spec, Path::new("/s/state")).await.unwrap_err();
        assert_eq!(error.to_string(), "restore is not supported by the firecracker vmm; use --vmm qemu");
    }

    #[tokio::test]
    async fn launch_says_what_to_do() {
        let spec = LaunchSpec::new("id", "vm", Path::new("/v"), "/k", "/i");
        let error = FirecrackerDriver::default().launch(&spec).await.unwrap_err();
        assert_eq!(error.to_string(), "the firecracker driver is not built yet; use --vmm qemu");
        let error = FirecrackerDriver::default().quit(Path::new("/v/qmp.sock")).await.unwrap_err();
        assert_eq!(error.to_string(), "the firecracker driver is not built yet; use --vmm qemu");
    }
}
