//! The one place where typed service errors become an HTTP status and `{code, message}`. The
//! message is the error's whole source chain on one line (it names the fix); the status and
//! code come from [`Status`], implemented here for every service's error enum.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use banger_core::error_chain;
use banger_proto::ApiError;
use banger_store::StoreError;
use banger_vmm::ControlError;

use crate::ops::OpsError;
use crate::services::artifacts::agent::AgentBinaryError;
use crate::services::artifacts::ArtifactsError;
use crate::services::caller::CallerError;
use crate::services::files::FilesError;
use crate::services::forwards::proxy::ListenError;
use crate::services::forwards::ForwardsError;
use crate::services::lifecycle::LifecycleError;
use crate::services::net::{claim, NetError};
use crate::services::sessions::SessionsError;
use crate::services::snapshots::SnapshotsError;
use crate::services::ssh::{GitIdentityError, SshError};
use crate::services::vms::VmsError;
use crate::services::workspace::WorkspaceError;
use crate::services::FleetError;

/// A failed request: what the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// One line for humans.
    pub message: String,
}

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is wrong (400).
    Invalid,
    /// What it names does not exist (404).
    NotFound,
    /// The state of things does not allow it (409).
    Conflict,
    /// Something failed on our side (500).
    Internal,
}

impl Kind {
    fn status(self) -> (StatusCode, &'static str) {
        match self {
            Self::Invalid => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict => (StatusCode::CONFLICT, "conflict"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// The kind of a service error.
pub trait Status: std::error::Error + Sized + 'static {
    /// What kind of failure it is.
    fn kind(&self) -> Kind;

    /// The message the client sees: by default the whole chain.
    fn message(&self) -> String {
        error_chain(self)
    }
}

impl ApiFailure {
    /// A failure of `kind` with `message`.
    pub fn of(kind: Kind, message: impl Into<String>) -> Self {
        let (status, code) = kind.status();
        Self { status, code, message: message.into() }
    }

    /// A bad request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::of(Kind::Invalid, message)
    }

    /// No such thing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::of(Kind::NotFound, message)
    }

    /// Not now.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::of(Kind::Conflict, message)
    }

    /// Our fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::of(Kind::Internal, message)
    }
}

impl<E: Status> From<E> for ApiFailure {
    fn from(e: E) -> Self {
        Self::of(e.kind(), e.message())
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.status, Json(ApiError { code: self.code.to_owned(), message: self.message })).into_response()
    }
}

impl Status for StoreError {
    fn kind(&self) -> Kind {
        match self {
            Self::NotFound { .. } => Kind::NotFound,
            Self::NameTaken { .. } | Self::ForwardTaken { .. } => Kind::Conflict,
            Self::Ambiguous { .. } => Kind::Invalid,
            _ => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::NotFound { kind: "vm", reference } => format!("no vm '{reference}'; see `banger vm list`"),
            Self::NotFound { kind: "operation", reference } => {
                format!("no operation '{reference}'; see `banger op list`")
            }
            Self::NotFound { .. } | Self::Ambiguous { .. } => self.to_string(),
            Self::NameTaken { kind, name } => format!(
                "a {kind} named '{name}' already exists; pick another name or delete it with `banger {kind} delete {name}`"
            ),
            Self::ForwardTaken { .. } => format!("{self}; see `banger vm forward NAME --list` for each vm"),
            _ => error_chain(self),
        }
    }
}

impl Status for FleetError {
    fn kind(&self) -> Kind {
        match self {
            Self::Store(e) => e.kind(),
            Self::NotRunning { .. } => Kind::Conflict,
            Self::Select(_) => Kind::Invalid,
            Self::WrongGuard { .. } => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Store(e) => e.message(),
            // The selection error says what is missing and the fix on its own.
            Self::Select(e) => error_chain(e),
            _ => error_chain(self),
        }
    }
}

impl Status for FilesError {
    fn kind(&self) -> Kind {
        use crate::agent_conn::AgentError;
        use banger_proto::fs::FsErrorCode;
        match self {
            Self::Fleet(e) => e.kind(),
            Self::BadPath(_) | Self::NotADirectory { .. } | Self::Refused { .. } | Self::Upload { .. } => Kind::Invalid,
            Self::Guest { error, .. } => match error.code {
                FsErrorCode::NotFound => Kind::NotFound,
                FsErrorCode::Invalid => Kind::Invalid,
                FsErrorCode::Conflict => Kind::Conflict,
                FsErrorCode::Io => Kind::Internal,
            },
            // The vm stopped meanwhile, or its agent is not there (yet).
            Self::Agent {
                source: AgentError::Lost | AgentError::Connect { .. } | AgentError::Handshake { .. },
                ..
            } => Kind::Conflict,
            Self::Agent { .. } | Self::Unexpected { .. } => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Fleet(e) => e.message(),
            _ => error_chain(self),
        }
    }
}

