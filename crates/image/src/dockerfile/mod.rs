//! Root images from Dockerfiles, built without a Docker daemon.
//!
//! Debian's `buildah` builds the Dockerfile as root with its storage in a private directory of
//! the build (under the images directory, removed afterwards whatever happens), each run inside
//! a private mount and PID namespace (`unshare --mount --pid --kill-child`): its overlay mounts
//! are never seen outside, and killing it (cancel, daemon exit) kills every process of the build.
//! `FROM banger/NAME` names a local banger image, handed to buildah from banger's own store as
//! a one-layer OCI layout ([`layout`]); other `FROM`s are buildah's (a registry, `oci:DIR`). The
//! result is pushed as an OCI layout and imported through [`crate::oci`] with all its checks.
//! Stages: `base NAME`, one per Dockerfile step (`STEP 2/6: RUN …`), `export`, then the
//! import's. RUN steps run with `--isolation chroot` on the host, so build only Dockerfiles you
//! trust (the daemon lets only root or its own user start one).

use std::path::{Path, PathBuf};

use crate::catalog::InitMode;
use crate::host::HostTools;
use crate::oci::{self, OciSource, PullImageError};
use crate::rootfs::{self, BuildImageError, BuiltImage, ImageDirError, ImageSource};
use crate::staging::Staging;

mod buildah;
pub mod layout;

pub use buildah::BuildEvents;

/// Prefix of a `FROM` that names a local banger image.
pub const BANGER_PREFIX: &str = "banger/";

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerfileBuild {
    /// The new image's name.
    pub name: String,
    /// The Dockerfile.
    pub dockerfile: PathBuf,
    /// The build context (the Dockerfile's directory when not given).
    pub context: PathBuf,
    /// `--build-arg K=V`, in order.
    pub build_args: Vec<(String, String)>,
    /// Build secrets (`--secret id=ID,src=FILE`): files a `RUN --mount=type=secret,id=ID`
    /// step sees at `/run/secrets/ID`, never stored in the image.
    pub secrets: Vec<(String, PathBuf)>,
    /// What the image's manifest says it came from [default: the Dockerfile's path].
    pub origin: Option<ImageSource>,
}

