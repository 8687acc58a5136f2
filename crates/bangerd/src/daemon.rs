//! The composition root: builds the [`Fleet`] and every service, wires each to its
//! collaborators, and holds what the HTTP edge reaches. No feature logic lives here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::services::artifacts::Artifacts;
use crate::services::files::Files;
use crate::services::forwards::Forwards;
use crate::services::lifecycle::{ArtifactProvision, Lifecycle, Provision};
use crate::services::net::Net;
use crate::services::sessions::Sessions;
use crate::services::snapshots::Snapshots;
use crate::services::ssh::Ssh;
use crate::services::vms::Vms;
use crate::services::workspace::Workspace;
use crate::services::Fleet;

/// Everything a request can reach: the services, and the daemon's own facts.
pub struct Daemon {
    /// The shared store, locks, handles, drivers and agent connections.
    pub fleet: Arc<Fleet>,
    /// The config file in force, if any.
    pub config_source: Option<PathBuf>,
    /// When this daemon started.
    pub started_at: SystemTime,
    /// Notified to begin a clean shutdown.
    pub shutdown: Notify,
    /// The guest network.
    pub net: Arc<Net>,
    /// Port forwards.
    pub forwards: Arc<Forwards>,
    /// Kernels, images, disks and the agent.
    pub artifacts: Arc<Artifacts>,
    /// Keys, known_hosts and guest files.
    pub ssh: Arc<Ssh>,
    /// Guest sessions.
    pub sessions: Arc<Sessions>,
    /// Pause, resume, snapshots and forks.
    pub snapshots: Arc<Snapshots>,
    /// Start and stop.
    pub lifecycle: Arc<Lifecycle>,
    /// VM records.
    pub vms: Arc<Vms>,
    /// Workspace streams.
    pub workspace: Arc<Workspace>,
    /// Files in guests.
    pub files: Arc<Files>,
    /// The web UI's logins and status.
    pub web: crate::http::web::Web,
}

impl Daemon {
    /// Wires the services over `fleet`.
    pub fn new(fleet: Fleet, config_source: Option<PathBuf>) -> Arc<Self> {
        Self::wire(Arc::new(fleet), config_source, None)
    }

    /// Wires the services over `fleet`; boots are provisioned by `provision` when given (tests),
    /// else from the real kernels, images and disks.
    pub fn wire(fleet: Arc<Fleet>, config_source: Option<PathBuf>, provision: Option<Arc<dyn Provision>>) -> Arc<Self> {
        let net = Arc::new(Net::new(fleet.clone()));
        let forwards = Arc::new(Forwards::new(fleet.clone()));
        let artifacts = Artifacts::new(fleet.clone());
        let ssh = Arc::new(Ssh::new(fleet.clone()));
        let sessions = Arc::new(Sessions::new(fleet.clone()));
        let snapshots = Arc::new(Snapshots::new(fleet.clone(), ssh.clone(), artifacts.clone()));
        let workspace = Arc::new(Workspace::new(fleet.clone()));
        let provision: Arc<dyn Provision> = match provision {
            Some(p) => p,
            None => Arc::new(ArtifactProvision { artifacts: artifacts.clone(), ssh: ssh.clone() }),
        };
        let lifecycle = Lifecycle::new(
            fleet.clone(),
            net.clone(),
            forwards.clone(),
            provision,
            sessions.clone(),
            snapshots.clone(),
        );
        let vms = Vms::new(
            fleet.clone(),
            lifecycle.clone(),
            snapshots.clone(),
            forwards.clone(),
            ssh.clone(),
            net.clone(),
            workspace.clone(),
        );
        let files = Arc::new(Files::new(fleet.clone()));
        net.set_guest_files(files.clone());
        let web = crate::http::web::Web::new(&fleet.config);
        Arc::new(Self {
            fleet,
            config_source,
            started_at: SystemTime::now(),
            shutdown: Notify::new(),
            net,
            forwards,
            artifacts,
            ssh,
            sessions,
            snapshots,
            lifecycle,
            vms,
            workspace,
            files,
            web,
        })
    }
}
