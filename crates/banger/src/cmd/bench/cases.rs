//! The timed groups of `banger bench`, each run in alternation ([`stats::alternate`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _};

use super::{ms, stats, Cli, Group, Report};

/// Guest memory of the small and the large snapshot (the 512 MiB and 4 GiB).
const SMALL: &str = "512M";
const LARGE: &str = "4G";

/// The snapshots the groups share, made on first use (untimed) and deleted by the final sweep.
#[derive(Debug, Default)]
pub struct Snapshots {
    small: Option<String>,
    large: Option<String>,
}

impl Snapshots {
    /// A snapshot of a freshly booted `memory` guest of `image`; its source VM is deleted.
    fn make(cli: &Cli, image: &str, memory: &str) -> anyhow::Result<String> {
        let source = cli.name(&format!("src-{}", memory.to_lowercase()));
        let snapshot = cli.name(&format!("snap-{}", memory.to_lowercase()));
        eprintln!("bench: making snapshot {snapshot} of a {memory} guest");
        cli.run(&["vm", "create", &source, "--image", image, "--memory", memory])?;
        cli.run(&["vm", "start", &source])?;
        cli.run(&["vm", "snapshot", &source, "--name", &snapshot])?;
        cli.run(&["vm", "delete", "--force", &source])?;
        Ok(snapshot)
    }

    pub fn small(&mut self, cli: &Cli, image: &str) -> anyhow::Result<String> {
        if self.small.is_none() {
            self.small = Some(Self::make(cli, image, SMALL)?);
        }
        self.small.clone().context("no small snapshot")
    }

    fn large(&mut self, cli: &Cli, image: &str) -> anyhow::Result<String> {
        if self.large.is_none() {
            self.large = Some(Self::make(cli, image, LARGE)?);
        }
        self.large.clone().context("no large snapshot")
    }
}

/// Times `banger ARGS`, in ms.
fn timed(cli: &Cli, args: &[&str]) -> anyhow::Result<f64> {
    let started = Instant::now();
    cli.run(args)?;
    Ok(ms(started.elapsed()))
}

/// What every group is given.
pub struct Ctx<'a> {
    pub cli: &'a Cli,
    pub image: &'a str,
    pub rounds: u32,
}

/// Runs `group`'s cases in alternation for `ctx.rounds` rounds (`step(case)` measures one, in
/// ms), shows each figure on stderr and adds them to `report`.
fn run_group(
    ctx: &Ctx,
    report: &mut Report,
    label: &str,
    group: Group,
    mut step: impl FnMut(usize) -> anyhow::Result<f64>,
) -> anyhow::Result<()> {
    let rounds = ctx.rounds;
    let figures = stats::alternate(rounds, group.cases.len(), |case, round| {
        let figure = step(case)?;
        eprintln!("bench: {label} {}/{rounds}: {} {figure:.0} ms", round + 1, group.cases[case].0);
        Ok::<_, anyhow::Error>(figure)
    })?;
    report.add(group, figures);
    Ok(())
}

/// Cold `vm run --rm -- true`, the same from a 512 MiB snapshot, and the bare VMM.
pub fn boot(ctx: &Ctx, snapshots: &mut Snapshots, report: &mut Report) -> anyhow::Result<()> {
    let (cli, image) = (ctx.cli, ctx.image);
    let snapshot = snapshots.small(cli, image)?;
    let bare = BareVmm::prepare(cli, image)?;
    let run = cli.name("run");
    let group = Group {
        cases: vec![
            ("cold_run", "vm run --rm -- true (cold boot)".into()),
            ("snapshot_run", "vm run --rm --from-snapshot S -- true".into()),
            ("bare", "bare VMM: boot, true, power off".into()),
        ],
        ratios: vec![(1, 0, "snapshot run / cold run".into()), (0, 2, "cold run / bare VMM".into())],
    };
    run_group(ctx, report, "boot", group, |case| match case {
        0 => timed(cli, &["vm", "run", "--rm", "--name", &run, "--image", image, "--", "true"]),
        1 => timed(cli, &["vm", "run", "--rm", "--name", &run, "--from-snapshot", &snapshot, "--", "true"]),
        _ => bare.boot(),
    })
}

