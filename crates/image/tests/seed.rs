//! Work seeds against the real e2fsprogs (`mkfs.ext4`, `debugfs`, `resize2fs`, `e2fsck`,
//! `dumpe2fs`) on temporary files. They need no root and take well under a second each, so they
//! run in every `cargo test`; without e2fsprogs they fail and say so.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use banger_image::seed::{
    build_seed_from_image, build_work_seed, clone_work_disk, clone_work_disk_with, read_files_from, write_file_into,
    write_files_into, CloneMethod, CopyPolicy, Dotfiles, GuestFile, GuestRead, Resize, SeedError, SeedTools as _,
    SystemSeedTools, SEED_LABEL,
};

const MIB: u64 = 1 << 20;

fn tool(program: &str, args: &[&str], image: &Path) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); run `apt-get install e2fsprogs`"));
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

fn debugfs(image: &Path, request: &str) -> String {
    let (ok, stdout) = tool("debugfs", &["-R", request], image);
    assert!(ok, "debugfs -R '{request}' failed");
    stdout
}

/// `ls -p DIR`: name → (mode, uid, gid, size).
fn ls(image: &Path, dir: &str) -> BTreeMap<String, (u32, u32, u32, String)> {
    debugfs(image, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('/').collect();
            (f.len() >= 7).then(|| {
                let mode = u32::from_str_radix(f[2], 8).expect("octal mode");
                (f[5].to_owned(), (mode, f[3].parse().expect("uid"), f[4].parse().expect("gid"), f[6].to_owned()))
            })
        })
        .collect()
}

fn assert_clean(image: &Path) {
    let (ok, stdout) = tool("e2fsck", &["-fn"], image);
    assert!(ok, "e2fsck -fn {} finds problems:\n{stdout}", image.display());
}

/// `dumpe2fs -h` field.
fn header(image: &Path, field: &str) -> String {
    let (ok, stdout) = tool("dumpe2fs", &["-h"], image);
    assert!(ok);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {field} in dumpe2fs -h"))
}

fn fs_bytes(image: &Path) -> u64 {
    let blocks: u64 = header(image, "Block count").parse().expect("block count");
    let size: u64 = header(image, "Block size").parse().expect("block size");
    blocks * size
}

#[test]
fn default_seed_holds_the_root_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.ext4");
    let info = build_work_seed(&SystemSeedTools, None, &seed, 64).expect("seed builds");
    assert_eq!(info.dotfiles, Dotfiles::Defaults);
    assert_clean(&seed);
    assert_eq!(header(&seed, "Filesystem volume name"), SEED_LABEL);
    assert_eq!(fs_bytes(&seed), 64 * MIB);

    let top = ls(&seed, "/");
    assert_eq!(top["."], (0o040700, 0, 0, String::new()), "/ must be root's and 0700");
    assert_eq!(top[".ssh"].0, 0o040700);
    assert_eq!(top[".bashrc"].0, 0o100644);
    assert_eq!(top[".profile"].0, 0o100644);
    assert_eq!(top[".gitconfig"], (0o100644, 0, 0, "0".to_owned()));
    assert!(top.values().all(|(_, uid, gid, _)| (*uid, *gid) == (0, 0)));
    assert_eq!(ls(&seed, "/.ssh")["authorized_keys"], (0o100600, 0, 0, "0".to_owned()));
    assert!(debugfs(&seed, "cat /.profile").contains(".bashrc"));
    eprintln!("seed / : {:?}", top.keys().collect::<Vec<_>>());
}

#[test]
fn seed_keeps_the_skeleton_links_as_links() {
    let dir = tempfile::tempdir().expect("tempdir");
    let skel = dir.path().join("skel");
    fs::create_dir_all(skel.join(".config/app")).expect("mkdir");
    fs::write(skel.join(".bashrc"), "# skel\n").expect("write");
    fs::write(skel.join(".config/app/rc"), "x=1\n").expect("write");
    symlink("/etc/hostname", skel.join(".link")).expect("symlink");
    let seed = dir.path().join("seed.ext4");
    let info = build_work_seed(&SystemSeedTools, Some(&skel), &seed, 32).expect("seed builds");
    assert_eq!(info.dotfiles, Dotfiles::Skel);
    assert_clean(&seed);
    assert_eq!(debugfs(&seed, "cat /.bashrc"), "# skel\n");
    assert_eq!(debugfs(&seed, "cat /.config/app/rc"), "x=1\n");
    let top = ls(&seed, "/");
    assert_eq!(top[".link"].0 & 0o170000, 0o120000, "the link must stay a link");
    assert_eq!(top[".config"].1, 0);
    assert_eq!(ls(&seed, "/.config/app")["rc"].1, 0);
}

