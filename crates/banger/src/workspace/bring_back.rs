//! What an export brings back from the guest, checked before it touches the host repository.
//!
//! A bundle must be a git bundle naming only `HEAD`; `git bundle verify` must accept it; it is
//! fetched into a temporary ref (`refs/banger/incoming/...`, objects checked with
//! `transfer.fsckObjects`), and only then is the branch made from it. The checked-out branch
//! and the work tree are never touched: the branch may not be the checked-out one, and an
//! existing branch is replaced only with `--force`.
//!
//! A patch must be a git diff whose paths stay inside the repository (no absolute paths, no
//! `..`) and whose new symlinks point inside it; only then is it written to its file.

use std::ffi::OsStr;
use std::path::Path;

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
    /// A patch that is not a git diff, or that reaches outside the repository.
    #[error("the guest's patch is refused: {0}; nothing was written")]
    BadPatch(String),
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

/// Checks a bundle's header: a v2 or v3 git bundle whose only ref is `HEAD`, then a pack.
/// Returns the commit `HEAD` names.
pub fn check_bundle_header(bytes: &[u8]) -> Result<String, BringBackError> {
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
    head.ok_or_else(|| BringBackError::BadBundle("it names no HEAD".into()))
}

/// Fetches the bundle at `bundle` into `refs/heads/<branch>` (replacing it with `force`);
/// returns the new branch's commit.
pub fn fetch_bundle(repo: &Repo, bundle: &Path, branch: &str, force: bool) -> Result<String, BringBackError> {
    let read = |source| BringBackError::Read { path: bundle.display().to_string(), source };
    let mut head = vec![0u8; MAX_HEADER + 64];
    let n = read_up_to(bundle, &mut head).map_err(read)?;
    let commit = check_bundle_header(&head[..n])?;
    check_branch(repo, branch, force)?;
    let path = bundle.as_os_str();
    repo.git_os(&[OsStr::new("bundle"), OsStr::new("verify"), OsStr::new("-q"), path]).map_err(|e| match e {
        RepoError::Git { stderr, .. } => BringBackError::Unverified(stderr.lines().last().unwrap_or("").to_owned()),
        e => e.into(),
    })?;
    let temp = format!("refs/banger/incoming/{}-{}", std::process::id(), banger_core::new_id());
    let refspec = format!("HEAD:{temp}");
    let fetched = repo.git_os(&[
        OsStr::new("-c"),
        OsStr::new("transfer.fsckObjects=true"),
        OsStr::new("fetch"),
        OsStr::new("-q"),
        OsStr::new("--no-tags"),
        OsStr::new("--no-write-fetch-head"),
        path,
        OsStr::new(&refspec),
    ]);
    let result = fetched.and_then(|_| {
        let got = String::from_utf8_lossy(&repo.git(&["rev-parse", "--verify", &format!("{temp}^{{commit}}")])?)
            .trim()
            .to_owned();
        let target = format!("refs/heads/{branch}");
        let message = "banger workspace export";
        if force {
            repo.git(&["update-ref", "-m", message, &target, &got])?;
        } else {
            // The empty old value: made only if it still does not exist.
            repo.git(&["update-ref", "-m", message, &target, &got, ""])?;
        }
        Ok(got)
    });
    let _ = repo.git(&["update-ref", "-d", &temp]);
    let got = result?;
    if got != commit {
        return Err(BringBackError::BadBundle(format!("its HEAD {commit} fetched as {got}")));
    }
    Ok(got)
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

/// What a checked patch holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatchSummary {
    /// Files it changes.
    pub files: usize,
}

