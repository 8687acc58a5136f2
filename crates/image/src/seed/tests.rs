use super::*;

fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    names.sort();
    names
}

fn mkfs_tree(tools: &FakeSeedTools) -> Vec<StagedEntry> {
    tools
        .calls()
        .into_iter()
        .find_map(|call| match call {
            SeedCall::MkfsExt4 { tree, .. } => Some(tree),
            _ => None,
        })
        .unwrap()
}

fn entry<'a>(tree: &'a [StagedEntry], path: &str) -> &'a StagedEntry {
    tree.iter().find(|e| e.path == path).unwrap_or_else(|| panic!("{path} not staged"))
}

fn file(contents: &str) -> StagedKind {
    StagedKind::File(contents.as_bytes().to_vec())
}

#[test]
fn seed_with_defaults_has_the_slots_and_root_owned_0700_top() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("work-seed.ext4");
    let tools = FakeSeedTools::new();
    let info = build_work_seed(&tools, None, &out, 64).unwrap();

    assert_eq!(info.dotfiles, Dotfiles::Defaults);
    assert_eq!(info.files, ["/.bashrc", "/.gitconfig", "/.profile", "/.ssh", "/.ssh/authorized_keys"]);
    assert!(info.skipped.is_empty());
    let tree = mkfs_tree(&tools);
    let paths: Vec<_> = tree.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/", "/.bashrc", "/.gitconfig", "/.profile", "/.ssh", "/.ssh/authorized_keys"]);
    assert_eq!(entry(&tree, "/").mode, 0o700);
    assert_eq!(entry(&tree, "/.ssh").mode, 0o700);
    assert_eq!(
        entry(&tree, "/.ssh/authorized_keys"),
        &StagedEntry { path: "/.ssh/authorized_keys".into(), mode: 0o600, kind: file("") }
    );
    assert_eq!(entry(&tree, "/.gitconfig").kind, file(""));
    assert_eq!(entry(&tree, "/.bashrc").kind, file(DEFAULT_BASHRC));
    assert_eq!(entry(&tree, "/.profile").kind, file(DEFAULT_PROFILE));

    let files = tools.files.lock().unwrap();
    for path in std::iter::once("/").chain(info.files.iter().map(String::as_str)) {
        assert_eq!((files[path].uid, files[path].gid), (0, 0), "{path} not owned by root");
    }
    assert_eq!(files["/"].mode, 0o040700);
    drop(files);
    let calls = tools.calls();
    assert_eq!(calls.len(), 2);
    let SeedCall::MkfsExt4 { request, .. } = &calls[0] else { panic!("{calls:?}") };
    assert_eq!((request.label.as_str(), request.size_mib), (SEED_LABEL, 64));
    assert_ne!(request.image, out, "mkfs must write a temporary file");
    let SeedCall::Debugfs(fixup) = &calls[1] else { panic!("{calls:?}") };
    assert!(fixup.writable);
    let script = fixup.script();
    assert!(script.starts_with("sif / mode 040700\nsif / uid 0\nsif / gid 0\n"), "{script}");
    for path in &info.files {
        assert!(script.contains(&format!("sif {path} uid 0\nsif {path} gid 0\n")), "{path} not owned by root");
    }
    assert_eq!(read_superblock(&out).unwrap(), Some(Superblock { bytes: 64 * MIB, clean: true }));
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

#[test]
fn seed_takes_the_skeleton_without_following_links_or_taking_the_slots() {
    let dir = tempfile::tempdir().unwrap();
    let skel = dir.path().join("skel");
    fs::create_dir_all(skel.join(".config/fish")).unwrap();
    fs::write(skel.join(".bashrc"), "# skel bashrc\n").unwrap();
    fs::write(skel.join(".bash_logout"), "clear\n").unwrap();
    fs::write(skel.join(".config/fish/config.fish"), "set x\n").unwrap();
    fs::create_dir(skel.join(".ssh")).unwrap();
    fs::write(skel.join(".ssh/authorized_keys"), "ssh-rsa someone-elses-key\n").unwrap();
    fs::write(skel.join(".gitconfig"), "[user]\n").unwrap();
    fs::write(skel.join("a b"), "spaces\n").unwrap();
    symlink("/etc/shadow", skel.join(".secret")).unwrap();

    let tools = FakeSeedTools::new();
    let out = dir.path().join("seed.ext4");
    let info = build_work_seed(&tools, Some(&skel), &out, 32).unwrap();
    assert_eq!(info.dotfiles, Dotfiles::Skel);
    assert_eq!(info.skipped, ["/a b"]);
    let tree = mkfs_tree(&tools);
    assert_eq!(entry(&tree, "/.bashrc").kind, file("# skel bashrc\n"));
    assert_eq!(entry(&tree, "/.bash_logout").kind, file("clear\n"));
    assert_eq!(entry(&tree, "/.profile").kind, file(DEFAULT_PROFILE));
    assert_eq!(entry(&tree, "/.config/fish/config.fish").kind, file("set x\n"));
    assert_eq!(entry(&tree, "/.secret").kind, StagedKind::Symlink("/etc/shadow".into()));
    assert_eq!(entry(&tree, "/.ssh/authorized_keys").kind, file(""));
    assert_eq!(entry(&tree, "/.gitconfig").kind, file(""));
    assert!(tree.iter().all(|e| e.path != "/a b"));
    assert!(info.files.contains(&"/.config/fish".to_owned()));
}

