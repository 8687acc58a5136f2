//! Registry sources, pulled anonymously with `oci-client` on a private current-thread runtime.
//!
//! TLS is rustls with the `ring` provider (installed as the process default if none is), which
//! keeps aws-lc-sys out of the build. Image indexes are resolved to linux/amd64 here rather than
//! by the client, so a missing platform names the ones the index has.

use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::{OciDescriptor, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::local::{pick_platform, Descriptor, Platform};
use super::{io_error, sha256_hex, BlobLocation, FetchedImage, ImageConfig, LayerBlob, PullImageError};

/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;
/// Largest image config read into memory.
const MAX_CONFIG: u64 = 16 * 1024 * 1024;

type Fetched = (FetchedImage, Option<(BlobLocation, String)>);

/// Pulls the manifest of `reference` (resolving indexes to linux/amd64), its config and its
/// layers into `blobs_dir`, reporting `resolve` and `fetch`.
pub(crate) fn fetch(
    reference: &str,
    insecure: bool,
    blobs_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Fetched, PullImageError> {
    let parsed: Reference =
        reference.parse().map_err(|source| PullImageError::BadReference { reference: reference.to_owned(), source })?;
    let whole = parsed.whole();
    let registry_error = |source: OciDistributionError| PullImageError::Registry {
        reference: whole.clone(),
        hint: if insecure { "" } else { "; for a plain-HTTP registry (e.g. on localhost) pass --insecure" },
        source,
    };
    // Another part of the process may have installed a provider already; either is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ClientConfig {
        protocol: if insecure { ClientProtocol::Http } else { ClientProtocol::Https },
        platform_resolver: None,
        ..ClientConfig::default()
    };
    let client = Client::try_from(config).map_err(registry_error)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io_error(blobs_dir))?;
    let auth = RegistryAuth::Anonymous;

    runtime.block_on(async {
        progress("resolve");
        let mut target = parsed.clone();
        let mut resolved = None;
        for _ in 0..MAX_INDEX_DEPTH {
            let (manifest, digest) = client.pull_manifest(&target, &auth).await.map_err(registry_error)?;
            match manifest {
                OciManifest::Image(image) => {
                    resolved = Some((image, digest));
                    break;
                }
                OciManifest::ImageIndex(index) => {
                    let entries: Vec<Descriptor> = index
                        .manifests
                        .iter()
                        .map(|entry| Descriptor {
                            media_type: entry.media_type.clone(),
                            digest: entry.digest.clone(),
                            annotations: Default::default(),
                            platform: entry
                                .platform
                                .as_ref()
                                .map(|p| Platform { architecture: p.architecture.to_string(), os: p.os.to_string() }),
                        })
                        .collect();
                    let picked = pick_platform(&entries, &whole)?;
                    target = parsed.clone_with_digest(picked.digest.clone());
                }
            }
        }
        let Some((manifest, manifest_digest)) = resolved else {
            return Err(PullImageError::BadDocument {
                what: "image index".to_owned(),
                reference: whole.clone(),
                reason: "indexes nest too deeply".to_owned(),
            });
        };

        progress("fetch");
        let config_blob = download(&client, &target, &manifest.config, blobs_dir, &whole).await?;
        let config_bytes = tokio::fs::read(&config_blob.path).await.map_err(io_error(&config_blob.path))?;
        if config_bytes.len() as u64 > MAX_CONFIG {
            return Err(PullImageError::BadDocument {
                what: "image config".to_owned(),
                reference: whole.clone(),
                reason: "it is larger than 16 MiB".to_owned(),
            });
        }
        let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| PullImageError::BadDocument {
            what: "image config".to_owned(),
            reference: whole.clone(),
            reason: e.to_string(),
        })?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for layer in &manifest.layers {
            let blob = download(&client, &target, layer, blobs_dir, &whole).await?;
            layers.push(LayerBlob {
                blob,
                digest: Some(layer.digest.clone()),
                diff_id: None,
                media_type: layer.media_type.clone(),
            });
        }
        let image = FetchedImage { reference: whole.clone(), manifest_digest: Some(manifest_digest), config, layers };
        Ok((image, Some((config_blob, manifest.config.digest.clone()))))
    })
}

/// Downloads one blob to `blobs_dir/HEX` (the client checks the digest as it streams; `verify`
/// checks the file again).
async fn download(
    client: &Client,
    reference: &Reference,
    descriptor: &OciDescriptor,
    blobs_dir: &Path,
    whole: &str,
) -> Result<BlobLocation, PullImageError> {
    let hex = sha256_hex(&descriptor.digest, whole)?;
    let path = blobs_dir.join(hex);
    if !path.exists() {
        let partial = blobs_dir.join(format!("{hex}.partial"));
        let file = tokio::fs::File::create(&partial).await.map_err(io_error(&partial))?;
        client.pull_blob(reference, descriptor, file).await.map_err(|source| match source {
            OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
                PullImageError::DigestMismatch { what: format!("blob {}", descriptor.digest), expected, actual }
            }
            source => PullImageError::Registry { reference: whole.to_owned(), hint: "", source },
        })?;
        tokio::fs::rename(&partial, &path).await.map_err(io_error(&path))?;
    }
    BlobLocation::file(&path).map_err(io_error(&path))
}
