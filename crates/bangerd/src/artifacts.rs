//! Kernels and images: pulling and building them as operations, auto-pulling on first use, and
//! deleting them. The slow part (apt, mmdebstrap, extraction) runs on a blocking thread under a
//! per-name lock only, so different artifacts build in parallel and one name is never built
//! twice at once; the store row is inserted after the files are published.

use std::path::PathBuf;
use std::sync::Arc;

use banger_core::{ImageRecord, KernelRecord, OperationRecord};
use banger_image::catalog;
use banger_image::host::SystemHost;
use banger_image::kernel::pull::{open_kernel, pull_kernel, KernelPull, KernelSource, PulledKernel};
use banger_image::rootfs::{build_image, open_image, BuiltImage, ImageBuild};
use banger_proto::{BuildImageRequest, PullKernelRequest};

use crate::daemon::Daemon;
use crate::error::{chain, ApiFailure};
use crate::ops::{OpHandle, StageSink};

impl Daemon {
    /// Where kernels live.
    pub fn kernels_dir(&self) -> PathBuf {
        self.layout.state_dir.join("kernels")
    }

    /// Where images live.
    pub fn images_dir(&self) -> PathBuf {
        self.layout.state_dir.join("images")
    }

    /// Starts pulling a kernel.
    pub fn begin_pull_kernel(self: &Arc<Self>, req: PullKernelRequest) -> Result<OperationRecord, ApiFailure> {
        banger_core::validate_artifact_name(&req.name)
            .map_err(|e| ApiFailure::invalid(format!("invalid kernel name: {e}")))?;
        if self.store.get_kernel(&req.name)?.is_some() {
            return Err(ApiFailure::conflict(format!(
                "kernel '{}' already exists; delete it first with `banger kernel delete {}`",
                req.name, req.name
            )));
        }
        if req.from.is_none() {
            catalog::kernel(&req.name).map_err(|e| ApiFailure::not_found(e.to_string()))?;
        }
        let op = self.ops.begin("kernel.pull", &req.name);
        let snapshot = op.snapshot()?;
        let daemon = self.clone();
        tokio::spawn(async move {
            match daemon.pull_kernel_locked(&op.sink(), &req.name, req.from).await {
                Ok(k) => op.succeed(Some(k.name)),
                Err(e) => op.fail(e.message),
            }
        });
        Ok(snapshot)
    }

