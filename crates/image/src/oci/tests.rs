//! OCI sources, flattening and the pull pipeline against [`FakeHost`], with synthetic layers.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use super::flatten::Compression;
use super::*;
use crate::host::{AptSourceFile, FakeHost, HostCall, HostToolError, MkfsRequest, MmdebstrapRequest};

/// One entry of a synthetic layer.
#[derive(Debug, Clone)]
pub(crate) enum E {
    Dir(&'static str, u32),
    File(&'static str, u32, &'static str),
    /// Path, uid, gid, mode, mtime, contents.
    Owned(&'static str, u64, u64, u32, u64, &'static str),
    /// A file (mode 0755, content `#!`) preceded by PAX records (full keys).
    Pax(&'static str, Vec<(String, Vec<u8>)>),
    Symlink(&'static str, &'static str),
    HardLink(&'static str, &'static str),
    Char(&'static str),
    Fifo(&'static str),
}

fn set_raw(slot: &mut [u8], bytes: &[u8]) {
    slot.fill(0);
    slot[..bytes.len()].copy_from_slice(bytes);
}

fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    // Raw bytes: tar's own setters refuse `..` and absolute names, which hostile layers need.
    set_raw(&mut h.as_old_mut().name, name.as_bytes());
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h.set_cksum();
    h
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body_len + 1;
    while len.to_string().len() + body_len != len {
        len += 1;
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// An uncompressed layer tar.
pub(crate) fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            E::Dir(name, mode) => b.append(&header(tar::EntryType::Directory, name, *mode, 0), &[][..]).unwrap(),
            E::File(name, mode, data) => {
                b.append(&header(tar::EntryType::Regular, name, *mode, data.len() as u64), data.as_bytes()).unwrap()
            }
            E::Owned(name, uid, gid, mode, mtime, data) => {
                let mut h = header(tar::EntryType::Regular, name, *mode, data.len() as u64);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_mtime(*mtime);
                h.set_cksum();
                b.append(&h, data.as_bytes()).unwrap();
            }
            E::Pax(name, records) => {
                let mut pax = Vec::new();
                for (key, value) in records {
                    pax.extend(pax_record(key, value));
                }
                b.append(&header(tar::EntryType::XHeader, "PaxHeaders/x", 0o644, pax.len() as u64), pax.as_slice())
                    .unwrap();
                b.append(&header(tar::EntryType::Regular, name, 0o755, 2), &b"#!"[..]).unwrap();
            }
            E::Symlink(name, target) | E::HardLink(name, target) => {
                let kind = match entry {
                    E::Symlink(..) => tar::EntryType::Symlink,
                    _ => tar::EntryType::Link,
                };
                let mut h = header(kind, name, 0o777, 0);
                set_raw(&mut h.as_old_mut().linkname, target.as_bytes());
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Char(name) => {
                let mut h = header(tar::EntryType::Char, name, 0o666, 0);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Fifo(name) => b.append(&header(tar::EntryType::Fifo, name, 0o644, 0), &[][..]).unwrap(),
        }
    }
    b.into_inner().unwrap()
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).unwrap()
}

pub(crate) fn digest(data: &[u8]) -> String {
    sha256_reader(data).unwrap()
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

fn put_blob(layout: &Path, data: &[u8]) -> String {
    let d = digest(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(d.trim_start_matches("sha256:")), data).unwrap();
    d
}

/// Writes an OCI layout with one image tagged `tag`; `layers` are (uncompressed tar, blob).
pub(crate) fn write_layout(layout: &Path, tag: &str, layers: &[(Vec<u8>, Vec<u8>)]) -> String {
    fs::create_dir_all(layout).unwrap();
    fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let diff_ids: Vec<String> = layers.iter().map(|(tar, _)| digest(tar)).collect();
    let config = config_json(&diff_ids);
    let config_digest = put_blob(layout, &config);
    let layer_descriptors: Vec<_> = layers
        .iter()
        .map(|(_, blob)| {
            let media_type = match Compression::detect(blob) {
                Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::None => "application/vnd.oci.image.layer.v1.tar",
            };
            serde_json::json!({"mediaType": media_type, "digest": put_blob(layout, blob), "size": blob.len()})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layer_descriptors,
    }))
    .unwrap();
    let manifest_digest = put_blob(layout, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {REF_NAME_ANNOTATION: tag},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    manifest_digest
}

/// Writes a `docker save` archive (old style: `<n>/layer.tar`, `<hex>.json`).
fn write_docker_archive(path: &Path, layers: &[(Vec<u8>, Vec<u8>)], diff_ids: Option<Vec<String>>) {
    let diff_ids = diff_ids.unwrap_or_else(|| layers.iter().map(|(tar, _)| digest(tar)).collect());
    let config = config_json(&diff_ids);
    let config_name = format!("{}.json", digest(&config).trim_start_matches("sha256:"));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    add(&config_name, &config);
    let mut names = Vec::new();
    for (i, (_, blob)) in layers.iter().enumerate() {
        let name = format!("l{i}/layer.tar");
        add(&name, blob);
        names.push(name);
    }
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": ["test/img:latest"], "Layers": names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

/// Every entry below `root`: `d MODE`, `f MODE CONTENT`, `l -> TARGET`.
pub(crate) fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let desc = if meta.file_type().is_symlink() {
                format!("l -> {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                stack.push(path.clone());
                format!("d {mode:o}")
            } else {
                format!("f {mode:o} {}", fs::read_to_string(&path).unwrap_or_default())
            };
            out.insert(rel, desc);
        }
    }
    out
}

fn blobs(layers: &[Vec<u8>]) -> Vec<LayerBlob> {
    let dir = tempfile::tempdir().unwrap().keep();
    layers
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let path = dir.join(format!("layer{i}"));
            fs::write(&path, data).unwrap();
            LayerBlob {
                blob: BlobLocation::file(&path).unwrap(),
                digest: None,
                diff_id: None,
                media_type: String::new(),
            }
        })
        .collect()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn flattens_layers_with_whiteouts_and_opaque_directories() {
    let lower = layer(&[
        E::Dir("./", 0o755),
        E::Dir("etc/", 0o755),
        E::File("etc/keep", 0o644, "keep"),
        E::File("etc/gone", 0o644, "gone"),
        E::Dir("opt/app/", 0o755),
        E::File("opt/app/old", 0o644, "old"),
        E::Dir("opt/app/sub/", 0o755),
        E::File("opt/app/sub/deep", 0o644, "deep"),
        E::Dir("tmp/", 0o1777),
        E::File("bin/su", 0o4755, "su"),
        E::File("became-dir", 0o644, "file"),
        E::Dir("became-file/", 0o755),
        E::File("became-file/x", 0o644, "x"),
        E::Symlink("bin/sh", "/bin/busybox"),
        E::File("bin/busybox", 0o755, "bb"),
        E::HardLink("bin/ls", "bin/busybox"),
        E::Dir("lib/wh/", 0o755),
        E::File("lib/wh/f", 0o644, "f"),
    ]);
    let upper = layer(&[
        E::File("etc/.wh.gone", 0o644, ""),
        E::Dir("opt/app/", 0o700),
        E::File("opt/app/new", 0o644, "new"),
        E::File("opt/app/.wh..wh..opq", 0o644, ""),
        E::Dir("became-dir/", 0o750),
        E::File("became-file", 0o600, "now a file"),
        E::File(".wh.lib", 0o644, ""),
        E::File("/abs/ok", 0o644, "absolute names stay inside"),
        E::File(".wh.never-existed", 0o644, ""),
    ]);
    let root = tempfile::tempdir().unwrap();
    let report = flatten(&blobs(&[lower, gzip(&upper)]), root.path()).unwrap();
    assert_eq!(report.layers, 2);
    assert_eq!(report.whiteouts, 4);
    let got = tree(root.path());
    let want: BTreeMap<String, String> = [
        ("abs", "d 755"),
        ("abs/ok", "f 644 absolute names stay inside"),
        ("became-dir", "d 750"),
        ("became-file", "f 600 now a file"),
        ("bin", "d 755"),
        ("bin/busybox", "f 755 bb"),
        ("bin/ls", "f 755 bb"),
        ("bin/sh", "l -> /bin/busybox"),
        ("bin/su", "f 4755 su"),
        ("etc", "d 755"),
        ("etc/keep", "f 644 keep"),
        ("opt", "d 755"),
        ("opt/app", "d 700"),
        ("opt/app/new", "f 644 new"),
        ("tmp", "d 1777"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(got, want);
    let busybox = fs::metadata(root.path().join("bin/busybox")).unwrap();
    assert_eq!(busybox.ino(), fs::metadata(root.path().join("bin/ls")).unwrap().ino());
    assert_eq!(busybox.mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(root.path().join("etc")).unwrap().mtime(),
        1_600_000_000,
        "directory mtimes are applied last"
    );
}

#[test]
fn keeps_owners_mtimes_and_xattrs() {
    // security.capability = cap_net_raw+ep (vfs_cap_data revision 2).
    let mut capability = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00];
    capability.extend([0u8; 12]);
    let mut records = vec![("SCHILY.xattr.user.banger".to_owned(), b"yes".to_vec())];
    if is_root() {
        records.push(("SCHILY.xattr.security.capability".to_owned(), capability.clone()));
    }
    let big_ids = vec![
        ("uid".to_owned(), b"4000000".to_vec()),
        ("gid".to_owned(), b"4000001".to_vec()),
        ("mtime".to_owned(), b"1700000000.25".to_vec()),
    ];
    let data = layer(&[
        E::Owned("home/u/file", 1000, 1001, 0o2750, 1_234_567_890, "mine"),
        E::Pax("usr/bin/ping", records),
        E::Pax("big-ids", big_ids),
    ]);
    let root = tempfile::tempdir().unwrap();
    flatten(&blobs(&[zstd_compress(&data)]), root.path()).unwrap();
    let meta = fs::metadata(root.path().join("home/u/file")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o2750);
    assert_eq!(meta.mtime(), 1_234_567_890);
    if is_root() {
        assert_eq!((meta.uid(), meta.gid()), (1000, 1001));
    }
    let ping = root.path().join("usr/bin/ping");
    let mut value = [0u8; 64];
    let n = rustix::fs::getxattr(&ping, "user.banger", &mut value).unwrap();
    assert_eq!(&value[..n], b"yes");
    if is_root() {
        let n = rustix::fs::getxattr(&ping, "security.capability", &mut value).unwrap();
        assert_eq!(&value[..n], capability.as_slice());
    }
    // PAX uid, gid and mtime records override the header's.
    let big = fs::metadata(root.path().join("big-ids")).unwrap();
    assert_eq!((big.mtime(), big.mtime_nsec()), (1_700_000_000, 250_000_000));
    if is_root() {
        assert_eq!((big.uid(), big.gid()), (4_000_000, 4_000_001));
    }
}

#[test]
fn pax_times_and_records() {
    assert_eq!(parse_pax_time_for_test("1700000000.5"), Some((1_700_000_000, 500_000_000)));
    assert_eq!(parse_pax_time_for_test("12"), Some((12, 0)));
    assert_eq!(parse_pax_time_for_test("x"), None);
    assert_eq!(pax_record("a", b"b"), b"6 a=b\n");
    assert_eq!(pax_record("key", &[b'v'; 95]).len(), 104);
}

fn parse_pax_time_for_test(text: &str) -> Option<(i64, i64)> {
    flatten::parse_pax_time(text).map(|t| (t.tv_sec, t.tv_nsec))
}

#[test]
fn compression_is_detected_by_magic() {
    let data = layer(&[E::File("a", 0o644, "a")]);
    for blob in [data.clone(), gzip(&data), zstd_compress(&data)] {
        let root = tempfile::tempdir().unwrap();
        flatten(&blobs(&[blob]), root.path()).unwrap();
        assert_eq!(fs::read_to_string(root.path().join("a")).unwrap(), "a");
    }
}

#[test]
fn parses_sources() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    fs::create_dir(&layout).unwrap();
    let archive = dir.path().join("img.tar");
    fs::write(&archive, "").unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    assert_eq!(parse_source(&s(&layout), false), OciSource::Layout { path: layout.clone(), tag: None });
    assert_eq!(
        parse_source(&format!("{}:v1", s(&layout)), false),
        OciSource::Layout { path: layout.clone(), tag: Some("v1".into()) }
    );
    assert_eq!(
        parse_source(&format!("oci:{}:v1", s(&layout)), false),
        OciSource::Layout { path: layout.clone(), tag: Some("v1".into()) }
    );
    assert_eq!(parse_source(&s(&archive), false), OciSource::DockerArchive { path: archive.clone() });
    assert_eq!(
        parse_source("127.0.0.1:5000/test/img:tag", true),
        OciSource::Registry { reference: "127.0.0.1:5000/test/img:tag".into(), insecure: true }
    );
    assert_eq!(
        parse_source("docker://debian:bookworm", false),
        OciSource::Registry { reference: "debian:bookworm".into(), insecure: false }
    );
    assert_eq!(
        OciSource::Layout { path: layout.clone(), tag: Some("v1".into()) }.to_string(),
        format!("oci:{}:v1", layout.display())
    );
}

/// [`FakeHost`] that also records what the tree handed to mkfs looks like.
#[derive(Default)]
pub(crate) struct SnapshotHost {
    pub(crate) inner: FakeHost,
    pub(crate) trees: Mutex<Vec<BTreeMap<String, String>>>,
}

impl HostTools for SnapshotHost {
    fn apt_cache_depends(&self, package: &str) -> Result<String, HostToolError> {
        self.inner.apt_cache_depends(package)
    }
    fn apt_cache_policy(&self, package: &str) -> Result<String, HostToolError> {
        self.inner.apt_cache_policy(package)
    }
    fn apt_download(&self, package: &str, version: &str, dir: &Path) -> Result<(), HostToolError> {
        self.inner.apt_download(package, version, dir)
    }
    fn fetch_url(&self, url: &str, dest: &Path) -> Result<(), HostToolError> {
        self.inner.fetch_url(url, dest)
    }
    fn read_apt_sources(&self) -> Result<Vec<AptSourceFile>, HostToolError> {
        self.inner.read_apt_sources()
    }
    fn mmdebstrap(&self, request: &MmdebstrapRequest) -> Result<(), HostToolError> {
        self.inner.mmdebstrap(request)
    }
    fn mkfs_ext4(&self, request: &MkfsRequest) -> Result<(), HostToolError> {
        self.trees.lock().unwrap().push(tree(&request.dir));
        self.inner.mkfs_ext4(request)
    }
}

fn base_layer() -> Vec<u8> {
    layer(&[
        E::Dir("etc/", 0o755),
        E::Dir("etc/ssh/", 0o755),
        E::File("etc/ssh/ssh_host_ed25519_key", 0o600, "secret"),
        E::File("etc/ssh/ssh_host_ed25519_key.pub", 0o644, "public"),
        E::File("etc/ssh/sshd_config", 0o644, "config"),
        E::Dir("bin/", 0o755),
        E::File("bin/busybox", 0o755, "bb"),
        E::Symlink("bin/sh", "busybox"),
    ])
}

#[test]
fn pulls_an_oci_layout_through_the_whole_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let lower = base_layer();
    let upper = layer(&[E::File("etc/motd", 0o644, "hi"), E::File("bin/.wh.busybox", 0o644, "")]);
    let manifest_digest = write_layout(&layout, "v1", &[(lower.clone(), gzip(&lower)), (upper.clone(), upper)]);
    let images = dir.path().join("images");
    let host = SnapshotHost::default();
    let mut stages = Vec::new();
    let source = parse_source(&format!("{}:v1", layout.display()), false);
    let image = pull_image(&host, &images, "app", &source, &mut |s| stages.push(s.to_owned())).unwrap();
    assert_eq!(stages, ["resolve", "fetch", "verify", "flatten", "mkfs", "checksum", "publish"]);
    assert_eq!(
        image.manifest.source,
        ImageSource::Oci { reference: format!("oci:{}:v1", layout.display()), digest: Some(manifest_digest) }
    );
    assert_eq!(image.manifest.init, InitMode::Fast);
    assert_eq!(image.manifest.recipe, None);
    assert!(image.path.is_file());
    let calls = host.inner.calls();
    assert!(matches!(calls.as_slice(), [HostCall::MkfsExt4(_)]), "{calls:?}");
    let trees = host.trees.lock().unwrap();
    let t = &trees[0];
    assert_eq!(t.get("etc/hostname").map(String::as_str), Some("f 644 banger\n"));
    assert_eq!(t.get("etc/banger").map(String::as_str), Some("d 755"));
    assert_eq!(t.get("etc/motd").map(String::as_str), Some("f 644 hi"));
    assert_eq!(t.get("etc/ssh/sshd_config").map(String::as_str), Some("f 644 config"));
    assert!(!t.contains_key("etc/ssh/ssh_host_ed25519_key"));
    assert!(!t.contains_key("etc/ssh/ssh_host_ed25519_key.pub"));
    assert!(!t.contains_key("bin/busybox"));
    // Only the published image is left.
    let names: Vec<_> = fs::read_dir(&images).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["app"]);
    // image.json round-trips, with the new source kind.
    let reopened = crate::rootfs::open_image(&images, "app").unwrap();
    assert_eq!(reopened.manifest, image.manifest);

