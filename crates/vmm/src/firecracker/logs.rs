//! Reading what Firecracker writes: its log (why it stopped) and its metrics file.
//!
//! Firecracker's exit status after a guest fault is unreliable (0 and 1 were both seen for the
//! same fault), so the log decides: `KVM_EXIT_INTERNAL_ERROR` or a failed vCPU run is a guest
//! fault; "Vmm is stopping" alone is the VMM ending on its own (the guest rebooted or powered
//! off, or a fault without a clearer line). Metrics are one JSON object per flush, and most
//! counters in it are deltas since the previous flush, so totals are sums over every line.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// Log lines that mean the guest faulted.
pub const FAULT_MARKERS: &[&str] = &["KVM_EXIT_INTERNAL_ERROR", "Failure during vcpu run", "Unexpected exit reason"];

/// The log line Firecracker writes whenever it stops the VM.
pub const STOPPING_MARKER: &str = "Vmm is stopping";

/// Why Firecracker stopped, as its log tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitCause {
    /// The guest faulted; the line that says so.
    GuestFault(String),
    /// Firecracker stopped with an error it logged.
    VmmError(String),
    /// The VM stopped on its own (guest reboot or power-off).
    Stopped,
}

impl ExitCause {
    /// A sentence for users, with the fix where there is one.
    pub fn describe(&self) -> String {
        match self {
            Self::GuestFault(line) => {
                format!("the guest faulted ({line}); KVM on this host cannot run it (nested PVM?), use --vmm qemu")
            }
            Self::VmmError(line) => format!("firecracker stopped with an error: {line}"),
            Self::Stopped => "the guest stopped the vm (reboot, power-off or panic)".to_owned(),
        }
    }
}

/// Classifies a Firecracker log; `None` when it shows no stop.
pub fn exit_cause(log: &str) -> Option<ExitCause> {
    if let Some(line) = log.lines().find(|line| FAULT_MARKERS.iter().any(|m| line.contains(m))) {
        return Some(ExitCause::GuestFault(strip_prefix(line)));
    }
    if !log.contains(STOPPING_MARKER) {
        return None;
    }
    let error = log.lines().find(|line| line.contains("exiting with error") || line.contains("[ERROR"));
    Some(match error {
        Some(line) => ExitCause::VmmError(strip_prefix(line)),
        None => ExitCause::Stopped,
    })
}

/// Bytes of Firecracker's log [`exit_cause_of`] reads: its end, where a stop is logged.
pub const LOG_TAIL_BYTES: u64 = 1 << 20;

/// Bytes of the metrics file [`sum_metrics`] is given: the newest flushes (one line a minute,
/// about 2 KiB each: more than a day's worth).
pub const METRICS_TAIL_BYTES: u64 = 4 << 20;

/// Longest log line kept in a cause, in bytes.
const MAX_CAUSE_LINE: usize = 1024;

/// [`exit_cause`] of the last [`LOG_TAIL_BYTES`] of the log file at `path` (a missing file
/// shows nothing), its line cut to 1 KiB.
pub fn exit_cause_of(path: &Path) -> Option<ExitCause> {
    let bytes = crate::logfile::read_tail(path, LOG_TAIL_BYTES).ok()?;
    let cap = |line: String| crate::logfile::cap_line(&line, MAX_CAUSE_LINE);
    exit_cause(&String::from_utf8_lossy(&bytes)).map(|cause| match cause {
        ExitCause::GuestFault(line) => ExitCause::GuestFault(cap(line)),
        ExitCause::VmmError(line) => ExitCause::VmmError(cap(line)),
        ExitCause::Stopped => ExitCause::Stopped,
    })
}

/// A log line without Firecracker's `timestamp [id:thread:LEVEL:origin]` prefix.
fn strip_prefix(line: &str) -> String {
    let text = match line.find("] ") {
        Some(at) if line.starts_with(|c: char| c.is_ascii_digit()) || line.starts_with('[') => &line[at + 2..],
        _ => line,
    };
    text.trim().to_owned()
}

