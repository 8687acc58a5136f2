//! The idle group of `banger bench`: N VMs started one after another and left idle until each
//! VMM's memory stops growing (a condition with a deadline), then the host memory each costs.
//!
//! The VMs are booted fresh, or are forks of one snapshot ([`Start`]): forks map the snapshot's
//! memory copy-on-write, so its clean pages are held once for all of them.
//!
//! RSS double counts: a page shared by several processes (a snapshot's clean pages mapped by
//! its forks, a guest's memory file) counts whole in each. The figure per VM is the daemon's
//! `host_memory_kib` (`vm stats`): the VMM's PSS (`/proc/PID/smaps_rollup`: each shared page
//! divided among its mappers) plus what its memory file on `/dev/shm` holds beyond the part the
//! VMM maps; for forks, plus an equal share of the snapshot memory they map (all of it, not
//! only the pages mapped so far: a conservative figure). RSS, PSS and the drop of the host's
//! `MemAvailable` are reported beside it.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use super::stats::{self, Spread};
use super::Cli;

/// Guest memory of each idle VM.
const MEMORY: &str = "512M";
const MEMORY_MIB: u64 = 512;
/// How often the VMMs' memory is read while waiting for it to settle.
const POLL: Duration = Duration::from_secs(2);
/// Settled: no VMM's host memory moved more than this between polls...
const STILL_KIB: u64 = 1024;
/// ... this many polls in a row.
const STILL_POLLS: u32 = 2;

/// How the idle VMs start.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Booted fresh (`vm create --image`, `vm start`).
    Boot,
    /// Forks of this snapshot (`vm create --from-snapshot`, `vm start`).
    Fork(&'a str),
}

impl Start<'_> {
    /// `boot` or `fork`: the report's key, and part of the VMs' names.
    fn key(self) -> &'static str {
        match self {
            Start::Boot => "boot",
            Start::Fork(_) => "fork",
        }
    }
}

/// One idle VM's memory, in KiB.
#[derive(Debug, Clone, Serialize)]
pub struct IdleVm {
    name: String,
    rss_kib: u64,
    pss_kib: u64,
    memory_file_kib: Option<u64>,
    host_kib: u64,
    /// The snapshot memory a fork maps (shared by every fork of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_memory_kib: Option<u64>,
    /// `MemTotal - MemAvailable` inside the guest.
    guest_used_kib: Option<u64>,
}

/// What the idle group measured.
#[derive(Debug, Serialize)]
pub struct IdleReport {
    /// `boot` or `fork`.
    start: &'static str,
    vms: u32,
    memory_mib: u64,
    /// Whether the memory settled before the deadline (the figures are taken either way).
    settled: bool,
    settle_secs: f64,
    /// Host memory per VM (PSS + memory file beyond it + a share of the snapshot memory), MiB.
    host_mib_per_vm: Option<Spread>,
    pss_mib_per_vm: Option<Spread>,
    /// Guest memory the host holds (the memory file), MiB: the rest of the VMM's memory is
    /// QEMU's own (TCG's code cache, device state, heap).
    guest_held_mib_per_vm: Option<Spread>,
    rss_mib_per_vm: Option<Spread>,
    /// Forks: the snapshot memory they all map, MiB (once, not per VM).
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_memory_mib: Option<f64>,
    guest_used_mib_per_vm: Option<Spread>,
    host_total_mib: f64,
    /// The sum of RSS: counts shared pages once per VM.
    rss_total_mib: f64,
    /// The fall of the host's `MemAvailable` from before the first start to the end, per VM (a
    /// cross-check; every other process on the host moves it too).
    host_available_drop_mib_per_vm: f64,
    per_vm: Vec<IdleVm>,
}

fn host_available_kib() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .context("no MemAvailable in /proc/meminfo")
}