#[test]
fn missing_or_symlinked_skeleton_means_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    fs::write(real.join(".bashrc"), "# real\n").unwrap();
    symlink(&real, dir.path().join("link")).unwrap();
    for skel in [dir.path().join("absent"), dir.path().join("link")] {
        let tools = FakeSeedTools::new();
        let out = dir.path().join("seed.ext4");
        let info = build_work_seed(&tools, Some(&skel), &out, 32).unwrap();
        assert_eq!(info.dotfiles, Dotfiles::Defaults);
        assert_eq!(entry(&mkfs_tree(&tools), "/.bashrc").kind, file(DEFAULT_BASHRC));
    }
}

#[test]
fn sizes_out_of_range_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools::new();
    for size in [0, MIN_SIZE_MIB - 1, MAX_SIZE_MIB + 1] {
        let err = build_work_seed(&tools, None, &dir.path().join("s"), size).unwrap_err();
        assert!(matches!(err, SeedError::InvalidSize { .. }), "{err:?}");
    }
    assert_eq!(
        SeedError::InvalidSize { size_mib: 1 }.to_string(),
        "work disk size 1 MiB is out of range; use 16 MiB to 16777216 MiB"
    );
    assert!(tools.calls().is_empty());
}

#[test]
fn failed_mkfs_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools { fail_on: Some(SeedTool::MkfsExt4), ..FakeSeedTools::new() };
    let out = dir.path().join("seed.ext4");
    let err = build_work_seed(&tools, None, &out, 64).unwrap_err();
    assert!(matches!(err, SeedError::Tool { step: "making the work seed", .. }), "{err:?}");
    assert!(!out.exists());
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn seed_from_image_reads_etc_skel_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs.ext4");
    tools::write_fake_superblock(&rootfs, 1024).unwrap();
    let tools = FakeSeedTools {
        skel: Some(vec![(".bashrc".into(), 0o644, b"# from image\n".to_vec())]),
        ..FakeSeedTools::new()
    };
    let out = dir.path().join("seed.ext4");
    let info = build_seed_from_image(&tools, &rootfs, &out, 64).unwrap();
    assert_eq!(info.dotfiles, Dotfiles::Skel);
    assert_eq!(entry(&mkfs_tree(&tools), "/.bashrc").kind, file("# from image\n"));
    let SeedCall::Debugfs(rdump) = &tools.calls()[0] else { panic!() };
    assert!(!rdump.writable);
    assert_eq!(rdump.image, rootfs);
    assert_eq!(rdump.script(), "rdump /etc/skel .\n");
    assert!(leftovers(dir.path()).is_empty());

    let without = FakeSeedTools::new();
    let info = build_seed_from_image(&without, &rootfs, &dir.path().join("seed2.ext4"), 64).unwrap();
    assert_eq!(info.dotfiles, Dotfiles::Defaults);
}

#[test]
fn seed_from_a_non_ext4_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs.ext4");
    fs::write(&rootfs, vec![0u8; 8192]).unwrap();
    let tools = FakeSeedTools::new();
    let err = build_seed_from_image(&tools, &rootfs, &dir.path().join("s"), 64).unwrap_err();
    assert!(matches!(err, SeedError::NotExt4 { .. }), "{err:?}");
    assert!(tools.calls().is_empty());
}

fn fake_seed(dir: &Path, size_mib: u64) -> PathBuf {
    let seed = dir.join("seed.ext4");
    build_work_seed(&FakeSeedTools::new(), None, &seed, size_mib).unwrap();
    seed
}

