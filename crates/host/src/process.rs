//! Process facts read from the OS: whether a pid is alive and is the process we think it is,
//! and a process's resident memory.

use std::path::Path;

/// Whether `pid` is a live (non-zombie) process one of whose arguments contains `marker`.
///
/// This is banger's one liveness check. The marker guards against pid reuse: a VMM's command
/// line names its VM's directory, so a recycled pid belonging to anything else is not mistaken
/// for the VM.
pub fn pid_alive(pid: u32, marker: &str) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name, which may itself hold spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X" | "x")) {
        return false;
    }
    if marker.is_empty() {
        return true;
    }
    std::fs::read(proc_dir.join("cmdline")).is_ok_and(|raw| cmdline_contains(&raw, marker))
}

/// Whether one argument of a NUL-separated command line contains `marker`.
pub fn cmdline_contains(cmdline: &[u8], marker: &str) -> bool {
    let needle = marker.as_bytes();
    !needle.is_empty() && cmdline.split(|&b| b == 0).any(|arg| arg.windows(needle.len()).any(|w| w == needle))
}

/// Resident set size of `pid` in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_has_memory() {
        let me = std::process::id();
        assert!(pid_alive(me, ""));
        assert!(!pid_alive(me, "definitely-not-in-my-cmdline-0xdeadbeef"));
        assert!(rss_kib(me).is_some_and(|k| k > 0));
    }

    #[test]
    fn reaped_and_missing_processes_are_dead() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(!pid_alive(pid, ""));
        assert!(!pid_alive(u32::MAX - 1, ""));
    }
}
