//! The parts of an OCI runtime spec the shim honours: the process's args, env, cwd, user and
//! terminal, from the bundle's `config.json` (the task) or an exec's process spec, and the CRI
//! annotations that make a task a pod's sandbox or one of its containers. Read with a bound: a
//! spec is containerd's, but the bundle is a directory on disk.

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
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
    #[serde(default)]
    mounts: Vec<Mount>,
}

/// An OCI mount.
#[derive(Debug, Deserialize)]
struct Mount {
    destination: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    options: Vec<String>,
}

/// The files a container gets from the node as bind mounts (CRI's `/etc/hosts`, for
/// `localhost`, and the others kubelet expects), copied into its root image instead: the
/// guest cannot mount a host file.
pub const NODE_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

/// A task's bundle, as the shim reads it.
#[derive(Debug)]
pub struct Bundle {
    /// Its process.
    pub process: Process,
    /// Its part in a pod.
    pub role: Role,
    /// [`NODE_FILES`] bind-mounted from the host: (destination, host source).
    pub files: Vec<(String, String)>,
}

/// The CRI annotation naming a task's part in a pod.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI annotation naming a pod container's sandbox.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What a task is to the shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A task of its own (`ctr run`): one VM.
    Task,
    /// A pod's sandbox (CRI `container-type: sandbox`): the pod's VM.
    Sandbox,
    /// A container of the pod whose sandbox is this task id: a root attached to that VM.
    PodContainer(String),
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
    /// The guest directory of the root it enters when that is not the VM's own container disk
    /// (a pod container's; set by the shim, never read from the spec).
    #[serde(skip)]
    pub root: Option<String>,
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
        ContainerExec {
            uid: self.user.uid,
            gid: self.user.gid,
            groups: self.user.additional_gids.clone(),
            root: self.root.clone(),
        }
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

fn read_spec(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let fail = |source| SpecError::Read { path: path.display().to_string(), source };
    let mut bytes = Vec::new();
    std::fs::File::open(&path).map_err(fail)?.take(MAX_SPEC).read_to_end(&mut bytes).map_err(fail)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The task's process, role and node files, from `<bundle>/config.json`.
pub fn read_bundle(bundle: &Path) -> Result<Bundle, SpecError> {
    let spec = read_spec(bundle)?;
    let role = role(&spec.annotations);
    let files = spec
        .mounts
        .iter()
        .filter(|m| NODE_FILES.contains(&m.destination.as_str()) && !m.source.is_empty())
        .filter(|m| m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind"))
        .map(|m| (m.destination.clone(), m.source.clone()))
        .collect();
    Ok(Bundle { process: checked(spec.process.ok_or(SpecError::NoArgs)?)?, role, files })
}

/// The task's role alone (the `start` action groups a pod's tasks in one shim by it).
pub fn read_role(bundle: &Path) -> Result<Role, SpecError> {
    Ok(role(&read_spec(bundle)?.annotations))
}

fn role(annotations: &std::collections::HashMap<String, String>) -> Role {
    match (annotations.get(CONTAINER_TYPE).map(String::as_str), annotations.get(SANDBOX_ID)) {
        (Some("sandbox"), _) => Role::Sandbox,
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => Role::PodContainer(sandbox.clone()),
        _ => Role::Task,
    }
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
        let Bundle { process: p, role, files } = read_bundle(dir.path()).expect("spec");
        assert_eq!(role, Role::Task);
        assert!(files.is_empty());
        assert!(p.terminal);
        assert_eq!(p.args, ["sh", "-c", "exit 7"]);
        assert_eq!(p.env_pairs(), [("PATH".to_owned(), "/bin".to_owned()), ("X".to_owned(), "a=b".to_owned())]);
        assert_eq!(p.cwd(), "/");
        assert_eq!(p.container(), ContainerExec { uid: 1000, gid: 100, groups: vec![10], root: None });
        assert!(matches!(parse_process(br#"{"args":[]}"#), Err(SpecError::NoArgs)));
    }

    #[test]
    fn cri_annotations_give_the_tasks_part_in_its_pod() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |annotations: &str| {
            let spec = format!(r#"{{"process":{{"args":["/pause"]}},"annotations":{annotations}}}"#);
            std::fs::write(dir.path().join("config.json"), spec).expect("write");
        };
        write(r#"{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"s1"}"#);
        assert_eq!(read_role(dir.path()).expect("role"), Role::Sandbox);
        write(r#"{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"s1"}"#);
        assert_eq!(read_role(dir.path()).expect("role"), Role::PodContainer("s1".into()));
        write(r#"{"io.kubernetes.cri.container-type":"container"}"#);
        assert_eq!(read_role(dir.path()).expect("role"), Role::Task, "no sandbox named: a task of its own");
        write("{}");
        assert_eq!(read_bundle(dir.path()).expect("spec").role, Role::Task);
        let spec = r#"{"process":{"args":["sh"]},"mounts":[
            {"destination":"/etc/hosts","type":"bind","source":"/s/hosts","options":["rbind","ro"]},
            {"destination":"/etc/resolv.conf","source":"/s/resolv","options":["rbind"]},
            {"destination":"/etc/passwd","type":"bind","source":"/etc/passwd"},
            {"destination":"/etc/hostname","type":"tmpfs","source":"tmpfs"}]}"#;
        std::fs::write(dir.path().join("config.json"), spec).expect("write");
        let files = read_bundle(dir.path()).expect("spec").files;
        let want = [("/etc/hosts", "/s/hosts"), ("/etc/resolv.conf", "/s/resolv")].map(|(a, b)| (a.into(), b.into()));
        assert_eq!(files, want, "only node files, only bind mounts");
    }
}
