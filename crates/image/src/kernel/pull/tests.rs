//! Kernel pull orchestration against [`FakeHost`], with a synthetic kernel package.

use super::*;
use crate::host::{FakeHost, HostCall, HostTool};
use crate::kernel::vmlinux::tests::{bzimage, tiny_elf};
use crate::modinfo::tests::{virtio_tree, write_module};

const RELEASE: &str = "6.1.0-99-cloud-amd64";
const PACKAGE: &str = "linux-image-6.1.0-56-cloud-amd64";
const VERSION: &str = "6.1.192-2";

/// `apt-cache depends --important linux-image-cloud-amd64`, captured on a bookworm host.
const REAL_DEPENDS: &str = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";

/// `apt-cache policy linux-image-6.1.0-56-cloud-amd64`, captured on a bookworm host (mirror
/// host names replaced).
const REAL_POLICY: &str = "linux-image-6.1.0-56-cloud-amd64:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
     6.1.192-2 500
        500 http://mirror.invalid/debian-security bookworm-security/main amd64 Packages
";

fn tar_gz(build: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>)) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    build(&mut tar);
    tar.into_inner().unwrap().finish().unwrap()
}

fn add_file(tar: &mut tar::Builder<impl std::io::Write>, path: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    tar.append_data(&mut header, path, data).unwrap();
}

/// A kernel package: bzImage, config, the virtio module tree plus one module nobody needs.
fn kernel_deb() -> Vec<u8> {
    let tree = tempfile::tempdir().unwrap();
    virtio_tree(tree.path());
    write_module(tree.path(), "kernel/drivers/gpu/drm/unneeded.ko", "unneeded", "");
    let image = bzimage(4, 8, &tiny_elf(b"vmlinux body"));
    let data = tar_gz(|tar| {
        add_file(tar, &format!("./boot/vmlinuz-{RELEASE}"), &image);
        add_file(tar, &format!("./boot/config-{RELEASE}"), b"CONFIG_EXT4_FS=y\n");
        tar.append_dir_all(format!("./lib/modules/{RELEASE}"), tree.path()).unwrap();
    });
    let control = tar_gz(|tar| {
        let text = format!("Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: amd64\n");
        add_file(tar, "./control", text.as_bytes());
    });
    let mut deb = ar::Builder::new(Vec::new());
    for (name, contents) in [("debian-binary", b"2.0\n".to_vec()), ("control.tar.gz", control), ("data.tar.gz", data)] {
        deb.append(&ar::Header::new(name.as_bytes().to_vec(), contents.len() as u64), contents.as_slice()).unwrap();
    }
    deb.into_inner().unwrap()
}

