//! The parts of an OCI runtime spec the shim honours: the process's args, env, cwd, user and
//! terminal, from the bundle's `config.json` (the task) or an exec's process spec. Read with a
//! bound: a spec is containerd's, but the bundle is a directory on disk.

use std::io::Read as _;
use std::path::Path;

use banger_proto::agent::ContainerExec;
use serde::Deserialize;

/// The largest spec read.
const MAX_SPEC: u64 = 4 << 20;

/// Why a spec could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a spec we understand.
    #[error("invalid OCI spec")]
    Parse(#[from] serde_json::Error),
    /// No process, or no args.
    #[error("the OCI spec has no process args to run")]
    NoArgs,
}

#[derive(Debug, Deserialize)]
struct Spec {
    process: Option<Process>,
}

/// An OCI `process`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Process {
    /// Run on a terminal.
    #[serde(default)]
    pub terminal: bool,
    /// The user.
    #[serde(default)]
    pub user: User,
    /// Program and arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// `KEY=value` entries.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: String,
}

/// An OCI `user`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct User {
    /// uid.
    #[serde(default)]
    pub uid: u32,
    /// gid.
    #[serde(default)]
    pub gid: u32,
    /// Supplementary gids.
    #[serde(default, rename = "additionalGids")]
    pub additional_gids: Vec<u32>,
}

impl Process {
    /// The environment as pairs (entries without `=` are dropped).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env.iter().filter_map(|e| e.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    /// The agent's container settings for it.
    pub fn container(&self) -> ContainerExec {
        ContainerExec { uid: self.user.uid, gid: self.user.gid, groups: self.user.additional_gids.clone() }
    }

    /// The working directory, `/` when unset.
    pub fn cwd(&self) -> String {
        if self.cwd.is_empty() {
            "/".into()
        } else {
            self.cwd.clone()
        }
    }
}

/// The task's process, from `<bundle>/config.json`.
pub fn read_bundle(bundle: &Path) -> Result<Process, SpecError> {
    let path = bundle.join("config.json");
    let fail = |source| SpecError::Read { path: path.display().to_string(), source };
    let mut bytes = Vec::new();
    std::fs::File::open(&path).map_err(fail)?.take(MAX_SPEC).read_to_end(&mut bytes).map_err(fail)?;
    let spec: Spec = serde_json::from_slice(&bytes)?;
    checked(spec.process.ok_or(SpecError::NoArgs)?)
}

/// An exec's process spec (JSON, as containerd sends it).
pub fn parse_process(bytes: &[u8]) -> Result<Process, SpecError> {
    checked(serde_json::from_slice(bytes)?)
}

fn checked(p: Process) -> Result<Process, SpecError> {
    if p.args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_spec_gives_the_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = r#"{"ociVersion":"1.0.2","process":{"terminal":true,"user":{"uid":1000,"gid":100,
            "additionalGids":[10]},"args":["sh","-c","exit 7"],"env":["PATH=/bin","X=a=b","junk"],"cwd":""},
            "root":{"path":"rootfs"}}"#;
        std::fs::write(dir.path().join("config.json"), spec).expect("write");
        let p = read_bundle(dir.path()).expect("spec");
        assert!(p.terminal);
        assert_eq!(p.args, ["sh", "-c", "exit 7"]);
        assert_eq!(p.env_pairs(), [("PATH".to_owned(), "/bin".to_owned()), ("X".to_owned(), "a=b".to_owned())]);
        assert_eq!(p.cwd(), "/");
        assert_eq!(p.container(), ContainerExec { uid: 1000, gid: 100, groups: vec![10] });
        assert!(matches!(parse_process(br#"{"args":[]}"#), Err(SpecError::NoArgs)));
    }
}