impl Status for ListenError {
    fn kind(&self) -> Kind {
        match self {
            Self::InUse { .. } => Kind::Conflict,
            _ => Kind::Invalid,
        }
    }
}

impl Status for NetError {
    fn kind(&self) -> Kind {
        match self {
            Self::Store(e) => e.kind(),
            Self::Exhausted(_) | Self::Claim(claim::ClaimError::Taken { .. }) => Kind::Conflict,
            Self::Egress(_) => Kind::Invalid,
            Self::Host(_) | Self::Dns(_) | Self::Claim(_) => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Store(e) => e.message(),
            _ => error_chain(self),
        }
    }
}

impl Status for CallerError {
    fn kind(&self) -> Kind {
        Kind::Invalid
    }
}

impl Status for crate::services::container_disk::ContainerDiskError {
    fn kind(&self) -> Kind {
        match self {
            Self::Copy { .. } => Kind::Internal,
            _ => Kind::Invalid,
        }
    }
}

impl Status for GitIdentityError {
    fn kind(&self) -> Kind {
        Kind::Invalid
    }
}

impl Status for SshError {
    fn kind(&self) -> Kind {
        match self {
            Self::Store(e) => e.kind(),
            Self::Fleet(e) => e.kind(),
            Self::NoAddress { .. } => Kind::Conflict,
            _ => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Store(e) => e.message(),
            Self::Fleet(e) => e.message(),
            _ => error_chain(self),
        }
    }
}

impl Status for ForwardsError {
    fn kind(&self) -> Kind {
        match self {
            Self::Store(e) => e.kind(),
            Self::Listen(e) => e.kind(),
            Self::Spec(_) | Self::PublishOverlap { .. } | Self::Ambiguous { .. } => Kind::Invalid,
            Self::Taken { .. } => Kind::Conflict,
            Self::NoSuchForward { .. } => Kind::NotFound,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Store(e) => e.message(),
            _ => error_chain(self),
        }
    }
}

impl Status for SessionsError {
    fn kind(&self) -> Kind {
        match self {
            Self::Store(e) => e.kind(),
            Self::Fleet(e) => e.kind(),
            Self::Invalid(_) => Kind::Invalid,
            Self::NoSuchSession { .. } => Kind::NotFound,
            Self::NameTaken { .. } | Self::StillStarting(_) => Kind::Conflict,
            Self::UnexpectedAnswer(_) | Self::Signal { .. } | Self::Vanished => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Store(e) => e.message(),
            Self::Fleet(e) => e.message(),
            _ => error_chain(self),
        }
    }
}

impl Status for AgentBinaryError {
    fn kind(&self) -> Kind {
        Kind::Internal
    }
}