fn apt_host() -> FakeHost {
    FakeHost {
        depends_output: REAL_DEPENDS.to_owned(),
        policy_output: REAL_POLICY.to_owned(),
        deb: kernel_deb(),
        ..FakeHost::default()
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn parses_captured_apt_output() {
    assert_eq!(parse_apt_depends(REAL_DEPENDS, "linux-image-cloud-amd64").as_deref(), Some(PACKAGE));
    assert_eq!(parse_apt_candidate(REAL_POLICY).as_deref(), Some(VERSION));
    let alternatives = "m\n  |Depends: <virtual-thing>\n  PreDepends: dpkg\n  |Depends: linux-image-6.1.0-9-amd64\n";
    assert_eq!(parse_apt_depends(alternatives, "m").as_deref(), Some("linux-image-6.1.0-9-amd64"));
    assert_eq!(parse_apt_depends("m\n  Depends: kmod\n", "m"), None);
    assert_eq!(parse_apt_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"), None);
    assert_eq!(parse_apt_candidate(""), None);
}

#[test]
fn pulls_through_apt_and_publishes() {
    let host = apt_host();
    let root = tempfile::tempdir().unwrap();
    let kernels = root.path().join("kernels");
    let mut stages = Vec::new();
    let pull = KernelPull::catalog("debian-6.1-cloud").unwrap();
    let kernel = pull_kernel(&host, &kernels, &pull, &mut |s| stages.push(s.to_owned())).unwrap();

    assert_eq!(stages, ["resolve", "download", "extract", "publish"]);
    let calls = host.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0], HostCall::AptCacheDepends { package: "linux-image-cloud-amd64".into() });
    assert_eq!(calls[1], HostCall::AptCachePolicy { package: PACKAGE.into() });
    let HostCall::AptDownload { package, version, dir } = &calls[2] else { panic!("{calls:?}") };
    assert_eq!((package.as_str(), version.as_str()), (PACKAGE, VERSION));
    assert!(dir.starts_with(&kernels) && dir.to_string_lossy().contains(".staging-"));

    let dir = kernels.join("debian-6.1-cloud");
    assert_eq!(entries(&kernels), ["debian-6.1-cloud"], "staging left behind");
    assert_eq!(entries(&dir), ["config", "kernel.json", "modules", "modules.json", "vmlinux", "vmlinuz"]);
    assert_eq!(kernel.name, "debian-6.1-cloud");
    assert_eq!(kernel.package.as_deref(), Some(PACKAGE));
    assert_eq!(kernel.version.as_deref(), Some(VERSION));
    assert_eq!(kernel.release, RELEASE);
    assert_eq!(kernel.vmlinux, dir.join("vmlinux"));
    assert_eq!(fs::read(&kernel.vmlinux).unwrap(), tiny_elf(b"vmlinux body"));
    assert_eq!(kernel.config, Some(dir.join("config")));
    let names: Vec<_> = kernel.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "virtio",
            "virtio_ring",
            "virtio_mmio",
            "virtio_blk",
            "failover",
            "net_failover",
            "virtio_net",
            "virtio_console",
            "overlay",
            "vsock",
            "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport",
            "virtio_balloon"
        ]
    );
    for module in &kernel.modules {
        assert!(module.path.is_file(), "{}", module.path.display());
        assert_eq!(module.path, dir.join("modules").join(&module.relative));
    }
    // Pruned: the unneeded module and its now-empty directories are gone; lists stay.
    assert!(!dir.join("modules/kernel/drivers/gpu").exists());
    assert!(dir.join("modules/modules.builtin").is_file());

    let manifest: KernelManifest = serde_json::from_slice(&fs::read(dir.join("kernel.json")).unwrap()).unwrap();
    assert_eq!(manifest.source, KernelSource::Apt { metapackage: "linux-image-cloud-amd64".into() });
    assert_eq!(manifest.version.as_deref(), Some(VERSION));
    assert!(manifest.pruned_modules);
    assert_eq!(open_kernel(&kernels, "debian-6.1-cloud").unwrap(), kernel);
}

#[test]
fn refuses_an_existing_name_before_any_host_call() {
    let host = apt_host();
    let root = tempfile::tempdir().unwrap();
    fs::create_dir_all(root.path().join("debian-6.1-cloud")).unwrap();
    let pull = KernelPull::catalog("debian-6.1-cloud").unwrap();
    let err = pull_kernel(&host, root.path(), &pull, &mut |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "kernel 'debian-6.1-cloud' already exists; delete it with `banger kernel delete debian-6.1-cloud`"
    );
    assert!(host.calls().is_empty());
    assert_eq!(entries(root.path()), ["debian-6.1-cloud"]);
}

