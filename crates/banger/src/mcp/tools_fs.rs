//! The file tools: read, write, list, stat, mkdir and remove, on absolute guest paths, through
//! the daemon's file routes (the CLI's helpers, `crate::files`).

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::command::{self, Line};
use super::limits::{self, Encoding, READ_DEFAULT};
use super::{reply, Banger, ToolError};
use crate::files;

/// A file route's answer as a tool's value.
fn value(answer: &impl serde::Serialize) -> Result<Value, ToolError> {
    serde_json::to_value(answer).map_err(|e| ToolError::Failed(e.to_string()))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PathArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// Absolute path in the guest
    pub path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ReadArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// Absolute path of a file in the guest
    pub path: String,
    /// "utf8" (text; a file that is not UTF-8 is refused) or "base64" (any bytes) [default: utf8]
    pub encoding: Option<Encoding>,
    /// Bytes returned at most; a larger file is cut with a marker giving its size [default:
    /// 1048576 (1 MiB), at most 16 MiB]
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WriteArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// Absolute path of the file in the guest (replaced if it exists)
    pub path: String,
    /// The contents: text, or base64 with encoding "base64"; at most 16 MiB once decoded
    pub content: String,
    /// "utf8" or "base64" [default: utf8]
    pub encoding: Option<Encoding>,
    /// Permission bits in octal, e.g. "755" or "0644" [default: 644]
    pub mode: Option<String>,
    /// Make missing parent directories [default: true]
    pub parents: Option<bool>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct MkdirArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// Absolute path of the directory in the guest
    pub path: String,
    /// Make missing parents too, and succeed if it exists [default: true]
    pub parents: Option<bool>,
    /// Permission bits in octal, e.g. "755" [default: 755]
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RemoveArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// Absolute path in the guest
    pub path: String,
    /// Remove a directory and everything in it [default: false]
    pub recursive: Option<bool>,
}

/// A guest path the routes take: absolute.
fn absolute(path: &str) -> Result<&str, ToolError> {
    if path.starts_with('/') {
        Ok(path)
    } else {
        Err(ToolError::Invalid(format!("path '{path}' is not absolute; give the full guest path, e.g. /root/{path}")))
    }
}

/// Octal permission bits.
fn mode(text: Option<&str>) -> Result<Option<u32>, ToolError> {
    text.map(|t| {
        u32::from_str_radix(t.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| {
            ToolError::Invalid(format!("mode '{t}' is not octal permission bits such as \"644\" or \"0755\""))
        })
    })
    .transpose()
}

#[tool_router(router = fs_router, vis = "pub(super)")]
impl Banger {
    /// Read a file in a sandbox, as text or base64. At most max_bytes (default 1 MiB) are
    /// returned; a larger file is cut with a marker giving its size.
    #[tool(annotations(read_only_hint = true))]
    async fn fs_read(&self, Parameters(a): Parameters<ReadArgs>) -> CallToolResult {
        let encoding = a.encoding.unwrap_or_default();
        let result = async {
            let path = absolute(&a.path)?;
            let limit = limits::limit(a.max_bytes, READ_DEFAULT);
            let (size, kept) = files::read(self.api().await?, &a.name, path, limit as u64).await?;
            let size = size.max(kept.len() as u64);
            let truncated = size > kept.len() as u64;
            let mut content = encoding.encode(&kept, truncated).map_err(ToolError::Invalid)?;
            if truncated && encoding == Encoding::Utf8 {
                content.push_str(&limits::marker(size));
            }
            Ok(json!({
                "path": path, "size": size, "encoding": encoding.as_str(), "content": content,
                "truncated": truncated, "bytes_returned": kept.len(),
            }))
        }
        .await;
        reply(command::guest(&a.name, &["cat"], &a.path), result)
    }

