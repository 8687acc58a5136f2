//! `banger image ...`: root filesystem images.

use std::process::ExitCode;

use anyhow::Context as _;
use banger_core::size::human_mib;
use banger_core::time::{age, human_duration};
use banger_proto::{
    BuildImageRequest, DockerfileBuild, ImageList, ImageRecipe, ImageRecord, OperationRecord, PromoteRequest,
    PullImageRequest, RegisterImageRequest,
};
use clap::{Args, Subcommand};
use hyper::Method;

use super::segment;
use crate::client::Client;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image with mmdebstrap and mkfs.ext4: a catalog recipe (e.g. `minimal`), or your
    /// own with --recipe FILE.toml (keys: suite, variant, packages, init = "fast"|"systemd",
    /// [[files]] path/mode/contents); or from a Dockerfile with --dockerfile (built by buildah
    /// on the host, no Docker daemon; `FROM banger/NAME` starts from a local image).
    Build(BuildArgs),
    /// Show one image.
    Show(ShowArgs),
    /// Pull an OCI image: a registry reference (host:port/repo:tag), an OCI layout directory
    /// (DIR[:TAG]) or a docker-archive tarball. Layers are flattened safely into an ext4 image.
    Pull(PullArgs),
    /// Register an existing ext4 file as an image (it is copied; the original is untouched).
    Register(RegisterArgs),
    /// Make a stopped VM's root (its image plus everything it changed) a new image.
    Promote(PromoteArgs),
    /// List local images (and, with --catalog, the recipes the catalog can build).
    #[command(visible_alias = "ls")]
    List(super::CatalogListArgs),
    /// Delete an image no VM uses.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Catalog recipe name, or the new image's name with --recipe.
    name: String,
    /// A recipe file (TOML) instead of the catalog's.
    #[arg(long, conflicts_with = "dockerfile")]
    recipe: Option<std::path::PathBuf>,
    /// A Dockerfile to build (its RUN steps run as root on this host: build only ones you trust).
    #[arg(long)]
    dockerfile: Option<std::path::PathBuf>,
    /// The build context for --dockerfile [default: the Dockerfile's directory].
    #[arg(long, requires = "dockerfile")]
    context: Option<std::path::PathBuf>,
    /// A build argument for --dockerfile (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE", requires = "dockerfile", value_parser = parse_build_arg)]
    build_args: Vec<(String, String)>,
}

fn parse_build_arg(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("'{arg}' is not KEY=VALUE")),
    }
}

/// An absolute form of `path` (the daemon resolves nothing against the CLI's directory).
fn absolute(path: &std::path::Path) -> anyhow::Result<String> {
    let path = std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    path.to_str().map(str::to_owned).with_context(|| format!("{} is not UTF-8", path.display()))
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// What to pull.
    reference: String,
    /// Local name [default: the reference's last path component].
    #[arg(long)]
    name: Option<String>,
    /// Use plain HTTP (for registries on localhost).
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The ext4 file.
    file: std::path::PathBuf,
    /// The image's name.
    #[arg(long)]
    name: String,
    /// How its guest starts: fast (banger-agent is PID 1) or systemd.
    #[arg(long, value_parser = parse_init)]
    init: Option<banger_core::InitMode>,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The stopped VM (name, id or id prefix).
    vm: String,
    /// The new image's name.
    #[arg(long)]
    name: String,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Image name.
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
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
            let recipe = match &a.recipe {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read recipe {}", path.display()))?;
                    Some(
                        toml::from_str::<ImageRecipe>(&text)
                            .with_context(|| format!("invalid recipe {}", path.display()))?,
                    )
                }
                None => None,
            };
            let dockerfile = match &a.dockerfile {
                Some(path) => Some(DockerfileBuild {
                    path: absolute(path)?,
                    context: a.context.as_deref().map(absolute).transpose()?,
                    build_args: a.build_args.iter().cloned().collect(),
                }),
                None => None,
            };
            let req = BuildImageRequest { name: a.name.clone(), recipe, dockerfile };
            let op: OperationRecord = client.call(Method::POST, "/v1/images", Some(&req)).await?;
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
        ImageCommand::Pull(a) => {
            // A local layout or archive path is the caller's, not the daemon's working directory.
            let reference = absolute_if_local(&a.reference);
            let req = PullImageRequest { reference, name: a.name, insecure: a.insecure };
            let op: OperationRecord = client.call(Method::POST, "/v1/images/pull", Some(&req)).await?;
            let done = crate::progress::follow(client, op).await?;
            eprintln!("pulled image {}", done.result_id.unwrap_or_default());
        }
        ImageCommand::Register(a) => {
            let file = std::path::absolute(&a.file).unwrap_or(a.file);
            let req = RegisterImageRequest {
                name: a.name.clone(),
                file: file.display().to_string(),
                init: a.init.map(Into::into),
            };
            let op: OperationRecord = client.call(Method::POST, "/v1/images/register", Some(&req)).await?;
            crate::progress::follow(client, op).await?;
            eprintln!("registered image {}", a.name);
        }
        ImageCommand::Promote(a) => {
            let req = PromoteRequest { name: a.name.clone() };
            let path = format!("/v1/vms/{}/promote", segment(&a.vm));
            let op: OperationRecord = client.call(Method::POST, &path, Some(&req)).await?;
            crate::progress::follow(client, op).await?;
            eprintln!("promoted {} to image {}", a.vm, a.name);
        }
        ImageCommand::Show(a) => {
            let i: ImageRecord = client.get(&format!("/v1/images/{}", segment(&a.name))).await?;
            if a.json {
                output::json(&i)?;
            } else {
                output::fields(&[
                    ("name", i.name.clone()),
                    ("source", i.source.clone()),
                    ("init", i.init_mode.as_str().to_owned()),
                    ("rootfs", i.rootfs.clone()),
                    ("size", human_mib(i.size_bytes / (1024 * 1024))),
                    ("sha256", i.sha256.clone().unwrap_or_else(|| "-".into())),
                    ("work seed", i.work_seed.clone().unwrap_or_else(|| "-".into())),
                    ("created", i.created_at.clone()),
                ])?;
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

/// `reference` made absolute when it names a local path (an OCI layout `DIR[:TAG]` or an archive).
fn absolute_if_local(reference: &str) -> String {
    let path_part = match reference.rsplit_once(':') {
        Some((dir, _tag)) if std::path::Path::new(dir).is_dir() => dir,
        _ => reference,
    };
    let p = std::path::Path::new(path_part);
    if !p.exists() || p.is_absolute() {
        return reference.to_owned();
    }
    match std::path::absolute(p) {
        Ok(abs) => format!("{}{}", abs.display(), &reference[path_part.len()..]),
        Err(_) => reference.to_owned(),
    }
}

fn parse_init(text: &str) -> Result<banger_core::InitMode, String> {
    banger_core::InitMode::parse(text).ok_or_else(|| format!("'{text}' is not an init mode; use fast or systemd"))
}