    let err = pull_image(&host, &images, "app", &source, &mut |_| {}).unwrap_err();
    assert_eq!(err.to_string(), "image 'app' already exists; delete it with `banger image delete app`");
}

#[test]
fn an_existing_hostname_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let l = layer(&[E::File("etc/hostname", 0o644, "theirs\n")]);
    write_layout(&layout, "v1", &[(l.clone(), l)]);
    let host = SnapshotHost::default();
    pull_image(&host, &dir.path().join("images"), "x", &parse_source(layout.to_str().unwrap(), false), &mut |_| {})
        .unwrap();
    assert_eq!(host.trees.lock().unwrap()[0]["etc/hostname"], "f 644 theirs\n");
}

#[test]
fn layouts_pick_images_by_tag() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let l = layer(&[E::File("a", 0o644, "a")]);
    write_layout(&layout, "v1", &[(l.clone(), l)]);
    let work = tempfile::tempdir().unwrap();
    let source = OciSource::Layout { path: layout.clone(), tag: Some("v2".into()) };
    let err = fetch(&source, work.path(), &mut |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{} is not a usable OCI image layout: no image is tagged 'v2' (tags: v1)", layout.display())
    );
    let source = OciSource::Layout { path: dir.path().to_owned(), tag: None };
    let err = fetch(&source, work.path(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().ends_with("it has no 'oci-layout' file"), "{err}");
}