    async fn pull_kernel_locked(
        &self,
        sink: &StageSink,
        name: &str,
        from: Option<String>,
    ) -> Result<KernelRecord, ApiFailure> {
        let _guard = self.artifact_locks.lock(&format!("kernel:{name}")).await;
        if let Some(k) = self.store.get_kernel(name)? {
            return Ok(k);
        }
        let pull = match &from {
            Some(f) => KernelPull::from_arg(name, f),
            None => KernelPull::catalog(name).map_err(|e| ApiFailure::not_found(e.to_string()))?,
        };
        let dir = self.kernels_dir();
        let sink2 = sink.clone();
        let pulled = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            pull_kernel(&SystemHost::new(), &dir, &pull, &mut |stage| sink2.stage(&format!("kernel {stage}")))
                .map_err(|e| chain(&e))
        })
        .await
        .map_err(|e| ApiFailure::internal(format!("kernel pull task failed: {e}")))?
        .map_err(ApiFailure::invalid)?;
        let record = KernelRecord {
            name: name.to_owned(),
            version: pulled.version.clone().unwrap_or_else(|| "unknown".into()),
            release: pulled.release.clone(),
            source: describe_kernel_source(&pulled),
            dir: pulled.dir.display().to_string(),
            created_at: banger_core::time::now_rfc3339(),
        };
        if let Err(e) = self.store.insert_kernel(&record) {
            let _ = banger_image::kernel::pull::delete_kernel_dir(&self.kernels_dir(), name);
            return Err(e.into());
        }
        tracing::info!(kernel = name, release = %record.release, version = %record.version, "kernel pulled");
        Ok(record)
    }

    /// The kernel named `name`, pulling it from the catalog when it is not local.
    pub async fn ensure_kernel(&self, op: &OpHandle, name: &str) -> Result<PulledKernel, ApiFailure> {
        if self.store.get_kernel(name)?.is_none() {
            if catalog::kernel(name).is_err() {
                return Err(ApiFailure::not_found(format!(
                    "kernel '{name}' is not pulled and not in the catalog; pull it with `banger kernel pull {name} --from FILE.deb`"
                )));
            }
            op.sink().stage("kernel pull");
            self.pull_kernel_locked(&op.sink(), name, None).await?;
        }
        open_kernel(&self.kernels_dir(), name).map_err(|e| {
            ApiFailure::internal(format!("{}; delete and pull it again with `banger kernel delete {name}`", chain(&e)))
        })
    }

    /// Deletes a kernel no VM uses.
    pub fn delete_kernel(&self, name: &str) -> Result<KernelRecord, ApiFailure> {
        let kernel = self
            .store
            .get_kernel(name)?
            .ok_or_else(|| ApiFailure::not_found(format!("no kernel '{name}'; see `banger kernel list`")))?;
        let users = self.vms_using(|vm| vm.spec.kernel == name)?;
        if !users.is_empty() {
            return Err(ApiFailure::conflict(format!(
                "kernel '{name}' is used by vm {}; delete those vms or `banger vm set NAME --kernel OTHER` first",
                users.join(", ")
            )));
        }
        self.store.delete_kernel(name)?;
        if let Err(e) = banger_image::kernel::pull::delete_kernel_dir(&self.kernels_dir(), name) {
            tracing::warn!(kernel = name, error = %chain(&e), "cannot remove kernel files");
        }
        Ok(kernel)
    }

    /// Starts building a catalog image.
    pub fn begin_build_image(self: &Arc<Self>, req: BuildImageRequest) -> Result<OperationRecord, ApiFailure> {
        banger_core::validate_artifact_name(&req.name)
            .map_err(|e| ApiFailure::invalid(format!("invalid image name: {e}")))?;
        if self.store.get_image(&req.name)?.is_some() {
            return Err(ApiFailure::conflict(format!(
                "image '{}' already exists; delete it first with `banger image delete {}`",
                req.name, req.name
            )));
        }
        catalog::image(&req.name).map_err(|e| ApiFailure::not_found(e.to_string()))?;
        let op = self.ops.begin("image.build", &req.name);
        let snapshot = op.snapshot()?;
        let daemon = self.clone();
        tokio::spawn(async move {
            match daemon.build_image_locked(&op.sink(), &req.name).await {
                Ok(i) => op.succeed(Some(i.name)),
                Err(e) => op.fail(e.message),
            }
        });
        Ok(snapshot)
    }

    async fn build_image_locked(&self, sink: &StageSink, name: &str) -> Result<ImageRecord, ApiFailure> {
        let _guard = self.artifact_locks.lock(&format!("image:{name}")).await;
        if let Some(i) = self.store.get_image(name)? {
            return Ok(i);
        }
        let build = ImageBuild::catalog(name).map_err(|e| ApiFailure::not_found(e.to_string()))?;
        let dir = self.images_dir();
        let sink2 = sink.clone();
        let built = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            build_image(&SystemHost::new(), &dir, &build, &mut |stage| sink2.stage(&format!("image {stage}")))
                .map_err(|e| chain(&e))
        })
        .await
        .map_err(|e| ApiFailure::internal(format!("image build task failed: {e}")))?
        .map_err(ApiFailure::invalid)?;
        let record = image_record(&built);
        if let Err(e) = self.store.insert_image(&record) {
            let _ = banger_image::rootfs::delete_image_dir(&self.images_dir(), name);
            return Err(e.into());
        }
        tracing::info!(image = name, size = record.size_bytes, "image built");
        Ok(record)
    }

    /// The image named `name`, building it from the catalog when it is not local.
    pub async fn ensure_image(&self, op: &OpHandle, name: &str) -> Result<(ImageRecord, BuiltImage), ApiFailure> {
        let record = match self.store.get_image(name)? {
            Some(r) => r,
            None => {
                if catalog::image(name).is_err() {
                    return Err(ApiFailure::not_found(format!(
                        "image '{name}' is not local and not in the catalog; build a catalog image with `banger image build NAME` (see `banger image list --catalog`)"
                    )));
                }
                op.sink().stage("image build");
                self.build_image_locked(&op.sink(), name).await?
            }
        };
        let built = open_image(&self.images_dir(), name).map_err(|e| {
            ApiFailure::internal(format!("{}; delete and rebuild it with `banger image delete {name}`", chain(&e)))
        })?;
        Ok((record, built))
    }

    /// Deletes an image no VM uses.
    pub fn delete_image(&self, name: &str) -> Result<ImageRecord, ApiFailure> {
        let image = self
            .store
            .get_image(name)?
            .ok_or_else(|| ApiFailure::not_found(format!("no image '{name}'; see `banger image list`")))?;
        let users = self.vms_using(|vm| vm.spec.image == name)?;
        if !users.is_empty() {
            return Err(ApiFailure::conflict(format!(
                "image '{name}' is used by vm {}; delete those vms first",
                users.join(", ")
            )));
        }
        self.store.delete_image(name)?;
        if let Err(e) = banger_image::rootfs::delete_image_dir(&self.images_dir(), name) {
            tracing::warn!(image = name, error = %chain(&e), "cannot remove image files");
        }
        Ok(image)
    }
}

impl Daemon {
    /// Names of the VMs for which `uses` holds.
    fn vms_using(&self, uses: impl Fn(&banger_core::VmRecord) -> bool) -> Result<Vec<String>, ApiFailure> {
        Ok(self.store.list_vms()?.into_iter().filter(|vm| uses(vm)).map(|vm| vm.name).collect())
    }
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
        source: match &m.source {
            banger_image::rootfs::ImageSource::Catalog { entry } => format!("recipe:{entry}"),
            banger_image::rootfs::ImageSource::Recipe => "recipe".into(),
        },
        init_mode: m.init,
        rootfs: b.path.display().to_string(),
        work_seed: None,
        sha256: Some(m.sha256.clone()),
        size_bytes: m.size_bytes,
        created_at: banger_core::time::now_rfc3339(),
    }
}
