//! Image build orchestration against [`FakeHost`], and the pure helpers.

use std::os::unix::fs::symlink;

use super::*;
use crate::catalog::ExtraFile;
use crate::host::{FakeHost, HostCall, HostTool};

/// `/etc/apt/sources.list.d/debian.sources` of a bookworm host (mirror hosts replaced).
const HOST_DEBIAN_SOURCES: &str = "Types: deb
# http://snapshot.invalid/archive/debian/20250520T000000Z
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

fn host_sources() -> Vec<AptSourceFile> {
    vec![
        AptSourceFile {
            path: "/etc/apt/sources.list".into(),
            contents: "# comment\ndeb-src http://mirror.invalid/debian bookworm main\n\
                       deb [arch=amd64,i386 signed-by=/k.gpg] http://third.invalid/apt cloud-sdk-bookworm main\n\
                       deb http://old.invalid/debian bookworm/updates main contrib # old style\n"
                .into(),
        },
        AptSourceFile { path: "/etc/apt/sources.list.d/debian.sources".into(), contents: HOST_DEBIAN_SOURCES.into() },
        AptSourceFile {
            path: "/etc/apt/sources.list.d/nodesource.sources".into(),
            contents: "Types: deb\nURIs: https://node.invalid/node_20.x\nSuites: nodistro\nComponents: main\n".into(),
        },
        AptSourceFile {
            path: "/etc/apt/sources.list.d/off.sources".into(),
            contents: "Enabled: no\nTypes: deb\nURIs: http://off.invalid/\nSuites: bookworm\nComponents: main\n".into(),
        },
    ]
}

const RENDERED: &str = "Types: deb
URIs: http://old.invalid/debian
Suites: bookworm/updates
Components: main contrib

Types: deb
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

fn fake_host() -> FakeHost {
    FakeHost {
        apt_sources: host_sources(),
        rootfs: vec![
            ("etc/hostname".into(), 0o644, b"buildhost\n".to_vec()),
            ("etc/ssh/ssh_host_ed25519_key".into(), 0o600, b"secret".to_vec()),
            ("etc/ssh/ssh_host_ed25519_key.pub".into(), 0o644, b"public".to_vec()),
            ("etc/ssh/sshd_config".into(), 0o644, b"Port 22\n".to_vec()),
            ("usr/bin/true".into(), 0o755, vec![0; 5000]),
        ],
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
fn renders_the_hosts_sources_for_the_suite() {
    assert_eq!(render_sources(&host_sources(), "bookworm").as_deref(), Some(RENDERED));
    assert_eq!(render_sources(&host_sources(), "trixie"), None);
    assert_eq!(render_sources(&[], "bookworm"), None);
}

#[test]
fn keeps_multi_line_fields_and_options() {
    let files = [
        AptSourceFile {
            path: "/x.sources".into(),
            contents: "Types: deb deb-src\nURIs: http://a.invalid/\nSuites: bookworm trixie\nComponents: main\n\
                       Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n"
                .into(),
        },
        AptSourceFile {
            path: "/y.list".into(),
            contents: "deb [signed-by=/k.gpg arch=amd64] http://b.invalid/ bookworm main\n".into(),
        },
    ];
    assert_eq!(
        render_sources(&files, "bookworm").unwrap(),
        "Types: deb\nURIs: http://a.invalid/\nSuites: bookworm\nComponents: main\n\
         Signed-By: \n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n\n\
         Types: deb\nURIs: http://b.invalid/\nSuites: bookworm\nComponents: main\nSigned-By: /k.gpg\nArchitectures: amd64\n"
    );
}

#[test]
fn builds_and_publishes_through_the_host_tools() {
    let host = fake_host();
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    let build = ImageBuild::catalog("minimal").unwrap();
    let mut stages = Vec::new();
    let image = build_image(&host, &images, &build, &mut |s| stages.push(s.to_owned())).unwrap();

    assert_eq!(stages, ["debootstrap", "mkfs", "checksum", "publish"]);
    let calls = host.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0], HostCall::ReadAptSources);
    let HostCall::Mmdebstrap(bootstrap) = &calls[1] else { panic!("{calls:?}") };
    assert_eq!(bootstrap.suite, "bookworm");
    assert_eq!(bootstrap.variant, "minbase");
    assert_eq!(bootstrap.packages, ["kmod", "iproute2", "procps"]);
    assert_eq!(bootstrap.sources, RENDERED);
    assert!(bootstrap.target.starts_with(&images) && bootstrap.target.ends_with("rootfs"));
    let HostCall::MkfsExt4(mkfs) = &calls[2] else { panic!("{calls:?}") };
    assert_eq!(mkfs.dir, bootstrap.target);
    assert_eq!(mkfs.label, "banger-root");
    assert!(mkfs.size_mib >= 64 && mkfs.inodes >= 4096, "{mkfs:?}");

    let dir = images.join("minimal");
    assert_eq!(entries(&images), ["minimal"], "staging left behind");
    assert_eq!(entries(&dir), ["image.json", "rootfs.ext4"]);
    assert_eq!(image.path, dir.join("rootfs.ext4"));
    assert_eq!(image.manifest.sha256, sha256_file(&image.path).unwrap());
    assert_eq!(image.manifest.sha256.len(), 64);
    assert_eq!(image.manifest.size_bytes, 4096);
    assert_eq!(image.manifest.init, InitMode::Fast);
    assert_eq!(image.manifest.source, ImageSource::Catalog { entry: "minimal".into() });
    assert_eq!(image.manifest.recipe, Some(build.recipe.clone()));
    assert_eq!(open_image(&images, "minimal").unwrap(), image);

    delete_image_dir(&images, "minimal").unwrap();
    let err = delete_image_dir(&images, "minimal").unwrap_err();
    assert_eq!(err.to_string(), "image 'minimal' not found; run `banger image build minimal`");
}