/// `vm start` to ready of a recorded VM: cold, a fork of the 512 MiB snapshot, of the 4 GiB one.
pub fn ready(ctx: &Ctx, snapshots: &mut Snapshots, report: &mut Report) -> anyhow::Result<()> {
    let (cli, image) = (ctx.cli, ctx.image);
    let small = snapshots.small(cli, image)?;
    let large = snapshots.large(cli, image)?;
    let scratch = cli.name("ready");
    let group = Group {
        cases: vec![
            ("cold_ready", format!("vm start to ready, cold boot ({SMALL})")),
            ("fork_ready_512m", "vm start to ready, fork of a 512 MiB guest".into()),
            ("fork_ready_4g", "vm start to ready, fork of a 4 GiB guest".into()),
        ],
        ratios: vec![
            (2, 1, "fork 4 GiB / fork 512 MiB, to ready".into()),
            (1, 0, "fork 512 MiB / cold boot, to ready".into()),
            (2, 0, "fork 4 GiB / cold boot, to ready".into()),
        ],
    };
    run_group(ctx, report, "ready", group, |case| {
        let mut create = vec!["vm", "create", scratch.as_str()];
        match case {
            0 => create.extend(["--image", image, "--memory", SMALL]),
            1 => create.extend(["--from-snapshot", small.as_str()]),
            _ => create.extend(["--from-snapshot", large.as_str()]),
        }
        cli.run(&create)?;
        let figure = timed(cli, &["vm", "start", &scratch]);
        let deleted = cli.run_anyway(&["vm", "delete", "--force", &scratch]);
        let figure = figure?;
        deleted.map(|_| figure)
    })
}

/// Runs `banger ARGS` once for each of `names` at once; the wall time until all ended, in ms.
fn at_once(cli: &Cli, names: &[String], args: impl Fn(&str) -> Vec<String>) -> anyhow::Result<f64> {
    Cli::check_interrupted()?;
    let started = Instant::now();
    let mut children = Vec::with_capacity(names.len());
    for name in names {
        let argv = args(name);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        match cli.command(&argv).stdout(Stdio::null()).stderr(Stdio::piped()).spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                // Wait for the ones started, so none outlives the benchmark.
                for child in children {
                    let _ = child.wait_with_output();
                }
                return Err(e).context("cannot start banger");
            }
        }
    }
    let mut failed = None;
    for child in children {
        let out = child.wait_with_output().context("cannot wait for banger")?;
        if !out.status.success() {
            failed = Some(format!("{} ({})", String::from_utf8_lossy(&out.stderr).trim(), out.status));
        }
    }
    let elapsed = ms(started.elapsed());
    // Ctrl-C reached the children too: say so rather than quote them.
    Cli::check_interrupted()?;
    if let Some(why) = failed {
        bail!("one of {} at once failed: {why}", names.len());
    }
    Ok(elapsed)
}

/// One cold `vm run --rm -- true` against `n` at once.
pub fn concurrent(ctx: &Ctx, n: u32, report: &mut Report) -> anyhow::Result<()> {
    let (cli, image) = (ctx.cli, ctx.image);
    let one = [cli.name("one")];
    let many: Vec<String> = (0..n).map(|i| cli.name(&format!("many-{i}"))).collect();
    let group = Group {
        cases: vec![
            ("one_cold_run", "vm run --rm -- true, one alone".into()),
            ("concurrent_cold_runs", format!("vm run --rm -- true, {n} at once (all done)")),
        ],
        ratios: vec![(1, 0, format!("{n} concurrent cold runs / one"))],
    };
    let run = |name: &str| -> Vec<String> {
        ["vm", "run", "--rm", "--name", name, "--image", image, "--", "true"].map(str::to_owned).to_vec()
    };
    run_group(ctx, report, "concurrent", group, |case| at_once(cli, if case == 0 { &one } else { &many }, run))
}