/// The counters `vm stats` shows: `(section, field, name)`.
const COUNTERS: &[(&str, &str, &str)] = &[
    ("block", "read_bytes", "block_read_bytes"),
    ("block", "write_bytes", "block_write_bytes"),
    ("net", "rx_bytes_count", "net_rx_bytes"),
    ("net", "tx_bytes_count", "net_tx_bytes"),
    ("vsock", "rx_bytes_count", "vsock_rx_bytes"),
    ("vsock", "tx_bytes_count", "vsock_tx_bytes"),
    ("vcpu", "failures", "vcpu_failures"),
];

/// Totals of the [`COUNTERS`] over every flush in a metrics file's text, plus `flushes`
/// (lines read). Lines that are not JSON (a flush cut short) are skipped.
pub fn sum_metrics(text: &str) -> BTreeMap<String, u64> {
    let mut totals: BTreeMap<String, u64> = COUNTERS.iter().map(|(_, _, name)| ((*name).to_owned(), 0)).collect();
    let mut flushes = 0u64;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(value) = serde_json::from_str::<Value>(line) else { continue };
        flushes += 1;
        for (section, field, name) in COUNTERS {
            let n = value.get(section).and_then(|s| s.get(field)).and_then(Value::as_u64).unwrap_or(0);
            if let Some(total) = totals.get_mut(*name) {
                *total = total.saturating_add(n);
            }
        }
    }
    totals.insert("flushes".to_owned(), flushes);
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAULT_LOG: &str = "\
2026-11-02T10:00:00.000000001 [fc1:main:INFO:src/firecracker/src/main.rs:100] Running Firecracker v1.16.1
2026-11-02T10:01:00.000000001 [fc1:fc_vcpu 0:ERROR:src/vmm/src/vstate/vcpu.rs:500] Failure during vcpu run: Received KVM_EXIT_INTERNAL_ERROR signal
2026-11-02T10:01:00.000000002 [fc1:main:INFO:src/vmm/src/lib.rs:700] Vmm is stopping.
2026-11-02T10:01:00.000000003 [fc1:main:ERROR:src/firecracker/src/main.rs:120] Firecracker exiting with error. exit_code=1
";

    #[test]
    fn faults_win_over_everything() {
        let cause = exit_cause(FAULT_LOG).expect("a cause");
        assert_eq!(
            cause,
            ExitCause::GuestFault("Failure during vcpu run: Received KVM_EXIT_INTERNAL_ERROR signal".into())
        );
        assert!(cause.describe().contains("use --vmm qemu"), "{}", cause.describe());
    }

    #[test]
    fn clean_and_failed_stops() {
        let clean = "[fc:main:INFO] Vmm is stopping.\nFirecracker exiting successfully. exit_code=0\n";
        assert_eq!(exit_cause(clean), Some(ExitCause::Stopped));
        let failed = "Vmm is stopping.\n2026 [fc:main:ERROR:main.rs:1] Firecracker exiting with error. exit_code=3\n";
        assert_eq!(exit_cause(failed), Some(ExitCause::VmmError("Firecracker exiting with error. exit_code=3".into())));
        assert_eq!(exit_cause("Running Firecracker v1.16.1\n"), None);
        assert_eq!(exit_cause_of(Path::new("/nonexistent/firecracker.log")), None);
    }

    #[test]
    fn metrics_are_summed_over_flushes() {
        let text = r#"{"utc_timestamp_ms":1,"block":{"read_bytes":100,"write_bytes":5},"net":{"rx_bytes_count":7},"vcpu":{"failures":0}}
{"utc_timestamp_ms":2,"block":{"read_bytes":50,"write_bytes":0},"vsock":{"rx_bytes_count":9,"tx_bytes_count":4}}
{"truncated":
"#;
        let totals = sum_metrics(text);
        assert_eq!(totals["block_read_bytes"], 150);
        assert_eq!(totals["block_write_bytes"], 5);
        assert_eq!(totals["net_rx_bytes"], 7);
        assert_eq!(totals["net_tx_bytes"], 0);
        assert_eq!(totals["vsock_rx_bytes"], 9);
        assert_eq!(totals["vsock_tx_bytes"], 4);
        assert_eq!(totals["flushes"], 2);
    }
}