fn rootfs_image(dir: &Path, skel_bashrc: Option<&str>) -> std::path::PathBuf {
    let tree = dir.join("rootfs");
    fs::create_dir_all(tree.join("etc")).expect("mkdir");
    if let Some(bashrc) = skel_bashrc {
        fs::create_dir(tree.join("etc/skel")).expect("mkdir");
        fs::write(tree.join("etc/skel/.bashrc"), bashrc).expect("write");
        fs::write(tree.join("etc/skel/.bash_logout"), "clear\n").expect("write");
    }
    let image = dir.join("rootfs.ext4");
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("32M")
        .output()
        .expect("mkfs.ext4 runs");
    assert!(output.status.success());
    image
}

#[test]
fn seed_from_an_existing_image_takes_its_skel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = rootfs_image(dir.path(), Some("# debian skel\n"));
    let seed = dir.path().join("seed.ext4");
    let info = build_seed_from_image(&SystemSeedTools, &rootfs, &seed, 64).expect("seed builds");
    assert_eq!(info.dotfiles, Dotfiles::Skel);
    assert_clean(&seed);
    assert_eq!(debugfs(&seed, "cat /.bashrc"), "# debian skel\n");
    assert_eq!(debugfs(&seed, "cat /.bash_logout"), "clear\n");
    assert!(ls(&seed, "/").values().all(|(_, uid, gid, _)| (*uid, *gid) == (0, 0)));
}

#[test]
fn seed_from_an_image_without_skel_uses_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = rootfs_image(dir.path(), None);
    let seed = dir.path().join("seed.ext4");
    let info = build_seed_from_image(&SystemSeedTools, &rootfs, &seed, 64).expect("seed builds");
    assert_eq!(info.dotfiles, Dotfiles::Defaults);
    assert!(debugfs(&seed, "cat /.bashrc").contains("HISTCONTROL"));
}

#[test]
fn clone_and_grow_gives_a_clean_disk_of_the_new_size_with_the_seed_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.ext4");
    build_work_seed(&SystemSeedTools, None, &seed, 64).expect("seed builds");
    let disk = dir.path().join("work.ext4");
    let report = clone_work_disk(&SystemSeedTools, &seed, &disk, 1024).expect("clone");
    eprintln!("clone on this host's temp dir: {report:?}");
    assert_eq!(report.resize, Resize::Grow);
    assert_eq!(fs::metadata(&disk).expect("disk").len(), 1024 * MIB);
    assert_eq!(fs_bytes(&disk), 1024 * MIB);
    assert_clean(&disk);
    assert_eq!(ls(&disk, "/.ssh")["authorized_keys"].0, 0o100600);
    assert_eq!(ls(&disk, "/")["."].0, 0o040700);
    assert_eq!(debugfs(&disk, "cat /.bashrc"), debugfs(&seed, "cat /.bashrc"));
    // The seed is untouched.
    assert_eq!(fs_bytes(&seed), 64 * MIB);
    assert_clean(&seed);
}

#[test]
fn forced_sparse_copy_keeps_holes_and_shrinking_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.ext4");
    build_work_seed(&SystemSeedTools, None, &seed, 512).expect("seed builds");
    let disk = dir.path().join("work.ext4");
    let report = clone_work_disk_with(&SystemSeedTools, &seed, &disk, 128, CopyPolicy::SparseCopy).expect("clone");
    assert_eq!(report.method, CloneMethod::SparseCopy);
    assert_eq!(report.resize, Resize::Shrink);
    assert!(report.bytes_copied < 8 * MIB, "copied {} bytes of a nearly empty seed", report.bytes_copied);
    assert_eq!(fs::metadata(&disk).expect("disk").len(), 128 * MIB);
    assert_eq!(fs_bytes(&disk), 128 * MIB);
    assert_clean(&disk);

    let same = dir.path().join("same.ext4");
    let report = clone_work_disk_with(&SystemSeedTools, &seed, &same, 512, CopyPolicy::SparseCopy).expect("clone");
    assert_eq!(report.resize, Resize::None);
    assert_clean(&same);
    let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&same).expect("disk")) * 512;
    assert!(used < 16 * MIB, "the copy uses {used} bytes: holes were filled");
}

