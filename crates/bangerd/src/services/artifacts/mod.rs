//! Kernels and images: pulling and building them as operations, auto-pulling on first use, and
//! deleting them; a VM's disks ([`disks`]); and the guest agent binary with the initramfs that
//! carries it ([`agent`]). The slow part (apt, mmdebstrap, extraction) runs on a blocking thread
//! under a per-name lock only, so different artifacts build in parallel and one name is never
//! built twice at once; the store row is inserted after the files are published.

pub mod agent;
pub mod disks;
mod dockerfile;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_core::error_chain as chain;
use banger_core::{ImageRecord, KernelRecord, OperationRecord};
use banger_image::catalog::{self, CatalogError};
use banger_image::host::SystemHost;
use banger_image::kernel::pull::{
    open_kernel, pull_kernel, KernelDirError, KernelPull, KernelSource, PullKernelError, PulledKernel,
};
use banger_image::rootfs::{
    build_image, open_image, BuildImageError, BuiltImage, ImageBuild, ImageDirError, ImageSource,
};
use banger_proto::{BuildImageRequest, ImageRecipe, PullImageRequest, PullKernelRequest, RegisterImageRequest};
use banger_store::{Pending, StoreError, Table};

use crate::locks::{NamedLocks, VmGuard};
use crate::ops::StageSink;
use crate::services::caller::{Caller, CallerError};
use crate::services::Fleet;