fn read_vm(cli: &Cli, name: &str) -> anyhow::Result<IdleVm> {
    let s = cli.json(&["vm", "stats", name, "--json"])?;
    let kib = |key: &str| s[key].as_u64();
    let guest_used_kib = match (kib("guest_mem_total_kib"), kib("guest_mem_available_kib")) {
        (Some(total), Some(available)) => Some(total.saturating_sub(available)),
        _ => None,
    };
    Ok(IdleVm {
        name: name.to_owned(),
        rss_kib: kib("rss_kib").with_context(|| format!("vm stats of {name} has no rss_kib; is it running?"))?,
        pss_kib: kib("pss_kib").with_context(|| format!("vm stats of {name} has no pss_kib"))?,
        memory_file_kib: kib("memory_file_kib"),
        host_kib: kib("host_memory_kib").with_context(|| format!("vm stats of {name} has no host_memory_kib"))?,
        snapshot_memory_kib: kib("snapshot_memory_kib"),
        guest_used_kib,
    })
}

/// Whether every VM's host memory moved at most [`STILL_KIB`] from `before` to `now`.
fn still(before: &[IdleVm], now: &[IdleVm]) -> bool {
    before.len() == now.len() && before.iter().zip(now).all(|(b, n)| b.host_kib.abs_diff(n.host_kib) <= STILL_KIB)
}

fn mib_spread(vms: &[IdleVm], kib: impl Fn(&IdleVm) -> Option<u64>) -> Option<Spread> {
    let figures: Vec<f64> = vms.iter().filter_map(kib).map(|k| k as f64 / 1024.0).collect();
    stats::spread(&figures)
}

/// Starts `n` VMs of `image` (or forks), waits (up to `settle`) for their memory to settle,
/// measures it and deletes them.
pub fn measure(cli: &Cli, image: &str, n: u32, settle: Duration, start: Start<'_>) -> anyhow::Result<IdleReport> {
    let names: Vec<String> = (0..n).map(|i| cli.name(&format!("idle-{}-{i}", start.key()))).collect();
    let available_before = host_available_kib()?;
    let result = measure_started(cli, image, &names, settle, available_before, start);
    let mut delete = vec!["vm", "delete", "--force"];
    delete.extend(names.iter().map(String::as_str));
    // Some may not exist (a failed start): the final sweep takes what is left.
    let _ = cli.run_anyway(&delete);
    result
}

fn measure_started(
    cli: &Cli,
    image: &str,
    names: &[String],
    settle: Duration,
    available_before: u64,
    start: Start<'_>,
) -> anyhow::Result<IdleReport> {
    for (i, name) in names.iter().enumerate() {
        match start {
            Start::Boot => cli.run(&["vm", "create", name, "--image", image, "--memory", MEMORY])?,
            Start::Fork(snapshot) => cli.run(&["vm", "create", name, "--from-snapshot", snapshot])?,
        };
        cli.run(&["vm", "start", name])?;
        eprintln!("bench: idle: started {}/{}", i + 1, names.len());
    }
    let started = Instant::now();
    let deadline = started + settle;
    let read_all = || names.iter().map(|name| read_vm(cli, name)).collect::<anyhow::Result<Vec<_>>>();
    let mut last = read_all()?;
    let (mut still_polls, mut settled) = (0, false);
    while Instant::now() < deadline {
        std::thread::sleep(POLL);
        let now = read_all()?;
        still_polls = if still(&last, &now) { still_polls + 1 } else { 0 };
        last = now;
        let host: u64 = last.iter().map(|v| v.host_kib).sum();
        eprintln!("bench: idle: {:.0} MiB in all after {:.0} s", host as f64 / 1024.0, started.elapsed().as_secs_f64());
        if still_polls >= STILL_POLLS {
            settled = true;
            break;
        }
    }
    if !settled {
        eprintln!("bench: idle: memory still moving after {settle:?}; reporting it as it is");
    }
    let available_after = host_available_kib()?;
    let count = names.len().max(1) as f64;
    // Forks: the snapshot memory is held once; each VM gets an equal share of it.
    let snapshot_kib = last.iter().filter_map(|v| v.snapshot_memory_kib).max();
    if let Some(shared) = snapshot_kib {
        let share = shared / u64::try_from(names.len().max(1)).unwrap_or(1);
        for vm in &mut last {
            vm.host_kib = vm.host_kib.saturating_add(share);
        }
    }
    let total = |kib: fn(&IdleVm) -> u64| last.iter().map(kib).sum::<u64>() as f64 / 1024.0;
    Ok(IdleReport {
        start: start.key(),
        vms: u32::try_from(names.len()).unwrap_or(u32::MAX),
        memory_mib: MEMORY_MIB,
        settled,
        settle_secs: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        host_mib_per_vm: mib_spread(&last, |v| Some(v.host_kib)),
        pss_mib_per_vm: mib_spread(&last, |v| Some(v.pss_kib)),
        guest_held_mib_per_vm: mib_spread(&last, |v| v.memory_file_kib),
        rss_mib_per_vm: mib_spread(&last, |v| Some(v.rss_kib)),
        snapshot_memory_mib: snapshot_kib.map(|k| k as f64 / 1024.0),
        guest_used_mib_per_vm: mib_spread(&last, |v| v.guest_used_kib),
        host_total_mib: total(|v| v.host_kib),
        rss_total_mib: total(|v| v.rss_kib),
        host_available_drop_mib_per_vm: available_before.saturating_sub(available_after) as f64 / 1024.0 / count,
        per_vm: last,
    })
}