#[test]
fn written_files_round_trip_with_owner_and_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.ext4");
    build_work_seed(&SystemSeedTools, None, &seed, 64).expect("seed builds");
    let disk = dir.path().join("work.ext4");
    clone_work_disk(&SystemSeedTools, &seed, &disk, 256).expect("clone");

    let key = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF banger@host\n";
    write_file_into(&SystemSeedTools, &disk, "/.ssh/authorized_keys", key, 0o600).expect("write");
    let gitconfig = b"[user]\n\tname = Some One\n\temail = one@example.com\n";
    let files = [
        GuestFile { path: "/.gitconfig", contents: gitconfig, mode: 0o644 },
        GuestFile { path: "/.config/banger/env", contents: b"A=1\n", mode: 0o640 },
    ];
    write_files_into(&SystemSeedTools, &disk, &files).expect("write");
    // Replace with something shorter.
    write_file_into(&SystemSeedTools, &disk, "/.ssh/authorized_keys", b"k\n", 0o600).expect("rewrite");

    assert_eq!(debugfs(&disk, "cat /.ssh/authorized_keys"), "k\n");
    assert_eq!(ls(&disk, "/.ssh")["authorized_keys"], (0o100600, 0, 0, "2".to_owned()));
    assert_eq!(debugfs(&disk, "cat /.gitconfig").as_bytes(), gitconfig);
    assert_eq!(ls(&disk, "/")[".gitconfig"].0, 0o100644);
    assert_eq!(ls(&disk, "/.config/banger")["env"], (0o100640, 0, 0, "4".to_owned()));
    let paths = ["/.gitconfig", "/.ssh/authorized_keys", "/.ssh", "/no"];
    let read = read_files_from(&SystemSeedTools, &disk, &paths, MIB).expect("read back");
    let want = [
        GuestRead::Contents(gitconfig.to_vec()),
        GuestRead::Contents(b"k\n".to_vec()),
        GuestRead::NotRegular,
        GuestRead::Missing,
    ];
    assert_eq!(read, want);
    assert_clean(&disk);
}

#[test]
fn a_sparse_20_gib_guest_file_is_sized_not_read_and_a_damaged_disk_fails_its_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.ext4");
    build_work_seed(&SystemSeedTools, None, &seed, 64).expect("seed builds");
    let disk = dir.path().join("work.ext4");
    clone_work_disk(&SystemSeedTools, &seed, &disk, 64).expect("clone");
    assert!(SystemSeedTools.e2fsck_ro(&disk).expect("e2fsck").clean, "a fresh clone is clean");
    // What `truncate -s 20G` in the guest leaves: an inode of 20 GiB with no blocks.
    let (ok, _) = tool("debugfs", &["-w", "-R", "sif /.gitconfig size 21474836480"], &disk);
    assert!(ok, "debugfs sif");
    let read = read_files_from(&SystemSeedTools, &disk, &["/.gitconfig", "/.bashrc"], MIB).expect("read");
    assert_eq!(read[0], GuestRead::TooLarge { size: 20 << 30 });
    assert!(matches!(&read[1], GuestRead::Contents(b) if !b.is_empty()), "{:?}", read[1]);
    let left: Vec<_> = fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(left.len(), 2, "no scratch left: {left:?}");

    let (ok, _) = tool("debugfs", &["-w", "-R", "clri /.ssh"], &disk);
    assert!(ok, "debugfs clri");
    let report = SystemSeedTools.e2fsck_ro(&disk).expect("e2fsck");
    assert!(!report.clean, "{}", report.output_head);
    assert!(report.first_problem().starts_with("Entry '.ssh' in /"), "{}", report.first_problem());
}

#[test]
fn paths_cannot_inject_debugfs_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.ext4");
    build_work_seed(&SystemSeedTools, None, &seed, 32).expect("seed builds");
    for path in ["/x\nrm /.bashrc", "/x rm /.bashrc", "/\"x\"", "x"] {
        let err = write_file_into(&SystemSeedTools, &seed, path, b"", 0o600).expect_err(path);
        assert!(matches!(err, SeedError::InvalidPath(_)), "{err:?}");
    }
    assert!(ls(&seed, "/").contains_key(".bashrc"));
}

#[test]
fn writing_over_a_directory_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.ext4");
    build_work_seed(&SystemSeedTools, None, &seed, 32).expect("seed builds");
    let err = write_file_into(&SystemSeedTools, &seed, "/.ssh", b"x", 0o600).expect_err("a directory");
    assert!(matches!(err, SeedError::InTheWay { .. }), "{err:?}");
    assert!(err.to_string().ends_with("a directory is in the way"), "{err}");
    assert_eq!(ls(&seed, "/.ssh")["authorized_keys"].0, 0o100600);
    assert_clean(&seed);
}