#[test]
fn clone_grows_the_temporary_copy_then_renames_it() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fake_seed(dir.path(), 64);
    let tools = FakeSeedTools::new();
    let dest = dir.path().join("vm").join("work.ext4");
    fs::create_dir(dest.parent().unwrap()).unwrap();
    let report = clone_work_disk_with(&tools, &seed, &dest, 2048, CopyPolicy::SparseCopy).unwrap();
    assert_eq!(report.method, CloneMethod::SparseCopy);
    assert_eq!(report.resize, Resize::Grow);
    assert!(report.bytes_copied < MIB);
    let calls = tools.calls();
    let [SeedCall::Resize2fs(resize)] = calls.as_slice() else { panic!("{calls:?}") };
    assert_eq!(resize.size_mib, 2048);
    assert_ne!(resize.image, dest, "resize2fs must run on the temporary file");
    assert_eq!(resize.image.parent(), dest.parent());
    assert_eq!(fs::metadata(&dest).unwrap().len(), 2048 * MIB);
    assert_eq!(read_superblock(&dest).unwrap(), Some(Superblock { bytes: 2048 * MIB, clean: true }));
    assert!(leftovers(dest.parent().unwrap()).is_empty());
}

#[test]
fn clone_of_the_same_size_runs_nothing_and_a_smaller_one_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fake_seed(dir.path(), 256);
    let tools = FakeSeedTools::new();
    let same = clone_work_disk(&tools, &seed, &dir.path().join("same.ext4"), 256).unwrap();
    assert_eq!(same.resize, Resize::None);
    assert!(tools.calls().is_empty());
    let small = clone_work_disk(&tools, &seed, &dir.path().join("small.ext4"), 128).unwrap();
    assert_eq!(small.resize, Resize::Shrink);
    assert_eq!(tools.calls().len(), 1);
    assert_eq!(fs::metadata(dir.path().join("small.ext4")).unwrap().len(), 128 * MIB);
}

#[test]
fn clone_never_replaces_an_existing_disk() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fake_seed(dir.path(), 64);
    let dest = dir.path().join("work.ext4");
    fs::write(&dest, "user data").unwrap();
    let tools = FakeSeedTools::new();
    let err = clone_work_disk(&tools, &seed, &dest, 128).unwrap_err();
    assert!(matches!(err, SeedError::Exists { .. }), "{err:?}");
    assert_eq!(fs::read(&dest).unwrap(), b"user data");
}

#[test]
fn failed_resize_leaves_no_disk() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fake_seed(dir.path(), 64);
    let dest = dir.path().join("work.ext4");
    let tools = FakeSeedTools { fail_on: Some(SeedTool::Resize2fs), ..FakeSeedTools::new() };
    let err = clone_work_disk(&tools, &seed, &dest, 128).unwrap_err();
    assert!(matches!(err, SeedError::Tool { step: "resizing the work disk", .. }), "{err:?}");
    assert!(!dest.exists());
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn clone_refuses_a_seed_that_is_not_clean() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fake_seed(dir.path(), 64);
    let file = File::options().write(true).open(&seed).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &2u16.to_le_bytes(), 1024 + 0x3a).unwrap();
    let err = clone_work_disk(&FakeSeedTools::new(), &seed, &dir.path().join("w"), 128).unwrap_err();
    assert!(matches!(err, SeedError::NotClean { .. }), "{err:?}");
}

#[test]
fn write_file_makes_parents_replaces_and_sets_owner_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools::new();
    let image = dir.path().join("seed.ext4");
    build_work_seed(&tools, None, &image, 64).unwrap();
    let before = tools.calls().len();
    write_file_into(&tools, &image, "/.config/banger/token", b"secret\n", 0o600).unwrap();

    let calls = tools.calls();
    let [SeedCall::Debugfs(probe), SeedCall::Debugfs(write), SeedCall::Debugfs(check)] = &calls[before..] else {
        panic!("{calls:?}")
    };
    assert!(!probe.writable && write.writable && !check.writable);
    assert_eq!(probe.script(), "stat /.config\nstat /.config/banger\nstat /.config/banger/token\n");
    assert_eq!(
        write.script(),
        "mkdir /.config\nmkdir /.config/banger\nwrite f0 /.config/banger/token\n\
         sif /.config/banger/token mode 0100600\nsif /.config/banger/token uid 0\nsif /.config/banger/token gid 0\n"
    );
    assert_eq!(check.script(), "stat /.config/banger/token\ndump /.config/banger/token f1\n");
    let files = tools.files.lock().unwrap();
    assert_eq!(
        files["/.config/banger/token"],
        FakeInode { mode: 0o100600, uid: 0, gid: 0, contents: b"secret\n".to_vec() }
    );
    drop(files);
    assert!(leftovers(dir.path()).is_empty(), "scratch files with secrets left: {:?}", leftovers(dir.path()));

    // Replacing a file of the seed removes it first and makes no directory that exists.
    let before = tools.calls().len();
    write_file_into(&tools, &image, "/.ssh/authorized_keys", b"new\n", 0o600).unwrap();
    assert_eq!(tools.files.lock().unwrap()["/.ssh/authorized_keys"].contents, b"new\n");
    let SeedCall::Debugfs(write) = &tools.calls()[before + 1] else { panic!() };
    assert!(write.script().starts_with("rm /.ssh/authorized_keys\nwrite f0 /.ssh/authorized_keys\n"));
}

