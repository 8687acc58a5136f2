//! Workspace errors that need no guest: paths that are not repositories, branches that exist
//! or are checked out, VMs that do not run, and plain requests to the stream endpoints. Each is
//! refused with one line naming the fix, and nothing is made.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{Env, Run};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=T", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn repo(env: &Env) -> PathBuf {
    let top = env.dir.path().join("proj");
    std::fs::create_dir_all(&top).expect("mkdir");
    git(&top, &["init", "-q"]);
    std::fs::write(top.join("a.txt"), "a\n").expect("write");
    git(&top, &["add", "."]);
    git(&top, &["commit", "-qm", "first"]);
    top
}

fn banger_in(env: &Env, dir: &Path, args: &[&str]) -> Run {
    Run::from(env.cmd(args).current_dir(dir).output().expect("run banger"))
}

fn vm_count(env: &Env) -> usize {
    env.banger(&["vm", "list", "--json"]).ok().json()["vms"].as_array().map_or(0, Vec::len)
}

#[test]
fn a_path_that_is_not_a_repository_is_refused_before_anything_is_made() {
    let env = Env::new();
    let plain = env.dir.path().join("plain");
    std::fs::create_dir_all(&plain).expect("mkdir");
    let shown = plain.display().to_string();
    let fix = "is not inside a git repository; pass the path of one, or run `git init` there first";
    env.banger(&["workspace", "prepare", "web", &shown]).fails(1, &format!("{shown} {fix}"));
    banger_in(&env, &plain, &["workspace", "prepare", "web"]).fails(1, fix);
    banger_in(&env, &plain, &["workspace", "export", "web"]).fails(1, fix);
    env.banger(&["vm", "run", "--rm", "--workspace", &shown, "--", "true"]).fails(1, fix);
    banger_in(&env, &plain, &["vm", "run", "--rm", "--workspace", "--", "true"]).fails(1, fix);
    env.banger(&["vm", "create", "web", "--workspace", &shown]).fails(1, fix);
    env.banger(&["workspace", "prepare", "web", "/nonexistent/dir"]).fails(1, "/nonexistent/dir: no such directory");
    assert_eq!(vm_count(&env), 0, "no vm was made");
}

#[test]
fn a_linked_worktree_is_refused_since_its_git_data_lives_elsewhere() {
    let env = Env::new();
    let top = repo(&env);
    git(&top, &["worktree", "add", "-q", "../linked"]);
    let linked = env.dir.path().join("linked");
    banger_in(&env, &linked, &["workspace", "prepare", "web"]).fails(1, "/.git is not a directory");
}

#[test]
fn an_existing_or_checked_out_branch_is_refused_without_asking_the_guest() {
    let env = Env::new();
    let top = repo(&env);
    git(&top, &["branch", "banger/web"]);
    let refs = git(&top, &["for-each-ref"]);
    banger_in(&env, &top, &["workspace", "export", "web"]).fails(
        1,
        &format!(
            "branch 'banger/web' already exists in {}; pass --force to replace it, or pick another name with --branch",
            std::fs::canonicalize(&top).expect("canonical").display()
        ),
    );
    banger_in(&env, &top, &["workspace", "export", "web", "--branch", "main", "--force"])
        .fails(1, "branch 'main' is checked out here and is never changed by an export");
    banger_in(&env, &top, &["workspace", "export", "web", "--branch", "bad..name"])
        .fails(1, "'bad..name' is not a valid branch name");
    banger_in(&env, &top, &["workspace", "export", "web", "--path", "root/x"])
        .fails(1, "guest directory 'root/x' must be an absolute path");
    std::fs::write(top.join("out.patch"), "").expect("patch file");
    banger_in(&env, &top, &["workspace", "export", "web", "--patch", "out.patch"])
        .fails(1, "out.patch already exists; pass --force to replace it");
    // With --force the branch is acceptable; the missing vm is the daemon's answer.
    banger_in(&env, &top, &["workspace", "export", "web", "--force"]).fails(1, "no vm 'web'; see `banger vm list`");
    assert_eq!(git(&top, &["for-each-ref"]), refs, "no ref changed");
}

#[test]
fn a_vm_that_does_not_run_gets_the_start_command() {
    let env = Env::new();
    let top = repo(&env);
    env.banger(&["vm", "create", "web"]).ok();
    let fix = "vm 'web' is not running; start it with `banger vm start web`";
    banger_in(&env, &top, &["workspace", "prepare", "web"]).fails(1, fix);
    banger_in(&env, &top, &["workspace", "export", "web", "--branch", "from-web"]).fails(1, fix);
    banger_in(&env, &top, &["workspace", "export", "web", "--patch", "p.diff"]).fails(1, fix);
    assert!(!top.join("p.diff").exists(), "no patch file was written");
}

#[test]
fn the_stream_endpoints_refuse_plain_requests_and_bad_queries() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    let (code, body) = env.request("POST", "/v1/vms/web/workspace/import?dir=/root/x", "");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("need `Connection: upgrade` and `Upgrade: banger-workspace`"), "{body}");
    let upgrade = |path: &str| {
        env.raw(&format!(
            "POST {path} HTTP/1.1\r\nHost: bangerd\r\nConnection: upgrade, close\r\nUpgrade: banger-workspace\r\nContent-Length: 0\r\n\r\n"
        ))
    };
    let (code, body) = upgrade("/v1/vms/web/workspace/import?dir=root/x");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("must be an absolute path without '.' or '..' components"), "{body}");
    let (code, body) = upgrade("/v1/vms/web/workspace/import?dir=/root/../etc");
    assert_eq!(code, 400, "{body}");
    let (code, body) = upgrade("/v1/vms/web/workspace/export?dir=/root/x&kind=tarball");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid query"), "{body}");
    let (code, body) = upgrade("/v1/vms/web/workspace/export?dir=/root/x&kind=bundle&basis=HEAD");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("basis 'HEAD' is not a full commit id"), "{body}");
    let (code, body) = upgrade("/v1/vms/web/workspace/import?dir=/root/x");
    assert_eq!(code, 409, "{body}");
    let (code, body) = upgrade("/v1/vms/nope/workspace/import?dir=/root/x");
    assert_eq!(code, 404, "{body}");
}