/// Why a kernel or image could not be pulled, built, found or deleted.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactsError {
    /// The caller may not do this (see `services::caller`).
    #[error(transparent)]
    Caller(#[from] CallerError),
    /// The operation registry.
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    /// The store failed, or has no such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A name that cannot be a kernel or image name.
    #[error("invalid {what} name")]
    InvalidName {
        /// "kernel" or "image".
        what: &'static str,
        /// Why.
        #[source]
        source: banger_core::NameError,
    },
    /// The name is taken.
    #[error("{what} '{name}' already exists; delete it first with `banger {what} delete {name}`")]
    Exists {
        /// "kernel" or "image".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// Another operation published the name while this one waited.
    #[error("image '{0}' already exists (made meanwhile by another operation); delete it first with `banger image delete {0}`")]
    MadeMeanwhile(String),
    /// Not in the catalog.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Neither local nor in the catalog.
    #[error("{what} '{name}' is {how}")]
    NotAvailable {
        /// "kernel" or "image".
        what: &'static str,
        /// The name.
        name: String,
        /// What is missing and the fix.
        how: String,
    },
    /// No such local kernel or image.
    #[error("no {what} '{name}'; see `banger {what} list`")]
    NotFound {
        /// "kernel" or "image".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// VMs or snapshots use it.
    #[error("{what} '{name}' is used by {users}; {fix}")]
    InUse {
        /// "kernel" or "image".
        what: &'static str,
        /// The name.
        name: String,
        /// "vm a, b" or "snapshot s".
        users: String,
        /// What to do.
        fix: &'static str,
    },
    /// The artifacts directory could not be made.
    #[error("cannot create {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Pulling a kernel failed.
    #[error(transparent)]
    KernelPull(PullKernelError),
    /// Building, registering or promoting an image failed.
    #[error(transparent)]
    ImageBuild(BuildImageError),
    /// Pulling an OCI image failed (the cause names the layer and entry, or the registry).
    #[error("cannot pull image '{reference}'")]
    ImagePull {
        /// The reference pulled.
        reference: String,
        /// Why.
        #[source]
        source: Box<banger_image::oci::PullImageError>,
    },
    /// An artifact's files could not be removed (the next start-up finishes the delete).
    #[error("cannot remove {}", path.display())]
    Remove {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A local kernel's files are unusable.
    #[error("kernel '{name}' is unusable; delete and pull it again with `banger kernel delete {name}`")]
    KernelFiles {
        /// The kernel.
        name: String,
        /// Why.
        #[source]
        source: KernelDirError,
    },
    /// A local image's files are unusable.
    #[error("image '{name}' is unusable; delete and rebuild it with `banger image delete {name}`")]
    ImageFiles {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: ImageDirError,
    },
    /// The base image of a VM to promote is missing.
    #[error("the base image of the vm is missing")]
    NoBase(#[source] ImageDirError),
    /// The VM to promote runs.
    #[error("vm '{0}' is running; stop it first with `banger vm stop {0}`")]
    Running(String),
    /// A file to register is not a file.
    #[error("{0} is not a file; give the absolute path of an ext4 image")]
    NotAFile(String),
    /// A user recipe is invalid.
    #[error("invalid recipe: {0}")]
    Recipe(String),
    /// No image name can be derived from an OCI reference.
    #[error("cannot derive an image name from '{0}'; pass --name")]
    NoImageName(String),
    /// A Dockerfile build failed (the cause names the step and holds its output).
    #[error("cannot build the Dockerfile")]
    Dockerfile(#[source] banger_image::dockerfile::DockerfileError),
    /// The caller may not build Dockerfiles.
    #[error("only root or the daemon's user may build a Dockerfile (its RUN steps run as root on the host)")]
    NotTrusted,
    /// A VM's disks could not be made.
    #[error(transparent)]
    Disk(#[from] disks::DiskError),
    /// The agent or the initramfs.
    #[error(transparent)]
    Agent(#[from] agent::AgentBinaryError),
    /// A blocking task died.
    #[error("a background task failed")]
    Task(#[from] tokio::task::JoinError),
    /// A test's injected failure.
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

/// What a promote's merge gets.
pub(crate) struct PromoteInput<'a> {
    /// Where images live.
    pub images_dir: &'a Path,
    /// The new image.
    pub name: &'a str,
    /// The VM's base image file.
    pub base: &'a Path,
    /// The VM's overlay disk.
    pub overlay: &'a Path,
    /// What the new image's manifest says it came from.
    pub source: ImageSource,
    /// How the new image starts.
    pub init: banger_core::InitMode,
    /// Stage reporter.
    pub progress: &'a mut dyn FnMut(&str),
}

/// What [`Artifacts::publish_image_with`] found or made.
pub(crate) enum Published {
    /// Another operation made it meanwhile (auto-pulls take it).
    Existing(ImageRecord),
    /// Made now.
    New(ImageRecord, Box<BuiltImage>),
}

/// Removes `<parent>/<name>` if it is there (renaming it aside first, so a half-removed
/// artifact never keeps its name).
fn remove_artifact_dir(parent: &Path, name: &str) -> std::io::Result<()> {
    let dir = parent.join(name);
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let aside = parent.join(format!(".deleting-{name}-{}", banger_core::new_id()));
    std::fs::rename(&dir, &aside)?;
    std::fs::remove_dir_all(&aside)
}

/// The kernels, images, disks and agent service.
pub struct Artifacts {
    fleet: Arc<Fleet>,
    /// `kernel:NAME`, `image:NAME`, `seed:NAME`, `initramfs:PATH`: one pull, build or write per
    /// name at a time.
    locks: NamedLocks,
    /// The agent binary's digest, by path, size and modification time.
    digests: agent::DigestCache,
}

impl Artifacts {
    /// The service over `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Arc<Self> {
        Arc::new(Self { fleet, locks: NamedLocks::default(), digests: agent::DigestCache::default() })
    }

    /// Where kernels live.
    pub fn kernels_dir(&self) -> PathBuf {
        self.fleet.layout.state_dir.join("kernels")
    }

    /// Where images live.
    pub fn images_dir(&self) -> PathBuf {
        self.fleet.layout.state_dir.join("images")
    }

    /// Starts pulling a kernel.
    pub fn begin_pull_kernel(self: &Arc<Self>, req: PullKernelRequest) -> Result<OperationRecord, ArtifactsError> {
        banger_core::validate_artifact_name(&req.name)
            .map_err(|source| ArtifactsError::InvalidName { what: "kernel", source })?;
        if self.fleet.store.get_kernel(&req.name)?.is_some() {
            return Err(ArtifactsError::Exists { what: "kernel", name: req.name });
        }
        if req.from.is_none() {
            catalog::kernel(&req.name)?;
        }
        let op = self.fleet.ops.begin("kernel.pull", &req.name);
        let snapshot = op.snapshot()?;
        let this = self.clone();
        tokio::spawn(async move {
            match this.pull_kernel_locked(&op.sink(), &req.name, req.from).await {
                Ok(k) => op.succeed(Some(k.name)),
                Err(e) => op.fail(chain(&e)),
            }
        });
        Ok(snapshot)
    }

    async fn pull_kernel_locked(
        &self,
        sink: &StageSink,
        name: &str,
        from: Option<String>,
    ) -> Result<KernelRecord, ArtifactsError> {
        let pull = match &from {
            Some(f) => KernelPull::from_arg(name, f),
            None => KernelPull::catalog(name)?,
        };
        self.make_kernel_with(sink, name, move |dir, progress| pull_kernel(&SystemHost::new(), dir, &pull, progress))
            .await
    }

    /// Makes kernel `name` with `make` (a blocking function of the kernels dir and a stage
    /// reporter that publishes the kernel's directory) under the name's lock. Intent first: a row
    /// "being made" is recorded before `make` runs and marked complete after, so a crash leaves
    /// a row the start-up sweep rolls back (with any directory), never a nameless directory.
    pub(crate) async fn make_kernel_with(
        &self,
        sink: &StageSink,
        name: &str,
        make: impl FnOnce(&Path, &mut dyn FnMut(&str)) -> Result<PulledKernel, PullKernelError> + Send + 'static,
    ) -> Result<KernelRecord, ArtifactsError> {
        let _guard = self.locks.lock(&format!("kernel:{name}")).await;
        if let Some(k) = self.fleet.store.get_kernel(name)? {
            return Ok(k);
        }
        let dir = self.kernels_dir();
        let now = banger_core::time::now_rfc3339();
        let intent = KernelRecord {
            name: name.to_owned(),
            version: String::new(),
            release: String::new(),
            source: String::new(),
            dir: dir.join(name).display().to_string(),
            created_at: now.clone(),
        };
        self.fleet.store.insert_kernel_as(&intent, Some(Pending::Making)).map_err(|e| match e {
            StoreError::NameTaken { .. } => ArtifactsError::Exists { what: "kernel", name: name.to_owned() },
            e => e.into(),
        })?;
        let made = self.run_kernel_make(sink, dir, make).await.and_then(|pulled| {
            let record = KernelRecord {
                name: name.to_owned(),
                version: pulled.version.clone().unwrap_or_else(|| "unknown".into()),
                release: pulled.release.clone(),
                source: describe_kernel_source(&pulled),
                dir: pulled.dir.display().to_string(),
                created_at: now,
            };
            self.complete_kernel(&record).map(|()| record)
        });
        match made {
            Ok(record) => {
                tracing::info!(kernel = name, release = %record.release, version = %record.version, "kernel pulled");
                Ok(record)
            }
            Err(e) => {
                self.roll_back(Table::Kernels, name, &self.kernels_dir());
                Err(e)
            }
        }
    }

    async fn run_kernel_make(
        &self,
        sink: &StageSink,
        dir: PathBuf,
        make: impl FnOnce(&Path, &mut dyn FnMut(&str)) -> Result<PulledKernel, PullKernelError> + Send + 'static,
    ) -> Result<PulledKernel, ArtifactsError> {
        crate::failpoint!(self.fleet, "kernel.pull.intent");
        let sink2 = sink.clone();
        let pulled = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|source| ArtifactsError::Dir { path: dir.clone(), source })?;
            make(&dir, &mut |stage| sink2.stage(&format!("kernel {stage}"))).map_err(ArtifactsError::KernelPull)
        })
        .await??;
        Ok(pulled)
    }

    fn complete_kernel(&self, record: &KernelRecord) -> Result<(), ArtifactsError> {
        crate::failpoint!(self.fleet, "kernel.pull.files");
        self.fleet.store.complete_kernel(record)?;
        Ok(())
    }

    /// Undoes a make that failed: the directory `<parent>/<name>` first, the row (still "being
    /// made") last; what cannot be removed is left to the start-up sweep.
    fn roll_back(&self, table: Table, name: &str, parent: &Path) {
        match remove_artifact_dir(parent, name) {
            Ok(()) => {
                if let Err(e) = self.fleet.store.remove_row(table, name) {
                    tracing::error!(name, error = %chain(&e), "cannot roll back the row of a failed make");
                }
            }
            Err(e) => tracing::error!(name, error = %e, "cannot remove the files of a failed make"),
        }
    }

    /// The kernel named `name`, pulling it from the catalog when it is not local.
    pub async fn ensure_kernel(&self, op: &StageSink, name: &str) -> Result<PulledKernel, ArtifactsError> {
        if self.fleet.store.get_kernel(name)?.is_none() {
            if catalog::kernel(name).is_err() {
                return Err(ArtifactsError::NotAvailable {
                    what: "kernel",
                    name: name.to_owned(),
                    how: format!(
                        "not pulled and not in the catalog; pull it with `banger kernel pull {name} --from FILE.deb`"
                    ),
                });
            }
            op.stage("kernel pull");
            self.pull_kernel_locked(op, name, None).await?;
        }
        open_kernel(&self.kernels_dir(), name)
            .map_err(|source| ArtifactsError::KernelFiles { name: name.to_owned(), source })
    }

    /// Deletes a kernel no VM uses.
    pub fn delete_kernel(&self, name: &str) -> Result<KernelRecord, ArtifactsError> {
        let kernel = self
            .fleet
            .store
            .get_kernel(name)?
            .ok_or_else(|| ArtifactsError::NotFound { what: "kernel", name: name.to_owned() })?;
        let users = self.vms_using(|vm| vm.spec.kernel == name)?;
        if !users.is_empty() {
            return Err(ArtifactsError::InUse {
                what: "kernel",
                name: name.to_owned(),
                users: format!("vm {}", users.join(", ")),
                fix: "delete those vms or `banger vm set NAME --kernel OTHER` first",
            });
        }
        self.refuse_if_snapshotted("kernel", name, |s| s.kernel == name)?;
        // Intent first: the row says "being deleted" (it is no longer found), then the files
        // go, then the row. A crash in between is finished by the start-up sweep.
        self.fleet.store.set_pending(Table::Kernels, name, Some(Pending::Deleting))?;
        self.remove_kernel_files(name)?;
        self.fleet.store.delete_kernel(name)?;
        Ok(kernel)
    }

    fn remove_kernel_files(&self, name: &str) -> Result<(), ArtifactsError> {
        crate::failpoint!(self.fleet, "kernel.delete.marked");
        let dir = self.kernels_dir();
        remove_artifact_dir(&dir, name).map_err(|source| ArtifactsError::Remove { path: dir.join(name), source })?;
        crate::failpoint!(self.fleet, "kernel.delete.files");
        Ok(())
    }

    /// Refuses an image name that is invalid or taken.
    fn check_image_name(&self, name: &str) -> Result<(), ArtifactsError> {
        banger_core::validate_artifact_name(name)
            .map_err(|source| ArtifactsError::InvalidName { what: "image", source })?;
        if self.fleet.store.get_image(name)?.is_some() {
            return Err(ArtifactsError::Exists { what: "image", name: name.to_owned() });
        }
        Ok(())
    }

    /// Starts an operation of `kind` that makes image `name` with `make` (a blocking function of
    /// the images dir and a stage reporter) and records it. `make` runs under the image name's
    /// lock only.
    fn begin_image_op(
        self: &Arc<Self>,
        kind: &str,
        name: &str,
        make: impl FnOnce(&Path, &mut dyn FnMut(&str)) -> Result<BuiltImage, ArtifactsError> + Send + 'static,
    ) -> Result<OperationRecord, ArtifactsError> {
        self.check_image_name(name)?;
        let op = self.fleet.ops.begin(kind, name);
        let snapshot = op.snapshot()?;
        let this = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            match this.make_image_locked(&op.sink(), &name, false, make).await {
                Ok(i) => op.succeed(Some(i.name)),
                Err(e) => op.fail(chain(&e)),
            }
        });
        Ok(snapshot)
    }

    /// Makes image `name` under its lock. When another operation published that name while
    /// this one waited, `reuse_existing` decides: auto-pulls take it, explicit builds, pulls and
    /// registers fail (exactly one of two same-name operations wins).
    async fn make_image_locked(
        &self,
        sink: &StageSink,
        name: &str,
        reuse_existing: bool,
        make: impl FnOnce(&Path, &mut dyn FnMut(&str)) -> Result<BuiltImage, ArtifactsError> + Send + 'static,
    ) -> Result<ImageRecord, ArtifactsError> {
        let _guard = self.locks.lock(&format!("image:{name}")).await;
        let (record, built) = match self.publish_image_with(name, reuse_existing, sink, make).await? {
            Published::Existing(record) => return Ok(record),
            Published::New(record, built) => (record, built),
        };
        // Every image gets its work seed now, so the first VM does not wait for it.
        sink.stage("image work seed");
        self.ensure_seed(&record, &built).await?;
        Ok(self.fleet.store.get_image(name)?.unwrap_or(record))
    }

    /// Publishes image `name` made by `make`, with the name's lock held by the caller. Intent
    /// first: a row "being made" is recorded before `make` runs and marked complete after, so a
    /// crash leaves a row the start-up sweep rolls back (with any directory), never a directory
    /// that `list` and `delete` do not know.
    pub(crate) async fn publish_image_with(
        &self,
        name: &str,
        reuse_existing: bool,
        sink: &StageSink,
        make: impl FnOnce(&Path, &mut dyn FnMut(&str)) -> Result<BuiltImage, ArtifactsError> + Send + 'static,
    ) -> Result<Published, ArtifactsError> {
        if let Some(i) = self.fleet.store.get_image(name)? {
            if reuse_existing {
                return Ok(Published::Existing(i));
            }
            return Err(ArtifactsError::MadeMeanwhile(name.to_owned()));
        }
        let dir = self.images_dir();
        let intent = ImageRecord {
            name: name.to_owned(),
            source: String::new(),
            init_mode: banger_core::InitMode::default(),
            rootfs: dir.join(name).display().to_string(),
            work_seed: None,
            sha256: None,
            size_bytes: 0,
            created_at: banger_core::time::now_rfc3339(),
        };
        self.fleet.store.insert_image_as(&intent, Some(Pending::Making)).map_err(|e| match e {
            StoreError::NameTaken { .. } => ArtifactsError::MadeMeanwhile(name.to_owned()),
            e => e.into(),
        })?;
        let made = self.run_image_make(sink, dir, make).await.and_then(|built| {
            let record = image_record(&built);
            self.complete_image(&record).map(|()| (record, built))
        });
        match made {
            Ok((record, built)) => {
                tracing::info!(image = name, source = %record.source, size = record.size_bytes, "image published");
                Ok(Published::New(record, Box::new(built)))
            }
            Err(e) => {
                self.roll_back(Table::Images, name, &self.images_dir());
                Err(e)
            }
        }
    }

    async fn run_image_make(
        &self,
        sink: &StageSink,
        dir: PathBuf,
        make: impl FnOnce(&Path, &mut dyn FnMut(&str)) -> Result<BuiltImage, ArtifactsError> + Send + 'static,
    ) -> Result<BuiltImage, ArtifactsError> {
        crate::failpoint!(self.fleet, "image.make.intent");
        let sink2 = sink.clone();
        let built = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|source| ArtifactsError::Dir { path: dir.clone(), source })?;
            make(&dir, &mut |stage| sink2.stage(&format!("image {stage}")))
        })
        .await??;
        Ok(built)
    }

    fn complete_image(&self, record: &ImageRecord) -> Result<(), ArtifactsError> {
        crate::failpoint!(self.fleet, "image.make.files");
        self.fleet.store.complete_image(record)?;
        Ok(())
    }

    /// Starts building an image from the catalog or from the caller's recipe.
    pub fn begin_build_image(self: &Arc<Self>, req: BuildImageRequest) -> Result<OperationRecord, ArtifactsError> {
        let build = match req.recipe {
            Some(recipe) => {
                ImageBuild { name: req.name.clone(), source: ImageSource::Recipe, recipe: user_recipe(recipe)? }
            }
            None => match catalog::dockerfile_image(&req.name) {
                Some(entry) => return self.begin_catalog_dockerfile(entry),
                None => ImageBuild::catalog(&req.name)?,
            },
        };
        self.begin_image_op("image.build", &req.name, move |dir, progress| {
            build_image(&SystemHost::new(), dir, &build, progress).map_err(ArtifactsError::ImageBuild)
        })
    }

    /// Starts pulling an OCI image (registry, OCI layout dir or docker-archive).
    pub fn begin_pull_image(self: &Arc<Self>, req: PullImageRequest) -> Result<OperationRecord, ArtifactsError> {
        let name = match req.name {
            Some(n) => n,
            None => default_image_name(&req.reference)?,
        };
        let source = banger_image::oci::parse_source(&req.reference, req.insecure);
        let (target, reference) = (name.clone(), req.reference);
        self.begin_image_op("image.pull", &name, move |dir, progress| {
            banger_image::oci::pull_image(&SystemHost::new(), dir, &target, &source, progress)
                .map_err(|source| ArtifactsError::ImagePull { reference, source: Box::new(source) })
        })
    }

    /// Starts registering an ext4 file as an image.
    /// The file is opened as `caller` (a `socket_group` member cannot make the root daemon
    /// read a file its own user cannot) and read through that descriptor.
    pub fn begin_register_image(
        self: &Arc<Self>,
        req: RegisterImageRequest,
        caller: Caller,
    ) -> Result<OperationRecord, ArtifactsError> {
        let file = PathBuf::from(&req.file);
        if !file.is_absolute() {
            return Err(ArtifactsError::NotAFile(req.file));
        }
        // Opened as the caller before anything is said about the path, so a refusal tells a
        // caller nothing about files it cannot see.
        let opened = caller.open_readable(&file)?;
        if !opened.metadata().is_ok_and(|m| m.is_file()) {
            return Err(ArtifactsError::NotAFile(req.file));
        }
        let init = req.init.map(Into::into).unwrap_or_default();
        let name = req.name.clone();
        self.begin_image_op("image.register", &req.name, move |dir, progress| {
            use std::os::fd::AsRawFd as _;
            // The descriptor opened as the caller stays open until the copy is done.
            let through = PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
            let made = banger_image::rootfs::register_image_via(dir, &name, &file, &through, init, progress);
            drop(opened);
            made.map_err(ArtifactsError::ImageBuild)
        })
    }

    /// Starts making image `name` from stopped VM `vm`'s root (its base image plus overlay).
    pub async fn begin_promote(self: &Arc<Self>, vm: &str, name: &str) -> Result<OperationRecord, ArtifactsError> {
        self.begin_promote_with(vm, name, |p| {
            banger_image::rootfs::promote_image(
                &SystemHost::new(),
                &banger_image::promote::SystemMounter,
                p.images_dir,
                p.name,
                p.base,
                p.overlay,
                p.source,
                p.init,
                p.progress,
            )
            .map_err(ArtifactsError::ImageBuild)
        })
        .await
    }

    /// [`Self::begin_promote`] with `merge` making the image (tests give a fake).
    pub(crate) async fn begin_promote_with(
        self: &Arc<Self>,
        vm: &str,
        name: &str,
        merge: impl FnOnce(PromoteInput<'_>) -> Result<BuiltImage, ArtifactsError> + Send + 'static,
    ) -> Result<OperationRecord, ArtifactsError> {
        let vm = self.fleet.store.find_vm(vm)?;
        self.check_image_name(name)?;
        // Hold the VM's lock for the whole promote so it cannot start while its disks are read;
        // no other VM waits on it.
        let guard: VmGuard = self.fleet.locks.lock(&vm.id).await;
        let vm = self.fleet.store.find_vm(&vm.id)?;
        if self.fleet.alive(&vm) || vm.state.is_active() {
            return Err(ArtifactsError::Running(vm.name));
        }
        let base = open_image(&self.images_dir(), &vm.spec.image).map_err(ArtifactsError::NoBase)?;
        let image = self.fleet.store.get_image(&vm.spec.image)?;
        let init = image.map(|i| i.init_mode).unwrap_or_default();
        let overlay = PathBuf::from(vm.paths().overlay_disk);
        let source = ImageSource::Promoted { vm: vm.name.clone(), from: vm.spec.image.clone() };
        let target = name.to_owned();
        crate::failpoint!(self.fleet, "image.promote.locked");
        self.begin_image_op("image.promote", name, move |dir, progress| {
            let _held = guard;
            merge(PromoteInput {
                images_dir: dir,
                name: &target,
                base: &base.path,
                overlay: &overlay,
                source,
                init,
                progress,
            })
        })
    }

    /// The image named `name`, building it from the catalog when it is not local.
    pub async fn ensure_image(&self, op: &StageSink, name: &str) -> Result<(ImageRecord, BuiltImage), ArtifactsError> {
        let record = match self.fleet.store.get_image(name)? {
            Some(r) => r,
            None => match catalog::dockerfile_image(name) {
                Some(entry) => {
                    op.stage("image build");
                    self.make_catalog_dockerfile(op, entry, true).await?
                }
                None => self.build_catalog_image(op, name).await?,
            },
        };
        let built = open_image(&self.images_dir(), name)
            .map_err(|source| ArtifactsError::ImageFiles { name: name.to_owned(), source })?;
        Ok((record, built))
    }

    /// Builds catalog recipe image `name` (an auto-pull: one made meanwhile is taken).
    async fn build_catalog_image(&self, op: &StageSink, name: &str) -> Result<ImageRecord, ArtifactsError> {
        if catalog::image(name).is_err() {
            return Err(ArtifactsError::NotAvailable {
                what: "image",
                name: name.to_owned(),
                how: "not local and not in the catalog; build a catalog image with `banger image build NAME` (see `banger image list --catalog`)".into(),
            });
        }
        op.stage("image build");
        let build = ImageBuild::catalog(name)?;
        self.make_image_locked(op, name, true, move |dir, progress| {
            build_image(&SystemHost::new(), dir, &build, progress).map_err(ArtifactsError::ImageBuild)
        })
        .await
    }

    /// Deletes an image no VM uses.
    pub fn delete_image(&self, name: &str) -> Result<ImageRecord, ArtifactsError> {
        let image = self
            .fleet
            .store
            .get_image(name)?
            .ok_or_else(|| ArtifactsError::NotFound { what: "image", name: name.to_owned() })?;
        let users = self.vms_using(|vm| vm.spec.image == name)?;
        if !users.is_empty() {
            return Err(ArtifactsError::InUse {
                what: "image",
                name: name.to_owned(),
                users: format!("vm {}", users.join(", ")),
                fix: "delete those vms first",
            });
        }
        self.refuse_if_snapshotted("image", name, |s| s.image == name)?;
        // Intent first: the row says "being deleted" (it is no longer found), then the files
        // go, then the row. A crash in between is finished by the start-up sweep.
        self.fleet.store.set_pending(Table::Images, name, Some(Pending::Deleting))?;
        self.remove_image_files(name)?;
        self.fleet.store.delete_image(name)?;
        Ok(image)
    }

    fn remove_image_files(&self, name: &str) -> Result<(), ArtifactsError> {
        crate::failpoint!(self.fleet, "image.delete.marked");
        let dir = self.images_dir();
        remove_artifact_dir(&dir, name).map_err(|source| ArtifactsError::Remove { path: dir.join(name), source })?;
        crate::failpoint!(self.fleet, "image.delete.files");
        Ok(())
    }
}

