#![expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]

use std::os::unix::fs::MetadataExt as _;

use banger_image::seed::{build_work_seed, FakeSeedTools};

use super::*;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn installation_key_is_made_once_with_tight_modes() {
    let dir = tempfile::tempdir().unwrap();
    let ssh = dir.path().join("ssh");
    let first = ensure_installation_key(&ssh, None).unwrap();
    assert!(first.created);
    assert!(first.line.starts_with("ssh-ed25519 AAAA"), "{}", first.line);
    assert!(first.line.ends_with(&format!(" {INSTALLATION_KEY_COMMENT}")), "{}", first.line);
    assert_eq!(first.private, ssh.join("id_ed25519"));
    assert_eq!((mode(&ssh), mode(&first.private), mode(&first.public)), (0o700, 0o600, 0o644));
    assert_eq!(fs::read_to_string(&first.public).unwrap(), format!("{}\n", first.line));
    let text = fs::read_to_string(&first.private).unwrap();
    assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"), "{text}");

    // Idempotent: the same key, modes restored, a damaged .pub rewritten.
    fs::set_permissions(&first.private, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&first.public, "junk").unwrap();
    let again = ensure_installation_key(&ssh, None).unwrap();
    assert!(!again.created);
    assert_eq!(again.line, first.line);
    assert_eq!(mode(&again.private), 0o600);
    assert_eq!(fs::read_to_string(&again.public).unwrap(), format!("{}\n", first.line));
    let leftovers: Vec<_> = fs::read_dir(&ssh).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");
}

#[test]
fn with_a_group_the_key_is_group_readable() {
    let dir = tempfile::tempdir().unwrap();
    let ssh = dir.path().join("ssh");
    // A group this process may give files to: its own.
    let gid = nix::unistd::getegid();
    let key = ensure_installation_key(&ssh, Some(gid)).unwrap();
    assert_eq!((mode(&ssh), mode(&key.private)), (0o750, 0o640));
    assert_eq!(fs::metadata(&key.private).unwrap().gid(), gid.as_raw());
    assert_eq!(fs::metadata(&ssh).unwrap().gid(), gid.as_raw());
    // Clearing the group tightens the modes again.
    ensure_installation_key(&ssh, None).unwrap();
    assert_eq!((mode(&ssh), mode(&key.private)), (0o700, 0o600));
}

#[test]
fn concurrent_callers_agree_on_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    let results: Vec<KeyPair> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| ensure_key_pair(&path, "c", 0o600, None).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|k| k.created).count(), 1);
    assert!(results.iter().all(|k| k.line == results[0].line));
}

#[test]
fn host_keys_are_per_vm_and_pinned_in_known_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let ka = ensure_host_key(&a, "web").unwrap();
    let kb = ensure_host_key(&b, "db").unwrap();
    assert_ne!(ka.line, kb.line);
    assert!(ka.line.ends_with(" root@web"));
    assert_eq!(ka.private, a.join("ssh_host_ed25519_key"));
    let text = render_known_hosts(&[("web".into(), ka.line.clone()), ("db".into(), kb.line.clone())]);
    let blob = |l: &str| l.split_whitespace().nth(1).unwrap().to_owned();
    assert_eq!(text, format!("db.vm ssh-ed25519 {}\nweb.vm ssh-ed25519 {}\n", blob(&kb.line), blob(&ka.line)));
    assert_eq!(render_known_hosts(&[("x".into(), "garbage".into())]), "");
}

#[test]
fn authorized_keys_keep_guest_keys_and_replace_the_old_installation_key() {
    let ours = format!("ssh-ed25519 NEW {INSTALLATION_KEY_COMMENT}");
    assert_eq!(merge_authorized_keys("", &ours), format!("{ours}\n"));
    let existing = format!("ssh-rsa AAA me@laptop\n\nssh-ed25519 OLD {INSTALLATION_KEY_COMMENT}\n");
    let merged = merge_authorized_keys(&existing, &ours);
    assert_eq!(merged, format!("ssh-rsa AAA me@laptop\n{ours}\n"));
    assert_eq!(merge_authorized_keys(&merged, &ours), merged, "idempotent");
}

fn git(name: Option<&str>, email: Option<&str>) -> GitIdentity {
    GitIdentity { name: name.map(Into::into), email: email.map(Into::into) }
}

