//! Choosing a VMM and an accelerator from the user's choice and facts about the host.
//!
//! Host facts are plain data ([`HostFacts`]) so selection is tested without a host;
//! [`HostFacts::probe`] reads the real ones. KVM is used only when `/dev/kvm` opens and the nested
//! PVM module (`/sys/module/kvm_pvm`) is absent: under PVM, VM creation succeeds but stock guest
//! kernels never boot.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::firecracker::FirecrackerDriver;
use crate::qemu::QemuDriver;
use crate::Vmm;

pub use banger_core::config::{ParseVmmChoiceError, VmmChoice, VmmKind};

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation (slow, works everywhere).
    Tcg,
}

impl Accel {
    /// The accelerator's name as QEMU spells it (`kvm`, `tcg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Facts about the host that selection depends on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostFacts {
    /// `/dev/kvm` opens read-write.
    pub kvm_openable: bool,
    /// `/sys/module/kvm_pvm` exists (nested PVM: KVM cannot boot stock guests).
    pub kvm_pvm_loaded: bool,
    /// The host TSC frequency in kHz, if known (passed to TCG guests as `tsc_early_khz`).
    pub tsc_khz: Option<u32>,
}

impl HostFacts {
    /// Reads the facts of this host.
    pub fn probe() -> Self {
        Self {
            kvm_openable: std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
            kvm_pvm_loaded: Path::new("/sys/module/kvm_pvm").exists(),
            tsc_khz: host_tsc_khz(),
        }
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
    /// A driver for this selection, for the daemon to hold.
    pub fn driver(&self) -> Arc<dyn Vmm> {
        match self.kind {
            VmmKind::Qemu => Arc::new(QemuDriver::new(self.accel, self.tsc_khz)),
            VmmKind::Firecracker => Arc::new(FirecrackerDriver::default()),
        }
    }
}

/// Why no VMM could be selected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// Firecracker was asked for.
    #[error("the firecracker driver is not built yet; use --vmm qemu")]
    FirecrackerNotBuilt,
}

/// Picks the VMM for `choice` on a host described by `host`. `Auto` picks QEMU.
pub fn select(choice: VmmChoice, host: &HostFacts) -> Result<Selection, SelectError> {
    let kind = match choice {
        VmmChoice::Auto | VmmChoice::Qemu => VmmKind::Qemu,
        VmmChoice::Firecracker => return Err(SelectError::FirecrackerNotBuilt),
    };
    Ok(Selection { kind, accel: host.accel(), tsc_khz: host.tsc_khz })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn host(kvm_openable: bool, kvm_pvm_loaded: bool) -> HostFacts {
        HostFacts { kvm_openable, kvm_pvm_loaded, tsc_khz: Some(2_596_096) }
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
    fn firecracker_is_not_built() {
        let err = select(VmmChoice::Firecracker, &host(true, false)).unwrap_err();
        assert_eq!(err, SelectError::FirecrackerNotBuilt);
        assert_eq!(err.to_string(), "the firecracker driver is not built yet; use --vmm qemu");
    }

    #[test]
    fn driver_matches_selection() {
        let driver = select(VmmChoice::Auto, &host(false, false)).unwrap().driver();
        assert_eq!(driver.kind(), VmmKind::Qemu);
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