/// The idle group for people.
pub fn print(idle: &IdleReport) -> anyhow::Result<()> {
    let settled = if idle.settled { "settled" } else { "NOT settled" };
    let how = match idle.start {
        "fork" => "forks of one snapshot",
        _ => "booted fresh",
    };
    println!("idle: {} VMs of {} MiB, {how}, {settled} after {:.0} s", idle.vms, idle.memory_mib, idle.settle_secs);
    let row = |what: &str, s: &Option<Spread>| -> Vec<String> {
        match s {
            Some(s) => {
                vec![what.to_owned(), format!("{:.1}", s.median), format!("{:.1}", s.min), format!("{:.1}", s.max)]
            }
            None => vec![what.to_owned(), "-".into(), "-".into(), "-".into()],
        }
    };
    let rows = vec![
        row("host memory (PSS + memory file + snapshot share)", &idle.host_mib_per_vm),
        row("VMM PSS", &idle.pss_mib_per_vm),
        row("guest memory the host holds (memory file)", &idle.guest_held_mib_per_vm),
        row("VMM RSS (counts shared pages)", &idle.rss_mib_per_vm),
        row("used inside the guest", &idle.guest_used_mib_per_vm),
    ];
    crate::output::table(&["PER VM (MIB)", "MEDIAN", "MIN", "MAX"], &rows)?;
    println!(
        "in all: {:.0} MiB host memory, {:.0} MiB RSS summed; host MemAvailable fell {:.1} MiB per VM",
        idle.host_total_mib, idle.rss_total_mib, idle.host_available_drop_mib_per_vm
    );
    if let Some(shared) = idle.snapshot_memory_mib {
        println!("the snapshot memory all forks map: {shared:.1} MiB, held once (shared out in the host figure)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(host_kib: u64) -> IdleVm {
        IdleVm {
            name: "v".into(),
            rss_kib: 0,
            pss_kib: 0,
            memory_file_kib: None,
            host_kib,
            snapshot_memory_kib: None,
            guest_used_kib: None,
        }
    }

    #[test]
    fn still_when_no_vm_moved_more_than_a_mib() {
        assert!(still(&[vm(100_000), vm(50_000)], &[vm(100_900), vm(49_000)]));
        assert!(!still(&[vm(100_000), vm(50_000)], &[vm(100_000), vm(52_000)]));
        assert!(!still(&[vm(1)], &[vm(1), vm(1)]), "a VM more or less is not still");
    }
}
