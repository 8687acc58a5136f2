//! The registry path against a tiny plain-HTTP registry on 127.0.0.1, served from memory.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use super::*;

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Serves `routes` (path → content type, body) until the test process ends; returns the port.
fn serve(routes: HashMap<String, (String, Vec<u8>)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) <= 2 {
                    break;
                }
            }
            let mut words = request.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, content_type, body) = match routes.get(path) {
                Some((content_type, body)) => ("200 OK", content_type.clone(), body.clone()),
                None if path == "/v2/" => ("200 OK", "application/json".to_owned(), b"{}".to_vec()),
                None => (
                    "404 Not Found",
                    "application/json".to_owned(),
                    br#"{"errors":[{"code":"NOT_FOUND","message":"not found"}]}"#.to_vec(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                 Docker-Content-Digest: {}\r\nConnection: close\r\n\r\n",
                body.len(),
                digest(&body)
            );
            let _ = stream.write_all(head.as_bytes());
            if method != "HEAD" {
                let _ = stream.write_all(&body);
            }
        }
    });
    port
}

fn json(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

/// Routes for repository `repo`, tag `v1`: an index with arm64 and amd64 images (or only
/// arm64), whose amd64 manifest has `layers`; `serve_layer` may replace a layer's bytes.
fn repository(
    routes: &mut HashMap<String, (String, Vec<u8>)>,
    repo: &str,
    layers: &[(Vec<u8>, Vec<u8>)],
    with_amd64: bool,
    serve_layer: impl Fn(&[u8]) -> Vec<u8>,
) -> String {
    let mut blob = |data: &[u8], served: Vec<u8>| {
        let d = digest(data);
        routes.insert(format!("/v2/{repo}/blobs/{d}"), ("application/octet-stream".to_owned(), served));
        d
    };
    let diff_ids: Vec<String> = layers.iter().map(|(tar, _)| digest(tar)).collect();
    let config = json(
        serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}),
    );
    let config_digest = blob(&config, config.clone());
    let descriptors: Vec<_> = layers
        .iter()
        .map(|(_, b)| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(b, serve_layer(b)), "size": b.len()})
        })
        .collect();
    let manifest = json(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }));
    let manifest_digest = digest(&manifest);
    routes.insert(format!("/v2/{repo}/manifests/{manifest_digest}"), (MANIFEST.to_owned(), manifest.clone()));
    let arm = json(
        serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": {"mediaType": "x", "digest": config_digest, "size": 1}, "layers": []}),
    );
    let arm_digest = digest(&arm);
    routes.insert(format!("/v2/{repo}/manifests/{arm_digest}"), (MANIFEST.to_owned(), arm));
    let mut entries = vec![
        serde_json::json!({"mediaType": MANIFEST, "digest": arm_digest, "size": 1, "platform": {"architecture": "arm64", "os": "linux"}}),
    ];
    if with_amd64 {
        entries.push(serde_json::json!({"mediaType": MANIFEST, "digest": manifest_digest, "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}}));
    }
    let index = json(serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}));
    routes.insert(format!("/v2/{repo}/manifests/v1"), (INDEX.to_owned(), index));
    manifest_digest
}

#[test]
fn pulls_from_a_registry_picking_linux_amd64() {
    let lower = base_layer();
    let upper = layer(&[E::File("etc/motd", 0o644, "from the registry")]);
    let layers = [(lower.clone(), gzip(&lower)), (upper.clone(), gzip(&upper))];
    let mut routes = HashMap::new();
    let manifest_digest = repository(&mut routes, "test/img", &layers, true, <[u8]>::to_vec);
    repository(&mut routes, "test/arm", &layers, false, <[u8]>::to_vec);
    repository(&mut routes, "test/bad", &layers, true, |b| {
        let mut b = b.to_vec();
        let last = b.len() - 1;
        b[last] ^= 1;
        b
    });
    let port = serve(routes);

    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let host = SnapshotHost::default();
    let reference = format!("127.0.0.1:{port}/test/img:v1");
    let mut stages = Vec::new();
    let source = parse_source(&reference, true);
    let image = pull_image(&host, &images, "reg", &source, &mut |s| stages.push(s.to_owned())).unwrap();
    assert_eq!(stages, ["resolve", "fetch", "verify", "flatten", "mkfs", "checksum", "publish"]);
    assert_eq!(image.manifest.source, ImageSource::Oci { reference: reference.clone(), digest: Some(manifest_digest) });
    assert_eq!(host.trees.lock().unwrap()[0]["etc/motd"], "f 644 from the registry");

    let source = parse_source(&format!("127.0.0.1:{port}/test/arm:v1"), true);
    let err = pull_image(&host, &images, "arm", &source, &mut |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("'127.0.0.1:{port}/test/arm:v1' has no linux/amd64 image (it has: linux/arm64); banger runs linux/amd64 guests")
    );

    let source = parse_source(&format!("127.0.0.1:{port}/test/bad:v1"), true);
    let err = pull_image(&host, &images, "bad", &source, &mut |_| {}).unwrap_err();
    assert!(matches!(err, PullImageError::DigestMismatch { .. }), "{err:?}");

    let source = parse_source(&format!("127.0.0.1:{port}/test/missing:v1"), true);
    let err = pull_image(&host, &images, "missing", &source, &mut |_| {}).unwrap_err();
    assert!(err.to_string().starts_with(&format!("cannot pull '127.0.0.1:{port}/test/missing:v1'")), "{err}");

    let names: Vec<_> = fs::read_dir(&images).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["reg"]);
}