#[test]
fn gitconfig_merges_only_the_given_fields() {
    let both = git(Some("Ada Lovelace"), Some("ada@example.com"));
    assert_eq!(merge_gitconfig("", &both), "[user]\n\tname = \"Ada Lovelace\"\n\temail = \"ada@example.com\"\n");
    let existing = "[core]\n\teditor = vim\n[user]\n\tname = Old\n\temail = old@example.com\n\tsigningkey = ABC\n";
    assert_eq!(
        merge_gitconfig(existing, &git(Some("New"), None)),
        "[core]\n\teditor = vim\n[user]\n\tname = \"New\"\n\temail = old@example.com\n\tsigningkey = ABC\n"
    );
    // Later [user] sections lose the keys set in the first; case does not matter.
    let two = "[User]\n\tName = A\n[alias]\n\tco = checkout\n[user]\n\temail=x@y\n";
    assert_eq!(
        merge_gitconfig(two, &both),
        "[User]\n\tname = \"Ada Lovelace\"\n\temail = \"ada@example.com\"\n[alias]\n\tco = checkout\n[user]\n"
    );
    assert_eq!(merge_gitconfig(existing, &git(None, None)), existing);
    assert_eq!(merge_gitconfig("", &git(Some("a \"b\" \\c"), None)), "[user]\n\tname = \"a \\\"b\\\" \\\\c\"\n");
}

#[test]
fn git_identities_are_trimmed_and_checked() {
    assert_eq!(check_git_identity(None), Ok(None));
    assert_eq!(check_git_identity(Some(git(Some("  "), None))), Ok(None));
    assert_eq!(check_git_identity(Some(git(Some(" Ada "), Some("")))), Ok(Some(git(Some("Ada"), None))));
    let e = check_git_identity(Some(git(Some("a\n[core]"), None))).unwrap_err();
    assert!(matches!(e, GitIdentityError::Control { .. }) && e.to_string().contains("control character"), "{e}");
    assert!(check_git_identity(Some(git(None, Some(&"x".repeat(300))))).is_err());
}

#[test]
fn sync_files_are_read_and_problems_become_warnings() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    fs::create_dir_all(h.join(".config/app")).unwrap();
    fs::write(h.join(".config/app/rc"), "rc").unwrap();
    fs::set_permissions(h.join(".config/app/rc"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(h.join("notes"), "n").unwrap();
    let entries: Vec<String> = [
        "~/.config/app/rc",
        "~/notes:docs/notes.txt",
        "~/missing",
        "~/.config",
        "~/notes:.ssh/authorized_keys",
        "~/notes:docs",
        "~/has space",
        "/outside/home",
    ]
    .map(String::from)
    .into();
    fs::write(h.join("has space"), "s").unwrap();
    let (files, warnings) = collect_sync_files(&entries, Some(h), &RESERVED);
    assert_eq!(
        files,
        [
            PlannedFile { path: "/.config/app/rc".into(), contents: b"rc".to_vec(), mode: 0o600 },
            PlannedFile { path: "/docs/notes.txt".into(), contents: b"n".to_vec(), mode: 0o644 },
        ]
    );
    let expect = [
        "does not exist",
        "is not a regular file",
        "clashes with banger's ~/.ssh/authorized_keys",
        "clashes with the earlier entry for ~/docs/notes.txt",
        "cannot be written into the work disk",
        "is outside $HOME",
    ];
    assert_eq!(warnings.len(), expect.len(), "{warnings:#?}");
    for (w, e) in warnings.iter().zip(expect) {
        assert!(w.contains(e) && w.ends_with("skipped"), "{w:?} lacks {e:?}");
    }
}

fn plan(git: Option<GitIdentity>, sync: Vec<PlannedFile>) -> GuestFilesPlan {
    GuestFilesPlan {
        authorized_key: format!("ssh-ed25519 KEY {INSTALLATION_KEY_COMMENT}"),
        host_key: b"PRIVATE".to_vec(),
        host_key_pub: "ssh-ed25519 HOST root@web".into(),
        git,
        sync,
    }
}

#[test]
fn guest_files_land_in_the_work_disk() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools::new();
    let work = dir.path().join("work.ext4");
    build_work_seed(&tools, None, &work, 64).unwrap();
    let synced = PlannedFile { path: "/.npmrc".into(), contents: b"registry=x\n".to_vec(), mode: 0o600 };
    let warnings = write_guest_files(&tools, &work, plan(Some(git(Some("Ada"), None)), vec![synced.clone()])).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let read = |p: &str| {
        let files = tools.files.lock().unwrap();
        let f = &files[p];
        (String::from_utf8_lossy(&f.contents).into_owned(), f.mode & 0o7777, f.uid)
    };
    assert_eq!(read("/.ssh/authorized_keys"), (format!("ssh-ed25519 KEY {INSTALLATION_KEY_COMMENT}\n"), 0o600, 0));
    assert_eq!(read("/.banger/ssh_host_ed25519_key"), ("PRIVATE".into(), 0o600, 0));
    assert_eq!(read("/.banger/ssh_host_ed25519_key.pub"), ("ssh-ed25519 HOST root@web\n".into(), 0o644, 0));
    assert_eq!(read("/.gitconfig"), ("[user]\n\tname = \"Ada\"\n".into(), 0o644, 0));
    assert_eq!(read("/.npmrc"), ("registry=x\n".into(), 0o600, 0));

    // A key the guest added survives the next start; no identity leaves .gitconfig alone; a
    // synced .gitconfig is the base the identity is merged into.
    {
        let mut files = tools.files.lock().unwrap();
        let keys = files.get_mut("/.ssh/authorized_keys").unwrap();
        keys.contents = [b"ssh-rsa GUEST me\n".as_slice(), &keys.contents].concat();
    }
    write_guest_files(&tools, &work, plan(None, Vec::new())).unwrap();
    assert_eq!(
        read("/.ssh/authorized_keys").0,
        format!("ssh-rsa GUEST me\nssh-ed25519 KEY {INSTALLATION_KEY_COMMENT}\n")
    );
    assert_eq!(read("/.gitconfig").0, "[user]\n\tname = \"Ada\"\n");
    let base = PlannedFile { path: "/.gitconfig".into(), contents: b"[core]\n\tpager = less\n".to_vec(), mode: 0o600 };
    write_guest_files(&tools, &work, plan(Some(git(None, Some("a@b"))), vec![base])).unwrap();
    assert_eq!(read("/.gitconfig"), ("[core]\n\tpager = less\n[user]\n\temail = \"a@b\"\n".into(), 0o600, 0));
}