#[test]
fn nothing_is_written_over_a_directory_or_under_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools::new();
    let image = dir.path().join("seed.ext4");
    build_work_seed(&tools, None, &image, 64).unwrap();
    let before = tools.calls().len();

    let err = write_file_into(&tools, &image, "/.ssh", b"x", 0o600).unwrap_err();
    let SeedError::InTheWay { detail, .. } = &err else { panic!("{err:?}") };
    assert_eq!(detail, "a directory is in the way");
    let err = write_file_into(&tools, &image, "/.ssh/authorized_keys/x", b"x", 0o600).unwrap_err();
    let SeedError::InTheWay { detail, .. } = &err else { panic!("{err:?}") };
    assert_eq!(detail, "'/.ssh/authorized_keys' is a regular file, not a directory");
    // Only the read-only probes ran.
    assert!(tools.calls()[before..].iter().all(|c| matches!(c, SeedCall::Debugfs(r) if !r.writable)));
    assert!(tools.files.lock().unwrap()["/.ssh"].is_dir());

    let nested =
        [GuestFile { path: "/a", contents: b"", mode: 0o600 }, GuestFile { path: "/a/b", contents: b"", mode: 0o600 }];
    assert!(matches!(write_files_into(&tools, &image, &nested), Err(SeedError::InvalidPath(_))));
}

#[test]
fn several_files_go_in_one_write_run() {
    let dir = tempfile::tempdir().unwrap();
    let image = fake_seed(dir.path(), 64);
    let tools = FakeSeedTools::new();
    let files = [
        GuestFile { path: "/.ssh/authorized_keys", contents: b"k\n", mode: 0o600 },
        GuestFile { path: "/.gitconfig", contents: b"[user]\n\tname = me\n", mode: 0o644 },
        GuestFile { path: "/.ssh/config", contents: b"", mode: 0o600 },
    ];
    write_files_into(&tools, &image, &files).unwrap();
    let calls = tools.calls();
    assert_eq!(calls.len(), 3);
    let SeedCall::Debugfs(write) = &calls[1] else { panic!() };
    assert_eq!(write.script().matches("mkdir /.ssh\n").count(), 1, "{}", write.script());
    assert_eq!(tools.files.lock().unwrap()["/.gitconfig"].mode, 0o100644);
}

#[test]
fn bad_paths_and_modes_are_refused_before_debugfs_runs() {
    let dir = tempfile::tempdir().unwrap();
    let image = fake_seed(dir.path(), 64);
    let tools = FakeSeedTools::new();
    for path in ["relative", "/a b", "/x\nrm /.bashrc", "/\"q\"", "/", "/a/../b"] {
        let err = write_file_into(&tools, &image, path, b"", 0o600).unwrap_err();
        assert!(matches!(err, SeedError::InvalidPath(_)), "{path:?}: {err:?}");
    }
    let err = write_file_into(&tools, &image, "/x", b"", 0o100600).unwrap_err();
    assert_eq!(err.to_string(), "mode 0o100600 for '/x' is not a permission mode; use at most 0o7777");
    let twice =
        [GuestFile { path: "/x", contents: b"", mode: 0o600 }, GuestFile { path: "/x", contents: b"", mode: 0o600 }];
    assert!(matches!(write_files_into(&tools, &image, &twice), Err(SeedError::InvalidPath(_))));
    assert!(tools.calls().is_empty());
}

#[test]
fn a_write_that_did_not_take_effect_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = fake_seed(dir.path(), 64);
    let tools = FakeSeedTools { ignore_set_inode_field: true, ..FakeSeedTools::new() };
    let err = write_file_into(&tools, &image, "/.gitconfig", b"x", 0o640).unwrap_err();
    let SeedError::NotWritten { path, detail, .. } = &err else { panic!("{err:?}") };
    assert_eq!(path, "/.gitconfig");
    assert!(detail.contains("mode 0600"), "{detail}");
}

