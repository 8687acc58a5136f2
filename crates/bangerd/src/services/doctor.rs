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
    let mut checks = checks;
    checks.extend(egress_checks());
    DoctorReport { ok: checks.iter().all(|c| c.status != DoctorStatus::Fail), checks }
}

/// What egress policies need: nftables that takes per-VM verdict maps, sets of address . port
/// with timeouts and NFLOG logging (checked with `nft --check`, which asks the kernel without
/// changing anything), and the kernel's NFLOG to the daemon (`nfnetlink_log`) for the denial log.
fn egress_checks() -> Vec<DoctorCheck> {
    use std::io::Write as _;
    let script = "table inet banger_doctor {\n\tset s {\n\t\ttype ipv4_addr . inet_service\n\t\tflags timeout\n\t}\n\
                  \tchain r {\n\t\tlimit rate 200/second log prefix \"bgeg \" group 7716\n\t\tmeta l4proto tcp reject with tcp reset\n\t}\n\
                  \tchain f {\n\t\ttype filter hook forward priority 0; policy accept;\n\
                  \t\tip saddr vmap { 192.0.2.1 : jump r }\n\t\tmeta l4proto tcp ip daddr . th dport @s accept\n\t}\n}\n";
    let nft = std::process::Command::new("nft")
        .args(["--check", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(script.as_bytes())?;
            }
            child.wait_with_output()
        });
    let rules = match nft {
        Ok(out) if out.status.success() => {
            (DoctorStatus::Ok, "verdict maps, timeout sets, reject and NFLOG logging work".to_owned(), None)
        }
        Ok(out) => (
            DoctorStatus::Fail,
            format!("nft refused the egress rules: {}", String::from_utf8_lossy(&out.stderr).trim()),
            Some(
                "a kernel with nf_tables, nft_reject, nft_log and set timeouts (Debian 11+), and nftables 0.9.4+"
                    .to_owned(),
            ),
        ),
        Err(e) => (DoctorStatus::Fail, format!("cannot run nft: {e}"), Some("apt-get install nftables".to_owned())),
    };
    let nflog = if std::path::Path::new("/proc/net/netfilter/nfnetlink_log").exists() {
        (DoctorStatus::Ok, "nfnetlink_log is loaded: refused connections reach the denial log".to_owned(), None)
    } else {
        (
            DoctorStatus::Warn,
            "nfnetlink_log is not loaded yet (the daemon's first bind loads it when modules can be loaded)".to_owned(),
            Some("modprobe nfnetlink_log; without it connections are still refused, but not logged".to_owned()),
        )
    };
    [("egress rules", rules), ("egress log", nflog)]
        .into_iter()
        .map(|(name, (status, detail, fix))| DoctorCheck { name: name.to_owned(), status, detail, fix })
        .collect()
}

/// The most bytes of a kernel's `modules.json` read (a real one is ~3 KB).
const MODULES_JSON_CAP: u64 = 256 * 1024;

/// Whether the default kernel's initramfs loads the guest's balloon driver (`virtio_balloon`):
/// kernels pulled before the balloon lack it, and their guests then never give memory back.
/// `None` when the balloon is off or the kernel is not pulled yet (a pull includes it).
pub fn balloon_check(config: &Config, kernels: &[banger_core::KernelRecord]) -> Option<DoctorCheck> {
    use std::io::Read as _;
    if !config.balloon {
        return None;
    }
    let kernel = kernels.iter().find(|k| k.name == config.default_kernel)?;
    let path = std::path::Path::new(&kernel.dir).join("modules.json");
    let mut text = String::new();
    let read = std::fs::File::open(&path).and_then(|f| f.take(MODULES_JSON_CAP).read_to_string(&mut text));
    let listed = read.is_ok()
        && serde_json::from_str::<serde_json::Value>(&text)
            .is_ok_and(|v| v["modules"].as_array().is_some_and(|m| m.iter().any(|m| m["name"] == "virtio_balloon")));
    let name = &kernel.name;
    Some(if listed {
        DoctorCheck {
            name: "balloon".into(),
            status: DoctorStatus::Ok,
            detail: format!("kernel {name} loads virtio_balloon: guests give freed memory back"),
            fix: None,
        }
    } else {
        DoctorCheck {
            name: "balloon".into(),
            status: DoctorStatus::Warn,
            detail: format!(
                "kernel {name} was pulled without the guest balloon driver: its guests never give freed memory back"
            ),
            fix: Some(format!(
                "pull it again: `banger kernel delete {name}` (after deleting the VMs that use it), then `banger kernel pull {name}`"
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_balloon_check_warns_about_a_kernel_pulled_without_the_driver() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = banger_core::KernelRecord {
            name: "debian-6.1-cloud".into(),
            version: "1".into(),
            release: "6.1.0".into(),
            source: "apt:x".into(),
            dir: dir.path().display().to_string(),
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        let config = Config::default();
        let modules = |names: &[&str]| {
            let list: Vec<_> = names.iter().map(|n| serde_json::json!({ "name": n })).collect();
            std::fs::write(dir.path().join("modules.json"), serde_json::json!({ "modules": list }).to_string())
                .expect("write");
        };
        modules(&["virtio_blk", "virtio_balloon"]);
        let check = balloon_check(&config, std::slice::from_ref(&kernel)).expect("a check");
        assert_eq!(check.status, DoctorStatus::Ok, "{check:?}");
        modules(&["virtio_blk"]);
        let check = balloon_check(&config, std::slice::from_ref(&kernel)).expect("a check");
        assert_eq!(check.status, DoctorStatus::Warn, "{check:?}");
        assert!(check.fix.as_deref().is_some_and(|f| f.contains("banger kernel pull debian-6.1-cloud")), "{check:?}");
        assert!(balloon_check(&config, &[]).is_none(), "no kernel yet: nothing to say");
        let off = Config { balloon: false, ..Config::default() };
        assert!(balloon_check(&off, std::slice::from_ref(&kernel)).is_none());
    }

    #[test]
    fn the_report_has_every_check_and_ok_means_none_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::resolve(Some(dir.path().to_path_buf()), Some(dir.path().join("s.sock")));
        let report = report(&layout, &Config::default());
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        for n in [
            "kvm",
            "qemu",
            "firecracker",
            "vmm",
            "mkfs.ext4",
            "mmdebstrap",
            "nft",
            "disk space",
            "socket",
            "egress rules",
            "egress log",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert_eq!(report.ok, !report.checks.iter().any(|c| c.status == DoctorStatus::Fail));
    }
}
