//! Guest-written data on the host (issue 14, "disks and logs"): a guest that makes its
//! `authorized_keys` and `.gitconfig` 20 GiB sparse files, one that floods its console, and a
//! promote of a deliberately corrupted overlay disk. Each runs against a real daemon and a real
//! QEMU guest; the bounds checked are the ones `docs/security.md` promises.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{wait_until, Env, Run};
use crate::template::{env_from, template};

/// The console log's cap (`banger_vmm::logfile::CONSOLE_LOG_CAP`).
const CONSOLE_CAP: u64 = 2 << 20;
/// Longest line `vm logs` returns, plus the cut mark.
const MAX_LINE: usize = 4096 + " [line cut]".len();

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number")
}

/// Bytes in use on the file system holding `path` (statvfs).
fn used_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).expect("statvfs");
    (stat.blocks() - stat.blocks_free()) * stat.fragment_size()
}

/// The CLI with a `$HOME` whose git identity the start merges into the guest's `.gitconfig`.
fn with_git_identity(env: &Env, args: &[&str]) -> Run {
    let home = env.dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::write(home.join(".gitconfig"), "[user]\n\tname = Host Tester\n").expect("gitconfig");
    let mut cmd = env.cmd(args);
    cmd.env("HOME", &home).env("GIT_CONFIG_GLOBAL", home.join(".gitconfig")).env("GIT_CONFIG_NOSYSTEM", "1");
    Run::from(cmd.output().expect("run banger"))
}

fn exec(env: &Env, vm: &str, script: &str) -> String {
    env.banger(&["vm", "exec", vm, "-n", "--", "sh", "-c", script]).ok().stdout
}

#[test]
fn sparse_20_gib_guest_files_are_not_read_and_the_next_start_succeeds() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "big", "--image", "minimal", "--disk", "1G"]).ok();
    with_git_identity(&env, &["vm", "start", "big"]).ok();
    exec(&env, "big", "truncate -s 20G /root/.ssh/authorized_keys /root/.gitconfig && sync");
    let sizes = exec(&env, "big", "stat -c %s /root/.ssh/authorized_keys /root/.gitconfig");
    assert_eq!(sizes, "21474836480\n21474836480\n");
    env.banger(&["vm", "stop", "big"]).ok();
    // The next start also grows the used (guest-written) disk: `e2fsck -fn`, then `resize2fs -f`.
    env.banger(&["vm", "set", "big", "--disk", "2G"]).ok();

    let pid = env.daemon_pid().expect("daemon pid");
    let (rss_before, used_before) = (rss_kib(pid), used_bytes(&env.state));
    let started = Instant::now();
    let start = with_git_identity(&env, &["vm", "start", "big"]).ok();
    let took = started.elapsed();
    let (rss_after, used_after) = (rss_kib(pid), used_bytes(&env.state));
    eprintln!(
        "start with 20 GiB guest files: {:.1}s, daemon rss {rss_before} -> {rss_after} KiB, fs used {:+} MiB",
        took.as_secs_f64(),
        (i128::from(used_after) - i128::from(used_before)) / (1 << 20)
    );
    assert!(
        start.stderr.contains("authorized_keys is 21474836480 bytes, over the 256 KiB cap"),
        "no warning for authorized_keys: {}",
        start.stderr
    );
    assert!(start.stderr.contains(".gitconfig is 21474836480 bytes"), "no warning for .gitconfig: {}", start.stderr);
    assert!(rss_after < rss_before + 32 * 1024, "the daemon grew from {rss_before} to {rss_after} KiB");
    // The disk is shared with other work, so the bound is loose; a 20 GiB dump is far beyond it.
    assert!(
        used_after < used_before + (1 << 30),
        "the host file system grew by {} MiB",
        (used_after - used_before) >> 20
    );

    // banger's key is in place (the oversized file replaced); the guest's .gitconfig is as it was.
    let installation = std::fs::read_to_string(env.state.join("ssh/id_ed25519.pub")).expect("installation key");
    let keys = exec(&env, "big", "cat /root/.ssh/authorized_keys");
    assert_eq!(keys.trim(), installation.trim());
    assert_eq!(exec(&env, "big", "stat -c %s /root/.gitconfig"), "21474836480\n");
    let df = exec(&env, "big", "df -m /root | tail -1");
    let total: u64 = df.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!((1900..=2048).contains(&total), "the checked disk was grown to 2G: {df}");
    let leftovers: Vec<PathBuf> = std::fs::read_dir(env.state.join("vms"))
        .expect("vms")
        .flat_map(|d| std::fs::read_dir(d.expect("entry").path()).expect("vm dir"))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".read-")))
        .collect();
    assert!(leftovers.is_empty(), "scratch dirs left: {leftovers:?}");
    env.banger(&["vm", "stop", "big"]).ok();
    env.banger(&["vm", "delete", "big"]).ok();
}

