//! The static guest agent binary (the guest's `/init`), its digest (cached by path, size and
//! modification time, so an unchanged file is hashed once per daemon) and the initramfs that
//! carries it, built once per kernel and agent binary.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use banger_image::initramfs::InitramfsError;
use banger_image::kernel::pull::PulledKernel;

use super::{Artifacts, ArtifactsError};

/// Why the agent binary or the initramfs could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AgentBinaryError {
    /// No static agent binary was found.
    #[error("no static guest agent binary was found; install banger with scripts/install or set BANGER_AGENT to a static banger-agent")]
    NotFound,
    /// It could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs could not be built.
    #[error("cannot build the initramfs")]
    Initramfs(#[source] InitramfsError),
}

/// Digests of files, by path, with the size and modification time they were taken at (a leaf
/// lock: held for one lookup or one insert, never across a read).
#[derive(Default)]
pub struct DigestCache {
    seen: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
}

impl DigestCache {
    /// A digest of the file at `path`, hashed again only when its size or modification time
    /// changed.
    pub fn digest(&self, path: &Path) -> std::io::Result<String> {
        let meta = std::fs::metadata(path)?;
        let (len, modified) = (meta.len(), meta.modified()?);
        let known = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(path).cloned();
        if let Some((_, _, digest)) = known.filter(|(l, m, _)| (*l, *m) == (len, modified)) {
            return Ok(digest);
        }
        let bytes = std::fs::read(path)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        let digest = format!("{:016x}", h.finish());
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.to_owned(), (len, modified, digest.clone()));
        Ok(digest)
    }
}

/// Where the static guest agent is: `$BANGER_AGENT`, beside this executable, in `../lib/banger/`
/// next to it (as `scripts/install` lays it out), or the usual install locations.
pub fn agent_binary() -> Result<PathBuf, AgentBinaryError> {
    if let Some(p) = std::env::var_os("BANGER_AGENT").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    let near_exe = exe_dir.map(|d| [d.join("banger-agent"), d.join("../lib/banger/banger-agent")]);
    near_exe
        .into_iter()
        .flatten()
        .chain(["/usr/local/lib/banger/banger-agent", "/usr/lib/banger/banger-agent"].map(PathBuf::from))
        // A dynamically linked agent (a plain `cargo build` beside a debug bangerd) cannot be
        // the guest's /init: look on.
        .find(|p| p.is_file() && matches!(banger_image::initramfs::elf_interpreter_of(p), Ok(None)))
        .ok_or(AgentBinaryError::NotFound)
}

impl Artifacts {
    /// The agent binary and its digest.
    pub fn agent(&self) -> Result<(PathBuf, String), AgentBinaryError> {
        let agent = agent_binary()?;
        let digest =
            self.digests.digest(&agent).map_err(|source| AgentBinaryError::Read { path: agent.clone(), source })?;
        Ok((agent, digest))
    }

    /// The initramfs for `kernel` with this daemon's agent as `/init`, built once per agent
    /// binary and cached beside the kernel.
    pub async fn initramfs_for(&self, kernel: &PulledKernel) -> Result<PathBuf, ArtifactsError> {
        let (agent, digest) = self.agent()?;
        let out = kernel.dir.join(format!("initramfs-{digest}.cpio.gz"));
        if out.exists() {
            return Ok(out);
        }
        let _guard = self.locks.lock(&format!("initramfs:{}", out.display())).await;
        if out.exists() {
            return Ok(out);
        }
        let (release, modules, target) = (kernel.release.clone(), kernel.modules.clone(), out.clone());
        tokio::task::spawn_blocking(move || {
            banger_image::initramfs::build_guest_initramfs(&agent, &release, &modules, &target)
        })
        .await?
        .map_err(AgentBinaryError::Initramfs)?;
        Ok(out)
    }
}