#[test]
fn pulls_a_docker_archive_and_checks_diff_ids() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("img.tar");
    let lower = base_layer();
    let upper = layer(&[E::File("etc/motd", 0o644, "hi")]);
    write_docker_archive(&archive, &[(lower.clone(), lower.clone()), (upper.clone(), gzip(&upper))], None);
    let host = SnapshotHost::default();
    let images = dir.path().join("images");
    let image = pull_image(&host, &images, "d", &parse_source(archive.to_str().unwrap(), false), &mut |_| {}).unwrap();
    assert_eq!(
        image.manifest.source,
        ImageSource::Oci { reference: format!("docker-archive:{}", archive.display()), digest: None }
    );
    assert_eq!(host.trees.lock().unwrap()[0]["etc/motd"], "f 644 hi");

    // A gzip'd archive works too.
    let gz = dir.path().join("img.tar.gz");
    fs::write(&gz, gzip(&fs::read(&archive).unwrap())).unwrap();
    pull_image(&host, &images, "gz", &parse_source(gz.to_str().unwrap(), false), &mut |_| {}).unwrap();

    // A layer that is not what the config's diff ID says.
    let bad = dir.path().join("bad.tar");
    let wrong = vec![digest(&lower), digest(b"something else")];
    write_docker_archive(&bad, &[(lower.clone(), lower), (upper.clone(), upper)], Some(wrong.clone()));
    let err = pull_image(&host, &images, "bad", &parse_source(bad.to_str().unwrap(), false), &mut |_| {}).unwrap_err();
    assert!(matches!(err, PullImageError::DiffIdMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("expected {}", wrong[1])), "{err}");
    assert!(!images.join("bad").exists());
}

