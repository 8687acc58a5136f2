//! `image build --dockerfile` as an operation: buildah's steps become stages, its output is
//! batched into the operation as it comes, and a cancel kills the build (nothing is left in
//! buildah's storage: it lives in the build's staging directory).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_core::error_chain as chain;
use banger_core::{ImageRecord, OperationRecord};
use banger_image::catalog::DockerfileEntry;
use banger_image::dockerfile::{build_dockerfile, BuildEvents, DockerfileBuild, DockerfileError};
use banger_image::host::SystemHost;

use super::{Artifacts, ArtifactsError};
use crate::ops::StageSink;
use crate::services::caller::Caller;

/// The host's CA bundle, handed to catalog Dockerfile builds as the secret `host-ca`.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Output lines are written to the operation at most this often (each write is a store write).
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Stage names longer than this are cut (a `RUN` step's whole script is not a name).
const MAX_STAGE_NAME: usize = 120;

impl Artifacts {
    /// Starts building image `name` from a Dockerfile (only root or the daemon's user: RUN
    /// steps run as root on the host).
    pub fn begin_build_dockerfile(
        self: &Arc<Self>,
        req: banger_proto::BuildImageRequest,
        caller: Caller,
    ) -> Result<OperationRecord, ArtifactsError> {
        if !caller.is_trusted() {
            return Err(ArtifactsError::NotTrusted);
        }
        let (name, Some(spec)) = (req.name.as_str(), req.dockerfile) else {
            return Err(ArtifactsError::Recipe("no Dockerfile given".into()));
        };
        if req.recipe.is_some() {
            return Err(ArtifactsError::Recipe("give a recipe or a Dockerfile, not both".into()));
        }
        let dockerfile = PathBuf::from(&spec.path);
        let context = match &spec.context {
            Some(c) => PathBuf::from(c),
            None => dockerfile.parent().map(PathBuf::from).unwrap_or_default(),
        };
        if !dockerfile.is_absolute() || !context.is_absolute() {
            return Err(ArtifactsError::Recipe("the Dockerfile and context paths must be absolute".into()));
        }
        self.check_image_name(name)?;
        let build = DockerfileBuild {
            name: name.to_owned(),
            dockerfile,
            context,
            build_args: spec.build_args.into_iter().collect(),
            secrets: Vec::new(),
            origin: None,
        };
        let op = self.fleet.ops.begin("image.build", name);
        let snapshot = op.snapshot()?;
        let this = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let sink = op.sink();
            let events = sink.clone();
            let made = this
                .make_image_locked(&sink, &name, false, move |dir, _| {
                    let mut events = OpEvents::new(events);
                    build_dockerfile(&SystemHost::new(), dir, &build, &mut events).map_err(ArtifactsError::Dockerfile)
                })
                .await;
            match made {
                Ok(image) => op.succeed(Some(image.name)),
                Err(ArtifactsError::Dockerfile(DockerfileError::Cancelled)) => op.cancelled(),
                Err(e) => op.fail(chain(&e)),
            }
        });
        Ok(snapshot)
    }
}

impl Artifacts {
    /// Starts building the catalog's Dockerfile image `entry` (`banger image build agent`).
    pub(super) fn begin_catalog_dockerfile(
        self: &Arc<Self>,
        entry: &'static DockerfileEntry,
    ) -> Result<OperationRecord, ArtifactsError> {
        self.check_image_name(entry.name)?;
        let op = self.fleet.ops.begin("image.build", entry.name);
        let snapshot = op.snapshot()?;
        let this = self.clone();
        tokio::spawn(async move {
            match this.make_catalog_dockerfile(&op.sink(), entry, false).await {
                Ok(image) => op.succeed(Some(image.name)),
                Err(ArtifactsError::Dockerfile(DockerfileError::Cancelled)) => op.cancelled(),
                Err(e) => op.fail(chain(&e)),
            }
        });
        Ok(snapshot)
    }

    /// Makes the catalog's Dockerfile image `entry`: its base image and kernel first (built or
    /// pulled when missing), then the Dockerfile with `KERNEL_RELEASE` set, under the name's lock.
    pub(super) async fn make_catalog_dockerfile(
        &self,
        op: &StageSink,
        entry: &'static DockerfileEntry,
        reuse_existing: bool,
    ) -> Result<ImageRecord, ArtifactsError> {
        Box::pin(self.ensure_image(op, entry.base)).await?;
        let kernel = self.ensure_kernel(op, entry.kernel).await?;
        let events = op.clone();
        self.make_image_locked(op, entry.name, reuse_existing, move |dir, _| {
            // The context is the Dockerfile alone, in a scratch dir the start-up sweep knows.
            let context = tempfile::Builder::new()
                .prefix(".staging-context-")
                .tempdir_in(dir)
                .map_err(|source| ArtifactsError::Dir { path: dir.to_owned(), source })?;
            let dockerfile = context.path().join("Dockerfile");
            std::fs::write(&dockerfile, entry.dockerfile)
                .map_err(|source| ArtifactsError::Dir { path: dockerfile.clone(), source })?;
            let build = DockerfileBuild {
                name: entry.name.to_owned(),
                dockerfile,
                context: context.path().to_owned(),
                build_args: vec![("KERNEL_RELEASE".into(), kernel.release.clone())],
                // The host's CA bundle, for fetches through a TLS-inspecting proxy the host
                // trusts; a secret, so it is not left in the image.
                secrets: Path::new(HOST_CA_BUNDLE)
                    .is_file()
                    .then(|| ("host-ca".to_owned(), PathBuf::from(HOST_CA_BUNDLE)))
                    .into_iter()
                    .collect(),
                origin: Some(banger_image::rootfs::ImageSource::Catalog { entry: entry.name.to_owned() }),
            };
            let mut events = OpEvents::new(events);
            build_dockerfile(&SystemHost::new(), dir, &build, &mut events).map_err(ArtifactsError::Dockerfile)
        })
        .await
    }
}

/// A build's events into its operation, output batched.
struct OpEvents {
    sink: StageSink,
    pending: Vec<String>,
    flushed: Instant,
}

impl OpEvents {
    fn new(sink: StageSink) -> Self {
        Self { sink, pending: Vec::new(), flushed: Instant::now() }
    }

    fn flush(&mut self) {
        self.sink.output(&self.pending);
        self.pending.clear();
        self.flushed = Instant::now();
    }
}

impl BuildEvents for OpEvents {
    fn stage(&mut self, name: &str) {
        self.flush();
        let name = match name.char_indices().nth(MAX_STAGE_NAME) {
            Some((cut, _)) => format!("{}…", &name[..cut]),
            None => name.to_owned(),
        };
        self.sink.stage(&name);
    }

    fn output(&mut self, line: &str) {
        self.pending.push(line.to_owned());
        if self.flushed.elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    fn tick(&mut self) {
        if !self.pending.is_empty() {
            self.flush();
        }
    }

    fn cancelled(&self) -> bool {
        self.sink.cancelled()
    }
}

impl Drop for OpEvents {
    fn drop(&mut self) {
        self.flush();
    }
}
