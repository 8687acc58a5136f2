//! `banger image ...`: root filesystem images.

use std::process::ExitCode;

use banger_core::size::human_mib;
use banger_core::time::{age, human_duration};
use banger_core::{ImageRecord, OperationRecord};
use banger_proto::{BuildImageRequest, ImageList};
use clap::{Args, Subcommand};
use hyper::Method;

use super::segment;
use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image from a catalog recipe (e.g. `minimal`) with mmdebstrap and mkfs.ext4.
    Build(BuildArgs),
    /// List local images (and, with --catalog, the recipes the catalog can build).
    #[command(visible_alias = "ls")]
    List(super::CatalogListArgs),
    /// Delete an image no VM uses.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Catalog recipe name.
    name: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Image name.
    name: String,
}

pub async fn run(client: &Client, command: ImageCommand) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    match command {
        ImageCommand::Build(a) => {
            let op: OperationRecord =
                client.call(Method::POST, "/v1/images", Some(&BuildImageRequest { name: a.name.clone() })).await?;
            crate::progress::follow(client, op).await?;
            eprintln!("built image {}", a.name);
        }
        ImageCommand::List(a) => {
            let list: ImageList = client.get("/v1/images").await?;
            if a.json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .images
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.init_mode.as_str().to_owned(),
                            human_mib(i.size_bytes / (1024 * 1024)),
                            i.source.clone(),
                            format!("{} ago", human_duration(age(&i.created_at))),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "INIT", "SIZE", "SOURCE", "CREATED"], &rows)?;
                if a.catalog {
                    println!("\ncatalog: {}", list.catalog.join(", "));
                }
            }
        }
        ImageCommand::Delete(a) => {
            client
                .call::<ImageRecord>(Method::DELETE, &format!("/v1/images/{}", segment(&a.name)), None::<&()>)
                .await?;
            println!("{}", a.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