/// Pulls a one-layer layout made of `entries` into a fresh images dir; returns the error, the
/// test dir, and checks that nothing was published or left behind.
fn hostile(entries: &[E], outside: &str) -> (PullImageError, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let data = layer(entries);
    write_layout(&layout, "v1", &[(data.clone(), gzip(&data))]);
    let images = dir.path().join("images");
    let host = SnapshotHost::default();
    let err =
        pull_image(&host, &images, "evil", &parse_source(layout.to_str().unwrap(), false), &mut |_| {}).unwrap_err();
    assert!(host.inner.calls().is_empty(), "mkfs must not run");
    assert_eq!(fs::read_dir(&images).unwrap().count(), 0, "nothing published, staging removed");
    assert!(!dir.path().join(outside).exists(), "{outside} was written outside the image root");
    (err, dir)
}

#[test]
fn refuses_dot_dot_paths() {
    let (err, _dir) = hostile(&[E::File("../../escape", 0o644, "x")], "escape");
    assert!(matches!(&err, PullImageError::Entry { problem: EntryProblem::Escapes, .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.starts_with("layer sha256:"), "{message}");
    assert!(message.ends_with("entry '../../escape' escapes the image root"), "{message}");
    let (err, _dir) = hostile(&[E::File("a/../../escape", 0o644, "x")], "escape");
    assert!(err.to_string().ends_with("escapes the image root"), "{err}");
}

#[test]
fn never_writes_through_a_symlink() {
    let outside = tempfile::tempdir().unwrap();
    let target: &'static str = Box::leak(outside.path().to_str().unwrap().to_owned().into_boxed_str());
    let (err, _dir) = hostile(&[E::Symlink("link", target), E::File("link/evil", 0o644, "x")], "link");
    assert_eq!(
        err.to_string().split_once(' ').unwrap().1.split_once(' ').unwrap().1,
        "entry 'link/evil' would be written through the symlink 'link' (banger never follows symlinks while \
         unpacking)"
    );
    assert!(!outside.path().join("evil").exists());
    // Relative symlinks climbing out are no different.
    let (err, _dir) = hostile(&[E::Symlink("up", "../../.."), E::Dir("up/x/", 0o755)], "x");
    assert!(matches!(err, PullImageError::Entry { problem: EntryProblem::ThroughSymlink { .. }, .. }), "{err:?}");
}

#[test]
fn refuses_hard_links_outside_the_root() {
    let (err, _dir) = hostile(&[E::HardLink("passwd", "../x")], "x");
    assert!(
        err.to_string().ends_with("entry 'passwd' is a hard link to '../x', which escapes the image root"),
        "{err}"
    );
    let (err, _dir) = hostile(&[E::HardLink("passwd", "/etc/passwd")], "passwd");
    assert!(
        err.to_string().ends_with("entry 'passwd' is a hard link to '/etc/passwd', which is not in the image"),
        "{err}"
    );
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), "s").unwrap();
    let target: &'static str = Box::leak(outside.path().to_str().unwrap().to_owned().into_boxed_str());
    let (err, _dir) = hostile(&[E::Symlink("l", target), E::HardLink("h", "l/secret")], "h");
    assert!(matches!(err, PullImageError::Entry { problem: EntryProblem::ThroughSymlink { .. }, .. }), "{err:?}");
    assert_eq!(fs::metadata(outside.path().join("secret")).unwrap().nlink(), 1);
}

