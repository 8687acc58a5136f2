//! Doctor: the host checks (`banger_host::doctor`) and what the VMM selection picks
//! here, run in the daemon because the daemon is what runs VMMs, with its user, config and
//! state dir. `banger doctor` prints this report; when the daemon cannot start, the CLI's error
//! already says why and what to fix.

use banger_core::Config;
use banger_core::Layout;
use banger_host::doctor::{self, DoctorInput, Status};
use banger_host::LinuxProbe;
use banger_proto::{DoctorCheck, DoctorReport, DoctorStatus};

/// Runs every check on this host for the daemon's layout and config.
pub fn report(layout: &Layout, config: &Config) -> DoctorReport {
    // The daemon's own selection, on this host's facts: what `auto` (or the configured
    // choice) picks, and why.
    let host = banger_vmm::HostFacts::probe_for(config);
    let vmm_pick = banger_vmm::explain(config.vmm, &host).map_err(|e| e.to_string());
    let input = DoctorInput {
        state_dir: &layout.state_dir,
        socket: &layout.socket,
        socket_group: !config.socket_group.is_empty(),
        firecracker_bin: &config.firecracker_bin,
        vmm_pick: Some(vmm_pick),
    };
    let checks: Vec<DoctorCheck> = doctor::run(&LinuxProbe, &input)
        .into_iter()
        .map(|c| DoctorCheck {
            name: c.name.to_owned(),
            status: match c.status {
                Status::Ok => DoctorStatus::Ok,
                Status::Warn => DoctorStatus::Warn,
                Status::Fail => DoctorStatus::Fail,
            },
            detail: c.detail,
            fix: c.fix,
        })
        .collect();
    DoctorReport { ok: checks.iter().all(|c| c.status != DoctorStatus::Fail), checks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_has_every_check_and_ok_means_none_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::resolve(Some(dir.path().to_path_buf()), Some(dir.path().join("s.sock")));
        let report = report(&layout, &Config::default());
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        for n in ["kvm", "qemu", "firecracker", "vmm", "mkfs.ext4", "mmdebstrap", "nft", "disk space", "socket"] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert_eq!(report.ok, !report.checks.iter().any(|c| c.status == DoctorStatus::Fail));
    }
}