    /// Write a file in a sandbox (text, or base64 for binary; at most 16 MiB), replacing it if
    /// it exists; returns its stat.
    #[tool]
    async fn fs_write(&self, Parameters(a): Parameters<WriteArgs>) -> CallToolResult {
        let line = Line::banger(&["vm", "cp", "FILE", &format!("{}:{}", a.name, a.path)]).text();
        let result = async {
            let path = absolute(&a.path)?;
            let bytes = a.encoding.unwrap_or_default().decode(&a.content).map_err(ToolError::Invalid)?;
            let mode = mode(a.mode.as_deref())?;
            let written = bytes.len();
            let stat = files::write(self.api().await?, &a.name, path, mode, a.parents.unwrap_or(true), bytes).await?;
            Ok(json!({ "path": path, "bytes_written": written, "stat": value(&stat)? }))
        }
        .await;
        reply(line, result)
    }

    /// List a directory in a sandbox: each entry's name, kind, size, mode and mtime.
    #[tool(annotations(read_only_hint = true))]
    async fn fs_list(&self, Parameters(a): Parameters<PathArgs>) -> CallToolResult {
        let result = async {
            let path = absolute(&a.path)?;
            let list = files::list(self.api().await?, &a.name, path).await?;
            let mut v = value(&list)?;
            if list.truncated {
                v["note"] = json!(format!("only the first {} entries are listed", list.entries.len()));
            }
            Ok(v)
        }
        .await;
        reply(command::guest(&a.name, &["ls", "-la"], &a.path), result)
    }

    /// Stat a path in a sandbox: kind (file, dir, symlink, other), size, mode, mtime and a
    /// symlink's target.
    #[tool(annotations(read_only_hint = true))]
    async fn fs_stat(&self, Parameters(a): Parameters<PathArgs>) -> CallToolResult {
        let result = async {
            let path = absolute(&a.path)?;
            value(&files::stat(self.api().await?, &a.name, path).await?)
        }
        .await;
        reply(command::guest(&a.name, &["stat"], &a.path), result)
    }

    /// Make a directory in a sandbox (with its parents unless `parents` is false).
    #[tool]
    async fn fs_mkdir(&self, Parameters(a): Parameters<MkdirArgs>) -> CallToolResult {
        let parents = a.parents.unwrap_or(true);
        let program: &[&str] = if parents { &["mkdir", "-p"] } else { &["mkdir"] };
        let result = async {
            let path = absolute(&a.path)?;
            let mode = mode(a.mode.as_deref())?;
            let req = banger_proto::fs::MkdirRequest { path: path.to_owned(), parents, mode };
            value(&files::mkdir(self.api().await?, &a.name, &req).await?)
        }
        .await;
        reply(command::guest(&a.name, program, &a.path), result)
    }

    /// Remove a file, symlink or empty directory in a sandbox (a whole tree with `recursive`).
    #[tool(annotations(destructive_hint = true))]
    async fn fs_remove(&self, Parameters(a): Parameters<RemoveArgs>) -> CallToolResult {
        let recursive = a.recursive.unwrap_or(false);
        let program: &[&str] = if recursive { &["rm", "-r"] } else { &["rm", "-d"] };
        let result = async {
            let path = absolute(&a.path)?;
            files::remove(self.api().await?, &a.name, path, recursive).await?;
            Ok::<Value, ToolError>(json!({ "path": path, "removed": true }))
        }
        .await;
        reply(command::guest(&a.name, program, &a.path), result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_modes_octal() {
        assert!(absolute("/root/x").is_ok());
        let err = absolute("x.py").expect_err("relative");
        assert!(err.to_string().contains("/root/x.py"), "{err}");
        assert_eq!(mode(Some("644")).expect("octal"), Some(0o644));
        assert_eq!(mode(Some("0755")).expect("octal"), Some(0o755));
        assert_eq!(mode(None).expect("none"), None);
        assert!(mode(Some("9")).is_err());
        assert!(mode(Some("77777")).is_err());
    }
}
