//! Workspaces with a real guest (image `debian-bookworm`, which has git): a round trip (import
//! with uncommitted changes, commit in the guest, export as a branch, the host's checkout
//! untouched; a patch of what is left uncommitted), a stop that does not wait for a large
//! import to finish, and a large import attached as a disk (kept across a restart, a snapshot
//! and a fork; a small one still goes by tar).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{wait_until, Env, Run};
use crate::template::{env_from, template};

/// The host user of these tests: a home whose `.gitconfig` names them.
pub(crate) struct Host {
    home: PathBuf,
}

impl Host {
    pub(crate) fn new(env: &Env) -> Self {
        let home = env.dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        std::fs::write(
            home.join(".gitconfig"),
            "[user]\n\tname = Host User\n\temail = host@example.com\n[init]\n\tdefaultBranch = main\n",
        )
        .expect("gitconfig");
        Self { home }
    }

    pub(crate) fn git(&self, dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("HOME", &self.home)
            .env("GIT_CONFIG_GLOBAL", self.home.join(".gitconfig"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `banger args...` as this user, in `dir`.
    pub(crate) fn banger(&self, env: &Env, dir: &Path, args: &[&str]) -> Command {
        let mut c = env.cmd(args);
        c.current_dir(dir).env("HOME", &self.home).env("GIT_CONFIG_GLOBAL", self.home.join(".gitconfig"));
        c
    }

    pub(crate) fn run(&self, env: &Env, dir: &Path, args: &[&str]) -> Run {
        Run::from(self.banger(env, dir, args).output().expect("run banger"))
    }
}

#[test]
fn a_workspace_round_trips_through_the_guest() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let host = Host::new(&env);
    let repo = env.dir.path().join("proj");
    std::fs::create_dir_all(repo.join("src")).expect("mkdir");
    host.git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("README.md"), "# proj\n").expect("write");
    std::fs::write(repo.join("src/main.rs"), "fn main() {}\n").expect("write");
    std::fs::write(repo.join(".gitignore"), "*.log\ntarget/\n").expect("write");
    host.git(&repo, &["add", "."]);
    host.git(&repo, &["commit", "-qm", "first"]);
    // Uncommitted changes: a modified file, an untracked one, a symlink inside; ignored files
    // and a symlink pointing out stay behind.
    std::fs::write(repo.join("README.md"), "# proj\nchanged on the host\n").expect("write");
    std::fs::write(repo.join("notes.txt"), "untracked\n").expect("write");
    std::os::unix::fs::symlink("src/main.rs", repo.join("main-link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", repo.join("out-link")).expect("symlink");
    std::fs::write(repo.join("build.log"), "ignored\n").expect("write");
    std::fs::create_dir_all(repo.join("target")).expect("mkdir");
    std::fs::write(repo.join("target/app"), "ignored\n").expect("write");
    let status_before = host.git(&repo, &["status", "--porcelain"]);
    let head_before = host.git(&repo, &["rev-parse", "HEAD"]);

    // `vm run --workspace`: the command runs in the imported repository.
    let run = host
        .run(
            &env,
            &repo,
            &[
                "vm",
                "run",
                "--rm",
                "--image",
                "debian-bookworm",
                "--no-network",
                "--workspace",
                "--",
                "sh",
                "-c",
                "pwd; git status --porcelain",
            ],
        )
        .ok();
    assert!(run.stdout.starts_with("/root/proj\n"), "{}", run.stdout);
    assert!(run.stdout.contains(" M README.md") && run.stdout.contains("?? notes.txt"), "{}", run.stdout);

    // `vm create --workspace` boots the vm and imports.
    let created = host
        .run(&env, &repo, &["vm", "create", "ws", "--image", "debian-bookworm", "--no-network", "--workspace"])
        .ok();
    assert!(created.stderr.contains("left out out-link"), "{}", created.stderr);
    let exec = |args: &[&str]| {
        let mut argv = vec!["vm", "exec", "ws", "-n", "-w", "/root/proj", "--"];
        argv.extend_from_slice(args);
        host.run(&env, &repo, &argv)
    };
    let guest_status = exec(&["git", "status", "--porcelain"]).ok().stdout;
    for want in [" M README.md", "?? main-link", "?? notes.txt"] {
        assert!(guest_status.contains(want), "{want} in {guest_status}");
    }
    assert!(!guest_status.contains("out-link"), "{guest_status}");
    exec(&["sh", "-c", "test ! -e build.log && test ! -e target && test \"$(cat main-link)\" = 'fn main() {}'"]).ok();
    assert_eq!(exec(&["cat", "README.md"]).ok().stdout, "# proj\nchanged on the host\n");

    // Commit in the guest (its git identity is the host's), export, find it on the new branch.
    exec(&["sh", "-c", "git add -A && git commit -qm 'from the guest'"]).ok();
    let exported = host.run(&env, &repo, &["workspace", "export", "ws"]).ok();
    assert_eq!(exported.stdout.trim(), "banger/ws");
    let log = host.git(&repo, &["log", "-1", "--format=%s|%an <%ae>|%P", "banger/ws"]);
    assert_eq!(log.trim(), format!("from the guest|Host User <host@example.com>|{}", head_before.trim()));
    assert_eq!(host.git(&repo, &["show", "banger/ws:notes.txt"]), "untracked\n");
    assert_eq!(host.git(&repo, &["show", "banger/ws:README.md"]), "# proj\nchanged on the host\n");
    assert_eq!(host.git(&repo, &["status", "--porcelain"]), status_before, "the work tree is untouched");
    assert_eq!(host.git(&repo, &["rev-parse", "HEAD"]), head_before, "HEAD is untouched");
    assert_eq!(host.git(&repo, &["symbolic-ref", "HEAD"]).trim(), "refs/heads/main");
    host.run(&env, &repo, &["workspace", "export", "ws"]).fails(1, "branch 'banger/ws' already exists");

    // Uncommitted guest changes as a patch, which applies to the exported branch.
    exec(&["sh", "-c", "echo more >> README.md && echo fresh > fresh.txt"]).ok();
    let patch = env.dir.path().join("guest.patch");
    let shown = patch.display().to_string();
    host.run(&env, &repo, &["workspace", "export", "ws", "--patch", &shown]).ok();
    let text = std::fs::read_to_string(&patch).expect("patch");
    assert!(text.contains("+more") && text.contains("b/fresh.txt"), "{text}");
    let check = env.dir.path().join("check");
    host.git(&repo, &["worktree", "add", "-q", check.to_str().expect("utf-8"), "banger/ws"]);
    host.git(&check, &["apply", "--check", &shown]);
    assert_eq!(host.git(&repo, &["status", "--porcelain"]), status_before);

    // A hostile guest. Its patch carries a symlink out of the repository: refused, no file.
    exec(&["sh", "-c", "git checkout -q -- . && rm -f fresh.txt && ln -s /etc/shadow leak"]).ok();
    let hostile = env.dir.path().join("hostile.patch");
    let hostile_arg = hostile.display().to_string();
    host.run(&env, &repo, &["workspace", "export", "ws", "--patch", &hostile_arg])
        .fails(1, "the guest's patch is refused");
    assert!(!hostile.exists(), "nothing was written");
    // Its `git` answers the bundle request with a tar whose paths climb out: refused, no
    // branch, no object, and nothing extracted anywhere.
    let fake_git = "mkdir -p /tmp/h/a/b && echo evil > /tmp/h/escaped && cd /tmp/h/a/b && \
                    exec tar -P -cf - ../../escaped";
    let script = format!("#!/bin/sh\nif [ \"$1\" = bundle ]; then {fake_git}; fi\nexec /usr/bin/git \"$@\"\n");
    exec(&[
        "sh",
        "-c",
        &format!("rm leak && printf '%s' '{script}' > /usr/local/bin/git && chmod +x /usr/local/bin/git"),
    ])
    .ok();
    let refs_before = host.git(&repo, &["for-each-ref"]);
    host.run(&env, &repo, &["workspace", "export", "ws", "--branch", "banger/evil"]).fails(1, "is not a git bundle");
    assert_eq!(host.git(&repo, &["for-each-ref"]), refs_before, "no ref was made");
    assert_eq!(host.git(&repo, &["status", "--porcelain"]), status_before);
    for dir in [env.dir.path(), repo.as_path(), std::env::temp_dir().as_path()] {
        assert!(!dir.join("escaped").exists(), "nothing was extracted into {}", dir.display());
    }
    exec(&["rm", "/usr/local/bin/git"]).ok();

    env.banger(&["vm", "stop", "ws"]).ok();
    env.banger(&["vm", "delete", "ws"]).ok();
}

/// Fills `top` with `files` untracked files of `size` bytes of incompressible data.
fn big_tree(top: &Path, files: usize, size: usize) {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut buf = vec![0u8; size];
    for i in 0..files {
        let dir = top.join(format!("d{:03}", i % 200));
        if i < 200 {
            std::fs::create_dir_all(&dir).expect("mkdir");
        }
        for chunk in buf.chunks_mut(8) {
            // xorshift64: cheap bytes that do not compress.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let mut f = std::fs::File::create(dir.join(format!("f{i:05}.bin"))).expect("create");
        f.write_all(&buf).expect("write");
    }
}

#[test]
fn stop_returns_promptly_while_a_large_import_streams() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let host = Host::new(&env);
    let repo = env.dir.path().join("big");
    std::fs::create_dir_all(&repo).expect("mkdir");
    host.git(&repo, &["init", "-q"]);
    big_tree(&repo, 20_000, 10_240);
    env.banger(&["vm", "create", "big", "--image", "minimal", "--no-network", "--disk", "1G"]).ok();
    env.banger(&["vm", "start", "big"]).ok();
    let mut import = host
        .banger(&env, &repo, &["workspace", "prepare", "big", "--by", "tar"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the import");
    // Wait until the guest has a good part of it, then stop the vm mid-stream.
    wait_until("the import to be under way", Duration::from_secs(180), || {
        let du = env.banger(&["vm", "exec", "big", "-n", "--", "sh", "-c", "du -sm /root/big 2>/dev/null | cut -f1"]);
        du.stdout.trim().parse::<u64>().is_ok_and(|mb| mb >= 20)
    });
    let started = Instant::now();
    let stop = env.banger(&["vm", "stop", "big"]);
    let took = started.elapsed();
    stop.ok();
    eprintln!("vm stop during a 200 MB import took {:.2} s", took.as_secs_f64());
    assert!(took < Duration::from_secs(8), "vm stop waited {took:?} behind the import");
    // The import ends at once, with the reason.
    wait_until("the import to end", Duration::from_secs(10), || import.try_wait().ok().flatten().is_some());
    let out = import.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the agent connection was lost (did the vm stop?)"), "{stderr}");
    env.banger(&["vm", "delete", "big"]).ok();
}

/// `sh -c script` in `vm`, in `dir`; its stdout, trimmed.
fn guest_sh(host: &Host, env: &Env, repo: &Path, vm: &str, dir: &str, script: &str) -> String {
    host.run(env, repo, &["vm", "exec", vm, "-n", "-w", dir, "--", "sh", "-c", script]).ok().stdout.trim().to_owned()
}

#[test]
fn a_large_import_is_attached_as_a_disk_and_lives_on_in_restarts_snapshots_and_forks() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let host = Host::new(&env);
    let repo = env.dir.path().join("proj");
    std::fs::create_dir_all(&repo).expect("mkdir");
    host.git(&repo, &["init", "-q"]);
    // 2,500 files: over the disk threshold by count.
    big_tree(&repo, 2_500, 1_024);
    std::os::unix::fs::symlink("d000/f00000.bin", repo.join("inner-link")).expect("symlink");
    host.git(&repo, &["add", "."]);
    host.git(&repo, &["commit", "-qm", "many files"]);
    std::os::unix::fs::symlink("/etc/passwd", repo.join("out-link")).expect("symlink");
    std::fs::write(repo.join("notes.txt"), "untracked\n").expect("write");
    let head = host.git(&repo, &["rev-parse", "HEAD"]).trim().to_owned();
    let tracked = host.git(&repo, &["ls-files"]).lines().count();

    let created = host
        .run(&env, &repo, &["vm", "create", "dk", "--image", "debian-bookworm", "--no-network", "--workspace"])
        .ok();
    assert!(created.stderr.contains("attaching a"), "went in as a disk: {}", created.stderr);
    assert!(created.stderr.contains("left out out-link"), "{}", created.stderr);
    let sh = |vm: &str, script: &str| guest_sh(&host, &env, &repo, vm, "/root/proj", script);
    let check = |vm: &str| {
        let mount = sh(vm, "grep ' /root/proj ' /proc/mounts | cut -d' ' -f1,3");
        assert!(mount.starts_with("/dev/vd") && mount.ends_with(" ext4"), "{vm}: mounted disk: {mount:?}");
        assert_eq!(sh(vm, "git rev-parse HEAD"), head, "{vm}: same HEAD");
        assert_eq!(sh(vm, "git status --porcelain"), "?? notes.txt", "{vm}: same tree");
        assert_eq!(sh(vm, "git ls-files | wc -l"), tracked.to_string(), "{vm}: same file count");
        assert_eq!(sh(vm, "stat -c %u:%g d000/f00000.bin; test ! -e out-link && echo no-out-link"), "0:0\nno-out-link");
    };
    check("dk");

    // A small import into the same VM goes by tar.
    let small = env.dir.path().join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    host.git(&small, &["init", "-q"]);
    std::fs::write(small.join("a.txt"), "a\n").expect("write");
    let prepared = host.run(&env, &small, &["workspace", "prepare", "dk", "--json"]).ok().json();
    assert_eq!(prepared["method"], "tar", "{prepared}");
    assert_eq!(guest_sh(&host, &env, &small, "dk", "/root/small", "cat a.txt"), "a");
    // Ctrl-C while a disk import stages its files: exit 130, and its scratch dir is gone.
    let big = env.dir.path().join("big");
    std::fs::create_dir_all(&big).expect("mkdir");
    host.git(&big, &["init", "-q"]);
    big_tree(&big, 20_000, 1_024);
    let child = host.banger(&env, &big, &["workspace", "prepare", "dk", "--by", "disk"]);
    let mut child = {
        let mut c = child;
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        c.spawn().expect("spawn the import")
    };
    let prefix = format!("banger-workspace-{}-", child.id());
    let scratch = || -> Vec<PathBuf> {
        [PathBuf::from("/dev/shm"), std::env::temp_dir()]
            .iter()
            .filter_map(|base| std::fs::read_dir(base).ok())
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    };
    wait_until("the import's scratch dir", Duration::from_secs(120), || {
        !scratch().is_empty() || child.try_wait().expect("try_wait").is_some()
    });
    assert!(child.try_wait().expect("try_wait").is_none(), "the import ended before it could be interrupted");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "interrupted mid-import: {stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(scratch().is_empty(), "scratch left: {:?}", scratch());

    // A re-import into the attached directory goes by tar too (the directory exists).
    let again = host.run(&env, &repo, &["workspace", "prepare", "dk", "--json"]).ok().json();
    assert_eq!(again["method"], "tar", "{again}");

    // Work in the guest lands on the disk, and comes back by export.
    sh("dk", "echo guest > from-guest.txt && git add from-guest.txt && git commit -qm 'from the guest'");
    let exported = host.run(&env, &repo, &["workspace", "export", "dk"]).ok();
    assert_eq!(exported.stdout.trim(), "banger/dk");
    assert_eq!(host.git(&repo, &["show", "banger/dk:from-guest.txt"]), "guest\n");

    // A snapshot copies the disk; a fork sees the files and gets its own copy.
    env.banger(&["vm", "snapshot", "dk", "--name", "dks"]).ok();
    env.banger(&["vm", "fork", "dks", "--name", "dkf"]).ok();
    sh("dkf", "echo fork-only > fork.txt && sync");
    assert_eq!(sh("dkf", "git log -1 --format=%s"), "from the guest");
    assert_eq!(sh("dk", "test -e fork.txt && echo shared || echo own"), "own", "the fork writes its own copy");

    // A restart mounts the disk again where it was.
    env.banger(&["vm", "stop", "dk"]).ok();
    env.banger(&["vm", "start", "dk"]).ok();
    wait_until("the disk to be mounted again", Duration::from_secs(60), || {
        host.run(&env, &repo, &["vm", "exec", "dk", "-n", "--", "grep", "-q", " /root/proj ", "/proc/mounts"]).code == 0
    });
    assert_eq!(sh("dk", "git log -1 --format=%s"), "from the guest");

    for vm in ["dkf", "dk"] {
        env.banger(&["vm", "stop", vm]).ok();
        env.banger(&["vm", "delete", vm]).ok();
    }
    env.banger(&["snapshot", "delete", "dks"]).ok();
}
