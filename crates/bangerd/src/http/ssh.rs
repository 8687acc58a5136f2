//! SSH routes: how to reach one VM, and every VM as an ssh_config host.

use axum::extract::{Path, State};
use axum::Json;
use banger_proto::{ApiError, SshConfig, SshInfo};

use super::{ApiResult, Shared};

/// How to reach a running VM with `ssh`: address, user, the installation key and the pinned
/// host key. 409 when the VM has no network address or is not running.
#[utoipa::path(get, path = "/v1/vms/{vm}/ssh", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SshInfo), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub(super) async fn vm_ssh(State(d): Shared, Path(vm): Path<String>) -> ApiResult<SshInfo> {
    Ok(Json(d.ssh.ssh_info(&vm)?))
}

/// Every VM as an ssh_config host (for `banger ssh-config`).
#[utoipa::path(get, path = "/v1/ssh/config", responses((status = 200, body = SshConfig)))]
pub(super) async fn ssh_config(State(d): Shared) -> ApiResult<SshConfig> {
    Ok(Json(d.ssh.ssh_config()?))
}
