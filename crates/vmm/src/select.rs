//! Choosing a VMM and an accelerator from the user's choice and facts about the host.
//!
//! Host facts are plain data ([`HostFacts`]) so selection is tested without a host;
//! [`HostFacts::probe`] reads the real ones. KVM is used only when `/dev/kvm` opens and the nested
//! PVM module (`/sys/module/kvm_pvm`) is absent: under PVM, VM creation succeeds but stock guest
//! kernels never boot.
//!
//! `auto` picks Firecracker when its binary is found and KVM boots stock guests; otherwise QEMU,
//! with KVM when usable and TCG when not. [`explain`] says why, for `banger doctor`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_core::Config;

use serde::{Deserialize, Serialize};

use crate::firecracker::{FirecrackerDriver, FirecrackerOptions};
use crate::qemu::QemuDriver;
use crate::Vmm;

pub use crate::spec::Accel;
pub use banger_core::config::{ParseVmmChoiceError, VmmChoice, VmmKind};

/// Facts about the host that selection depends on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostFacts {
    /// `/dev/kvm` opens read-write.
    pub kvm_openable: bool,
    /// `/sys/module/kvm_pvm` exists (nested PVM: KVM cannot boot stock guests).
    pub kvm_pvm_loaded: bool,
    /// The host TSC frequency in kHz, if known (passed to TCG guests as `tsc_early_khz`).
    pub tsc_khz: Option<u32>,
    /// The Firecracker binary, when found (`firecracker_bin`, a path or a name on `PATH`).
    #[serde(default)]
    pub firecracker: Option<PathBuf>,
    /// What was looked for as the Firecracker binary.
    #[serde(default)]
    pub firecracker_wanted: String,
}

impl HostFacts {
    /// Reads the facts of this host, looking for `firecracker` on `PATH`.
    pub fn probe() -> Self {
        Self::probe_for(&Config::default())
    }

    /// Reads the facts of this host, looking for Firecracker where `config` says.
    pub fn probe_for(config: &Config) -> Self {
        Self {
            kvm_openable: std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
            kvm_pvm_loaded: Path::new("/sys/module/kvm_pvm").exists(),
            tsc_khz: host_tsc_khz(),
            firecracker: crate::process::find_program(Path::new(&config.firecracker_bin)),
            firecracker_wanted: config.firecracker_bin.clone(),
        }
    }

    /// Why KVM cannot boot stock guests here, with the fix; `None` when it can.
    pub fn kvm_problem(&self) -> Option<&'static str> {
        match (self.kvm_openable, self.kvm_pvm_loaded) {
            (true, false) => None,
            (_, true) => Some(
                "/dev/kvm here is nested PVM (kvm_pvm is loaded), which cannot boot stock guest kernels; \
                 run banger on a host (or a VM with nested virtualization) whose KVM boots stock guests",
            ),
            (false, false) => Some(
                "/dev/kvm is missing or not accessible; load kvm_intel or kvm_amd and give the daemon \
                 read-write access to /dev/kvm",
            ),
        }
    }

    /// Why Firecracker's binary is not usable, with the fix; `None` when it is found.
    pub fn firecracker_problem(&self) -> Option<String> {
        if self.firecracker.is_some() {
            return None;
        }
        let wanted = if self.firecracker_wanted.is_empty() { "firecracker" } else { &self.firecracker_wanted };
        Some(format!(
            "firecracker binary {wanted:?} not found; install a firecracker release binary (v1.16) on PATH or set \
             `firecracker_bin` in config.toml"
        ))
    }

    /// The accelerator these facts allow: KVM if `/dev/kvm` opens and PVM is not loaded.
    pub fn accel(&self) -> Accel {
        if self.kvm_openable && !self.kvm_pvm_loaded {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

/// The host TSC frequency in kHz: the kernel's `tsc_freq_khz` in sysfs where the kernel exports
/// it, else `/proc/cpuinfo` "cpu MHz" × 1000.
pub fn host_tsc_khz() -> Option<u32> {
    let sysfs = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz").ok();
    if let Some(khz) = sysfs.as_deref().and_then(|s| s.trim().parse().ok()).filter(|&khz: &u32| khz > 0) {
        return Some(khz);
    }
    parse_cpuinfo_tsc_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// The first "cpu MHz" of a `/proc/cpuinfo` text, in kHz (rounded).
pub fn parse_cpuinfo_tsc_khz(cpuinfo: &str) -> Option<u32> {
    let mhz: f64 = cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "cpu MHz")
        .and_then(|(_, value)| value.trim().parse().ok())?;
    let khz = (mhz * 1000.0).round();
    // The range check makes the cast exact.
    #[expect(clippy::cast_possible_truncation, reason = "range checked just before")]
    (1.0..=f64::from(u32::MAX)).contains(&khz).then_some(khz as u32)
}

/// A VMM and accelerator chosen by [`select`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// The VMM.
    pub kind: VmmKind,
    /// The accelerator.
    pub accel: Accel,
    /// Host TSC frequency to hand to TCG guests, if known.
    pub tsc_khz: Option<u32>,
}

impl Selection {
    /// A driver for this selection with default options, for the daemon to hold.
    pub fn driver(&self) -> Arc<dyn Vmm> {
        self.driver_for(&Config::default())
    }

    /// A driver for this selection, set up as `config` says (`firecracker_bin`, jailer).
    pub fn driver_for(&self, config: &Config) -> Arc<dyn Vmm> {
        match self.kind {
            VmmKind::Qemu => Arc::new(QemuDriver::new(self.accel, self.tsc_khz)),
            VmmKind::Firecracker => Arc::new(FirecrackerDriver::new(FirecrackerOptions::from_config(config))),
        }
    }
}

/// Why no VMM could be selected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// Firecracker was asked for and cannot run here.
    #[error("firecracker cannot run on this host: {}; or use --vmm qemu", reasons.join("; and "))]
    FirecrackerUnavailable {
        /// Each reason, with its fix.
        reasons: Vec<String>,
    },
}

