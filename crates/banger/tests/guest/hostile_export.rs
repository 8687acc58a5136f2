//! A hostile guest's export (image `debian-bookworm`, which has git): what it hands back is
//! crafted from inside the guest with its own git (a symlink retargeted out of the tree, a
//! tree with a `..` entry, an oversize commit) or by a `git` it replaced (a patch whose path
//! climbs out through C escapes). Each is refused with the reason, and the host repository
//! (refs, HEAD, work tree, every file under `.git/objects`) and the patch file are as before.

use std::path::Path;
use std::process::Command;

use crate::harness::Env;
use crate::template::{env_from, template};
use crate::workspace::Host;

/// Everything an export could change in the host repository: refs, HEAD, the work tree and
/// every path under `.git/objects`.
fn repo_state(host: &Host, top: &Path) -> String {
    let found = Command::new("find").arg(top.join(".git/objects")).output().expect("find");
    let mut objects: Vec<&str> = std::str::from_utf8(&found.stdout).expect("utf-8").lines().collect();
    objects.sort_unstable();
    let refs = host.git(top, &["for-each-ref"]);
    let status = host.git(top, &["status", "--porcelain", "--ignored"]);
    format!("{refs}\n{}\n{status}\n{}", host.git(top, &["rev-parse", "HEAD"]), objects.join("\n"))
}

#[test]
fn a_hostile_guests_export_is_refused_and_the_host_repository_is_unchanged() {
    let Some(t) = template() else { return };
    let env: Env = env_from(t);
    let host = Host::new(&env);
    let repo = env.dir.path().join("proj");
    std::fs::create_dir_all(&repo).expect("mkdir");
    host.git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("tracked.txt"), "one\n").expect("write");
    std::os::unix::fs::symlink("tracked.txt", repo.join("link")).expect("symlink");
    host.git(&repo, &["add", "."]);
    host.git(&repo, &["commit", "-qm", "first"]);
    let basis = host.git(&repo, &["rev-parse", "HEAD"]).trim().to_owned();
    host.run(&env, &repo, &["vm", "create", "hx", "--image", "debian-bookworm", "--no-network", "--workspace"]).ok();
    let exec = |script: &str, args: &[&str]| {
        let mut argv = vec!["vm", "exec", "hx", "-n", "-w", "/root/proj", "--", "sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        host.run(&env, &repo, &argv).ok()
    };
    let before = repo_state(&host, &repo);
    let patch = env.dir.path().join("guest.patch");
    let patch_arg = patch.display().to_string();
    let export_patch = || host.run(&env, &repo, &["workspace", "export", "hx", "--patch", &patch_arg]);

    // 1. The tracked symlink retargeted out of the tree: git's diff says only `index … 120000`.
    exec("ln -sfn /etc/shadow link && git diff | grep -q '^index .* 120000$'", &[]);
    let refused = export_patch().fails(1, "the guest's patch is refused");
    assert!(refused.stderr.contains("points outside (absolute target) (link -> /etc/shadow)"), "{}", refused.stderr);
    assert!(!patch.exists(), "no patch file was written");
    exec("git checkout -q -- link", &[]);

    // 2. A `git` of the guest's own answers the diff with a path that climbs out in C escapes.
    let crafted = "diff --git \"a/\\056\\056/\\056\\056/escaped\" \"b/\\056\\056/\\056\\056/escaped\"\n\
                   new file mode 100644\nindex 0000000..1111111\n--- /dev/null\n\
                   +++ \"b/\\056\\056/\\056\\056/escaped\"\n@@ -0,0 +1 @@\n+evil\n";
    let fake =
        "#!/bin/sh\ncase \" $* \" in *\" diff \"*) cat /tmp/crafted.patch; exit 0;; esac\nexec /usr/bin/git \"$@\"\n";
    exec(
        "printf '%s' \"$1\" > /tmp/crafted.patch && printf '%s' \"$2\" > /usr/local/bin/git && chmod +x /usr/local/bin/git",
        &[crafted, fake],
    );
    let refused = export_patch().fails(1, "the guest's patch is refused");
    assert!(refused.stderr.contains("the path '../../escaped' goes up with '..'"), "{}", refused.stderr);
    assert!(!patch.exists(), "no patch file was written");
    exec("rm /usr/local/bin/git", &[]);

    // 3. A commit whose tree has a `..` entry, made with the guest's git (2.39, whose fetch
    // would not fsck a bundle): its bundle is refused in quarantine.
    exec(
        "b=$(git hash-object -w tracked.txt) && t=$(printf '100644 blob %s\\t..\\n' \"$b\" | git mktree) && \
         c=$(git commit-tree \"$t\" -p HEAD -m evil) && git update-ref HEAD \"$c\" && git --version",
        &[],
    );
    let refused = host.run(&env, &repo, &["workspace", "export", "hx"]).fails(1, "holds objects git refuses");
    assert!(refused.stderr.contains("hasDotdot"), "{}", refused.stderr);
    assert_eq!(repo_state(&host, &repo), before, "the host repository is unchanged");
    exec("git update-ref HEAD \"$1\"", &[&basis]);

    // 4. An export over the cap ends before anything is written; a higher cap lets it through.
    exec("head -c 3145728 /dev/urandom > big.bin && git add big.bin && git commit -qm big", &[]);
    let refused = host.run(&env, &repo, &["workspace", "export", "hx", "--max-size", "1M"]).fails(1, "larger than");
    assert!(
        refused.stderr.contains("is larger than the cap of 1M; nothing was written; raise the cap with `banger workspace export --max-size SIZE`"),
        "{}",
        refused.stderr
    );
    assert_eq!(repo_state(&host, &repo), before, "the host repository is unchanged");
    let exported = host.run(&env, &repo, &["workspace", "export", "hx", "--max-size", "8M"]).ok();
    assert_eq!(exported.stdout.trim(), "banger/hx");
    assert_eq!(host.git(&repo, &["log", "-1", "--format=%s", "banger/hx"]).trim(), "big");

    env.banger(&["vm", "stop", "hx"]).ok();
    env.banger(&["vm", "delete", "hx"]).ok();
}