#[test]
fn failures_leave_no_staging_behind() {
    let root = tempfile::tempdir().unwrap();
    let pull = KernelPull::catalog("debian-6.1-cloud").unwrap();

    let failing_download = FakeHost { fail_on: Some(HostTool::AptGet), ..apt_host() };
    let err = pull_kernel(&failing_download, root.path(), &pull, &mut |_| {}).unwrap_err();
    assert!(matches!(err, PullKernelError::Download { .. }), "{err:?}");
    assert_eq!(entries(root.path()), Vec::<String>::new());

    let no_candidate = FakeHost { policy_output: String::new(), ..apt_host() };
    let err = pull_kernel(&no_candidate, root.path(), &pull, &mut |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("apt has no installable version of '{PACKAGE}'; run `apt-get update` on the host, or pass `--from FILE.deb`")
    );
    let no_versioned = FakeHost { depends_output: "linux-image-cloud-amd64\n".into(), ..apt_host() };
    let err = pull_kernel(&no_versioned, root.path(), &pull, &mut |_| {}).unwrap_err();
    assert!(matches!(err, PullKernelError::NoVersionedPackage { .. }), "{err:?}");

    let not_a_kernel = FakeHost { deb: b"<html>not found</html>".to_vec(), ..apt_host() };
    let url_pull = KernelPull::from_arg("k", "https://example.invalid/k.deb");
    let err = pull_kernel(&not_a_kernel, root.path(), &url_pull, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("is not a Debian kernel package"), "{err}");
    let calls = not_a_kernel.calls();
    let [HostCall::FetchUrl { url, dest }] = calls.as_slice() else { panic!("{calls:?}") };
    assert_eq!(url, "https://example.invalid/k.deb");
    assert!(dest.to_string_lossy().contains(".staging-"));

    let mut missing_module = KernelPull::catalog("debian-6.1-cloud").unwrap();
    missing_module.modules.push("9p".into());
    let err = pull_kernel(&apt_host(), root.path(), &missing_module, &mut |_| {}).unwrap_err();
    assert!(matches!(err, PullKernelError::ModuleOrder(_)), "{err:?}");

    assert_eq!(entries(root.path()), Vec::<String>::new(), "a failed pull left files");
}

#[test]
fn pulls_from_a_file_with_version_from_its_control() {
    let host = FakeHost::new();
    let root = tempfile::tempdir().unwrap();
    let deb = root.path().join("k.deb");
    fs::write(&deb, kernel_deb()).unwrap();
    let mut pull = KernelPull::from_arg("custom", deb.to_str().unwrap());
    pull.prune_modules = false;
    let kernels = root.path().join("kernels");
    let mut stages = Vec::new();
    let kernel = pull_kernel(&host, &kernels, &pull, &mut |s| stages.push(s.to_owned())).unwrap();
    assert!(host.calls().is_empty());
    assert_eq!(stages, ["extract", "publish"]);
    assert_eq!(kernel.source, KernelSource::File { path: deb.clone() });
    assert_eq!((kernel.package.as_deref(), kernel.version.as_deref()), (Some(PACKAGE), Some(VERSION)));
    assert!(kernel.dir.join("modules/kernel/drivers/gpu/drm/unneeded.ko").is_file(), "kept unpruned");
    assert!(deb.is_file(), "the user's file stays");

    delete_kernel_dir(&kernels, "custom").unwrap();
    assert!(!kernel.dir.exists());
    let err = delete_kernel_dir(&kernels, "custom").unwrap_err();
    assert_eq!(err.to_string(), "kernel 'custom' not found; run `banger kernel pull custom`");
    assert!(matches!(open_kernel(&kernels, "custom"), Err(KernelDirError::NotFound { .. })));
}

#[test]
fn source_arguments() {
    assert_eq!(KernelSource::from_arg("https://h/x.deb"), KernelSource::Url { url: "https://h/x.deb".into() });
    assert_eq!(KernelSource::from_arg("./x.deb"), KernelSource::File { path: "./x.deb".into() });
    assert_eq!(KernelPull::from_arg("other", "x.deb").modules, GUEST_MODULES);
    let err =
        pull_kernel(&FakeHost::new(), Path::new("/nonexistent"), &KernelPull::from_arg("../x", "x.deb"), &mut |_| {})
            .unwrap_err();
    assert!(matches!(err, PullKernelError::InvalidName { .. }));
}
