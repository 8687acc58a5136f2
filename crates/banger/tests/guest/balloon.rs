//! Memory returned to the host (QEMU's balloon with free page reporting): a guest that fills
//! and frees memory gives it back to the host and can fill it again; a fork of a snapshot
//! cannot punch its freed pages out of the snapshot's memory, which its siblings read.

use std::time::Duration;

use crate::harness::{wait_until, Env};
use crate::template::{env_from, template};

/// `sh -c SCRIPT` in `vm`, its stdout trimmed.
fn sh(env: &Env, vm: &str, script: &str) -> String {
    env.banger(&["vm", "exec", vm, "-n", "--", "sh", "-c", script]).ok().stdout.trim().to_owned()
}

fn stats(env: &Env, vm: &str) -> serde_json::Value {
    env.banger(&["vm", "stats", vm, "--json"]).ok().json()
}

/// What the VM's guest memory costs the host now, in MiB.
fn held_mib(env: &Env, vm: &str) -> u64 {
    stats(env, vm)["memory_file_kib"].as_u64().unwrap_or_else(|| panic!("{vm}: no memory file figure")) / 1024
}

/// 300 MiB of a known pattern into a tmpfs in the guest, checked (`/dev/shm` holds only half
/// of the guest's memory).
const FILL: &str = "mkdir -p /run/fill && (mountpoint -q /run/fill || mount -t tmpfs -o size=400M fill /run/fill) && \
                    yes banger-balloon | head -c 300M > /run/fill/f && \
                    yes banger-balloon | head -c 300M | cmp - /run/fill/f && echo same";

#[test]
fn a_guest_gives_freed_memory_back_and_can_use_it_again() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "squeezer", "--image", "debian-bookworm", "--memory", "512M"]).ok();
    env.banger(&["vm", "start", "squeezer"]).ok();
    assert_eq!(
        sh(&env, "squeezer", "ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio"),
        "1",
        "the guest's balloon driver took the device"
    );
    // Booting touched memory the guest has freed since: the balloon returns it too.
    wait_until("the boot's freed memory goes back", Duration::from_secs(120), || held_mib(&env, "squeezer") < 200);
    let idle = held_mib(&env, "squeezer");

    assert_eq!(sh(&env, "squeezer", FILL), "same");
    let full = held_mib(&env, "squeezer");
    assert!(full >= idle + 250, "the host holds the guest's 300 MiB: idle {idle} MiB, full {full} MiB");

    sh(&env, "squeezer", "rm /run/fill/f");
    // Free page reporting runs about 2 s after pages are freed, in 2 MiB blocks.
    wait_until("the freed 300 MiB go back to the host", Duration::from_secs(120), || {
        held_mib(&env, "squeezer") <= idle + 64
    });
    let returned = stats(&env, "squeezer");
    let after = held_mib(&env, "squeezer");
    let not_held = returned["memory_returned_kib"].as_u64().expect("memory_returned_kib") / 1024;
    assert!(not_held >= 512 - after - 1, "{returned}");

    // The guest gets the memory back when it asks: same pattern, same bytes.
    assert_eq!(sh(&env, "squeezer", FILL), "same");
    sh(&env, "squeezer", "rm /run/fill/f");
    println!("balloon: idle {idle} MiB, filled {full} MiB, after free {after} MiB (of 512 MiB)");
    env.banger(&["vm", "delete", "squeezer", "--force"]).ok();
}

#[test]
fn a_forks_freed_pages_never_reach_its_snapshots_memory() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "origin", "--image", "debian-bookworm", "--memory", "512M"]).ok();
    env.banger(&["vm", "start", "origin"]).ok();
    // Pages in use at the snapshot, which the fork will free.
    sh(&env, "origin", "yes banger-snapshot | head -c 100M > /dev/shm/keep && sync");
    let snap = env.banger(&["vm", "snapshot", "origin", "--name", "held", "--json"]).ok().json();
    let dir = std::path::PathBuf::from(snap["dir"].as_str().expect("dir"));
    let devices = std::fs::read_to_string(dir.join("state.devices")).expect("devices file");
    assert_eq!(devices.lines().collect::<Vec<_>>(), ["balloon", "slots 2"], "{devices}");
    let memory = dir.join("state.mem");
    let before = std::fs::read(&memory).expect("snapshot memory");

    env.banger(&["vm", "fork", "held", "--name", "fork-a"]).ok();
    let fork_dir =
        env.banger(&["vm", "show", "fork-a", "--json"]).ok().json()["vm_dir"].as_str().expect("vm_dir").to_owned();
    // The fork frees what the snapshot held, and more; its balloon reports it, and the kernel
    // refuses QEMU's punch into the sealed copy.
    sh(&env, "fork-a", "rm /dev/shm/keep; yes x | head -c 100M > /dev/shm/more; rm /dev/shm/more");
    let stderr = std::path::Path::new(&fork_dir).join("vmm.stderr");
    wait_until("the fork's balloon reported freed pages", Duration::from_secs(120), || {
        std::fs::read_to_string(&stderr).is_ok_and(|s| s.contains("ram_block_discard_range"))
    });
    assert!(std::fs::read(&memory).expect("snapshot memory") == before, "the snapshot's memory is unchanged");

    // A second fork still sees the snapshot's pages.
    env.banger(&["vm", "fork", "held", "--name", "fork-b"]).ok();
    assert_eq!(sh(&env, "fork-b", "head -c 19 /dev/shm/keep"), "banger-snapshot\nban");
    for vm in ["fork-a", "fork-b", "origin"] {
        env.banger(&["vm", "delete", vm, "--force"]).ok();
    }
    env.banger(&["snapshot", "delete", "held"]).ok();
}