impl Artifacts {
    /// Names of the VMs for which `uses` holds.
    fn vms_using(&self, uses: impl Fn(&banger_core::VmRecord) -> bool) -> Result<Vec<String>, ArtifactsError> {
        Ok(self.fleet.store.list_vms()?.into_iter().filter(|vm| uses(vm)).map(|vm| vm.name).collect())
    }

    /// A kernel or image that snapshots were taken on stays: their forks restore onto it.
    fn refuse_if_snapshotted(
        &self,
        what: &'static str,
        name: &str,
        uses: impl Fn(&banger_core::SnapshotRecord) -> bool,
    ) -> Result<(), ArtifactsError> {
        let users: Vec<String> =
            self.fleet.store.list_snapshots()?.into_iter().filter(|s| uses(s)).map(|s| s.name).collect();
        if users.is_empty() {
            return Ok(());
        }
        Err(ArtifactsError::InUse {
            what,
            name: name.to_owned(),
            users: format!("snapshot {}", users.join(", ")),
            fix: "delete them first with `banger snapshot delete NAME`",
        })
    }
}

/// A user's recipe with its defaults filled in, checked before anything runs.
fn user_recipe(r: ImageRecipe) -> Result<catalog::Recipe, ArtifactsError> {
    let bad = ArtifactsError::Recipe;
    for p in &r.packages {
        if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:=~".contains(c)) {
            return Err(bad(format!("'{p}' is not a Debian package name")));
        }
    }
    for f in &r.files {
        if !f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
            return Err(bad(format!("file path '{}' must be absolute and stay inside the image", f.path)));
        }
    }
    banger_proto::agent::meta::from_labels(&r.labels, None, None, &[]).map_err(bad)?;
    Ok(catalog::Recipe {
        labels: r.labels,
        suite: r.suite.unwrap_or_else(|| "bookworm".into()),
        variant: r.variant.unwrap_or_else(|| "minbase".into()),
        packages: r.packages,
        files: r
            .files
            .into_iter()
            .map(|f| catalog::ExtraFile { path: f.path, mode: f.mode, contents: f.contents })
            .collect(),
        init: r.init.map(Into::into).unwrap_or_default(),
    })
}

