//! File routes under `/v1/vms/{vm}/files`: stat, list, mkdir, remove, a file's contents both
//! ways and tar archives both ways (the shape of Docker's `/containers/{id}/archive`). Bodies
//! stream both ways through the agent channel's flow control (see `services::files`).

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use banger_proto::fs::{
    ArchiveExtracted, FileList, FileStat, MkdirRequest, PathQuery, ReadQuery, RemoveQuery, WriteQuery, FILE_SIZE_HEADER,
};
use banger_proto::ApiError;

use super::{body, path, query, ApiFailure, ApiResult, PathParams, QueryParams, Shared};

/// Raw bytes: a file's contents or a tar stream.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[expect(dead_code, reason = "a schema only")]
pub(super) struct RawBytes(Vec<u8>);

/// The `lstat` of a path in a running VM: a symlink is described, never followed.
#[utoipa::path(get, path = "/v1/vms/{vm}/files/stat",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("path" = String, Query, description = "absolute guest path")),
    responses((status = 200, body = FileStat), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn stat_file(
    State(d): Shared,
    vm: PathParams<String>,
    q: QueryParams<PathQuery>,
) -> ApiResult<FileStat> {
    let (vm, q) = (path(vm)?, query(q)?);
    Ok(Json(d.files.stat(&vm, &q.path).await?))
}

/// A directory's entries (their `lstat`), sorted by name: at most 10,000, `truncated` when it
/// holds more.
#[utoipa::path(get, path = "/v1/vms/{vm}/files/list",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("path" = String, Query, description = "absolute guest directory")),
    responses((status = 200, body = FileList), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn list_files(
    State(d): Shared,
    vm: PathParams<String>,
    q: QueryParams<PathQuery>,
) -> ApiResult<FileList> {
    let (vm, q) = (path(vm)?, query(q)?);
    Ok(Json(d.files.list(&vm, &q.path).await?))
}

/// Makes a directory (with `parents`, missing parents too, and an existing directory is fine).
#[utoipa::path(post, path = "/v1/vms/{vm}/files/mkdir",
    params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = MkdirRequest,
    responses((status = 200, body = FileStat), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn make_dir(
    State(d): Shared,
    vm: PathParams<String>,
    req: Result<Json<MkdirRequest>, JsonRejection>,
) -> ApiResult<FileStat> {
    let vm = path(vm)?;
    let req = body(req, "MkdirRequest")?;
    Ok(Json(d.files.mkdir(&vm, &req).await?))
}

/// Removes a path. A symlink is removed itself, never its target; a non-empty directory only
/// with `recursive=true` (else 409); `/` never.
#[utoipa::path(delete, path = "/v1/vms/{vm}/files",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("path" = String, Query, description = "absolute guest path"),
        ("recursive" = Option<bool>, Query, description = "remove a directory with what it holds")),
    responses((status = 204, description = "removed"), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn remove_file(
    State(d): Shared,
    vm: PathParams<String>,
    q: QueryParams<RemoveQuery>,
) -> Result<StatusCode, ApiFailure> {
    let (vm, q) = (path(vm)?, query(q)?);
    d.files.remove(&vm, &q.path, q.recursive.unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A regular file's contents (symlinks followed), streamed: at most `limit` bytes when given.
/// The header `x-banger-file-size` carries the file's whole size.
#[utoipa::path(get, path = "/v1/vms/{vm}/files/content",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("path" = String, Query, description = "absolute guest path of a regular file"),
        ("limit" = Option<u64>, Query, description = "the most bytes to send")),
    responses(
        (status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = inline(RawBytes),
            headers(("x-banger-file-size" = u64, description = "the file's whole size in bytes"))),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn read_file(State(d): Shared, vm: PathParams<String>, q: QueryParams<ReadQuery>) -> Response {
    let answer = async {
        let (vm, q) = (path(vm)?, query(q)?);
        Ok::<_, ApiFailure>(d.files.read(&vm, &q.path, q.limit).await?)
    };
    match answer.await {
        Ok((size, stream)) => streamed("application/octet-stream", Some(size), Body::from_stream(stream)),
        Err(e) => e.into_response(),
    }
}

/// Writes a file from the request body (streamed): to a temporary file beside it, renamed over
/// it. `mode` is decimal (default 420 = `0644`); `parents=true` makes missing parent
/// directories (`0755`).
#[utoipa::path(put, path = "/v1/vms/{vm}/files/content",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("path" = String, Query, description = "absolute guest path"),
        ("mode" = Option<u32>, Query, description = "permission bits, decimal (default 420 = 0644)"),
        ("parents" = Option<bool>, Query, description = "make missing parent directories")),
    request_body(content = inline(RawBytes), content_type = "application/octet-stream", description = "the file's bytes"),
    responses((status = 200, body = FileStat), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn write_file(
    State(d): Shared,
    vm: PathParams<String>,
    q: QueryParams<WriteQuery>,
    req: Request,
) -> ApiResult<FileStat> {
    let (vm, q) = (path(vm)?, query(q)?);
    let body = req.into_body().into_data_stream();
    Ok(Json(d.files.write(&vm, &q.path, q.mode, q.parents.unwrap_or(false), body).await?))
}

/// A file or tree as a tar stream, its base name the top entry; symlinks are stored as
/// symlinks and never followed, modes are kept.
#[utoipa::path(get, path = "/v1/vms/{vm}/files/archive",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("path" = String, Query, description = "absolute guest path (not `/`)")),
    responses(
        (status = 200, description = "a tar stream", content_type = "application/x-tar", body = inline(RawBytes)),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn get_archive(State(d): Shared, vm: PathParams<String>, q: QueryParams<PathQuery>) -> Response {
    let answer = async {
        let (vm, q) = (path(vm)?, query(q)?);
        Ok::<_, ApiFailure>(d.files.pack(&vm, &q.path).await?)
    };
    match answer.await {
        Ok(stream) => streamed("application/x-tar", None, Body::from_stream(stream)),
        Err(e) => e.into_response(),
    }
}

/// Extracts a tar stream (the request body) into an existing directory, refusing any entry
/// that would land outside it: absolute names, `..`, writes through symlinks, symlinks pointing
/// out, hard links and device nodes. Set-id bits and owners are not taken from the stream.
#[utoipa::path(put, path = "/v1/vms/{vm}/files/archive",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("path" = String, Query, description = "absolute guest directory (must exist)")),
    request_body(content = inline(RawBytes), content_type = "application/octet-stream",
        description = "a tar stream (the content type is not checked: `application/x-tar` does as well)"),
    responses((status = 200, body = ArchiveExtracted), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn put_archive(
    State(d): Shared,
    vm: PathParams<String>,
    q: QueryParams<PathQuery>,
    req: Request,
) -> ApiResult<ArchiveExtracted> {
    let (vm, q) = (path(vm)?, query(q)?);
    let body = req.into_body().into_data_stream();
    Ok(Json(d.files.extract(&vm, &q.path, body).await?))
}

/// A `200` streaming `body`.
fn streamed(content_type: &'static str, size: Option<u64>, body: Body) -> Response {
    let mut builder = Response::builder().status(StatusCode::OK).header(header::CONTENT_TYPE, content_type);
    if let Some(size) = size {
        builder = builder.header(FILE_SIZE_HEADER, size);
    }
    builder.body(body).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
