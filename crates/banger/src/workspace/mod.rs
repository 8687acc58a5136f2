//! The host side of workspaces: finding the git repository, building the import's tar stream
//! (`tarball`), checking and fetching what an export brings back (`bring_back` for bundles,
//! `patch` for patches), the streams to and from the daemon (`stream`), and large imports as
//! an attached disk (`disk`). Everything here
//! runs as the calling user, in their repository; git is the system `git`.

pub mod bring_back;
pub mod disk;
pub mod patch;
pub mod stream;
pub mod tarball;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A repository could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The path does not exist or is not a directory.
    #[error("{0}: no such directory")]
    Missing(String),
    /// The path is not inside a work tree.
    #[error("{0} is not inside a git repository; pass the path of one, or run `git init` there first")]
    NotARepo(String),
    /// `.git` is a file or a symlink: its contents live outside the repository.
    #[error(
        "{0}/.git is not a directory (a linked worktree, a submodule or a symlink): its data lives outside the \
         repository; use the main checkout instead"
    )]
    OutsideGitDir(String),
    /// The top-level directory's name cannot name a guest directory.
    #[error("the repository directory {0} has no usable name (it must be valid UTF-8, without newlines)")]
    BadName(String),
    /// `git` could not be run.
    #[error("cannot run git: {0}; install git")]
    NoGit(#[source] std::io::Error),
    /// A git command failed.
    #[error("`git {args}` failed in {dir}: {stderr}")]
    Git {
        /// The arguments.
        args: String,
        /// Where.
        dir: String,
        /// What git said.
        stderr: String,
    },
}

/// A host repository's work tree.
#[derive(Debug, Clone)]
pub struct Repo {
    /// The top-level directory (canonical).
    pub top: PathBuf,
    /// Its last component: the guest directory is `/root/<name>`.
    pub name: String,
}

/// Runs `git -C dir args...` with stdin closed.
fn git_output(dir: &Path, args: &[&OsStr]) -> Result<Output, RepoError> {
    Command::new("git").arg("-C").arg(dir).args(args).stdin(Stdio::null()).output().map_err(RepoError::NoGit)
}