#[test]
fn parses_debugfs_stat_output() {
    let stdout = "debugfs: stat /.ssh/authorized_keys\n\
        Inode: 15   Type: regular    Mode:  0600   Flags: 0x80000\n\
        Generation: 0    Version: 0x00000000:00000000\n\
        User:     0   Group:     0   Project:     0   Size: 19\n\
        File ACL: 0\n\
        debugfs: dump /.ssh/authorized_keys f1\n";
    let outputs = command_outputs(stdout);
    assert_eq!(outputs.len(), 2);
    assert_eq!(parse_stat(&outputs[0]), Some(Stat { kind: "regular".into(), mode: 0o600, uid: 0, gid: 0, size: 19 }));
    assert_eq!(parse_stat(&outputs[1]), None);
}

#[test]
fn files_that_are_not_ext4_are_not_written_or_cloned() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    fs::write(&junk, b"not a file system").unwrap();
    let tools = FakeSeedTools::new();
    assert!(matches!(write_file_into(&tools, &junk, "/x", b"", 0o600), Err(SeedError::NotExt4 { .. })));
    assert!(matches!(clone_work_disk(&tools, &junk, &dir.path().join("w"), 64), Err(SeedError::NotExt4 { .. })));
    assert!(tools.calls().is_empty());
}

#[test]
fn files_are_read_back_and_missing_or_odd_ones_are_none() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools::new();
    let image = dir.path().join("seed.ext4");
    build_work_seed(&tools, None, &image, 64).unwrap();
    write_file_into(&tools, &image, "/.gitconfig", b"[user]\n\tname = me\n", 0o644).unwrap();
    let paths = ["/.gitconfig", "/.ssh", "/nope", "/.ssh/authorized_keys"];
    let read = read_files_from(&tools, &image, &paths, 1 << 20).unwrap();
    assert_eq!(
        read,
        [
            GuestRead::Contents(b"[user]\n\tname = me\n".to_vec()),
            GuestRead::NotRegular,
            GuestRead::Missing,
            GuestRead::Contents(Vec::new())
        ]
    );
    assert!(tools
        .calls()
        .iter()
        .all(|c| !matches!(c, SeedCall::Debugfs(r) if r.writable && r.script().contains("dump"))));
    assert!(matches!(read_files_from(&tools, &image, &["relative"], 1), Err(SeedError::InvalidPath(_))));
}

#[test]
fn files_over_the_cap_are_stated_but_never_dumped() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools::new();
    let image = dir.path().join("seed.ext4");
    build_work_seed(&tools, None, &image, 64).unwrap();
    write_file_into(&tools, &image, "/.gitconfig", &[b'x'; 100], 0o644).unwrap();
    write_file_into(&tools, &image, "/small", b"ok", 0o644).unwrap();
    let before = tools.calls().len();
    let read = read_files_from(&tools, &image, &["/.gitconfig", "/small"], 99).unwrap();
    assert_eq!(read, [GuestRead::TooLarge { size: 100 }, GuestRead::Contents(b"ok".to_vec())]);
    let scripts: Vec<String> = tools.calls()[before..]
        .iter()
        .filter_map(|c| match c {
            SeedCall::Debugfs(r) => Some(r.script()),
            _ => None,
        })
        .collect();
    assert_eq!(
        scripts,
        ["stat /.gitconfig\nstat /small\n", "dump /small f1\n"],
        "sizes first, then only the small file"
    );
    // Nothing within the cap: no dump run at all.
    let before = tools.calls().len();
    assert_eq!(read_files_from(&tools, &image, &["/.gitconfig"], 10).unwrap(), [GuestRead::TooLarge { size: 100 }]);
    assert_eq!(tools.calls().len() - before, 1);
}

#[test]
fn copy_disk_keeps_contents_and_holes_and_refuses_an_existing_target() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.ext4");
    let f = fs::File::create(&src).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt as _;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", (8 << 20) - 4).unwrap();
    drop(f);
    let dest = dir.path().join("dest.ext4");
    let (_method, copied) = copy_disk(&src, &dest).unwrap();
    assert!(copied < 8 << 20, "holes are not copied: {copied}");
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dest).unwrap());
    assert!(matches!(copy_disk(&src, &dest), Err(SeedError::Exists { .. })));
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}