#[test]
fn a_user_file_in_the_way_is_a_warning_and_the_others_still_land() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools::new();
    let work = dir.path().join("work.ext4");
    build_work_seed(&tools, None, &work, 64).unwrap();
    // `/.ssh` is a directory: a file cannot go there.
    let sync = vec![
        PlannedFile { path: "/.ssh".into(), contents: b"x".to_vec(), mode: 0o644 },
        PlannedFile { path: "/ok".into(), contents: b"ok".to_vec(), mode: 0o644 },
    ];
    let warnings = write_guest_files(&tools, &work, plan(None, sync)).unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("~/.ssh") && warnings[0].contains("directory is in the way"), "{warnings:?}");
    assert_eq!(tools.files.lock().unwrap()["/ok"].contents, b"ok");
    assert!(tools.files.lock().unwrap()["/.ssh"].is_dir());
}

#[test]
fn oversized_guest_files_are_not_read_and_the_start_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let tools = FakeSeedTools::new();
    let work = dir.path().join("work.ext4");
    build_work_seed(&tools, None, &work, 64).unwrap();
    let over = usize::try_from(MAX_GUEST_FILE_BYTES).unwrap() + 1;
    {
        let mut files = tools.files.lock().unwrap();
        files.get_mut("/.ssh/authorized_keys").unwrap().contents = vec![b'k'; over];
        files.get_mut("/.gitconfig").unwrap().contents = vec![b'g'; over];
    }
    let before = tools.calls().len();
    let warnings = write_guest_files(&tools, &work, plan(Some(git(Some("Ada"), None)), Vec::new())).unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("authorized_keys is 262145 bytes, over the 256 KiB cap"), "{warnings:?}");
    assert!(warnings[1].contains(".gitconfig is 262145 bytes") && warnings[1].contains("not written"), "{warnings:?}");
    let dumped: Vec<String> = tools.calls()[before..]
        .iter()
        .filter_map(|c| match c {
            banger_image::seed::SeedCall::Debugfs(r) => Some(r.script()),
            _ => None,
        })
        .filter(|s| s.contains("dump /.ssh/authorized_keys f0") || s.contains("dump /.gitconfig f1"))
        .collect();
    assert!(dumped.is_empty(), "an oversized guest file was dumped: {dumped:?}");
    let files = tools.files.lock().unwrap();
    assert_eq!(
        files["/.ssh/authorized_keys"].contents,
        format!("ssh-ed25519 KEY {INSTALLATION_KEY_COMMENT}\n").as_bytes()
    );
    assert_eq!(files["/.gitconfig"].contents.len(), over, "the guest's .gitconfig is left as it was");
}
