//! `banger bench`: start and memory figures measured in one run, side by side.
//!
//! Every case runs the real CLI (this executable, against the same daemon) as a user would, so
//! what is timed includes the API, the operation polling and the process start of the client.
//! The cases of a comparison run in alternation (A, B, A, B, ...; [`stats::alternate`]), and a
//! comparison is the median of its pairwise ratios (round i of B over round i of A) with their
//! min and max, so a change in the host's load falls on both sides. The groups (`--case`):
//! - boot: `vm run --rm -- true` cold, the same from a snapshot, and the bare VMM booting the
//!   same kernel, initramfs and disks with banger's command line, the guest running `/bin/true`
//!   and powering off (`banger.run=/bin/true`: the floor banger's own work is measured against);
//! - ready: `vm start` to ready of a recorded VM: a cold boot, a fork of a 512 MiB guest's
//!   snapshot and a fork of a 4 GiB guest's (restore until it has its own identity);
//! - idle: N VMs booted fresh, and N forks of one snapshot, left idle until each VMM's memory
//!   stops growing, then the host memory each costs ([`idle`]);
//! - concurrent: one cold `vm run --rm -- true` against N at once (wall time of all N);
//! - runsc: gVisor's `runsc --network=none do true` against `vm run --rm --from-snapshot S --
//!   true` (when `runsc` is installed);
//! - creates: one `vm create` against N at once (records and directories: the control plane).
//!
//! Everything the benchmark makes is named `bench-<pid>-...` and deleted at the end, also after
//! a failure or Ctrl-C (the run stops at its next step, then cleans up).

mod cases;
mod idle;
mod stats;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::client::Client;
use stats::Spread;

/// Set by Ctrl-C: no new step starts, cleanup runs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Arguments of `banger bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Rounds per alternated comparison (each case once per round; medians over rounds)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// The groups to run, comma-separated [default: all; runsc only when installed]
    #[arg(long = "case", value_enum, value_delimiter = ',')]
    cases: Vec<CaseGroup>,
    /// How many cold starts (and creates) run at once in the concurrent and creates groups
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=64))]
    concurrent: u32,
    /// How many VMs the idle group starts (512 MiB each)
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    idle: u32,
    /// How the idle group's VMs start, comma-separated: booted fresh, forks of one snapshot
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [IdleStart::Boot, IdleStart::Fork])]
    idle_start: Vec<IdleStart>,
    /// How long the idle VMs may take to settle, in seconds
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=3600))]
    settle_timeout: u64,
    /// The image the cases use
    #[arg(long, default_value = "minimal")]
    image: String,
    /// Print the results as JSON (progress stays on stderr)
    #[arg(long)]
    json: bool,
}

/// How the idle group's VMs start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdleStart {
    /// `vm create --image`, `vm start`
    Boot,
    /// Forks of one 512 MiB snapshot (`vm create --from-snapshot`)
    Fork,
}

/// A group of cases compared with each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseGroup {
    /// Cold `vm run --rm -- true`, the same from a snapshot, and the bare VMM
    Boot,
    /// Start to ready: cold boot, fork of a 512 MiB snapshot, fork of a 4 GiB snapshot
    Ready,
    /// Host memory per idle VM (`--idle N` VMs)
    Idle,
    /// One cold start against `--concurrent` N at once
    Concurrent,
    /// gVisor's `runsc do true` against `vm run --rm --from-snapshot S -- true`
    Runsc,
    /// One `vm create` against `--concurrent` N at once
    Creates,
}

const ALL_GROUPS: [CaseGroup; 6] =
    [CaseGroup::Boot, CaseGroup::Ready, CaseGroup::Idle, CaseGroup::Concurrent, CaseGroup::Runsc, CaseGroup::Creates];

/// One measured case.
#[derive(Debug, Serialize)]
struct Case {
    name: &'static str,
    what: String,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    samples_ms: Vec<f64>,
}

/// One comparison: the median, min and max of `numerator / denominator` per round.
#[derive(Debug, Serialize)]
struct Ratio {
    numerator: &'static str,
    denominator: &'static str,
    what: String,
    median: f64,
    min: f64,
    max: f64,
    pairs: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    image: String,
    rounds: u32,
    /// `/proc/loadavg` (1, 5, 15 min) when the run began and ended.
    load_before: [f64; 3],
    load_after: [f64; 3],
    /// Groups asked for but not run, and why.
    skipped: Vec<(CaseGroup, String)>,
    cases: Vec<Case>,
    ratios: Vec<Ratio>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<idle::IdleReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_forks: Option<idle::IdleReport>,
}

