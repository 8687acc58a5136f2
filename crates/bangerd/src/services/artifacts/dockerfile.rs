//! `image build --dockerfile` as an operation: buildah's steps become stages, its output is
//! batched into the operation as it comes, and a cancel kills the build (nothing is left in
//! buildah's storage: it lives in the build's staging directory).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_core::error_chain as chain;
use banger_core::OperationRecord;
use banger_image::dockerfile::{build_dockerfile, BuildEvents, DockerfileBuild, DockerfileError};
use banger_image::host::SystemHost;

use super::{Artifacts, ArtifactsError};
use crate::ops::StageSink;
use crate::services::caller::Caller;

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