/// One `vm create` against `n` at once (deleted after each round, untimed).
pub fn creates(ctx: &Ctx, n: u32, report: &mut Report) -> anyhow::Result<()> {
    let (cli, image) = (ctx.cli, ctx.image);
    let one = [cli.name("create-one")];
    let many: Vec<String> = (0..n).map(|i| cli.name(&format!("create-{i}"))).collect();
    let group = Group {
        cases: vec![("create_one", "vm create, one alone".into()), ("create_many", format!("vm create, {n} at once"))],
        ratios: vec![(1, 0, format!("{n} concurrent creates / one"))],
    };
    let create = |name: &str| -> Vec<String> { ["vm", "create", name, "--image", image].map(str::to_owned).to_vec() };
    run_group(ctx, report, "creates", group, |case| {
        let names: &[String] = if case == 0 { &one } else { &many };
        let figure = at_once(cli, names, create);
        let mut delete = vec!["vm", "delete"];
        delete.extend(names.iter().map(String::as_str));
        let deleted = cli.run_anyway(&delete);
        let figure = figure?;
        deleted.map(|_| figure)
    })
}

/// gVisor's `runsc --network=none do true` against `vm run --rm --from-snapshot S -- true`.
pub fn runsc(ctx: &Ctx, snapshots: &mut Snapshots, report: &mut Report) -> anyhow::Result<()> {
    let cli = ctx.cli;
    let snapshot = snapshots.small(cli, ctx.image)?;
    let run = cli.name("vs-runsc");
    let group = Group {
        cases: vec![
            ("runsc", "runsc --network=none do true (gVisor)".into()),
            ("snapshot_run_vs_runsc", "vm run --rm --from-snapshot S -- true".into()),
        ],
        ratios: vec![(1, 0, "snapshot run / runsc do".into())],
    };
    run_group(ctx, report, "runsc", group, |case| {
        if case == 1 {
            return timed(cli, &["vm", "run", "--rm", "--name", &run, "--from-snapshot", &snapshot, "--", "true"]);
        }
        Cli::check_interrupted()?;
        let started = Instant::now();
        // No network: the sandbox gets loopback only, nothing leaves the host.
        let status = Command::new("runsc")
            .args(["--network=none", "do", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run runsc")?;
        if !status.success() {
            bail!("`runsc --network=none do true` failed ({status}); does `runsc do` work as this user?");
        }
        Ok(ms(started.elapsed()))
    })
}

/// The VMM alone: the command line of a VM banger started, its disks copied to a scratch dir
/// for each boot and the guest told to run `/bin/true` and power off.
pub struct BareVmm {
    argv: Vec<String>,
    /// The VM dir's drive files (disks and spare slots), by name.
    disks: Vec<String>,
    templates: PathBuf,
    bare_dir: PathBuf,
    /// Where the bare guest's memory file goes (tmpfs, as banger's), removed after each boot.
    memory_file: PathBuf,
    _scratch: tempfile::TempDir,
    _shm: tempfile::TempDir,
}

impl BareVmm {
    /// Starts a probe VM for its VMM command line and disks, then deletes it.
    fn prepare(cli: &Cli, image: &str) -> anyhow::Result<Self> {
        let probe = cli.name("probe");
        cli.run(&["vm", "create", &probe, "--image", image])?;
        let result = Self::capture(cli, &probe);
        cli.run_anyway(&["vm", "delete", "--force", &probe])?;
        result
    }

    fn capture(cli: &Cli, probe: &str) -> anyhow::Result<Self> {
        cli.run(&["vm", "start", probe])?;
        let shown = cli.json(&["vm", "show", probe, "--json"])?;
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
        cli.run(&["vm", "stop", probe])?;
        let scratch = tempfile::Builder::new().prefix("banger-bench-").tempdir()?;
        let templates = scratch.path().join("templates");
        std::fs::create_dir_all(&templates)?;
        let disks = vm_drives(&argv, &vm_dir);
        for disk in &disks {
            sparse_copy(&vm_dir.join(disk), &templates.join(disk))?;
        }
        let bare_dir = scratch.path().join("bare");
        let shm = tempfile::Builder::new()
            .prefix("banger-bench-")
            .tempdir_in("/dev/shm")
            .context("cannot make a scratch dir in /dev/shm")?;
        let memory_file = shm.path().join("bare.mem");
        let argv = bare_command(&argv, &vm_dir, &bare_dir, &memory_file);
        Ok(Self { argv, disks, templates, bare_dir, memory_file, _scratch: scratch, _shm: shm })
    }

    /// One bare boot, in ms (the disks' copy untimed).
    fn boot(&self) -> anyhow::Result<f64> {
        Cli::check_interrupted()?;
        let _ = std::fs::remove_dir_all(&self.bare_dir);
        std::fs::create_dir_all(&self.bare_dir)?;
        for disk in &self.disks {
            sparse_copy(&self.templates.join(disk), &self.bare_dir.join(disk))?;
        }
        let (program, rest) = self.argv.split_first().context("empty VMM command line")?;
        let started = Instant::now();
        let status = Command::new(program)
            .args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run the bare VMM");
        let figure = ms(started.elapsed());
        let _ = std::fs::remove_file(&self.memory_file);
        let status = status?;
        if !status.success() {
            bail!("the bare VMM run failed ({status})");
        }
        Ok(figure)
    }
}

/// The names of the drive files (`-drive ...,file=PATH,...`) a VMM command line has in `vm_dir`:
/// its writable disks and spare slots (the base image lives elsewhere and is only read).
fn vm_drives(argv: &[String], vm_dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", vm_dir.display());
    argv.iter()
        .filter_map(|arg| arg.split(',').find_map(|part| part.strip_prefix("file=")))
        .filter_map(|path| path.strip_prefix(&prefix))
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .map(str::to_owned)
        .collect()
}

/// The VMM command line of a VM in `vm_dir`, moved to `bare_dir` (its memory file, when it has
/// one, to `memory_file`) and told to run `/bin/true`.
fn bare_command(argv: &[String], vm_dir: &Path, bare_dir: &Path, memory_file: &Path) -> Vec<String> {
    let from = format!("{}/", vm_dir.display());
    let to = format!("{}/", bare_dir.display());
    let mut out = Vec::with_capacity(argv.len());
    let mut next_is_append = false;
    for arg in argv {
        let mut a = arg.replace(&from, &to);
        if let Some((head, tail)) = a.split_once("mem-path=") {
            let rest = tail.find(',').map_or("", |i| &tail[i..]);
            a = format!("{head}mem-path={}{rest}", memory_file.display());
        }
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
    fn the_drives_in_the_vm_dir_are_found() {
        let argv: Vec<String> = [
            "qemu",
            "-drive",
            "id=d0,file=/s/images/base.ext4,format=raw,readonly=on",
            "-drive",
            "id=d1,file=/s/vms/a/overlay.ext4,format=raw",
            "-drive",
            "id=s0,file=/s/vms/a/slot0.img,format=raw",
            "-pidfile",
            "/s/vms/a/vmm.pid",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(vm_drives(&argv, Path::new("/s/vms/a")), ["overlay.ext4", "slot0.img"]);
    }

    #[test]
    fn bare_command_moves_paths_and_runs_true() {
        let argv: Vec<String> = [
            "qemu",
            "-drive",
            "file=/s/vms/a/overlay.ext4,format=raw",
            "-append",
            "console=ttyS0 quiet",
            "-object",
            "memory-backend-file,id=ram,size=512M,mem-path=/dev/shm/banger-mem-0/x.mem,share=on",
            "-pidfile",
            "/s/vms/a/vmm.pid",
        ]
        .map(String::from)
        .to_vec();
        let out = bare_command(&argv, Path::new("/s/vms/a"), Path::new("/tmp/b"), Path::new("/dev/shm/t/bare.mem"));
        assert_eq!(
            out,
            [
                "qemu",
                "-drive",
                "file=/tmp/b/overlay.ext4,format=raw",
                "-append",
                "console=ttyS0 quiet banger.run=/bin/true",
                "-object",
                "memory-backend-file,id=ram,size=512M,mem-path=/dev/shm/t/bare.mem,share=on",
                "-pidfile",
                "/tmp/b/vmm.pid"
            ]
        );
    }
}
