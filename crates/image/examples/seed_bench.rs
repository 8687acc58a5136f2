//! Per-VM work disk provisioning time against the seed's size.
//!
//! `cargo run --release -p banger-image --example seed_bench [RUNS]`: builds a 64 MiB and a
//! 4 GiB work seed (and a 2 GiB one, the no-resize floor) in `$BANGER_BENCH_DIR` (default: the
//! system temp directory), then times cloning each into a 2 GiB work disk, writing the VM's files
//! into it, and, for comparison, making the 2 GiB overlay disk the daemon makes per VM (a sparse
//! file and `mkfs.ext4` with lazy init). Prints median and p90 in ms to stdout.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_image::seed::{
    build_work_seed, clone_work_disk, write_files_into, CloneMethod, GuestFile, Resize, SystemSeedTools,
};

const DISK_MIB: u64 = 2048;

struct Figures {
    label: String,
    samples: Vec<Duration>,
}

impl Figures {
    fn new(label: impl Into<String>) -> Self {
        Self { label: label.into(), samples: Vec::new() }
    }

    /// Nearest-rank percentile (`percent` of 100) in ms.
    fn percentile(&self, percent: usize) -> f64 {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let rank = (percent * sorted.len()).div_ceil(100).max(1);
        sorted.get(rank - 1).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    }

    fn print(&self) {
        println!(
            "{:<44} median {:>7.2} ms   p90 {:>7.2} ms   (n={})",
            self.label,
            self.percentile(50),
            self.percentile(90),
            self.samples.len()
        );
    }
}

fn method_name(method: CloneMethod) -> &'static str {
    match method {
        CloneMethod::Reflink => "reflink",
        CloneMethod::SparseCopy => "sparse copy",
    }
}

/// Clones `seed` into `disk_mib` disks `runs` times (after one warm-up): the clone with its resize,
/// the resize alone, and writing authorized_keys and .gitconfig.
fn bench_seed(
    dir: &Path,
    seed: &Path,
    seed_mib: u64,
    disk_mib: u64,
    runs: usize,
) -> Result<[Figures; 3], Box<dyn Error>> {
    let mut clone = Figures::new(format!("clone+resize {seed_mib} MiB seed -> {} GiB", disk_mib >> 10));
    let mut resize = Figures::new(format!("  of which resize2fs ({seed_mib} MiB seed)"));
    let mut write = Figures::new(format!("  then write 2 files ({seed_mib} MiB seed)"));
    let key = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBench banger@host\n";
    let gitconfig = b"[user]\n\tname = Bench\n\temail = bench@example.com\n";
    let files = [
        GuestFile { path: "/.ssh/authorized_keys", contents: key, mode: 0o600 },
        GuestFile { path: "/.gitconfig", contents: gitconfig, mode: 0o644 },
    ];
    let mut seen = None;
    for run in 0..=runs {
        let disk = dir.join(format!("work-{seed_mib}-{run}.ext4"));
        let report = clone_work_disk(&SystemSeedTools, seed, &disk, disk_mib)?;
        let started = Instant::now();
        write_files_into(&SystemSeedTools, &disk, &files)?;
        let wrote = started.elapsed();
        fs::remove_file(&disk)?;
        if run == 0 {
            continue; // warm-up
        }
        seen = Some((report.method, report.resize, report.bytes_copied));
        clone.samples.push(report.elapsed);
        resize.samples.push(report.resize_elapsed);
        write.samples.push(wrote);
    }
    if let Some((method, how, bytes)) = seen {
        let how = match how {
            Resize::None => "no resize",
            Resize::Grow => "grow",
            Resize::Shrink => "shrink",
        };
        eprintln!("{seed_mib} MiB seed -> {disk_mib} MiB: {}, {how}, {} KiB copied", method_name(method), bytes / 1024);
    }
    Ok([clone, resize, write])
}

/// The overlay disk the daemon makes per VM: a sparse file and `mkfs.ext4` with lazy init.
fn bench_overlay(dir: &Path, runs: usize) -> Result<Figures, Box<dyn Error>> {
    let mut overlay = Figures::new("overlay: sparse file + mkfs.ext4 2 GiB");
    for run in 0..=runs {
        let disk = dir.join(format!("overlay-{run}.ext4"));
        let started = Instant::now();
        fs::File::create(&disk)?.set_len(DISK_MIB << 20)?;
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&disk)
            .status()?;
        let took = started.elapsed();
        if !status.success() {
            return Err(format!("mkfs.ext4 {} failed: {status}", disk.display()).into());
        }
        fs::remove_file(&disk)?;
        if run > 0 {
            overlay.samples.push(took);
        }
    }
    Ok(overlay)
}

fn build(dir: &Path, mib: u64) -> Result<PathBuf, Box<dyn Error>> {
    let seed = dir.join(format!("seed-{mib}.ext4"));
    let started = Instant::now();
    build_work_seed(&SystemSeedTools, Some(Path::new("/etc/skel")), &seed, mib)?;
    let used = fs::metadata(&seed).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)?;
    eprintln!("built {mib} MiB seed in {:.1?}, {} KiB allocated", started.elapsed(), used / 1024);
    Ok(seed)
}

fn main() -> Result<(), Box<dyn Error>> {
    let runs: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(10);
    let base = std::env::var_os("BANGER_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = tempfile::Builder::new().prefix("seed-bench-").tempdir_in(&base)?;
    eprintln!("work dir {} ({runs} runs each, 1 warm-up)", dir.path().display());

    let small = build(dir.path(), 64)?;
    let large = build(dir.path(), 4096)?;
    let equal = build(dir.path(), DISK_MIB)?;

    let [small_clone, small_resize, small_write] = bench_seed(dir.path(), &small, 64, DISK_MIB, runs)?;
    let [large_clone, large_resize, large_write] = bench_seed(dir.path(), &large, 4096, DISK_MIB, runs)?;
    let [equal_clone, _, _] = bench_seed(dir.path(), &equal, DISK_MIB, DISK_MIB, runs)?;
    // Both seeds grow to 8 GiB: the same operation, only the seed's size differs.
    let [small_grow, _, _] = bench_seed(dir.path(), &small, 64, 4 * DISK_MIB, runs)?;
    let [large_grow, _, _] = bench_seed(dir.path(), &large, 4096, 4 * DISK_MIB, runs)?;
    let overlay = bench_overlay(dir.path(), runs)?;

    let all = [
        &small_clone,
        &small_resize,
        &small_write,
        &large_clone,
        &large_resize,
        &large_write,
        &equal_clone,
        &small_grow,
        &large_grow,
        &overlay,
    ];
    for figures in all {
        figures.print();
    }
    let ratio = large_clone.percentile(50) / small_clone.percentile(50);
    println!("ratio of medians, 2 GiB disk, 4 GiB seed (shrink) / 64 MiB seed (grow): {ratio:.2}");
    let ratio = large_grow.percentile(50) / small_grow.percentile(50);
    println!("ratio of medians, 8 GiB disk, 4 GiB seed / 64 MiB seed (both grow): {ratio:.2}");
    Ok(())
}
