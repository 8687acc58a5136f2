//! `banger kernel ...`: guest kernels.

use std::process::ExitCode;

use banger_core::time::{age, human_duration};
use banger_proto::{KernelList, KernelRecord, OperationRecord, PullKernelRequest};
use clap::{Args, Subcommand};
use hyper::Method;

use super::segment;
use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Pull a kernel: from the catalog through the host's apt archive, or `--from` a local
    /// linux-image-*.deb or a URL.
    Pull(PullArgs),
    /// List pulled kernels (and, with --catalog, the names the catalog can pull).
    #[command(visible_alias = "ls")]
    List(super::CatalogListArgs),
    /// Delete a pulled kernel.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Catalog name (e.g. debian-6.1-cloud), or the name for a kernel given with --from.
    name: String,
    /// A linux-image-*.deb file or URL instead of the host's apt archive.
    #[arg(long)]
    from: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kernel name.
    name: String,
}

pub async fn run(client: &Client, command: KernelCommand) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    match command {
        KernelCommand::Pull(a) => {
            // A relative path means the caller's directory, not the daemon's.
            let from = a.from.map(|f| match std::path::Path::new(&f) {
                p if p.exists() && p.is_relative() => {
                    std::env::current_dir().map(|d| d.join(p).display().to_string()).unwrap_or(f)
                }
                _ => f,
            });
            let op: OperationRecord = client
                .call(Method::POST, "/v1/kernels", Some(&PullKernelRequest { name: a.name.clone(), from }))
                .await?;
            crate::progress::follow(client, op).await?;
            let list: KernelList = client.get("/v1/kernels").await?;
            if let Some(k) = list.kernels.iter().find(|k| k.name == a.name) {
                eprintln!("pulled kernel {} ({} {})", k.name, k.release, k.version);
            }
        }
        KernelCommand::List(a) => {
            let list: KernelList = client.get("/v1/kernels").await?;
            if a.json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list.kernels.iter().map(row).collect();
                output::table(&["NAME", "RELEASE", "VERSION", "SOURCE", "PULLED"], &rows)?;
                if a.catalog {
                    println!("\ncatalog: {}", list.catalog.join(", "));
                }
            }
        }
        KernelCommand::Delete(a) => {
            client
                .call::<KernelRecord>(Method::DELETE, &format!("/v1/kernels/{}", segment(&a.name)), None::<&()>)
                .await?;
            println!("{}", a.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn row(k: &KernelRecord) -> Vec<String> {
    vec![
        k.name.clone(),
        k.release.clone(),
        k.version.clone(),
        k.source.clone(),
        format!("{} ago", human_duration(age(&k.created_at))),
    ]
}
