//! `banger bench`: boot and create timings measured in one run, side by side with their ratios.
//!
//! Every case runs the real CLI (this executable, against the same daemon) as a user would, so
//! what is timed includes the API, the operation polling and the process start of the client:
//! - cold: `banger vm run --rm -- true` (create, boot, exec, stop, delete);
//! - snapshot: the same run started from a memory snapshot of a booted VM of the same image
//!   (`vm run --rm --from-snapshot S -- true`: copy its disks, restore, new identity, exec,
//!   stop, delete), the path `warm_start` takes;
//! - to ready: `vm start` alone of a recorded VM, cold (boot until the agent answers) against
//!   a recorded fork (`vm create --from-snapshot`: restore until it has its own identity);
//! - bare: the VMM alone booting the same kernel, initramfs and disks with the command line
//!   banger used, the guest running `/bin/true` and powering off (`banger.run=/bin/true`); this
//!   is the floor banger's own work is measured against;
//! - creates: one `vm create` against N concurrent ones (the control plane's locking).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;

use crate::client::Client;

/// Arguments of `banger bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Runs per boot case (the median is reported)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// How many creates run at once in the concurrency case
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    concurrent: u32,
    /// The image the boot cases use
    #[arg(long, default_value = "minimal")]
    image: String,
    /// Print the results as JSON
    #[arg(long)]
    json: bool,
}

/// One measured case.
#[derive(Debug, Serialize)]
struct Case {
    name: &'static str,
    what: String,
    median_ms: f64,
    samples_ms: Vec<f64>,
}