#[test]
fn refuses_an_existing_name_before_any_host_call() {
    let host = fake_host();
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("minimal")).unwrap();
    let err = build_image(&host, root.path(), &ImageBuild::catalog("minimal").unwrap(), &mut |_| {}).unwrap_err();
    assert_eq!(err.to_string(), "image 'minimal' already exists; delete it with `banger image delete minimal`");
    assert!(host.calls().is_empty());
}

#[test]
fn failures_leave_no_staging_behind() {
    let root = tempfile::tempdir().unwrap();
    let build = ImageBuild::catalog("minimal").unwrap();
    for tool in [HostTool::Mmdebstrap, HostTool::MkfsExt4, HostTool::AptSources] {
        let host = FakeHost { fail_on: Some(tool), ..fake_host() };
        let err = build_image(&host, root.path(), &build, &mut |_| {}).unwrap_err();
        match tool {
            HostTool::Mmdebstrap => assert!(matches!(err, BuildImageError::Bootstrap { .. }), "{err:?}"),
            HostTool::MkfsExt4 => assert!(matches!(err, BuildImageError::Mkfs(_)), "{err:?}"),
            _ => assert!(matches!(err, BuildImageError::Sources(_)), "{err:?}"),
        }
        assert_eq!(entries(root.path()), Vec::<String>::new(), "{tool} failure left files");
    }

    let no_sources = FakeHost { apt_sources: Vec::new(), ..fake_host() };
    let err = build_image(&no_sources, root.path(), &build, &mut |_| {}).unwrap_err();
    assert!(err.to_string().starts_with("the host's apt sources serve no 'bookworm' suite"), "{err}");
    assert_eq!(no_sources.calls(), [HostCall::ReadAptSources]);

    let mut bad_file = build.clone();
    bad_file.recipe.files.push(ExtraFile { path: "etc/x".into(), mode: 0o644, contents: String::new() });
    let err = build_image(&fake_host(), root.path(), &bad_file, &mut |_| {}).unwrap_err();
    assert_eq!(err.to_string(), "recipe file 'etc/x' cannot be written: the path must be absolute");
    assert_eq!(entries(root.path()), Vec::<String>::new());
}

#[test]
fn customizes_the_tree_without_following_symlinks() {
    let outside = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let tree = root.path();
    fs::create_dir_all(tree.join("etc/ssh")).unwrap();
    fs::create_dir_all(tree.join("usr/bin")).unwrap();
    fs::write(tree.join("etc/ssh/ssh_host_rsa_key"), "k").unwrap();
    fs::write(tree.join("etc/ssh/sshd_config"), "c").unwrap();
    fs::write(outside.path().join("motd"), "host file").unwrap();
    symlink(outside.path().join("motd"), tree.join("etc/motd")).unwrap();
    symlink("usr/bin", tree.join("bin")).unwrap();

    let mut recipe = catalog::image("minimal").unwrap().recipe();
    recipe.files.push(ExtraFile { path: "/opt/banger/run".into(), mode: 0o755, contents: "#!/bin/sh\n".into() });
    customize(tree, &recipe).unwrap();
    assert_eq!(entries(&tree.join("etc/ssh")), ["sshd_config"]);
    assert_eq!(fs::read_to_string(tree.join("etc/hostname")).unwrap(), "banger\n");
    assert!(fs::read_to_string(tree.join("etc/hosts")).unwrap().contains("127.0.1.1\tbanger"));
    assert!(tree.join("etc/banger").is_dir());
    assert_eq!(fs::read_to_string(tree.join("etc/motd")).unwrap(), "This is a banger guest.\n");
    assert_eq!(fs::read_to_string(outside.path().join("motd")).unwrap(), "host file", "followed a symlink");
    assert_eq!(fs::metadata(tree.join("opt/banger/run")).unwrap().permissions().mode() & 0o7777, 0o755);

    recipe.files.push(ExtraFile { path: "/bin/tool".into(), mode: 0o755, contents: String::new() });
    let err = customize(tree, &recipe).unwrap_err();
    assert!(matches!(err, BuildImageError::BadFile { .. }), "{err:?}");
    for bad in ["/", "/etc/../x", "etc/x"] {
        assert!(guest_relative(bad).is_err(), "{bad}");
    }
}

#[test]
fn sizes_with_headroom() {
    // 250 MiB of content in 10,000 entries.
    let (mib, inodes) = filesystem_size(250 * MIB, 10_000);
    assert_eq!(inodes, 17_408);
    assert_eq!(mib, 325 + 5 + 64);
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("d")).unwrap();
    fs::write(root.path().join("d/f"), [0u8; 5000]).unwrap();
    fs::write(root.path().join("g"), b"x").unwrap();
    assert_eq!(measure(root.path()).unwrap(), (2 * BLOCK + 2 * BLOCK + BLOCK, 4));
}

#[test]
fn recognises_clean_ext4_superblocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut image = vec![0u8; 4096];
    image[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
    for (state, incompat, clean) in [(1u16, 0u32, true), (0, 0, false), (3, 0, false), (1, 0x4, false)] {
        image[1024 + 0x3a..1024 + 0x3c].copy_from_slice(&state.to_le_bytes());
        image[1024 + 0x60..1024 + 0x64].copy_from_slice(&incompat.to_le_bytes());
        fs::write(&path, &image).unwrap();
        assert_eq!(is_clean_ext4(&path).unwrap(), clean, "state {state} incompat {incompat:#x}");
    }
    fs::write(&path, b"short").unwrap();
    assert!(!is_clean_ext4(&path).unwrap());
    fs::write(&path, b"abc").unwrap();
    assert_eq!(sha256_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}