/// Why a Dockerfile build failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    /// The build was cancelled; nothing was left behind.
    #[error("the build was cancelled")]
    Cancelled,
    /// The Dockerfile cannot be read.
    #[error("cannot read the Dockerfile {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The context is not a directory.
    #[error("the build context {} is not a directory", .0.display())]
    Context(PathBuf),
    /// A build argument is malformed.
    #[error("build argument '{0}' is not KEY=VALUE with KEY of letters, digits and '_'")]
    BuildArg(String),
    /// `FROM banger/NAME` names no local image.
    #[error(
        "FROM {BANGER_PREFIX}{name}: no local image '{name}'; build or pull it first (`banger image build {name}`)"
    )]
    NoBase {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: ImageDirError,
    },
    /// buildah is not installed.
    #[error("buildah is not installed; run scripts/deps (apt-get install buildah)")]
    NoBuildah,
    /// A Dockerfile step failed; `output` is the end of what it printed.
    #[error("{step} failed: {reason}\n{output}")]
    Step {
        /// `STEP 3/5: RUN false`, or the phase before the first step.
        step: String,
        /// buildah's last word (`exit status 1`).
        reason: String,
        /// The step's last lines of output.
        output: String,
    },
    /// A buildah or host command could not run.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command.
        command: String,
        /// What it said.
        detail: String,
    },
    /// The work directory could not be made or written.
    #[error("cannot write {}; check the images directory is writable and has space", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The name is unusable or taken.
    #[error(transparent)]
    Image(#[from] BuildImageError),
    /// Importing the built image failed (the OCI path's checks).
    #[error("cannot import the built image")]
    Import(#[source] Box<PullImageError>),
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DockerfileError {
    let path = path.to_owned();
    move |source| DockerfileError::Io { path, source }
}

/// The banger images a Dockerfile's `FROM` lines name (`FROM [--flag…] banger/NAME [AS x]`), in
/// order, each once. Continuation lines and comments are skipped; other `FROM`s are buildah's.
pub fn banger_bases(dockerfile: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for line in dockerfile.lines() {
        let mut words = line.split_whitespace();
        if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            continue;
        }
        let Some(image) = words.find(|w| !w.starts_with("--")) else { continue };
        if let Some(name) = image.strip_prefix(BANGER_PREFIX) {
            let name = name.strip_suffix(":latest").unwrap_or(name);
            if !name.is_empty() && !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

fn check_build_arg((key, _): &(String, String)) -> Result<(), DockerfileError> {
    let ok = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DockerfileError::BuildArg(key.clone()))
    }
}

/// Builds `build` into `images_dir/<build.name>`. `events` gets the stages, buildah's output
/// line by line, and is asked whether to cancel; a cancelled or failed build leaves nothing in
/// buildah's storage (it is removed with the build's work directory).
pub fn build_dockerfile(
    host: &dyn HostTools,
    images_dir: &Path,
    build: &DockerfileBuild,
    events: &mut dyn BuildEvents,
) -> Result<BuiltImage, DockerfileError> {
    rootfs::check_new_name(images_dir, &build.name)?;
    build.build_args.iter().try_for_each(check_build_arg)?;
    let text = std::fs::read_to_string(&build.dockerfile)
        .map_err(|source| DockerfileError::Read { path: build.dockerfile.clone(), source })?;
    if !build.context.is_dir() {
        return Err(DockerfileError::Context(build.context.clone()));
    }
    let bases = banger_bases(&text);
    let mut init = InitMode::Fast;
    let mut base_files = Vec::new();
    for (index, name) in bases.iter().enumerate() {
        let base = rootfs::open_image(images_dir, name)
            .map_err(|source| DockerfileError::NoBase { name: name.clone(), source })?;
        if index == 0 {
            init = base.manifest.init;
        }
        base_files.push((name.clone(), base.path));
    }

    let work = Staging::new(images_dir).map_err(io_error(images_dir))?;
    let storage = buildah::Storage::new(work.path())?;
    for (name, file) in &base_files {
        check_cancel(events)?;
        events.stage(&format!("base {name}"));
        let dir = work.path().join(format!("base-{name}"));
        layout::export_ext4(file, &dir, &work.path().join("mnt"))?;
        storage.load_base(&dir, &format!("{BANGER_PREFIX}{name}"), events)?;
        std::fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
    }
    check_cancel(events)?;
    let tag = "localhost/banger-build:latest";
    storage.build(build, tag, events)?;
    check_cancel(events)?;
    events.stage("export");
    let out = work.path().join("out");
    storage.push(tag, &out, events)?;
    // buildah's storage is not needed any more: free it before the image is made.
    storage.remove()?;
    check_cancel(events)?;
    let source = OciSource::Layout { path: out, tag: Some("latest".into()) };
    let origin =
        build.origin.clone().unwrap_or(ImageSource::Dockerfile { path: build.dockerfile.display().to_string() });
    oci::import_image(host, images_dir, &build.name, &source, Some(origin), init, &mut |s| events.stage(s))
        .map_err(|e| DockerfileError::Import(Box::new(e)))
}

fn check_cancel(events: &dyn BuildEvents) -> Result<(), DockerfileError> {
    if events.cancelled() {
        return Err(DockerfileError::Cancelled);
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;

    #[test]
    fn from_lines_name_banger_bases_once() {
        let text = "# FROM banger/commented\nFROM banger/debian-bookworm AS base\nRUN true\n\
                    from --platform=linux/amd64 banger/minimal:latest\nFROM docker.io/library/debian:12\n\
                    FROM banger/debian-bookworm\nFROM base\n";
        assert_eq!(banger_bases(text), vec!["debian-bookworm".to_owned(), "minimal".to_owned()]);
    }

    #[test]
    fn build_args_must_be_plain_names() {
        assert!(check_build_arg(&("GREETING_1".into(), "a b".into())).is_ok());
        for bad in ["", "A-B", "A B", "A=B"] {
            assert!(matches!(check_build_arg(&(bad.into(), "v".into())), Err(DockerfileError::BuildArg(_))), "{bad}");
        }
    }

    #[test]
    fn a_missing_base_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let dockerfile = dir.path().join("Dockerfile");
        std::fs::write(&dockerfile, "FROM banger/nope\n").unwrap();
        let build = DockerfileBuild {
            name: "x".into(),
            dockerfile,
            context: dir.path().to_owned(),
            build_args: Vec::new(),
            secrets: Vec::new(),
            origin: None,
        };
        let mut events = buildah::tests::Recorded::default();
        let err = build_dockerfile(&crate::host::FakeHost::new(), &dir.path().join("images"), &build, &mut events)
            .unwrap_err();
        assert!(err.to_string().contains("banger image build nope"), "{err}");
        assert!(events.stages.is_empty());
    }
}