#[test]
fn skips_device_nodes_and_fifos() {
    let data = layer(&[E::Dir("dev/", 0o755), E::Char("dev/null"), E::Fifo("run/fifo"), E::File("ok", 0o644, "ok")]);
    let root = tempfile::tempdir().unwrap();
    let report = flatten(&blobs(std::slice::from_ref(&data)), root.path()).unwrap();
    assert_eq!(report.skipped_devices, 2);
    assert!(!root.path().join("dev/null").exists());
    assert!(!root.path().join("run").exists());
    assert!(root.path().join("ok").exists());
    // And through the pipeline: published, not an error.
    let dir = tempfile::tempdir().unwrap();
    write_layout(&dir.path().join("layout"), "v1", &[(data.clone(), data)]);
    let host = SnapshotHost::default();
    let source = parse_source(dir.path().join("layout").to_str().unwrap(), false);
    pull_image(&host, &dir.path().join("images"), "dev", &source, &mut |_| {}).unwrap();
    assert!(!host.trees.lock().unwrap()[0].contains_key("dev/null"));
}

#[test]
fn truncated_layers_are_errors() {
    let big = "x".repeat(100_000);
    let big: &'static str = Box::leak(big.into_boxed_str());
    let data = layer(&[E::File("a", 0o644, "a"), E::File("big", 0o644, big)]);
    // gzip cut in the middle (the digest is of the cut blob, so only unpacking can tell).
    let compressed = gzip(&data);
    let cut_gzip = compressed[..compressed.len() / 2].to_vec();
    // A plain tar cut inside a file's data.
    let cut_tar = data[..data.len() - 5000].to_vec();
    for cut in [cut_gzip, cut_tar] {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        write_layout(&layout, "v1", &[(data.clone(), cut)]);
        let images = dir.path().join("images");
        let err =
            pull_image(&FakeHost::new(), &images, "t", &parse_source(layout.to_str().unwrap(), false), &mut |_| {})
                .unwrap_err();
        assert!(matches!(err, PullImageError::CorruptLayer { .. }), "{err:?}");
        assert!(err.to_string().ends_with("is truncated or corrupt"), "{err}");
        assert_eq!(fs::read_dir(&images).unwrap().count(), 0);
    }
}