/// Picks the VMM for `choice` on a host described by `host`: see the module docs.
pub fn select(choice: VmmChoice, host: &HostFacts) -> Result<Selection, SelectError> {
    let qemu = Selection { kind: VmmKind::Qemu, accel: host.accel(), tsc_khz: host.tsc_khz };
    let firecracker = Selection { kind: VmmKind::Firecracker, accel: Accel::Kvm, tsc_khz: host.tsc_khz };
    let reasons: Vec<String> =
        host.firecracker_problem().into_iter().chain(host.kvm_problem().map(str::to_owned)).collect();
    match choice {
        VmmChoice::Qemu => Ok(qemu),
        VmmChoice::Auto if reasons.is_empty() => Ok(firecracker),
        VmmChoice::Auto => Ok(qemu),
        VmmChoice::Firecracker if reasons.is_empty() => Ok(firecracker),
        VmmChoice::Firecracker => Err(SelectError::FirecrackerUnavailable { reasons }),
    }
}

/// One sentence on what `choice` picks on `host` and why (for `banger doctor`).
pub fn explain(choice: VmmChoice, host: &HostFacts) -> Result<String, SelectError> {
    let selection = select(choice, host)?;
    let picked = match selection.kind {
        VmmKind::Firecracker => "firecracker (kvm)".to_owned(),
        VmmKind::Qemu => format!("qemu ({})", selection.accel),
    };
    let why = match (choice, selection.kind) {
        (VmmChoice::Firecracker, _) => "asked for, and its binary is found and KVM boots stock guests".to_owned(),
        (_, VmmKind::Firecracker) => "its binary is found and KVM boots stock guests".to_owned(),
        (VmmChoice::Qemu, _) => "asked for".to_owned(),
        (VmmChoice::Auto, VmmKind::Qemu) => {
            let fc = host.firecracker.is_none().then_some("firecracker is not installed");
            let kvm = match (host.kvm_openable, host.kvm_pvm_loaded) {
                (true, false) => None,
                (_, true) => Some("KVM is nested PVM (kvm_pvm loaded) and cannot boot stock guests"),
                (false, false) => Some("/dev/kvm is missing or not accessible"),
            };
            fc.into_iter().chain(kvm).collect::<Vec<_>>().join(" and ")
        }
    };
    let accel_note = match (selection.kind, selection.accel) {
        (VmmKind::Qemu, Accel::Tcg) => "; guests run under TCG emulation (slower than KVM)",
        _ => "",
    };
    Ok(format!("{choice} picks {picked}: {why}{accel_note}"))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn host(kvm_openable: bool, kvm_pvm_loaded: bool) -> HostFacts {
        HostFacts { kvm_openable, kvm_pvm_loaded, tsc_khz: Some(2_596_096), ..HostFacts::default() }
    }

    fn with_firecracker(mut host: HostFacts) -> HostFacts {
        host.firecracker = Some("/usr/local/bin/firecracker".into());
        host.firecracker_wanted = "firecracker".into();
        host
    }

    #[test]
    fn parses_choices() {
        assert_eq!("auto".parse::<VmmChoice>(), Ok(VmmChoice::Auto));
        assert_eq!("QEMU".parse::<VmmChoice>(), Ok(VmmChoice::Qemu));
        assert_eq!("firecracker".parse::<VmmChoice>(), Ok(VmmChoice::Firecracker));
        let err = "bhyve".parse::<VmmChoice>().unwrap_err();
        assert_eq!(err.to_string(), "unknown vmm \"bhyve\"; use auto, qemu or firecracker");
        assert_eq!(VmmChoice::Qemu.to_string(), "qemu");
    }

    #[test]
    fn auto_and_qemu_pick_qemu() {
        for choice in [VmmChoice::Auto, VmmChoice::Qemu] {
            let selection = select(choice, &host(true, false)).unwrap();
            assert_eq!(selection, Selection { kind: VmmKind::Qemu, accel: Accel::Kvm, tsc_khz: Some(2_596_096) });
        }
    }

    #[test]
    fn accel_follows_kvm_and_pvm() {
        assert_eq!(select(VmmChoice::Auto, &host(true, false)).unwrap().accel, Accel::Kvm);
        assert_eq!(select(VmmChoice::Auto, &host(true, true)).unwrap().accel, Accel::Tcg);
        assert_eq!(select(VmmChoice::Auto, &host(false, false)).unwrap().accel, Accel::Tcg);
        assert_eq!(select(VmmChoice::Auto, &host(false, true)).unwrap().accel, Accel::Tcg);
    }

    #[test]
    fn auto_picks_firecracker_only_with_its_binary_and_stock_kvm() {
        let good = with_firecracker(host(true, false));
        let selection = select(VmmChoice::Auto, &good).unwrap();
        assert_eq!((selection.kind, selection.accel), (VmmKind::Firecracker, Accel::Kvm));
        assert_eq!(select(VmmChoice::Firecracker, &good).unwrap().kind, VmmKind::Firecracker);
        assert_eq!(select(VmmChoice::Qemu, &good).unwrap().kind, VmmKind::Qemu);
        // PVM: QEMU under TCG.
        let pvm = with_firecracker(host(true, true));
        let selection = select(VmmChoice::Auto, &pvm).unwrap();
        assert_eq!((selection.kind, selection.accel), (VmmKind::Qemu, Accel::Tcg));
        // No binary: QEMU, with KVM when it works.
        let selection = select(VmmChoice::Auto, &host(true, false)).unwrap();
        assert_eq!((selection.kind, selection.accel), (VmmKind::Qemu, Accel::Kvm));
    }

    #[test]
    fn firecracker_refusals_say_why_and_how_to_fix() {
        let err = select(VmmChoice::Firecracker, &host(true, true)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("firecracker cannot run on this host: firecracker binary \"firecracker\" not found"),
            "{text}"
        );
        assert!(text.contains("set `firecracker_bin` in config.toml"), "{text}");
        assert!(text.contains("nested PVM (kvm_pvm is loaded)"), "{text}");
        assert!(text.ends_with("; or use --vmm qemu"), "{text}");
        let err = select(VmmChoice::Firecracker, &with_firecracker(host(false, false))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "firecracker cannot run on this host: /dev/kvm is missing or not accessible; load kvm_intel or kvm_amd \
             and give the daemon read-write access to /dev/kvm; or use --vmm qemu"
        );
    }

    #[test]
    fn explanations() {
        let pvm = host(true, true);
        assert_eq!(
            explain(VmmChoice::Auto, &pvm).unwrap(),
            "auto picks qemu (tcg): firecracker is not installed and KVM is nested PVM (kvm_pvm loaded) and cannot \
             boot stock guests; guests run under TCG emulation (slower than KVM)"
        );
        assert_eq!(
            explain(VmmChoice::Auto, &with_firecracker(host(true, false))).unwrap(),
            "auto picks firecracker (kvm): its binary is found and KVM boots stock guests"
        );
        assert_eq!(explain(VmmChoice::Qemu, &host(true, false)).unwrap(), "qemu picks qemu (kvm): asked for");
        assert!(explain(VmmChoice::Firecracker, &pvm).is_err());
    }

    #[test]
    fn driver_matches_selection() {
        let driver = select(VmmChoice::Auto, &host(false, false)).unwrap().driver();
        assert_eq!(driver.kind(), VmmKind::Qemu);
        let driver = select(VmmChoice::Auto, &with_firecracker(host(true, false))).unwrap().driver();
        assert_eq!(driver.kind(), VmmKind::Firecracker);
    }

    #[test]
    fn tsc_from_cpuinfo() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.096\ncache size\t: 512 KB\n\
                       processor\t: 1\ncpu MHz\t\t: 1800.000\n";
        assert_eq!(parse_cpuinfo_tsc_khz(cpuinfo), Some(2_596_096));
        assert_eq!(parse_cpuinfo_tsc_khz("cpu MHz : 2999.9996\n"), Some(3_000_000));
        assert_eq!(parse_cpuinfo_tsc_khz("processor : 0\n"), None);
        assert_eq!(parse_cpuinfo_tsc_khz("cpu MHz : nan\n"), None);
        assert_eq!(parse_cpuinfo_tsc_khz("cpu MHz : -5\n"), None);
    }
}