fn shown(args: &[&OsStr]) -> String {
    args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

impl Repo {
    /// The repository `path` is in.
    pub fn discover(path: &Path) -> Result<Self, RepoError> {
        if !path.is_dir() {
            return Err(RepoError::Missing(path.display().to_string()));
        }
        let out = git_output(path, &[OsStr::new("rev-parse"), OsStr::new("--show-toplevel")])?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if stderr.contains("not a git repository") || stderr.contains("must be run in a work tree") {
                return Err(RepoError::NotARepo(path.display().to_string()));
            }
            return Err(RepoError::Git {
                args: "rev-parse --show-toplevel".into(),
                dir: path.display().to_string(),
                stderr,
            });
        }
        let top = String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_owned();
        let top = std::fs::canonicalize(&top).map_err(|_| RepoError::Missing(top.clone()))?;
        let dot_git = std::fs::symlink_metadata(top.join(".git"));
        if !dot_git.is_ok_and(|m| m.is_dir()) {
            return Err(RepoError::OutsideGitDir(top.display().to_string()));
        }
        let name = top
            .file_name()
            .and_then(OsStr::to_str)
            .filter(|n| !n.contains(['\n', '\0']) && banger_proto::workspace::valid_guest_dir(&format!("/root/{n}")))
            .ok_or_else(|| RepoError::BadName(top.display().to_string()))?
            .to_owned();
        Ok(Self { top, name })
    }

    /// Where the import puts it in the guest.
    pub fn guest_dir(&self) -> String {
        format!("/root/{}", self.name)
    }

    /// Runs git in the top-level directory; its stdout on success.
    pub fn git(&self, args: &[&str]) -> Result<Vec<u8>, RepoError> {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        self.git_os(&args)
    }

    /// [`Repo::git`] with arguments that may not be UTF-8.
    pub fn git_os(&self, args: &[&OsStr]) -> Result<Vec<u8>, RepoError> {
        let out = git_output(&self.top, args)?;
        if !out.status.success() {
            return Err(RepoError::Git {
                args: shown(args),
                dir: self.top.display().to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(out.stdout)
    }

    /// Whether a git command succeeds (for queries whose failure means "no").
    fn git_ok(&self, args: &[&str]) -> Result<bool, RepoError> {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        Ok(git_output(&self.top, &args)?.status.success())
    }

    /// One line of output of a git query, or `None` when it fails.
    fn git_line(&self, args: &[&str]) -> Result<Option<String>, RepoError> {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let out = git_output(&self.top, &args)?;
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok((out.status.success() && !line.is_empty()).then_some(line))
    }

    /// The commit `HEAD` names, if there is one.
    pub fn head(&self) -> Result<Option<String>, RepoError> {
        self.git_line(&["rev-parse", "-q", "--verify", "HEAD^{commit}"])
    }

    /// The checked-out branch (`main`), if `HEAD` is on one.
    pub fn current_branch(&self) -> Result<Option<String>, RepoError> {
        Ok(self.git_line(&["symbolic-ref", "-q", "HEAD"])?.map(|r| r.trim_start_matches("refs/heads/").to_owned()))
    }

    /// Whether branch `name` exists.
    pub fn branch_exists(&self, name: &str) -> Result<bool, RepoError> {
        self.git_ok(&["show-ref", "--verify", "--quiet", &format!("refs/heads/{name}")])
    }

    /// Whether `name` is a valid branch name.
    pub fn valid_branch(&self, name: &str) -> Result<bool, RepoError> {
        Ok(!name.starts_with('-') && self.git_ok(&["check-ref-format", "--branch", name])?)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Scratch repositories for the tests of this module's children.

    use std::path::Path;
    use std::process::Command;

    /// `git args...` in `dir` with a fixed identity; panics on failure.
    pub fn git(dir: &Path, args: &[&str]) -> String {
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

    /// A repository at `dir/name` with one commit of `tracked.txt`.
    pub fn repo(dir: &Path, name: &str) -> std::path::PathBuf {
        let top = dir.join(name);
        std::fs::create_dir_all(&top).expect("mkdir");
        git(&top, &["init", "-q"]);
        std::fs::write(top.join("tracked.txt"), "one\n").expect("write");
        git(&top, &["add", "."]);
        git(&top, &["commit", "-qm", "first"]);
        top
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{git, repo};
    use super::*;

    #[test]
    fn a_repository_is_found_from_inside_and_named_by_its_top() {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = repo(dir.path(), "proj");
        std::fs::create_dir(top.join("sub")).expect("sub");
        let found = Repo::discover(&top.join("sub")).expect("found");
        assert_eq!(found.top, std::fs::canonicalize(&top).expect("canonical"));
        assert_eq!(found.name, "proj");
        assert_eq!(found.guest_dir(), "/root/proj");
        assert_eq!(found.current_branch().expect("branch").as_deref(), Some("main"));
        assert_eq!(found.head().expect("head"), Some(git(&top, &["rev-parse", "HEAD"])));
        assert!(found.branch_exists("main").expect("query"));
        assert!(!found.branch_exists("nope").expect("query"));
        assert!(found.valid_branch("banger/web").expect("query"));
        assert!(!found.valid_branch("bad..name").expect("query"));
        assert!(!found.valid_branch("-x").expect("query"));
    }

    #[test]
    fn other_places_get_errors_that_name_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Repo::discover(dir.path()).expect_err("not a repo");
        assert!(matches!(err, RepoError::NotARepo(_)), "{err}");
        assert!(err
            .to_string()
            .ends_with("is not inside a git repository; pass the path of one, or run `git init` there first"));
        let err = Repo::discover(&dir.path().join("missing")).expect_err("missing");
        assert!(err.to_string().ends_with("missing: no such directory"), "{err}");

        let top = repo(dir.path(), "main");
        git(&top, &["worktree", "add", "-q", "../linked"]);
        let err = Repo::discover(&dir.path().join("linked")).expect_err("linked worktree");
        assert!(matches!(err, RepoError::OutsideGitDir(_)), "{err}");
    }
}