#[test]
fn digest_mismatches_name_both_digests() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let data = layer(&[E::File("a", 0o644, "a")]);
    write_layout(&layout, "v1", &[(data.clone(), data.clone())]);
    let expected = digest(&data);
    let blob = layout.join("blobs/sha256").join(expected.trim_start_matches("sha256:"));
    let tampered = layer(&[E::File("a", 0o644, "b")]);
    fs::write(&blob, &tampered).unwrap();
    let images = dir.path().join("images");
    let err = pull_image(&FakeHost::new(), &images, "t", &parse_source(layout.to_str().unwrap(), false), &mut |_| {})
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "layer 1 of 1 ({}) does not match its digest: expected {expected}, got {}",
            short_digest(&expected),
            digest(&tampered)
        )
    );
    assert_eq!(fs::read_dir(&images).unwrap().count(), 0);
}

#[test]
fn refuses_digests_that_are_not_sha256_hex() {
    assert!(sha256_hex(&format!("sha256:{}", "a".repeat(64)), "r").is_ok());
    for bad in ["sha256:../../etc/passwd", "sha512:abc", "sha256:ABC", &format!("sha256:{}", "g".repeat(64))] {
        assert!(matches!(sha256_hex(bad, "r"), Err(PullImageError::UnsupportedDigest { .. })), "{bad}");
    }
}