/// Checks a patch from the guest: empty, or a git diff whose paths stay inside the repository.
pub fn check_patch(patch: &[u8]) -> Result<PatchSummary, BringBackError> {
    let bad = |why: String| BringBackError::BadPatch(why);
    if patch.is_empty() {
        return Ok(PatchSummary::default());
    }
    if !patch.starts_with(b"diff --git ") {
        return Err(bad("it is not a git diff".into()));
    }
    let text = String::from_utf8_lossy(patch);
    let mut summary = PatchSummary::default();
    // Lines left in the current hunk (old side, new side).
    let (mut old_left, mut new_left) = (0u64, 0u64);
    let mut symlink = false;
    let mut new_path = String::new();
    for line in text.split('\n') {
        if old_left > 0 || new_left > 0 {
            match line.as_bytes().first() {
                Some(b' ') => {
                    old_left = old_left.saturating_sub(1);
                    new_left = new_left.saturating_sub(1);
                }
                Some(b'-') => old_left = old_left.saturating_sub(1),
                Some(b'+') => {
                    new_left = new_left.saturating_sub(1);
                    if symlink {
                        let target = &line[1..];
                        if let Some(why) = banger_proto::agent::symlink_escape(Path::new(&new_path), Path::new(target))
                        {
                            return Err(bad(format!("{why} ({new_path} -> {target})")));
                        }
                    }
                }
                Some(b'\\') => {}
                _ => return Err(bad(format!("a hunk of {new_path} ends early"))),
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("diff --git ") {
            summary.files += 1;
            symlink = false;
            check_header_paths(rest, true).map_err(bad)?;
        } else if let Some(rest) = line.strip_prefix("--- ").or_else(|| line.strip_prefix("+++ ")) {
            if rest != "/dev/null" {
                check_header_paths(rest, true).map_err(bad)?;
                if line.starts_with("+++ ") {
                    new_path = unquote(rest).trim_start_matches("b/").to_owned();
                }
            }
        } else if let Some(rest) =
            ["rename from ", "rename to ", "copy from ", "copy to "].iter().find_map(|p| line.strip_prefix(p))
        {
            check_header_paths(rest, false).map_err(bad)?;
        } else if let Some(mode) = line.strip_prefix("new file mode ").or_else(|| line.strip_prefix("new mode ")) {
            symlink = mode.trim() == "120000";
        } else if line.starts_with("@@ ") {
            (old_left, new_left) = hunk_counts(line).ok_or_else(|| bad(format!("bad hunk header '{line}'")))?;
        }
    }
    Ok(summary)
}

/// `@@ -a,b +c,d @@` → (b, d); an omitted count is 1.
fn hunk_counts(line: &str) -> Option<(u64, u64)> {
    let mut words = line.split(' ').skip(1);
    let count = |range: &str| -> Option<u64> {
        match range.split_once(',') {
            Some((_, n)) => n.parse().ok(),
            None => Some(1),
        }
    };
    let old = count(words.next()?.strip_prefix('-')?)?;
    let new = count(words.next()?.strip_prefix('+')?)?;
    Some((old, new))
}

/// Drops the C-style quotes git puts around unusual paths (the escapes inside stay; only
/// `/` and `..` matter here).
fn unquote(text: &str) -> String {
    text.trim_matches('"').to_owned()
}

/// The paths of a header line: no absolute paths, no `..` components; with `prefixed`, each
/// starts with `a/` or `b/`.
fn check_header_paths(rest: &str, prefixed: bool) -> Result<(), String> {
    for word in rest.split(' ').filter(|w| !w.is_empty()) {
        let word = unquote(word);
        if word.split(['/', '\\']).any(|c| c == "..") {
            return Err(format!("the path in '{rest}' goes up with '..'"));
        }
        if word.starts_with('/') {
            return Err(format!("the path in '{rest}' is absolute"));
        }
    }
    let first = unquote(rest.split(' ').next().unwrap_or(""));
    if prefixed && !(first.starts_with("a/") || first.starts_with("b/")) {
        return Err(format!("the path in '{rest}' lacks the a/ or b/ prefix"));
    }
    Ok(())
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
        assert!(matches!(err, BringBackError::Unverified(_) | BringBackError::Git(_)), "{err}");

        assert_eq!(git(&host.top, &["for-each-ref"]), refs_before, "no ref was made");
        // (A failed fetch may leave an empty temporary file of git's; objects and packs are what count.)
        let objects = |text: String| text.lines().filter(|l| !l.contains("garbage")).collect::<Vec<_>>().join("\n");
        assert_eq!(objects(git(&host.top, &["count-objects", "-v"])), objects(objects_before), "no object was added");
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

    #[test]
    fn patches_must_stay_inside_the_repository() {
        let ok = b"diff --git a/src/x.rs b/src/x.rs\nindex 1..2 100644\n--- a/src/x.rs\n+++ b/src/x.rs\n@@ -1,2 +1,2 @@\n \
                   keep\n--- a removed line that looks like a header /etc/passwd ../..\n+added\n\
                   diff --git a/l b/l\nnew file mode 120000\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n+src/x.rs\n\\ No newline at end of file\n";
        assert_eq!(check_patch(ok).expect("fine").files, 2);
        assert_eq!(check_patch(b"").expect("empty").files, 0);
        let cases: [(&[u8], &str); 6] = [
            (b"PK\x03\x04zip", "not a git diff"),
            (b"diff --git a/../../etc/passwd b/../../etc/passwd\n", "goes up"),
            (b"diff --git a/x b/x\n--- a/x\n+++ /etc/x\n", "absolute"),
            (b"diff --git a/x b/y\nrename from x\nrename to ../../y\n", "goes up"),
            (
                b"diff --git a/l b/l\nnew file mode 120000\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n+/etc/shadow\n",
                "points outside",
            ),
            (
                b"diff --git a/d/l b/d/l\nnew file mode 120000\n--- /dev/null\n+++ b/d/l\n@@ -0,0 +1 @@\n+../../x\n",
                "points outside",
            ),
        ];
        for (patch, why) in cases {
            let err = check_patch(patch).expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert!(err.to_string().ends_with("nothing was written"), "{err}");
        }
    }
}