impl Case {
    /// A case of `samples` (ms), summed up by their median.
    fn of(name: &'static str, what: impl Into<String>, samples: Vec<f64>) -> Self {
        Self { name, what: what.into(), median_ms: median(&samples), samples_ms: samples }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    image: String,
    cases: Vec<Case>,
    /// `bare / cold`, `concurrent / one` and the like.
    ratios: Vec<(String, f64)>,
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

/// Runs this CLI against the same daemon.
struct Cli {
    exe: PathBuf,
    state_dir: PathBuf,
    socket: PathBuf,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--state-dir").arg(&self.state_dir).arg("--socket").arg(&self.socket).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs `banger ARGS`, failing with its stderr when it fails; returns stdout.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
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
}

/// Runs the benchmark and prints the report.
pub async fn run(client: &Client, args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    client.ensure_daemon().await?;
    let cli = Cli {
        exe: std::env::current_exe().context("cannot find this executable")?,
        state_dir: client.layout().state_dir.clone(),
        socket: client.layout().socket.clone(),
    };
    let image = args.image.clone();
    let (runs, concurrent) = (args.runs, args.concurrent);
    let report = tokio::task::spawn_blocking(move || measure(&cli, &image, runs, concurrent))
        .await
        .context("the benchmark task failed")??;
    if args.json {
        crate::output::json(&report)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    println!("{:<34} {:>10}  samples (ms)", "case", "median ms");
    for c in &report.cases {
        let samples: Vec<String> = c.samples_ms.iter().map(|s| format!("{s:.0}")).collect();
        println!("{:<34} {:>10.1}  {}", c.what, c.median_ms, samples.join(" "));
    }
    for (name, ratio) in &report.ratios {
        println!("{name}: {ratio:.3}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn measure(cli: &Cli, image: &str, runs: u32, concurrent: u32) -> anyhow::Result<Report> {
    eprintln!("bench: warming up (artifacts, initramfs, guest network)");
    cli.run(&["vm", "run", "--rm", "--image", image, "--", "true"])?;

    let mut cold = Vec::new();
    for i in 1..=runs {
        let started = Instant::now();
        cli.run(&["vm", "run", "--rm", "--image", image, "--", "true"])?;
        cold.push(ms(started.elapsed()));
        eprintln!("bench: cold run {i}/{runs}: {:.0} ms", cold[cold.len() - 1]);
    }

    let (snapshot, cold_ready, snapshot_ready) = snapshot_runs(cli, image, runs)?;

    let bare = bare_boots(cli, image, runs)?;

    let one = creates(cli, image, 1)?;
    let many = creates(cli, image, concurrent)?;

    let cold_case = Case::of("cold", "vm run --rm -- true (cold)", cold);
    let snapshot_case = Case::of("snapshot", "vm run --rm -- true (from snapshot)", snapshot);
    let cold_ready_case = Case::of("cold_ready", "vm start to ready (cold boot)", cold_ready);
    let snapshot_ready_case = Case::of("snapshot_ready", "vm start to ready (from snapshot)", snapshot_ready);
    let bare_case = Case::of("bare", "bare VMM boot, true, power off", bare);
    let one_case = Case::of("create_one", "vm create x1", vec![one]);
    let many_case = Case::of("create_concurrent", format!("vm create x{concurrent} at once"), vec![many]);
    let ratios = vec![
        (
            "snapshot / cold, start to ready".to_owned(),
            snapshot_ready_case.median_ms / cold_ready_case.median_ms.max(0.1),
        ),
        ("snapshot / cold, whole vm run".to_owned(), snapshot_case.median_ms / cold_case.median_ms.max(0.1)),
        ("cold / bare".to_owned(), cold_case.median_ms / bare_case.median_ms.max(0.1)),
        (format!("{concurrent} concurrent creates / one"), many / one.max(0.1)),
    ];
    Ok(Report {
        image: image.to_owned(),
        cases: vec![cold_case, snapshot_case, cold_ready_case, snapshot_ready_case, bare_case, one_case, many_case],
        ratios,
    })
}

/// Samples in ms: `vm run --rm --from-snapshot S -- true`, then `vm start` of a recorded cold
/// VM and of a recorded fork (each `runs` times). S is a snapshot of a freshly booted VM of
/// `image`, made first (untimed) and deleted with its source at the end.
type SnapshotSamples = (Vec<f64>, Vec<f64>, Vec<f64>);

fn snapshot_runs(cli: &Cli, image: &str, runs: u32) -> anyhow::Result<SnapshotSamples> {
    let source = format!("bench-snap-{}", std::process::id());
    let snapshot = format!("{source}-s");
    let scratch = format!("{source}-x");
    cli.run(&["vm", "create", &source, "--image", image])?;
    let result = (|| {
        cli.run(&["vm", "start", &source])?;
        cli.run(&["vm", "snapshot", &source, "--name", &snapshot])?;
        cli.run(&["vm", "stop", &source])?;
        let mut runs_ms = Vec::new();
        for i in 1..=runs {
            let started = Instant::now();
            cli.run(&["vm", "run", "--rm", "--from-snapshot", &snapshot, "--", "true"])?;
            runs_ms.push(ms(started.elapsed()));
            eprintln!("bench: snapshot run {i}/{runs}: {:.0} ms", runs_ms[runs_ms.len() - 1]);
        }
        let (mut cold, mut fork) = (Vec::new(), Vec::new());
        for i in 1..=runs {
            for (from, samples) in [(None, &mut cold), (Some(snapshot.as_str()), &mut fork)] {
                let mut create = vec!["vm", "create", scratch.as_str()];
                match from {
                    Some(s) => create.extend(["--from-snapshot", s]),
                    None => create.extend(["--image", image]),
                }
                cli.run(&create)?;
                let started = Instant::now();
                let outcome = cli.run(&["vm", "start", &scratch]);
                samples.push(ms(started.elapsed()));
                let _ = cli.run(&["vm", "stop", "--force", &scratch]);
                cli.run(&["vm", "delete", &scratch])?;
                outcome?;
            }
            eprintln!(
                "bench: start to ready {i}/{runs}: cold {:.0} ms, from snapshot {:.0} ms",
                cold[i as usize - 1],
                fork[i as usize - 1]
            );
        }
        Ok((runs_ms, cold, fork))
    })();
    let _ = cli.run(&["vm", "stop", "--force", &scratch]);
    let _ = cli.run(&["vm", "delete", &scratch]);
    let _ = cli.run(&["snapshot", "delete", &snapshot]);
    let _ = cli.run(&["vm", "stop", "--force", &source]);
    let _ = cli.run(&["vm", "delete", &source]);
    result
}

/// The wall time of `n` `vm create`s started at once (records and directories only), in ms.
fn creates(cli: &Cli, image: &str, n: u32) -> anyhow::Result<f64> {
    let names: Vec<String> = (0..n).map(|i| format!("bench-create-{}-{i}", std::process::id())).collect();
    let started = Instant::now();
    let children: Vec<_> = names
        .iter()
        .map(|name| cli.command(&["vm", "create", name, "--image", image]).stdout(Stdio::null()).spawn())
        .collect::<Result<_, _>>()
        .context("cannot start the creates")?;
    let mut failed = None;
    for child in children {
        let out = child.wait_with_output().context("cannot wait for a create")?;
        if !out.status.success() {
            failed = Some(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
    }
    let elapsed = ms(started.elapsed());
    for name in &names {
        let _ = cli.run(&["vm", "delete", name]);
    }
    if let Some(why) = failed {
        bail!("a concurrent create failed: {why}");
    }
    eprintln!("bench: {n} create(s) at once: {elapsed:.0} ms");
    Ok(elapsed)
}

/// Boots the VMM `runs` times without banger: the command line of a VM banger started, with
/// its files copied to a scratch dir and the guest told to run `/bin/true` and power off.
fn bare_boots(cli: &Cli, image: &str, runs: u32) -> anyhow::Result<Vec<f64>> {
    let probe = format!("bench-probe-{}", std::process::id());
    cli.run(&["vm", "create", &probe, "--image", image])?;
    let result = (|| {
        cli.run(&["vm", "start", &probe])?;
        let shown = cli.json(&["vm", "show", &probe, "--json"])?;
        let vm_dir = PathBuf::from(shown["vm_dir"].as_str().context("vm show printed no vm_dir")?);
        let handles: serde_json::Value = serde_json::from_slice(
            &std::fs::read(vm_dir.join("handles.json")).context("cannot read the probe's handles.json")?,
        )?;
        let pid = handles["pid"].as_u64().context("the probe has no VMM pid")?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).context("cannot read the VMM's command line")?;
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        cli.run(&["vm", "stop", &probe])?;
        let scratch = tempfile::Builder::new().prefix("banger-bench-").tempdir()?;
        let templates = scratch.path().join("templates");
        std::fs::create_dir_all(&templates)?;
        for disk in ["overlay.ext4", "work.ext4"] {
            sparse_copy(&vm_dir.join(disk), &templates.join(disk))?;
        }
        let bare_dir = scratch.path().join("bare");
        let bare_argv = bare_command(&argv, &vm_dir, &bare_dir);
        let mut samples = Vec::new();
        for i in 1..=runs {
            let _ = std::fs::remove_dir_all(&bare_dir);
            std::fs::create_dir_all(&bare_dir)?;
            for disk in ["overlay.ext4", "work.ext4"] {
                sparse_copy(&templates.join(disk), &bare_dir.join(disk))?;
            }
            let (program, rest) = bare_argv.split_first().context("empty VMM command line")?;
            let started = Instant::now();
            let status = Command::new(program)
                .args(rest)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("cannot run the bare VMM")?;
            samples.push(ms(started.elapsed()));
            if !status.success() {
                bail!("the bare VMM run failed ({status})");
            }
            eprintln!("bench: bare run {i}/{runs}: {:.0} ms", samples[samples.len() - 1]);
        }
        Ok(samples)
    })();
    let _ = cli.run(&["vm", "stop", "--force", &probe]);
    let _ = cli.run(&["vm", "delete", &probe]);
    result
}

/// The VMM command line of a VM in `vm_dir`, moved to `bare_dir` and told to run `/bin/true`.
fn bare_command(argv: &[String], vm_dir: &Path, bare_dir: &Path) -> Vec<String> {
    let from = format!("{}/", vm_dir.display());
    let to = format!("{}/", bare_dir.display());
    let mut out = Vec::with_capacity(argv.len());
    let mut next_is_append = false;
    for arg in argv {
        let mut a = arg.replace(&from, &to);
        if next_is_append {
            a.push_str(" banger.run=/bin/true");
        }
        next_is_append = a == "-append";
        out.push(a);
    }
    out
}

fn sparse_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp").arg("--sparse=always").arg(from).arg(to).status().context("cannot run cp")?;
    if !status.success() {
        bail!("cannot copy {} to {}", from.display(), to.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn bare_command_moves_paths_and_runs_true() {
        let argv: Vec<String> = [
            "qemu",
            "-drive",
            "file=/s/vms/a/overlay.ext4,format=raw",
            "-append",
            "console=ttyS0 quiet",
            "-pidfile",
            "/s/vms/a/vmm.pid",
        ]
        .map(String::from)
        .to_vec();
        let out = bare_command(&argv, Path::new("/s/vms/a"), Path::new("/tmp/b"));
        assert_eq!(
            out,
            [
                "qemu",
                "-drive",
                "file=/tmp/b/overlay.ext4,format=raw",
                "-append",
                "console=ttyS0 quiet banger.run=/bin/true",
                "-pidfile",
                "/tmp/b/vmm.pid"
            ]
        );
    }
}