/// The cases of one alternated group and the comparisons made of them (indices into `cases`).
struct Group {
    cases: Vec<(&'static str, String)>,
    ratios: Vec<(usize, usize, String)>,
}

impl Report {
    /// Adds a group's figures (one list per case, in round order).
    fn add(&mut self, group: Group, figures: Vec<Vec<f64>>) {
        for ((name, what), samples) in group.cases.iter().zip(&figures) {
            let s = stats::spread(samples).unwrap_or(Spread { median: 0.0, min: 0.0, max: 0.0, n: 0 });
            self.cases.push(Case {
                name,
                what: what.clone(),
                median_ms: s.median,
                min_ms: s.min,
                max_ms: s.max,
                samples_ms: samples.clone(),
            });
        }
        for (num, den, what) in group.ratios {
            if let Some(s) = stats::pairwise(&figures[num], &figures[den]) {
                self.ratios.push(Ratio {
                    numerator: group.cases[num].0,
                    denominator: group.cases[den].0,
                    what,
                    median: s.median,
                    min: s.min,
                    max: s.max,
                    pairs: s.n,
                });
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [fields.next().unwrap_or(0.0), fields.next().unwrap_or(0.0), fields.next().unwrap_or(0.0)]
}

/// Runs this CLI against the same daemon.
struct Cli {
    exe: PathBuf,
    state_dir: PathBuf,
    socket: PathBuf,
    /// `bench-<pid>-`: the names of everything this run makes.
    prefix: String,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--state-dir").arg(&self.state_dir).arg("--socket").arg(&self.socket).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Stops the run when Ctrl-C was pressed.
    fn check_interrupted() -> anyhow::Result<()> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Runs `banger ARGS`, failing with its stderr when it fails; returns stdout.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        Self::check_interrupted()?;
        self.run_anyway(args)
    }

    /// [`Cli::run`], also after Ctrl-C (for cleanup).
    fn run_anyway(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).output().with_context(|| format!("cannot run banger {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("`banger {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let text = self.run(args)?;
        serde_json::from_str(&text).with_context(|| format!("`banger {}` printed no JSON", args.join(" ")))
    }

    /// A name for something this run makes.
    fn name(&self, what: &str) -> String {
        format!("{}{what}", self.prefix)
    }

    /// Deletes every VM and snapshot this run made (forks before snapshots).
    fn sweep(&self) {
        let names = |list: &str, key: &str| -> Vec<String> {
            let Ok(text) = self.run_anyway(&[list, "list", "--json"]) else { return Vec::new() };
            let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            value[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["name"].as_str())
                .filter(|n| n.starts_with(&self.prefix))
                .map(str::to_owned)
                .collect()
        };
        let vms = names("vm", "vms");
        if !vms.is_empty() {
            let mut args = vec!["vm", "delete", "--force"];
            args.extend(vms.iter().map(String::as_str));
            if let Err(e) = self.run_anyway(&args) {
                eprintln!("bench: cleanup: {e:#}");
            }
        }
        for snapshot in names("snapshot", "snapshots") {
            if let Err(e) = self.run_anyway(&["snapshot", "delete", &snapshot]) {
                eprintln!("bench: cleanup: {e:#}");
            }
        }
    }
}

/// Runs the benchmark and prints the report.
pub async fn run(client: &Client, args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    client.ensure_daemon().await?;
    let cli = Cli {
        exe: std::env::current_exe().context("cannot find this executable")?,
        state_dir: client.layout().state_dir.clone(),
        socket: client.layout().socket.clone(),
        prefix: format!("bench-{}-", std::process::id()),
    };
    let json = args.json;
    let task = tokio::task::spawn_blocking(move || {
        let report = measure(&cli, &args);
        eprintln!("bench: cleaning up");
        cli.sweep();
        report
    });
    tokio::pin!(task);
    let report = loop {
        tokio::select! {
            done = &mut task => break done.context("the benchmark task failed")??,
            _ = tokio::signal::ctrl_c() => {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("bench: interrupted; stopping after this step and cleaning up");
            }
        }
    };
    if json {
        crate::output::json(&report)?;
    } else {
        print_report(&report)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_report(report: &Report) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = report
        .cases
        .iter()
        .map(|c| {
            let samples: Vec<String> = c.samples_ms.iter().map(|s| format!("{s:.0}")).collect();
            vec![
                c.what.clone(),
                format!("{:.0}", c.median_ms),
                format!("{:.0}", c.min_ms),
                format!("{:.0}", c.max_ms),
                samples.join(" "),
            ]
        })
        .collect();
    crate::output::table(&["CASE", "MEDIAN MS", "MIN", "MAX", "SAMPLES (ROUND ORDER)"], &rows)?;
    println!();
    let rows: Vec<Vec<String>> = report
        .ratios
        .iter()
        .map(|r| {
            vec![
                r.what.clone(),
                format!("{:.3}", r.median),
                format!("{:.3}", r.min),
                format!("{:.3}", r.max),
                r.pairs.to_string(),
            ]
        })
        .collect();
    crate::output::table(&["RATIO (PER ROUND)", "MEDIAN", "MIN", "MAX", "PAIRS"], &rows)?;
    for idle in [&report.idle, &report.idle_forks].into_iter().flatten() {
        println!();
        idle::print(idle)?;
    }
    for (group, why) in &report.skipped {
        println!("skipped {}: {why}", group.to_possible_value().map_or_else(String::new, |v| v.get_name().to_owned()));
    }
    let [a, b, c] = report.load_before;
    let [d, e, f] = report.load_after;
    println!("load average: {a:.2} {b:.2} {c:.2} before, {d:.2} {e:.2} {f:.2} after ({} rounds)", report.rounds);
    Ok(())
}

/// Whether `program` is an executable in `PATH`.
fn in_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn measure(cli: &Cli, args: &BenchArgs) -> anyhow::Result<Report> {
    let mut report = Report {
        image: args.image.clone(),
        rounds: args.runs,
        load_before: load_average(),
        load_after: [0.0; 3],
        skipped: Vec::new(),
        cases: Vec::new(),
        ratios: Vec::new(),
        idle: None,
        idle_forks: None,
    };
    let chosen = if args.cases.is_empty() { ALL_GROUPS.to_vec() } else { args.cases.clone() };
    let runsc = in_path("runsc");
    if chosen.contains(&CaseGroup::Runsc) && !runsc {
        let why = "runsc (gVisor) is not installed; on Debian: apt-get install runsc";
        if !args.cases.is_empty() {
            bail!("{why}");
        }
        eprintln!("bench: leaving out the runsc group: {why}");
        report.skipped.push((CaseGroup::Runsc, why.to_owned()));
    }
    let image = args.image.as_str();
    eprintln!("bench: warming up (artifacts, initramfs, guest network)");
    cli.run(&["vm", "run", "--rm", "--name", &cli.name("warm"), "--image", image, "--", "true"])?;
    let mut snapshots = cases::Snapshots::default();
    let ctx = cases::Ctx { cli, image, rounds: args.runs };
    for group in ALL_GROUPS.into_iter().filter(|g| chosen.contains(g)) {
        match group {
            CaseGroup::Boot => cases::boot(&ctx, &mut snapshots, &mut report)?,
            CaseGroup::Ready => cases::ready(&ctx, &mut snapshots, &mut report)?,
            CaseGroup::Idle => {
                let settle = Duration::from_secs(args.settle_timeout);
                if args.idle_start.contains(&IdleStart::Boot) {
                    report.idle = Some(idle::measure(cli, image, args.idle, settle, idle::Start::Boot)?);
                }
                if args.idle_start.contains(&IdleStart::Fork) {
                    let snapshot = snapshots.small(cli, image)?;
                    let start = idle::Start::Fork(&snapshot);
                    report.idle_forks = Some(idle::measure(cli, image, args.idle, settle, start)?);
                }
            }
            CaseGroup::Concurrent => cases::concurrent(&ctx, args.concurrent, &mut report)?,
            CaseGroup::Runsc if runsc => cases::runsc(&ctx, &mut snapshots, &mut report)?,
            CaseGroup::Runsc => {}
            CaseGroup::Creates => cases::creates(&ctx, args.concurrent, &mut report)?,
        }
    }
    report.load_after = load_average();
    Ok(report)
}
