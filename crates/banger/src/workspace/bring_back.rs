//! What an export brings back from the guest, checked before it touches the host repository.
//!
//! A bundle must be a git bundle naming only `HEAD`, and `git bundle verify` must accept it.
//! Its pack is then indexed in a quarantine: a temporary object directory inside the
//! repository's `objects/` (`tmp_objdir-banger-*`, the way `receive-pack` quarantines a push),
//! with the repository's own objects as an alternate, by `git index-pack --strict
//! --fsck-objects`, which checks every object (and, strict, that everything they name exists)
//! on every git version banger supports. (`fetch` with `transfer.fsckObjects` is no such
//! check: git before 2.46 ignores it for bundles.) Only when the pack passes and `HEAD` is
//! connected are its files moved into `objects/pack/` and the branch made. The checked-out
//! branch and the work tree are never touched: the branch may not be the checked-out one, and
//! an existing branch is replaced only with `--force`. On any refusal the quarantine goes and
//! the repository is as it was.

use std::ffi::OsStr;
use std::io::{Seek as _, SeekFrom};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{Repo, RepoError};

/// Longest bundle header read (refs and prerequisites) before the pack.
const MAX_HEADER: usize = 1024 * 1024;

/// What came back cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BringBackError {
    /// Not a git bundle at all.
    #[error("what the guest sent is not a git bundle (it starts with {0:?}); nothing was fetched")]
    NotABundle(String),
    /// A bundle whose header is not what was asked for.
    #[error("the guest's bundle is refused: {0}; nothing was fetched")]
    BadBundle(String),
    /// `git bundle verify` refused it (e.g. it builds on commits the host lacks).
    #[error("the guest's bundle does not fit this repository: {0}; nothing was fetched")]
    Unverified(String),
    /// The branch exists and `--force` was not given.
    #[error(
        "branch '{branch}' already exists in {top}; pass --force to replace it, or pick another name with --branch"
    )]
    BranchExists {
        /// The branch.
        branch: String,
        /// The repository.
        top: String,
    },
    /// The branch is the checked-out one.
    #[error("branch '{0}' is checked out here and is never changed by an export; pick another name with --branch")]
    CheckedOut(String),
    /// Not a valid branch name.
    #[error("'{0}' is not a valid branch name; see `git check-ref-format --branch`")]
    BadBranch(String),
    /// `git index-pack --strict --fsck-objects` refused the bundle's pack, or `HEAD` is not
    /// connected.
    #[error("the guest's bundle holds objects git refuses: {0}; nothing was fetched")]
    BadObjects(String),
    /// The quarantine could not be made, or its pack not moved into the repository.
    #[error("cannot {what} {path}")]
    Quarantine {
        /// The step.
        what: &'static str,
        /// The file or directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Git failed.
    #[error(transparent)]
    Git(#[from] RepoError),
    /// Reading the bundle failed.
    #[error("cannot read the bundle {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `branch` may be made from an export: valid, not checked out, and new unless
/// `force`.
pub fn check_branch(repo: &Repo, branch: &str, force: bool) -> Result<(), BringBackError> {
    if !repo.valid_branch(branch)? {
        return Err(BringBackError::BadBranch(branch.to_owned()));
    }
    if repo.current_branch()?.as_deref() == Some(branch) {
        return Err(BringBackError::CheckedOut(branch.to_owned()));
    }
    if !force && repo.branch_exists(branch)? {
        return Err(BringBackError::BranchExists { branch: branch.to_owned(), top: repo.top.display().to_string() });
    }
    Ok(())
}

/// A checked bundle header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleHeader {
    /// The commit `HEAD` names.
    pub head: String,
    /// Where the pack starts in the bundle.
    pub pack_offset: u64,
}

/// Checks a bundle's header: a v2 or v3 git bundle whose only ref is `HEAD`, then a pack.
pub fn check_bundle_header(bytes: &[u8]) -> Result<BundleHeader, BringBackError> {
    let start = String::from_utf8_lossy(&bytes[..bytes.len().min(24)]).into_owned();
    let Some(rest) = bytes.strip_prefix(b"# v2 git bundle\n").or_else(|| bytes.strip_prefix(b"# v3 git bundle\n"))
    else {
        return Err(BringBackError::NotABundle(start));
    };
    let end = rest
        .windows(2)
        .take(MAX_HEADER)
        .position(|w| w == b"\n\n")
        .ok_or_else(|| BringBackError::BadBundle("its header does not end".into()))?;
    let header =
        std::str::from_utf8(&rest[..end]).map_err(|_| BringBackError::BadBundle("its header is not text".into()))?;
    if !rest[end + 2..].starts_with(b"PACK") {
        return Err(BringBackError::BadBundle("no pack follows its header".into()));
    }
    let mut head = None;
    for line in header.lines() {
        if let Some(capability) = line.strip_prefix('@') {
            if !capability.starts_with("object-format=") {
                return Err(BringBackError::BadBundle(format!("unexpected capability '{capability}'")));
            }
            continue;
        }
        if let Some(prerequisite) = line.strip_prefix('-') {
            let oid = prerequisite.split(' ').next().unwrap_or("");
            if !banger_proto::workspace::valid_commit_id(oid) {
                return Err(BringBackError::BadBundle(format!("bad prerequisite line '{line}'")));
            }
            continue;
        }
        match line.split_once(' ') {
            Some((oid, "HEAD")) if banger_proto::workspace::valid_commit_id(oid) && head.is_none() => {
                head = Some(oid.to_owned());
            }
            _ => {
                return Err(BringBackError::BadBundle(format!(
                    "unexpected ref line '{line}' (only HEAD was asked for)"
                )))
            }
        }
    }
    let head = head.ok_or_else(|| BringBackError::BadBundle("it names no HEAD".into()))?;
    let pack_offset = (bytes.len() - rest.len() + end + 2) as u64;
    Ok(BundleHeader { head, pack_offset })
}

/// Fetches the bundle at `bundle` into `refs/heads/<branch>` (replacing it with `force`)
/// through the quarantine of the module docs; returns the new branch's commit.
pub fn fetch_bundle(repo: &Repo, bundle: &Path, branch: &str, force: bool) -> Result<String, BringBackError> {
    let read = |source| BringBackError::Read { path: bundle.display().to_string(), source };
    let mut head = vec![0u8; MAX_HEADER + 64];
    let n = read_up_to(bundle, &mut head).map_err(read)?;
    let header = check_bundle_header(&head[..n])?;
    check_branch(repo, branch, force)?;
    repo.git_os(&[OsStr::new("bundle"), OsStr::new("verify"), OsStr::new("-q"), bundle.as_os_str()]).map_err(|e| {
        match e {
            RepoError::Git { stderr, .. } => BringBackError::Unverified(stderr.lines().last().unwrap_or("").to_owned()),
            e => e.into(),
        }
    })?;
    let objects = object_dir(repo)?;
    let quarantine = Quarantine::new(&objects)?;
    let mut pack = std::fs::File::open(bundle).map_err(read)?;
    pack.seek(SeekFrom::Start(header.pack_offset)).map_err(read)?;
    quarantine.index_pack(repo, pack)?;
    quarantine.check_connected(repo, &header.head)?;
    quarantine.migrate(&objects)?;
    drop(quarantine);
    let target = format!("refs/heads/{branch}");
    let message = "banger workspace export";
    if force {
        repo.git(&["update-ref", "-m", message, &target, &header.head])?;
    } else {
        // The empty old value: made only if it still does not exist.
        repo.git(&["update-ref", "-m", message, &target, &header.head, ""])?;
    }
    Ok(header.head)
}

/// The repository's object directory (absolute).
fn object_dir(repo: &Repo) -> Result<PathBuf, BringBackError> {
    let out = repo.git(&["rev-parse", "--git-path", "objects"])?;
    let path = PathBuf::from(OsStr::from_bytes(out.strip_suffix(b"\n").unwrap_or(&out)));
    Ok(repo.top.join(path))
}

/// A temporary object directory inside the repository's: removed on drop, so a refused bundle
/// leaves nothing behind.
struct Quarantine {
    dir: tempfile::TempDir,
    alternate: PathBuf,
}

impl Quarantine {
    fn new(objects: &Path) -> Result<Self, BringBackError> {
        // `tmp_objdir-` is the prefix git's own quarantine uses; `git gc` removes stale ones.
        let dir = tempfile::Builder::new()
            .prefix("tmp_objdir-banger-")
            .tempdir_in(objects)
            .map_err(failed("make a quarantine in", objects))?;
        std::fs::create_dir(dir.path().join("pack")).map_err(failed("make", &dir.path().join("pack")))?;
        Ok(Self { dir, alternate: objects.to_owned() })
    }

    /// git in `repo` with the quarantine as its object directory and the repository's objects
    /// as an alternate: reads see both, writes land in the quarantine.
    fn git(&self, repo: &Repo, args: &[&str]) -> Command {
        let mut c = Command::new("git");
        c.arg("-C")
            .arg(&repo.top)
            .args(args)
            .env("GIT_OBJECT_DIRECTORY", self.dir.path())
            .env("GIT_ALTERNATE_OBJECT_DIRECTORIES", &self.alternate)
            .env("GIT_QUARANTINE_PATH", self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// Indexes `pack` (a thin pack: its bases may be the repository's) into the quarantine,
    /// checking every object.
    fn index_pack(&self, repo: &Repo, pack: std::fs::File) -> Result<(), BringBackError> {
        let args = ["index-pack", "--stdin", "--fix-thin", "--strict", "--fsck-objects"];
        let out = self.git(repo, &args).stdin(pack).output().map_err(RepoError::NoGit)?;
        if out.status.success() {
            return Ok(());
        }
        Err(BringBackError::BadObjects(git_said(&out.stderr)))
    }

    /// Every object reachable from `head` and not from the repository's refs is there.
    fn check_connected(&self, repo: &Repo, head: &str) -> Result<(), BringBackError> {
        let out = self
            .git(repo, &["rev-list", "--objects", head, "--not", "--all"])
            .stdin(Stdio::null())
            .output()
            .map_err(RepoError::NoGit)?;
        if out.status.success() {
            return Ok(());
        }
        Err(BringBackError::BadObjects(format!("its HEAD {head} is not whole: {}", git_said(&out.stderr))))
    }

    /// Moves the checked pack into `objects/pack/`, its index last (git sees a pack once its
    /// index is there).
    fn migrate(&self, objects: &Path) -> Result<(), BringBackError> {
        let from = self.dir.path().join("pack");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&from)
            .map_err(failed("list", &from))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(failed("list", &from))?;
        files.sort_by_key(|f| f.extension().is_some_and(|e| e == "idx"));
        for file in files {
            let Some(name) = file.file_name() else { continue };
            let to = objects.join("pack").join(name);
            // The same pack already there (same name, same contents): keep it.
            if to.symlink_metadata().is_ok() {
                continue;
            }
            std::fs::rename(&file, &to).map_err(failed("move the checked pack to", &to))?;
        }
        Ok(())
    }
}

/// The error of quarantine step `what` on `path`.
fn failed(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BringBackError {
    let path = path.display().to_string();
    move |source| BringBackError::Quarantine { what, path, source }
}

/// The last lines git wrote to stderr, on one line.
fn git_said(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join("; ")
}

fn read_up_to(path: &Path, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            got => n += got,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{git, repo};
    use super::*;

    fn bundle_of(top: &Path, range: &[&str], out: &Path) {
        let mut args = vec!["bundle", "create", out.to_str().expect("utf-8")];
        args.extend_from_slice(range);
        git(top, &args);
    }

    /// A host repository and a guest clone of it with one new commit; the bundle of that commit.
    fn host_and_guest(dir: &Path) -> (Repo, std::path::PathBuf, String) {
        let host = repo(dir, "host");
        let guest = dir.join("guest");
        git(dir, &["clone", "-q", host.to_str().expect("utf-8"), "guest"]);
        std::fs::write(guest.join("tracked.txt"), "two\n").expect("write");
        git(&guest, &["commit", "-qam", "from the guest"]);
        let basis = git(&host, &["rev-parse", "HEAD"]);
        let bundle = dir.join("b.bundle");
        bundle_of(&guest, &["HEAD", &format!("^{basis}")], &bundle);
        (Repo::discover(&host).expect("repo"), bundle, git(&guest, &["rev-parse", "HEAD"]))
    }

    #[test]
    fn a_bundle_becomes_a_branch_without_touching_the_checkout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (host, bundle, guest_head) = host_and_guest(dir.path());
        std::fs::write(host.top.join("tracked.txt"), "dirty\n").expect("dirty");
        let status = git(&host.top, &["status", "--porcelain"]);
        let head = git(&host.top, &["rev-parse", "HEAD"]);
        let got = fetch_bundle(&host, &bundle, "banger/web", false).expect("fetch");
        assert_eq!(got, guest_head);
        assert_eq!(git(&host.top, &["rev-parse", "banger/web"]), guest_head);
        assert_eq!(git(&host.top, &["log", "-1", "--format=%s", "banger/web"]), "from the guest");
        assert_eq!(git(&host.top, &["status", "--porcelain"]), status, "the work tree is untouched");
        assert_eq!(git(&host.top, &["rev-parse", "HEAD"]), head);
        assert_eq!(git(&host.top, &["symbolic-ref", "HEAD"]), "refs/heads/main");
        assert_eq!(git(&host.top, &["for-each-ref", "refs/banger/"]), "", "no temporary ref left");

        let err = fetch_bundle(&host, &bundle, "banger/web", false).expect_err("exists");
        assert!(matches!(err, BringBackError::BranchExists { .. }), "{err}");
        assert!(err.to_string().contains("pass --force to replace it"), "{err}");
        fetch_bundle(&host, &bundle, "banger/web", true).expect("forced");
        let err = fetch_bundle(&host, &bundle, "main", true).expect_err("checked out");
        assert!(matches!(err, BringBackError::CheckedOut(_)), "{err}");
        let err = fetch_bundle(&host, &bundle, "bad..name", false).expect_err("bad name");
        assert!(matches!(err, BringBackError::BadBranch(_)), "{err}");
    }

    #[test]
    fn hostile_streams_are_refused_before_anything_is_fetched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (host, bundle, _) = host_and_guest(dir.path());
        let refs_before = git(&host.top, &["for-each-ref"]);
        let objects_before = git(&host.top, &["count-objects", "-v"]);

        // A tar with `../` paths instead of a bundle.
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..13].copy_from_slice(b"../../escaped");
        h.set_size(4);
        h.set_cksum();
        tar.append(&h, &b"evil"[..]).expect("append");
        let hostile = dir.path().join("hostile");
        std::fs::write(&hostile, tar.into_inner().expect("tar")).expect("write");
        let err = fetch_bundle(&host, &hostile, "banger/web", false).expect_err("a tar");
        assert!(matches!(err, BringBackError::NotABundle(_)), "{err}");
        assert!(err.to_string().contains("is not a git bundle"), "{err}");

        // A bundle with more refs than asked for.
        let guest = dir.path().join("guest");
        let extra = dir.path().join("extra.bundle");
        bundle_of(&guest, &["--all"], &extra);
        let err = fetch_bundle(&host, &extra, "banger/web", false).expect_err("extra refs");
        assert!(err.to_string().contains("only HEAD was asked for"), "{err}");

        // A bundle header followed by garbage.
        let mut forged = std::fs::read(&bundle).expect("read");
        let at = forged.windows(4).position(|w| w == b"PACK").expect("pack");
        forged.truncate(at);
        forged.extend_from_slice(b"PACKgarbage");
        let forged_path = dir.path().join("forged.bundle");
        std::fs::write(&forged_path, &forged).expect("write");
        let err = fetch_bundle(&host, &forged_path, "banger/web", false).expect_err("garbage pack");
        assert!(matches!(err, BringBackError::Unverified(_) | BringBackError::BadObjects(_)), "{err}");

        assert_eq!(git(&host.top, &["for-each-ref"]), refs_before, "no ref was made");
        assert_eq!(git(&host.top, &["count-objects", "-v"]), objects_before, "no object was added");
        assert!(!dir.path().join("escaped").exists() && !dir.path().parent().expect("parent").join("escaped").exists());
    }

    #[test]
    fn a_bundle_built_on_commits_the_host_lacks_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, bundle, _) = host_and_guest(dir.path());
        let other = repo(dir.path(), "other");
        // Its history shares no commit with the guest's bundle: a fresh root, the old one pruned.
        git(&other, &["checkout", "-q", "--orphan", "fresh"]);
        git(&other, &["commit", "-qm", "fresh root"]);
        git(&other, &["branch", "-q", "-D", "main"]);
        git(&other, &["reflog", "expire", "--expire=now", "--all"]);
        git(&other, &["gc", "-q", "--prune=now"]);
        let other = Repo::discover(&other).expect("other");
        let err = fetch_bundle(&other, &bundle, "banger/web", false).expect_err("unrelated");
        assert!(matches!(err, BringBackError::Unverified(_)), "{err}");
        assert!(err.to_string().contains("nothing was fetched"), "{err}");
    }

    /// Everything an export could change in `top`: refs, HEAD, the work tree, and every file
    /// under `.git/objects` (packs, loose objects, temporary directories).
    fn repo_state(top: &Path) -> String {
        fn files(dir: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).expect("ls") {
                let path = entry.expect("entry").path();
                out.push(path.display().to_string());
                if path.is_dir() {
                    files(&path, out);
                }
            }
        }
        let mut objects = Vec::new();
        files(&top.join(".git/objects"), &mut objects);
        objects.sort();
        let refs = git(top, &["for-each-ref"]);
        let status = git(top, &["status", "--porcelain", "--ignored"]);
        format!("{refs}\n{}\n{status}\n{}", git(top, &["rev-parse", "HEAD"]), objects.join("\n"))
    }

    /// A bundle by hand: a header naming `head` as HEAD (with `basis` as prerequisite), and a
    /// pack of exactly `objects` from `repo`.
    fn crafted_bundle(repo: &Path, head: &str, basis: &str, objects: &[&str], out: &Path) {
        use std::io::Write as _;
        let mut child = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["pack-objects", "--stdout"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("pack-objects");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(format!("{}\n", objects.join("\n")).as_bytes()).expect("ids");
        drop(stdin);
        let pack = child.wait_with_output().expect("pack");
        assert!(pack.status.success());
        let mut bundle = format!("# v2 git bundle\n-{basis} base\n{head} HEAD\n\n").into_bytes();
        bundle.extend_from_slice(&pack.stdout);
        std::fs::write(out, bundle).expect("write");
    }

    /// `git hash-object -w --literally` of `data` as a `kind` object in `repo`.
    fn literally(repo: &Path, kind: &str, data: &[u8]) -> String {
        let file = repo.join(".literal");
        std::fs::write(&file, data).expect("write");
        let id = git(repo, &["hash-object", "-w", "--literally", "-t", kind, file.to_str().expect("utf-8")]);
        std::fs::remove_file(file).expect("rm");
        id
    }

    #[test]
    fn bad_objects_are_refused_in_quarantine_and_nothing_lands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (host, good, _) = host_and_guest(dir.path());
        let guest = dir.path().join("guest");
        let basis = git(&host.top, &["rev-parse", "HEAD"]);
        let blob = git(&guest, &["rev-parse", "HEAD:tracked.txt"]);
        let hex = |id: &str| {
            (0..id.len()).step_by(2).map(|i| u8::from_str_radix(&id[i..i + 2], 16).expect("hex")).collect::<Vec<u8>>()
        };
        let tree_with = |name: &str| {
            let mut tree = format!("100644 {name}\0").into_bytes();
            tree.extend_from_slice(&hex(&blob));
            literally(&guest, "tree", &tree)
        };
        let commit_of = |tree: &str| {
            let text = format!(
                "tree {tree}\nparent {basis}\nauthor G <g@example.com> 1700000000 +0000\n\
                 committer G <g@example.com> 1700000000 +0000\n\nfrom a hostile guest\n"
            );
            literally(&guest, "commit", text.as_bytes())
        };
        let mut cases: Vec<(String, Vec<String>, &str)> = Vec::new();
        // A tree with a `..` entry, and one with `.git` (both pass `git bundle create`).
        for (name, why) in [("..", "hasDotdot"), (".git", "hasDotgit")] {
            let tree = tree_with(name);
            let commit = commit_of(&tree);
            cases.push((commit.clone(), vec![commit, tree, blob.clone()], why));
        }
        // A commit without an author.
        let tree = git(&guest, &["rev-parse", "HEAD^{tree}"]);
        let bad = literally(&guest, "commit", format!("tree {tree}\nparent {basis}\n\nno author\n").as_bytes());
        cases.push((bad.clone(), vec![bad, tree.clone(), blob.clone()], "missingAuthor"));
        // A commit whose tree is not in the pack (nor on the host): a broken link.
        let commit = commit_of(&tree_with("other"));
        cases.push((commit.clone(), vec![commit], "did not receive expected object"));
        let before = repo_state(&host.top);
        for (n, (head, objects, why)) in cases.iter().enumerate() {
            let bundle = dir.path().join(format!("bad-{n}.bundle"));
            let objects: Vec<&str> = objects.iter().map(String::as_str).collect();
            crafted_bundle(&guest, head, &basis, &objects, &bundle);
            let err = fetch_bundle(&host, &bundle, "banger/web", false).expect_err(why);
            assert!(matches!(err, BringBackError::BadObjects(_)), "{why}: {err}");
            let message = err.to_string();
            assert!(message.contains(why) && message.ends_with("nothing was fetched"), "{why}: {message}");
            assert_eq!(repo_state(&host.top), before, "{why}: the host repository changed");
        }
        // The good bundle still goes through, and only then does the pack land.
        let commit = fetch_bundle(&host, &good, "banger/web", false).expect("good");
        assert_eq!(git(&host.top, &["rev-parse", "banger/web"]), commit);
        git(&host.top, &["fsck", "--strict", "--no-dangling"]);
        assert_ne!(repo_state(&host.top), before);
    }
}
