//! What a boot needs from outside the lifecycle, behind one narrow trait: the kernel and image
//! (pulled or built when missing), the VM's disks, the guest files written into its work disk,
//! and the initramfs. [`ArtifactProvision`] is the real one; tests give a recording fake.

use std::path::PathBuf;
use std::sync::Arc;

use banger_core::{InitMode, VmRecord};
use banger_proto::GitIdentity;

use super::LifecycleError;
use crate::ops::OpHandle;
use crate::services::artifacts::disks::VmDisks;
use crate::services::artifacts::{Artifacts, ArtifactsError};
use crate::services::ssh::Ssh;

/// A boxed future (the trait stays object-safe).
pub type ProvisionFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Prepared, LifecycleError>> + Send + 'a>>;

/// What the VMM is given for one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The kernel as an ELF `vmlinux` (Firecracker), when there is one.
    pub kernel_elf: Option<PathBuf>,
    /// The initramfs with the agent as `/init`.
    pub initramfs: PathBuf,
    /// The image's read-only root.
    pub base: PathBuf,
    /// The VM's root overlay disk.
    pub overlay: PathBuf,
    /// The VM's work disk.
    pub work: PathBuf,
    /// How the guest's init runs.
    pub init_mode: InitMode,
    /// Guest ports its image says a start waits for.
    pub wait_ports: Vec<u16>,
}

/// Prepares what a boot of a VM needs, reporting its stages on the operation.
pub trait Provision: Send + Sync {
    /// Everything VM `vm` needs to boot. With `restoring` (a fork's first start) its disks are
    /// taken as they are: they belong to the snapshot's state.
    fn prepare<'a>(
        &'a self,
        op: &'a OpHandle,
        vm: &'a VmRecord,
        git: Option<&'a GitIdentity>,
        restoring: bool,
    ) -> ProvisionFuture<'a>;
}

/// The real provisioning: kernels and images from [`Artifacts`], guest files from [`Ssh`].
pub struct ArtifactProvision {
    /// Kernels, images, disks and the agent.
    pub artifacts: Arc<Artifacts>,
    /// Keys and guest files.
    pub ssh: Arc<Ssh>,
}

impl Provision for ArtifactProvision {
    fn prepare<'a>(
        &'a self,
        op: &'a OpHandle,
        vm: &'a VmRecord,
        git: Option<&'a GitIdentity>,
        restoring: bool,
    ) -> ProvisionFuture<'a> {
        Box::pin(async move {
            // A pull or build may take minutes (or wait on another's): it runs in a task of its
            // own, which a cancelled start (a stop) stops waiting for. The task goes on, under
            // its artifact lock, and publishes the artifact whole for whoever needs it next.
            let cancel = op.cancel_flag();
            op.stage("kernel")?;
            let (artifacts, sink, name) = (self.artifacts.clone(), op.sink(), vm.spec.kernel.clone());
            let pull = tokio::spawn(async move { artifacts.ensure_kernel(&sink, &name).await });
            let kernel = tokio::select! {
                pulled = pull => pulled.map_err(ArtifactsError::from)??,
                () = cancel.cancelled() => return Err(LifecycleError::Cancelled),
            };
            op.stage("image")?;
            let (artifacts, sink, name) = (self.artifacts.clone(), op.sink(), vm.spec.image.clone());
            let build = tokio::spawn(async move { artifacts.ensure_image(&sink, &name).await });
            let (image, built) = tokio::select! {
                built = build => built.map_err(ArtifactsError::from)??,
                () = cancel.cancelled() => return Err(LifecycleError::Cancelled),
            };
            let disks = if restoring {
                let paths = vm.paths();
                VmDisks { overlay: paths.overlay_disk.into(), work: paths.work_disk.into(), warnings: Vec::new() }
            } else {
                op.stage("disks")?;
                let disks = self.artifacts.provision_disks(vm, &image, &built).await?;
                disks.warnings.iter().for_each(|w| op.warn(w));
                op.stage("guest-files")?;
                self.ssh.prepare_guest_files(vm, &disks.work, git).await?.iter().for_each(|w| op.warn(w));
                disks
            };
            op.stage("initramfs")?;
            let initramfs = self.artifacts.initramfs_for(&kernel).await?;
            Ok(Prepared {
                kernel: kernel.vmlinuz,
                kernel_elf: Some(kernel.vmlinux),
                initramfs,
                base: built.path,
                overlay: disks.overlay,
                work: disks.work,
                init_mode: image.init_mode,
                wait_ports: built.manifest.meta.ports.clone(),
            })
        })
    }
}
