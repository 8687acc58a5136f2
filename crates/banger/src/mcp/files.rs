//! The fs_* tools' side of the daemon's file routes (`/v1/vms/{vm}/files/...`): stat, list,
//! content (read and write), mkdir and remove. Bodies are read with a bound: a read keeps at
//! most its limit whatever the daemon sends.

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use serde_json::Value;

use super::limits::Capped;
use crate::client::{api_error, ApiErrorAnswer, Client};
use crate::cmd::segment;

/// The header that carries a file's whole size on a content read.
const SIZE_HEADER: &str = "x-banger-file-size";

fn route(vm: &str, what: &str, path: &str) -> String {
    format!("/v1/vms/{}/files{what}?path={}", segment(vm), segment(path))
}

/// The first `limit` bytes of a guest file, and its whole size.
pub struct Read {
    pub bytes: Capped,
    pub size: u64,
}

/// `GET .../files/stat`.
pub async fn stat(client: &Client, vm: &str, path: &str) -> anyhow::Result<Value> {
    client.get(&route(vm, "/stat", path)).await
}

/// `GET .../files/list`.
pub async fn list(client: &Client, vm: &str, path: &str) -> anyhow::Result<Value> {
    client.get(&route(vm, "/list", path)).await
}

/// `POST .../files/mkdir`.
pub async fn mkdir(client: &Client, vm: &str, path: &str, parents: bool, mode: Option<u32>) -> anyhow::Result<Value> {
    let body = serde_json::json!({ "path": path, "parents": parents, "mode": mode });
    client.call(Method::POST, &format!("/v1/vms/{}/files/mkdir", segment(vm)), Some(&body)).await
}

/// `DELETE .../files`.
pub async fn remove(client: &Client, vm: &str, path: &str, recursive: bool) -> anyhow::Result<()> {
    let uri = format!("{}&recursive={recursive}", route(vm, "", path));
    let (status, bytes) = send(client, Method::DELETE, &uri, Bytes::new(), 64 * 1024).await?;
    if !status.is_success() {
        return Err(ApiErrorAnswer { status, body: api_error(status, bytes.bytes()) }.into());
    }
    Ok(())
}

/// `GET .../files/content?limit=N`: at most `limit` bytes.
pub async fn read(client: &Client, vm: &str, path: &str, limit: usize) -> anyhow::Result<Read> {
    let uri = format!("{}&limit={limit}", route(vm, "/content", path));
    let req =
        Request::get(&uri).header("host", "bangerd").body(Full::new(Bytes::new())).context("cannot build request")?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let size = resp.headers().get(SIZE_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let body = bounded(resp.into_body(), limit).await?;
    if !status.is_success() {
        return Err(ApiErrorAnswer { status, body: api_error(status, body.bytes()) }.into());
    }
    let size = size.unwrap_or(body.total()).max(body.total());
    Ok(Read { bytes: body, size })
}

/// `PUT .../files/content`: writes `bytes` to `path`; the written file's stat.
pub async fn write(
    client: &Client,
    vm: &str,
    path: &str,
    bytes: Vec<u8>,
    mode: Option<u32>,
    parents: bool,
) -> anyhow::Result<Value> {
    let mut uri = format!("{}&parents={parents}", route(vm, "/content", path));
    if let Some(mode) = mode {
        uri.push_str(&format!("&mode={mode}"));
    }
    let (status, body) = send(client, Method::PUT, &uri, Bytes::from(bytes), 1024 * 1024).await?;
    if !status.is_success() {
        return Err(ApiErrorAnswer { status, body: api_error(status, body.bytes()) }.into());
    }
    serde_json::from_slice(body.bytes()).context("cannot decode bangerd's answer to a file write")
}

async fn send(
    client: &Client,
    method: Method,
    uri: &str,
    body: Bytes,
    limit: usize,
) -> anyhow::Result<(hyper::StatusCode, Capped)> {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "bangerd")
        .header("content-type", "application/octet-stream")
        .body(Full::new(body))
        .context("cannot build request")?;
    let resp = client.request(req).await?;
    let status = resp.status();
    Ok((status, bounded(resp.into_body(), limit).await?))
}

/// A body's first `limit` bytes; reading stops once past it.
async fn bounded(mut body: hyper::body::Incoming, limit: usize) -> anyhow::Result<Capped> {
    let mut kept = Capped::new(limit);
    while let Some(frame) = body.frame().await {
        let frame = frame.context("bangerd's answer broke off")?;
        if let Ok(data) = frame.into_data() {
            kept.push(&data);
            if kept.truncated() {
                break;
            }
        }
    }
    Ok(kept)
}