#[test]
fn a_console_flood_stays_under_the_cap_and_logs_come_back_capped() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "loud", "--image", "minimal"]).ok();
    env.banger(&["vm", "start", "loud"]).ok();
    let vm = env.banger(&["vm", "show", "loud", "--json"]).ok().json();
    let console = PathBuf::from(vm["vm_dir"].as_str().expect("vm_dir")).join("console.log");
    let rotated = console.with_extension("log.1");

    // Three caps' worth, on /dev/console (ttyS0 here): short lines, then one line with no end.
    let flood = CONSOLE_CAP * 3;
    let script = format!(
        "{{ yes 'console flood line' | head -c {half}; head -c {half} /dev/zero | tr '\\0' x; echo; }} > /dev/console; \
         echo flood-done > /dev/console",
        half = flood / 2
    );
    let mut child = env.cmd(&["vm", "exec", "loud", "-n", "--", "sh", "-c", &script]).spawn().expect("flood");
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let started = Instant::now();
    let (mut largest, mut largest_old) = (0u64, 0u64);
    wait_until("the flood to end", Duration::from_secs(600), || {
        largest = largest.max(size(&console));
        largest_old = largest_old.max(size(&rotated));
        child.try_wait().expect("wait").is_some()
    });
    assert!(child.wait().expect("wait").success(), "the flood command failed");
    // In the log, or in its `.1` when a rotation came right after it.
    wait_until("the flood's last line in the log", Duration::from_secs(60), || {
        [&console, &rotated].iter().any(|p| std::fs::read(p).is_ok_and(|b| b.windows(10).any(|w| w == b"flood-done")))
    });
    let elapsed = started.elapsed();
    eprintln!(
        "console flood: {} MiB in {:.1}s; largest console.log {} KiB, largest .1 {} KiB (cap {} KiB)",
        flood >> 20,
        elapsed.as_secs_f64(),
        largest >> 10,
        largest_old >> 10,
        CONSOLE_CAP >> 10
    );
    assert!(size(&rotated) > 0, "the log was never rotated");
    assert!(largest_old <= CONSOLE_CAP, "console.log.1 is {largest_old} bytes");
    // The monitor checks every 200 ms; what the guest writes in between is the only overshoot.
    assert!(largest <= CONSOLE_CAP + (1 << 20), "console.log reached {largest} bytes");

    let asked = Instant::now();
    let logs = env.banger(&["vm", "logs", "loud"]).ok();
    eprintln!("vm logs: {} bytes in {} ms", logs.stdout.len(), asked.elapsed().as_millis());
    assert!(logs.stdout.len() as u64 <= CONSOLE_CAP + 4096, "vm logs returned {} bytes", logs.stdout.len());
    assert!(logs.stdout.lines().all(|l| l.len() <= MAX_LINE), "a line over the cap");
    assert!(logs.stdout.contains("flood-done"), "the newest line is missing");
    let tail = env.banger(&["vm", "logs", "loud", "--tail", "5"]).ok();
    assert!(tail.stdout.lines().count() <= 5 && tail.stdout.lines().all(|l| l.len() <= MAX_LINE));
    env.banger(&["vm", "stop", "loud"]).ok();
    env.banger(&["vm", "delete", "loud"]).ok();
}

#[test]
fn a_promote_of_a_corrupted_overlay_disk_is_refused_and_nothing_is_mounted() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "bent", "--image", "minimal"]).ok();
    env.banger(&["vm", "start", "bent"]).ok();
    exec(&env, "bent", "mkdir -p /etc/bent && echo x > /etc/bent/file && sync");
    env.banger(&["vm", "stop", "bent"]).ok();
    let vm = env.banger(&["vm", "show", "bent", "--json"]).ok().json();
    let overlay = PathBuf::from(vm["vm_dir"].as_str().expect("vm_dir")).join("overlay.ext4");
    assert!(overlay.is_file(), "no overlay disk at {}", overlay.display());
    // Clear the inode of a directory the guest made: its entry now names a free inode.
    let out =
        Command::new("debugfs").args(["-w", "-R", "clri /upper/etc/bent"]).arg(&overlay).output().expect("debugfs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let refused = env.banger(&["image", "promote", "bent", "--name", "bent-image"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("is not a clean ext4 file system"), "{}", refused.stderr);
    assert!(refused.stderr.contains("nothing was mounted"), "{}", refused.stderr);
    // The daemon runs in the mount namespace `ip netns exec` made for it: look at its mounts.
    let pid = env.daemon_pid().expect("daemon pid");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let state = env.state.display().to_string();
    assert!(!mounts.contains(&state), "a mount under the state dir is left: {mounts}");
    let loops = Command::new("losetup").arg("-a").output().expect("losetup");
    assert!(!String::from_utf8_lossy(&loops.stdout).contains(&state), "a loop device is left");
    let images = env.banger(&["image", "list", "--json"]).ok().json();
    assert!(images["images"].as_array().expect("images").iter().all(|i| i["name"] != "bent-image"));
    env.banger(&["vm", "delete", "bent"]).ok();
}