#[test]
fn image_sources_stay_backward_compatible() {
    let old = r#"{"kind":"catalog","entry":"minimal"}"#;
    assert_eq!(serde_json::from_str::<ImageSource>(old).unwrap(), ImageSource::Catalog { entry: "minimal".into() });
    let oci = ImageSource::Oci { reference: "r/x:1".into(), digest: Some("sha256:ab".into()) };
    let json = serde_json::to_string(&oci).unwrap();
    assert_eq!(json, r#"{"kind":"oci","reference":"r/x:1","digest":"sha256:ab"}"#);
    assert_eq!(serde_json::from_str::<ImageSource>(&json).unwrap(), oci);
    assert_eq!(oci.to_string(), "r/x:1@sha256:ab");
    assert_eq!(ImageSource::Catalog { entry: "minimal".into() }.to_string(), "recipe:minimal");
}

#[test]
fn refuses_other_platforms() {
    let mut image = FetchedImage {
        reference: "r".into(),
        manifest_digest: None,
        config: ImageConfig {
            architecture: Some("arm64".into()),
            os: Some("linux".into()),
            rootfs: None,
            container: None,
        },
        layers: Vec::new(),
    };
    let err = check_image(&mut image).unwrap_err();
    assert_eq!(err.to_string(), "'r' is a linux/arm64 image; banger runs linux/amd64 guests");
}

#[path = "registry_tests.rs"]
mod registry_tests;