impl Status for ArtifactsError {
    fn kind(&self) -> Kind {
        match self {
            Self::Ops(e) => e.kind(),
            Self::Caller(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::InvalidName { .. }
            | Self::NotAFile(_)
            | Self::Recipe(_)
            | Self::NoImageName(_)
            | Self::KernelPull(_)
            | Self::ImageBuild(_)
            | Self::ImagePull { .. }
            | Self::Dockerfile(_)
            | Self::NotTrusted => Kind::Invalid,
            Self::Exists { .. } | Self::MadeMeanwhile(_) | Self::InUse { .. } | Self::Running(_) => Kind::Conflict,
            Self::Catalog(_) | Self::NotAvailable { .. } | Self::NotFound { .. } | Self::NoBase(_) => Kind::NotFound,
            Self::Dir { .. }
            | Self::KernelFiles { .. }
            | Self::ImageFiles { .. }
            | Self::Disk(_)
            | Self::Agent(_)
            | Self::Task(_)
            | Self::Remove { .. }
            | Self::Injected(_) => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Ops(e) => e.message(),
            Self::Store(e) => e.message(),
            _ => error_chain(self),
        }
    }
}

impl Status for SnapshotsError {
    fn kind(&self) -> Kind {
        match self {
            Self::Store(e) => e.kind(),
            Self::Fleet(e) => e.kind(),
            Self::Ssh(e) => e.kind(),
            Self::Transition(_) | Self::NotSnapshottable { .. } | Self::HasForks { .. } => Kind::Conflict,
            Self::NotFound(_) => Kind::NotFound,
            Self::Control { source: ControlError::NotSupported { .. }, .. }
            | Self::InvalidName(_)
            | Self::ForkDiffers { .. }
            | Self::NoNetwork(_) => Kind::Invalid,
            Self::Control { .. }
            | Self::Dir { .. }
            | Self::Copy(_)
            | Self::Fork { .. }
            | Self::Read { .. }
            | Self::Remove { .. }
            | Self::Agent(_)
            | Self::Task(_)
            | Self::Injected(_) => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Store(e) => e.message(),
            Self::Fleet(e) => e.message(),
            Self::Ssh(e) => e.message(),
            // The driver's refusal names the fix on its own.
            Self::Control { source: source @ ControlError::NotSupported { .. }, .. } => error_chain(source),
            _ => error_chain(self),
        }
    }
}

impl Status for LifecycleError {
    fn kind(&self) -> Kind {
        match self {
            Self::Ops(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::Fleet(e) => e.kind(),
            Self::Artifacts(e) => e.kind(),
            Self::Ssh(e) => e.kind(),
            Self::Snapshots(e) => e.kind(),
            Self::Address(e) => e.kind(),
            Self::Transition(_) | Self::AlreadyRunning(_) | Self::StoppedWhileBooting(_) | Self::Cancelled => {
                Kind::Conflict
            }
            Self::Network(_)
            | Self::Launch(_)
            | Self::Handles(_)
            | Self::Resume { .. }
            | Self::NotReady { .. }
            | Self::PortNotReady { .. }
            | Self::StillRunning(_)
            | Self::Injected(_) => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Ops(e) => e.message(),
            Self::Store(e) => e.message(),
            Self::Fleet(e) => e.message(),
            Self::Artifacts(e) => e.message(),
            Self::Ssh(e) => e.message(),
            Self::Snapshots(e) => e.message(),
            Self::Address(e) => e.message(),
            _ => error_chain(self),
        }
    }
}

impl Status for VmsError {
    fn kind(&self) -> Kind {
        match self {
            Self::Ops(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::Fleet(e) => e.kind(),
            Self::Forwards(e) => e.kind(),
            Self::Net(e) => e.kind(),
            Self::Ssh(e) => e.kind(),
            Self::Snapshots(e) => e.kind(),
            Self::Lifecycle(e) => e.kind(),
            Self::ContainerDisk(e) => e.kind(),
            Self::Name(_)
            | Self::RefName { .. }
            | Self::Size(_)
            | Self::Git(_)
            | Self::Egress(_)
            | Self::NothingToChange
            | Self::DiskShrink { .. } => Kind::Invalid,
            Self::Transition(_) | Self::Running(_) | Self::UnstartedFork(_) | Self::Cancelled(_) => Kind::Conflict,
            Self::VmDir { .. } | Self::Ports { .. } | Self::UnexpectedAnswer { .. } => Kind::Internal,
            Self::RemoveDir { .. } | Self::Injected(_) => Kind::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Ops(e) => e.message(),
            Self::Store(e) => e.message(),
            Self::Fleet(e) => e.message(),
            Self::Forwards(e) => e.message(),
            Self::Net(e) => e.message(),
            Self::Ssh(e) => e.message(),
            Self::Snapshots(e) => e.message(),
            Self::Lifecycle(e) => e.message(),
            _ => error_chain(self),
        }
    }
}

impl Status for WorkspaceError {
    fn kind(&self) -> Kind {
        match self {
            Self::Store(e) => e.kind(),
            Self::Fleet(e) => e.kind(),
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Store(e) => e.message(),
            Self::Fleet(e) => e.message(),
        }
    }
}

impl Status for crate::services::workspace::attach::AttachError {
    fn kind(&self) -> Kind {
        match self {
            Self::NoFreeSlot { .. } | Self::Stopped { .. } => Kind::Conflict,
            Self::NotAttached { .. } => Kind::NotFound,
            Self::BadSize { .. } | Self::OutOfBounds { .. } | Self::Stream(_) | Self::ClientGone => Kind::Invalid,
            Self::Io { .. } | Self::Resize { .. } | Self::Agent { .. } => Kind::Internal,
        }
    }
}

impl Status for OpsError {
    fn kind(&self) -> Kind {
        match self {
            Self::Store(e) => e.kind(),
            Self::NotRunning { .. } => Kind::Conflict,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Store(e) => e.message(),
            Self::NotRunning { .. } => error_chain(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn binding_errors_map_to_conflict_or_invalid() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        assert_eq!(ApiFailure::from(ListenError::InUse { addr }).code, "conflict");
        assert_eq!(ApiFailure::from(ListenError::NoSuchAddress { addr }).code, "invalid_request");
    }

    #[test]
    fn store_errors_keep_their_fix() {
        let e = ApiFailure::from(StoreError::NotFound { kind: "vm", reference: "web".into() });
        assert_eq!((e.status, e.message.as_str()), (StatusCode::NOT_FOUND, "no vm 'web'; see `banger vm list`"));
        let wrapped = ApiFailure::from(VmsError::Lifecycle(LifecycleError::Store(StoreError::NotFound {
            kind: "vm",
            reference: "web".into(),
        })));
        assert_eq!(wrapped, e, "a wrapped store error answers as the store error");
    }

    #[test]
    fn a_chain_is_one_line_with_its_causes() {
        let e = ApiFailure::from(SnapshotsError::Dir {
            path: "/s/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "no space"),
        });
        assert_eq!((e.code, e.message.as_str()), ("internal", "cannot create /s/x: no space"));
    }
}