/// A local name for an OCI reference: its last path component, without tag or digest.
fn default_image_name(reference: &str) -> Result<String, ArtifactsError> {
    let last = reference.trim_end_matches('/').rsplit('/').next().unwrap_or(reference);
    let bare = last.split(['@', ':']).next().unwrap_or(last).to_ascii_lowercase();
    let name: String = bare.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    let name = name.trim_matches(['-', '.']).to_owned();
    banger_core::validate_artifact_name(&name)
        .map(|()| name)
        .map_err(|_| ArtifactsError::NoImageName(reference.to_owned()))
}

fn describe_kernel_source(k: &PulledKernel) -> String {
    match &k.source {
        KernelSource::Apt { .. } => format!("apt:{}", k.package.as_deref().unwrap_or("?")),
        KernelSource::File { path } => format!("file:{}", path.display()),
        KernelSource::Url { url } => url.clone(),
    }
}

fn image_record(b: &BuiltImage) -> ImageRecord {
    let m = &b.manifest;
    ImageRecord {
        name: m.name.clone(),
        source: m.source.to_string(),
        init_mode: m.init,
        rootfs: b.path.display().to_string(),
        work_seed: None,
        sha256: Some(m.sha256.clone()),
        size_bytes: m.size_bytes,
        created_at: banger_core::time::now_rfc3339(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Status as _;

    #[test]
    fn a_hostile_layer_is_reported_as_what_the_layer_did_not_as_a_disk_problem() {
        let e = ArtifactsError::ImagePull {
            reference: "evil/image:latest".into(),
            source: Box::new(banger_image::oci::PullImageError::Entry {
                layer: "2/3 (sha256:abcd)".into(),
                entry: "../../escape".into(),
                problem: banger_image::oci::EntryProblem::Escapes,
            }),
        };
        let message = e.message();
        assert_eq!(
            message,
            "cannot pull image 'evil/image:latest': layer 2/3 (sha256:abcd) entry '../../escape' escapes the image root"
        );
        assert!(!message.contains("writable") && !message.contains("space"), "{message}");
        assert!(std::error::Error::source(&e).is_some(), "the cause is kept as a source");
    }
}
